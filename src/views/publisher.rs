//! The publisher worker: recomputes the views a committed transaction
//! touched and writes the difference to memcached.
//!
//! It runs on its own OS thread with a current-thread tokio runtime and its
//! own SQLite connection, fed by an unbounded channel of [`Committed`]
//! messages from the applier. It never blocks the applier: while memcached
//! is unreachable it keeps draining the channel, merging the messages into
//! one pending state (a set of touched tables, so memory stays bounded; the
//! replica is the source of truth and is simply recomputed on retry).
//!
//! * **Coalescing.** Everything already queued is merged before computing.
//!   A lone commit is published at once; if the previous publish was less
//!   than `memcached.coalesce_ms` ago, the rest of that window is waited
//!   out (still draining), so a burst costs one recompute per window.
//! * **One snapshot.** All views of one publish are computed in one read
//!   transaction, after checking the replica is consistent
//!   (`replica::read_checkpoint`); if it is not, nothing is published until
//!   the next message.
//! * **Failures.** A failed memcached exchange is retried with capped,
//!   jittered exponential backoff (50 ms → 5 s); the retry is a *full*
//!   republish (every view recomputed, every entry set regardless of the
//!   stored hashes, plus deletes), since a server that failed may have
//!   restarted or applied only part of a batch.
//! * **Restart/flush detection.** [`Sink::lost_state`] is checked at most
//!   once a second (also when idle), and a lost state triggers a full
//!   republish. A full republish first writes a new sentinel token, and the
//!   token is stored in the state file only once the republish is
//!   acknowledged, so a restart of memcached (or of tailcache) at any point
//!   still ends in a full republish.
//! * **Expiring entries.** With `memcached.exptime > 0`, unchanged entries
//!   would expire and never be rewritten; a full republish is done every
//!   `exptime / 2` seconds (at least 1 s) to refresh them.
//! * **Start-up.** The views are compiled (lazily, at the first publish, so
//!   the replica's tables exist); when the replica is already consistent,
//!   every view is recomputed and whatever differs from
//!   `_tailcache_published` is written (keys of views no longer configured
//!   are deleted). Compile problems end the worker with an error.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, watch};

use super::published::{Plan, Published, read_epoch};
use super::{ComputedView, Scratch, ViewError, ViewSet};
use crate::config::{Config, MemcachedConfig};
use crate::error::{Error, Result};
use crate::metrics;
use crate::position::Checkpoint;
use crate::sink::{Sink, SinkError};

/// How often memcached is checked for a restart or flush.
pub const LOST_STATE_CHECK: Duration = Duration::from_secs(1);
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A transaction the applier committed to the replica: the replicator's
/// notice, consumed as is.
pub use crate::source::replicator::CommitNotice as Committed;

/// Computes every view of `viewset` from one replica state. Opens a read
/// transaction when `conn` is not already in one. A view that fails is an
/// error (the CLI wants to know); the publisher instead skips it and logs.
pub fn compute_all(conn: &Connection, viewset: &ViewSet, now: SystemTime) -> Result<Vec<ComputedView>, ViewError> {
    let tx = if conn.is_autocommit() {
        Some(
            Transaction::new_unchecked(conn, TransactionBehavior::Deferred)
                .map_err(|source| ViewError::Sqlite { view: String::new(), source })?,
        )
    } else {
        None
    };
    let mut scratch = Scratch::default();
    let out = (0..viewset.views().len()).map(|i| viewset.compute(conn, i, now, &mut scratch)).collect();
    drop(tx); // read-only: rolling back is committing
    out
}

/// Starts the publisher thread; see the module docs. The thread ends with
/// `Ok(())` on shutdown or when the channel closes (after a last attempt
/// to publish what is pending), and with an error when the views do not
/// compile or the state file cannot be used.
pub fn spawn_publisher(
    cfg: Arc<Config>,
    state_path: PathBuf,
    rx: mpsc::UnboundedReceiver<Committed>,
    shutdown: watch::Receiver<bool>,
    status: Arc<crate::status::Status>,
) -> JoinHandle<Result<()>> {
    let body = move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Fatal(format!("cannot start the publisher's runtime: {e}")))?;
        rt.block_on(run(cfg, state_path, rx, shutdown, status))
    };
    std::thread::Builder::new().name("tailcache-publisher".into()).spawn(body).unwrap_or_else(|e| {
        // Spawning only fails when the OS is out of threads; report it
        // through the handle like any other publisher error.
        let message = format!("cannot start the publisher thread: {e}");
        std::thread::spawn(move || Err(Error::Fatal(message)))
    })
}

/// Logs each view left out because it does not compile.
fn report_broken(vs: &ViewSet) {
    for (view, why, on_error) in vs.broken() {
        crate::metrics::VIEW_ERRORS.inc();
        tracing::error!(view = %view, on_error = ?on_error, problem = %why, "view does not compile; skipped until the next schema change");
    }
}

/// Merged, not yet published work.
#[derive(Debug, Default)]
struct Pending {
    touched: HashSet<String>,
    all: bool,
    full: bool,
    checkpoint: Option<Checkpoint>,
    arrived: Option<Instant>,
    /// A snapshot replaced the replica or a table changed shape (DDL): the
    /// views are compiled again first.
    resync: bool,
    /// Something new arrived since the last attempt that found the replica
    /// inconsistent (or a full republish is due).
    ready: bool,
    /// Why a snapshot replaced the replica (the resync being published).
    trigger: Option<String>,
}

impl Pending {
    fn add(&mut self, c: Committed) {
        self.touched.extend(c.touched);
        self.full |= c.full;
        self.resync |= c.full || c.schema_changed;
        self.checkpoint = Some(c.checkpoint);
        self.trigger = c.trigger.or(self.trigger.take());
        self.arrived = Some(self.arrived.map_or(c.arrived, |a| a.min(c.arrived)));
        self.ready = true;
    }

    fn force_full(&mut self) {
        self.full = true;
        self.all = true;
        self.ready = true;
    }

    fn clear(&mut self) {
        *self = Pending::default();
    }
}

struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
    /// The next delay: exponential, capped, with ±50% jitter.
    fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        base.mul_f64(rand::rng().random_range(0.5..1.5)).min(BACKOFF_MAX)
    }
}

enum Outcome {
    Done,
    NotConsistent,
}

enum Failure {
    Sink(SinkError),
    Fatal(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Fatal(e)
    }
}

impl From<SinkError> for Failure {
    fn from(e: SinkError) -> Self {
        Failure::Sink(e)
    }
}

struct Worker {
    cfg: Arc<Config>,
    mc: MemcachedConfig,
    conn: Connection,
    viewset: Option<ViewSet>,
    published: Published,
    sink: Sink,
    scratch: Scratch,
    last_full: Option<Instant>,
}

/// Waits until `deadline`, merging messages; false when shutting down.
/// With `wake_on_message`, returns as soon as a message arrives: an idle
/// publisher must act on a lone commit at once, not at its next tick.
async fn pause(
    deadline: tokio::time::Instant,
    rx: &mut mpsc::UnboundedReceiver<Committed>,
    closed: &mut bool,
    pending: &mut Pending,
    shutdown: &mut watch::Receiver<bool>,
    wake_on_message: bool,
) -> bool {
    loop {
        tokio::select! {
            biased;
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    return false;
                }
            }
            m = rx.recv(), if !*closed => match m {
                Some(c) => {
                    pending.add(c);
                    if wake_on_message {
                        return true;
                    }
                }
                None => *closed = true,
            },
            _ = tokio::time::sleep_until(deadline) => return true,
        }
    }
}

/// Opens the state file, retrying while another connection (the
/// replicator, opening it at the same moment) holds the lock that changing
/// the journal mode needs; `busy_timeout` does not cover that pragma.
/// `None` when shutting down.
async fn open_with_retry(
    path: &std::path::Path,
    cfg: &Config,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Connection>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut backoff = Backoff::new();
    loop {
        match crate::replica::open_connection(path, &cfg.mysql.table_refs()) {
            Ok(c) => return Ok(Some(c)),
            Err(Error::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. })
                if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                    && Instant::now() < deadline =>
            {
                tracing::debug!("state file busy while opening; retrying");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return Ok(None) },
            _ = tokio::time::sleep(backoff.step().min(Duration::from_millis(200))) => {}
        }
    }
}

async fn run(
    cfg: Arc<Config>,
    state_path: PathBuf,
    mut rx: mpsc::UnboundedReceiver<Committed>,
    mut shutdown: watch::Receiver<bool>,
    status: Arc<crate::status::Status>,
) -> Result<()> {
    let Some(mc) = cfg.memcached.clone() else {
        // Nothing to publish to: keep the channel drained until shutdown.
        loop {
            tokio::select! {
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return Ok(()) },
                m = rx.recv() => if m.is_none() { return Ok(()) },
            }
        }
    };
    let Some(conn) = open_with_retry(&state_path, &cfg, &mut shutdown).await? else {
        return Ok(());
    };
    let published = Published::load(&conn)?;
    let sink = Sink::connect(&mc);
    sink.set_expected_epoch(read_epoch(&conn)?);
    let mut pending = Pending { all: true, ..Default::default() };
    if matches!(crate::replica::read_checkpoint(&conn)?, Some((_, true))) {
        pending.ready = true;
    }
    let mut w = Worker { cfg, mc, conn, viewset: None, published, sink, scratch: Scratch::default(), last_full: None };
    let coalesce = Duration::from_millis(w.mc.coalesce_ms);
    let mut closed = false;
    let mut last_publish: Option<Instant> = None;
    // None: check before the first publish (memcached may have restarted
    // while tailcache was down).
    let mut last_check: Option<Instant> = None;
    let mut backoff = Backoff::new();

    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        if !pending.ready {
            if closed {
                return Ok(());
            }
            let tick = tokio::time::Instant::now() + LOST_STATE_CHECK;
            if !pause(tick, &mut rx, &mut closed, &mut pending, &mut shutdown, true).await {
                return Ok(());
            }
            if !pending.ready && w.viewset.is_some() && last_check.is_none_or(|t| t.elapsed() >= LOST_STATE_CHECK) {
                last_check = Some(Instant::now());
                if w.refresh_due() || w.sink.lost_state().await {
                    pending.force_full();
                }
            }
            continue;
        }
        while let Ok(c) = rx.try_recv() {
            pending.add(c);
        }
        if let Some(last) = last_publish {
            let due = last + coalesce;
            if Instant::now() < due {
                let deadline = tokio::time::Instant::from_std(due);
                if !pause(deadline, &mut rx, &mut closed, &mut pending, &mut shutdown, false).await {
                    return Ok(());
                }
            }
        }
        if !pending.full && last_check.is_none_or(|t| t.elapsed() >= LOST_STATE_CHECK) {
            last_check = Some(Instant::now());
            if w.refresh_due() || w.sink.lost_state().await {
                pending.force_full();
            }
        }
        match w.publish(&pending).await {
            Ok(Outcome::Done) => {
                interim_status_published(&status, &w, &pending);
                pending.clear();
                backoff.reset();
                last_publish = Some(Instant::now());
            }
            Ok(Outcome::NotConsistent) => {
                tracing::debug!("replica not consistent yet; waiting for the applier");
                pending.ready = false;
            }
            Err(Failure::Sink(e)) => {
                metrics::publish_failed();
                status.update(|s| {
                    s.publish_error = Some(e.to_string());
                    s.memcached.insert(e.server().to_owned(), false);
                });
                let delay = backoff.step();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "memcached write failed; will republish everything");
                pending.force_full();
                if closed && delay >= BACKOFF_MAX {
                    // The applier is gone and memcached stays down: give up.
                    return Ok(());
                }
                let deadline = tokio::time::Instant::now() + delay;
                if !pause(deadline, &mut rx, &mut closed, &mut pending, &mut shutdown, false).await {
                    return Ok(());
                }
            }
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
}

/// Interim (wt-admin), until the resync/publisher rewrite reports for
/// itself: marks a publish done in the shared status, and a publish that
/// followed a snapshot as a finished resync (without drift figures).
fn interim_status_published(status: &crate::status::Status, w: &Worker, pending: &Pending) {
    let position = crate::replica::read_checkpoint(&w.conn).ok().flatten().map(|(cp, _)| cp.to_string());
    let latency_ms = pending.arrived.map(|a| a.elapsed().as_secs_f64() * 1000.0).unwrap_or(0.0);
    let at_unix = crate::status::unix_now();
    status.update(|s| {
        s.published_consistent = true;
        s.publish_error = None;
        for server in &w.mc.servers {
            s.memcached.insert(server.clone(), true);
        }
        s.last_publish =
            Some(crate::status::PublishInfo { at_unix, position: position.unwrap_or_default(), latency_ms });
    });
    if let Some(t) = &pending.trigger {
        status.resync_finished(crate::status::ResyncReport {
            seq: 0,
            trigger: metrics::snapshot_reason(t).to_owned(),
            total: Default::default(),
            views: Default::default(),
            duration_ms: pending.arrived.map(|a| a.elapsed().as_millis() as u64).unwrap_or(0),
            finished_at_unix: at_unix,
        });
    }
}

impl Worker {
    /// With an exptime, a full republish refreshes entries before they
    /// expire.
    fn refresh_due(&self) -> bool {
        let exptime = self.mc.exptime;
        exptime > 0
            && self.last_full.is_some_and(|t| t.elapsed() >= Duration::from_secs((u64::from(exptime) / 2).max(1)))
    }

    fn viewset(&mut self) -> Result<&ViewSet> {
        if self.viewset.is_none() {
            let refs = self.cfg.mysql.table_refs();
            let vs = ViewSet::compile_lenient(&self.conn, &self.cfg.views, &self.mc, &refs);
            report_broken(&vs);
            self.viewset = Some(vs);
        }
        match &self.viewset {
            Some(v) => Ok(v),
            None => Err(Error::Fatal("views not compiled".into())),
        }
    }

    async fn publish(&mut self, pending: &Pending) -> std::result::Result<Outcome, Failure> {
        // Before the first snapshot the replica has no tables yet, so the
        // views can neither compile nor run: wait for a consistent replica
        // (checked again inside the read transaction).
        if !matches!(crate::replica::read_checkpoint(&self.conn)?, Some((_, true))) {
            return Ok(Outcome::NotConsistent);
        }
        if pending.resync && self.viewset.is_some() {
            // The snapshot may follow a DDL: re-check the views against the
            // new tables. On problems keep the old set (the broken views
            // fail and are logged at each publish) rather than stop.
            let refs = self.cfg.mysql.table_refs();
            // A cached statement reports the columns it was prepared with
            // until it is stepped again; drop them so the shape check in
            // `compute` compares with the new tables.
            self.conn.flush_prepared_statement_cache();
            let vs = ViewSet::compile_lenient(&self.conn, &self.cfg.views, &self.mc, &refs);
            report_broken(&vs);
            self.viewset = Some(vs);
        }
        self.viewset()?;
        let Some(viewset) = self.viewset.take() else {
            return Err(Failure::Fatal(Error::Fatal("views not compiled".into())));
        };
        let r = self.publish_with(&viewset, pending).await;
        self.viewset = Some(viewset);
        r
    }

    async fn publish_with(&mut self, viewset: &ViewSet, pending: &Pending) -> std::result::Result<Outcome, Failure> {
        let full = pending.full;
        let indices: Vec<usize> =
            if full || pending.all { (0..viewset.views().len()).collect() } else { viewset.affected(&pending.touched) };
        let orphans = !self.published.orphan_views(viewset).is_empty();
        if indices.is_empty() && !orphans && !full {
            return Ok(Outcome::Done);
        }
        // Probe memcached and move the sentinel before the (costly)
        // recompute: a dead server fails here, cheaply.
        let epoch = if full { Some(self.sink.mark_epoch().await?) } else { None };

        let sql = |what: &str| {
            let what = what.to_owned();
            move |e| Error::sqlite(what, e)
        };
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Deferred).map_err(sql("begin read"))?;
        let checkpoint = match crate::replica::read_checkpoint(&self.conn)? {
            Some((cp, true)) => cp,
            _ => return Ok(Outcome::NotConsistent),
        };
        let now = SystemTime::now();
        let mut computed = Vec::with_capacity(indices.len());
        for i in indices {
            let t0 = Instant::now();
            match viewset.compute(&self.conn, i, now, &mut self.scratch) {
                Ok(c) => {
                    metrics::view_computed(&c.view, t0.elapsed());
                    for r in &c.rejected {
                        metrics::entry_rejected(r);
                        tracing::error!(view = %c.view, "{r}");
                    }
                    if c.duplicate_keys > 0 {
                        tracing::warn!(view = %c.view, duplicates = c.duplicate_keys, "rows rendered the same key; the later row won");
                    }
                    computed.push(c);
                }
                Err(e) => {
                    metrics::VIEW_ERRORS.inc();
                    tracing::error!(view = %viewset.views()[i].name(), error = %e, "view not published");
                }
            }
        }
        tx.commit().map_err(sql("end read"))?;

        let Plan { ops, changes, counts } = self.published.diff(computed, viewset, full);
        self.sink.apply(&ops).await?;
        let acked = Instant::now();
        self.published.record(&self.conn, &changes, epoch.as_deref())?;
        if full {
            self.last_full = Some(acked);
            metrics::FULL_REPUBLISHES.inc();
        }
        metrics::PUBLISHES.inc();
        let latency_us = pending.arrived.map(|a| acked.saturating_duration_since(a).as_micros() as u64);
        if let Some(l) = latency_us {
            metrics::publish_latency(Duration::from_micros(l));
        }
        // The replica state actually published (at or after the latest
        // Committed's checkpoint).
        let position = &checkpoint;
        let mut any = false;
        for c in &counts {
            metrics::keys_set(&c.view, c.set as u64);
            metrics::keys_deleted(&c.view, c.deleted as u64);
            if c.set > 0 || c.deleted > 0 {
                any = true;
                tracing::info!(
                    view = %c.view,
                    keys_set = c.set,
                    keys_deleted = c.deleted,
                    drift = c.drift,
                    position = %position,
                    latency_us = latency_us.unwrap_or(0),
                    full,
                    "published"
                );
            }
        }
        if !any {
            tracing::debug!(position = %position, latency_us = latency_us.unwrap_or(0), "views unchanged");
        }
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::BinlogPosition;

    fn c(tables: &[&str], pos: u64, arrived: Instant, full: bool) -> Committed {
        Committed {
            touched: tables.iter().map(|t| t.to_string()).collect(),
            checkpoint: Checkpoint { position: BinlogPosition::new("b.000001", pos), gtid: None },
            arrived,
            full,
            schema_changed: false,
            trigger: None,
        }
    }

    #[test]
    fn pending_merges_tables_latest_checkpoint_earliest_arrival_and_full() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        p.add(c(&["a"], 10, t0 + Duration::from_millis(5), false));
        p.add(c(&["b", "a"], 20, t0, false));
        assert!(p.ready && !p.full && !p.resync);
        assert_eq!(p.touched, ["a".to_owned(), "b".to_owned()].into());
        assert_eq!(p.checkpoint.as_ref().map(|c| c.position.pos), Some(20));
        assert_eq!(p.arrived, Some(t0));
        p.add(c(&[], 30, t0 + Duration::from_secs(1), true));
        assert!(p.full && p.resync);
        assert_eq!(p.arrived, Some(t0));
        p.clear();
        assert!(!p.ready && p.touched.is_empty() && p.arrived.is_none());
    }

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let mut b = Backoff::new();
        let first = b.step();
        assert!(first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN * 3 / 2, "{first:?}");
        for _ in 0..20 {
            assert!(b.step() <= BACKOFF_MAX);
        }
        assert_eq!(b.next, BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next, BACKOFF_MIN);
    }
}
