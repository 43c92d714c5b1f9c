//! Process-wide metrics, served by the admin endpoint at `GET /metrics` in
//! the Prometheus text format (0.0.4) through the `prometheus-client` crate.
//!
//! Every exported name is a constant below, and each metric has a small
//! typed function so a call site is one line (`metrics::rows_applied(t, n)`,
//! `metrics::keys_set(view, n)`). Labelled counters keep a cache from the
//! label value to the counter, so counting allocates only the first time a
//! label value is seen; the hot paths count once per rows event or per
//! transaction, never per row.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `tailcache_source_connected` | gauge | | 1 while the binlog stream is open |
//! | `tailcache_source_lag_seconds` | gauge | | how far the replica is behind the server (event timestamps, heartbeats) |
//! | `tailcache_ready` | gauge | | 1 when `/readyz` answers 200 (same conditions, same moment) |
//! | `tailcache_consistent` | gauge | | 1 while the replica is consistent and caught up with the server (`consistent` in `/status`) |
//! | `tailcache_binlog_events_total` | counter | `type` | binlog events read, by event type (inner events of compressed transactions included) |
//! | `tailcache_binlog_events_ignored_total` | counter | `type` | events of a type that carries nothing tailcache needs (the reason is logged at the first one) |
//! | `tailcache_rows_applied_total` | counter | `table` | row changes of watched tables applied to the replica (`schema.table`) |
//! | `tailcache_transactions_applied_total` | counter | | MySQL transactions the replica advanced past (also those that touched no watched table) |
//! | `tailcache_snapshots_total` | counter | `reason` | full snapshots taken: `initial`, `forced`, `admin`, `signal`, `interval`, `server_changed`, `tables_changed`, `table_missing`, `position_lost`, `error` |
//! | `tailcache_table_resnapshots_total` | counter | | single-table re-snapshots (DDL, a changed TABLE_MAP, statement-format DML, a table-scoped decode error) |
//! | `tailcache_reconnects_total` | counter | | binlog sessions that ended with a transient error and were retried: one per attempt, so a server down for a few seconds counts several |
//! | `tailcache_view_compute_seconds` | histogram | `view` | time to compute one view over the replica |
//! | `tailcache_publish_latency_seconds` | histogram | | from the first binlog event of a transaction to memcached's acknowledgement |
//! | `tailcache_keys_set_total` | counter | `view` | keys written to memcached (once per key, not per server) |
//! | `tailcache_keys_deleted_total` | counter | `view` | keys deleted from memcached |
//! | `tailcache_entries_rejected_total` | counter | `view`, `reason` | entries not written: `key_column` (NULL/BLOB key column), `bad_key` (too long, whitespace/control characters), `map_key`, `json` (invalid JSON), `too_large` (over `max_item_size`), `memcached_refused` (refused by memcached for good); whether the view was computed in full or incrementally; also in `/status` (`entries_rejected`) |
//! | `tailcache_view_errors_total` | counter | | view computations that failed as a whole (SQLite error, result columns changed) |
//! | `tailcache_publishes_total` | counter | | publish rounds acknowledged by memcached |
//! | `tailcache_full_republishes_total` | counter | | publishes that rewrote every entry (start-up after a lost memcached, restart/flush, resync, exptime refresh) |
//! | `tailcache_publish_failures_total` | counter | | publish rounds that failed (each is retried with backoff) |
//! | `tailcache_memcached_errors_total` | counter | `server` | failed exchanges with one memcached server |
//! | `tailcache_memcached_lost_state_total` | counter | | times memcached was found restarted, flushed or unreachable |
//! | `tailcache_resyncs_total` | counter | `trigger` | full resyncs finished: `interval`, `signal`, `admin`, `command`, `start`, ... |
//! | `tailcache_resync_drift_keys_total` | counter | `kind` | keys a resync found wrong in memcached and repaired: `missing`, `differed`, `deleted` (stale: published before, no longer produced) |
//! | `tailcache_inspected_keys_total` | counter | `result` | published keys the consistency inspector read back from memcached: `consistent` (holds what was published), `inconsistent` (differs or is missing, still so when checked again once publishing caught up; logged and repaired), `in_flight` (differed, but a publish changed the key or memcached matched by the second look) |

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub const SOURCE_CONNECTED_NAME: &str = "tailcache_source_connected";
pub const SOURCE_LAG_NAME: &str = "tailcache_source_lag_seconds";
pub const READY_NAME: &str = "tailcache_ready";
pub const CONSISTENT_NAME: &str = "tailcache_consistent";
pub const BINLOG_EVENTS_NAME: &str = "tailcache_binlog_events_total";
pub const BINLOG_EVENTS_IGNORED_NAME: &str = "tailcache_binlog_events_ignored_total";
pub const ROWS_APPLIED_NAME: &str = "tailcache_rows_applied_total";
pub const TRANSACTIONS_APPLIED_NAME: &str = "tailcache_transactions_applied_total";
pub const SNAPSHOTS_NAME: &str = "tailcache_snapshots_total";
pub const TABLE_RESNAPSHOTS_NAME: &str = "tailcache_table_resnapshots_total";
pub const RECONNECTS_NAME: &str = "tailcache_reconnects_total";
pub const VIEW_COMPUTE_NAME: &str = "tailcache_view_compute_seconds";
pub const PUBLISH_LATENCY_NAME: &str = "tailcache_publish_latency_seconds";
pub const KEYS_SET_NAME: &str = "tailcache_keys_set_total";
pub const KEYS_DELETED_NAME: &str = "tailcache_keys_deleted_total";
pub const ENTRIES_REJECTED_NAME: &str = "tailcache_entries_rejected_total";
pub const VIEW_ERRORS_NAME: &str = "tailcache_view_errors_total";
pub const PUBLISHES_NAME: &str = "tailcache_publishes_total";
pub const FULL_REPUBLISHES_NAME: &str = "tailcache_full_republishes_total";
pub const PUBLISH_FAILURES_NAME: &str = "tailcache_publish_failures_total";
pub const MEMCACHED_ERRORS_NAME: &str = "tailcache_memcached_errors_total";
pub const LOST_STATE_NAME: &str = "tailcache_memcached_lost_state_total";
pub const RESYNCS_NAME: &str = "tailcache_resyncs_total";
pub const RESYNC_DRIFT_NAME: &str = "tailcache_resync_drift_keys_total";
pub const INSPECTED_KEYS_NAME: &str = "tailcache_inspected_keys_total";

/// Every exported metric name (counters with their `_total` suffix).
pub const ALL_NAMES: [&str; 23] = [
    SOURCE_CONNECTED_NAME,
    SOURCE_LAG_NAME,
    BINLOG_EVENTS_NAME,
    BINLOG_EVENTS_IGNORED_NAME,
    ROWS_APPLIED_NAME,
    TRANSACTIONS_APPLIED_NAME,
    SNAPSHOTS_NAME,
    TABLE_RESNAPSHOTS_NAME,
    RECONNECTS_NAME,
    VIEW_COMPUTE_NAME,
    PUBLISH_LATENCY_NAME,
    KEYS_SET_NAME,
    KEYS_DELETED_NAME,
    ENTRIES_REJECTED_NAME,
    VIEW_ERRORS_NAME,
    PUBLISHES_NAME,
    FULL_REPUBLISHES_NAME,
    PUBLISH_FAILURES_NAME,
    MEMCACHED_ERRORS_NAME,
    LOST_STATE_NAME,
    RESYNCS_NAME,
    RESYNC_DRIFT_NAME,
    INSPECTED_KEYS_NAME,
];

/// A counter per binlog event type (the type byte is the label): a fixed
/// array of atomics, read at scrape time.
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
}

pub static BINLOG_EVENTS: EventTypeCounter = EventTypeCounter::new(BINLOG_EVENTS_NAME, "Binlog events read, by type.");
pub static BINLOG_EVENTS_IGNORED: EventTypeCounter =
    EventTypeCounter::new(BINLOG_EVENTS_IGNORED_NAME, "Binlog events of a type tailcache has no use for, by type.");

/// Unlabelled counters, usable as `metrics::PUBLISHES.inc()`.
pub static TABLE_RESNAPSHOTS: LazyLock<Counter> = LazyLock::new(Counter::default);
pub static VIEW_ERRORS: LazyLock<Counter> = LazyLock::new(Counter::default);
pub static PUBLISHES: LazyLock<Counter> = LazyLock::new(Counter::default);
pub static FULL_REPUBLISHES: LazyLock<Counter> = LazyLock::new(Counter::default);
pub static LOST_STATE: LazyLock<Counter> = LazyLock::new(Counter::default);

type Label1 = [(&'static str, String); 1];
type Label2 = [(&'static str, String); 2];

/// A family with one label and a cache from the label's value to its
/// metric, so the hot path looks up a `&str` without allocating.
struct Labeled<M, C = fn() -> M> {
    key: &'static str,
    family: Family<Label1, M, C>,
    cache: RwLock<HashMap<String, M>>,
}

impl<M: Clone + Default> Labeled<M> {
    fn new(key: &'static str) -> Self {
        Self::with(key, M::default)
    }
}

impl<M: Clone, C: MetricConstructor<M>> Labeled<M, C> {
    fn with(key: &'static str, constructor: C) -> Self {
        Self { key, family: Family::new_with_constructor(constructor), cache: RwLock::new(HashMap::new()) }
    }

    fn get(&self, value: &str) -> M {
        if let Some(m) = self.cache.read().unwrap_or_else(|p| p.into_inner()).get(value) {
            return m.clone();
        }
        let m = self.family.get_or_create_owned(&[(self.key, value.to_owned())]);
        self.cache.write().unwrap_or_else(|p| p.into_inner()).insert(value.to_owned(), m.clone());
        m
    }

    fn with_metric(&self, value: &str, f: impl FnOnce(&M)) {
        if let Some(m) = self.cache.read().unwrap_or_else(|p| p.into_inner()).get(value) {
            f(m);
            return;
        }
        f(&self.get(value));
    }
}

const COMPUTE_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

type HistogramCtor = fn() -> Histogram;

fn compute_histogram() -> Histogram {
    Histogram::new(COMPUTE_BUCKETS)
}

struct Metrics {
    registry: Registry,
    source_connected: Gauge,
    source_lag: Gauge<f64, AtomicU64>,
    ready: Gauge,
    consistent: Gauge,
    rows_applied: RowsApplied,
    transactions_applied: Counter,
    snapshots: Family<Label1, Counter>,
    reconnects: Counter,
    view_compute: Labeled<Histogram, HistogramCtor>,
    publish_latency: Histogram,
    keys_set: Labeled<Counter>,
    keys_deleted: Labeled<Counter>,
    entries_rejected: Family<Label2, Counter>,
    publish_failures: Counter,
    memcached_errors: Labeled<Counter>,
    resyncs: Family<Label1, Counter>,
    resync_drift: Family<Label1, Counter>,
    inspected: Family<Label1, Counter>,
}

/// `tailcache_rows_applied_total{table="schema.table"}`, looked up by the
/// table's schema and name without allocating.
#[derive(Default)]
struct RowsApplied {
    family: Family<Label1, Counter>,
    cache: RwLock<HashMap<String, HashMap<String, Counter>>>,
}

impl RowsApplied {
    fn add(&self, schema: &str, name: &str, n: u64) {
        if let Some(c) = self.cache.read().unwrap_or_else(|p| p.into_inner()).get(schema).and_then(|m| m.get(name)) {
            c.inc_by(n);
            return;
        }
        let c = self.family.get_or_create_owned(&[("table", format!("{schema}.{name}"))]);
        c.inc_by(n);
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(schema.to_owned())
            .or_default()
            .insert(name.to_owned(), c);
    }
}

/// Strips the `_total` the encoder appends to counters.
fn base(name: &'static str) -> &'static str {
    name.strip_suffix("_total").unwrap_or(name)
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut r = Registry::default();
    let m = Metrics {
        registry: Registry::default(),
        source_connected: Gauge::default(),
        source_lag: Gauge::default(),
        ready: Gauge::default(),
        consistent: Gauge::default(),
        rows_applied: RowsApplied::default(),
        transactions_applied: Counter::default(),
        snapshots: Family::default(),
        reconnects: Counter::default(),
        view_compute: Labeled::with("view", compute_histogram as HistogramCtor),
        publish_latency: Histogram::new(LATENCY_BUCKETS),
        keys_set: Labeled::new("view"),
        keys_deleted: Labeled::new("view"),
        entries_rejected: Family::default(),
        publish_failures: Counter::default(),
        memcached_errors: Labeled::new("server"),
        resyncs: Family::default(),
        resync_drift: Family::default(),
        inspected: Family::default(),
    };
    r.register(SOURCE_CONNECTED_NAME, "1 while the binlog stream is open", m.source_connected.clone());
    r.register(SOURCE_LAG_NAME, "Seconds the replica is behind the server", m.source_lag.clone());
    r.register(READY_NAME, "1 when /readyz answers 200", m.ready.clone());
    r.register(
        CONSISTENT_NAME,
        "1 while the replica is consistent and caught up with the server",
        m.consistent.clone(),
    );
    r.register_collector(Box::new(EventCounters));
    r.register(base(ROWS_APPLIED_NAME), "Row changes applied to the replica, by table", m.rows_applied.family.clone());
    r.register(
        base(TRANSACTIONS_APPLIED_NAME),
        "MySQL transactions the replica advanced past",
        m.transactions_applied.clone(),
    );
    r.register(base(SNAPSHOTS_NAME), "Full snapshots taken, by reason", m.snapshots.clone());
    r.register(base(TABLE_RESNAPSHOTS_NAME), "Single-table re-snapshots", TABLE_RESNAPSHOTS.clone());
    r.register(
        base(RECONNECTS_NAME),
        "Binlog sessions ended by a transient error and retried (one per attempt)",
        m.reconnects.clone(),
    );
    r.register(VIEW_COMPUTE_NAME, "Seconds to compute one view over the replica", m.view_compute.family.clone());
    r.register(
        PUBLISH_LATENCY_NAME,
        "Seconds from a transaction's first binlog event to memcached's acknowledgement",
        m.publish_latency.clone(),
    );
    r.register(base(KEYS_SET_NAME), "Keys written to memcached, by view", m.keys_set.family.clone());
    r.register(base(KEYS_DELETED_NAME), "Keys deleted from memcached, by view", m.keys_deleted.family.clone());
    r.register(
        base(ENTRIES_REJECTED_NAME),
        "Cache entries not written (bad key, invalid JSON, value too large), by view and reason",
        m.entries_rejected.clone(),
    );
    r.register(base(VIEW_ERRORS_NAME), "View computations that failed as a whole", VIEW_ERRORS.clone());
    r.register(base(PUBLISHES_NAME), "Publish rounds acknowledged by memcached", PUBLISHES.clone());
    r.register(base(FULL_REPUBLISHES_NAME), "Publishes that rewrote every entry", FULL_REPUBLISHES.clone());
    r.register(base(PUBLISH_FAILURES_NAME), "Publish rounds that failed", m.publish_failures.clone());
    r.register(
        base(MEMCACHED_ERRORS_NAME),
        "Failed exchanges with a memcached server, by server",
        m.memcached_errors.family.clone(),
    );
    r.register(
        base(LOST_STATE_NAME),
        "Times memcached was found restarted, flushed or unreachable",
        LOST_STATE.clone(),
    );
    r.register(base(RESYNCS_NAME), "Full resyncs finished, by trigger", m.resyncs.clone());
    r.register(base(RESYNC_DRIFT_NAME), "Keys a resync found wrong in memcached, by kind", m.resync_drift.clone());
    r.register(
        base(INSPECTED_KEYS_NAME),
        "Published keys the consistency inspector read back from memcached, by result",
        m.inspected.clone(),
    );
    Metrics { registry: r, ..m }
});

/// The two per-event-type counters, read from their atomics at scrape time.
#[derive(Debug)]
struct EventCounters;

impl Collector for EventCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for c in [&BINLOG_EVENTS, &BINLOG_EVENTS_IGNORED] {
            let mut me = encoder.encode_descriptor(base(c.name), c.help, None, MetricType::Counter)?;
            for t in 0..=255u8 {
                let v = c.get(t);
                if v > 0 {
                    let labels = [("type", crate::event_type::name(t))];
                    ConstCounter::new(v).encode(me.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The Content-Type of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// All metrics in the Prometheus text exposition format (0.0.4).
pub fn render() -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &METRICS.registry);
    out
}

/// Sets the gauges that mirror the shared [`crate::status::Status`]; called
/// before each scrape.
pub fn observe_status(s: &crate::status::StatusView) {
    METRICS.source_connected.set(i64::from(s.source_connected));
    METRICS.source_lag.set(s.lag_seconds.unwrap_or(0.0));
    METRICS.consistent.set(i64::from(s.consistent));
}

/// Sets `tailcache_ready` from `/readyz`'s verdict on the same status copy.
pub fn observe_ready(ready: bool) {
    METRICS.ready.set(i64::from(ready));
}

/// Row changes of a watched table applied (count per rows event or batch).
pub fn rows_applied(table: &crate::config::TableRef, n: u64) {
    METRICS.rows_applied.add(&table.schema, &table.name, n);
}

/// One MySQL transaction folded into the replica.
pub fn transaction_applied() {
    METRICS.transactions_applied.inc();
}

/// A full snapshot replaced the replica; `reason` is the free-text reason,
/// reduced to a bounded label by [`snapshot_reason`].
pub fn snapshot_taken(reason: &str) {
    METRICS.snapshots.get_or_create(&[("reason", snapshot_reason(reason).to_owned())]).inc();
}

/// The label for a snapshot's free-text reason (never unbounded).
pub fn snapshot_reason(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    let has = |s: &str| r.contains(s);
    if has("--resync") || has("forced") || has("command") {
        "forced"
    } else if has("no replica") || has("no checkpoint") {
        "initial"
    } else if r == "admin" || has("admin") {
        "admin"
    } else if has("sighup") || has("signal") {
        "signal"
    } else if has("periodic") || has("interval") {
        "interval"
    } else if has("identity") || has("replica follows") {
        "server_changed"
    } else if has("mysql.tables changed") {
        "tables_changed"
    } else if has("is missing") {
        "table_missing"
    } else if has("purged") || has("past the end") || has("no longer on the server") {
        "position_lost"
    } else {
        "error"
    }
}

pub fn reconnect() {
    METRICS.reconnects.inc();
}

/// One view computed in `took`.
pub fn view_computed(view: &str, took: Duration) {
    METRICS.view_compute.with_metric(view, |h| h.observe(took.as_secs_f64()));
}

/// Commit-to-acknowledgement latency of one publish.
pub fn publish_latency(latency: Duration) {
    METRICS.publish_latency.observe(latency.as_secs_f64());
}

pub fn keys_set(view: &str, n: u64) {
    if n > 0 {
        METRICS.keys_set.with_metric(view, |c| {
            c.inc_by(n);
        });
    }
}

pub fn keys_deleted(view: &str, n: u64) {
    if n > 0 {
        METRICS.keys_deleted.with_metric(view, |c| {
            c.inc_by(n);
        });
    }
}

/// `tailcache_entries_rejected_total` as (view, reason) -> count, for
/// `/status` (the counter family cannot be read back).
static REJECTED: LazyLock<std::sync::Mutex<BTreeMap<(String, String), u64>>> = LazyLock::new(Default::default);

fn count_rejected(view: &str, reason: &str) {
    METRICS.entries_rejected.get_or_create(&[("view", view.to_owned()), ("reason", reason.to_owned())]).inc();
    let mut m = REJECTED.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry((view.to_owned(), reason.to_owned())).or_default() += 1;
}

/// An entry not written (rare: the labels are built each time), by view
/// and reason ([`crate::views::EntryError::reason`]).
pub fn entry_rejected(view: &str, reason: &str) {
    count_rejected(view, reason);
}

/// An entry memcached refused (e.g. larger than its item size limit):
/// counted as rejected with reason `memcached_refused`.
pub fn entry_refused(view: &str) {
    count_rejected(view, "memcached_refused");
}

/// What `tailcache_entries_rejected_total` holds: view -> reason -> count
/// (the `entries_rejected` of `/status`).
pub fn entries_rejected() -> BTreeMap<String, BTreeMap<String, u64>> {
    let m = REJECTED.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for ((view, reason), n) in m.iter() {
        out.entry(view.clone()).or_default().insert(reason.clone(), *n);
    }
    out
}

/// A publish round failed (it is retried).
pub fn publish_failed() {
    METRICS.publish_failures.inc();
}

/// A failed exchange with one memcached server (`host:port`).
pub fn memcached_error(server: &str) {
    METRICS.memcached_errors.with_metric(server, |c| {
        c.inc();
    });
}

/// A finished resync: counts it by trigger and adds its drift.
pub fn resync_finished(trigger: &str, counts: &crate::status::ResyncCounts) {
    // Triggers are short words; anything else is not a label value.
    let ok = !trigger.is_empty() && trigger.len() <= 32 && trigger.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let trigger = if ok { trigger } else { "other" };
    METRICS.resyncs.get_or_create(&[("trigger", trigger.to_owned())]).inc();
    for (kind, n) in [
        ("missing", counts.missing),
        ("differed", counts.differed),
        ("deleted", counts.deleted),
        ("orphan", counts.orphans),
    ] {
        METRICS.resync_drift.get_or_create(&[("kind", kind.to_owned())]).inc_by(n);
    }
}

/// The results of the consistency inspector, by label value.
pub const INSPECT_RESULTS: [&str; 3] = ["consistent", "inconsistent", "in_flight"];

/// `n` keys inspected with `result` (one of [`INSPECT_RESULTS`]); `n = 0`
/// makes the series exist (at 0), for alerts on a rate.
pub fn keys_inspected(result: &'static str, n: u64) {
    METRICS.inspected.get_or_create(&[("result", result.to_owned())]).inc_by(n);
}

/// The value of a counter family member, for tests.
#[cfg(test)]
fn family_value<S: Clone + std::hash::Hash + Eq>(f: &Family<S, Counter>, labels: &S) -> u64 {
    f.get(labels).map(|c| c.get()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_metric() {
        // Families without a member yet are left out: give each one.
        let t = crate::config::TableRef { schema: "db".into(), name: "t".into(), qualified: false };
        rows_applied(&t, 3);
        rows_applied(&t, 2);
        transaction_applied();
        snapshot_taken("no replica yet");
        reconnect();
        keys_set("v", 4);
        keys_deleted("v", 1);
        view_computed("v", Duration::from_millis(2));
        publish_latency(Duration::from_millis(7));
        entry_rejected("v", "too_large");
        publish_failed();
        memcached_error("127.0.0.1:11211");
        resync_finished("start", &Default::default());
        keys_inspected("consistent", 3);
        BINLOG_EVENTS.inc(16); // XID
        BINLOG_EVENTS_IGNORED.inc(4); // ROTATE, as an example
        let text = render();
        for name in ALL_NAMES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing in\n{text}");
        }
        assert!(text.contains("tailcache_rows_applied_total{table=\"db.t\"} "), "{text}");
        assert!(text.contains("tailcache_binlog_events_total{type=\"XID\"} "), "{text}");
        assert!(text.contains("tailcache_view_compute_seconds_bucket{view=\"v\",le=\"0.0025\"}"), "{text}");
        assert!(text.contains("tailcache_publish_latency_seconds_count "), "{text}");
        assert!(family_value(&METRICS.rows_applied.family, &[("table", "db.t".to_owned())]) >= 5);
        assert!(text.contains("tailcache_entries_rejected_total{view=\"v\",reason=\"too_large\"} "), "{text}");
    }

    #[test]
    fn snapshot_reasons_are_bounded() {
        assert_eq!(snapshot_reason("forced by --resync"), "forced");
        assert_eq!(snapshot_reason("no replica yet"), "initial");
        assert_eq!(snapshot_reason("admin"), "admin");
        assert_eq!(snapshot_reason("SIGHUP / tailcache resync"), "signal");
        assert_eq!(snapshot_reason("periodic resync"), "interval");
        assert_eq!(snapshot_reason("binlog mysql-bin.000001 is no longer on the server (purged?)"), "position_lost");
        assert_eq!(snapshot_reason("something odd at mysql-bin.000003:77"), "error");
    }

    #[test]
    fn resync_labels() {
        let c = crate::status::ResyncCounts { missing: 2, differed: 1, deleted: 3, ..Default::default() };
        resync_finished("admin", &c);
        resync_finished("a free text trigger", &c);
        assert!(family_value(&METRICS.resyncs, &[("trigger", "admin".to_owned())]) >= 1);
        assert!(family_value(&METRICS.resyncs, &[("trigger", "other".to_owned())]) >= 1);
        assert!(family_value(&METRICS.resync_drift, &[("kind", "deleted".to_owned())]) >= 6);
    }
}
