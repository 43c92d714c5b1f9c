//! Shared integration-test harness: real MariaDB / memcached servers started
//! on free ports in temp dirs, plus helpers to run the `tailcache` binary.
//!
//! * [`server()`] is one server (binlog on, ROW/FULL) shared by every test of
//!   this binary: MariaDB, or with `TAILCACHE_TEST_FLAVOR=mysql` MySQL run
//!   chrooted from the root built by `scripts/mysql-root.sh` (GTIDs on,
//!   binlog transaction compression on); or the server named by
//!   `TAILCACHE_TEST_MYSQL_URL`, which wins.
//! * [`start_private_server`] / [`Memcached::start`] give a test its own
//!   instance (killed on drop).
//! * Every child process is spawned from one long-lived thread with
//!   `PR_SET_PDEATHSIG = SIGKILL`, so servers die with the test process even
//!   on panic/abort.
#![allow(dead_code)]

use std::fs;
use std::future::Future;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Deref;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use rand::Rng;
use tempfile::TempDir;

/// Env var naming an already-running, root-capable server to test against.
pub const EXTERNAL_URL_ENV: &str = "TAILCACHE_TEST_MYSQL_URL";

const MARIADBD: &str = "/usr/sbin/mariadbd";
const MARIADB_INSTALL_DB: &str = "mariadb-install-db";
const MEMCACHED: &str = "/usr/bin/memcached";
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
const MEMCACHED_START_TIMEOUT: Duration = Duration::from_secs(20);
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Polling helpers
// ---------------------------------------------------------------------------

/// Polls `f` every few ms until it returns `Some`, panicking after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Blocking variant of [`wait_until`].
pub fn wait_until_blocking<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs a future to completion on a fresh current-thread runtime on a
/// separate OS thread, so it is safe to call from inside async code.
fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build helper tokio runtime")
                .block_on(fut)
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

// ---------------------------------------------------------------------------
// Process spawning tied to the test process' lifetime
// ---------------------------------------------------------------------------

struct SpawnReq {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `cmd` so that it gets SIGKILL when the test process dies.
///
/// PDEATHSIG fires when the *thread* that forked exits, and every test runs on
/// its own thread, so all spawns go through one thread that never exits.
fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnReq>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnReq>();
        std::thread::Builder::new()
            .name("it-spawner".into())
            .spawn(move || {
                for mut req in rx {
                    let _ = req.reply.send(req.cmd.spawn());
                }
                // The sender lives in a static, so `rx` never disconnects;
                // park forever just in case so children are never orphaned.
                loop {
                    std::thread::park();
                }
            })
            .expect("start spawner thread");
        tx
    });
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The test process died between fork and prctl.
                libc::_exit(137);
            }
            Ok(())
        });
    }
    let (reply, rx) = mpsc::channel();
    tx.send(SpawnReq { cmd, reply }).expect("spawner thread is gone");
    rx.recv().expect("spawner thread dropped the request")
}

// ---------------------------------------------------------------------------
// Temp dirs, ports, logs
// ---------------------------------------------------------------------------

const DIR_PREFIX: &str = "tailcache-it-";

/// Removes `tailcache-it-<pid>-*` dirs in `parent` left behind by dead test
/// processes (once per parent and process).
fn cleanup_stale_dirs(parent: &Path) {
    static DONE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    {
        let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
        if done.iter().any(|d| d == parent) {
            return;
        }
        done.push(parent.to_owned());
    }
    let me = std::process::id();
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = fs::remove_dir_all(entry.path());
    }
}

/// A fresh dir `$TMPDIR/tailcache-it-<pid>-<kind>-XXXXXX`, removed on drop.
fn test_dir(kind: &str) -> TempDir {
    test_dir_in(&std::env::temp_dir(), kind)
}

/// A fresh dir `<parent>/tailcache-it-<pid>-<kind>-XXXXXX`, removed on drop.
fn test_dir_in(parent: &Path, kind: &str) -> TempDir {
    cleanup_stale_dirs(parent);
    tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-{kind}-", std::process::id()))
        .tempdir_in(parent)
        .unwrap_or_else(|e| panic!("cannot create temp dir for {kind} in {}: {e}", parent.display()))
}

pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// The last `lines` lines of a (log) file, or a note why there are none.
fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            format!("--- last {} lines of {} ---\n{}", all.len() - start, path.display(), all[start..].join("\n"))
        }
        Err(e) => format!("--- {} unreadable: {e} ---", path.display()),
    }
}

/// `TAILCACHE_IT_VERBOSE=1` prints server start-up timings.
fn verbose() -> bool {
    std::env::var_os("TAILCACHE_IT_VERBOSE").is_some()
}

fn random_password() -> String {
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(24).map(char::from).collect()
}

// ---------------------------------------------------------------------------
// MySQL / MariaDB servers
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    MariaDb,
    Mysql,
}

/// Env var choosing which server the harness starts: `mariadb` (default) or
/// `mysql` (MySQL from the root built by `scripts/mysql-root.sh`).
pub const FLAVOR_ENV: &str = "TAILCACHE_TEST_FLAVOR";
/// Env var naming the MySQL root (as in `scripts/mysql-root.sh`).
pub const MYSQL_ROOT_ENV: &str = "TAILCACHE_MYSQL_ROOT";
const DEFAULT_MYSQL_ROOT: &str = "/var/cache/tailcache/mysql-root";
/// mysqld inside the MySQL root.
const MYSQLD_IN_ROOT: &str = "/usr/sbin/mysqld";

/// The flavour the harness starts (`TAILCACHE_TEST_FLAVOR`). A server from
/// `TAILCACHE_TEST_MYSQL_URL` has its own flavour: see [`MysqlServer::flavor`].
pub fn flavor() -> Flavor {
    static FLAVOR: OnceLock<Flavor> = OnceLock::new();
    *FLAVOR.get_or_init(|| match std::env::var(FLAVOR_ENV) {
        Err(std::env::VarError::NotPresent) => Flavor::MariaDb,
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" | "mariadb" => Flavor::MariaDb,
            "mysql" => Flavor::Mysql,
            other => panic!("{FLAVOR_ENV}={other:?}: expected `mariadb` or `mysql`"),
        },
        Err(e) => panic!("{FLAVOR_ENV}: {e}"),
    })
}

/// The MySQL root (`TAILCACHE_MYSQL_ROOT`, default
/// /var/cache/tailcache/mysql-root); panics naming `scripts/mysql-root.sh`
/// when it holds no mysqld. Never falls back to MariaDB.
fn mysql_root() -> PathBuf {
    let root = std::env::var_os(MYSQL_ROOT_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MYSQL_ROOT));
    let mysqld = root.join(MYSQLD_IN_ROOT.trim_start_matches('/'));
    if !mysqld.is_file() {
        panic!(
            "{FLAVOR_ENV}=mysql but there is no MySQL root at {} ({} is missing): build it with \
             `sudo scripts/mysql-root.sh` (or point {MYSQL_ROOT_ENV} at one)",
            root.display(),
            mysqld.display()
        );
    }
    root
}

struct PrivateProc {
    child: Mutex<Child>,
    err_log: PathBuf,
    /// How the server was started, to start it again on the same port and
    /// datadir ([`PrivateServer::start_again`]).
    relaunch: Relaunch,
    // Dropped after the child is killed (see `Drop for MysqlServer`).
    dir: TempDir,
}

/// The command line a private server was started with.
struct Relaunch {
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    stdout_log: PathBuf,
}

impl Relaunch {
    fn of(cmd: &Command, stdout_log: &Path) -> Relaunch {
        Relaunch {
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(ToOwned::to_owned).collect(),
            stdout_log: stdout_log.to_owned(),
        }
    }
}

/// A running MySQL/MariaDB server usable as root over TCP.
pub struct MysqlServer {
    pub host: String,
    pub port: u16,
    pub flavor: Flavor,
    pub version: String,
    /// `mysql://root:pw@host:port` (no trailing slash, no path).
    root_base: String,
    /// `?…` query of the external URL (empty for private servers).
    root_query: String,
    proc_: Option<PrivateProc>,
}

impl std::fmt::Debug for MysqlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlServer")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("flavor", &self.flavor)
            .field("version", &self.version)
            .field("private", &self.is_private())
            .finish()
    }
}

/// A database plus a least-privilege user for tailcache in it.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    pub user: String,
    pub password: String,
    /// tailcache user's URL, including the database.
    pub url: String,
    /// root URL, including the database.
    pub root_url: String,
    /// Unique per `create_db` call (>= 1000), for tailcache's replica server id.
    pub server_id: u32,
}

impl TestDb {
    pub async fn root_conn(&self) -> mysql_async::Conn {
        connect(&self.root_url).await
    }
}

fn conn_opts(url: &str) -> mysql_async::Opts {
    let opts = mysql_async::Opts::from_url(url).unwrap_or_else(|e| panic!("bad MySQL URL {url:?}: {e}"));
    // Stay on TCP: with 127.0.0.1 mysql_async would otherwise switch to the
    // server's unix socket, which is a different account host (localhost).
    mysql_async::OptsBuilder::from_opts(opts).prefer_socket(false).into()
}

async fn try_connect(url: &str) -> Result<mysql_async::Conn, mysql_async::Error> {
    match mysql_async::Conn::new(conn_opts(url)).await {
        // A server started with --require-secure-transport=ON (the TLS
        // tests; MySQL says 3159, MariaDB 1045): the same login over TLS,
        // certificate not verified.
        Err(mysql_async::Error::Server(e)) if e.code == 3159 || e.code == 1045 => {
            let tls = mysql_async::SslOpts::default().with_danger_accept_invalid_certs(true);
            mysql_async::Conn::new(mysql_async::OptsBuilder::from_opts(conn_opts(url)).ssl_opts(tls))
                .await
                .map_err(|_| mysql_async::Error::Server(e))
        }
        other => other,
    }
}

async fn connect(url: &str) -> mysql_async::Conn {
    try_connect(url).await.unwrap_or_else(|e| panic!("cannot connect to {}: {e}", redact(url)))
}

fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(s, r)| r.rsplit_once('@').map(|(ui, h)| (s, ui, h))) {
        Some((scheme, userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

fn sanitize_ident(hint: &str, max: usize) -> String {
    let s: String =
        hint.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).take(max).collect();
    if s.is_empty() { "db".into() } else { s }
}

impl MysqlServer {
    /// The server process's pid, for a private server (benchmarks read its
    /// threads' CPU time).
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.proc_.as_ref().map(|p| p.child.lock().unwrap_or_else(|e| e.into_inner()).id())
    }

    /// `mysql://root:pw@127.0.0.1:port/db` (`db` empty when `None`).
    pub fn root_url(&self, db: Option<&str>) -> String {
        format!("{}/{}{}", self.root_base, db.unwrap_or(""), self.root_query)
    }

    pub async fn root_conn(&self, db: Option<&str>) -> mysql_async::Conn {
        connect(&self.root_url(db)).await
    }

    /// false when `TAILCACHE_TEST_MYSQL_URL` was used.
    pub fn is_private(&self) -> bool {
        self.proc_.is_some()
    }

    /// Creates a fresh database `t_<hint>_<n>` and a user `u_<hint>_<n>` with
    /// exactly what tailcache needs: REPLICATION SLAVE, REPLICATION CLIENT on
    /// `*.*` and SELECT on the database, plus LOCK TABLES on it on MySQL
    /// (its snapshot reads the start position under `LOCK TABLES … READ`, and
    /// `tailcache check` asks for it there). Write through root.
    pub async fn create_db(&self, hint: &str) -> TestDb {
        let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
        // A shared external server may be used by concurrent runs: make names
        // and replica ids unique across processes too.
        let (suffix, server_id) = if self.is_private() {
            (format!("{n}"), 1000 + n)
        } else {
            let pid = std::process::id();
            (format!("{n}_p{pid}"), 1000 + (pid % 1_000_000) * 1000 + n % 1000)
        };
        let name = format!("t_{}_{suffix}", sanitize_ident(hint, 40));
        // MySQL user names are limited to 32 characters.
        let user = format!("u_{}_{suffix}", sanitize_ident(hint, 29usize.saturating_sub(suffix.len())));
        let password = random_password();
        let mut conn = self.root_conn(None).await;
        let stmts = [
            format!("DROP DATABASE IF EXISTS `{name}`"),
            format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"),
            format!("DROP USER IF EXISTS '{user}'@'%'"),
            format!("CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"),
            format!("GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}'@'%'"),
            match self.flavor {
                Flavor::MariaDb => format!("GRANT SELECT ON `{name}`.* TO '{user}'@'%'"),
                Flavor::Mysql => format!("GRANT SELECT, LOCK TABLES ON `{name}`.* TO '{user}'@'%'"),
            },
        ];
        for sql in &stmts {
            conn.query_drop(sql)
                .await
                .unwrap_or_else(|e| panic!("create_db({hint:?}): `{}` failed: {e}", sql.replace(&password, "***")));
        }
        let _ = conn.disconnect().await;
        TestDb {
            url: format!("mysql://{user}:{password}@{}:{}/{name}", self.host, self.port),
            root_url: self.root_url(Some(&name)),
            name,
            user,
            password,
            server_id,
        }
    }

    fn err_log_tail(&self) -> String {
        match &self.proc_ {
            Some(p) => tail(&p.err_log, 40),
            None => "(external server: no error log)".into(),
        }
    }
}

impl Drop for MysqlServer {
    fn drop(&mut self) {
        if let Some(p) = &self.proc_ {
            let mut child = p.child.lock().unwrap_or_else(|e| e.into_inner());
            let _ = child.kill();
            let _ = child.wait();
        }
        // `proc_.dir` (the datadir) is removed when the field drops.
    }
}

// Statics are never dropped: `cleanup_at_exit` kills the shared server and
// removes these dirs on a normal exit; after an abort the next run removes
// them as stale (and PDEATHSIG has already killed the server).
static SHARED_SERVER: OnceLock<Result<MysqlServer, String>> = OnceLock::new();
static TEMPLATE: OnceLock<Result<(TempDir, PathBuf), String>> = OnceLock::new();

fn register_exit_cleanup() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: registering a plain extern "C" fn; it runs at process::exit.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
    });
}

extern "C" fn cleanup_at_exit() {
    if let Some(Ok(server)) = SHARED_SERVER.get()
        && let Some(p) = &server.proc_
    {
        if let Ok(mut child) = p.child.try_lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(p.dir.path());
    }
    for t in [&TEMPLATE, &MARIADB_TEMPLATE] {
        if let Some(Ok((dir, _))) = t.get() {
            let _ = fs::remove_dir_all(dir.path());
        }
    }
}

/// The server shared by all tests of this binary (started on first use): a
/// private MariaDB or MySQL as chosen by `TAILCACHE_TEST_FLAVOR` (see
/// [`flavor`]), or the server from `TAILCACHE_TEST_MYSQL_URL`, which wins.
/// One connection of `SHOW PROCESSLIST`, seen by root.
#[allow(dead_code)]
#[derive(Debug, Clone)]
pub struct Process {
    pub id: u64,
    pub user: String,
    pub command: String,
    pub state: String,
}

/// The server's connections, by `SHOW PROCESSLIST`: unlike
/// `information_schema.PROCESSLIST`, it does not fail on MySQL when another
/// session's statement text is not valid UTF-8 (error 3854), which other
/// tests' statements can be.
#[allow(dead_code)]
pub async fn processlist(conn: &mut mysql_async::Conn) -> Vec<Process> {
    use mysql_async::prelude::Queryable;
    let rows: Vec<mysql_async::Row> = conn.query("SHOW PROCESSLIST").await.expect("SHOW PROCESSLIST");
    let text = |r: &mysql_async::Row, name: &str| {
        r.get_opt::<Option<Vec<u8>>, _>(name)
            .and_then(Result::ok)
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    rows.iter()
        .map(|r| Process {
            id: r.get_opt::<u64, _>("Id").and_then(Result::ok).unwrap_or(0),
            user: text(r, "User"),
            command: text(r, "Command"),
            state: text(r, "State"),
        })
        .collect()
}

pub fn server() -> &'static MysqlServer {
    let res = SHARED_SERVER.get_or_init(|| {
        register_exit_cleanup();
        std::panic::catch_unwind(|| match std::env::var(EXTERNAL_URL_ENV) {
            Ok(url) if !url.trim().is_empty() => external_server(url.trim()),
            _ => start_server(&[], "shared"),
        })
        .map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into())
        })
    });
    match res {
        Ok(s) => s,
        Err(msg) => panic!("the shared test MySQL server could not be started: {msg}"),
    }
}

fn external_server(url: &str) -> MysqlServer {
    let rest = url
        .strip_prefix("mysql://")
        .unwrap_or_else(|| panic!("{EXTERNAL_URL_ENV} must start with mysql://, got {:?}", redact(url)));
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = before_query.split('/').next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => {
            (h.to_owned(), p.parse().unwrap_or_else(|_| panic!("bad port in {EXTERNAL_URL_ENV}={:?}", redact(url))))
        }
        None => (hostport.to_owned(), 3306),
    };
    let root_base = format!("mysql://{authority}");
    let probe_url = format!("{root_base}/{query}");
    let version = block_on(async {
        let mut conn = try_connect(&probe_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {EXTERNAL_URL_ENV}={}: {e}", redact(url)));
        let v: String = conn.query_first("SELECT VERSION()").await.expect("SELECT VERSION()").expect("a version row");
        let _ = conn.disconnect().await;
        v
    });
    let flavor = if version.to_ascii_lowercase().contains("mariadb") { Flavor::MariaDb } else { Flavor::Mysql };
    MysqlServer { host, port, flavor, version, root_base, root_query: query, proc_: None }
}

/// A separate server of the chosen flavour, killed and its dir removed on drop.
pub struct PrivateServer {
    server: MysqlServer,
}

impl PrivateServer {
    pub fn server(&self) -> &MysqlServer {
        &self.server
    }

    /// The tail of its error log (for assertion messages).
    pub fn error_log_tail(&self) -> String {
        self.server.err_log_tail()
    }

    /// Shuts the server down cleanly (SIGTERM) and waits for it to exit;
    /// [`PrivateServer::start_again`] brings it back on the same port.
    pub fn stop(&self) {
        let p = self.server.proc_.as_ref().expect("a private server has its process");
        let mut child = p.child.lock().unwrap_or_else(|e| e.into_inner());
        if child.try_wait().expect("try_wait server").is_some() {
            return;
        }
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        while child.try_wait().expect("try_wait server").is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not stop within {SERVER_START_TIMEOUT:?} of SIGTERM\n{}", tail(&p.err_log, 40));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts a server stopped by [`PrivateServer::stop`] again, same
    /// datadir, port and options, and returns the instant it was first seen
    /// accepting connections (its protocol greeting, polled every 2 ms).
    pub fn start_again(&self) -> Instant {
        let p = self.server.proc_.as_ref().expect("a private server has its process");
        let mut child = p.child.lock().unwrap_or_else(|e| e.into_inner());
        assert!(child.try_wait().expect("try_wait server").is_some(), "start_again: the server is still running");
        let r = &p.relaunch;
        let mut cmd = Command::new(&r.program);
        cmd.args(&r.args)
            .stdin(Stdio::null())
            .stdout(fs::File::options().append(true).open(&r.stdout_log).expect("open stdout.log"))
            .stderr(fs::File::options().append(true).open(&r.stdout_log).expect("open stdout.log"));
        *child = spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot start the server again: {e}"));
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if mysql_greets(self.server.port) {
                return Instant::now();
            }
            if let Some(status) = child.try_wait().expect("try_wait server") {
                panic!("the server exited with {status} when started again\n{}", tail(&p.err_log, 40));
            }
            if Instant::now() >= deadline {
                panic!(
                    "the server did not accept connections within {SERVER_START_TIMEOUT:?} of starting again\n{}",
                    tail(&p.err_log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Deref for PrivateServer {
    type Target = MysqlServer;
    fn deref(&self) -> &MysqlServer {
        &self.server
    }
}

/// Starts a separate server of the chosen flavour ([`flavor`], even when
/// `TAILCACHE_TEST_MYSQL_URL` is set) with the same defaults as
/// [`server()`], with `extra_args` appended (later options override earlier
/// ones). Pass only options both MariaDB and MySQL understand, or branch on
/// [`flavor`].
pub fn start_private_server(extra_args: &[&str]) -> PrivateServer {
    PrivateServer { server: start_server(extra_args, "private") }
}

fn start_server(extra_args: &[&str], kind: &str) -> MysqlServer {
    match flavor() {
        Flavor::MariaDb => start_mariadb(extra_args, kind),
        Flavor::Mysql => start_mysql(extra_args, kind),
    }
}

/// A freshly initialised, never started datadir of the chosen flavour.
/// Initialising takes seconds (`mariadb-install-db` is fsync-bound, `mysqld
/// --initialize-insecure` creates the dictionary), so it runs once per test
/// process and every instance starts from a copy.
fn template_datadir() -> &'static Path {
    let res = TEMPLATE.get_or_init(|| {
        register_exit_cleanup();
        match flavor() {
            Flavor::MariaDb => mariadb_template(),
            Flavor::Mysql => mysql_template(&mysql_root()),
        }
    });
    match res {
        Ok((_, datadir)) => datadir,
        Err(e) => panic!("{e}"),
    }
}

fn mariadb_template() -> Result<(TempDir, PathBuf), String> {
    let dir = test_dir("template");
    let datadir = dir.path().join("data");
    let install_log = dir.path().join("install.log");
    let tmpdir = dir.path().join("tmp");
    fs::create_dir(&tmpdir).map_err(|e| format!("create {}: {e}", tmpdir.display()))?;
    let out = Command::new(MARIADB_INSTALL_DB)
        .arg("--no-defaults")
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db")
        .arg("--user=root")
        .arg(format!("--datadir={}", datadir.display()))
        // Passed through to the bootstrap mariadbd; must match the
        // server's value or every start resizes the redo log.
        .arg("--innodb-log-file-size=48M")
        // Own tmpdir: other processes cleaning /tmp must not break the bootstrap.
        .arg(format!("--tmpdir={}", tmpdir.display()))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {MARIADB_INSTALL_DB} (install the mariadb-server package): {e}"))?;
    let _ = fs::write(&install_log, [&out.stdout[..], &out.stderr[..]].concat());
    if !out.status.success() {
        return Err(format!("{MARIADB_INSTALL_DB} failed ({}):\n{}", out.status, tail(&install_log, 40)));
    }
    Ok((dir, datadir))
}

/// `path` (below `root`) as mysqld in the chroot sees it.
fn inner_path(root: &Path, path: &Path) -> String {
    let rel = path
        .strip_prefix(root)
        .unwrap_or_else(|_| panic!("{} is not inside the MySQL root {}", path.display(), root.display()));
    format!("/{}", rel.display())
}

/// mysqld's options for a server in `inner` (a dir inside the root holding
/// data/ and tmp/), as verified with scripts/mysql-start.sh. Every MySQL test
/// server compresses its binlog transactions, so the whole MySQL run goes
/// through TRANSACTION_PAYLOAD events.
fn mysqld_args(inner: &str, port: u16) -> Vec<String> {
    let mut args: Vec<String> = [
        "--no-defaults".to_owned(),
        "--user=root".to_owned(),
        format!("--datadir={inner}/data"),
        format!("--tmpdir={inner}/tmp"),
        format!("--secure-file-priv={inner}/tmp"),
        format!("--socket={inner}/mysql.sock"),
        format!("--pid-file={inner}/mysqld.pid"),
        format!("--log-error={inner}/error.log"),
        "--bind-address=127.0.0.1".to_owned(),
        format!("--port={port}"),
    ]
    .into();
    args.extend(
        [
            "--mysqlx=OFF",
            "--server-id=1",
            "--log-bin=binlog",
            "--binlog-format=ROW",
            "--binlog-row-image=FULL",
            "--binlog-row-metadata=FULL",
            "--gtid-mode=ON",
            "--enforce-gtid-consistency=ON",
            "--binlog-transaction-compression=ON",
            "--performance-schema=OFF",
            "--innodb-buffer-pool-size=32M",
            "--innodb-log-buffer-size=4M",
            "--innodb-redo-log-capacity=32M",
            "--key-buffer-size=1M",
            "--temptable-max-ram=32M",
            "--table-open-cache=256",
            "--max-connections=100",
            "--innodb-doublewrite=OFF",
            "--innodb-flush-log-at-trx-commit=2",
            "--sync-binlog=0",
        ]
        .map(str::to_owned),
    );
    args
}

fn mysql_template(root: &Path) -> Result<(TempDir, PathBuf), String> {
    let started = Instant::now();
    let dir = test_dir_in(&root.join("tmp"), "template");
    let inner = inner_path(root, dir.path());
    let datadir = dir.path().join("data");
    let tmpdir = dir.path().join("tmp");
    fs::create_dir(&tmpdir).map_err(|e| format!("create {}: {e}", tmpdir.display()))?;
    let init_log = dir.path().join("init.log");
    let out = Command::new("chroot")
        .arg(root)
        .arg(MYSQLD_IN_ROOT)
        .args(mysqld_args(&inner, 0))
        .arg(format!("--log-error={inner}/init.log"))
        .arg("--initialize-insecure")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run chroot {} {MYSQLD_IN_ROOT}: {e}", root.display()))?;
    if !out.status.success() {
        return Err(format!(
            "mysqld --initialize-insecure in {} failed ({}):\n{}\n{}{}",
            root.display(),
            out.status,
            tail(&init_log, 40),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Each copy gets a fresh server_uuid.
    let _ = fs::remove_file(datadir.join("auto.cnf"));
    if verbose() {
        eprintln!("harness: mysqld --initialize-insecure took {:?}", started.elapsed());
    }
    Ok((dir, datadir))
}

fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The MariaDB template, whatever the flavour: a MySQL run still starts a
/// private MariaDB for tests whose server must read host files (TLS keys;
/// MySQL runs in a chroot that cannot see them).
static MARIADB_TEMPLATE: OnceLock<Result<(TempDir, PathBuf), String>> = OnceLock::new();

fn mariadb_template_datadir() -> &'static Path {
    if flavor() == Flavor::MariaDb {
        return template_datadir();
    }
    let res = MARIADB_TEMPLATE.get_or_init(|| {
        register_exit_cleanup();
        mariadb_template()
    });
    match res {
        Ok((_, datadir)) => datadir,
        Err(e) => panic!("{e}"),
    }
}

/// A private MariaDB whatever the flavour (see [`mariadb_template_datadir`]).
pub fn start_private_mariadb(extra_args: &[&str]) -> PrivateServer {
    PrivateServer { server: start_mariadb(extra_args, "private") }
}

fn start_mariadb(extra_args: &[&str], kind: &str) -> MysqlServer {
    let started = Instant::now();
    let dir = test_dir(&format!("mariadb-{kind}"));
    let datadir = dir.path().join("data");
    copy_dir(mariadb_template_datadir(), &datadir)
        .unwrap_or_else(|e| panic!("cannot copy the template datadir to {}: {e}", datadir.display()));
    let installed = started.elapsed();
    let err_log = dir.path().join("error.log");
    let stdout_log = dir.path().join("stdout.log");
    let socket = dir.path().join("mysql.sock");
    let tmpdir = dir.path().join("tmp");
    fs::create_dir(&tmpdir).unwrap_or_else(|e| panic!("create {}: {e}", tmpdir.display()));
    let mut attempt = 0;
    let (child, port, relaunch) = loop {
        attempt += 1;
        let port = free_port();
        let mut cmd = Command::new(MARIADBD);
        cmd.arg("--no-defaults")
            .arg("--user=root")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--pid-file={}", dir.path().join("mariadbd.pid").display()))
            .arg(format!("--log-error={}", err_log.display()))
            .arg(format!("--tmpdir={}", tmpdir.display()))
            .args([
                "--log-bin=mysql-bin",
                "--binlog-format=ROW",
                "--binlog-row-image=FULL",
                "--binlog-row-metadata=FULL",
                "--server-id=1",
                "--skip-name-resolve",
                "--host-cache-size=0",
                "--max-connect-errors=1000000",
                "--character-set-server=utf8mb4",
                "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=48M",
                "--innodb-flush-log-at-trx-commit=2",
                "--innodb-buffer-pool-load-at-startup=OFF",
                "--innodb-buffer-pool-dump-at-shutdown=OFF",
                "--sync-binlog=0",
                "--max-connections=500",
                "--max-allowed-packet=64M",
            ])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_log).expect("create stdout.log"))
            .stderr(fs::File::options().append(true).open(&stdout_log).expect("open stdout.log"));
        let relaunch = Relaunch::of(&cmd, &stdout_log);
        let mut child = spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot spawn {MARIADBD}: {e}"));
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        let failure = loop {
            if mysql_greets(port) {
                break None;
            }
            if let Some(status) = child.try_wait().expect("try_wait mariadbd") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "timed out after {SERVER_START_TIMEOUT:?} waiting for mariadbd ({kind}) to accept \
                     connections on 127.0.0.1:{port}\n{}\n{}",
                    tail(&err_log, 40),
                    tail(&stdout_log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        match failure {
            None => {
                if verbose() {
                    eprintln!(
                        "harness: mariadbd ({kind}) install {installed:?}, greeting after {:?}",
                        started.elapsed()
                    );
                }
                break (child, port, relaunch);
            }
            Some(status) => {
                let log = fs::read_to_string(&err_log).unwrap_or_default()
                    + &fs::read_to_string(&stdout_log).unwrap_or_default();
                let port_taken = log.contains("Address already in use") || log.contains("Bind on TCP/IP port");
                if port_taken && attempt < 10 {
                    // Someone grabbed the port between our probe and bind: try another one.
                    let _ = fs::remove_file(&err_log);
                    continue;
                }
                panic!(
                    "mariadbd ({kind}) exited with {status} before accepting connections on 127.0.0.1:{port}\n{}\n{}",
                    tail(&err_log, 40),
                    tail(&stdout_log, 20)
                );
            }
        }
    };

    let proc_ = PrivateProc { child: Mutex::new(child), err_log, relaunch, dir };
    secure_root(proc_, port, Flavor::MariaDb, kind, started)
}

/// Sets a random root password on a fresh server (root has none yet) and
/// adds root@'%', so that tests log in over TCP with a password like users do.
fn secure_root(proc_: PrivateProc, port: u16, flavor: Flavor, kind: &str, started: Instant) -> MysqlServer {
    let password = random_password();
    let mut server = MysqlServer {
        host: "127.0.0.1".into(),
        port,
        flavor,
        version: String::new(),
        root_base: format!("mysql://root:{password}@127.0.0.1:{port}"),
        root_query: String::new(),
        proc_: Some(proc_),
    };
    let mut stmts = vec![
        format!("CREATE USER 'root'@'%' IDENTIFIED BY '{password}'"),
        "GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION".to_owned(),
        format!("ALTER USER 'root'@'localhost' IDENTIFIED BY '{password}'"),
    ];
    match flavor {
        // mariadb-install-db also makes root@127.0.0.1; MySQL's
        // --initialize-insecure only root@localhost (and needs no FLUSH).
        Flavor::MariaDb => stmts.extend([
            format!("ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY '{password}'"),
            "FLUSH PRIVILEGES".to_owned(),
        ]),
        Flavor::Mysql => {}
    }
    let bootstrap_url = format!("mysql://root@127.0.0.1:{port}/");
    let setup = block_on(async {
        let mut conn =
            try_connect(&bootstrap_url).await.map_err(|e| format!("connect as root without password: {e}"))?;
        let version: String = conn
            .query_first("SELECT VERSION()")
            .await
            .map_err(|e| format!("SELECT VERSION(): {e}"))?
            .ok_or("SELECT VERSION() returned no row")?;
        for sql in &stmts {
            conn.query_drop(sql).await.map_err(|e| format!("`{}`: {e}", sql.replace(&password, "***")))?;
        }
        let _ = conn.disconnect().await;
        Ok::<_, String>(version)
    });
    let what = match flavor {
        Flavor::MariaDb => "mariadbd",
        Flavor::Mysql => "mysqld",
    };
    match setup {
        Ok(v) => server.version = v,
        Err(e) => panic!("root setup of {what} ({kind}) on port {port} failed: {e}\n{}", server.err_log_tail()),
    }
    // The root password works (on MySQL: caching_sha2_password over plain
    // TCP, i.e. RSA key exchange, since the cache is still cold).
    let check = block_on(async {
        let mut conn = try_connect(&server.root_url(None)).await?;
        conn.query_drop("DO 1").await?;
        conn.disconnect().await
    });
    if let Err(e) = check {
        panic!("{what} ({kind}) on port {port}: root cannot log in with its new password: {e}");
    }
    if verbose() {
        eprintln!("harness: {what} ({kind}) {} ready on port {port} in {:?}", server.version, started.elapsed());
    }
    server
}

/// Starts mysqld from the MySQL root, chrooted, on a free port.
fn start_mysql(extra_args: &[&str], kind: &str) -> MysqlServer {
    let started = Instant::now();
    let root = mysql_root();
    let template = template_datadir();
    let dir = test_dir_in(&root.join("tmp"), &format!("mysql-{kind}"));
    let inner = inner_path(&root, dir.path());
    let datadir = dir.path().join("data");
    copy_dir(template, &datadir)
        .unwrap_or_else(|e| panic!("cannot copy the template datadir to {}: {e}", datadir.display()));
    let installed = started.elapsed();
    let tmpdir = dir.path().join("tmp");
    fs::create_dir(&tmpdir).unwrap_or_else(|e| panic!("create {}: {e}", tmpdir.display()));
    let err_log = dir.path().join("error.log");
    let stdout_log = dir.path().join("stdout.log");
    let our_datadir = format!("{inner}/data/");
    let mut attempt = 0;
    let (child, port, relaunch) = loop {
        attempt += 1;
        let port = free_port();
        let _ = fs::remove_file(&err_log);
        let mut cmd = Command::new("chroot");
        cmd.arg(&root)
            .arg(MYSQLD_IN_ROOT)
            .args(mysqld_args(&inner, port))
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_log).expect("create stdout.log"))
            .stderr(fs::File::options().append(true).open(&stdout_log).expect("open stdout.log"));
        // chroot execs mysqld: same pid, PDEATHSIG kept (neither is setuid and
        // --user=root makes mysqld keep its credentials).
        let relaunch = Relaunch::of(&cmd, &stdout_log);
        let mut child =
            spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot spawn chroot {} mysqld: {e}", root.display()));
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        let failure = loop {
            // Ours only if it serves our datadir: a server of another test
            // run may hold a port we believed free.
            if mysql_greets(port) {
                let answer = block_on(async {
                    let mut conn = try_connect(&format!("mysql://root@127.0.0.1:{port}/")).await.ok()?;
                    let d: Option<String> = conn.query_first("SELECT @@datadir").await.ok()?;
                    let _ = conn.disconnect().await;
                    d
                });
                match answer {
                    Some(d) if d == our_datadir => break None,
                    Some(_) | None => {}
                }
            }
            if let Some(status) = child.try_wait().expect("try_wait mysqld") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "timed out after {SERVER_START_TIMEOUT:?} waiting for mysqld ({kind}) to serve {our_datadir} on \
                     127.0.0.1:{port}\n{}\n{}",
                    tail(&err_log, 40),
                    tail(&stdout_log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match failure {
            None => break (child, port, relaunch),
            Some(status) => {
                let log = fs::read_to_string(&err_log).unwrap_or_default()
                    + &fs::read_to_string(&stdout_log).unwrap_or_default();
                let port_taken = log.contains("Address already in use")
                    || log.contains("Do you already have another mysqld server running on port");
                if port_taken && attempt < 10 {
                    continue;
                }
                panic!(
                    "mysqld ({kind}, chroot {}) exited with {status} before accepting connections on \
                     127.0.0.1:{port}\n{}\n{}",
                    root.display(),
                    tail(&err_log, 40),
                    tail(&stdout_log, 20)
                );
            }
        }
    };
    if verbose() {
        eprintln!("harness: mysqld ({kind}) copy {installed:?}, serving after {:?}", started.elapsed());
    }
    let proc_ = PrivateProc { child: Mutex::new(child), err_log, relaunch, dir };
    secure_root(proc_, port, Flavor::Mysql, kind, started)
}

/// True when something on `port` sends a MySQL protocol-10 greeting.
fn mysql_greets(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = [0u8; 5];
    // 3-byte length, 1-byte sequence id, then protocol version 10 (0xff = error packet).
    s.read_exact(&mut head).is_ok() && head[4] == 10
}

// ---------------------------------------------------------------------------
// memcached
// ---------------------------------------------------------------------------

/// An own memcached instance on a free port, killed on drop.
pub struct Memcached {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    dir: TempDir,
}

impl Memcached {
    pub fn start() -> Memcached {
        Self::start_with(&[])
    }

    /// Like [`Memcached::start`] with extra arguments, e.g. `&["-I", "2m"]`.
    pub fn start_with(args: &[&str]) -> Memcached {
        let mut m = Memcached {
            child: None,
            port: 0,
            args: args.iter().map(|s| s.to_string()).collect(),
            dir: test_dir("memcached"),
        };
        m.launch(None);
        m
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts again, empty, on the same port.
    pub fn restart_empty(&mut self) {
        self.stop();
        self.launch(Some(self.port));
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("memcached.log")
    }

    /// Starts memcached on `fixed_port` (retrying until it binds) or on a
    /// free port (retrying with another one if it was taken).
    fn launch(&mut self, fixed_port: Option<u16>) {
        let deadline = Instant::now() + MEMCACHED_START_TIMEOUT;
        loop {
            let port = fixed_port.unwrap_or_else(free_port);
            let log = self.log_path();
            let mut cmd = Command::new(MEMCACHED);
            cmd.args(["-U", "0", "-l", "127.0.0.1", "-p", &port.to_string(), "-m", "64", "-t", "2", "-u", "root"])
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(fs::File::create(&log).expect("create memcached.log"))
                .stderr(fs::File::options().append(true).open(&log).expect("open memcached.log"));
            let mut child = spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot spawn {MEMCACHED}: {e}"));
            let exited = loop {
                if memcached_answers(port) {
                    // Make sure it is *our* child answering, not a squatter.
                    match child.try_wait() {
                        Ok(None) => {
                            self.child = Some(child);
                            self.port = port;
                            return;
                        }
                        _ => break true,
                    }
                }
                if child.try_wait().expect("try_wait memcached").is_some() {
                    break true;
                }
                if Instant::now() >= deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let _ = child.kill();
            let _ = child.wait();
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {MEMCACHED_START_TIMEOUT:?} waiting for memcached to answer `version` on \
                     127.0.0.1:{port} (exited early: {exited})\n{}",
                    tail(&log, 20)
                );
            }
            // Port taken (e.g. the old instance's socket still lingering): retry.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port))
            .unwrap_or_else(|e| panic!("cannot connect to memcached at {}: {e}", self.addr()));
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("set_read_timeout");
        s.set_write_timeout(Some(Duration::from_secs(5))).expect("set_write_timeout");
        s
    }

    /// Blocking text-protocol `get`: `Some((value, flags))` or `None` on a miss.
    pub fn get_raw(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let mut s = self.connect();
        s.write_all(format!("get {key}\r\n").as_bytes()).expect("write get");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("read get response");
        if line == "END\r\n" {
            return None;
        }
        let parts: Vec<&str> = line.trim_end().split(' ').collect();
        match parts.as_slice() {
            ["VALUE", k, flags, len, ..] if *k == key => {
                let flags: u32 = flags.parse().expect("flags");
                let len: usize = len.parse().expect("length");
                let mut data = vec![0u8; len + 2];
                r.read_exact(&mut data).expect("read value");
                data.truncate(len);
                let mut end = String::new();
                r.read_line(&mut end).expect("read END");
                assert_eq!(end, "END\r\n", "unexpected memcached reply after value");
                Some((data, flags))
            }
            _ => panic!("unexpected memcached reply to `get {key}`: {line:?}"),
        }
    }

    /// Every key the server holds that starts with `prefix`, with its value
    /// and flags, from `lru_crawler metadump all` then pipelined `get`s
    /// (keys this test suite writes need no URL-decoding beyond `%XX`).
    pub fn dump(&self, prefix: &str) -> std::collections::BTreeMap<String, (Vec<u8>, u32)> {
        // One crawl at a time per server: tailcache's orphan sweep may hold
        // it (`BUSY`) for a moment.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.try_dump(prefix) {
                Some(m) => return m,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                None => panic!("memcached at {} stayed BUSY with another crawl for 30 s", self.addr()),
            }
        }
    }

    fn try_dump(&self, prefix: &str) -> Option<std::collections::BTreeMap<String, (Vec<u8>, u32)>> {
        let mut s = self.connect();
        s.write_all(b"lru_crawler metadump all\r\n").expect("write metadump");
        let mut r = BufReader::new(s.try_clone().expect("dup memcached socket"));
        let mut keys = Vec::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("read metadump");
            let line = line.trim_end();
            if line == "END" {
                break;
            }
            if line.starts_with("BUSY") {
                return None;
            }
            if line.starts_with("ERROR") || line.starts_with("CLIENT_ERROR") {
                panic!("memcached at {} refused `lru_crawler metadump all`: {line}", self.addr());
            }
            let Some(enc) = line.strip_prefix("key=").and_then(|l| l.split(' ').next()) else { continue };
            let mut key = Vec::new();
            tailcache::sink::enumerate::url_decode(enc.as_bytes(), &mut key);
            let key = String::from_utf8_lossy(&key).into_owned();
            if key.starts_with(prefix) {
                keys.push(key);
            }
        }
        let mut out = std::collections::BTreeMap::new();
        for chunk in keys.chunks(100) {
            s.write_all(format!("get {}\r\n", chunk.join(" ")).as_bytes()).expect("write get");
            loop {
                let mut line = String::new();
                r.read_line(&mut line).expect("read get response");
                if line == "END\r\n" {
                    break;
                }
                let parts: Vec<&str> = line.trim_end().split(' ').collect();
                let ["VALUE", k, flags, len, ..] = parts.as_slice() else {
                    panic!("unexpected memcached reply to a multi-get: {line:?}")
                };
                let len: usize = len.parse().expect("length");
                let mut data = vec![0u8; len + 2];
                r.read_exact(&mut data).expect("read value");
                data.truncate(len);
                out.insert(k.to_string(), (data, flags.parse().expect("flags")));
            }
        }
        Some(out)
    }

    /// The CAS unique of `key` (text-protocol `gets`): it changes whenever
    /// the key is written.
    pub fn cas(&self, key: &str) -> Option<u64> {
        let mut s = self.connect();
        s.write_all(format!("gets {key}\r\n").as_bytes()).expect("write gets");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).expect("read gets response");
        if line == "END\r\n" {
            return None;
        }
        let parts: Vec<&str> = line.trim_end().split(' ').collect();
        match parts.as_slice() {
            ["VALUE", k, _flags, len, cas] if *k == key => {
                let len: usize = len.parse().expect("length");
                let mut data = vec![0u8; len + 2];
                r.read_exact(&mut data).expect("read value");
                Some(cas.parse().expect("cas"))
            }
            _ => panic!("unexpected memcached reply to `gets {key}`: {line:?}"),
        }
    }

    /// Blocking text-protocol `set` (no expiry); panics unless `STORED`.
    pub fn set_raw(&self, key: &str, value: &[u8], flags: u32) {
        let mut s = self.connect();
        let mut req = format!("set {key} {flags} 0 {}\r\n", value.len()).into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
        s.write_all(&req).expect("write set");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("read set response");
        assert_eq!(line, "STORED\r\n", "memcached `set {key}` failed");
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        self.stop();
    }
}

fn memcached_answers(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"version\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("VERSION ")
}

// ---------------------------------------------------------------------------
// The tailcache binary
// ---------------------------------------------------------------------------

/// The binary cargo built, or `TAILCACHE_BIN` (e.g. to bench an older
/// build against the current one).
pub fn tailcache_bin() -> PathBuf {
    std::env::var_os("TAILCACHE_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tailcache")), PathBuf::from)
}

/// Runs the binary to completion, e.g. `run_tailcache(&["check", "--config", p])`.
pub fn run_tailcache(args: &[&str]) -> Output {
    Command::new(tailcache_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", tailcache_bin()))
}

/// A running `tailcache run --config FILE` child process.
pub struct Daemon {
    child: Child,
    config_path: PathBuf,
    log_path: PathBuf,
    dir: TempDir,
}

impl Daemon {
    pub fn start(config_toml: &str) -> Daemon {
        Self::start_args(config_toml, &[])
    }

    /// Without an `[admin]` section the config gets one on a free port
    /// (the default 127.0.0.1:9187 would clash between parallel tests).
    pub fn start_args(config_toml: &str, extra_args: &[&str]) -> Daemon {
        Self::start_with_env(config_toml, extra_args, &[])
    }

    /// Like [`Daemon::start_args`] with extra environment variables (e.g.
    /// `NOTIFY_SOCKET`, `WATCHDOG_USEC` for the systemd tests).
    pub fn start_with_env(config_toml: &str, extra_args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = test_dir("daemon");
        let config_path = dir.path().join("tailcache.toml");
        let config_toml = if config_toml.contains("[admin]") {
            config_toml.to_owned()
        } else {
            format!("{config_toml}\n[admin]\nlisten = \"127.0.0.1:{}\"\n", free_port())
        };
        fs::write(&config_path, config_toml).expect("write daemon config");
        let log_path = dir.path().join("daemon.log");
        let log = fs::File::create(&log_path).expect("create daemon.log");
        let mut cmd = Command::new(tailcache_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(extra_args)
            .env("RUST_LOG", "info,tailcache=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log);
        let child = spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot spawn {:?}: {e}", tailcache_bin()));
        Daemon { child, config_path, log_path, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and wait.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; SIGKILL and panic if it does not exit in time.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: plain kill(2) on our own, not yet reaped child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + DAEMON_STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait().expect("try_wait daemon").is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill9();
        panic!("tailcache did not exit within {DAEMON_STOP_TIMEOUT:?} of SIGTERM\n{}", tail(&self.log_path, 60));
    }

    /// Exit status if it has exited (reaping it), `None` while running.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait daemon")
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Everything it printed so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", tail(&self.log_path, 200));
        }
    }
}
