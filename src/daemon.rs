//! `tailcache run`: preflight, then the replicator and the publisher, until
//! SIGTERM/SIGINT; SIGHUP (or `POST /resync` on the admin endpoint) forces a
//! full resync. One daemon per state file ([`crate::instance`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::position::{BinlogPosition, Checkpoint};
use crate::replica::action::{NoticeReceiver, NoticeSender};
use crate::source::replicator::{CommitNotice, Control, spawn_replicator};
use crate::views::{ViewSet, spawn_publisher};

/// Where the replica lives. `:memory:` becomes a private temporary file
/// (removed at exit) because the replicator and the publisher each need a
/// connection to the same database.
pub struct StatePath {
    pub path: PathBuf,
    temporary: bool,
}

impl StatePath {
    pub fn resolve(cfg: &Config) -> Result<StatePath> {
        if cfg.state.path == ":memory:" {
            let dir = std::env::temp_dir().join(format!("tailcache-{}-{}", cfg.mysql.server_id, std::process::id()));
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Fatal(format!("state.path: cannot create {}: {e}", dir.display())))?;
            return Ok(StatePath { path: dir.join("state.db"), temporary: true });
        }
        let path = PathBuf::from(&cfg.state.path);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::Fatal(format!(
                    "state.path: cannot create directory {}: {e}; create it and give the tailcache user write access",
                    parent.display()
                ))
            })?;
        }
        Ok(StatePath { path, temporary: false })
    }
}

impl Drop for StatePath {
    fn drop(&mut self) {
        if self.temporary
            && let Some(dir) = self.path.parent()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The pid file: information only (nothing signals it); the instance lock
/// next to the state file is what keeps a second daemon out.
pub fn pid_file(cfg: &Config) -> PathBuf {
    if cfg.state.path == ":memory:" {
        std::env::temp_dir().join(format!("tailcache-{}.pid", cfg.mysql.server_id))
    } else {
        let mut p = PathBuf::from(&cfg.state.path).into_os_string();
        p.push(".pid");
        PathBuf::from(p)
    }
}

struct PidFile(PathBuf);

impl PidFile {
    fn create(path: &Path) -> Result<PidFile> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| Error::Fatal(format!("cannot write pid file {}: {e}", path.display())))?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Take a fresh snapshot at start instead of resuming.
    pub resync: bool,
    /// One-shot (`tailcache resync` without a running daemon): no admin
    /// endpoint; stop once the first resync is published (its report is in
    /// `status`), or, without `[memcached]`, once the replica is consistent.
    pub once: bool,
    /// Use this status (to watch progress from outside) instead of a new one.
    pub status: Option<Arc<crate::status::Status>>,
}

pub async fn run(cfg: Config, opts: RunOptions) -> Result<()> {
    let cfg = Arc::new(cfg);
    // Handlers first: SIGHUP's default action kills the process, and
    // `systemctl reload` may send one as soon as we run.
    tracing::debug!("runtime started");
    let mut signals = Signals::install()?;
    let state = StatePath::resolve(&cfg)?;
    // Before preflight, which ends leftover binlog dumps of our server_id:
    // a second daemon must not touch the first one's.
    let _lock = crate::instance::InstanceLock::acquire(&state.path)?;
    let _pid = PidFile::create(&pid_file(&cfg))?;
    let admin = if opts.once { None } else { crate::admin::bind(&cfg.admin).await? };
    let status = opts.status.clone().unwrap_or_else(|| Arc::new(crate::status::Status::new()));
    // A start that stops before the preflight passed leaves no state file
    // behind when there was none (the replica would be empty anyway).
    let fresh_state = !state.path.exists();
    // Create the state schema once, before the replicator and the publisher
    // open the file concurrently (their opens then never write).
    {
        let conn = crate::replica::open_connection(&state.path, &cfg.mysql.table_refs())?;
        crate::views::published::ensure_tables(&conn)?;
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (control_tx, control_rx) = mpsc::unbounded_channel::<Control>();
    let health = crate::admin::Health::new();
    let (notice_tx, notice_rx) = crate::replica::action::notice_channel();
    // The replicator connects and reads its state while the preflight runs;
    // it snapshots or streams only once the gate opens.
    let (gate_tx, gate_rx) = watch::channel(false);
    let notify = {
        let tx = notice_tx.clone();
        Box::new(move |n: CommitNotice| {
            let _ = tx.send(n);
        })
    };
    let replicator = spawn_replicator(
        cfg.clone(),
        state.path.clone(),
        opts.resync,
        notify,
        control_rx,
        gate_rx,
        shutdown_rx.clone(),
        status.clone(),
    )
    .map_err(|e| Error::Fatal(format!("cannot start the replicator thread: {e}")))?;
    // Leaving before the gate opened: the replicator thread stops first.
    let state_path = state.path.clone();
    let stop_early = |shutdown_tx: watch::Sender<bool>, thread: std::thread::JoinHandle<Result<()>>| async move {
        let _ = shutdown_tx.send(true);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        if fresh_state {
            remove_state_files(&state_path);
        }
    };
    // Served from now on, so that readiness says why while the preflight
    // waits for a server that is down. The publisher exists iff memcached
    // is configured (see start_publisher).
    if let Some(listener) = admin {
        let publishing = cfg.memcached.is_some();
        let (status, control, health, shutdown) =
            (status.clone(), control_tx.clone(), health.clone(), shutdown_rx.clone());
        crate::admin::spawn(listener, crate::admin::AdminState { status, control, health, publishing, shutdown });
    }
    // A server that is down at start is transient like a lost link: wait
    // for it (readiness says why); only configuration, privileges and
    // server settings are fatal.
    // Waits as after a lost binlog link (src/source/retry.rs): at most a
    // second between attempts while the server refuses connections, so
    // the start proceeds within a second of the server coming up.
    let mut backoff = crate::source::retry::Backoff::new();
    let mut retry_log = crate::source::retry::RetryLog::new("cannot reach the server at start; retrying");
    loop {
        let e = match preflight(&cfg).await {
            Ok(()) => {
                retry_log.recovered();
                break;
            }
            Err(e) if e.recovery() == crate::error::Recovery::Transient => e,
            Err(e) => {
                stop_early(shutdown_tx, replicator.thread).await;
                return Err(e);
            }
        };
        let delay = backoff.next(crate::source::retry::cap_for(&e));
        let msg = e.to_string();
        retry_log.failed(&msg, delay);
        status.update(|s| s.source_error = Some(msg));
        let signal = tokio::select! {
            _ = tokio::time::sleep(delay) => None,
            _ = signals.term.recv() => Some("SIGTERM"),
            _ = signals.int.recv() => Some("SIGINT"),
        };
        if let Some(signal) = signal {
            tracing::info!("{signal}: shutting down");
            stop_early(shutdown_tx, replicator.thread).await;
            return Ok(());
        }
    }
    status.update(|s| s.source_error = None);
    let _ = gate_tx.send(true);

    let publisher =
        start_publisher(cfg.clone(), state.path.clone(), &notice_tx, notice_rx, shutdown_rx.clone(), status.clone())?;
    drop(notice_tx);

    let once = opts.once.then(|| (status.clone(), publisher.is_some()));
    let mut notifier = crate::notify::Notifier::new(status.clone(), &cfg); // systemd (src/notify.rs)
    let outcome =
        wait_for_exit(signals, &control_tx, &replicator.thread, publisher.as_ref(), &health, once, &mut notifier).await;
    notifier.stopping(); // systemd STOPPING=1 (src/notify.rs)
    let _ = shutdown_tx.send(true);
    let rep = tokio::task::spawn_blocking(move || replicator.thread.join()).await;
    let pubr = match publisher {
        Some(h) => Some(tokio::task::spawn_blocking(move || h.join()).await),
        None => None,
    };
    outcome?;
    match rep {
        Ok(Ok(r)) => r?,
        _ => return Err(Error::Fatal("the replicator thread panicked".into())),
    }
    if let Some(p) = pubr {
        match p {
            Ok(Ok(r)) => r?,
            _ => return Err(Error::Fatal("the publisher thread panicked".into())),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Removes a state file and its SQLite companions (`-wal`, `-shm`,
/// `-journal`) once nothing has them open.
fn remove_state_files(path: &Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => tracing::debug!(path = %Path::new(&p).display(), "removed the state file this start created"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %Path::new(&p).display(), error = %e, "cannot remove the state file this start created")
            }
        }
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let sig = |k| signal(k).map_err(|e| Error::Fatal(format!("cannot install signal handler: {e}")));
        Ok(Signals {
            term: sig(SignalKind::terminate())?,
            int: sig(SignalKind::interrupt())?,
            hup: sig(SignalKind::hangup())?,
        })
    }
}

/// Waits for a signal or for a worker to stop on its own (an error); in
/// one-shot mode (`once`: the status and whether there is a publisher)
/// also for the first published resync.
async fn wait_for_exit(
    signals: Signals,
    control: &mpsc::UnboundedSender<Control>,
    replicator: &std::thread::JoinHandle<Result<()>>,
    publisher: Option<&std::thread::JoinHandle<Result<()>>>,
    health: &crate::admin::Health,
    once: Option<(Arc<crate::status::Status>, bool)>,
    notifier: &mut crate::notify::Notifier,
) -> Result<()> {
    let Signals { mut term, mut int, mut hup } = signals;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(()) }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: full resync requested");
                let _ = control.send(Control::Resync { reason: "SIGHUP / tailcache resync".into() });
            }
            _ = tick.tick() => {
                let finished = replicator.is_finished() || publisher.is_some_and(|p| p.is_finished());
                notifier.tick(!finished); // systemd READY/STATUS/WATCHDOG (src/notify.rs)
                if finished {
                    health.set(false);
                    return Ok(());
                }
                if let Some((status, publishing)) = &once {
                    let s = status.snapshot();
                    if (*publishing && s.last_resync.is_some()) || (!*publishing && s.consistent) {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Refuses to start on anything `tailcache check` calls a problem, and on
/// views that do not compile against the watched tables.
async fn preflight(cfg: &Config) -> Result<()> {
    tracing::debug!("preflight connecting");
    let mut conn = crate::source::conn::connect(&cfg.mysql).await?;
    tracing::debug!("preflight connection open");
    let info = crate::source::conn::server_info(&mut conn).await?;
    tracing::info!(flavor = %info.flavor, version = %info.version, server_id = info.server_id, "connected");
    let report = crate::check::preflight(&mut conn, &info, cfg).await;
    tracing::debug!("preflight checks done");
    if !report.ok() {
        return Err(Error::Fatal(format!("preflight failed; refusing to start:\n{}", report.render().trim_end())));
    }
    // A view that does not compile is reported and skipped, the same at
    // start as at run time (the tables may also still change: the views are
    // compiled again once the replica has caught up with the binlog's DDL).
    let problems = validate_views(cfg, &mut conn).await?;
    tracing::debug!("views validated");
    for p in &problems {
        tracing::error!(problem = %p.trim(), "view does not compile against the watched tables; it is skipped until it does");
    }
    let _ = conn.disconnect().await;
    Ok(())
}

/// Starts the publisher when there is somewhere to publish to; otherwise
/// notices are drained so the replicator never blocks.
fn start_publisher(
    cfg: Arc<Config>,
    state: PathBuf,
    tx: &NoticeSender,
    mut rx: NoticeReceiver,
    shutdown: watch::Receiver<bool>,
    status: Arc<crate::status::Status>,
) -> Result<Option<std::thread::JoinHandle<Result<()>>>> {
    if cfg.memcached.is_none() {
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        return Ok(None);
    }
    // Whatever the replica already holds (a resumed start) is diffed
    // against what was published before: missed changes go out, unchanged
    // keys are not rewritten.
    let _ = tx.send(CommitNotice {
        touched: cfg.mysql.table_refs().iter().map(|t| t.sqlite_name()).collect(),
        checkpoint: Checkpoint { position: BinlogPosition::new("", 0), gtid: None },
        arrived: std::time::Instant::now(),
        full: false,
        schema_changed: false,
        trigger: None,
        // Unknown changes: every view is recomputed in full.
        changes: Default::default(),
    });
    Ok(Some(spawn_publisher(cfg, state, rx, shutdown, status)))
}

/// Compiles the views against the watched tables' current shape (an
/// in-memory replica built from information_schema), so a view that cannot
/// run is reported before anything starts.
pub async fn validate_views(cfg: &Config, conn: &mut mysql_async::Conn) -> Result<Vec<String>> {
    Ok(check_views(cfg, conn).await?.0)
}

/// [`validate_views`], plus one line per compiled view saying how it is
/// maintained (incremental, or full recompute and why).
pub async fn check_views(cfg: &Config, conn: &mut mysql_async::Conn) -> Result<(Vec<String>, Vec<String>)> {
    let Some(mc) = &cfg.memcached else { return Ok((Vec::new(), Vec::new())) };
    let tables = cfg.mysql.table_refs();
    let sqlite = rusqlite::Connection::open_in_memory().map_err(|e| Error::sqlite("open in-memory replica", e))?;
    let mut schemas: Vec<&str> = tables.iter().filter(|t| t.qualified).map(|t| t.schema.as_str()).collect();
    schemas.sort();
    schemas.dedup();
    for s in schemas {
        sqlite.execute("ATTACH DATABASE ':memory:' AS ?1", [s]).map_err(|e| Error::sqlite("attach", e))?;
    }
    for t in &tables {
        match crate::source::catalog::load_table_schema(conn, t).await? {
            Some(schema) => crate::replica::tables::recreate_table(&sqlite, &schema)?,
            None => return Ok((vec![format!("mysql.tables: table {t} does not exist")], Vec::new())),
        }
    }
    match ViewSet::compile(&sqlite, &cfg.views, mc, &tables) {
        Ok(vs) => Ok((Vec::new(), vs.views().iter().map(|v| format!("{}: {}", v.name(), v.maintenance())).collect())),
        Err(problems) => Ok((problems.iter().map(|p| format!("  - {p}")).collect(), Vec::new())),
    }
}
