//! Every binlog event that changes rows reaches the replica and the cache
//! exactly when MySQL commits it: XA (two-phase, one-phase, across a
//! restart, rolled back), statement-format DML, CREATE TABLE … SELECT, and
//! partial JSON updates (MySQL).

use std::path::{Path, PathBuf};
use std::time::Duration;

use mysql_async::Conn;
use mysql_async::prelude::*;

use crate::harness::{self, Daemon, Flavor, Memcached, TestDb};
use crate::replica::{assert_replica_matches, master_position, replica_config, wait_caught_up};

pub(crate) const SCHEMA: &str =
    "CREATE TABLE application (id INT PRIMARY KEY, name VARCHAR(128) NOT NULL) DEFAULT CHARSET=utf8mb4;
INSERT INTO application VALUES (1, 'test0'), (2, 'billing');";

pub(crate) fn config(db: &TestDb, state: &Path, mc: &Memcached) -> String {
    format!(
        "{}\n[memcached]\nservers = [\"{}\"]\nkey_prefix = \"ev:\"\ncodec = \"json\"\n\n[[views]]\nname = \"app\"\nkey = \"app:{{id}}\"\nquery = \"SELECT id, name FROM application\"\n",
        replica_config(db, state, &["application"]),
        mc.addr()
    )
}

/// The name tailcache published for application `id`, read from memcached.
pub(crate) fn cached_name(mc: &Memcached, id: i32) -> Option<String> {
    let (v, _) = mc.get_raw(&format!("ev:app:{id}"))?;
    let j: serde_json::Value = serde_json::from_slice(&v).expect("a JSON value");
    j.get("name").and_then(|n| n.as_str()).map(str::to_owned)
}

pub(crate) fn replica_name(state: &Path, id: i32) -> Option<String> {
    let c = rusqlite::Connection::open_with_flags(state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    c.busy_timeout(Duration::from_secs(5)).ok()?;
    c.query_row("SELECT name FROM application WHERE id = ?1", [id], |r| r.get(0)).ok()
}

struct Setup {
    db: TestDb,
    mc: Memcached,
    _dir: tempfile::TempDir,
    state: PathBuf,
    cfg: String,
    daemon: Daemon,
}

async fn setup(hint: &str) -> Setup {
    let db = harness::server().create_db(hint).await;
    let mut conn = db.root_conn().await;
    conn.query_drop(SCHEMA).await.unwrap();
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let cfg = config(&db, &state, &mc);
    let daemon = Daemon::start(&cfg);
    wait_caught_up(&db, &state, &daemon).await;
    wait_cached(&mc, 1, "test0", &daemon).await;
    Setup { db, mc, _dir: dir, state, cfg, daemon }
}

async fn wait_cached(mc: &Memcached, id: i32, want: &str, daemon: &Daemon) {
    let what = format!("memcached to hold app:{id} = {want:?} (daemon log:\n{})", daemon.log());
    harness::wait_until(&what, Duration::from_secs(30), || async move {
        (cached_name(mc, id).as_deref() == Some(want)).then_some(())
    })
    .await;
}

/// Runs an XA transaction that renames application 1 up to PREPARE.
pub(crate) async fn xa_prepare(conn: &mut Conn, xid: &str, name: &str) {
    conn.query_drop(format!("XA START '{xid}'")).await.unwrap();
    conn.query_drop(format!("UPDATE application SET name = '{name}' WHERE id = 1")).await.unwrap();
    conn.query_drop(format!("XA END '{xid}'")).await.unwrap();
    conn.query_drop(format!("XA PREPARE '{xid}'")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn xa_prepared_then_rolled_back_never_reaches_the_replica_or_the_cache() {
    let s = setup("xa_rollback").await;
    let mut conn = s.db.root_conn().await;
    xa_prepare(&mut conn, "a1", "NEVER_COMMITTED").await;
    // The PREPARE is in the binlog and applied (staged): nothing visible.
    wait_caught_up(&s.db, &s.state, &s.daemon).await;
    assert_eq!(replica_name(&s.state, 1).as_deref(), Some("test0"));
    assert_eq!(cached_name(&s.mc, 1).as_deref(), Some("test0"));
    conn.query_drop("XA ROLLBACK 'a1'").await.unwrap();
    // Any later commit must not drag the prepared rows in either.
    conn.query_drop("UPDATE application SET name = 'billing2' WHERE id = 2").await.unwrap();
    wait_caught_up(&s.db, &s.state, &s.daemon).await;
    wait_cached(&s.mc, 2, "billing2", &s.daemon).await;
    assert_eq!(replica_name(&s.state, 1).as_deref(), Some("test0"));
    assert_eq!(cached_name(&s.mc, 1).as_deref(), Some("test0"));
    assert_replica_matches(&s.db, &s.state, "application", &["id"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn xa_commit_two_phase_and_one_phase_apply_with_no_later_commit() {
    let s = setup("xa_commit").await;
    let mut conn = s.db.root_conn().await;
    xa_prepare(&mut conn, "two", "two-phase").await;
    wait_caught_up(&s.db, &s.state, &s.daemon).await;
    assert_eq!(replica_name(&s.state, 1).as_deref(), Some("test0"), "applied before XA COMMIT");
    assert_eq!(cached_name(&s.mc, 1).as_deref(), Some("test0"), "published before XA COMMIT");
    conn.query_drop("XA COMMIT 'two'").await.unwrap();
    // Nothing else commits after: the XA COMMIT alone must publish.
    wait_cached(&s.mc, 1, "two-phase", &s.daemon).await;

    conn.query_drop("XA START 'one'").await.unwrap();
    conn.query_drop("UPDATE application SET name = 'one-phase' WHERE id = 2").await.unwrap();
    conn.query_drop("XA END 'one'").await.unwrap();
    conn.query_drop("XA COMMIT 'one' ONE PHASE").await.unwrap();
    wait_cached(&s.mc, 2, "one-phase", &s.daemon).await;
    wait_caught_up(&s.db, &s.state, &s.daemon).await;
    assert_replica_matches(&s.db, &s.state, "application", &["id"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn xa_prepared_survives_a_restart_of_tailcache() {
    let mut s = setup("xa_restart").await;
    let mut conn = s.db.root_conn().await;
    xa_prepare(&mut conn, "r1", "after-restart").await;
    wait_caught_up(&s.db, &s.state, &s.daemon).await;
    assert_eq!(replica_name(&s.state, 1).as_deref(), Some("test0"), "applied before XA COMMIT");
    s.daemon.stop();
    let first_log = s.daemon.log();
    // Committed while tailcache is down: the staged rows must be applied
    // when it comes back and reads the XA COMMIT.
    conn.query_drop("XA COMMIT 'r1'").await.unwrap();
    let daemon = Daemon::start(&s.cfg);
    wait_cached(&s.mc, 1, "after-restart", &daemon).await;
    wait_caught_up(&s.db, &s.state, &daemon).await;
    assert_replica_matches(&s.db, &s.state, "application", &["id"]).await;
    assert!(
        !daemon.log().contains("taking a snapshot"),
        "a restart must resume:\n{}\n(before the restart:\n{first_log})",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn xa_prepared_before_the_first_snapshot_is_applied_when_it_commits() {
    // A server of its own: the COMMIT of an XA transaction prepared before
    // a snapshot makes every tailcache reading that binlog take a new
    // snapshot, which would break the other tests' "no snapshot" checks
    // (seen: xa_prepared_survives_a_restart_of_tailcache).
    let private = tokio::task::spawn_blocking(|| harness::start_private_server(&[])).await.unwrap();
    let db = private.create_db("xa_early").await;
    let mut conn = db.root_conn().await;
    conn.query_drop(SCHEMA).await.unwrap();
    // Prepared before tailcache ever ran: its PREPARE precedes the stream
    // and its rows are invisible to the snapshot.
    xa_prepare(&mut conn, "early", "prepared-before-start").await;
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let cfg = config(&db, &state, &mc).replace("[state]", "snapshot_lock_wait = 1\n[state]");
    let daemon = Daemon::start(&cfg);
    // MariaDB snapshots past the prepared transaction; MySQL's LOCK TABLES
    // waits for it (and retries) until it commits.
    let log = || daemon.log();
    harness::wait_until(
        "the snapshot to be taken or to wait for the XA transaction",
        Duration::from_secs(60),
        || async {
            let l = log();
            (l.contains("snapshot taken") || l.contains("snapshot: an open transaction")).then_some(())
        },
    )
    .await;
    conn.query_drop("XA COMMIT 'early'").await.unwrap();
    wait_cached(&mc, 1, "prepared-before-start", &daemon).await;
    wait_caught_up(&db, &state, &daemon).await;
    assert_eq!(replica_name(&state, 1).as_deref(), Some("prepared-before-start"));
    assert_replica_matches(&db, &state, "application", &["id"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn statement_format_dml_on_a_watched_table_converges() {
    let s = setup("stmt_dml").await;
    let mut conn = s.db.root_conn().await;
    conn.query_drop("SET SESSION binlog_format = 'STATEMENT'").await.unwrap();
    conn.query_drop("UPDATE application SET name = 'by-statement' WHERE id = 1").await.unwrap();
    conn.query_drop("INSERT INTO application VALUES (3, 'inserted-by-statement')").await.unwrap();
    conn.query_drop("SET SESSION binlog_format = 'ROW'").await.unwrap();
    wait_cached(&s.mc, 1, "by-statement", &s.daemon).await;
    wait_cached(&s.mc, 3, "inserted-by-statement", &s.daemon).await;
    wait_caught_up(&s.db, &s.state, &s.daemon).await;
    assert_replica_matches(&s.db, &s.state, "application", &["id"]).await;
    let log = s.daemon.log();
    assert!(log.contains("binlog_format=STATEMENT or MIXED"), "the warning names the session setting:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn create_table_select_of_a_watched_table_is_applied_whole() {
    let s = setup("ctas").await;
    let mut conn = s.db.root_conn().await;
    conn.query_drop("CREATE TABLE src (id INT PRIMARY KEY, name VARCHAR(128) NOT NULL)").await.unwrap();
    conn.query_drop("INSERT INTO src VALUES (1, 'from-ctas'), (7, 'seven')").await.unwrap();
    conn.query_drop("DROP TABLE application").await.unwrap();
    conn.query_drop("CREATE TABLE application (PRIMARY KEY (id)) SELECT id, name FROM src").await.unwrap();
    wait_cached(&s.mc, 7, "seven", &s.daemon).await;
    wait_cached(&s.mc, 1, "from-ctas", &s.daemon).await;
    wait_caught_up(&s.db, &s.state, &s.daemon).await;
    assert_replica_matches(&s.db, &s.state, "application", &["id"]).await;
    // The stored checkpoint is a transaction boundary: the server's own end.
    let end = master_position(&mut conn).await;
    let c = rusqlite::Connection::open(&s.state).unwrap();
    let (f, p): (String, i64) =
        c.query_row("SELECT file, pos FROM _tailcache_state WHERE id = 1", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((f, p as u64), (end.file, end.pos));
}

/// Random JSON documents changed in place with JSON_SET / JSON_REPLACE /
/// JSON_REMOVE under `binlog_row_value_options=PARTIAL_JSON`: the replica
/// must hold exactly what `SELECT` returns.
#[tokio::test(flavor = "multi_thread")]
async fn partial_json_updates_equal_select() {
    let db = harness::server().create_db("partial_json").await;
    let mut conn = db.root_conn().await;
    if harness::server().flavor == Flavor::MariaDb {
        // MariaDB has no partial JSON logging: the session setting that
        // would produce PARTIAL_UPDATE_ROWS events does not exist.
        let r = conn.query_drop("SET SESSION binlog_row_value_options = 'PARTIAL_JSON'").await;
        assert!(r.is_err(), "MariaDB accepted binlog_row_value_options; partial JSON needs testing there");
        return;
    }
    conn.query_drop("CREATE TABLE docs (id INT PRIMARY KEY, j JSON, n INT)").await.unwrap();
    let docs = [
        r#"{"a": 1, "b": [1, 2, 3], "c": {"d": "x", "e": null}}"#,
        r#"{"name": "tail", "tags": ["a", "b"], "n": 1.5, "deep": {"k": [1, {"z": true}]}}"#,
        r#"[1, "two", {"three": 3}]"#,
        r#"{"zz": 1, "a": 2, "mmm": [], "bb": {}}"#,
    ];
    for (i, d) in docs.iter().enumerate() {
        conn.exec_drop("INSERT INTO docs VALUES (?, ?, 0)", (i as i32 + 1, *d)).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let daemon = Daemon::start(&replica_config(&db, &state, &["docs"]));
    wait_caught_up(&db, &state, &daemon).await;
    conn.query_drop("SET SESSION binlog_row_value_options = 'PARTIAL_JSON'").await.unwrap();
    let updates = [
        "UPDATE docs SET j = JSON_SET(j, '$.a', 42) WHERE id = 1",
        "UPDATE docs SET j = JSON_REPLACE(j, '$.b[1]', 'two') WHERE id = 1",
        "UPDATE docs SET j = JSON_REMOVE(j, '$.c.e') WHERE id = 1",
        "UPDATE docs SET j = JSON_SET(j, '$.new', JSON_OBJECT('k', 1)) WHERE id = 1",
        "UPDATE docs SET j = JSON_ARRAY_APPEND(j, '$.tags', 'c') WHERE id = 2",
        "UPDATE docs SET j = JSON_SET(j, '$.deep.k[1].z', false, '$.n', 2.25) WHERE id = 2",
        "UPDATE docs SET j = JSON_REMOVE(j, '$[1]') WHERE id = 3",
        "UPDATE docs SET j = JSON_SET(j, '$.a', 'é \"quoted\"'), n = n + 1 WHERE id = 4",
        "UPDATE docs SET j = JSON_INSERT(j, '$.b', 7, '$.mmm[0]', 'x') WHERE id = 4",
        "UPDATE docs SET j = JSON_REPLACE(j, '$.zz', JSON_ARRAY(1, 2)) WHERE id > 3",
    ];
    let mut partial_seen = false;
    for u in updates {
        let before = master_position(&mut conn).await;
        conn.query_drop(u).await.unwrap();
        let rows: Vec<mysql_async::Row> =
            conn.query(format!("SHOW BINLOG EVENTS IN '{}' FROM {}", before.file, before.pos)).await.unwrap();
        partial_seen |= rows
            .iter()
            .any(|r| r.get::<String, _>(2).is_some_and(|t| t.contains("Partial") || t.contains("Transaction_payload")));
    }
    assert!(partial_seen, "the server never logged a partial JSON update: the test exercised nothing");
    wait_caught_up(&db, &state, &daemon).await;
    assert_replica_matches(&db, &state, "docs", &["id"]).await;
}
