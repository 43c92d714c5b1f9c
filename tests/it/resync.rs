//! Full resyncs that read back what memcached holds, and per-entry
//! refusals, against real memcached servers (no MySQL: the publisher reads
//! a hand-made replica file and is driven with `Committed` notices).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tailcache::config::Config;
use tailcache::position::{BinlogPosition, Checkpoint};
use tailcache::status::{ResyncCounts, ResyncReport, Status};
use tailcache::views::{Committed, spawn_publisher};
use tokio::sync::watch;

use crate::harness::{Memcached, wait_until};

const WAIT: Duration = Duration::from_secs(15);

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
query = "SELECT name FROM application WHERE length(name) < 1000 ORDER BY id"
"#;

fn config(state: &Path, servers: &[&Memcached], extra_memcached: &str) -> Arc<Config> {
    config_with(state, servers, extra_memcached, VIEWS)
}

fn config_with(state: &Path, servers: &[&Memcached], extra_memcached: &str, views: &str) -> Arc<Config> {
    let servers: Vec<String> = servers.iter().map(|m| format!("\"{}\"", m.addr())).collect();
    let text = format!(
        "[mysql]\nurl = \"mysql://u@127.0.0.1:3306/appdb\"\nserver_id = 7\ntables = [\"application\"]\n\
         [state]\npath = \"{}\"\n[memcached]\nservers = [{}]\nkey_prefix = \"r:\"\ncoalesce_ms = 5\n{extra_memcached}\n{views}",
        state.display(),
        servers.join(", ")
    );
    let mut cfg = Config::from_toml(&text).unwrap();
    // The resyncs here count tampered keys: the consistency inspector
    // would repair them first.
    cfg.inspect.keys_per_second = 0;
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

/// A publisher on `state`, driven with [`Committed`] notices sent on `tx`.
struct Publisher {
    status: Arc<Status>,
    tx: tailcache::replica::action::NoticeSender,
    stop_tx: watch::Sender<bool>,
    handle: std::thread::JoinHandle<tailcache::Result<()>>,
}

impl Publisher {
    fn start(cfg: &Arc<Config>, state: &Path) -> Publisher {
        let status = Arc::new(Status::new());
        let (tx, rx) = tailcache::replica::action::notice_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let handle = spawn_publisher(cfg.clone(), state.to_owned(), rx, stop_rx, status.clone());
        Publisher { status, tx, stop_tx, handle }
    }

    /// Stops it; it must end without an error.
    async fn stop(self) {
        self.stop_tx.send(true).unwrap();
        let handle = self.handle;
        let r = tokio::task::spawn_blocking(move || handle.join()).await.unwrap();
        assert!(matches!(r, Ok(Ok(()))), "{r:?}");
    }
}

fn committed(pos: u64, full: bool, trigger: Option<&str>) -> Committed {
    Committed {
        touched: vec!["application".into()],
        checkpoint: Checkpoint { position: BinlogPosition::new("bin.000001", pos), gtid: None },
        arrived: Instant::now(),
        full,
        schema_changed: false,
        trigger: trigger.map(str::to_owned),
        // Rows unknown: the views are recomputed in full.
        changes: Default::default(),
    }
}

/// One text-protocol command; the first line of the answer, trimmed.
fn raw_line(m: &Memcached, cmd: &str) -> String {
    let mut s = TcpStream::connect(m.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().to_owned()
}

fn delete_raw(m: &Memcached, key: &str) {
    let line = raw_line(m, &format!("delete {key}"));
    assert!(line == "DELETED" || line == "NOT_FOUND", "{line:?}");
}

/// Asks for a full resync and waits for its report.
async fn resync(
    status: &Status,
    tx: &tailcache::replica::action::NoticeSender,
    pos: u64,
    trigger: &str,
) -> ResyncReport {
    let mut done = status.resync_done();
    let before = *done.borrow_and_update();
    tx.send(committed(pos, true, Some(trigger))).unwrap();
    tokio::time::timeout(WAIT, async {
        while *done.borrow_and_update() == before {
            done.changed().await.unwrap();
        }
    })
    .await
    .expect("resync report");
    status.snapshot().last_resync.expect("last_resync")
}

fn counts(checked: u64, missing: u64, differed: u64, deleted: u64, unchanged: u64) -> ResyncCounts {
    ResyncCounts { checked, missing, differed, deleted, unchanged, ..Default::default() }
}

#[tokio::test]
async fn resync_reads_back_counts_and_repairs_tampered_keys_on_every_server() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let a = Memcached::start();
    let b = Memcached::start();
    let cfg = config(&state, &[&a, &b], "");
    let conn = replica(&state, &cfg, 20);
    let publisher = Publisher::start(&cfg, &state);
    let (status, tx) = (publisher.status.clone(), publisher.tx.clone());

    wait_until("initial publish", WAIT, || async { status.snapshot().published_consistent.then_some(()) }).await;
    let good: Vec<(Vec<u8>, u32)> = (1..=20).map(|i| a.get_raw(&format!("r:app:{i}")).expect("published")).collect();
    for i in 1..=20 {
        assert_eq!(b.get_raw(&format!("r:app:{i}")).as_ref(), Some(&good[i - 1]), "app:{i} on b");
    }
    let s = status.snapshot();
    assert_eq!(s.views["app"].keys, 20);
    assert_eq!(s.views["names"].keys, 1);
    assert!(s.views.values().all(|v| v.last_error.is_none()));
    assert_eq!(s.memcached.get(&a.addr()), Some(&true));
    assert_eq!(s.memcached.get(&b.addr()), Some(&true));
    assert!(s.publish_error.is_none());
    let lp = s.last_publish.expect("last_publish");
    assert!(lp.position.contains("bin.000001"), "{}", lp.position);
    assert!(lp.at_unix > 0.0);

    // Tamper: other bytes (on a), other flags (on b), deleted (a; b; both),
    // and a key the view no longer produces (its row removed behind the
    // publisher's back) overwritten by someone else.
    a.set_raw("r:app:1", b"tampered", 0);
    b.set_raw("r:app:2", &good[1].0, 9);
    delete_raw(&a, "r:app:3");
    delete_raw(&b, "r:app:4");
    delete_raw(&a, "r:app:5");
    delete_raw(&b, "r:app:5");
    conn.execute("DELETE FROM application WHERE id = 20", []).unwrap();
    a.set_raw("r:app:20", b"foreign", 0);

    let report = resync(&status, &tx, 100, "test-tamper").await;
    assert_eq!(report.trigger, "test-tamper");
    assert_eq!(report.views["app"], counts(19, 3, 2, 1, 14), "{report:?}");
    // the list lost its last name: differs on both servers, counted once
    assert_eq!(report.views["names"], counts(1, 0, 1, 0, 0), "{report:?}");
    assert_eq!(report.total, counts(20, 3, 3, 1, 14));
    let seq = report.seq;

    // repaired, as read back from both servers
    for m in [&a, &b] {
        for i in 1..=19 {
            assert_eq!(m.get_raw(&format!("r:app:{i}")).as_ref(), Some(&good[i - 1]), "app:{i} on {}", m.addr());
        }
        assert_eq!(m.get_raw("r:app:20"), None, "stale key on {}", m.addr());
        let names = m.get_raw("r:names").unwrap().0;
        let names = rmpv::decode::read_value(&mut names.as_slice()).unwrap();
        assert_eq!(names.as_array().unwrap().len(), 19);
    }
    assert_eq!(status.snapshot().views["app"].keys, 19);

    // nothing left to repair: everything checked and unchanged
    let report = resync(&status, &tx, 101, "again").await;
    assert_eq!(report.total, counts(20, 0, 0, 0, 20), "{report:?}");
    assert_eq!(report.seq, seq + 1);

    publisher.stop().await;
}

#[tokio::test]
async fn resync_deletes_a_stale_key_that_only_one_server_still_holds() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let a = Memcached::start();
    let b = Memcached::start();
    let cfg = config(&state, &[&a, &b], "");
    let conn = replica(&state, &cfg, 3);
    let publisher = Publisher::start(&cfg, &state);
    let (status, tx) = (publisher.status.clone(), publisher.tx.clone());
    wait_until("initial publish", WAIT, || async { status.snapshot().published_consistent.then_some(()) }).await;
    assert!(a.get_raw("r:app:3").is_some() && b.get_raw("r:app:3").is_some());

    // The row leaves behind the publisher's back; a lost the key (say it
    // restarted), b still serves it.
    conn.execute("DELETE FROM application WHERE id = 3", []).unwrap();
    delete_raw(&a, "r:app:3");
    let report = resync(&status, &tx, 100, "test-stale").await;
    assert_eq!(report.views["app"], counts(2, 0, 0, 1, 2), "{report:?}");
    for m in [&a, &b] {
        assert_eq!(m.get_raw("r:app:3"), None, "stale key on {}", m.addr());
    }
    // Gone from the bookkeeping too: nothing left to delete.
    let report = resync(&status, &tx, 101, "again").await;
    assert_eq!(report.total, counts(3, 0, 0, 0, 3), "{report:?}");

    publisher.stop().await;
}

#[tokio::test]
async fn a_view_renamed_with_its_key_template_keeps_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let m = Memcached::start();
    let before = config(&state, &[&m], "");
    let _conn = replica(&state, &before, 3);
    let publisher = Publisher::start(&before, &state);
    let status = &publisher.status;
    wait_until("first publish", WAIT, || async { status.snapshot().published_consistent.then_some(()) }).await;
    assert!(m.get_raw("r:app:1").is_some());
    publisher.stop().await;

    // The same view under another name: its keys are the old view's keys.
    let renamed = VIEWS.replacen("name = \"app\"", "name = \"application\"", 1);
    let after = config_with(&state, &[&m], "", &renamed);
    let publisher = Publisher::start(&after, &state);
    let status = &publisher.status;
    wait_until("the old view's keys forgotten", WAIT, || async {
        let s = status.snapshot();
        (s.published_consistent && !s.views.contains_key("app")).then_some(())
    })
    .await;
    for i in 1..=3 {
        assert!(m.get_raw(&format!("r:app:{i}")).is_some(), "r:app:{i} deleted as the old view's key");
    }
    assert_eq!(status.snapshot().views["application"].keys, 3);
    publisher.stop().await;
}

#[tokio::test]
async fn resync_with_dogpile_ignores_the_creation_time_and_touches_ttls() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let m = Memcached::start();
    let cfg = config(&state, &[&m], "codec = \"dogpile\"\nexptime = 3600\n");
    let _conn = replica(&state, &cfg, 3);
    let publisher = Publisher::start(&cfg, &state);
    let (status, tx) = (publisher.status.clone(), publisher.tx.clone());
    wait_until("initial publish", WAIT, || async { status.snapshot().published_consistent.then_some(()) }).await;
    let before = m.get_raw("r:app:1").unwrap();
    // the recomputed entries carry another `ct`, yet they are the same
    tokio::time::sleep(Duration::from_millis(20)).await;
    // someone shortened the TTL of one entry
    assert_eq!(raw_line(&m, "mg r:app:1 T100"), "HD");
    let report = resync(&status, &tx, 100, "dogpile").await;
    assert_eq!(report.total, counts(4, 0, 0, 0, 4), "{report:?}");
    assert_eq!(m.get_raw("r:app:1"), Some(before), "an identical entry was rewritten");
    // the read-back reset the TTL of the identical entries
    let ttl: i64 =
        raw_line(&m, "mg r:app:1 t").split_whitespace().find_map(|t| t.strip_prefix('t')).unwrap().parse().unwrap();
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
    publisher.stop().await;
}

#[tokio::test]
async fn an_entry_memcached_refuses_is_rejected_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    // memcached takes at most 1 MB items; tailcache is told 2 MB
    let m = Memcached::start_with(&["-I", "1m"]);
    let cfg = config(&state, &[&m], "max_item_size = 2097152\n");
    let conn = replica(&state, &cfg, 3);
    let publisher = Publisher::start(&cfg, &state);
    let (status, tx) = (publisher.status.clone(), publisher.tx.clone());
    wait_until("initial publish", WAIT, || async { status.snapshot().published_consistent.then_some(()) }).await;
    assert!(m.get_raw("r:app:2").is_some());

    // app:2 grows past memcached's limit, app:1 and app:3 change too, in
    // the same publish
    let rejected_before = refused_count();
    let big = "x".repeat(1536 * 1024);
    conn.execute("UPDATE application SET name = ?1 WHERE id = 2", [&big]).unwrap();
    conn.execute("UPDATE application SET name = 'one' WHERE id = 1", []).unwrap();
    conn.execute("UPDATE application SET name = 'three' WHERE id = 3", []).unwrap();
    tx.send(committed(100, false, None)).unwrap();
    let names_are = |want: &[&str]| {
        let want = rmpv::Value::Array(want.iter().map(|s| (*s).into()).collect());
        let got = m.get_raw("r:names").map(|(b, _)| rmpv::decode::read_value(&mut b.as_slice()).unwrap());
        (got == Some(want)).then_some(())
    };
    wait_until("other view published", WAIT, || async { names_are(&["one", "three"]) }).await;
    let app =
        |i: u32| m.get_raw(&format!("r:app:{i}")).map(|(b, _)| rmpv::decode::read_value(&mut b.as_slice()).unwrap());
    assert_eq!(app(1).unwrap()["name"].as_str(), Some("one"));
    assert_eq!(app(3).unwrap()["name"].as_str(), Some("three"));
    // the refused entry is not left stale either
    assert_eq!(app(2), None);
    // The metric and the status follow the publish's bookkeeping, just
    // after memcached has the values (metric first): wait for the status
    // rather than race it.
    let settled = || status.snapshot().views.get("app").is_some_and(|v| v.keys != 3);
    wait_until("the publish recorded in the status", WAIT, || async { settled().then_some(()) }).await;
    assert!(refused_count() > rejected_before, "the refusal is counted in tailcache_entries_rejected_total");
    let s = status.snapshot();
    assert!(s.publish_error.is_none(), "{:?}", s.publish_error);
    assert_eq!(s.views["app"].keys, 2, "the refused entry is not recorded as published");
    assert_eq!(s.memcached.get(&m.addr()), Some(&true));

    // A later commit whose rows are known (it could be published
    // incrementally) still recomputes the view in full once: the refused
    // entry is tried again (and refused again), not left out until its own
    // row changes. The commit is published, and a resync finds the refused
    // entry missing (and is refused again) without failing.
    let refused_once = refused_count();
    conn.execute("UPDATE application SET name = 'uno' WHERE id = 1", []).unwrap();
    let mut known = committed(101, false, None);
    known.changes.tables.push(tailcache::replica::action::TableDelta {
        table: "application".into(),
        columns: 2,
        values: vec![1.into(), "one".to_owned().into(), 1.into(), "uno".to_owned().into()],
    });
    tx.send(known).unwrap();
    wait_until("next publish", WAIT, || async { names_are(&["uno", "three"]) }).await;
    wait_until("the refused entry tried again", WAIT, || async { (refused_count() > refused_once).then_some(()) })
        .await;
    let report = resync(&status, &tx, 102, "after-reject").await;
    assert_eq!(report.views["app"], counts(3, 1, 0, 0, 2), "{report:?}");
    assert!(status.snapshot().publish_error.is_none());
    assert_eq!(app(2), None);

    publisher.stop().await;
}

/// A 100,000-key resync counts every key right whether nothing, a tenth
/// or everything drifted. It prints its timings (the cost bar, 1.5 s with
/// the read-back, is measured in release: `cargo test --release --test it
/// resync_100k -- --nocapture`, figures in BENCHMARKS.md), but asserts
/// none: timing belongs to benchmarks.
#[tokio::test]
async fn resync_100k_keys_counts_every_drift() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let m = Memcached::start_with(&["-m", "512"]);
    let cfg = config(&state, &[&m], "");
    let mut cfg = Arc::unwrap_or_clone(cfg);
    cfg.views.retain(|v| v.name == "app");
    let cfg = Arc::new(cfg);
    let conn = replica(&state, &cfg, 0);
    conn.execute_batch("BEGIN").unwrap();
    for i in 1..=100_000i64 {
        conn.execute("INSERT INTO application VALUES (?1, ?2)", (i, format!("application number {i} with some text")))
            .unwrap();
    }
    conn.execute_batch("COMMIT").unwrap();
    let publisher = Publisher::start(&cfg, &state);
    let (status, tx) = (publisher.status.clone(), publisher.tx.clone());
    wait_until("initial publish", Duration::from_secs(120), || async {
        status.snapshot().published_consistent.then_some(())
    })
    .await;
    let first = status.snapshot().last_resync.unwrap();
    eprintln!(
        "start-up resync (memcached empty): {} keys, {} missing, {} ms",
        first.total.checked, first.total.missing, first.duration_ms
    );

    let t = Instant::now();
    let r = resync(&status, &tx, 100, "bench-unchanged").await;
    eprintln!(
        "resync, all unchanged: {} keys checked in {} ms (wall {} ms)",
        r.total.checked,
        r.duration_ms,
        t.elapsed().as_millis()
    );
    assert_eq!(r.total.unchanged, 100_000);
    let unchanged_ms = r.duration_ms;

    for i in (1..=100_000).step_by(10) {
        if i % 20 == 1 {
            delete_raw(&m, &format!("r:app:{i}"));
        } else {
            m.set_raw(&format!("r:app:{i}"), b"tampered", 0);
        }
    }
    let t = Instant::now();
    let r = resync(&status, &tx, 101, "bench-10pct").await;
    eprintln!(
        "resync, 10% tampered: {} checked, {} missing, {} differed in {} ms (wall {} ms)",
        r.total.checked,
        r.total.missing,
        r.total.differed,
        r.duration_ms,
        t.elapsed().as_millis()
    );
    assert_eq!(r.total.missing + r.total.differed, 10_000);

    assert_eq!(raw_line(&m, "flush_all"), "OK");
    let t = Instant::now();
    let r = resync(&status, &tx, 102, "bench-flushed").await;
    eprintln!(
        "resync, memcached flushed: {} missing in {} ms (wall {} ms)",
        r.total.missing,
        r.duration_ms,
        t.elapsed().as_millis()
    );
    assert_eq!(r.total.missing, 100_000);

    publisher.stop().await;
    eprintln!("100k unchanged keys: {unchanged_ms} ms");
}

/// `tailcache_entries_rejected_total{reason="memcached_refused"}` for the
/// view `app`, as the metrics page shows it.
fn refused_count() -> f64 {
    tailcache::metrics::render()
        .lines()
        .filter(|l| {
            l.starts_with("tailcache_entries_rejected_total{")
                && l.contains("reason=\"memcached_refused\"")
                && l.contains("view=\"app\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
