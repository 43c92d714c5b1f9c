//! The publisher worker: recomputes the views a committed transaction
//! touched and writes the difference to memcached.
//!
//! It runs on its own OS thread with a current-thread tokio runtime and two
//! SQLite connections of its own (one reads the replica, one keeps the
//! bookkeeping of what was published), fed by a channel of [`Committed`]
//! messages from the applier (bounded by the row images they carry). It
//! never blocks the applier: while memcached
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
//! * **Pieces.** A view that is not maintained incrementally this round
//!   (its query does not allow it, a start, a resync, a batch over
//!   [`CHANGE_CAP`] rows) is read [`PIECE`] entries at a time from that same
//!   read transaction; each piece is diffed against the bookkeeping, written
//!   and recorded (on the bookkeeping's own connection, which WAL lets
//!   commit during the read) before the next is read, and the published
//!   keys the view no longer produces are found at the end (see
//!   [`super::published`]). Memory follows the piece, not the view.
//! * **Keys in doubt.** Every write is preceded by a durable mark of its
//!   keys ([`super::doubt`]): for every key, either `_tailcache_published`
//!   equals what memcached holds, or the key is in doubt. Keys left in doubt
//!   by a failed round, a crash or a timeout are recorded as such before the
//!   next round, which computes every view in full and so sets or deletes
//!   each of them again, whatever was recorded.
//! * **Orphans.** A full resync ends with a sweep of what memcached holds
//!   under the prefix ([`super::orphans`]): keys a view's template matches
//!   that nothing records are deleted.
//! * **Failures.** A failed memcached exchange ([`ErrorClass::Retriable`](crate::sink::ErrorClass::Retriable):
//!   connection, timeout, garbled answer) is retried with capped, jittered
//!   exponential backoff (50 ms → 5 s); the retry is a *full resync* (see
//!   below), since a server that failed may have restarted or applied only
//!   part of a batch. An entry a server refuses for good
//!   ([`ErrorClass::Permanent`](crate::sink::ErrorClass::Permanent), e.g. `SERVER_ERROR object too large for
//!   cache`) is rejected alone: logged (at most [`REJECT_LOG_BURST`] lines a
//!   minute), counted in `tailcache_entries_rejected_total`, not recorded as
//!   published and deleted from memcached rather than left stale; every
//!   other entry and view is published and recorded. With several servers,
//!   one that fails does not hold back the others: their ops are applied
//!   and recorded, the failed server's keys are not recorded (they stay
//!   placed on it, never moved) and the round is retried as above.
//! * **Full resync** (a [`Committed`] with `full`, a lost memcached, a
//!   retry, the exptime refresh): every view is recomputed, then what
//!   memcached holds for every key the views produce, and for every key
//!   published before that they no longer produce, is read back with
//!   pipelined `mg` batches on every server the key is placed on. Only
//!   what is missing or differs (bytes or flags) is written, stale keys
//!   still present are deleted, and the counts (checked, missing, differed,
//!   deleted, unchanged, per view) are logged on one line and stored as a
//!   [`ResyncReport`] in the shared [`Status`]. It runs in the same loop as
//!   every publish, from one consistent replica state, so it never
//!   overwrites a newer value with an older one.
//! * **Restart/flush detection.** [`Sink::lost_state`] is checked at most
//!   once a second (also when idle), and a lost state triggers a full
//!   republish. A full republish first writes a new sentinel token, and the
//!   token is stored in the state file only once the republish is
//!   acknowledged, so a restart of memcached (or of tailcache) at any point
//!   still ends in a full republish.
//! * **Expiring entries.** With `memcached.exptime > 0`, unchanged entries
//!   would expire and never be rewritten; a full resync is done every
//!   `exptime / 2` seconds (at least 1 s), whose read-back resets the TTL
//!   of identical entries (`mg … T<exptime>`) and rewrites the others.
//! * **Status.** After each round the publisher updates the shared
//!   [`Status`]: per view its published key count and last error, each
//!   memcached server up or down, the last publish (time, position,
//!   latency), the publish error while rounds fail, and
//!   `published_consistent` once a consistent replica was published.
//! * **Consistency inspector** (see [`super::inspect`]): between rounds,
//!   never during one, published keys are read back at a low rate and
//!   compared with what was recorded; a key still wrong once publishing
//!   caught up is recorded in doubt and its view computed in full by the
//!   next round.
//! * **Start-up.** The views are compiled (lazily, at the first publish, so
//!   the replica's tables exist); when the replica is already consistent,
//!   every view is recomputed and whatever differs from
//!   `_tailcache_published` is written (keys of views no longer configured
//!   are deleted). Compile problems end the worker with an error.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::watch;

use super::doubt::InDoubt;
use super::inspect::Inspector;
use super::published::{Change, Plan, Published, Resync, Sweep, ViewCounts, read_epoch};
use super::{ChangeSet, ComputedView, Scratch, ViewError, ViewSet};
use crate::config::{Config, MemcachedConfig, Shape};
use crate::error::{Error, Result};
use crate::metrics;
use crate::position::Checkpoint;
use crate::replica::action::{CHANGE_CAP, NoticeReceiver};
use crate::sink::{Op, Rejection, Sink, SinkError};
use crate::status::{PublishInfo, ResyncCounts, ResyncReport, Status, ViewStatus, unix_now};

/// How often memcached is checked for a restart or flush.
pub const LOST_STATE_CHECK: Duration = Duration::from_secs(1);
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At most this many refused-entry log lines per [`REJECT_LOG_WINDOW`]; the
/// rest are counted and summed up in the next line.
pub const REJECT_LOG_BURST: u32 = 10;
pub const REJECT_LOG_WINDOW: Duration = Duration::from_secs(60);

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
    rx: NoticeReceiver,
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
fn report_broken(vs: &ViewSet, status: &crate::status::Status) {
    status.update(|s| {
        for v in vs.views() {
            s.views.entry(v.name().to_owned()).or_default().last_error = None;
        }
        for (view, why, _) in vs.broken() {
            s.views.entry(view.clone()).or_default().last_error = Some(format!("does not compile: {why}"));
        }
    });
    for (view, why, on_error) in vs.broken() {
        crate::metrics::VIEW_ERRORS.inc();
        tracing::error!(view = %view, on_error = ?on_error, problem = %why, "view does not compile; skipped until the next schema change");
    }
    for v in vs.views() {
        tracing::info!(view = %v.name(), incremental = v.incremental().is_ok(), maintenance = %v.maintenance(), "view compiled");
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
    /// When the publisher received the first of the merged messages (the
    /// replica commit happened just before), for the stage timings.
    received: Option<Instant>,
    /// A snapshot replaced the replica or a table changed shape (DDL): the
    /// views are compiled again first.
    resync: bool,
    /// Something new arrived since the last attempt that found the replica
    /// inconsistent (or a full republish is due).
    ready: bool,
    /// Why a full resync is due, for its report (merged requests all
    /// listed, once each).
    triggers: Vec<String>,
    /// Row images of the touched tables whose changes are known exactly.
    changes: ChangeSet,
    /// Touched tables whose changed rows are not known (views reading them
    /// are recomputed in full).
    unknown: HashSet<String>,
}

impl Pending {
    fn add(&mut self, c: Committed) {
        if c.full {
            self.trigger(c.trigger.as_deref().unwrap_or("snapshot"));
        }
        for t in &c.touched {
            if c.changes.get(t).is_none() {
                self.unknown.insert(t.clone());
            }
        }
        self.unknown.extend(self.changes.merge(c.changes));
        if self.changes.len() > CHANGE_CAP {
            self.unknown.extend(self.changes.tables.drain(..).map(|t| t.table));
        }
        for t in &self.unknown {
            self.changes.forget(t);
        }
        self.touched.extend(c.touched);
        self.full |= c.full;
        self.resync |= c.full || c.schema_changed;
        self.checkpoint = Some(c.checkpoint);
        self.arrived = Some(self.arrived.map_or(c.arrived, |a| a.min(c.arrived)));
        self.received.get_or_insert_with(Instant::now);
        self.ready = true;
    }

    fn trigger(&mut self, why: &str) {
        if !self.triggers.iter().any(|t| t == why) {
            self.triggers.push(why.to_owned());
        }
    }

    fn force_full(&mut self, why: &str) {
        self.trigger(why);
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

/// Entries per piece of a view computed in full: the memory a full
/// publish takes (entries, read-back, ops, bookkeeping) follows this, not
/// the size of the view.
pub const PIECE: usize = 4096;

/// Logs at most [`REJECT_LOG_BURST`] lines per [`REJECT_LOG_WINDOW`].
struct RateLimit {
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl RateLimit {
    fn new() -> Self {
        RateLimit { window: None, logged: 0, suppressed: 0 }
    }

    /// `Some(suppressed since the last line)` when a line may be logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.window.is_none_or(|w| now.duration_since(w) >= REJECT_LOG_WINDOW) {
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged < REJECT_LOG_BURST {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Logs refused entries (rate-limited) and counts them.
    fn log_rejections(&mut self, rejected: &[Rejection], views: &[(String, Vec<u8>)]) {
        let now = Instant::now();
        for r in rejected {
            let view = views.iter().find(|(_, k)| *k == r.key).map(|(v, _)| v.as_str()).unwrap_or("");
            metrics::entry_refused(view);
            if let Some(suppressed) = self.allow(now) {
                tracing::error!(
                    view,
                    server = %r.server,
                    key = %String::from_utf8_lossy(&r.key),
                    reason = %r.reason,
                    suppressed,
                    "memcached refused the entry; it is not published (the rest is)"
                );
            }
        }
    }
}

/// One round's writing: its memcached exchanges and bookkeeping, piece by
/// piece, and what they add up to.
struct Round<'w> {
    sink: &'w Sink,
    /// Records what was published.
    book: &'w Connection,
    /// Looks it up during the round, and marks the keys of a sweep: `book`
    /// under WAL; under a rollback journal the replica's reader, which
    /// already holds the read lock (a new one cannot be had while the
    /// replicator waits to commit, and the round would wait on itself).
    lookup: &'w Connection,
    published: &'w mut Published,
    /// Marks the keys of each write in doubt before it is sent.
    doubt: &'w mut InDoubt,
    reject_log: &'w mut RateLimit,
    /// Entries a view could not render (bad key, too large, ...): each is
    /// counted, the log lines are rate-limited like refusals.
    invalid_log: &'w mut RateLimit,
    needs_full: &'w mut HashSet<String>,
    /// Bookkeeping held until the read transaction ends: under a rollback
    /// journal (attached schemas) a write cannot commit while the replica
    /// is read, as it can under WAL.
    deferred: Option<Vec<Change>>,
    /// Servers that failed this round (the others are still written):
    /// their keys are not recorded, and the round is retried.
    down: Vec<SinkError>,
    /// Their addresses: not contacted again this round (a server that
    /// times out would cost a timeout per piece).
    skip: Vec<String>,
    counts: Vec<ViewCounts>,
    resync: BTreeMap<String, ResyncCounts>,
    changes: usize,
    /// When memcached last acknowledged a write.
    acked: Option<Instant>,
    memcached: Duration,
    record: Duration,
}

impl Round<'_> {
    fn failed(&mut self, errors: Vec<SinkError>) {
        for e in errors {
            if !self.skip.iter().any(|s| s == e.server()) {
                self.skip.push(e.server().to_owned());
            }
            self.down.push(e);
        }
    }

    /// Marks `plan`'s keys in doubt, applies its ops and records what
    /// memcached acknowledged. A key whose op failed or timed out stays in
    /// doubt (the round fails and the next one absorbs it).
    async fn write(&mut self, mut plan: Plan) -> Result<()> {
        let t0 = Instant::now();
        let sends = !plan.ops.is_empty();
        let doubt = self.doubt.mark(&plan.changes)?;
        let partial = self.sink.apply_partial(&plan.ops, &self.skip).await;
        let mut clean = partial.failed.is_empty() && partial.unapplied.is_empty();
        self.failed(partial.failed);
        let (applied, mut unapplied) = (partial.applied, partial.unapplied);
        let refused = plan.reject(&applied.rejected);
        self.needs_full.extend(refused.iter().map(|(v, _)| v.clone()));
        if !applied.rejected.is_empty() {
            self.reject_log.log_rejections(&applied.rejected, &refused);
            // Do not leave the previous value of a refused set behind.
            let deletes: Vec<Op> = refused.iter().map(|(_, k)| Op::Delete { key: k.clone() }).collect();
            let more = self.sink.apply_partial(&deletes, &self.skip).await;
            clean &= more.failed.is_empty() && more.unapplied.is_empty();
            self.failed(more.failed);
            unapplied.extend(more.unapplied);
            self.reject_log.log_rejections(&more.applied.rejected, &refused);
        }
        let now = Instant::now();
        self.acked = Some(now);
        self.memcached += now - t0;
        if sends {
            crate::failpoint!("publish.after_ack");
        }
        if clean {
            self.doubt.succeeded(doubt);
        } else {
            self.doubt.failed(doubt);
        }
        let Plan { mut changes, counts, .. } = plan;
        if !unapplied.is_empty() {
            changes.retain(|c| !unapplied.contains(c.key()));
        }
        for c in counts {
            match self.counts.iter_mut().find(|o| o.view == c.view) {
                Some(o) => o.add(&c),
                None => self.counts.push(c),
            }
        }
        self.changes += changes.len();
        match &mut self.deferred {
            Some(d) => d.extend(changes),
            None => {
                self.published.record(self.book, &changes, None)?;
                self.doubt.recorded();
                self.record += now.elapsed();
            }
        }
        Ok(())
    }

    /// Reads back what memcached holds for a piece of a full resync, then
    /// writes what differs.
    async fn resync(&mut self, r: Resync) -> Result<()> {
        let t0 = Instant::now();
        let keys = r.keys();
        let lens = r.expected_len();
        let touch = (r.exptime() > 0).then_some(r.exptime());
        let (held, failed) =
            self.sink.read_back_partial(&keys, &lens, touch, |i, v, f| r.same(i, v, f), &self.skip).await;
        self.failed(failed);
        drop(keys);
        self.memcached += t0.elapsed();
        let view = r.view().to_string();
        let (plan, counts) = r.plan(&held);
        self.resync.entry(view).or_default().add(&counts);
        self.write(plan).await
    }

    /// Writes one piece of a sweep: what differs from the bookkeeping, or,
    /// in a full resync, from what memcached holds.
    async fn piece(&mut self, sweep: &mut Sweep, piece: ComputedView, resync: bool, viewset: &ViewSet) -> Result<()> {
        note_computed(&piece, self.invalid_log);
        let marks = Published::mark(self.lookup, sweep, &piece.entries)?;
        if resync {
            self.resync(Resync::new(sweep.view().clone(), viewset, piece.entries, &marks, Vec::new())).await
        } else {
            self.write(Plan::sets(sweep.view(), piece.entries, &marks, viewset.exptime(), viewset.codec())).await
        }
    }

    /// Deletes `keys` that left `view` (after reading them back, in a
    /// full resync, to count those still present).
    async fn gone(&mut self, viewset: &ViewSet, view: &Arc<str>, keys: Vec<Vec<u8>>, resync: bool) -> Result<()> {
        if resync {
            self.resync(Resync::new(view.clone(), viewset, Vec::new(), &[], keys)).await
        } else if cfg!(feature = "failpoints") && keys.len() > 1 {
            // Two writes, so that a crash can happen between them.
            let mut keys = keys;
            let rest = keys.split_off(keys.len() / 2);
            self.write(Plan::deletes(view, keys)).await?;
            crate::failpoint!("publish.mid_deletes");
            self.write(Plan::deletes(view, rest)).await
        } else {
            self.write(Plan::deletes(view, keys)).await
        }
    }
}

/// Logs a computed view's rejected entries.
fn note_computed(c: &ComputedView, log: &mut RateLimit) {
    let now = Instant::now();
    for r in &c.rejected {
        metrics::entry_rejected(r.view(), r.reason());
        // At most REJECT_LOG_BURST lines a minute: a view with many bad
        // rows would otherwise log each of them at every full computation.
        if let Some(suppressed) = log.allow(now) {
            tracing::error!(view = %c.view, suppressed, "{r}");
        }
    }
}

/// A view that could not be computed: logged, counted, and computed in
/// full next time. Returns its status entry.
fn view_failed(round: &mut Round<'_>, name: &str, e: &ViewError) -> (String, Option<String>) {
    metrics::VIEW_ERRORS.inc();
    round.needs_full.insert(name.to_owned());
    tracing::error!(view = %name, error = %e, "view not published");
    (name.to_owned(), Some(e.to_string()))
}

/// Why a view computed in full was not published.
enum WholeFailure {
    /// The view's query failed: the other views go on.
    View(ViewError),
    /// The state file failed: the round stops.
    State(Error),
}

impl From<ViewError> for WholeFailure {
    fn from(e: ViewError) -> Self {
        WholeFailure::View(e)
    }
}

impl From<Error> for WholeFailure {
    fn from(e: Error) -> Self {
        WholeFailure::State(e)
    }
}

/// Publishes view `index` computed in full on `conn` (inside the round's
/// read transaction), a `row` view [`PIECE`] entries at a time, then
/// deletes the published keys it no longer produces. A query failing
/// midway leaves the pieces already written (they are from the same
/// committed state) and deletes nothing. Returns the time spent computing
/// (the pieces' memcached and bookkeeping time left out).
async fn publish_whole(
    round: &mut Round<'_>,
    conn: &Connection,
    viewset: &ViewSet,
    index: usize,
    resync: bool,
    now: SystemTime,
    scratch: &mut Scratch,
) -> std::result::Result<Duration, WholeFailure> {
    let v = &viewset.views()[index];
    let mut sweep = round.published.begin(round.lookup, v.name())?;
    let mut duplicates = 0;
    let t0 = Instant::now();
    let mut computing;
    if v.shape() == Shape::Row {
        let mut stmt = viewset.full_query(conn, index)?;
        let mut rows = stmt.query([]).map_err(|source| ViewError::Sqlite { view: v.name().to_owned(), source })?;
        // Preparing and starting the query count as computing too.
        computing = t0.elapsed();
        loop {
            let t = Instant::now();
            let (piece, done) = viewset.row_piece(index, &mut rows, now, scratch, PIECE)?;
            computing += t.elapsed();
            duplicates += piece.duplicate_keys;
            round.piece(&mut sweep, piece, resync, viewset).await?;
            if done {
                break;
            }
            crate::failpoint!("publish.between_pieces");
        }
    } else {
        let piece = viewset.compute(conn, index, now, scratch)?;
        computing = t0.elapsed();
        round.piece(&mut sweep, piece, resync, viewset).await?;
    }
    let mut after = Vec::new();
    loop {
        let gone = Published::unseen(round.lookup, &sweep, &after, PIECE)?;
        let Some(last) = gone.last() else { break };
        after = last.clone();
        round.gone(viewset, sweep.view(), gone, resync).await?;
    }
    duplicates += sweep.repeated;
    if duplicates > 0 {
        tracing::warn!(view = %v.name(), duplicates, "rows rendered the same key; the later row won");
    }
    Published::end(round.lookup, sweep)?;
    Ok(computing)
}

/// Deletes every key of `view`, a view no longer configured.
async fn delete_all(round: &mut Round<'_>, viewset: &ViewSet, view: &str, resync: bool) -> Result<()> {
    let name: Arc<str> = Arc::from(view);
    let mut after = Vec::new();
    loop {
        let keys = Published::keys_after(round.lookup, view, &after, PIECE)?;
        let Some(last) = keys.last() else { return Ok(()) };
        after = last.clone();
        round.gone(viewset, &name, keys, resync).await?;
    }
}

struct Worker {
    status: Arc<Status>,
    reject_log: RateLimit,
    invalid_log: RateLimit,
    cfg: Arc<Config>,
    mc: MemcachedConfig,
    /// Reads the replica (one read transaction per round).
    conn: Connection,
    /// The bookkeeping's own connection, which writes while `conn` reads.
    book: Connection,
    /// The state file is in WAL mode: `book` can commit during the read.
    wal: bool,
    viewset: Option<ViewSet>,
    published: Published,
    doubt: InDoubt,
    sink: Sink,
    /// Servers reported as refusing to list their keys (once each).
    unlistable: HashSet<String>,
    scratch: Scratch,
    last_full: Option<Instant>,
    /// Views whose next computation must be complete: a failed compute or
    /// a refused entry left their published state behind the replica.
    needs_full: HashSet<String>,
    inspector: Inspector,
}

/// Waits until `deadline`, merging messages; false when shutting down.
/// With `wake_on_message`, returns as soon as a message arrives: an idle
/// publisher must act on a lone commit at once, not at its next tick.
async fn pause(
    deadline: tokio::time::Instant,
    rx: &mut NoticeReceiver,
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
    mut rx: NoticeReceiver,
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
    let Some(mut book) = open_with_retry(&state_path, &cfg, &mut shutdown).await? else {
        return Ok(());
    };
    let wal = book.query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0)).is_ok_and(|m| m == "wal");
    // A sweep marks every key of a view computed in full: in a temporary
    // file (in SQLite's page cache up to its size), not in memory. It is
    // `book` under WAL, the reader under a rollback journal (see `Round`),
    // set before any TEMP table exists (changing it drops them).
    let sweeper = if wal { &book } else { &conn };
    sweeper.pragma_update(None, "temp_store", "FILE").map_err(|e| Error::sqlite("set temp_store", e))?;
    // The bookkeeping's commits are the publisher's: its checkpoints too.
    super::checkpoint::start(&mut book, &state_path, &cfg.mysql.table_refs());
    let published = Published::load(&book)?;
    let doubt = InDoubt::open(&state_path)?;
    let sink = Sink::connect(&mc);
    sink.set_expected_epoch(read_epoch(&book)?);
    let mut pending = Pending { all: true, ..Default::default() };
    if matches!(crate::replica::read_checkpoint(&conn)?, Some((_, true))) {
        pending.ready = true;
    }
    let inspector = Inspector::new(cfg.inspect.keys_per_second, mc.codec, &status);
    let mut w = Worker {
        inspector,
        status,
        reject_log: RateLimit::new(),
        invalid_log: RateLimit::new(),
        cfg,
        mc,
        conn,
        book,
        wal,
        viewset: None,
        published,
        doubt,
        sink,
        unlistable: HashSet::new(),
        scratch: Scratch::default(),
        last_full: None,
        needs_full: HashSet::new(),
    };
    let coalesce = Duration::from_millis(w.mc.coalesce_ms);
    // The crash tests delay the first round here (`publish.start=sleep(…)`)
    // so that it sees what the replicator caught up with meanwhile.
    crate::failpoint!("publish.start");
    let mut closed = false;
    let mut last_publish: Option<Instant> = None;
    // None: check before the first publish (memcached may have restarted
    // while tailcache was down).
    let mut last_check: Option<Instant> = None;
    let mut backoff = Backoff::new();

    loop {
        if *shutdown.borrow() {
            return w.doubt.flush();
        }
        if !pending.ready {
            // Idle: rounds whose outcome is recorded need no row any more.
            w.doubt.flush()?;
            if closed {
                return Ok(());
            }
            let mut tick = tokio::time::Instant::now() + LOST_STATE_CHECK;
            if let Some(due) = w.inspector.due_at().filter(|_| w.viewset.is_some()) {
                tick = tick.min(tokio::time::Instant::from_std(due));
            }
            if !pause(tick, &mut rx, &mut closed, &mut pending, &mut shutdown, true).await {
                return Ok(());
            }
            if !pending.ready && w.viewset.is_some() && last_check.is_none_or(|t| t.elapsed() >= LOST_STATE_CHECK) {
                last_check = Some(Instant::now());
                w.check_state(&mut pending).await;
            }
            if !pending.ready && w.inspector.due() {
                w.inspect(&mut pending).await?;
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
        // Before the first publish only: memcached may have restarted while
        // tailcache was down. Later checks run after a publish, so their
        // round trip is not on a commit's way to memcached.
        if !pending.full && last_check.is_none() {
            last_check = Some(Instant::now());
            w.check_state(&mut pending).await;
        }
        if let Err(e) = w.settle_doubt(&mut pending) {
            w.status.update(|s| s.publish_error = Some(e.to_string()));
            return Err(e);
        }
        let result = w.publish(&pending).await;
        w.sync_health();
        match result {
            Ok(Outcome::Done) => {
                pending.clear();
                backoff.reset();
                last_publish = Some(Instant::now());
                w.status.update(|s| {
                    s.publish_error = None;
                    s.published_consistent = true;
                });
                if last_check.is_none_or(|t| t.elapsed() >= LOST_STATE_CHECK) {
                    // A lost state makes the next round a full resync.
                    last_check = Some(Instant::now());
                    w.check_state(&mut pending).await;
                }
                if !pending.ready && w.inspector.overdue() {
                    // Never idle for a tick: inspected after a round.
                    w.inspect(&mut pending).await?;
                }
            }
            Ok(Outcome::NotConsistent) => {
                tracing::debug!("replica not consistent yet; waiting for the applier");
                pending.ready = false;
                w.status.update(|s| s.published_consistent = false);
            }
            Err(Failure::Sink(e)) => {
                metrics::publish_failed();
                let delay = backoff.step();
                let class = e.class();
                tracing::warn!(error = %e, ?class, retry_in_ms = delay.as_millis() as u64, "memcached exchange failed; will resync everything");
                w.status.update(|s| s.publish_error = Some(e.to_string()));
                pending.force_full("retry");
                if closed && delay >= BACKOFF_MAX {
                    // The applier is gone and memcached stays down: give up.
                    return Ok(());
                }
                let deadline = tokio::time::Instant::now() + delay;
                if !pause(deadline, &mut rx, &mut closed, &mut pending, &mut shutdown, false).await {
                    return Ok(());
                }
            }
            Err(Failure::Fatal(e)) => {
                w.status.update(|s| s.publish_error = Some(e.to_string()));
                return Err(e);
            }
        }
    }
}

/// Interim (wt-admin), until the resync/publisher rewrite reports for
/// itself: marks a publish done in the shared status, and a publish that
/// followed a snapshot as a finished resync (without drift figures).
impl Worker {
    /// Before a round: keys left in doubt by a failed round, an aborted
    /// one or a previous process are recorded as such in the bookkeeping
    /// (see [`super::doubt`]), and the round computes every view in full so
    /// that each of them is rewritten or deleted.
    fn settle_doubt(&mut self, pending: &mut Pending) -> Result<()> {
        self.doubt.abandon();
        if !self.doubt.unsettled() {
            return Ok(());
        }
        let absorbed = self.doubt.absorb(&self.book, &mut self.published)?;
        if absorbed.keys > 0 {
            tracing::info!(keys = absorbed.keys, "keys in doubt (a round did not finish); they are written again");
            pending.all = true;
            pending.ready = true;
        }
        if absorbed.malformed > 0 {
            pending.force_full("in_doubt_unreadable");
        }
        Ok(())
    }

    /// Runs one inspection (see [`super::inspect`]) when nothing is in
    /// doubt; keys found inconsistent are recorded in doubt and the next
    /// round computes their views in full (the views reading the same
    /// tables too), which rewrites them.
    async fn inspect(&mut self, pending: &mut Pending) -> Result<()> {
        let Some(viewset) = self.viewset.as_ref() else { return Ok(()) };
        if self.doubt.unsettled() {
            self.inspector.skip();
            return Ok(());
        }
        let views = self.inspector.inspect(&self.sink, &self.book, &mut self.published, &self.status).await?;
        for view in views {
            match viewset.views().iter().find(|v| v.name() == view) {
                Some(v) => {
                    pending.touched.extend(v.reads().iter().cloned());
                    self.needs_full.insert(view);
                }
                None => pending.all = true,
            }
            pending.ready = true;
        }
        self.sync_health();
        Ok(())
    }

    /// Checks memcached for a restart or flush, and whether the exptime
    /// refresh is due; either makes the next publish a full resync.
    async fn check_state(&mut self, pending: &mut Pending) {
        if self.refresh_due() {
            pending.force_full("exptime_refresh");
        } else if self.sink.lost_state().await {
            pending.force_full("memcached_lost");
        }
        self.sync_health();
    }

    /// Copies each server's last answer into the shared status.
    fn sync_health(&self) {
        let health = self.sink.health();
        if !health.is_empty() {
            self.status.update(|s| {
                for (server, up) in health {
                    s.memcached.insert(server, up);
                }
            });
        }
    }

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
            report_broken(&vs, &self.status);
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
        // Once compiled, the check inside the read transaction is enough
        // (a separate read here would cost a commit another WAL read lock).
        if (self.viewset.is_none() || pending.resync)
            && !matches!(crate::replica::read_checkpoint(&self.conn)?, Some((_, true)))
        {
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
            report_broken(&vs, &self.status);
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
        let started = Instant::now();
        let full = pending.full;
        let indices: Vec<usize> =
            if full || pending.all { (0..viewset.views().len()).collect() } else { viewset.affected(&pending.touched) };
        let orphans = self.published.orphan_views(viewset);
        if indices.is_empty() && orphans.is_empty() && !full {
            return Ok(Outcome::Done);
        }
        // Probe memcached and move the sentinel before the (costly)
        // recompute: a dead server fails here, cheaply.
        let epoch = if full { Some(self.sink.mark_epoch().await?) } else { None };

        let sql = |what: &str| {
            let what = what.to_owned();
            move |e| Error::sqlite(what, e)
        };
        let Worker { ref conn, ref book, wal, ref mut published, ref mut doubt, ref sink, ref mut scratch, .. } = *self;
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Deferred).map_err(sql("begin read"))?;
        let checkpoint = match crate::replica::read_checkpoint(conn)? {
            Some((cp, true)) => cp,
            _ => return Ok(Outcome::NotConsistent),
        };
        let now = SystemTime::now();
        let mut round = Round {
            sink,
            book,
            lookup: if wal { book } else { conn },
            published,
            doubt,
            reject_log: &mut self.reject_log,
            invalid_log: &mut self.invalid_log,
            needs_full: &mut self.needs_full,
            deferred: (!wal).then(Vec::new),
            down: Vec::new(),
            skip: Vec::new(),
            counts: Vec::new(),
            resync: BTreeMap::new(),
            changes: 0,
            acked: None,
            memcached: Duration::ZERO,
            record: Duration::ZERO,
        };
        let mut computed = Vec::with_capacity(indices.len());
        let mut whole = Vec::new();
        let mut view_errors: Vec<(String, Option<String>)> = Vec::new();
        for i in indices {
            let t0 = Instant::now();
            let name = viewset.views()[i].name();
            let incremental = !full
                && !pending.all
                && !round.needs_full.contains(name)
                && viewset.can_increment(i, &pending.touched, &pending.changes);
            if !incremental {
                whole.push(i);
                continue;
            }
            match viewset.compute_incremental(conn, i, &pending.touched, &pending.changes, now, scratch) {
                Ok(Some(c)) => {
                    if c.scope.is_none() {
                        round.needs_full.remove(&c.view);
                    }
                    metrics::view_computed(&c.view, t0.elapsed());
                    note_computed(&c, round.invalid_log);
                    if c.duplicate_keys > 0 {
                        tracing::warn!(view = %c.view, duplicates = c.duplicate_keys, "rows rendered the same key; the later row won");
                    }
                    view_errors.push((c.view.clone(), None));
                    computed.push(c);
                }
                Ok(None) => whole.push(i),
                Err(e) => view_errors.push(view_failed(&mut round, name, &e)),
            }
        }
        let computed_at = Instant::now();
        let incremental_views = computed.iter().filter(|c| c.incremental).count();
        // For the stage line only (a bench with several views tells them apart).
        let mut view_names: Vec<String> = if tracing::enabled!(tracing::Level::DEBUG) {
            computed.iter().map(|c| c.view.clone()).collect()
        } else {
            Vec::new()
        };
        // Only incremental results (the commit -> memcached path): the read
        // ends before writing, as nothing more is read.
        let mut read = Some(tx);
        if whole.is_empty() && orphans.is_empty() {
            read.take().map(Transaction::commit).transpose().map_err(sql("end read"))?;
        }
        // Keys of views no longer configured go first: a view renamed with
        // its key template kept writes the same keys under its new name.
        for view in orphans {
            delete_all(&mut round, viewset, &view, full).await?;
        }
        if !computed.is_empty() {
            let plan = round.published.diff(round.lookup, computed, viewset)?;
            round.write(plan).await?;
        }
        // Views computed in full go piece by piece, from the same read
        // transaction, so their size does not decide the memory they take.
        for i in whole {
            let name = viewset.views()[i].name();
            // Cleared before writing: an entry memcached refuses while the
            // pieces are written puts the view back (see `Round::write`), so
            // that the next publish tries it again.
            round.needs_full.remove(name);
            match publish_whole(&mut round, conn, viewset, i, full, now, scratch).await {
                Ok(computing) => {
                    metrics::view_computed(name, computing);
                    view_errors.push((name.to_owned(), None));
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        view_names.push(name.to_owned());
                    }
                }
                Err(WholeFailure::View(e)) => view_errors.push(view_failed(&mut round, name, &e)),
                Err(WholeFailure::State(e)) => return Err(e.into()),
            }
        }
        read.map(Transaction::commit).transpose().map_err(sql("end read"))?;
        if let Some(changes) = round.deferred.take() {
            let t0 = Instant::now();
            round.published.record(round.book, &changes, None)?;
            round.doubt.recorded();
            round.record += t0.elapsed();
        }
        if let Some(token) = &epoch {
            round.published.record(round.book, &[], Some(token))?;
        }
        let recorded = Instant::now();
        let Round { down, counts, mut resync, changes, acked, memcached, record, .. } = round;
        let acked = acked.unwrap_or(recorded);
        // A full resync also finds the keys nobody remembers, once its own
        // writes are recorded (see `super::orphans`).
        let mut foreign = 0;
        if full && down.is_empty() {
            let views = self.published.view_names();
            let found =
                super::orphans::sweep(&self.sink, &self.mc, viewset, &self.book, &views, &mut self.unlistable).await?;
            for (view, n) in found.orphans {
                resync.entry(view).or_default().orphans += n;
            }
            foreign = found.foreign;
        }
        let resync = full.then_some(resync);
        // Per-stage timings of this publish, to tell where a slow commit ->
        // memcached sample spent its time (binlog + replica commit + hand-over,
        // waiting in the publisher, computing, memcached, bookkeeping).
        let us = |a: Option<Instant>, b: Instant| a.map_or(0, |a| b.saturating_duration_since(a).as_micros() as u64);
        tracing::debug!(
            to_publisher_us = us(pending.arrived, pending.received.unwrap_or(started)),
            waited_us = us(pending.received, started),
            compute_us = us(Some(started), computed_at),
            memcached_us = memcached.as_micros() as u64,
            record_us = record.as_micros() as u64,
            total_us = us(pending.arrived, recorded),
            incremental_views,
            views = ?view_names,
            changes,
            full,
            "publish stages"
        );
        if let Some(e) = down.into_iter().next() {
            // Keys of a server that is down stay on it: retried (a full
            // resync, with backoff) until it answers.
            return Err(Failure::Sink(e));
        }
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
        let published = &self.published;
        self.status.update(|s| {
            s.last_publish = Some(PublishInfo {
                at_unix: unix_now(),
                position: position.to_string(),
                latency_ms: latency_us.unwrap_or(0) as f64 / 1000.0,
            });
            for (view, error) in view_errors {
                let keys = published.keys(&view);
                s.views.insert(view, ViewStatus { keys, last_error: error });
            }
            // Views that do not compile stay listed with their error.
            for (view, why, _) in viewset.broken() {
                let keys = published.keys(view);
                s.views.insert(view.clone(), ViewStatus { keys, last_error: Some(format!("does not compile: {why}")) });
            }
            // Views no longer configured, once their keys are gone.
            s.views.retain(|name, _| {
                viewset.views().iter().any(|v| v.name() == name) || viewset.broken().iter().any(|(b, _, _)| b == name)
            });
        });
        if let Some(views) = resync {
            let mut total = ResyncCounts::default();
            for c in views.values() {
                total.add(c);
            }
            total.foreign = foreign;
            let trigger = if pending.triggers.is_empty() { "full".to_owned() } else { pending.triggers.join(",") };
            let duration_ms = started.elapsed().as_millis() as u64;
            tracing::info!(
                trigger = %trigger,
                checked = total.checked,
                missing = total.missing,
                differed = total.differed,
                deleted = total.deleted,
                unchanged = total.unchanged,
                orphans = total.orphans,
                foreign = total.foreign,
                duration_ms,
                position = %position,
                "resync finished"
            );
            metrics::resync_finished(&trigger, &total);
            self.status.resync_finished(ResyncReport {
                seq: 0,
                trigger,
                total,
                views,
                duration_ms,
                finished_at_unix: unix_now(),
            });
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
            changes: Default::default(),
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
        assert_eq!(p.triggers, ["snapshot"]);
        p.force_full("memcached_lost");
        p.force_full("memcached_lost");
        assert_eq!(p.triggers, ["snapshot", "memcached_lost"]);
        assert_eq!(p.arrived, Some(t0));
        p.clear();
        assert!(!p.ready && p.touched.is_empty() && p.arrived.is_none() && p.triggers.is_empty());
    }

    #[test]
    fn rejection_log_is_rate_limited() {
        let mut r = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..REJECT_LOG_BURST {
            assert_eq!(r.allow(t0), Some(0));
        }
        assert_eq!(r.allow(t0), None);
        assert_eq!(r.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(r.allow(t0 + REJECT_LOG_WINDOW), Some(2));
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
