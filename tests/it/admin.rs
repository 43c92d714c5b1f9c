//! The admin endpoint, the instance lock and the `resync`/`status` commands,
//! against a real MariaDB and memcached.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;

use crate::harness::{self, Daemon, Memcached, TestDb, free_port, run_tailcache, wait_until};

const SCHEMA: &str = "
CREATE TABLE item (id INT PRIMARY KEY, name VARCHAR(64) NOT NULL) DEFAULT CHARSET=utf8mb4;
INSERT INTO item VALUES (1, 'one'), (2, 'two');
";

const VIEWS: &str = "[[views]]\nname = \"item\"\nkey = \"item:{id}\"\nquery = \"SELECT id, name FROM item\"\n";

const DEADLINE: Duration = Duration::from_secs(30);

fn config(db: &TestDb, state: &Path, mc: &Memcached, admin_port: u16) -> String {
    format!(
        "[mysql]\nurl = \"{url}\"\nserver_id = {sid}\ntables = [\"item\"]\nheartbeat_secs = 0.5\n\n\
         [state]\npath = \"{state}\"\n\n[memcached]\nservers = [\"{mc}\"]\nkey_prefix = \"a:\"\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n{VIEWS}",
        url = db.url,
        sid = db.server_id,
        state = state.display(),
        mc = mc.addr(),
    )
}

async fn setup(hint: &str) -> (TestDb, tempfile::TempDir) {
    let db = harness::server().create_db(hint).await;
    db.root_conn().await.query_drop(SCHEMA).await.unwrap();
    (db, tempfile::tempdir().unwrap())
}

/// One HTTP/1.1 request with `Connection: close`: (status, body). `None`
/// when nothing listens.
pub(crate) fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "unexpected chunked answer: {head}");
    Some((code, body.to_owned()))
}

async fn wait_http(
    port: u16,
    method: &str,
    path: &str,
    what: &str,
    daemon: &Daemon,
    ok: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let r = http(port, method, path);
        if let Some((code, body)) = &r
            && ok(*code, body)
        {
            return body.clone();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last answer {r:?}\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) type Sample = (String, BTreeMap<String, String>, f64);

/// A small parser of the Prometheus text format (0.0.4): every sample
/// line must belong to a family announced by `# TYPE`, with valid labels
/// and value; panics on anything else.
pub(crate) fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line:?}");
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels = BTreeMap::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (k, v) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
                    let end = v.find('"').unwrap_or_else(|| panic!("unterminated label value in {line:?}"));
                    labels.insert(k.to_owned(), v[..end].to_owned());
                    rest = v[end + 1..].strip_prefix(',').unwrap_or(&v[end + 1..]);
                }
                (name, labels)
            }
        };
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample {name} without a # TYPE line");
        out.push((name.to_owned(), labels, value));
    }
    out
}

fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v)))
        .map(|(_, _, v)| v)
        .sum()
}

fn metrics(port: u16) -> Vec<Sample> {
    let (code, body) = http(port, "GET", "/metrics").expect("the admin endpoint answers");
    assert_eq!(code, 200, "{body}");
    parse_prometheus(&body)
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoints_metrics_readiness_and_the_instance_lock() {
    let (db, dir) = setup("admin").await;
    let mut mc = Memcached::start();
    let port = free_port();
    let state = dir.path().join("s.db");
    let cfg = config(&db, &state, &mc, port);
    let daemon = Daemon::start(&cfg);

    wait_http(port, "GET", "/healthz", "/healthz 200", &daemon, |c, _| c == 200).await;
    let body = wait_http(port, "GET", "/status", "consistent after catch-up", &daemon, |c, b| {
        c == 200 && serde_json::from_str::<serde_json::Value>(b).is_ok_and(|v| v["consistent"] == true)
    })
    .await;
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(st["position"].as_str().is_some_and(|p| p.contains(':')), "{st}");
    for k in ["gtid", "lag_seconds", "last_publish", "last_resync", "views", "memcached", "snapshot"] {
        assert!(st.get(k).is_some(), "/status lacks {k}: {st}");
    }
    assert_eq!(st["pid"].as_u64(), Some(u64::from(daemon.pid())));
    wait_http(port, "GET", "/readyz", "/readyz 200", &daemon, |c, _| c == 200).await;

    // A second daemon on the same state is refused at once, naming the
    // state file and the holder's pid.
    let mut second = Daemon::start(&cfg);
    let exit = harness::wait_until_blocking("the second daemon to exit", DEADLINE, || second.try_wait());
    assert_eq!(exit.code(), Some(1), "{}", second.log());
    let log = second.log();
    assert!(log.contains(&format!("pid {}", daemon.pid())), "{log}");
    assert!(log.contains(&state.display().to_string()), "{log}");
    let lock = std::fs::read_to_string(dir.path().join("s.db.lock")).unwrap();
    assert_eq!(lock.trim(), daemon.pid().to_string());

    // Metrics: valid text, and rows/keys counters move with a commit.
    let before = metrics(port);
    let table = format!("{}.item", db.name);
    let rows0 = value(&before, "tailcache_rows_applied_total", Some(("table", &table)));
    let keys0 = value(&before, "tailcache_keys_set_total", Some(("view", "item")));
    assert!(keys0 >= 2.0, "the initial publish set both keys: {keys0}");
    assert_eq!(value(&before, "tailcache_source_connected", None), 1.0);
    let mut conn = db.root_conn().await;
    conn.query_drop("INSERT INTO item VALUES (3, 'three')").await.unwrap();
    let after = wait_until("rows_applied and keys_set to grow", DEADLINE, || async {
        let m = metrics(port);
        let grown = value(&m, "tailcache_rows_applied_total", Some(("table", &table))) > rows0
            && value(&m, "tailcache_keys_set_total", Some(("view", "item"))) > keys0;
        grown.then_some(m)
    })
    .await;
    assert!(value(&after, "tailcache_transactions_applied_total", None) >= 1.0);
    assert!(value(&after, "tailcache_binlog_events_total", None) >= 1.0);
    assert!(value(&after, "tailcache_publish_latency_seconds_count", None) >= 1.0);
    assert!(value(&after, "tailcache_view_compute_seconds_count", Some(("view", "item"))) >= 1.0);

    // `tailcache status` asks the daemon.
    let out = run_tailcache(&["status", "-c", daemon.config_path().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("daemon: pid {}, ready", daemon.pid())), "{stdout}");
    assert!(stdout.contains("consistent"), "{stdout}");

    // memcached down: not ready, with a reason naming it; back: ready.
    mc.stop();
    conn.query_drop("UPDATE item SET name = 'uno' WHERE id = 1").await.unwrap();
    let body = wait_http(port, "GET", "/readyz", "/readyz 503 with memcached down", &daemon, |c, _| c == 503).await;
    assert!(body.contains("memcached"), "{body}");
    assert_eq!(http(port, "GET", "/healthz").map(|r| r.0), Some(200), "still alive while memcached is down");
    mc.restart_empty();
    wait_http(port, "GET", "/readyz", "/readyz 200 after memcached is back", &daemon, |c, _| c == 200).await;

    // POST /resync answers with the report of that resync.
    let (code, body) = http(port, "POST", "/resync").expect("answer");
    assert_eq!(code, 200, "{body}\n{}", daemon.log());
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["trigger"], "admin", "{report}");
    assert!(report["seq"].as_u64().is_some_and(|s| s >= 1), "{report}");
    let m = metrics(port);
    assert!(value(&m, "tailcache_resyncs_total", Some(("trigger", "admin"))) >= 1.0);
    assert!(value(&m, "tailcache_snapshots_total", Some(("reason", "admin"))) >= 1.0);
    assert_eq!(http(port, "POST", "/resync?wait=false").map(|r| r.0), Some(202));
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn resync_without_a_daemon_runs_once_and_signals_nothing() {
    let (db, dir) = setup("oneshot").await;
    let mc = Memcached::start();
    let state = dir.path().join("s.db");
    let cfg_path = dir.path().join("t.toml");
    std::fs::write(&cfg_path, config(&db, &state, &mc, free_port())).unwrap();
    let cfg = cfg_path.to_str().unwrap();

    // A stale pid file naming a live, unrelated process.
    let mut sleeper = std::process::Command::new("sleep").arg("120").spawn().unwrap();
    std::fs::write(dir.path().join("s.db.pid"), format!("{}\n", sleeper.id())).unwrap();

    let out = run_tailcache(&["resync", "-c", cfg]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("no daemon reachable"), "{stderr}");
    assert!(stdout.contains("resync #1 done"), "{stdout}\n{stderr}");
    assert!(mc.get_raw("a:item:1").is_some(), "the one-shot resync published");
    assert!(sleeper.try_wait().unwrap().is_none() && pid_alive(sleeper.id()), "the pid file's process was signalled");

    // Tampered entry: a second one-shot resync repairs it.
    mc.set_raw("a:item:2", b"tampered", 0);
    let out = run_tailcache(&["resync", "-c", cfg]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(mc.get_raw("a:item:2").map(|v| v.0), Some(b"tampered".to_vec()));
    assert!(sleeper.try_wait().unwrap().is_none(), "the pid file's process was signalled");
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    // No daemon, a stored state: the checkpoint, read-only.
    let before = listing(dir.path());
    let out = run_tailcache(&["status", "-c", cfg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("no daemon reachable"), "{stdout}");
    assert!(stdout.contains("position: ") && stdout.contains("consistent: true"), "{stdout}");
    assert_eq!(listing(dir.path()), before, "tailcache status created or removed a file");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_without_daemon_or_state_creates_nothing() {
    let (db, dir) = setup("nostate").await;
    let mc = Memcached::start();
    let state = dir.path().join("sub").join("s.db");
    let cfg_path = dir.path().join("t.toml");
    std::fs::write(&cfg_path, config(&db, &state, &mc, free_port())).unwrap();
    let out = run_tailcache(&["status", "-c", cfg_path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("no daemon reachable") && stdout.contains("does not exist"), "{stdout}");
    assert_eq!(listing(dir.path()), vec![cfg_path.clone()], "tailcache status created a file");
}

/// A TCP proxy in front of the database that the test can take down (every
/// connection cut, new ones refused) and bring back on the same port.
struct Proxy {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
    target: u16,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let mut p = Proxy { port: harness::free_port(), task: None, target };
        p.up().await;
        p
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let target = self.target;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        }));
    }

    /// Aborting the accept loop drops the JoinSet: every proxied
    /// connection is closed and the port refuses new ones.
    fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_database_going_away_and_coming_back() {
    let (db, dir) = setup("ready_db").await;
    let mc = Memcached::start();
    let mut proxy = Proxy::start(harness::server().port).await;
    let mut db_via_proxy = db.clone();
    db_via_proxy.url = db.url.replace(&format!(":{}/", harness::server().port), &format!(":{}/", proxy.port));
    assert_ne!(db_via_proxy.url, db.url, "the daemon must connect through the proxy");
    let admin = harness::free_port();
    let daemon = Daemon::start(&config(&db_via_proxy, &dir.path().join("s.db"), &mc, admin));
    wait_http(admin, "GET", "/readyz", "ready", &daemon, |c, _| c == 200).await;
    proxy.down();
    let why =
        wait_http(admin, "GET", "/readyz", "not ready while the database is away", &daemon, |c, _| c == 503).await;
    assert!(why.contains("source"), "the reason names the source: {why}\ndaemon log:\n{}", daemon.log());
    proxy.up().await;
    wait_http(admin, "GET", "/readyz", "ready again", &daemon, |c, _| c == 200).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_down_at_start_is_reported_and_waited_for() {
    let (db, dir) = setup("down_at_start").await;
    let mc = Memcached::start();
    let mut proxy = Proxy::start(harness::server().port).await;
    proxy.down();
    let mut db_via_proxy = db.clone();
    db_via_proxy.url = db.url.replace(&format!(":{}/", harness::server().port), &format!(":{}/", proxy.port));
    let admin = harness::free_port();
    let daemon = Daemon::start(&config(&db_via_proxy, &dir.path().join("s.db"), &mc, admin));
    // The admin endpoint answers while the start waits for the server.
    let why = wait_http(admin, "GET", "/readyz", "not ready, naming the source", &daemon, |c, b| {
        c == 503 && b.contains("source")
    })
    .await;
    assert!(why.contains("source"), "{why}");
    assert_eq!(http(admin, "GET", "/healthz").map(|(c, _)| c), Some(200), "alive while it waits:\n{}", daemon.log());
    proxy.up().await;
    wait_http(admin, "GET", "/readyz", "ready once the server is back", &daemon, |c, _| c == 200).await;
    let held = mc.get_raw("a:item:1").map(|(v, _)| String::from_utf8_lossy(&v).into_owned());
    assert!(held.as_deref().is_some_and(|v| v.contains("one")), "published after the late start: {held:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_preflight_stops_the_start_before_any_snapshot() {
    let (db, dir) = setup("preflight_gate").await;
    let mc = Memcached::start();
    let state = dir.path().join("s.db");
    // The replicator starts alongside the preflight; a table that does not
    // exist fails the preflight, and nothing may have been copied by then.
    let cfg =
        config(&db, &state, &mc, harness::free_port()).replace("tables = [\"item\"]", "tables = [\"item\", \"nope\"]");
    let mut daemon = Daemon::start(&cfg);
    let status =
        harness::wait_until_blocking("the daemon to exit on the failed preflight", DEADLINE, || daemon.try_wait());
    let log = daemon.log();
    assert!(!status.success(), "exit status {status:?}:\n{log}");
    assert!(log.contains("preflight failed") && log.contains("nope"), "the failure names the table:\n{log}");
    assert!(!log.contains("taking a snapshot"), "a snapshot started before the preflight passed:\n{log}");
    // There was no state file before: this start leaves none behind.
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("s.db") && !n.ends_with(".lock"))
        .collect();
    assert!(leftovers.is_empty(), "state files left by a start that never passed its preflight: {leftovers:?}\n{log}");

    // An existing state file is the operator's: a failed start keeps it,
    // untouched (no copy of any table in it).
    rusqlite::Connection::open(&state).unwrap().execute_batch("CREATE TABLE kept (x)").unwrap();
    let mut daemon = Daemon::start(&cfg);
    let status =
        harness::wait_until_blocking("the daemon to exit on the failed preflight", DEADLINE, || daemon.try_wait());
    let log = daemon.log();
    assert!(!status.success(), "exit status {status:?}:\n{log}");
    let c = rusqlite::Connection::open(&state).unwrap();
    let names: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(names.iter().any(|n| n == "kept"), "the existing state file was replaced: {names:?}\n{log}");
    assert!(!names.iter().any(|n| n.ends_with("item")), "the replica holds a copy of item: {names:?}\n{log}");
}
