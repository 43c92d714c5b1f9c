//! The memcached sink and the publisher worker against real memcached
//! servers (no MySQL: the publisher reads a hand-made replica file).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tailcache::config::{Codec, Config, MemcachedConfig};
use tailcache::position::{BinlogPosition, Checkpoint};
use tailcache::sink::{Op, Sink};
use tailcache::views::{Committed, ITEM_OVERHEAD, spawn_publisher};
use tokio::sync::watch;

use crate::harness::{Memcached, wait_until};

const WAIT: Duration = Duration::from_secs(15);

fn mc_config(servers: &[&Memcached]) -> MemcachedConfig {
    MemcachedConfig {
        servers: servers.iter().map(|m| m.addr()).collect(),
        key_prefix: "t:".into(),
        codec: Codec::Msgpack,
        exptime: 0,
        max_item_size: 1024 * 1024,
        coalesce_ms: 2,
        timeout_ms: 1000,
        distribution: Default::default(),
        weights: Vec::new(),
    }
}

fn set(key: &str, value: &[u8], flags: u32, exptime: u32) -> Op {
    Op::Set { key: key.as_bytes().to_vec(), value: value.to_vec(), flags, exptime }
}

fn del(key: &str) -> Op {
    Op::Delete { key: key.as_bytes().to_vec() }
}

/// One raw text-protocol command, returning the first response line.
fn command(addr: &str, cmd: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(cmd.as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// Remaining TTL of `key` via the meta protocol (`-1` = never expires).
fn ttl(addr: &str, key: &str) -> Option<i64> {
    let line = command(addr, &format!("mg {key} t\r\n"));
    if line.starts_with("EN") {
        return None;
    }
    line.split_whitespace().find_map(|t| t.strip_prefix('t')).map(|t| t.parse().unwrap())
}

#[tokio::test]
async fn sink_batches_sets_and_deletes_to_every_server() {
    let a = Memcached::start();
    let b = Memcached::start();
    let sink = Sink::connect(&mc_config(&[&a, &b]));
    // 1200 small values (more than one 500-op batch) and a few 300 KB ones
    // (more than one 1 MB batch).
    let mut ops: Vec<Op> = (0..1200).map(|i| set(&format!("t:k{i}"), format!("v{i}").as_bytes(), 0, 0)).collect();
    let big = vec![b'x'; 300 * 1024];
    ops.extend((0..8).map(|i| set(&format!("t:big{i}"), &big, 0, 0)));
    sink.apply(&ops).await.unwrap();
    for m in [&a, &b] {
        for i in [0, 499, 500, 1199] {
            assert_eq!(m.get_raw(&format!("t:k{i}")), Some((format!("v{i}").into_bytes(), 0)), "{} k{i}", m.addr());
        }
        for i in 0..8 {
            assert_eq!(m.get_raw(&format!("t:big{i}")).map(|v| v.0.len()), Some(big.len()));
        }
    }
    // deletes, including keys that were never there; a set and a later
    // delete of the same key in one call end deleted
    let mut ops: Vec<Op> = (0..600).map(|i| del(&format!("t:k{i}"))).collect();
    ops.push(del("t:never-set"));
    ops.push(set("t:late", b"1", 0, 0));
    ops.push(del("t:late"));
    sink.apply(&ops).await.unwrap();
    for m in [&a, &b] {
        assert_eq!(m.get_raw("t:k0"), None);
        assert_eq!(m.get_raw("t:k599"), None);
        assert_eq!(m.get_raw("t:late"), None);
        assert!(m.get_raw("t:k600").is_some());
    }
    assert_eq!(sink.get(b"t:k600").await.unwrap(), Some((b"v600".to_vec(), 0)));
    assert_eq!(sink.get(b"t:k0").await.unwrap(), None);
}

#[tokio::test]
async fn sink_stores_flags_and_exptime() {
    let m = Memcached::start();
    let sink = Sink::connect(&mc_config(&[&m]));
    sink.apply(&[set("t:f", b"flagged", 7, 0), set("t:ttl", b"x", 0, 60), set("t:short", b"x", 0, 1)]).await.unwrap();
    assert_eq!(m.get_raw("t:f"), Some((b"flagged".to_vec(), 7)));
    assert_eq!(sink.get(b"t:f").await.unwrap(), Some((b"flagged".to_vec(), 7)));
    assert_eq!(ttl(&m.addr(), "t:f"), Some(-1), "exptime 0 never expires");
    let t = ttl(&m.addr(), "t:ttl").unwrap();
    assert!((55..=60).contains(&t), "ttl {t}");
    wait_until("t:short to expire", WAIT, || async { m.get_raw("t:short").is_none().then_some(()) }).await;
    assert!(m.get_raw("t:ttl").is_some());
}

#[tokio::test]
async fn values_within_the_documented_size_limit_are_stored() {
    // memcached's default item size limit is 1 MB, as is max_item_size's.
    let m = Memcached::start();
    let cfg = mc_config(&[&m]);
    let sink = Sink::connect(&cfg);
    let key = "t:".to_owned() + &"k".repeat(248);
    let fits = vec![b'v'; cfg.max_item_size - key.len() - ITEM_OVERHEAD];
    sink.apply(&[set(&key, &fits, 5, 0)]).await.unwrap();
    assert_eq!(m.get_raw(&key).map(|v| v.0.len()), Some(fits.len()));
    // a value of the whole limit is refused by the server (the overhead is
    // real): that entry alone is rejected, naming the server, the key and
    // the server's reason; the ops around it in the same batch are applied
    let ops =
        [set("t:before", b"1", 0, 0), set("t:whole", &vec![b'v'; cfg.max_item_size], 0, 0), set("t:after", b"2", 0, 0)];
    let applied = sink.apply(&ops).await.unwrap();
    assert_eq!(applied.rejected.len(), 1, "{:?}", applied.rejected);
    let r = &applied.rejected[0];
    assert_eq!((r.server.as_str(), r.key.as_slice()), (m.addr().as_str(), &b"t:whole"[..]));
    assert!(r.reason.contains("SERVER_ERROR") && r.reason.contains("too large"), "{}", r.reason);
    assert!(r.to_string().contains(&m.addr()) && r.to_string().contains("t:whole"), "{r}");
    assert_eq!(m.get_raw("t:before"), Some((b"1".to_vec(), 0)));
    assert_eq!(m.get_raw("t:after"), Some((b"2".to_vec(), 0)));
    assert_eq!(m.get_raw("t:whole"), None);
    assert!(!sink.lost_state().await || sink.expected_epoch().is_none(), "a refused entry is not a lost state");
    assert_eq!(sink.health(), vec![(m.addr(), true)]);
}

#[tokio::test]
async fn lost_state_after_restart_or_flush() {
    let mut a = Memcached::start();
    let b = Memcached::start();
    let sink = Sink::connect(&mc_config(&[&a, &b]));
    assert!(sink.lost_state().await, "no epoch known yet");
    let token = sink.mark_epoch().await.unwrap();
    assert_eq!(a.get_raw("t:_tailcache:epoch"), Some((token.clone(), 0)));
    assert_eq!(b.get_raw("t:_tailcache:epoch"), Some((token, 0)));
    assert!(!sink.lost_state().await);

    a.restart_empty();
    wait_until("lost_state after restart_empty", WAIT, || async { sink.lost_state().await.then_some(()) }).await;
    // stays lost until a new epoch is marked
    assert!(sink.lost_state().await);
    wait_until("mark_epoch after restart", WAIT, || async { sink.mark_epoch().await.ok() }).await;
    assert!(!sink.lost_state().await);

    assert_eq!(command(&b.addr(), "flush_all\r\n"), "OK\r\n");
    assert!(sink.lost_state().await, "flush_all on one server is noticed");
}

#[tokio::test]
async fn errors_while_stopped_then_success_after_restart() {
    let mut m = Memcached::start();
    let sink = Sink::connect(&mc_config(&[&m]));
    sink.mark_epoch().await.unwrap();
    sink.apply(&[set("t:a", b"1", 0, 0)]).await.unwrap();
    m.stop();
    let e = sink.apply(&[set("t:a", b"2", 0, 0)]).await.unwrap_err();
    assert_eq!(e.server(), m.addr());
    assert!(e.to_string().contains(&m.addr()), "{e}");
    assert!(sink.get(b"t:a").await.is_err());
    assert!(sink.lost_state().await, "a failed exchange marks the state lost");
    m.restart_empty();
    wait_until("apply after restart", WAIT, || async { sink.apply(&[set("t:a", b"3", 0, 0)]).await.ok() }).await;
    assert_eq!(m.get_raw("t:a"), Some((b"3".to_vec(), 0)));
}

// ---------------------------------------------------------------------------
// The publisher worker over a hand-made replica
// ---------------------------------------------------------------------------

const VIEWS: &str = r#"
[[views]]
name = "app"
key = "app:{id}"
query = "SELECT id, name FROM application"

[[views]]
name = "names"
key = "names"
shape = "list"
value_column = "name"
query = "SELECT name FROM application ORDER BY id"
"#;

fn publisher_config(state: &Path, m: &Memcached, views: &str) -> Arc<Config> {
    let text = format!(
        "[mysql]\nurl = \"mysql://u@127.0.0.1:3306/appdb\"\nserver_id = 7\ntables = [\"application\"]\n\
         [state]\npath = \"{}\"\n[memcached]\nservers = [\"{}\"]\nkey_prefix = \"t:\"\ncoalesce_ms = 5\n{views}",
        state.display(),
        m.addr()
    );
    let cfg = Config::from_toml(&text).unwrap();
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    Arc::new(cfg)
}

/// A replica file with `application` and a consistent checkpoint.
fn replica(state: &Path, cfg: &Config) -> rusqlite::Connection {
    let conn = tailcache::replica::open_connection(state, &cfg.mysql.table_refs()).unwrap();
    conn.execute_batch(
        "CREATE TABLE application (id INTEGER PRIMARY KEY, name TEXT);
         INSERT INTO application VALUES (1, 'ann'), (2, 'bob');
         UPDATE _tailcache_state SET file = 'bin.000001', pos = 4, consistent = 1;",
    )
    .unwrap();
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
        // Rows unknown: the views are recomputed in full.
        changes: Default::default(),
    }
}

fn names(m: &Memcached) -> Option<rmpv::Value> {
    m.get_raw("t:names").map(|(b, _)| rmpv::decode::read_value(&mut b.as_slice()).unwrap())
}

fn names_are(m: &Memcached, want: &[&str]) -> Option<()> {
    let want = rmpv::Value::Array(want.iter().map(|s| (*s).into()).collect());
    (names(m) == Some(want)).then_some(())
}

#[tokio::test]
async fn publisher_publishes_repairs_and_survives_memcached_outages() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let mut m = Memcached::start();
    let cfg = publisher_config(&state, &m, VIEWS);
    let conn = replica(&state, &cfg);
    let (tx, rx) = tailcache::replica::action::notice_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let handle = spawn_publisher(cfg.clone(), state.clone(), rx, stop_rx, Default::default());

    // start-up: the replica is consistent, so everything is published
    // without any message
    wait_until("initial publish", WAIT, || async { names_are(&m, &["ann", "bob"]) }).await;
    assert!(m.get_raw("t:app:1").is_some() && m.get_raw("t:app:2").is_some());
    assert!(m.get_raw("t:_tailcache:epoch").is_some());

    // a committed change: changed key set, removed key deleted, the
    // untouched key not rewritten (its CAS stays)
    let cas_before = command(&m.addr(), "mg t:app:1 c\r\n");
    conn.execute_batch("UPDATE application SET name = 'bobby' WHERE id = 2; INSERT INTO application VALUES (3, 'cy');")
        .unwrap();
    tx.send(committed(100)).unwrap();
    wait_until("update published", WAIT, || async { names_are(&m, &["ann", "bobby", "cy"]) }).await;
    assert!(m.get_raw("t:app:3").is_some());
    assert_eq!(command(&m.addr(), "mg t:app:1 c\r\n"), cas_before, "unchanged entry was rewritten");

    // memcached restarted empty: repaired without any binlog event
    m.restart_empty();
    wait_until("republish after restart", WAIT, || async { names_are(&m, &["ann", "bobby", "cy"]) }).await;
    assert!(m.get_raw("t:app:1").is_some());

    // memcached down while changes commit: the publisher keeps draining,
    // and publishes the latest state once memcached is back
    m.stop();
    for (i, name) in ["d1", "d2", "d3"].iter().enumerate() {
        conn.execute("UPDATE application SET name = ?1 WHERE id = 1", [name]).unwrap();
        tx.send(committed(200 + i as u64)).unwrap();
    }
    conn.execute("DELETE FROM application WHERE id = 3", []).unwrap();
    tx.send(committed(300)).unwrap();
    m.restart_empty();
    wait_until("publish after outage", WAIT, || async { names_are(&m, &["d3", "bobby"]) }).await;
    assert_eq!(m.get_raw("t:app:3"), None);

    stop_tx.send(true).unwrap();
    let r = tokio::task::spawn_blocking(move || handle.join()).await.unwrap();
    assert!(matches!(r, Ok(Ok(()))), "{r:?}");

    // restart of tailcache with one view removed from the config: its
    // keys are deleted, the other view's unchanged entry is not rewritten
    let cas_names = command(&m.addr(), "mg t:names c\r\n");
    let one_view = &VIEWS[VIEWS.find("[[views]]\nname = \"names\"").unwrap()..];
    let cfg = publisher_config(&state, &m, one_view);
    let (_tx, rx) = tailcache::replica::action::notice_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let handle = spawn_publisher(cfg, state.clone(), rx, stop_rx, Default::default());
    wait_until("keys of the removed view deleted", WAIT, || async {
        (m.get_raw("t:app:1").is_none() && m.get_raw("t:app:2").is_none()).then_some(())
    })
    .await;
    assert_eq!(command(&m.addr(), "mg t:names c\r\n"), cas_names);
    stop_tx.send(true).unwrap();
    let r = tokio::task::spawn_blocking(move || handle.join()).await.unwrap();
    assert!(matches!(r, Ok(Ok(()))), "{r:?}");
}

#[tokio::test]
async fn publisher_reports_and_skips_views_that_do_not_compile() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let m = Memcached::start();
    let views = format!("{VIEWS}\n[[views]]\nname = \"bad\"\nkey = \"b:{{id}}\"\nquery = \"SELECT id FROM nope\"\n");
    let cfg = publisher_config(&state, &m, &views);
    let _conn = replica(&state, &cfg);
    let (tx, rx) = tailcache::replica::action::notice_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let status = Arc::new(tailcache::status::Status::new());
    let handle = spawn_publisher(cfg, state, rx, stop_rx, status.clone());
    tx.send(committed(10)).unwrap();
    // The good views are published; the bad one is reported, not fatal.
    wait_until("the good view to be published", Duration::from_secs(20), || async { m.get_raw("t:app:1").map(|_| ()) })
        .await;
    let s = status.snapshot();
    let e = s.views.get("bad").and_then(|v| v.last_error.clone()).unwrap_or_default();
    assert!(
        e.contains("nope") && e.contains("mysql.tables"),
        "the view's error names the table and the setting: {e:?}"
    );
    assert!(
        s.not_ready(true).iter().any(|r| r.contains("view bad")),
        "readiness names the view: {:?}",
        s.not_ready(true)
    );
    assert!(m.get_raw("t:b:1").is_none());
    stop_tx.send(true).unwrap();
    let r = tokio::task::spawn_blocking(move || handle.join()).await.unwrap();
    assert!(matches!(r, Ok(Ok(()))), "{r:?}");
}

#[tokio::test]
async fn publisher_waits_for_a_consistent_replica_before_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let m = Memcached::start();
    let cfg = publisher_config(&state, &m, VIEWS);
    let (tx, rx) = tailcache::replica::action::notice_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let handle = spawn_publisher(cfg.clone(), state.clone(), rx, stop_rx, Default::default());
    // No tables, no checkpoint yet: a message must not make the views fail.
    tx.send(committed(4)).unwrap();
    let conn = wait_until("state file", WAIT, || async {
        tailcache::replica::open_connection(&state, &cfg.mysql.table_refs()).ok()
    })
    .await;
    assert!(!handle.is_finished(), "the publisher stopped before the replica existed");
    conn.execute_batch(
        "CREATE TABLE application (id INTEGER PRIMARY KEY, name TEXT);
         INSERT INTO application VALUES (1, 'ann');",
    )
    .unwrap();
    let updated = conn.execute("UPDATE _tailcache_state SET file = 'bin.000001', pos = 4, consistent = 1", []).unwrap();
    assert_eq!(updated, 1, "the state file opened without its state row");
    tx.send(Committed { full: true, ..committed(5) }).unwrap();
    wait_until("publish once consistent", WAIT, || async { names_are(&m, &["ann"]) }).await;
    stop_tx.send(true).unwrap();
    let r = tokio::task::spawn_blocking(move || handle.join()).await.unwrap();
    assert!(matches!(r, Ok(Ok(()))), "{r:?}");
}
