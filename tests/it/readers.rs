//! The real Python readers (tests/python/): Django's memcached backends,
//! python-memcached, pylibmc, pymemcache and dogpile.cache read what
//! tailcache writes, from the servers their clients pick.
//!
//! The interpreter is `$TAILCACHE_TEST_PYTHON` (scripts/test.sh creates it
//! with every package); without it these tests fail, never skip.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use tailcache::config::{Codec, Config, Distribution, MemcachedConfig};
use tailcache::position::{BinlogPosition, Checkpoint};
use tailcache::sink::{Op, Sink};
use tailcache::status::Status;
use tailcache::views::{Committed, spawn_publisher};
use tokio::sync::watch;

use crate::harness::{self, Daemon, Memcached, TestDb, wait_until};

const PACKAGES: &str = "pylibmc, pymemcache, django, msgpack, memcache, dogpile.cache";

/// The Python interpreter with the readers installed.
fn python() -> &'static str {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        let py = std::env::var("TAILCACHE_TEST_PYTHON").unwrap_or_else(|_| {
            panic!(
                "TAILCACHE_TEST_PYTHON is not set: the Python reader tests need an interpreter with {PACKAGES}; \
                 run the suite with scripts/test.sh, which installs them and sets it"
            )
        });
        let out = Command::new(&py)
            .args(["-c", &format!("import {PACKAGES}")])
            .output()
            .unwrap_or_else(|e| panic!("cannot run TAILCACHE_TEST_PYTHON={py}: {e}; run scripts/test.sh"));
        assert!(
            out.status.success(),
            "TAILCACHE_TEST_PYTHON={py} lacks a Python reader package ({PACKAGES}): {}; run scripts/test.sh, which installs them",
            String::from_utf8_lossy(&out.stderr)
        );
        py
    })
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(name)
}

/// Runs a reader script to completion: (success, stdout, stderr).
fn run_py(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(python())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mc_config(servers: &[&Memcached], distribution: Distribution, weights: &[u32]) -> MemcachedConfig {
    MemcachedConfig {
        servers: servers.iter().map(|m| m.addr()).collect(),
        key_prefix: String::new(),
        codec: Codec::Msgpack,
        exptime: 0,
        max_item_size: 1024 * 1024,
        coalesce_ms: 2,
        timeout_ms: 2000,
        distribution,
        weights: weights.to_vec(),
    }
}

// ---------------------------------------------------------------------------
// Placement, mode by mode, against the client that defines it
// ---------------------------------------------------------------------------

async fn placement_matches_the_client(distribution: Distribution, weights: &[u32]) {
    let (a, b, c) = (Memcached::start(), Memcached::start(), Memcached::start());
    let cfg = mc_config(&[&a, &b, &c], distribution, weights);
    let sink = Sink::connect(&cfg);
    let prefix = format!("place:{distribution}:");
    let ops: Vec<Op> = (0..1000)
        .map(|i| {
            let key = format!("{prefix}{i}");
            Op::Set { value: [b"v:", key.as_bytes()].concat(), key: key.into_bytes(), flags: 0, exptime: 0 }
        })
        .collect();
    let applied = sink.apply(&ops).await.expect("tailcache writes the keys");
    assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
    let servers = cfg.servers.join(",");
    let weights: Vec<String> = weights.iter().map(u32::to_string).collect();
    let (ok, out, err) = run_py(&[
        script("placement.py").to_str().unwrap(),
        &distribution.to_string(),
        &servers,
        &prefix,
        "1000",
        &weights.join(","),
    ]);
    assert!(ok, "{distribution} {weights:?}: the client disagrees with tailcache:\n{out}\n{err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("a JSON summary");
    let per: Vec<u64> = summary["per_server"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(per.iter().sum::<u64>(), 1000, "{summary}");
    assert!(per.iter().all(|&n| n > 100), "keys spread over all 3 servers: {summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn modula_is_python_memcached() {
    placement_matches_the_client(Distribution::Modula, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn modula_weighted_is_python_memcached() {
    placement_matches_the_client(Distribution::Modula, &[1, 3, 2]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ketama_is_pylibmc_with_ketama_behavior() {
    placement_matches_the_client(Distribution::Ketama, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ketama_weighted_is_pylibmc_with_ketama_weighted_behavior() {
    placement_matches_the_client(Distribution::KetamaWeighted, &[]).await;
    placement_matches_the_client(Distribution::KetamaWeighted, &[1, 3, 2]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rendezvous_is_pymemcache_hashclient() {
    placement_matches_the_client(Distribution::Rendezvous, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pylibmc_is_pylibmc_default() {
    placement_matches_the_client(Distribution::Pylibmc, &[]).await;
}

// ---------------------------------------------------------------------------
// Django, through the whole daemon
// ---------------------------------------------------------------------------

const SCHEMA: &str = "
CREATE TABLE application (id INT PRIMARY KEY, name VARCHAR(128) NOT NULL, status INT NOT NULL DEFAULT 1,
  price DECIMAL(10,2), score DOUBLE, logo BLOB, note VARCHAR(100)) DEFAULT CHARSET=utf8mb4;
CREATE TABLE feature (id INT PRIMARY KEY, app_id INT NOT NULL, code VARCHAR(64) NOT NULL) DEFAULT CHARSET=utf8mb4;
INSERT INTO application VALUES (1, 'test0', 1, 12.50, 0.5, x'00ff10', NULL), (2, 'billing', 1, NULL, NULL, NULL, 'ünï ✓');
INSERT INTO feature VALUES (1, 1, 'dark_mode'), (2, 1, 'beta');
";

const APP_VIEW: &str = r#"
[[views]]
name = "app"
key = "app:{name}"
query = """
SELECT a.id, a.name, a.price, a.score, a.logo, a.note,
       (SELECT json_group_array(f.code) FROM (SELECT code FROM feature f WHERE f.app_id = a.id ORDER BY code) f) AS features
FROM application a WHERE a.status = 1
"""
json_columns = ["features"]
"#;

async fn setup(hint: &str) -> (TestDb, tempfile::TempDir) {
    let db = harness::server().create_db(hint).await;
    db.root_conn().await.query_drop(SCHEMA).await.unwrap();
    (db, tempfile::tempdir().unwrap())
}

fn daemon_config(db: &TestDb, state: &Path, servers: &[&Memcached], memcached: &str, views: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|m| format!("\"{}\"", m.addr())).collect();
    format!(
        "[mysql]\nurl = \"{url}\"\nserver_id = {sid}\ntables = [\"application\", \"feature\"]\nheartbeat_secs = 0.5\n\n\
         [state]\npath = \"{state}\"\n\n[memcached]\nservers = [{servers}]\n{memcached}\n\n{views}",
        url = db.url,
        sid = db.server_id,
        state = state.display(),
        servers = servers.join(", "),
    )
}

/// A long-running `django_reader.py`.
struct DjangoReader {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl DjangoReader {
    fn start(backend: &str, servers: &[&Memcached], options: &str) -> DjangoReader {
        let locations: Vec<String> = servers.iter().map(|m| m.addr()).collect();
        let mut child = Command::new(python())
            .args([script("django_reader.py").to_str().unwrap(), backend, &locations.join(","), "myapp", "1", options])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start django_reader.py");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.contains("ready"), "django_reader.py did not start: {line:?}");
        DjangoReader { child, stdin, stdout }
    }

    /// `caches["default"].get(key)`, as JSON.
    fn get(&mut self, key: &str) -> serde_json::Value {
        writeln!(self.stdin, "{key}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("django_reader.py answered {line:?}: {e}"))
    }

    fn name(&mut self, key: &str) -> Option<String> {
        self.get(key)["value"]["name"].as_str().map(str::to_owned)
    }

    fn wait_name(&mut self, key: &str, want: &str, daemon: &Daemon) -> Duration {
        let t0 = Instant::now();
        loop {
            if self.name(key).as_deref() == Some(want) {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "Django never read name={want} at {key}; last {}\n{}",
                self.get(key),
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for DjangoReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn django_reads_the_seed_scenario(backend: &str, distribution: &str, options: &str) {
    let (db, dir) = setup(&format!("dj{}", &backend[..4].to_lowercase())).await;
    let (a, b, c) = (Memcached::start(), Memcached::start(), Memcached::start());
    let servers = [&a, &b, &c];
    let memcached = format!("key_prefix = \"myapp:1:\"\ncodec = \"pickle\"\ndistribution = \"{distribution}\"");
    let daemon = Daemon::start(&daemon_config(&db, &dir.path().join("s.db"), &servers, &memcached, APP_VIEW));
    let mut dj = DjangoReader::start(backend, &servers, options);
    dj.wait_name("app:test0", "test0", &daemon);

    // The dict, with Python types from the value mapping.
    let v = dj.get("app:test0");
    assert_eq!(v["type"], "dict", "{v}");
    assert_eq!(
        v["value"],
        serde_json::json!({"id": 1, "name": "test0", "price": "12.50", "score": 0.5, "logo": {"bytes": "00ff10"},
                           "note": null, "features": ["beta", "dark_mode"]}),
        "{v}"
    );
    let types = &v["types"];
    assert_eq!(
        (&types["id"], &types["price"], &types["score"], &types["logo"], &types["note"], &types["features"]),
        (&"int".into(), &"str".into(), &"float".into(), &"bytes".into(), &"NoneType".into(), &"list".into()),
        "{v}"
    );
    assert_eq!(dj.get("app:billing")["value"]["note"], "ünï ✓");
    // Each key on exactly one server.
    for key in ["myapp:1:app:test0", "myapp:1:app:billing"] {
        let holders = servers.iter().filter(|m| m.get_raw(key).is_some()).count();
        assert_eq!(holders, 1, "{key} on {holders} servers");
        let flags = servers.iter().find_map(|m| m.get_raw(key)).unwrap().1;
        assert_eq!(flags, 1, "pickled values carry flag 1");
    }

    // An uncommitted edit is never read; the commit is, promptly.
    let mut conn = db.root_conn().await;
    let mut tx = conn.start_transaction(Default::default()).await.unwrap();
    tx.query_drop("UPDATE feature SET code = 'uncommitted' WHERE id = 2").await.unwrap();
    let held = Instant::now();
    while held.elapsed() < Duration::from_millis(300) {
        let f = dj.get("app:test0")["value"]["features"].clone();
        assert_eq!(f, serde_json::json!(["beta", "dark_mode"]), "uncommitted data reached Django");
        std::thread::sleep(Duration::from_millis(10));
    }
    tx.query_drop("UPDATE application SET name = 'test1' WHERE id = 1").await.unwrap();
    tx.commit().await.unwrap();
    let latency = dj.wait_name("app:test1", "test1", &daemon);
    assert!(latency < Duration::from_secs(2), "commit seen by Django after {latency:?}");
    let v = dj.get("app:test1");
    assert_eq!(v["value"]["features"], serde_json::json!(["dark_mode", "uncommitted"]), "{v}");
    // The old key is gone for Django too.
    let t0 = Instant::now();
    while !dj.get("app:test0")["value"].is_null() {
        assert!(t0.elapsed() < Duration::from_secs(10), "app:test0 not deleted");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut tx = conn.start_transaction(Default::default()).await.unwrap();
    tx.query_drop("UPDATE application SET note = 'rolled back' WHERE id = 2").await.unwrap();
    tx.rollback().await.unwrap();
    conn.query_drop("UPDATE application SET price = 1.00 WHERE id = 1").await.unwrap();
    let t0 = Instant::now();
    while dj.get("app:test1")["value"]["price"] != "1.00" {
        assert!(t0.elapsed() < Duration::from_secs(10), "price edit not seen");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(dj.get("app:billing")["value"]["note"], "ünï ✓", "a rolled-back edit never shows");
}

#[tokio::test(flavor = "multi_thread")]
async fn django_pymemcache_cache_reads_dicts_from_three_servers() {
    django_reads_the_seed_scenario("PyMemcacheCache", "rendezvous", "{}").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn django_pylibmc_cache_reads_dicts_from_three_servers() {
    django_reads_the_seed_scenario("PyLibMCCache", "ketama", r#"{"binary": true, "behaviors": {"ketama": true}}"#)
        .await;
}

// ---------------------------------------------------------------------------
// dogpile.cache
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn dogpile_region_as_documented_never_runs_its_creator_and_overwrites_are_drift() {
    let (db, dir) = setup("dogpile").await;
    let (a, b) = (Memcached::start(), Memcached::start());
    let memcached = "key_prefix = \"myapp:\"\ncodec = \"dogpile\"\ndistribution = \"rendezvous\"";
    let admin = harness::free_port();
    let cfg = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n",
        daemon_config(&db, &dir.path().join("s.db"), &[&a, &b], memcached, APP_VIEW)
    );
    let daemon = Daemon::start(&cfg);
    let servers = format!("{},{}", a.addr(), b.addr());
    let held = |key: &str| [&a, &b].iter().find_map(|m| m.get_raw(key));
    wait_until("tailcache published app:test0", Duration::from_secs(20), || async {
        held("myapp:app:test0").map(|_| ())
    })
    .await;

    // A region whose expiration time (1 s) is far shorter than the run
    // (3 s) and than the time since tailcache wrote the value.
    let run = std::thread::spawn({
        let servers = servers.clone();
        move || run_py(&[script("dogpile_region.py").to_str().unwrap(), &servers, "myapp:", "app:test0", "1", "3"])
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    db.root_conn().await.query_drop("UPDATE application SET note = 'edited' WHERE id = 1").await.unwrap();
    let (ok, out, err) = run.join().unwrap();
    assert!(ok, "the creator ran for a tailcache-managed key:\n{out}\n{err}\n{}", daemon.log());
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["creator_calls"], 0, "{r}");
    assert_eq!(r["names"], serde_json::json!(["test0"]), "{r}");
    // The edit is published before the overwrite below, or that publish
    // could repair the overwrite before the resync sees it.
    let note = |v: Vec<u8>| {
        let v = rmpv::decode::read_value(&mut v.as_slice()).ok()?;
        v[0]["note"].as_str().map(str::to_owned)
    };
    wait_until("the edit published", Duration::from_secs(20), || async {
        (held("myapp:app:test0").and_then(|(v, _)| note(v)).as_deref() == Some("edited")).then_some(())
    })
    .await;

    // A reader writing under tailcache's key (a region without the recipe)
    // is repaired by the next resync, counted as drift. (noreply=False:
    // pymemcache does not wait for STORED by default, and the resync could
    // read the key before memcached has taken the write.)
    let (ok, out, err) = run_py(&[
        "-c",
        &format!(
            "import msgpack, time\nfrom pymemcache.client.hash import HashClient\n\
             c = HashClient({:?})\n\
             assert c.set('myapp:app:test0', msgpack.packb([{{'name': 'overwritten'}}, {{'ct': time.time(), 'v': 2}}]), noreply=False)\n",
            servers.split(',').collect::<Vec<_>>()
        ),
    ]);
    assert!(ok, "{out}{err}");
    let (code, body) = http_post(admin, "/resync");
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["differed"], 1, "{report}");
    let v = held("myapp:app:test0").unwrap().0;
    let mut r = v.as_slice();
    let v = rmpv::decode::read_value(&mut r).unwrap();
    assert_eq!(v[0]["name"].as_str(), Some("test0"), "{v}");
}

fn http_post(port: u16, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    // chunked bodies: take the JSON object
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => body[a..=b].to_owned(),
        _ => body,
    };
    (code, body)
}

// ---------------------------------------------------------------------------
// The README's reader snippets, executed
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn readme_reader_snippets_run() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let snippets = readme_snippets(&readme);
    let names: Vec<&str> = snippets.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["msgpack", "dogpile", "json", "django"] {
        assert!(names.contains(&want), "README has no `<!-- reader: {want} -->` snippet: {names:?}");
    }
    let (db, dir) = setup("readme").await;
    for (name, code) in snippets {
        let (codec, distribution) = match name.as_str() {
            "msgpack" => ("msgpack", "all"),
            "dogpile" => ("dogpile", "all"),
            "json" => ("json", "all"),
            "django" => ("pickle", "rendezvous"),
            other => panic!("unknown README reader snippet {other}"),
        };
        let prefix = if name == "django" { "myapp:1:" } else { "myapp:" };
        let mc = Memcached::start();
        let memcached = format!("key_prefix = \"{prefix}\"\ncodec = \"{codec}\"\ndistribution = \"{distribution}\"");
        let state = dir.path().join(format!("{name}.db"));
        let daemon = Daemon::start(&daemon_config(&db, &state, &[&mc], &memcached, APP_VIEW));
        wait_until("published", Duration::from_secs(20), || async {
            mc.get_raw(&format!("{prefix}app:test0")).map(|_| ())
        })
        .await;
        let code = code.replace("127.0.0.1:11211", &mc.addr()).replace("11211", &mc.port().to_string());
        let (ok, out, err) = run_py(&["-c", &code]);
        assert!(ok, "README snippet {name} failed:\n{code}\n{out}\n{err}\n{}", daemon.log());
        assert!(out.contains("test0") && out.contains("dark_mode"), "README snippet {name} printed {out:?}");
        drop(daemon);
    }
}

/// The ```python blocks preceded by `<!-- reader: NAME -->`.
fn readme_snippets(readme: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = readme;
    while let Some(at) = rest.find("<!-- reader: ") {
        rest = &rest[at + "<!-- reader: ".len()..];
        let name = rest[..rest.find(" -->").unwrap()].to_owned();
        let start = rest.find("```python\n").unwrap() + "```python\n".len();
        let end = start + rest[start..].find("\n```").unwrap();
        out.push((name, rest[start..end].to_owned()));
        rest = &rest[end..];
    }
    out
}

// ---------------------------------------------------------------------------
// Per server: a restarted server is repopulated alone; a server that is down
// keeps its keys while the others are published
// ---------------------------------------------------------------------------

const VIEWS: &str = r#"
[[views]]
name = "app"
key = "app:{id}"
query = "SELECT id, name FROM application"
"#;

fn publisher_config(state: &Path, servers: &[&Memcached]) -> Arc<Config> {
    let servers: Vec<String> = servers.iter().map(|m| format!("\"{}\"", m.addr())).collect();
    let text = format!(
        "[mysql]\nurl = \"mysql://u@127.0.0.1:3306/appdb\"\nserver_id = 7\ntables = [\"application\"]\n\
         [state]\npath = \"{}\"\n[memcached]\nservers = [{}]\nkey_prefix = \"s:\"\ncoalesce_ms = 5\ntimeout_ms = 300\n\
         distribution = \"rendezvous\"\n{VIEWS}",
        state.display(),
        servers.join(", ")
    );
    let cfg = Config::from_toml(&text).unwrap();
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    Arc::new(cfg)
}

fn replica(state: &Path, cfg: &Config, rows: usize) -> rusqlite::Connection {
    let conn = tailcache::replica::open_connection(state, &cfg.mysql.table_refs()).unwrap();
    conn.execute_batch(
        "CREATE TABLE application (id INTEGER PRIMARY KEY, name TEXT);
         UPDATE _tailcache_state SET file = 'bin.000001', pos = 4, consistent = 1;",
    )
    .unwrap();
    for i in 1..=rows {
        conn.execute("INSERT INTO application VALUES (?1, ?2)", (i as i64, format!("name{i}"))).unwrap();
    }
    conn
}

fn committed(pos: u64) -> Committed {
    Committed {
        touched: vec!["application".into()],
        checkpoint: Checkpoint { position: BinlogPosition::new("bin.000001", pos), gtid: None },
        arrived: Instant::now(),
        full: false,
        schema_changed: false,
        trigger: None,
        changes: Default::default(),
    }
}

/// memcached's `stats` counter `name`.
fn stat(m: &Memcached, name: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(m.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"stats\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("END") || line.is_empty() {
            panic!("no stat {name}");
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() == 3 && parts[1] == name {
            return parts[2].parse().unwrap();
        }
    }
}

fn holder(servers: &[&Memcached], key: &str) -> Vec<usize> {
    servers.iter().enumerate().filter(|(_, m)| m.get_raw(key).is_some()).map(|(i, _)| i).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_restarted_server_is_repopulated_without_rewriting_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let (a, mut b, c) = (Memcached::start(), Memcached::start(), Memcached::start());
    let cfg = publisher_config(&state, &[&a, &b, &c]);
    let conn = replica(&state, &cfg, 300);
    let status = Arc::new(Status::new());
    let (tx, rx) = tailcache::replica::action::notice_channel();
    let (_stop, stop_rx) = watch::channel(false);
    let worker = spawn_publisher(cfg.clone(), state.clone(), rx, stop_rx, status.clone());
    let all = |servers: &[&Memcached]| (1..=300).all(|i| holder(servers, &format!("s:app:{i}")).len() == 1);
    wait_until("300 keys, each on one server", Duration::from_secs(15), || async { all(&[&a, &b, &c]).then_some(()) })
        .await;
    let on_b: Vec<usize> = (1..=300).filter(|i| holder(&[&a, &b, &c], &format!("s:app:{i}")) == [1]).collect();
    assert!(on_b.len() > 50, "{}", on_b.len());
    // Every key of a and c with its CAS, which any rewrite changes.
    let cas_of = |m: &Memcached| -> Vec<(usize, Option<u64>)> {
        (1..=300)
            .filter(|i| !on_b.contains(i))
            .map(|i| (i, m.cas(&format!("s:app:{i}"))))
            .filter(|(_, c)| c.is_some())
            .collect()
    };
    let (cas_a, cas_c) = (cas_of(&a), cas_of(&c));
    assert_eq!(cas_a.len() + cas_c.len() + on_b.len(), 300);

    b.restart_empty();
    wait_until("b repopulated", Duration::from_secs(15), || async {
        on_b.iter().all(|i| b.get_raw(&format!("s:app:{i}")).is_some()).then_some(())
    })
    .await;
    assert!(all(&[&a, &b, &c]));
    // a and c got the new sentinel (once per attempt: a first attempt may
    // find b still down), none of their keys again.
    assert_eq!(cas_of(&a), cas_a, "a's keys were rewritten");
    assert_eq!(cas_of(&c), cas_c, "c's keys were rewritten");
    assert!(stat(&b, "cmd_set") as usize >= on_b.len());
    drop(tx);
    drop(conn);
    let _ = worker.join();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_down_keeps_its_keys_and_the_others_are_published() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let (a, mut b, c) = (Memcached::start(), Memcached::start(), Memcached::start());
    let cfg = publisher_config(&state, &[&a, &b, &c]);
    let conn = replica(&state, &cfg, 60);
    let status = Arc::new(Status::new());
    let (tx, rx) = tailcache::replica::action::notice_channel();
    let (_stop, stop_rx) = watch::channel(false);
    let worker = spawn_publisher(cfg.clone(), state.clone(), rx, stop_rx, status.clone());
    wait_until("60 keys", Duration::from_secs(15), || async {
        (1..=60).all(|i| holder(&[&a, &b, &c], &format!("s:app:{i}")).len() == 1).then_some(())
    })
    .await;
    let home = |i: usize| holder(&[&a, &b, &c], &format!("s:app:{i}"))[0];
    let homes: Vec<usize> = (1..=60).map(home).collect();

    b.stop();
    conn.execute("UPDATE application SET name = name || '!'", []).unwrap();
    tx.send(committed(10)).unwrap();
    // The keys of a and c are updated while b is down, and stay where
    // they were.
    wait_until("a and c updated", Duration::from_secs(15), || async {
        (1..=60)
            .filter(|i| homes[i - 1] != 1)
            .all(|i| {
                let m = if homes[i - 1] == 0 { &a } else { &c };
                m.get_raw(&format!("s:app:{i}")).is_some_and(|(v, _)| v.windows(1).count() > 0 && v.ends_with(b"!"))
            })
            .then_some(())
    })
    .await;
    for i in (1..=60).filter(|i| homes[i - 1] != 1) {
        let others: Vec<usize> = holder(&[&a, &c], &format!("s:app:{i}"));
        assert_eq!(others.len(), 1, "s:app:{i} moved");
    }
    // Reported: status (readiness) names b as down.
    let b_addr = b.addr();
    wait_until("b reported down", Duration::from_secs(10), || async {
        (status.snapshot().memcached.get(&b_addr) == Some(&false)).then_some(())
    })
    .await;
    assert!(
        status.snapshot().not_ready(true).iter().any(|r| r.contains(&b_addr)),
        "{:?}",
        status.snapshot().not_ready(true)
    );

    // b comes back (empty): its keys are written there, with the new names.
    b.restart_empty();
    wait_until("b repopulated", Duration::from_secs(20), || async {
        (1..=60)
            .filter(|i| homes[i - 1] == 1)
            .all(|i| b.get_raw(&format!("s:app:{i}")).is_some_and(|(v, _)| v.ends_with(b"!")))
            .then_some(())
    })
    .await;
    for i in 1..=60 {
        assert_eq!(holder(&[&a, &b, &c], &format!("s:app:{i}")), vec![homes[i - 1]]);
    }
    drop(tx);
    drop(conn);
    let _ = worker.join();
}
