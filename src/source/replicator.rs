//! The replicator: snapshot, then follow the binlog, applying each MySQL
//! transaction to the SQLite replica in one SQLite transaction together with
//! the position it ends at.
//!
//! It runs on its own thread with a current-thread runtime, so the SQLite
//! connection and its cached statements never cross threads and a slow
//! SQLite write simply back-pressures the binlog socket.

use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use mysql_async::binlog::events::{
    BinlogEventHeader, FormatDescriptionEvent, GtidEvent, QueryEvent, RotateEvent, TableMapEvent,
    TransactionPayloadEvent,
};
use mysql_async::prelude::*;
use mysql_async::{BinlogStreamRequest, Conn};
use mysql_common::binlog::consts::BinlogVersion;
use mysql_common::io::ParseBuf;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, TableRef};
use crate::error::{Error, Recovery, Result};
use crate::position::{BinlogPosition, Checkpoint, Gtid};
use crate::replica::action::{Action, Xid};
use crate::replica::applier::{Applier, Touched};
use crate::replica::tables::{read_meta, write_meta};
use crate::schema::TableSchema;
use crate::source::conn::{Flavor, ServerInfo, binary_logs, connect, server_info};
use crate::source::ddl::{self, DdlKind};
use crate::source::decode::{DecodeError, DecodeFailure, RowDecoder, TableCodec, rows_table_id};
use crate::source::events::{self, Handling, parse_body};
use crate::source::retry::{self, Backoff, RetryLog};
use crate::source::snapshot::snapshot_until;
use crate::status::Status;

pub use crate::replica::action::CommitNotice;

#[derive(Debug, Clone)]
pub enum Control {
    /// Take a fresh snapshot at the next transaction boundary.
    Resync { reason: String },
}

/// Commit a batch of catch-up transactions at least this often, so the
/// publisher is never starved while a backlog is being applied.
const MAX_BATCH_AGE: Duration = Duration::from_millis(50);
const MAX_BATCH_ROWS: u64 = 20_000;
/// A session that streamed at least this long resets the reconnect
/// backoff (see [`crate::source::retry`]).
const MIN_STREAMING: Duration = Duration::from_millis(500);

pub struct ReplicatorHandle {
    pub thread: std::thread::JoinHandle<Result<()>>,
}

/// Starts the replicator thread. It connects and reads its state at once,
/// but takes no snapshot and starts no binlog dump before `gate` turns
/// true (the daemon's preflight checks passed): the two overlap at start.
#[allow(clippy::too_many_arguments)]
pub fn spawn_replicator(
    cfg: Arc<Config>,
    state_path: PathBuf,
    force_resync: bool,
    notify: Box<dyn FnMut(CommitNotice) + Send>,
    control: mpsc::UnboundedReceiver<Control>,
    gate: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    status: Arc<Status>,
) -> std::io::Result<ReplicatorHandle> {
    let thread = std::thread::Builder::new().name("replicator".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Fatal(format!("cannot start the replicator runtime: {e}")))?;
        rt.block_on(async move {
            let tables = cfg.mysql.table_refs();
            let sqlite = crate::replica::open_connection(&state_path, &tables)?;
            let applier = Applier::new(&sqlite, tables.clone())?;
            let mut r = Replicator::new(cfg, tables, applier, notify, control, gate, shutdown, status);
            r.need_snapshot = force_resync.then(|| "forced by --resync".to_owned());
            r.run().await
        })
    })?;
    Ok(ReplicatorHandle { thread })
}

/// Per-transaction and per-batch bookkeeping.
#[derive(Default)]
struct Batch {
    /// Inside a MySQL transaction (between GTID/BEGIN and XID/COMMIT).
    in_txn: bool,
    /// The transaction began with a BEGIN query (not a standalone statement).
    txn_explicit: bool,
    txn_gtid: Option<Gtid>,
    txn_arrived: Option<Instant>,
    /// Tables changed by transactions that are complete in the open batch.
    touched: Vec<bool>,
    /// Tables changed by the MySQL transaction in progress.
    txn_touched: Vec<bool>,
    rows: u64,
    started: Option<Instant>,
    arrived: Option<Instant>,
    /// When the batch's last transaction ended (its XID), for the
    /// `applied` debug line's stage timings.
    ended: Option<Instant>,
    /// The checkpoint of the last complete transaction, not yet committed.
    pending: Option<Checkpoint>,
    /// A table was re-snapshotted with a new schema in this batch.
    schema_changed: bool,
}

impl Batch {
    fn new(n: usize) -> Self {
        Batch { touched: vec![false; n], txn_touched: vec![false; n], ..Default::default() }
    }
}

pub struct Replicator<'c> {
    cfg: Arc<Config>,
    tables: Vec<TableRef>,
    applier: Applier<'c>,
    notify: Box<dyn FnMut(CommitNotice) + Send>,
    control: mpsc::UnboundedReceiver<Control>,
    shutdown: watch::Receiver<bool>,
    /// True once the daemon's preflight checks passed (see
    /// [`spawn_replicator`]).
    gate: watch::Receiver<bool>,
    schemas: Vec<Option<TableSchema>>,
    /// table id → watched table index (None: not watched).
    table_ids: HashMap<u64, Option<usize>>,
    codecs: HashMap<u64, Rc<TableCodec>>,
    /// Per watched table: the last table map's bytes from the database name
    /// on, and the decoder built from them. The server writes a table map
    /// per table per transaction; an identical one (whatever its table id)
    /// reuses the decoder instead of building it again.
    codec_cache: Vec<Option<(Vec<u8>, Rc<TableCodec>)>>,
    /// Rows of a re-snapshotted table before this position are already in
    /// its snapshot (and may be in an older shape): skip them.
    skip_until: Vec<Option<BinlogPosition>>,
    consistent_after: Option<BinlogPosition>,
    checkpoint: Option<Checkpoint>,
    need_snapshot: Option<String>,
    /// An `XA COMMIT` whose rows were never staged was just read (why):
    /// the batch is rolled back and the tables snapshotted again at once.
    unstaged_xa: Option<String>,
    decoder: RowDecoder,
    batch: Batch,
    info: Option<ServerInfo>,
    resync_due: Option<tokio::time::Instant>,
    control_open: bool,
    /// Tables to re-snapshot at the next session start (a table-scoped
    /// error: the rest of the replica is fine).
    resnapshot_tables: Vec<usize>,
    /// The stream's last FORMAT_DESCRIPTION event: post-header lengths for
    /// parsing the events that need it (also those inside payloads).
    fde: Rc<FormatDescriptionEvent<'static>>,
    /// Reused buffer for the events inside compressed transaction payloads.
    inner_buf: Vec<u8>,
    status: Arc<Status>,
    /// The server timestamp of the last event read (0: a heartbeat said we
    /// are at the end of the binlog), for the lag.
    last_event_ts: u32,
    /// When this session's binlog stream opened (None: it did not).
    streamed_since: Option<Instant>,
    /// Logs the failed attempts to reconnect, without flooding.
    retry_log: RetryLog,
    /// This session's stream has reached the server's position read when
    /// it connected (or a heartbeat said it is at the end of the binlog):
    /// the replica is as recent as the server, not only consistent with
    /// it at some older position. Part of `status.consistent`.
    caught_up: bool,
    /// The server's binlog end when this session connected.
    catch_up_to: Option<BinlogPosition>,
    /// A heartbeat arrived this session: the server had nothing more to send.
    heartbeat_seen: bool,
    /// The checkpoint of the last commit notice sent to the publisher.
    last_notified: Option<BinlogPosition>,
}

enum SessionEnd {
    Shutdown,
    Resync,
}

fn stop_requested(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow()
}

impl<'c> Replicator<'c> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: Arc<Config>,
        tables: Vec<TableRef>,
        applier: Applier<'c>,
        notify: Box<dyn FnMut(CommitNotice) + Send>,
        control: mpsc::UnboundedReceiver<Control>,
        gate: watch::Receiver<bool>,
        shutdown: watch::Receiver<bool>,
        status: Arc<Status>,
    ) -> Self {
        let n = tables.len();
        Self {
            cfg,
            tables,
            applier,
            notify,
            control,
            shutdown,
            gate,
            schemas: vec![None; n],
            table_ids: HashMap::new(),
            codecs: HashMap::new(),
            codec_cache: vec![None; n],
            skip_until: vec![None; n],
            consistent_after: None,
            checkpoint: None,
            need_snapshot: None,
            unstaged_xa: None,
            decoder: RowDecoder::new(),
            batch: Batch::new(n),
            info: None,
            resync_due: None,
            control_open: true,
            resnapshot_tables: Vec::new(),
            fde: Rc::new(FormatDescriptionEvent::new(BinlogVersion::Version4)),
            inner_buf: Vec::new(),
            status,
            last_event_ts: 0,
            streamed_since: None,
            retry_log: RetryLog::new("binlog link lost; reconnecting"),
            caught_up: false,
            catch_up_to: None,
            heartbeat_seen: false,
            last_notified: None,
        }
    }

    fn tables_key(&self) -> String {
        self.tables.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
    }

    fn schedule_resync(&mut self) {
        let secs = self.cfg.resync.interval_secs;
        self.resync_due = (secs > 0).then(|| tokio::time::Instant::now() + Duration::from_secs(secs));
    }

    pub async fn run(&mut self) -> Result<()> {
        let mut backoff = Backoff::new();
        self.schedule_resync();
        loop {
            if stop_requested(&self.shutdown) {
                return Ok(());
            }
            self.streamed_since = None;
            let outcome = self.session().await;
            if stop_requested(&self.shutdown) {
                self.abort_batch();
                return Ok(());
            }
            // The gate is still closed: the session failed before it could
            // snapshot or stream (nothing to undo).
            if !*self.gate.borrow()
                && let Err(e) = &outcome
            {
                // The preflight, running meanwhile, reports the server's
                // state: once it passes, try again at once (no backoff).
                tracing::debug!(error = %e, "early connection failed; retrying once the preflight passes");
                if !self.wait_for_gate().await {
                    return Ok(());
                }
                continue;
            }
            // A session that reached streaming resets the backoff: the
            // next failure is retried at once. One that streamed only
            // briefly (it fails right after starting, again and again)
            // does not, so a persistent error still backs off.
            if self.streamed_since.is_some_and(|t| t.elapsed() >= MIN_STREAMING) {
                backoff.reset();
            }
            match outcome {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::Resync) => {
                    backoff.reset();
                    continue;
                }
                Err(e) => {
                    self.abort_batch();
                    let msg = e.to_string();
                    // Behind the server from now on, as far as we know,
                    // until the next session catches up.
                    self.caught_up = false;
                    self.status.update(|s| {
                        s.source_connected = false;
                        s.source_error = Some(msg.clone());
                        s.snapshot = None;
                        s.consistent = false;
                    });
                    match e.recovery() {
                        Recovery::Fatal => return Err(e),
                        Recovery::NeedsResync => {
                            tracing::warn!(error = %e, "replica needs a fresh snapshot");
                            self.need_snapshot = Some(e.to_string());
                        }
                        Recovery::ResnapshotTable => {
                            let idx = e.table().and_then(|t| self.tables.iter().position(|x| x.to_string() == t));
                            match idx {
                                Some(i) => {
                                    tracing::warn!(error = %e, table = %self.tables[i], "re-snapshotting one table");
                                    if !self.resnapshot_tables.contains(&i) {
                                        self.resnapshot_tables.push(i);
                                    }
                                }
                                None => {
                                    tracing::warn!(error = %e, "replica needs a fresh snapshot");
                                    self.need_snapshot = Some(e.to_string());
                                }
                            }
                        }
                        Recovery::Transient => {}
                    }
                    let delay = backoff.next(retry::cap_for(&e));
                    if e.recovery() == Recovery::Transient {
                        crate::metrics::reconnect();
                    }
                    self.retry_log.failed(&msg, delay);
                    let mut sd = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = sd.changed() => return Ok(()),
                    }
                }
            }
        }
    }

    /// One connection's worth of work: maybe snapshot, then stream until an
    /// error, a resync request or shutdown.
    async fn session(&mut self) -> Result<SessionEnd> {
        // Every long await of a session (connect, snapshot) gives way to
        // shutdown: SIGTERM ends the process within seconds whatever is in
        // progress; an interrupted snapshot's SQLite transaction is rolled
        // back, leaving the previous replica.
        self.caught_up = false;
        self.catch_up_to = None;
        self.heartbeat_seen = false;
        let mut conn = stoppable(&self.shutdown, connect(&self.cfg.mysql)).await?;
        let info = server_info(&mut conn).await?;
        if self.info.as_ref().is_some_and(|i| i.identity() != info.identity()) {
            self.need_snapshot = Some(format!("the server changed identity to {}", info.identity()));
        }
        self.info = Some(info.clone());
        tracing::debug!("replicator connected");
        self.load_state(&mut conn, &info).await?;
        tracing::debug!("replica state loaded");
        // Where a resumed replica is, from the start (`tailcache status`);
        // consistent only once the stream has caught up with the server.
        if let Some(cp) = self.checkpoint.clone() {
            self.publish_position(&cp);
        }
        // A resumed start checks its stored position and sets up the dump
        // session while the preflight runs (both only read or set session
        // variables); registering and dumping wait for the gate.
        let mut ready: Option<BinlogPosition> = None;
        if !*self.gate.borrow() {
            if self.need_snapshot.is_none()
                && self.resnapshot_tables.is_empty()
                && let Some(cp) = self.checkpoint.clone()
            {
                self.catch_up_to = Some(self.verify_position(&mut conn, &cp.position).await?);
                self.prepare_dump(&mut conn, &info).await?;
                tracing::debug!("position verified");
                ready = Some(cp.position);
            }
            if !self.wait_for_gate().await {
                return Ok(SessionEnd::Shutdown);
            }
            tracing::debug!("preflight passed");
        }
        if let Some(reason) = self.need_snapshot.take() {
            tracing::info!(reason = %reason, "taking a snapshot");
            let _ = conn.disconnect().await;
            let sd = self.shutdown.clone();
            if let Err(e) = stoppable(&sd, self.full_snapshot(&info, &reason)).await {
                // Not taken: ask again next time, whatever the error.
                self.need_snapshot = Some(reason);
                return Err(e);
            }
            conn = stoppable(&self.shutdown, connect(&self.cfg.mysql)).await?;
        } else if !self.resnapshot_tables.is_empty() {
            let Some(cp) = self.checkpoint.clone() else {
                return Err(Error::NeedsResync { reason: "no checkpoint".into(), table: None, position: None });
            };
            let sd = self.shutdown.clone();
            for i in self.resnapshot_tables.clone() {
                stoppable(&sd, self.resnapshot_table(i)).await?;
            }
            self.batch.pending = Some(cp);
            self.flush()?;
            self.resnapshot_tables.clear();
        }
        let Some(cp) = self.checkpoint.clone() else {
            return Err(Error::NeedsResync { reason: "no checkpoint".into(), table: None, position: None });
        };
        // `ready` is this connection's, verified at this same position; a
        // snapshot meanwhile reconnected and moved the checkpoint.
        if ready.as_ref() != Some(&cp.position) {
            self.catch_up_to = Some(self.verify_position(&mut conn, &cp.position).await?);
            self.prepare_dump(&mut conn, &info).await?;
            tracing::debug!("position verified");
        }
        self.stream(conn, cp.position).await
    }

    /// The dump session's variables: the heartbeat period and, on MariaDB,
    /// real GTID events. One statement, one round trip.
    async fn prepare_dump(&self, conn: &mut Conn, info: &ServerInfo) -> Result<()> {
        let heartbeat = Duration::from_secs_f64(self.cfg.mysql.heartbeat_secs);
        // On MariaDB, 4 = MARIA_SLAVE_CAPABILITY_GTID: send real GTID events.
        let capability = if info.flavor == Flavor::MariaDb { "@mariadb_slave_capability = 4, " } else { "" };
        conn.query_drop(format!("SET {capability}@master_heartbeat_period = {}", heartbeat.as_nanos()))
            .await
            .map_err(|e| Error::mysql("set heartbeat period and capabilities", e))
    }

    /// Waits until the preflight passed; false on shutdown (or when the
    /// daemon gave up).
    async fn wait_for_gate(&self) -> bool {
        let (mut gate, mut sd) = (self.gate.clone(), self.shutdown.clone());
        tokio::select! {
            r = gate.wait_for(|open| *open) => r.is_ok() && !stop_requested(&self.shutdown),
            _ = sd.wait_for(|stop| *stop) => false,
        }
    }

    /// Reads the stored checkpoint and decides whether it can be resumed.
    async fn load_state(&mut self, conn: &mut Conn, info: &ServerInfo) -> Result<()> {
        if self.checkpoint.is_some() && self.schemas.iter().all(Option::is_some) {
            return Ok(());
        }
        let stored = crate::replica::read_checkpoint(self.applier.conn())?;
        let meta = read_meta(self.applier.conn())?;
        match stored {
            None => self.need_snapshot = self.need_snapshot.take().or(Some("no replica yet".into())),
            Some((cp, _)) => {
                if meta.identity.as_deref() != Some(info.identity().as_str()) {
                    self.need_snapshot = Some(format!(
                        "the replica follows {} but the server is {}",
                        meta.identity.as_deref().unwrap_or("an unknown server"),
                        info.identity()
                    ));
                } else if meta.tables.as_deref() != Some(self.tables_key().as_str()) {
                    self.need_snapshot = Some("mysql.tables changed".into());
                }
                self.consistent_after = meta.consistent_after;
                self.checkpoint = Some(cp);
            }
        }
        if self.need_snapshot.is_none() {
            for (i, t) in self.tables.clone().iter().enumerate() {
                match crate::source::catalog::load_table_schema(conn, t).await? {
                    Some(s) => {
                        // The table changed shape while we were stopped:
                        // the replica's copy cannot take its rows. Copy it
                        // afresh before streaming (rows up to then are in
                        // the copy); the other tables resume.
                        if let Err(e) = self.applier.set_schema(i, &s) {
                            tracing::info!(table = %t, reason = %e, "the table's shape differs from the replica's copy: re-snapshotting it");
                            self.applier.forget_schema(i);
                            if !self.resnapshot_tables.contains(&i) {
                                self.resnapshot_tables.push(i);
                            }
                        }
                        self.schemas[i] = Some(s);
                        self.forget_codecs(i);
                    }
                    None => {
                        self.need_snapshot = Some(format!("table {t} is missing"));
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn set_schema(&mut self, idx: usize, schema: TableSchema) -> Result<()> {
        self.applier.set_schema(idx, &schema)?;
        self.schemas[idx] = Some(schema);
        // Codecs built against the old shape must not decode another row.
        self.forget_codecs(idx);
        Ok(())
    }

    /// Drops every decoder of table `idx` (its schema changed or is unknown).
    fn forget_codecs(&mut self, idx: usize) {
        self.codecs.retain(|tid, _| self.table_ids.get(tid) != Some(&Some(idx)));
        if let Some(c) = self.codec_cache.get_mut(idx) {
            *c = None;
        }
    }

    fn forget_all_codecs(&mut self) {
        self.codecs.clear();
        self.codec_cache = vec![None; self.tables.len()];
    }

    /// Replaces the whole replica with a fresh snapshot, atomically.
    async fn full_snapshot(&mut self, info: &ServerInfo, reason: &str) -> Result<()> {
        let started = Instant::now();
        for i in 0..self.tables.len() {
            self.applier.forget_schema(i);
        }
        self.applier.begin()?;
        let tables = self.tables.clone();
        let names = self.tables_key();
        self.status.update(|s| {
            s.consistent = false;
            s.snapshot = Some(crate::status::SnapshotProgress { table: names, rows_copied: 0, estimated_rows: None });
        });
        let outcome = match snapshot_until(&self.cfg.mysql, info, &tables, self.applier.conn(), &self.shutdown).await {
            Ok(o) => o,
            Err(e) => {
                self.applier.rollback();
                self.schemas = vec![None; self.tables.len()];
                self.checkpoint = None;
                return Err(e);
            }
        };
        let cp = Checkpoint { position: outcome.start.clone(), gtid: None };
        write_meta(self.applier.conn(), outcome.consistent_after.as_ref(), &info.identity(), &self.tables_key())?;
        self.applier.apply(Action::Commit { checkpoint: &cp, consistent: outcome.consistent_after.is_none() })?;
        for (i, s) in outcome.schemas.into_iter().enumerate() {
            self.set_schema(i, s)?;
        }
        self.table_ids.clear();
        self.forget_all_codecs();
        self.skip_until = vec![None; self.tables.len()];
        self.resnapshot_tables.clear();
        self.consistent_after = outcome.consistent_after;
        self.checkpoint = Some(cp.clone());
        self.publish_position(&cp);
        self.schedule_resync();
        tracing::info!(position = %cp, elapsed_ms = started.elapsed().as_millis() as u64, "replica replaced by snapshot");
        crate::metrics::snapshot_taken(reason);
        self.last_notified = Some(cp.position.clone());
        (self.notify)(CommitNotice {
            touched: self.tables.iter().map(TableRef::sqlite_name).collect(),
            checkpoint: cp,
            arrived: started,
            full: true,
            schema_changed: true,
            trigger: Some(reason.to_owned()),
            changes: {
                self.applier.take_changes();
                Default::default()
            },
        });
        Ok(())
    }

    /// Checks that the server still has `pos`; returns where its binlog
    /// ends now (the position this session must reach to be caught up).
    async fn verify_position(&mut self, conn: &mut Conn, pos: &BinlogPosition) -> Result<BinlogPosition> {
        let logs = binary_logs(conn).await?;
        match logs.iter().find(|(f, _)| *f == pos.file) {
            Some((_, size)) if *size >= pos.pos => {
                let (file, size) = logs.last().cloned().unwrap_or_else(|| (pos.file.clone(), *size));
                Ok(BinlogPosition::new(file, size))
            }
            Some((_, size)) => Err(Error::NeedsResync {
                reason: format!(
                    "stored position {pos} is past the end of that binlog ({size} bytes): the server is not the one we followed"
                ),
                table: None,
                position: Some(pos.clone()),
            }),
            None => Err(Error::NeedsResync {
                reason: format!(
                    "binlog {} is no longer on the server (purged?); oldest is {}",
                    pos.file,
                    logs.first().map(|l| l.0.as_str()).unwrap_or("none")
                ),
                table: None,
                position: Some(pos.clone()),
            }),
        }
    }

    /// Streams from `start` on `conn`, set up by [`Self::prepare_dump`].
    async fn stream(&mut self, conn: Conn, start: BinlogPosition) -> Result<SessionEnd> {
        let heartbeat = Duration::from_secs_f64(self.cfg.mysql.heartbeat_secs);
        let req =
            BinlogStreamRequest::new(self.cfg.mysql.server_id).with_filename(start.file.as_bytes()).with_pos(start.pos);
        let dump_id = conn.id();
        let mut stream = conn
            .get_binlog_stream(req)
            .await
            .map_err(|e| Error::Mysql {
                context: "start binlog dump".into(),
                position: Some(start.clone()),
                source: e,
            })?
            .into_raw();
        tracing::info!(position = %start, heartbeat_ms = heartbeat.as_millis() as u64, "streaming binlog");
        self.streamed_since = Some(Instant::now());
        self.retry_log.recovered();
        self.status.update(|s| {
            s.source_connected = true;
            s.source_error = None;
        });
        // Resumed at the server's end already (an idle server): consistent
        // at once; otherwise `pump` says so once it gets there.
        self.check_caught_up(&start.file, start.pos);
        if let Some(cp) = self.checkpoint.clone() {
            self.publish_position(&cp);
        }
        let end = self.pump(&mut stream, start, heartbeat).await;
        self.status.update(|s| s.source_connected = false);
        if end.is_ok() {
            drop(stream);
            self.release_dump(dump_id).await;
        }
        end
    }

    /// Ends our dump thread on the server when we leave on purpose. The
    /// server only notices a closed socket at its next write (a heartbeat,
    /// maybe seconds away), and the next dump with our server_id must first
    /// evict that zombie, which costs ~100 ms on MariaDB: a restart or a
    /// resync would pay it. One can always KILL one's own connections.
    async fn release_dump(&self, dump_id: u32) {
        let kill = async {
            let mut c = connect(&self.cfg.mysql).await?;
            let r = c.query_drop(format!("KILL CONNECTION {dump_id}")).await;
            let _ = c.disconnect().await;
            r.map_err(|e| Error::mysql("kill our binlog dump connection", e))
        };
        match tokio::time::timeout(Duration::from_secs(2), kill).await {
            Ok(Ok(())) => tracing::debug!(connection = dump_id, "binlog dump connection released"),
            // Unknown thread id: the server already let it go.
            Ok(Err(e)) => tracing::debug!(connection = dump_id, error = %e, "binlog dump connection not killed"),
            Err(_) => tracing::debug!(connection = dump_id, "timed out releasing the binlog dump connection"),
        }
    }

    async fn pump(
        &mut self,
        stream: &mut mysql_async::RawBinlogStream,
        start: BinlogPosition,
        heartbeat: Duration,
    ) -> Result<SessionEnd> {
        let mut file = start.file.clone();
        let mut pos = start.pos;
        let dead_after = heartbeat * 3 + Duration::from_secs(1);
        let mut shutdown = self.shutdown.clone();
        loop {
            // At a transaction boundary with work pending: commit unless
            // more events are already here (then keep batching, bounded).
            let ready = if self.batch.pending.is_some() && !self.batch.in_txn {
                let overdue = self.batch.rows >= MAX_BATCH_ROWS
                    || self.batch.started.is_some_and(|s| s.elapsed() >= MAX_BATCH_AGE);
                if overdue {
                    self.flush()?;
                    None
                } else {
                    match stream.next().now_or_never() {
                        Some(ev) => Some(ev),
                        None => {
                            self.flush()?;
                            None
                        }
                    }
                }
            } else {
                None
            };
            let item = match ready {
                Some(ev) => ev,
                None => {
                    // Everything received is applied and committed: caught
                    // up if the stream got to the server's end.
                    if !self.caught_up {
                        self.check_caught_up(&file, pos);
                    }
                    let resync_at = self.resync_due;
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => {
                            self.abort_batch();
                            return Ok(SessionEnd::Shutdown);
                        }
                        ctl = self.control.recv(), if self.control_open && !self.batch.in_txn && self.batch.pending.is_none() => {
                            match ctl {
                                Some(Control::Resync { reason }) => {
                                    self.need_snapshot = Some(reason);
                                    return Ok(SessionEnd::Resync);
                                }
                                None => self.control_open = false,
                            }
                            continue;
                        }
                        _ = sleep_until_opt(resync_at), if !self.batch.in_txn && self.batch.pending.is_none() => {
                            self.need_snapshot = Some("periodic resync".into());
                            return Ok(SessionEnd::Resync);
                        }
                        r = tokio::time::timeout(dead_after, stream.next()) => match r {
                            Err(_) => return Err(Error::Transient(format!(
                                "no binlog event or heartbeat for {dead_after:?} at {file}:{pos}; the link is dead"
                            ))),
                            Ok(ev) => ev,
                        }
                    }
                }
            };
            let event = match item {
                None => return Err(Error::Transient(format!("the server closed the binlog stream at {file}:{pos}"))),
                Some(Err(e)) => {
                    return Err(Error::Mysql {
                        context: "read binlog".into(),
                        position: Some(BinlogPosition::new(file, pos)),
                        source: e,
                    });
                }
                Some(Ok(ev)) => ev,
            };
            if event.event_type_raw() == events::FORMAT_DESCRIPTION {
                self.fde = Rc::new(stream.fde().clone());
            }
            self.handle(Ev { header: event.header(), body: event.body() }, &mut file, &mut pos, None).await?;
            if let Some(why) = self.unstaged_xa.take() {
                // Not an error (no backoff, the link is fine): the batch,
                // which holds that COMMIT, is dropped so the checkpoint
                // never passes it, and a snapshot follows at once.
                tracing::warn!(position = %BinlogPosition::new(file.clone(), pos), "{why}; re-snapshotting the watched tables now");
                self.abort_batch();
                self.need_snapshot = Some(why);
                return Ok(SessionEnd::Resync);
            }
        }
    }

    /// Handles one event. `inner_end` is set for the events inside a
    /// compressed transaction payload: they all end where the payload does.
    async fn handle(&mut self, ev: Ev<'_>, file: &mut String, pos: &mut u64, inner_end: Option<u64>) -> Result<()> {
        let header = ev.header;
        let body = ev.body;
        let et = header.event_type_raw();
        let end = match inner_end {
            Some(e) => e,
            None if header.log_pos() != 0 => widen_position(*pos, header.log_pos()),
            None => *pos,
        };
        let here = || BinlogPosition::new(file.clone(), end);
        let handling = events::classify(et);
        crate::metrics::BINLOG_EVENTS.inc(et);
        if inner_end.is_none() {
            self.last_event_ts = if handling == Handling::Heartbeat { 0 } else { header.timestamp() };
        }
        self.status.beat(); // systemd watchdog (src/notify.rs): the stream is alive
        match handling {
            Handling::Rotate => {
                let fde = Rc::clone(&self.fde);
                let re: RotateEvent<'_> = parse_body(&fde, et, body).map_err(|e| malformed("ROTATE", e, here()))?;
                let raw = re.name_raw();
                // The fake ROTATE that opens the stream arrives before the
                // format description, so its name still carries the 4-byte
                // checksum: it names the file we asked for.
                if !(raw.len() == file.len() + 4 && raw.starts_with(file.as_bytes())) {
                    *file = String::from_utf8_lossy(raw).into_owned();
                }
                *pos = re.position();
                return Ok(());
            }
            Handling::FormatDescription => {}
            // Sent only when the server has nothing more to send.
            Handling::Heartbeat => self.heartbeat_seen = true,
            Handling::Ignore(reason) => {
                if crate::metrics::BINLOG_EVENTS_IGNORED.inc(et) == 0 {
                    tracing::info!(event_type = events::name(et), position = %here(), reason, "ignoring this event type");
                }
            }
            Handling::MysqlGtid => {
                // Anonymous and tagged GTIDs carry no `uuid:gno` we record;
                // the checkpoint is the file and offset either way.
                let g: Option<Gtid> = if et == events::GTID {
                    match parse_body::<GtidEvent>(&self.fde, et, body) {
                        Ok(g) => Some(Gtid::Mysql { uuid: g.sid(), gno: g.gno() }),
                        Err(e) => {
                            tracing::warn!(position = %here(), error = %e, "cannot read a GTID event; the checkpoint records file:offset without the GTID");
                            None
                        }
                    }
                } else {
                    None
                };
                self.begin_txn(g);
            }
            Handling::MariadbGtid => {
                let d = body;
                if d.len() < 13 {
                    return Err(Error::Decode {
                        table: "-".into(),
                        position: here(),
                        message: "short MariaDB GTID event".into(),
                    });
                }
                let seq = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
                let domain = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
                self.begin_txn(Some(Gtid::MariaDb { domain, server_id: header.server_id(), seq }));
                // FL_STANDALONE (1): a single statement (DDL) follows, not a
                // BEGIN…XID group; a group may carry SAVEPOINT queries that
                // must not end it.
                self.batch.txn_explicit = d[12] & 1 == 0;
                // MariaDB writes no `XA START` query: the GTID event of an
                // XA transaction's first half carries FL_PREPARED_XA and
                // the xid; its rows must be staged until XA COMMIT.
                if let Some(xid) = mariadb_prepared_xid(d) {
                    self.ensure_open()?;
                    self.applier.apply(Action::XaStart { xid: Xid(xid) })?;
                }
            }
            Handling::Query => self.handle_query(et, body, here()).await?,
            Handling::ExecuteLoadQuery => {
                // Statement-format LOAD DATA: its text names the table.
                let text = String::from_utf8_lossy(body).into_owned();
                self.statement_dml(&text, "", here()).await?;
            }
            Handling::TableMap => self.handle_table_map(et, body, file, end).await?,
            Handling::Rows => self.handle_rows(et, body, file, end)?,
            Handling::Xid => self.end_txn(here()),
            Handling::XaPrepare => {
                // one_phase (1 byte) | formatID | gtrid_len | bqual_len | data
                let one_phase = body.first().is_some_and(|b| *b != 0);
                let touched = self.applier.apply(Action::XaPrepare { one_phase })?;
                self.mark_touched(touched);
                self.end_txn(here());
            }
            Handling::TransactionPayload => {
                self.handle_payload(et, body, file, pos, end).await?;
            }
            Handling::Incident => {
                return Err(Error::NeedsResync {
                    reason: format!(
                        "the server logged an INCIDENT event at {} (it lost events, e.g. a failed non-transactional write): the replica can no longer follow the binlog",
                        here()
                    ),
                    table: None,
                    position: Some(here()),
                });
            }
            Handling::Unsupported(what) => {
                return Err(Error::Fatal(format!(
                    "binlog event type {et} ({}) at {}: {what}",
                    events::name(et),
                    here()
                )));
            }
        }
        *pos = end;
        Ok(())
    }

    /// A compressed transaction: its events are decompressed and handled
    /// one at a time, so memory does not grow with the transaction.
    async fn handle_payload(&mut self, et: u8, body: &[u8], file: &mut String, pos: &mut u64, end: u64) -> Result<()> {
        let at = |file: &str| BinlogPosition::new(file, end);
        let fde = Rc::clone(&self.fde);
        let tpe: TransactionPayloadEvent<'_> =
            parse_body(&fde, et, body).map_err(|e| malformed("TRANSACTION_PAYLOAD", e, at(file)))?;
        let mut input = tpe.decompressed().map_err(|e| Error::Decode {
            table: "-".into(),
            position: at(file),
            message: format!("cannot decompress the transaction payload: {e}"),
        })?;
        // One buffer for all inner events; taken out of `self` so that
        // `handle` can borrow `self` mutably while the event borrows it.
        let mut buf = std::mem::take(&mut self.inner_buf);
        let mut n = 0u64;
        let outcome = loop {
            let header = match read_inner_event(&mut input, &mut buf) {
                Ok(Some(h)) => h,
                Ok(None) => break Ok(()),
                Err(e) => {
                    break Err(Error::Decode {
                        table: "-".into(),
                        position: at(file),
                        message: format!("cannot read event {} inside the compressed transaction payload: {e}", n + 1),
                    });
                }
            };
            n += 1;
            if let Err(e) = Box::pin(self.handle(Ev { header, body: &buf }, file, pos, Some(end))).await {
                break Err(e);
            }
        };
        // A rows event is at most a few MB; do not keep an outsized one.
        if buf.capacity() <= 1 << 20 {
            buf.clear();
            self.inner_buf = buf;
        }
        outcome
    }

    fn mark_touched(&mut self, touched: Touched) {
        match touched {
            Touched::None => {}
            Touched::One(i) => self.batch.txn_touched[i] = true,
            Touched::Many(v) => {
                for (t, x) in self.batch.txn_touched.iter_mut().zip(v) {
                    *t |= x;
                }
            }
            // Seen by `pump` once the event is handled.
            Touched::Unstaged(why) => self.unstaged_xa = Some(why),
        }
    }

    fn begin_txn(&mut self, gtid: Option<Gtid>) {
        self.batch.in_txn = true;
        self.batch.txn_gtid = gtid;
        self.batch.txn_arrived = Some(Instant::now());
    }

    fn ensure_open(&mut self) -> Result<()> {
        if !self.applier.is_open() {
            self.applier.begin()?;
            self.batch.started = Some(Instant::now());
        }
        Ok(())
    }

    /// A MySQL transaction ended at `at`: fold it into the batch.
    fn end_txn(&mut self, at: BinlogPosition) {
        let b = &mut self.batch;
        for (t, x) in b.touched.iter_mut().zip(b.txn_touched.iter_mut()) {
            *t |= std::mem::take(x);
        }
        let arrived = b.txn_arrived.take().unwrap_or_else(Instant::now);
        b.arrived = Some(b.arrived.map_or(arrived, |a| a.min(arrived)));
        b.pending = Some(Checkpoint { position: at, gtid: b.txn_gtid.take() });
        b.ended = Some(Instant::now());
        b.started.get_or_insert_with(Instant::now);
        b.in_txn = false;
        b.txn_explicit = false;
        crate::metrics::transaction_applied();
    }

    /// Commits the batch and its checkpoint, then tells the publisher.
    fn flush(&mut self) -> Result<()> {
        let Some(cp) = self.batch.pending.take() else { return Ok(()) };
        self.ensure_open()?;
        let became_consistent = self.consistent_after.as_ref().is_some_and(|p| cp.position >= *p);
        if became_consistent {
            self.consistent_after = None;
            write_meta(
                self.applier.conn(),
                None,
                &self.info.as_ref().map(|i| i.identity()).unwrap_or_default(),
                &self.tables_key(),
            )?;
            tracing::info!(position = %cp, "replica consistent with the server");
        }
        self.applier.apply(Action::Commit { checkpoint: &cp, consistent: self.consistent_after.is_none() })?;
        let b = &mut self.batch;
        let touched: Vec<String> = b
            .touched
            .iter_mut()
            .zip(&self.tables)
            .filter_map(|(t, r)| std::mem::take(t).then(|| r.sqlite_name()))
            .collect();
        let arrived = b.arrived.take().unwrap_or_else(Instant::now);
        let ended = b.ended.take().unwrap_or(arrived);
        let rows = std::mem::take(&mut b.rows);
        let schema_changed = std::mem::take(&mut b.schema_changed);
        b.started = None;
        self.checkpoint = Some(cp.clone());
        if !touched.is_empty() || became_consistent || schema_changed {
            // The notice goes first: the status update and the debug line
            // below are not on a commit's way to memcached.
            let received_us = ended.saturating_duration_since(arrived).as_micros() as u64;
            let committed_us = arrived.elapsed().as_micros() as u64;
            // Only the debug line needs the list once the notice has it.
            let tables = tracing::enabled!(tracing::Level::DEBUG).then(|| touched.clone());
            let touched =
                if became_consistent { self.tables.iter().map(TableRef::sqlite_name).collect() } else { touched };
            crate::failpoint!("replica.after_commit");
            let changes = self.applier.take_changes();
            self.last_notified = Some(cp.position.clone());
            (self.notify)(CommitNotice {
                touched,
                checkpoint: cp.clone(),
                arrived,
                full: false,
                schema_changed,
                trigger: None,
                changes,
            });
            // Stage timings from the first event of the batch: its last
            // XID read, and the replica commit done.
            if let Some(tables) = tables {
                tracing::debug!(position = %cp, rows, tables = ?tables, received_us, committed_us, "applied");
            }
        }
        self.publish_position(&cp);
        Ok(())
    }

    /// Marks the session caught up when everything received is committed
    /// and the stream, now at `file:pos`, has reached the server's binlog
    /// end read at connect, or a heartbeat said it is at the end.
    fn check_caught_up(&mut self, file: &str, pos: u64) {
        if self.caught_up || self.batch.in_txn || self.batch.pending.is_some() {
            return;
        }
        let at = BinlogPosition::new(file, pos);
        let reached = self.catch_up_to.as_ref().is_some_and(|end| at >= *end);
        if !(reached || self.heartbeat_seen) {
            return;
        }
        self.caught_up = true;
        tracing::info!(
            position = %at,
            server_end = %self.catch_up_to.as_ref().map(ToString::to_string).unwrap_or_else(|| "?".into()),
            proof = if reached { "position" } else { "heartbeat" },
            "caught up with the server"
        );
        if let Some(cp) = self.checkpoint.clone() {
            self.publish_position(&cp);
        }
    }

    /// Tells the status where the replica is, how far behind, and whether
    /// it is consistent with the server now: consistent at its position
    /// (no snapshot still catching up) and caught up with the server.
    fn publish_position(&self, cp: &Checkpoint) {
        let consistent = self.consistent_after.is_none() && self.caught_up;
        let lag = if self.last_event_ts != 0 {
            Some((crate::status::unix_now() - f64::from(self.last_event_ts)).max(0.0))
        } else if self.caught_up {
            Some(0.0)
        } else {
            None
        };
        let notified = self.last_notified.clone();
        self.status.update(|s| {
            if consistent && !s.consistent {
                // Memcached holds this consistent replica once the last
                // change sent to the publisher is published.
                s.publish_needed = notified;
            }
            s.position = Some(cp.position.to_string());
            s.gtid = cp.gtid.as_ref().map(|g| g.to_string());
            s.consistent = consistent;
            if lag.is_some() {
                s.lag_seconds = lag;
            }
            s.snapshot = None;
        });
    }

    fn abort_batch(&mut self) {
        self.applier.rollback();
        self.batch = Batch::new(self.tables.len());
        // The rolled-back batch may have held schema changes: re-read them.
        self.table_ids.clear();
        self.forget_all_codecs();
        self.schemas = vec![None; self.tables.len()];
    }

    fn watched_index(&self, schema: &str, name: &str) -> Option<usize> {
        self.tables.iter().position(|t| t.schema == schema && t.name == name)
    }

    /// [`Self::watched_index`] for names as the binlog carries them (UTF-8
    /// bytes; a name that is not valid UTF-8 matches no configured table).
    fn watched_index_bytes(&self, schema: &[u8], name: &[u8]) -> Option<usize> {
        self.tables.iter().position(|t| t.schema.as_bytes() == schema && t.name.as_bytes() == name)
    }

    async fn handle_query(&mut self, et: u8, body: &[u8], at: BinlogPosition) -> Result<()> {
        let fde = Rc::clone(&self.fde);
        let q: QueryEvent<'_> = parse_body(&fde, et, body).map_err(|e| malformed("QUERY", e, at.clone()))?;
        let sql = q.query();
        let trimmed = sql.trim();
        if trimmed.eq_ignore_ascii_case("BEGIN") {
            if !self.batch.in_txn {
                self.begin_txn(None);
            }
            self.batch.txn_explicit = true;
            return Ok(());
        }
        if let Some((verb, xid)) = events::parse_xa(trimmed) {
            return self.handle_xa(&verb, xid, trimmed, at);
        }
        if trimmed.eq_ignore_ascii_case("COMMIT") || trimmed.eq_ignore_ascii_case("ROLLBACK") {
            // Only non-transactional changes end this way; they persist.
            self.end_txn(at);
            return Ok(());
        }
        let default_schema = q.schema().into_owned();
        if ddl::statement_dml_tables(&sql).is_some() {
            self.statement_dml(&sql, &default_schema, at.clone()).await?;
            if self.batch.txn_explicit {
                return Ok(());
            }
        } else if let Some(d) = ddl::parse(&sql) {
            self.handle_ddl(&d, &default_schema, trimmed, &at).await?;
        } else if self.batch.txn_explicit {
            // A statement inside a transaction (SAVEPOINT, ...).
            return Ok(());
        }
        // MySQL 8.0.21+ logs CREATE TABLE … SELECT as one atomic transaction
        // whose CREATE statement ends in START TRANSACTION; its rows and XID
        // follow. Inside an explicit group (MariaDB's non-standalone GTID)
        // the DDL does not end the transaction either.
        let opens_txn = trimmed.len() >= 17 && trimmed[trimmed.len() - 17..].eq_ignore_ascii_case("START TRANSACTION");
        if opens_txn || self.batch.txn_explicit {
            if !self.batch.in_txn {
                self.begin_txn(None);
            }
            self.batch.txn_explicit = true;
            return Ok(());
        }
        // DDL and other statements outside BEGIN commit implicitly.
        if !self.batch.in_txn {
            self.begin_txn(None);
        }
        self.end_txn(at);
        Ok(())
    }

    fn handle_xa(&mut self, verb: &str, xid: Option<String>, sql: &str, at: BinlogPosition) -> Result<()> {
        let xid = || {
            xid.clone().map(Xid).ok_or_else(|| Error::Decode {
                table: "-".into(),
                position: at.clone(),
                message: format!("cannot read the xid of `{}`", sql.chars().take(200).collect::<String>()),
            })
        };
        match verb {
            "START" | "BEGIN" => {
                if !self.batch.in_txn {
                    self.begin_txn(None);
                }
                self.batch.txn_explicit = true;
                self.ensure_open()?;
                self.applier.apply(Action::XaStart { xid: xid()? })?;
            }
            // The rows are staged; XA_PREPARE (an event) or the XA COMMIT …
            // ONE PHASE path ends the transaction.
            "END" => {}
            "PREPARE" => {}
            "COMMIT" => {
                self.ensure_open()?;
                let touched = self.applier.apply(Action::XaCommit { xid: xid()? })?;
                self.mark_touched(touched);
                if !self.batch.in_txn {
                    self.begin_txn(None);
                }
                self.end_txn(at);
            }
            "ROLLBACK" => {
                self.ensure_open()?;
                self.applier.apply(Action::XaRollback { xid: xid()? })?;
                if !self.batch.in_txn {
                    self.begin_txn(None);
                }
                self.end_txn(at);
            }
            // XA RECOVER and others are not logged; ignore whatever else.
            _ => {}
        }
        Ok(())
    }

    async fn handle_ddl(&mut self, d: &ddl::Ddl, default_schema: &str, text: &str, at: &BinlogPosition) -> Result<()> {
        let mut hit: Vec<usize> = Vec::new();
        match &d.kind {
            DdlKind::DropDatabase(db) => {
                hit.extend(self.tables.iter().enumerate().filter(|(_, t)| &t.schema == db).map(|(i, _)| i))
            }
            _ => {
                for (s, n) in &d.tables {
                    if let Some(i) = self.watched_index(s.as_deref().unwrap_or(default_schema), n) {
                        hit.push(i);
                    }
                }
            }
        }
        hit.sort_unstable();
        hit.dedup();
        for i in hit {
            if self.skip_until[i].as_ref().is_some_and(|p| at <= p) {
                continue;
            }
            self.ensure_open()?;
            match d.kind {
                DdlKind::Truncate => {
                    tracing::info!(table = %self.tables[i], position = %at, "TRUNCATE: emptying replica table");
                    let touched = self.applier.apply(Action::Truncate { table: i })?;
                    self.mark_touched(touched);
                }
                _ => {
                    tracing::info!(table = %self.tables[i], position = %at, statement = %text.chars().take(200).collect::<String>(), "DDL on a watched table: re-reading its schema and re-snapshotting it");
                    self.resnapshot_table(i).await?;
                }
            }
            self.batch.txn_touched[i] = true;
        }
        Ok(())
    }

    /// A row-changing statement logged in statement format: its rows are
    /// not in the binlog, so the watched tables it names are re-snapshotted.
    async fn statement_dml(&mut self, sql: &str, default_schema: &str, at: BinlogPosition) -> Result<()> {
        let named = ddl::statement_dml_tables(sql).unwrap_or_default();
        let mut hit: Vec<usize> = named
            .iter()
            .filter_map(|(s, n)| {
                let schema = s.as_deref().unwrap_or(default_schema);
                self.tables.iter().position(|t| t.name.eq_ignore_ascii_case(n) && t.schema == schema)
            })
            .collect();
        hit.sort_unstable();
        hit.dedup();
        for i in hit {
            if self.skip_until[i].as_ref().is_some_and(|p| at <= *p) {
                continue;
            }
            tracing::warn!(
                table = %self.tables[i],
                position = %at,
                statement = %sql.chars().take(200).collect::<String>(),
                "a row change of a watched table was logged in statement format (a session ran with binlog_format=STATEMENT or MIXED): re-snapshotting the table; keep binlog_format=ROW for every session"
            );
            self.ensure_open()?;
            self.resnapshot_table(i).await?;
            self.batch.txn_touched[i] = true;
        }
        Ok(())
    }

    /// Replaces one table's replica copy with a fresh snapshot of it.
    async fn resnapshot_table(&mut self, idx: usize) -> Result<()> {
        let info = self.info.clone().ok_or_else(|| Error::Transient("no server info".into()))?;
        let t = self.tables[idx].clone();
        let mut conn = connect(&self.cfg.mysql).await?;
        let exists = crate::source::catalog::load_table_schema(&mut conn, &t).await?;
        let _ = conn.disconnect().await;
        self.ensure_open()?;
        let Some(_) = exists else {
            tracing::warn!(table = %t, "watched table no longer exists; its replica copy is now empty until it is created again");
            self.batch.schema_changed = true;
            if self.schemas[idx].is_some() {
                self.applier.apply(Action::Truncate { table: idx })?;
            }
            return Ok(());
        };
        self.applier.forget_schema(idx);
        // Shown in /status and systemd's STATUS=; exempts the copy from the watchdog's stall check.
        let name = t.to_string();
        self.status
            .update(|s| s.snapshot = Some(crate::status::SnapshotProgress { table: name, ..Default::default() }));
        let outcome =
            snapshot_until(&self.cfg.mysql, &info, std::slice::from_ref(&t), self.applier.conn(), &self.shutdown).await;
        self.status.update(|s| s.snapshot = None);
        let outcome = outcome?;
        let schema = outcome.schemas.into_iter().next().ok_or_else(|| Error::Transient("empty snapshot".into()))?;
        let until = outcome.consistent_after.clone().unwrap_or_else(|| outcome.start.clone());
        self.skip_until[idx] = Some(outcome.start.clone());
        if self.consistent_after.as_ref().is_none_or(|p| until > *p) {
            self.consistent_after = Some(until.clone());
        }
        write_meta(self.applier.conn(), self.consistent_after.as_ref(), &info.identity(), &self.tables_key())?;
        self.set_schema(idx, schema)?;
        self.batch.schema_changed = true;
        crate::metrics::TABLE_RESNAPSHOTS.inc();
        tracing::info!(table = %t, rows = outcome.rows.first().copied().unwrap_or(0), skip_until = %outcome.start, consistent_after = %until, "table re-snapshotted");
        Ok(())
    }

    async fn handle_table_map(&mut self, et: u8, body: &[u8], file: &str, end: u64) -> Result<()> {
        let at = || BinlogPosition::new(file, end);
        // Read the names straight from the bytes: 99 % of table maps are of
        // unwatched tables and need nothing more.
        let Some(names) = events::table_map_names(body) else {
            return Err(malformed("TABLE_MAP", std::io::Error::other("event too short for its names"), at()));
        };
        let tid = names.table_id;
        let Some(idx) = self.watched_index_bytes(names.database, names.table) else {
            self.table_ids.insert(tid, None);
            return Ok(());
        };
        self.table_ids.insert(tid, Some(idx));
        if self.skip_until[idx].as_ref().is_some_and(|p| at() <= *p) {
            self.codecs.remove(&tid);
            return Ok(());
        }
        // The same map as last time for this table (names, types, metadata):
        // the decoder built then still applies.
        if let Some((shape, codec)) = &self.codec_cache[idx]
            && self.schemas[idx].is_some()
            && shape.as_slice() == names.shape
        {
            self.codecs.insert(tid, Rc::clone(codec));
            return Ok(());
        }
        let fde = Rc::clone(&self.fde);
        let tme: TableMapEvent<'_> = parse_body(&fde, et, body).map_err(|e| malformed("TABLE_MAP", e, at()))?;
        let at = at();
        for attempt in 0..2 {
            let Some(schema) = &self.schemas[idx] else { break };
            match TableCodec::new(&tme, schema) {
                Ok(codec) => {
                    let codec = Rc::new(codec);
                    self.codecs.insert(tid, Rc::clone(&codec));
                    self.codec_cache[idx] = Some((names.shape.to_vec(), codec));
                    return Ok(());
                }
                Err(DecodeError::Mismatch(why)) if attempt == 0 => {
                    tracing::info!(table = %self.tables[idx], position = %at, reason = %why, "table map differs from the known schema: re-snapshotting the table");
                    self.resnapshot_table(idx).await?;
                    if self.skip_until[idx].as_ref().is_some_and(|p| at <= *p) {
                        self.codecs.remove(&tid);
                        return Ok(());
                    }
                }
                Err(e) => {
                    return Err(Error::Decode {
                        table: self.tables[idx].to_string(),
                        position: at,
                        message: e.to_string(),
                    });
                }
            }
        }
        Err(Error::Decode {
            table: self.tables[idx].to_string(),
            position: at,
            message: "table map does not match the schema after a re-snapshot".into(),
        })
    }

    fn handle_rows(&mut self, et: u8, body: &[u8], file: &str, end: u64) -> Result<()> {
        let Some(tid) = rows_table_id(body) else {
            return Err(Error::Decode {
                table: "-".into(),
                position: BinlogPosition::new(file, end),
                message: "rows event too short".into(),
            });
        };
        // Rows of unwatched tables stop here, before any allocation.
        let Some(Some(idx)) = self.table_ids.get(&tid).copied() else { return Ok(()) };
        let at = BinlogPosition::new(file, end);
        if self.skip_until[idx].as_ref().is_some_and(|p| at <= *p) {
            return Ok(());
        }
        let Some(codec) = self.codecs.get(&tid) else {
            return Err(Error::Decode {
                table: self.tables[idx].to_string(),
                position: at,
                message: "rows event without a usable table map".into(),
            });
        };
        if !self.applier.is_open() {
            self.applier.begin()?;
            self.batch.started = Some(Instant::now());
        }
        let staging = self.applier.staging();
        let applier = &mut self.applier;
        let mut n = 0u64;
        // Inserts and same-key updates are buffered and upserted many rows
        // per statement; the buffer is flushed before this event is done.
        let mut apply = |change: crate::replica::action::RowChange<'_>| -> Result<()> {
            n += 1;
            applier.buffer_row(idx, change)
        };
        match self.decoder.decode(et, body, codec, &mut apply) {
            Ok(()) => self.applier.flush_rows()?,
            Err(DecodeFailure::Callback(e)) => return Err(e),
            Err(DecodeFailure::Decode(DecodeError::PartialImage(m))) => {
                return Err(Error::Fatal(format!(
                    "binlog_row_image: rows of {} at {at} are not full images ({m}); set binlog_row_image=FULL in my.cnf",
                    self.tables[idx]
                )));
            }
            Err(DecodeFailure::Decode(e)) => {
                return Err(Error::Decode {
                    table: self.tables[idx].to_string(),
                    position: at,
                    message: e.to_string(),
                });
            }
        }
        self.batch.rows += n;
        crate::metrics::rows_applied(&self.tables[idx], n);
        if !staging {
            self.batch.txn_touched[idx] = true;
        }
        Ok(())
    }
}

/// One event's common header and body (no checksum), borrowed from the
/// network packet or from the buffer of a compressed payload.
#[derive(Clone, Copy)]
struct Ev<'a> {
    header: BinlogEventHeader,
    body: &'a [u8],
}

/// Reads the next event of a decompressed transaction payload into `buf`
/// (its body; the events inside a payload carry no checksum) and returns
/// its header; `None` at the end of the payload.
fn read_inner_event(input: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<BinlogEventHeader>> {
    if input.fill_buf()?.is_empty() {
        return Ok(None);
    }
    let mut raw = [0u8; BinlogEventHeader::LEN];
    input.read_exact(&mut raw)?;
    let header: BinlogEventHeader = ParseBuf(&raw).parse(())?;
    let Some(len) = (header.event_size() as usize).checked_sub(BinlogEventHeader::LEN) else {
        return Err(std::io::Error::other(format!("event size {} is below the header size", header.event_size())));
    };
    if header.event_type_raw() == events::TRANSACTION_PAYLOAD {
        return Err(std::io::Error::other("TRANSACTION_PAYLOAD_EVENT encountered"));
    }
    buf.clear();
    input.take(len as u64).read_to_end(buf)?;
    if buf.len() != len {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "payload ends inside an event"));
    }
    Ok(Some(header))
}

/// The xid of a MariaDB GTID event flagged FL_PREPARED_XA (64), in the
/// canonical form of [`events::parse_xa`]: `gtrid-hex,bqual-hex,formatID`.
/// Layout: seq u64 | domain u32 | flags2 u8 | [commit_id u64 if
/// FL_GROUP_COMMIT_ID (2)] | formatID u32 | gtrid_len u8 | bqual_len u8 | data.
fn mariadb_prepared_xid(d: &[u8]) -> Option<String> {
    const FL_GROUP_COMMIT_ID: u8 = 2;
    const FL_PREPARED_XA: u8 = 64;
    let flags = *d.get(12)?;
    if flags & FL_PREPARED_XA == 0 {
        return None;
    }
    let mut at = 13 + if flags & FL_GROUP_COMMIT_ID != 0 { 8 } else { 0 };
    let format_id = u32::from_le_bytes(d.get(at..at + 4)?.try_into().ok()?);
    at += 4;
    let (gl, bl) = (*d.get(at)? as usize, *d.get(at + 1)? as usize);
    at += 2;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let gtrid = d.get(at..at + gl)?;
    let bqual = d.get(at + gl..at + gl + bl)?;
    Some(format!("{},{},{format_id}", hex(gtrid), hex(bqual)))
}

/// The 64-bit end offset of an event whose header carries the low 32 bits
/// (`log_pos`), given the offset it started at: a binlog file that grows
/// past 4 GiB (one huge transaction) keeps correct positions.
pub fn widen_position(start: u64, log_pos: u32) -> u64 {
    let candidate = (start & !0xFFFF_FFFF) | u64::from(log_pos);
    if candidate < start { candidate + (1 << 32) } else { candidate }
}

fn malformed(what: &str, e: std::io::Error, at: BinlogPosition) -> Error {
    Error::Decode { table: "-".into(), position: at, message: format!("cannot parse {what} event: {e}") }
}

/// Runs `fut` unless shutdown is requested first (then a transient
/// "shutting down" error; the caller's loop sees the request and stops).
async fn stoppable<T>(
    shutdown: &watch::Receiver<bool>,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let mut sd = shutdown.clone();
    if *sd.borrow() {
        return Err(Error::Transient("shutting down".into()));
    }
    tokio::select! {
        r = fut => r,
        _ = sd.wait_for(|stop| *stop) => Err(Error::Transient("shutting down".into())),
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_past_4_gib_do_not_wrap() {
        assert_eq!(widen_position(4, 120), 120);
        assert_eq!(widen_position(0xFFFF_FF00, 0x10), 0x1_0000_0010);
        assert_eq!(widen_position(0x1_0000_0010, 0x200), 0x1_0000_0200);
        assert_eq!(widen_position(0x2_FFFF_FFF0, 0x5), 0x3_0000_0005);
    }
}
