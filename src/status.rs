//! What the workers know about themselves, shared with the admin endpoint,
//! the readiness check and systemd: one `Arc<Status>` per process.
//!
//! Each worker writes only its own part (the replicator the source and the
//! snapshot, the publisher views, memcached, publishes and resyncs); readers
//! take a consistent copy with [`Status::snapshot`]. Resync completions are
//! also announced on a `watch` channel so a caller can wait for the report
//! of the resync it asked for.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::watch;

use crate::position::BinlogPosition;

/// Per-view figures of one resync.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ResyncCounts {
    /// Keys the view produces, each read back from memcached.
    pub checked: u64,
    /// Produced but absent in memcached: written.
    pub missing: u64,
    /// Present with other bytes or flags: rewritten.
    pub differed: u64,
    /// Published before but no longer produced: deleted.
    pub deleted: u64,
    /// Present and identical: not written.
    pub unchanged: u64,
    /// Found in memcached under the prefix, matching the view's key
    /// template, but neither produced by it nor recorded: deleted.
    pub orphans: u64,
    /// Found under the prefix, matching no view's key template: left
    /// alone (another application may share the prefix); only in the
    /// total.
    pub foreign: u64,
}

impl ResyncCounts {
    pub fn add(&mut self, o: &ResyncCounts) {
        self.checked += o.checked;
        self.missing += o.missing;
        self.differed += o.differed;
        self.deleted += o.deleted;
        self.unchanged += o.unchanged;
        self.orphans += o.orphans;
        self.foreign += o.foreign;
    }
}

/// The outcome of one full resync, as logged, served and returned.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncReport {
    /// Increasing per process; [`Status::resync_done`] carries the latest.
    pub seq: u64,
    /// What asked for it: `interval`, `signal`, `admin`, `command`,
    /// `start`, `memcached_lost`, `purged_binlog`, `ddl`, ...
    pub trigger: String,
    #[serde(flatten)]
    pub total: ResyncCounts,
    pub views: BTreeMap<String, ResyncCounts>,
    pub duration_ms: u64,
    /// RFC 3339 / seconds since the epoch.
    pub finished_at_unix: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PublishInfo {
    pub at_unix: f64,
    pub position: String,
    pub latency_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ViewStatus {
    pub keys: u64,
    /// Why the view is not being published (does not compile, failed).
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotProgress {
    pub table: String,
    pub rows_copied: u64,
    /// From information_schema.TABLES (an estimate for InnoDB).
    pub estimated_rows: Option<u64>,
}

/// Everything `/status` shows; `Clone` so readers never hold the lock.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusView {
    /// Where the replica is (binlog file:offset of the last applied commit;
    /// a resumed replica's stored position from the start).
    pub position: Option<String>,
    pub gtid: Option<String>,
    /// The replica equals the database at `position`, and the binlog stream
    /// has caught up with the server: it reached the position where the
    /// server's binlog ended when the stream connected, or a heartbeat
    /// said the server had nothing more to send. False while (re)connecting
    /// and catching up, during a snapshot and until a snapshot's own
    /// consistency point.
    pub consistent: bool,
    /// The binlog stream is open.
    pub source_connected: bool,
    /// Why the source is not connected or not streaming (last error).
    pub source_error: Option<String>,
    /// Seconds the replica is behind the server (event timestamps and
    /// heartbeats); `None` before the first event.
    pub lag_seconds: Option<f64>,
    pub last_publish: Option<PublishInfo>,
    /// The last publish round failed (memcached unreachable, ...): why.
    pub publish_error: Option<String>,
    pub last_resync: Option<ResyncReport>,
    pub views: BTreeMap<String, ViewStatus>,
    /// Each memcached server (`host:port`) and whether it answered last.
    pub memcached: BTreeMap<String, bool>,
    pub snapshot: Option<SnapshotProgress>,
    /// A publish has succeeded since the replica became consistent.
    pub published_consistent: bool,
    /// The consistency inspector's results (last hour, since start);
    /// `None` when it is disabled (`inspect.keys_per_second = 0`) or
    /// there is no publisher.
    pub inspect: Option<crate::views::inspect::Tally>,
    /// The replica position memcached must be published at, at least, for
    /// the consistent replica to count as published: the last change sent
    /// to the publisher when the replica became consistent (`None`: none
    /// this session, any publish of the replica will do).
    #[serde(skip)]
    pub publish_needed: Option<BinlogPosition>,
}

impl StatusView {
    /// Memcached holds the consistent replica: a publish succeeded since it
    /// became consistent, at or after [`StatusView::publish_needed`].
    pub fn consistent_published(&self) -> bool {
        self.consistent
            && self.published_consistent
            && self.publish_needed.as_ref().is_none_or(|need| {
                self.last_publish
                    .as_ref()
                    // A checkpoint as shown: `file:pos` and maybe ` (gtid …)`.
                    .and_then(|p| p.position.split_whitespace().next()?.parse::<BinlogPosition>().ok())
                    .is_some_and(|at| at >= *need)
            })
    }

    /// The replica is consistent with the server and, with a publisher,
    /// memcached holds it. `/readyz` (first of its conditions), systemd's
    /// `READY=1` and `tailcache_ready` all derive from this.
    pub fn replica_ready(&self, publishing: bool) -> bool {
        if publishing { self.consistent_published() } else { self.consistent }
    }

    /// Why the process is not ready, one reason per entry; empty = ready.
    /// `publishing`: there is a publisher (`[memcached]` is configured), so
    /// ready also needs a publish of the consistent replica, as for
    /// systemd's READY=1.
    pub fn not_ready(&self, publishing: bool) -> Vec<String> {
        let mut r = Vec::new();
        if !self.consistent {
            r.push(match &self.snapshot {
                Some(s) => format!("snapshot in progress: {} ({} rows copied)", s.table, s.rows_copied),
                None => "replica not consistent with the server yet".to_owned(),
            });
        }
        if let Some(e) = &self.source_error {
            r.push(format!("source: {e}"));
        }
        if let Some(e) = &self.publish_error {
            r.push(format!("publish: {e}"));
        } else if publishing && self.consistent && !self.consistent_published() {
            r.push("first publish of a consistent replica not done yet".to_owned());
        }
        for (name, v) in &self.views {
            if let Some(e) = &v.last_error {
                r.push(format!("view {name}: {e}"));
            }
        }
        for (server, up) in &self.memcached {
            if !up {
                r.push(format!("memcached {server}: down"));
            }
        }
        r
    }
}

#[derive(Debug)]
pub struct Status {
    inner: Mutex<StatusView>,
    resync_done: watch::Sender<u64>,
    /// Bumped by the replicator for every binlog event it reads (server
    /// heartbeats included): the systemd watchdog's proof that a connected
    /// replicator is not stuck. Lock-free, outside [`StatusView`].
    beats: AtomicU64,
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}

impl Status {
    pub fn new() -> Self {
        Self { inner: Mutex::new(StatusView::default()), resync_done: watch::channel(0).0, beats: AtomicU64::new(0) }
    }

    /// The replicator read an event (or a heartbeat): it is alive.
    pub fn beat(&self) {
        self.beats.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times [`Status::beat`] was called.
    pub fn beats(&self) -> u64 {
        self.beats.load(Ordering::Relaxed)
    }

    /// A copy of everything, for readers.
    pub fn snapshot(&self) -> StatusView {
        self.inner.lock().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Changes the status under its lock; the closure must be quick.
    pub fn update(&self, f: impl FnOnce(&mut StatusView)) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    /// Records a finished resync and wakes whoever waits for it.
    pub fn resync_finished(&self, mut report: ResyncReport) {
        let seq = *self.resync_done.borrow() + 1;
        report.seq = seq;
        self.update(|s| s.last_resync = Some(report));
        self.resync_done.send_replace(seq);
    }

    /// The number of resyncs finished so far, and a receiver that changes
    /// when the next one finishes.
    pub fn resync_done(&self) -> watch::Receiver<u64> {
        self.resync_done.subscribe()
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_with_a_publisher_only_after_the_first_publish() {
        // Consistent replica, views not compiled yet (the status lists no
        // view), nothing published: readiness used to say ready here.
        let v = StatusView { consistent: true, ..Default::default() };
        assert_eq!(v.not_ready(true), vec!["first publish of a consistent replica not done yet".to_owned()]);
        assert!(v.not_ready(false).is_empty(), "without [memcached], a consistent replica is ready");
        let published = StatusView { published_consistent: true, ..v };
        assert!(published.not_ready(true).is_empty());
        assert!(published.replica_ready(true));
    }

    #[test]
    fn ready_only_once_the_changes_up_to_consistency_are_published() {
        let publish_at = |p: &str| PublishInfo { position: p.into(), ..Default::default() };
        // Caught up after applying a change at binlog.000002:900: a publish
        // of an older replica (the one resumed at start) is not enough.
        let v = StatusView {
            consistent: true,
            published_consistent: true,
            publish_needed: Some(BinlogPosition::new("binlog.000002", 900)),
            last_publish: Some(publish_at("binlog.000002:400")),
            ..Default::default()
        };
        assert!(!v.replica_ready(true));
        assert_eq!(v.not_ready(true), vec!["first publish of a consistent replica not done yet".to_owned()]);
        assert!(v.replica_ready(false), "without a publisher, consistent is ready");
        let v = StatusView { last_publish: Some(publish_at("binlog.000002:900")), ..v };
        assert!(v.replica_ready(true));
        let v = StatusView { last_publish: Some(publish_at("binlog.000002:900 (gtid 0-1-14)")), ..v };
        assert!(v.replica_ready(true), "a position shown with its GTID");
        assert!(v.not_ready(true).is_empty());
        let v = StatusView { last_publish: Some(publish_at("binlog.000010:4")), ..v };
        assert!(v.replica_ready(true), "a later file counts as later");
        // Not consistent (reconnecting, catching up): never ready.
        let v = StatusView { consistent: false, ..v };
        assert!(!v.replica_ready(true) && !v.replica_ready(false));
        assert_eq!(v.not_ready(true), vec!["replica not consistent with the server yet".to_owned()]);
    }
}
