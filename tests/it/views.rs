//! End to end: committed MySQL changes → views → memcached, decoded by a
//! real msgpack/JSON decoder.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use rmpv::Value as Mp;

use crate::harness::{self, Daemon, Memcached, TestDb};

const SCHEMA: &str = "
CREATE TABLE application (id INT PRIMARY KEY, name VARCHAR(128) NOT NULL, status INT NOT NULL DEFAULT 1,
  price DECIMAL(10,2), mtime DATETIME(6), logo BLOB, note VARCHAR(100)) DEFAULT CHARSET=utf8mb4;
CREATE TABLE feature (id INT PRIMARY KEY, code VARCHAR(64) NOT NULL) DEFAULT CHARSET=utf8mb4;
CREATE TABLE app_feature (app_id INT NOT NULL, feature_id INT NOT NULL, PRIMARY KEY (app_id, feature_id));
CREATE TABLE secret (id INT PRIMARY KEY, v INT);
INSERT INTO application VALUES
  (1, 'test0', 1, 12.50, '2024-01-02 03:04:05.000006', x'00ff10', NULL),
  (2, 'billing', 1, 0.99, '2023-12-31 23:59:59.999999', NULL, 'ünïcødé ✓'),
  (3, 'legacy', 0, NULL, NULL, NULL, NULL);
INSERT INTO feature VALUES (1, 'dark_mode'), (2, 'new_checkout'), (3, 'beta_search');
INSERT INTO app_feature VALUES (1, 1), (1, 2), (2, 2);
";

fn config(db: &TestDb, state: &Path, mc: &Memcached, codec: &str, prefix: &str, views: &str) -> String {
    format!(
        "[mysql]\nurl = \"{url}\"\nserver_id = {sid}\ntables = [\"application\", \"feature\", \"app_feature\"]\nheartbeat_secs = 0.5\n\n\
         [state]\npath = \"{state}\"\n\n[memcached]\nservers = [\"{mc}\"]\nkey_prefix = \"{prefix}\"\ncodec = \"{codec}\"\n\n{views}",
        url = db.url,
        sid = db.server_id,
        state = state.display(),
        mc = mc.addr(),
    )
}

macro_rules! app_view {
    () => {
        r#"
[[views]]
name = "app"
key = "app:{id}"
query = """
SELECT a.id, a.name, a.price, a.mtime, a.logo, a.note,
       (SELECT json_group_array(f.code) FROM (SELECT f.code FROM app_feature af JOIN feature f ON f.id = af.feature_id
         WHERE af.app_id = a.id ORDER BY f.code) f) AS features
FROM application a WHERE a.status = 1
"""
json_columns = ["features"]
"#
    };
}

const APP_VIEW: &str = app_view!();

/// The app view plus one view of every other shape.
const ALL_VIEWS: &str = concat!(
    app_view!(),
    r#"
[[views]]
name = "all_apps"
key = "apps"
shape = "list"
query = "SELECT id, name FROM application WHERE status = 1 ORDER BY id"

[[views]]
name = "by_name"
key = "by_name"
shape = "map"
map_key = "name"
query = "SELECT name, id, price FROM application WHERE status = 1"

[[views]]
name = "names"
key = "names"
shape = "map"
map_key = "id"
value_column = "name"
query = "SELECT id, name FROM application"

[[views]]
name = "features_of"
key = "features:{{{name}}}"
value_column = "features"
json_columns = ["features"]
query = """
SELECT a.name, (SELECT json_group_array(json_object('code', f.code, 'on', json('true'))) FROM app_feature af
  JOIN feature f ON f.id = af.feature_id WHERE af.app_id = a.id) AS features
FROM application a WHERE a.status = 1
"""
"#
);

async fn setup(hint: &str) -> (TestDb, tempfile::TempDir) {
    let db = harness::server().create_db(hint).await;
    let mut conn = db.root_conn().await;
    conn.query_drop(SCHEMA).await.unwrap();
    (db, tempfile::tempdir().unwrap())
}

fn decode_msgpack(bytes: &[u8]) -> Mp {
    let mut r = bytes;
    let v = rmpv::decode::read_value(&mut r).expect("a msgpack value");
    assert!(r.is_empty(), "trailing bytes after the msgpack value");
    v
}

fn field<'a>(v: &'a Mp, name: &str) -> &'a Mp {
    v.as_map()
        .unwrap_or_else(|| panic!("expected a map, got {v}"))
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no field {name} in {v}"))
}

fn field_is(v: Option<&Mp>, name: &str, want: &str) -> bool {
    v.and_then(Mp::as_map).is_some_and(|m| m.iter().any(|(k, x)| k.as_str() == Some(name) && x.as_str() == Some(want)))
}

fn get(mc: &Memcached, key: &str) -> Option<Mp> {
    mc.get_raw(key).map(|(b, flags)| {
        assert_eq!(flags, 0, "msgpack values are stored with flags 0");
        decode_msgpack(&b)
    })
}

async fn wait_for(
    mc: &Memcached,
    key: &str,
    what: &str,
    daemon: &Daemon,
    pred: impl Fn(Option<&Mp>) -> bool,
) -> Option<Mp> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = get(mc, key);
        if pred(v.as_ref()) {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {key}: {what}; last value {v:?}\ndaemon log:\n{}", daemon.log());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn name_is(v: Option<&Mp>, name: &str) -> bool {
    v.is_some_and(|v| field(v, "name").as_str() == Some(name))
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_scenario_cache_changes_only_at_commit() {
    let (db, dir) = setup("seed").await;
    let mc = Memcached::start();
    let daemon = Daemon::start(&config(&db, &dir.path().join("s.db"), &mc, "msgpack", "myapp:", APP_VIEW));
    wait_for(&mc, "myapp:app:1", "the initial value test0", &daemon, |v| name_is(v, "test0")).await;

    let mut conn = db.root_conn().await;
    let mut tx = conn.start_transaction(Default::default()).await.unwrap();
    tx.query_drop("UPDATE application SET name = 'test1' WHERE id = 1").await.unwrap();
    // The transaction stays open for 250 ms: the cache must keep test0 the whole time.
    let held = Instant::now();
    while held.elapsed() < Duration::from_millis(250) {
        assert!(name_is(get(&mc, "myapp:app:1").as_ref(), "test0"), "uncommitted data reached the cache");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tx.commit().await.unwrap();
    wait_for(&mc, "myapp:app:1", "test1 after COMMIT", &daemon, |v| name_is(v, "test1")).await;

    conn.query_drop("UPDATE application SET name = 'test2' WHERE id = 1").await.unwrap();
    wait_for(&mc, "myapp:app:1", "test2 after the next edit", &daemon, |v| name_is(v, "test2")).await;

    let mut tx = conn.start_transaction(Default::default()).await.unwrap();
    tx.query_drop("UPDATE application SET name = 'rolled-back' WHERE id = 1").await.unwrap();
    tx.rollback().await.unwrap();
    // A later committed edit is visible, and the rolled-back one never was.
    conn.query_drop("UPDATE application SET name = 'billing2' WHERE id = 2").await.unwrap();
    wait_for(&mc, "myapp:app:2", "billing2", &daemon, |v| name_is(v, "billing2")).await;
    assert!(name_is(get(&mc, "myapp:app:1").as_ref(), "test2"));
    assert!(!daemon.log().contains("rolled-back"));
}

#[tokio::test(flavor = "multi_thread")]
async fn insert_delete_and_filter_out_add_and_remove_keys() {
    let (db, dir) = setup("keys").await;
    let mc = Memcached::start();
    let daemon = Daemon::start(&config(&db, &dir.path().join("s.db"), &mc, "msgpack", "p:", APP_VIEW));
    wait_for(&mc, "p:app:2", "initial", &daemon, |v| v.is_some()).await;
    assert!(get(&mc, "p:app:3").is_none(), "a filtered-out row has no key");

    let mut conn = db.root_conn().await;
    conn.query_drop("INSERT INTO application (id, name) VALUES (4, 'fresh')").await.unwrap();
    wait_for(&mc, "p:app:4", "insert → key appears", &daemon, |v| name_is(v, "fresh")).await;
    conn.query_drop("UPDATE application SET status = 0 WHERE id = 4").await.unwrap();
    wait_for(&mc, "p:app:4", "filtered out → key deleted", &daemon, |v| v.is_none()).await;
    conn.query_drop("UPDATE application SET status = 1 WHERE id = 3").await.unwrap();
    wait_for(&mc, "p:app:3", "filtered in → key appears", &daemon, |v| name_is(v, "legacy")).await;
    conn.query_drop("DELETE FROM application WHERE id = 3").await.unwrap();
    wait_for(&mc, "p:app:3", "row deleted → key deleted", &daemon, |v| v.is_none()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_table_transaction_is_published_whole() {
    let (db, dir) = setup("atomic").await;
    let mc = Memcached::start();
    let daemon = Daemon::start(&config(&db, &dir.path().join("s.db"), &mc, "msgpack", "", APP_VIEW));
    wait_for(&mc, "app:1", "initial", &daemon, |v| v.is_some()).await;
    let features = |v: &Mp| -> Vec<String> {
        field(v, "features").as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(features(&get(&mc, "app:1").unwrap()), ["dark_mode", "new_checkout"]);

    // Watch the key continuously while a transaction renames the app,
    // adds a feature and links it: every observed value is all-or-nothing.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, addr) = (stop.clone(), mc.addr());
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some((b, _)) = raw_get(&addr, "app:1") {
                seen.push(decode_msgpack(&b));
            }
        }
        seen
    });
    let mut conn = db.root_conn().await;
    let mut tx = conn.start_transaction(Default::default()).await.unwrap();
    tx.query_drop("UPDATE application SET name = 'renamed' WHERE id = 1").await.unwrap();
    tx.query_drop("INSERT INTO feature VALUES (9, 'zz_new')").await.unwrap();
    tx.query_drop("INSERT INTO app_feature VALUES (1, 9)").await.unwrap();
    tx.query_drop("DELETE FROM app_feature WHERE app_id = 1 AND feature_id = 1").await.unwrap();
    tx.commit().await.unwrap();
    wait_for(&mc, "app:1", "the whole transaction", &daemon, |v| name_is(v, "renamed")).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert!(!seen.is_empty());
    for v in &seen {
        let name = field(v, "name").as_str().unwrap();
        let f = features(v);
        let before = name == "test0" && f == ["dark_mode", "new_checkout"];
        let after = name == "renamed" && f == ["new_checkout", "zz_new"];
        assert!(before || after, "a half-applied transaction was published: {v}");
    }
}

fn raw_get(addr: &str, key: &str) -> Option<(Vec<u8>, u32)> {
    raw_gets(addr, key).map(|(v, f, _)| (v, f))
}

/// `gets`: value, flags and CAS (a rewrite of the same bytes changes the CAS).
fn raw_gets(addr: &str, key: &str) -> Option<(Vec<u8>, u32, u64)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("gets {key}\r\n").as_bytes()).ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    if line.starts_with("END") {
        return None;
    }
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(parts[0], "VALUE", "unexpected reply {line:?}");
    let (flags, len, cas) = (parts[2].parse().unwrap(), parts[3].parse::<usize>().unwrap(), parts[4].parse().unwrap());
    let mut buf = vec![0; len + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(len);
    Some((buf, flags, cas))
}

#[tokio::test(flavor = "multi_thread")]
async fn shapes_and_values_decode_field_by_field() {
    let (db, dir) = setup("shapes").await;
    let mc = Memcached::start();
    let daemon = Daemon::start(&config(&db, &dir.path().join("s.db"), &mc, "msgpack", "s:", ALL_VIEWS));
    let app1 = wait_for(&mc, "s:app:1", "row view", &daemon, |v| v.is_some()).await.unwrap();
    // Column order, types: INTEGER → int, DECIMAL/DATETIME(6) → str as MySQL prints them, BLOB → bin, NULL → nil.
    let keys: Vec<&str> = app1.as_map().unwrap().iter().map(|(k, _)| k.as_str().unwrap()).collect();
    assert_eq!(keys, ["id", "name", "price", "mtime", "logo", "note", "features"]);
    assert_eq!(field(&app1, "id").as_i64(), Some(1));
    assert_eq!(field(&app1, "price").as_str(), Some("12.50"));
    assert_eq!(field(&app1, "mtime").as_str(), Some("2024-01-02 03:04:05.000006"));
    assert_eq!(field(&app1, "logo"), &Mp::Binary(vec![0x00, 0xff, 0x10]));
    assert!(field(&app1, "note").is_nil());
    assert_eq!(field(&app1, "features"), &Mp::Array(vec![Mp::from("dark_mode"), Mp::from("new_checkout")]));
    let app2 = get(&mc, "s:app:2").unwrap();
    assert_eq!(field(&app2, "note").as_str(), Some("ünïcødé ✓"));
    assert!(field(&app2, "logo").is_nil());

    let list = wait_for(&mc, "s:apps", "list view", &daemon, |v| v.is_some()).await.unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(field(&list[0], "id").as_i64(), Some(1));
    assert_eq!(field(&list[1], "name").as_str(), Some("billing"));

    let map = wait_for(&mc, "s:by_name", "map view", &daemon, |v| v.is_some()).await.unwrap();
    assert_eq!(field(field(&map, "billing"), "price").as_str(), Some("0.99"));
    assert_eq!(field(field(&map, "test0"), "id").as_i64(), Some(1));
    assert_eq!(map.as_map().unwrap().len(), 2);

    // map + value_column: integer map keys, each value the column alone.
    let names = wait_for(&mc, "s:names", "map with value_column", &daemon, |v| v.is_some()).await.unwrap();
    let names = names.as_map().unwrap();
    assert_eq!(names.len(), 3);
    assert!(names.iter().any(|(k, v)| k.as_i64() == Some(3) && v.as_str() == Some("legacy")));

    // `{{`/`}}` are literal braces; value_column with a JSON column.
    let f = wait_for(&mc, "s:features:{billing}", "value_column json", &daemon, |v| v.is_some()).await.unwrap();
    let f = f.as_array().unwrap();
    assert_eq!(field(&f[0], "code").as_str(), Some("new_checkout"));
    assert_eq!(field(&f[0], "on").as_bool(), Some(true));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_and_dogpile_codecs() {
    let (db, dir) = setup("codecs").await;
    let mc = Memcached::start();
    let d1 = Daemon::start(&config(&db, &dir.path().join("j.db"), &mc, "json", "j:", ALL_VIEWS));
    let deadline = Instant::now() + Duration::from_secs(20);
    let json = loop {
        if let Some((b, flags)) = mc.get_raw("j:app:1") {
            assert_eq!(flags, 2, "json values carry pymemcache's JsonSerde flag");
            break serde_json::from_slice::<serde_json::Value>(&b).expect("valid JSON");
        }
        assert!(Instant::now() < deadline, "json value never appeared:\n{}", d1.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(json["name"], "test0");
    assert_eq!(json["price"], "12.50");
    assert_eq!(json["features"], serde_json::json!(["dark_mode", "new_checkout"]));
    assert!(json["note"].is_null());
    drop(d1);

    let mut cfg = config(&db, &dir.path().join("d.db"), &mc, "dogpile", "d:", ALL_VIEWS);
    cfg = cfg.replace(&format!("server_id = {}", db.server_id), &format!("server_id = {}", db.server_id + 100_000));
    let d2 = Daemon::start(&cfg);
    let v = wait_for(&mc, "d:apps", "dogpile value", &d2, |v| v.is_some()).await.unwrap();
    // dogpile.cache's CachedValue: [payload, {"ct": creation time, "v": 2}]
    let arr = v.as_array().expect("a [payload, metadata] array");
    assert_eq!(arr.len(), 2);
    assert_eq!(field(&arr[0].as_array().unwrap()[0], "name").as_str(), Some("test0"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let ct = field(&arr[1], "ct").as_f64().expect("ct is a float");
    assert!((now - ct).abs() < 120.0, "ct {ct} is not the creation time (now {now})");
    assert_eq!(field(&arr[1], "v").as_i64(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn memcached_restarted_empty_is_repopulated() {
    let (db, dir) = setup("mcrestart").await;
    let mut mc = Memcached::start();
    let daemon = Daemon::start(&config(&db, &dir.path().join("s.db"), &mc, "msgpack", "", APP_VIEW));
    wait_for(&mc, "app:1", "initial", &daemon, |v| v.is_some()).await;
    mc.stop();
    let mut conn = db.root_conn().await;
    conn.query_drop("UPDATE application SET name = 'while-down' WHERE id = 2").await.unwrap();
    mc.restart_empty();
    wait_for(&mc, "app:1", "republished after restart", &daemon, |v| name_is(v, "test0")).await;
    wait_for(&mc, "app:2", "the change made while memcached was down", &daemon, |v| name_is(v, "while-down")).await;
    // A restart without any missed change is repaired too.
    mc.restart_empty();
    wait_for(&mc, "app:1", "republished after a quiet restart", &daemon, |v| name_is(v, "test0")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_publishes_missed_changes_without_rewriting_the_rest() {
    let (db, dir) = setup("dmrestart").await;
    let mc = Memcached::start();
    let cfg = config(&db, &dir.path().join("s.db"), &mc, "msgpack", "", APP_VIEW);
    let mut daemon = Daemon::start(&cfg);
    wait_for(&mc, "app:2", "initial", &daemon, |v| v.is_some()).await;
    wait_for(&mc, "app:1", "initial", &daemon, |v| v.is_some()).await;
    let cas1 = raw_gets(&mc.addr(), "app:1").unwrap().2;
    daemon.stop();

    let mut conn = db.root_conn().await;
    conn.query_drop("UPDATE application SET name = 'changed-while-down' WHERE id = 2").await.unwrap();
    conn.query_drop("INSERT INTO application (id, name) VALUES (7, 'new-while-down')").await.unwrap();
    let daemon = Daemon::start(&cfg);
    wait_for(&mc, "app:2", "missed update", &daemon, |v| name_is(v, "changed-while-down")).await;
    wait_for(&mc, "app:7", "missed insert", &daemon, |v| name_is(v, "new-while-down")).await;
    assert_eq!(raw_gets(&mc.addr(), "app:1").unwrap().2, cas1, "an unchanged key was rewritten after a restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_views_are_reported_and_skipped_while_the_others_publish() {
    let (db, dir) = setup("badviews").await;
    let mc = Memcached::start();
    let views = concat!(
        app_view!(),
        "[[views]]\nname = \"broken\"\nkey = \"k:{id}\"\nquery = \"SELEC id FROM application\"\n",
        "[[views]]\nname = \"holey\"\nkey = \"h:{nope}\"\nquery = \"SELECT id FROM application\"\n",
        "[[views]]\nname = \"peeker\"\nkey = \"p:{id}\"\nquery = \"SELECT id FROM secret\"\n",
    );
    let cfg = config(&db, &dir.path().join("s.db"), &mc, "msgpack", "b:", views);
    // `check` refuses them, naming each view and its problem.
    let path = dir.path().join("check.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = harness::run_tailcache(&["check", "--config", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check must fail on broken views:\n{text}");
    for (view, problem) in [("broken", "SELEC"), ("holey", "nope"), ("peeker", "secret")] {
        assert!(text.contains(view) && text.contains(problem), "check names {view} and {problem}:\n{text}");
    }
    // The daemon starts anyway: the good view is published, the broken
    // ones are logged with their problem and skipped.
    let daemon = Daemon::start(&cfg);
    wait_for(&mc, "b:app:1", "the good view", &daemon, |v| name_is(v, "test0")).await;
    let log = daemon.log();
    for (view, problem) in [("broken", "SELEC"), ("holey", "nope"), ("peeker", "secret")] {
        assert!(
            log.lines().any(|l| l.contains(view) && l.contains(problem) && l.contains("does not compile")),
            "the log names {view} and {problem}:\n{log}"
        );
    }
    assert!(mc.get_raw("k:1").is_none() && mc.get_raw("b:k:1").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn resync_command_repairs_a_tampered_key() {
    let (db, dir) = setup("resync").await;
    let mc = Memcached::start();
    let cfg = config(&db, &dir.path().join("s.db"), &mc, "msgpack", "r:", APP_VIEW);
    let daemon = Daemon::start(&cfg);
    wait_for(&mc, "r:app:1", "initial", &daemon, |v| name_is(v, "test0")).await;
    // Someone else overwrites the entry: only a full resync can notice.
    mc.set_raw("r:app:1", &rmp_serde::to_vec_named(&serde_json::json!({"name": "tampered"})).unwrap(), 0);
    assert!(name_is(get(&mc, "r:app:1").as_ref(), "tampered"));
    let out = harness::run_tailcache(&["resync", "--config", daemon.config_path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for(&mc, "r:app:1", "the resync to repair the key", &daemon, |v| name_is(v, "test0")).await;
    assert!(daemon.log().contains("admin: full resync requested"), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn run_with_resync_flag_takes_a_fresh_snapshot() {
    let (db, dir) = setup("resyncflag").await;
    let mc = Memcached::start();
    let cfg = config(&db, &dir.path().join("s.db"), &mc, "msgpack", "", APP_VIEW);
    let mut daemon = Daemon::start(&cfg);
    wait_for(&mc, "app:1", "initial", &daemon, |v| v.is_some()).await;
    daemon.stop();
    mc.set_raw("app:1", &rmp_serde::to_vec_named(&serde_json::json!({"name": "garbage"})).unwrap(), 0);
    let daemon = Daemon::start_args(&cfg, &["--resync"]);
    wait_for(&mc, "app:1", "the forced resync to rewrite the key", &daemon, |v| name_is(v, "test0")).await;
    assert!(daemon.log().contains("forced by --resync"), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn alter_table_recompiles_the_views_that_read_it() {
    let (db, dir) = setup("alterview").await;
    let mc = Memcached::start();
    // `SELECT *` follows the table's shape, so its columns change with the ALTER.
    let views = "[[views]]\nname = \"star\"\nkey = \"feat:{id}\"\nquery = \"SELECT * FROM feature\"\n";
    let daemon = Daemon::start(&config(&db, &dir.path().join("s.db"), &mc, "msgpack", "", views));
    wait_for(&mc, "feat:1", "initial", &daemon, |v| v.is_some_and(|v| field(v, "code").as_str() == Some("dark_mode")))
        .await;

    let mut conn = db.root_conn().await;
    conn.query_drop("ALTER TABLE feature ADD COLUMN owner VARCHAR(20) NOT NULL DEFAULT 'core'").await.unwrap();
    conn.query_drop("UPDATE feature SET owner = 'payments' WHERE id = 2").await.unwrap();
    wait_for(&mc, "feat:2", "the new column in the value", &daemon, |v| field_is(v, "owner", "payments")).await;
    wait_for(&mc, "feat:1", "the new column's default", &daemon, |v| field_is(v, "owner", "core")).await;
    let keys: Vec<String> =
        get(&mc, "feat:3").unwrap().as_map().unwrap().iter().map(|(k, _)| k.as_str().unwrap().to_owned()).collect();
    assert_eq!(keys, ["id", "code", "owner"]);
    assert!(!daemon.log().contains("result columns changed"), "the view ran with stale columns:\n{}", daemon.log());
}

/// Runs `statements` as one transaction, again from the start when the
/// server chose it as a deadlock victim (MySQL 1213). On MySQL the
/// daemon's start-up snapshot takes `LOCK TABLES … READ` on the watched
/// tables at once, and a transaction that wrote one of them and then waits
/// for another can lose that lock conflict, as an application's would; a
/// victim leaves nothing in the binlog, so the oracle is unaffected.
async fn run_retrying_deadlocks(conn: &mut mysql_async::Conn, statements: &[String]) {
    const DEADLOCK: u16 = 1213;
    for attempt in 1.. {
        let result = async {
            let mut tx = conn.start_transaction(Default::default()).await?;
            for sql in statements {
                tx.query_drop(sql).await?;
            }
            tx.commit().await
        }
        .await;
        match result {
            Ok(()) => return,
            Err(mysql_async::Error::Server(e)) if e.code == DEADLOCK && attempt < 10 => {
                eprintln!("deadlock victim (attempt {attempt}), retrying: {statements:?}");
            }
            Err(e) => panic!("{statements:?}: {e}"),
        }
    }
}

/// Incremental maintenance end to end: random transactions on MariaDB
/// (inserts, updates moving rows in and out of the WHERE, key changes,
/// deletes, changes to the table of a correlated subquery); memcached must
/// converge to what the same query returns on MariaDB itself.
#[tokio::test(flavor = "multi_thread")]
async fn incremental_views_converge_to_the_query_on_the_server() {
    use rand::{Rng, SeedableRng};
    let seed = std::env::var("TAILCACHE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("workload seed {seed} (set TAILCACHE_TEST_SEED to reproduce)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let db = harness::server().create_db("ivm").await;
    let mut conn = db.root_conn().await;
    conn.query_drop(
        "CREATE TABLE application (id INT PRIMARY KEY, name VARCHAR(32) NOT NULL, status INT NOT NULL);
         CREATE TABLE feature (id INT PRIMARY KEY, code VARCHAR(16) NOT NULL);
         CREATE TABLE app_feature (app_id INT NOT NULL, feature_id INT NOT NULL, PRIMARY KEY (app_id, feature_id));",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mc = Memcached::start();
    let views = r#"
[[views]]
name = "app"
key = "app:{id}"
query = "SELECT a.id, a.name, (SELECT count(*) FROM app_feature af WHERE af.app_id = a.id) AS n FROM application a WHERE a.status = 1"
"#;
    let cfg = config(&db, &dir.path().join("s.db"), &mc, "msgpack", "ivm:", views);
    let daemon = Daemon::start_args(&cfg, &["--log-format", "json"]);
    for round in 0..8 {
        for _ in 0..10 {
            let mut statements = Vec::new();
            for _ in 0..rng.random_range(1..4) {
                let id = rng.random_range(1..=15);
                let sql = match rng.random_range(0..6) {
                    0 => format!(
                        "INSERT INTO application VALUES ({id}, 'n{}', {}) ON DUPLICATE KEY UPDATE name = VALUES(name), status = VALUES(status)",
                        rng.random_range(0..100),
                        rng.random_range(0..2)
                    ),
                    1 => format!("DELETE FROM application WHERE id = {id}"),
                    2 => format!("UPDATE IGNORE application SET id = {} WHERE id = {id}", rng.random_range(1..=15)),
                    3 => format!("INSERT IGNORE INTO app_feature VALUES ({id}, {})", rng.random_range(1..4)),
                    4 => format!("DELETE FROM app_feature WHERE app_id = {id} LIMIT 1"),
                    _ => format!(
                        "UPDATE IGNORE app_feature SET app_id = {} WHERE app_id = {id} LIMIT 1",
                        rng.random_range(1..=15)
                    ),
                };
                statements.push(sql);
            }
            run_retrying_deadlocks(&mut conn, &statements).await;
        }
        // The oracle: the same query on the server.
        let rows: Vec<(i64, String, i64)> = conn
            .query(
                "SELECT a.id, a.name, (SELECT count(*) FROM app_feature af WHERE af.app_id = a.id) AS n FROM application a WHERE a.status = 1",
            )
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut wrong = Vec::new();
            for id in 1..=15i64 {
                let want = rows.iter().find(|r| r.0 == id);
                let got = get(&mc, &format!("ivm:app:{id}"));
                let ok = match (want, &got) {
                    (None, None) => true,
                    (Some((_, name, n)), Some(v)) => {
                        field(v, "name").as_str() == Some(name.as_str()) && field(v, "n").as_i64() == Some(*n)
                    }
                    _ => false,
                };
                if !ok {
                    wrong.push(format!("app:{id}: want {want:?}, memcached {got:?}"));
                }
            }
            if wrong.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "seed {seed}, round {round}: memcached differs from the server:\n{}\n{}",
                    wrong.join("\n"),
                    daemon.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        daemon
            .log()
            .contains("incremental: key table application (id); app_feature via app_feature.app_id = application.id"),
        "the start-up log names the view incremental:\n{}",
        daemon.log()
    );
}

/// A view keyed by a column that is not the primary key, with a correlated
/// subquery: tailcache indexes the replica for its incremental lookups,
/// after the first snapshot and again after a forced resync re-creates the
/// tables, and an edit is published incrementally.
#[tokio::test(flavor = "multi_thread")]
async fn incremental_lookups_are_indexed_in_the_replica_across_a_resync() {
    let (db, dir) = setup("ivmindex").await;
    let mc = Memcached::start();
    let state = dir.path().join("s.db");
    let views = r#"
[[views]]
name = "byname"
key = "byname:{name}"
query = "SELECT a.name, (SELECT count(*) FROM app_feature af WHERE af.app_id = a.id) AS n FROM application a"
"#;
    let cfg = config(&db, &state, &mc, "msgpack", "", views);
    let indexed = |state: &Path| -> Vec<(String, String)> {
        let c = rusqlite::Connection::open_with_flags(state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        let mut st = c
            .prepare(
                "SELECT m.tbl_name, ii.name FROM sqlite_master m, pragma_index_info(m.name) ii \
                 WHERE m.type = 'index' AND m.name LIKE '\\_tailcache\\_ix\\_%' ESCAPE '\\' ORDER BY 1, 2",
            )
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
    };
    // app_feature's primary key (app_id, feature_id) already serves the
    // subquery's lookups; application.name needs an index of its own.
    let want = vec![("application".to_owned(), "name".to_owned())];
    let mut daemon = Daemon::start(&cfg);
    wait_for(&mc, "byname:test0", "initial", &daemon, |v| v.is_some_and(|v| field(v, "n").as_i64() == Some(2))).await;
    assert_eq!(indexed(&state), want, "{}", daemon.log());
    assert!(daemon.log().contains("incremental: key table application (name)"), "{}", daemon.log());
    daemon.stop();

    let daemon = Daemon::start_args(&cfg, &["--resync"]);
    db.root_conn().await.query_drop("INSERT INTO app_feature VALUES (1, 3)").await.unwrap();
    wait_for(&mc, "byname:test0", "the edit", &daemon, |v| v.is_some_and(|v| field(v, "n").as_i64() == Some(3))).await;
    assert_eq!(indexed(&state), want, "{}", daemon.log());
}

/// Values of `keys` that memcached holds, over one connection (`get` with
/// many keys per request).
fn get_many(addr: &str, keys: &[String]) -> std::collections::HashMap<String, Vec<u8>> {
    let mut s = TcpStream::connect(addr).expect("connect to memcached");
    let mut r = BufReader::new(s.try_clone().expect("clone the socket"));
    let mut out = std::collections::HashMap::new();
    for batch in keys.chunks(200) {
        s.write_all(format!("get {}\r\n", batch.join(" ")).as_bytes()).expect("write get");
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("read get response");
            if line == "END\r\n" {
                break;
            }
            let parts: Vec<&str> = line.trim_end().split(' ').collect();
            let ["VALUE", key, _flags, len] = parts.as_slice() else { panic!("unexpected answer {line:?}") };
            let mut data = vec![0u8; len.parse::<usize>().expect("length") + 2];
            r.read_exact(&mut data).expect("read value");
            data.truncate(data.len() - 2);
            out.insert((*key).to_owned(), data);
        }
    }
    out
}

/// A view of more rows than one piece of a full publish (4,096): the
/// start's full publish, and a restart's after rows left, changed and
/// arrived while tailcache was stopped, leave exactly the view in
/// memcached. With a table of a second schema the state file uses a
/// rollback journal, and the bookkeeping is recorded after the read.
async fn large_view_is_published_whole(hint: &str, second_schema: bool) {
    const ROWS: i64 = 20_000;
    let db = harness::server().create_db(hint).await;
    let mut conn = db.root_conn().await;
    conn.query_drop("CREATE TABLE big (id INT PRIMARY KEY, v INT NOT NULL)").await.unwrap();
    let other = format!("{}_x", db.name);
    let (tables, join) = if second_schema {
        let grant = match harness::flavor() {
            harness::Flavor::MariaDb => "SELECT",
            harness::Flavor::Mysql => "SELECT, LOCK TABLES",
        };
        conn.query_drop(format!(
            "DROP DATABASE IF EXISTS `{other}`; CREATE DATABASE `{other}`;
             CREATE TABLE `{other}`.extra (id INT PRIMARY KEY, tag VARCHAR(16) NOT NULL);
             INSERT INTO `{other}`.extra VALUES (1, 'first');
             GRANT {grant} ON `{other}`.* TO '{}'@'%'",
            db.user
        ))
        .await
        .unwrap();
        (format!(r#""big", "{other}.extra""#), format!("LEFT JOIN {other}.extra e ON e.id = 1"))
    } else {
        (r#""big""#.to_owned(), String::new())
    };
    let tag = if second_schema { "e.tag" } else { "'first' AS tag" };
    let insert = |from: i64, to: i64, plus: i64| {
        let values: Vec<String> = (from..=to).map(|i| format!("({i}, {})", i + plus)).collect();
        format!("INSERT INTO big VALUES {}", values.join(","))
    };
    for from in (1..=ROWS).step_by(5_000) {
        conn.query_drop(insert(from, from + 4_999, 0)).await.unwrap();
    }
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let views = format!(
        "[[views]]\nname = \"big\"\nkey = \"big:{{id}}\"\nquery = \"SELECT b.id, b.v, {tag} FROM big b {join}\"\n"
    );
    let cfg = format!(
        "[mysql]\nurl = \"{url}\"\nserver_id = {sid}\ntables = [{tables}]\nheartbeat_secs = 0.5\n\n\
         [state]\npath = \"{state}\"\n\n[memcached]\nservers = [\"{mc}\"]\nkey_prefix = \"\"\n\n{views}",
        url = db.url,
        sid = db.server_id,
        state = dir.path().join("s.db").display(),
        mc = mc.addr(),
    );
    let keys: Vec<String> = (1..=ROWS + 1_000).map(|i| format!("big:{i}")).collect();
    // Waits until memcached holds exactly `want` (id -> v) for the view.
    let converge = |want: std::collections::BTreeMap<i64, i64>, daemon: &Daemon, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let held = get_many(&mc.addr(), &keys);
            let got: std::collections::BTreeMap<i64, i64> = held
                .iter()
                .map(|(k, b)| {
                    let v = decode_msgpack(b);
                    assert_eq!(field(&v, "tag").as_str(), Some("first"), "{k}");
                    (k["big:".len()..].parse().unwrap(), field(&v, "v").as_i64().unwrap())
                })
                .collect();
            if got == want {
                return;
            }
            let differ = want.iter().filter(|(k, v)| got.get(k) != Some(v)).count();
            let extra = got.keys().filter(|k| !want.contains_key(k)).count();
            assert!(
                Instant::now() < deadline,
                "{what}: {differ} keys missing or different, {extra} keys that should be gone\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut want: std::collections::BTreeMap<i64, i64> = (1..=ROWS).map(|i| (i, i)).collect();
    let mut daemon = Daemon::start(&cfg);
    converge(want.clone(), &daemon, "first start");
    daemon.stop();

    // While stopped: rows leave from the first, middle and last pieces,
    // others change, new ones arrive.
    conn.query_drop(
        "DELETE FROM big WHERE id <= 100 OR id BETWEEN 9000 AND 9500 OR id > 19900;
         UPDATE big SET v = v + 1000000 WHERE id % 97 = 0",
    )
    .await
    .unwrap();
    conn.query_drop(insert(ROWS + 1, ROWS + 1_000, 7)).await.unwrap();
    want.retain(|&id, _| !(id <= 100 || (9000..=9500).contains(&id) || id > 19900));
    for (id, v) in want.iter_mut() {
        if *id % 97 == 0 {
            *v += 1_000_000;
        }
    }
    want.extend((ROWS + 1..=ROWS + 1_000).map(|i| (i, i + 7)));
    let daemon = Daemon::start(&cfg);
    // Commits while the restart's full publish reads the replica: under a
    // rollback journal, the replicator then waits for that read to end,
    // which must not wait on anything the replicator holds.
    for id in (5_000..5_400).step_by(4) {
        conn.query_drop(format!("UPDATE big SET v = v + 1 WHERE id = {id}")).await.unwrap();
        *want.get_mut(&id).unwrap() += 1;
    }
    converge(want, &daemon, "restart after changes while stopped");
    assert!(daemon.log().contains("published"), "{}", daemon.log());
    if second_schema {
        conn.query_drop(format!("DROP DATABASE `{other}`")).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_larger_than_a_piece_is_published_whole() {
    large_view_is_published_whole("pieces", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_larger_than_a_piece_is_published_whole_across_schemas() {
    large_view_is_published_whole("pieces2", true).await;
}
