//! Process-wide metrics: documented names and lock-free counters.
//!
//! Every metric is a `static` with its exported name and help text, so the
//! code that counts and the page that documents them cannot drift apart.
//! [`render`] writes them all in the Prometheus text format.
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `tailcache_entries_rejected_total` | counter | cache entries not written: key too long or with whitespace/control characters, NULL/BLOB key column, invalid JSON, value over `max_item_size` |
//! | `tailcache_view_errors_total` | counter | view computations that failed as a whole (SQLite error, result columns changed) |
//! | `tailcache_keys_set_total` | counter | keys written to memcached (counted once per key, not per server) |
//! | `tailcache_keys_deleted_total` | counter | keys deleted from memcached |
//! | `tailcache_publishes_total` | counter | publish rounds acknowledged by memcached |
//! | `tailcache_full_republishes_total` | counter | publishes that rewrote every entry (start-up after a lost memcached, restart/flush, resync, exptime refresh) |
//! | `tailcache_sink_errors_total` | counter | failed memcached exchanges (each triggers a retry with backoff) |
//! | `tailcache_memcached_lost_state_total` | counter | times memcached was found restarted, flushed or unreachable |
//! | `tailcache_binlog_events_total{type}` | counter | binlog events read, by event type (inner events of compressed transactions included) |
//! | `tailcache_binlog_events_ignored_total{type}` | counter | events of a type that carries nothing tailcache needs (the reason is logged at the first one) |
//! | `tailcache_table_resnapshots_total` | counter | single-table re-snapshots (DDL, a changed TABLE_MAP, statement-format DML, a table-scoped decode error) |
//! | `tailcache_publish_latency_us` | summary | from the first binlog event of a transaction to memcached's acknowledgement, in microseconds (`_sum`, `_count`, `_max`) |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug)]
pub struct Counter {
    pub name: &'static str,
    pub help: &'static str,
    value: AtomicU64,
}

impl Counter {
    pub const fn new(name: &'static str, help: &'static str) -> Self {
        Self { name, help, value: AtomicU64::new(0) }
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// Sum, count and maximum of observed durations in microseconds.
#[derive(Debug)]
pub struct Summary {
    pub name: &'static str,
    pub help: &'static str,
    sum: AtomicU64,
    count: AtomicU64,
    max: AtomicU64,
}

impl Summary {
    pub const fn new(name: &'static str, help: &'static str) -> Self {
        Self { name, help, sum: AtomicU64::new(0), count: AtomicU64::new(0), max: AtomicU64::new(0) }
    }
    pub fn observe(&self, v: u64) {
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
    }
    /// (sum, count, max)
    pub fn get(&self) -> (u64, u64, u64) {
        (self.sum.load(Ordering::Relaxed), self.count.load(Ordering::Relaxed), self.max.load(Ordering::Relaxed))
    }
}

/// A counter per binlog event type (the type byte is the label).
#[derive(Debug)]
pub struct EventTypeCounter {
    pub name: &'static str,
    pub help: &'static str,
    values: [AtomicU64; 256],
}

impl EventTypeCounter {
    pub const fn new(name: &'static str, help: &'static str) -> Self {
        Self { name, help, values: [const { AtomicU64::new(0) }; 256] }
    }
    /// Counts one event; returns the count before it.
    pub fn inc(&self, event_type: u8) -> u64 {
        self.values[event_type as usize].fetch_add(1, Ordering::Relaxed)
    }
    pub fn get(&self, event_type: u8) -> u64 {
        self.values[event_type as usize].load(Ordering::Relaxed)
    }
    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} counter", self.name, self.help, self.name);
        for t in 0..=255u8 {
            let v = self.get(t);
            if v > 0 {
                let _ = writeln!(out, "{}{{type=\"{}\"}} {v}", self.name, crate::source::events::name(t));
            }
        }
    }
}

pub const BINLOG_EVENTS_NAME: &str = "tailcache_binlog_events_total";
pub const BINLOG_EVENTS_IGNORED_NAME: &str = "tailcache_binlog_events_ignored_total";
pub const TABLE_RESNAPSHOTS_NAME: &str = "tailcache_table_resnapshots_total";
pub static BINLOG_EVENTS: EventTypeCounter = EventTypeCounter::new(BINLOG_EVENTS_NAME, "Binlog events read, by type.");
pub static BINLOG_EVENTS_IGNORED: EventTypeCounter =
    EventTypeCounter::new(BINLOG_EVENTS_IGNORED_NAME, "Binlog events of a type tailcache has no use for, by type.");
pub static TABLE_RESNAPSHOTS: Counter = Counter::new(TABLE_RESNAPSHOTS_NAME, "Single-table re-snapshots.");

pub const ENTRIES_REJECTED_NAME: &str = "tailcache_entries_rejected_total";
pub const VIEW_ERRORS_NAME: &str = "tailcache_view_errors_total";
pub const KEYS_SET_NAME: &str = "tailcache_keys_set_total";
pub const KEYS_DELETED_NAME: &str = "tailcache_keys_deleted_total";
pub const PUBLISHES_NAME: &str = "tailcache_publishes_total";
pub const FULL_REPUBLISHES_NAME: &str = "tailcache_full_republishes_total";
pub const SINK_ERRORS_NAME: &str = "tailcache_sink_errors_total";
pub const LOST_STATE_NAME: &str = "tailcache_memcached_lost_state_total";
pub const PUBLISH_LATENCY_NAME: &str = "tailcache_publish_latency_us";

pub static ENTRIES_REJECTED: Counter =
    Counter::new(ENTRIES_REJECTED_NAME, "Cache entries not written (bad key, invalid JSON, value too large).");
pub static VIEW_ERRORS: Counter = Counter::new(VIEW_ERRORS_NAME, "View computations that failed as a whole.");
pub static KEYS_SET: Counter = Counter::new(KEYS_SET_NAME, "Keys written to memcached.");
pub static KEYS_DELETED: Counter = Counter::new(KEYS_DELETED_NAME, "Keys deleted from memcached.");
pub static PUBLISHES: Counter = Counter::new(PUBLISHES_NAME, "Publish rounds acknowledged by memcached.");
pub static FULL_REPUBLISHES: Counter = Counter::new(FULL_REPUBLISHES_NAME, "Publishes that rewrote every entry.");
pub static SINK_ERRORS: Counter = Counter::new(SINK_ERRORS_NAME, "Failed memcached exchanges.");
pub static LOST_STATE: Counter =
    Counter::new(LOST_STATE_NAME, "Times memcached was found restarted, flushed or unreachable.");
pub static PUBLISH_LATENCY: Summary =
    Summary::new(PUBLISH_LATENCY_NAME, "Microseconds from a transaction's first binlog event to memcached's ack.");

pub fn counters() -> [&'static Counter; 9] {
    [
        &TABLE_RESNAPSHOTS,
        &ENTRIES_REJECTED,
        &VIEW_ERRORS,
        &KEYS_SET,
        &KEYS_DELETED,
        &PUBLISHES,
        &FULL_REPUBLISHES,
        &SINK_ERRORS,
        &LOST_STATE,
    ]
}

/// All metrics in the Prometheus text exposition format.
pub fn render() -> String {
    let mut out = String::new();
    for c in counters() {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} counter\n{} {}", c.name, c.help, c.name, c.name, c.get());
    }
    BINLOG_EVENTS.render(&mut out);
    BINLOG_EVENTS_IGNORED.render(&mut out);
    let s = &PUBLISH_LATENCY;
    let (sum, count, max) = s.get();
    let _ = writeln!(
        out,
        "# HELP {n} {h}\n# TYPE {n} summary\n{n}_sum {sum}\n{n}_count {count}\n{n}_max {max}",
        n = s.name,
        h = s.help
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_metric() {
        let text = render();
        for c in counters() {
            assert!(text.contains(c.name), "{}", c.name);
        }
        assert!(text.contains("tailcache_publish_latency_us_count"));
    }
}
