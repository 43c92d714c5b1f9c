//! The MySQL snapshot method (P0 read under a brief `LOCK TABLES … READ`,
//! replay from P0, consistent after P1), run against the harness's server:
//! a real MySQL with `TAILCACHE_TEST_FLAVOR=mysql`, else the MariaDB
//! presented as MySQL 8.0 (MariaDB has the same LOCK TABLES and SHOW MASTER
//! STATUS).

use std::time::Duration;

use mysql_async::prelude::*;
use tailcache::config::Config;
use tailcache::source::conn::{Flavor, ServerInfo, connect, server_info};
use tailcache::source::snapshot::snapshot;

use crate::harness::{self, TestDb};
use crate::replica::{master_position, replica_config};

async fn as_mysql(cfg: &Config) -> ServerInfo {
    let mut conn = connect(&cfg.mysql).await.unwrap();
    let mut info = server_info(&mut conn).await.unwrap();
    // A real MySQL (TAILCACHE_TEST_MYSQL_URL) keeps its version: 8.4 has
    // no SHOW MASTER STATUS any more.
    if info.flavor == Flavor::MariaDb {
        info.flavor = Flavor::Mysql;
        info.version_tuple = (8, 0, 40);
    }
    info
}

async fn setup(hint: &str) -> (TestDb, Config, tempfile::TempDir, rusqlite::Connection) {
    let db = harness::server().create_db(hint).await;
    db.root_conn()
        .await
        .query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT NOT NULL); INSERT INTO t VALUES (1, 1), (2, 1)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let cfg = Config::from_toml(&replica_config(&db, &state, &["t"])).unwrap();
    let sqlite = tailcache::replica::open_connection(&state, &cfg.mysql.table_refs()).unwrap();
    (db, cfg, dir, sqlite)
}

async fn grant_lock_tables(db: &TestDb) {
    let grant = format!("GRANT LOCK TABLES ON `{}`.* TO '{}'@'%'", db.name, db.user);
    db.root_conn().await.query_drop(grant).await.unwrap();
}

/// An admin's transaction, left open after one statement.
async fn open_transaction(db: &TestDb, statement: &str) -> mysql_async::Conn {
    let mut writer = db.root_conn().await;
    writer.query_drop("BEGIN").await.unwrap();
    writer.query_drop(statement).await.unwrap();
    writer
}

fn replica_v(sqlite: &rusqlite::Connection, id: i64) -> i64 {
    sqlite.query_row("SELECT v FROM t WHERE id = ?1", [id], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_snapshot_waits_for_open_writers_before_reading_its_start_position() {
    let (db, cfg, _dir, sqlite) = setup("snaplock").await;
    grant_lock_tables(&db).await;
    let info = as_mysql(&cfg).await;

    // An admin transaction is open on the watched table when the snapshot starts.
    let before = master_position(&mut db.root_conn().await).await;
    let mut writer = open_transaction(&db, "UPDATE t SET v = 2 WHERE id = 1").await;

    let tables = cfg.mysql.table_refs();
    let snap = snapshot(&cfg.mysql, &info, &tables, &sqlite);
    let commit_when_blocked = async {
        // The snapshot's connection must be waiting for the writer's
        // metadata lock before the writer commits.
        harness::wait_until("the snapshot to wait for the open transaction", Duration::from_secs(30), || {
            let db = &db;
            async move { (!lock_waiters(db).await.is_empty()).then_some(()) }
        })
        .await;
        writer.query_drop("COMMIT").await.unwrap();
    };
    let (outcome, ()) = tokio::join!(snap, commit_when_blocked);
    let outcome = outcome.unwrap();
    assert_eq!(replica_v(&sqlite, 1), 2, "the transaction that held the lock is in the snapshot");
    assert!(outcome.start > before, "replay starts after that transaction ({} <= {before})", outcome.start);
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_snapshot_without_lock_tables_still_works() {
    let (db, cfg, _dir, sqlite) = setup("snapnolock").await;
    // SELECT and replication grants only (the harness also grants LOCK
    // TABLES on MySQL, where tailcache asks for it).
    if harness::server().flavor == harness::Flavor::Mysql {
        let revoke = format!("REVOKE LOCK TABLES ON `{}`.* FROM '{}'@'%'", db.name, db.user);
        db.root_conn().await.query_drop(revoke).await.unwrap();
    }
    let info = as_mysql(&cfg).await;
    let mut conn = db.root_conn().await;
    let before = master_position(&mut conn).await;
    let outcome = snapshot(&cfg.mysql, &info, &cfg.mysql.table_refs(), &sqlite).await.unwrap();
    assert!(outcome.start >= before);
    assert_eq!(outcome.rows, vec![2]);
    assert_eq!(replica_v(&sqlite, 2), 1);
}

/// The connection ids of `user` waiting for a table metadata lock.
async fn lock_waiters(db: &TestDb) -> Vec<u64> {
    harness::processlist(&mut db.root_conn().await)
        .await
        .into_iter()
        .filter(|p| p.user == db.user && p.state.starts_with("Waiting for table metadata lock"))
        .map(|p| p.id)
        .collect()
}

/// Waits until two different snapshot connections have waited for a
/// metadata lock in turn: the first timed out and the snapshot was retried
/// on its own.
async fn wait_for_a_retry(db: &TestDb) {
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    harness::wait_until("the snapshot to time out on a lock and retry", Duration::from_secs(60), || {
        let seen = &seen;
        async move {
            let waiting = lock_waiters(db).await;
            let mut seen = seen.lock().unwrap();
            seen.extend(waiting);
            (seen.len() >= 2).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_snapshot_retries_past_a_long_open_transaction_and_heals() {
    let (db, mut cfg, _dir, sqlite) = setup("snapheal").await;
    grant_lock_tables(&db).await;
    cfg.mysql.snapshot_lock_wait = 1.0;
    let info = as_mysql(&cfg).await;
    // Open longer than snapshot_lock_wait: the first attempt times out.
    let mut writer = open_transaction(&db, "UPDATE t SET v = 3 WHERE id = 2").await;
    let tables = cfg.mysql.table_refs();
    let snap = snapshot(&cfg.mysql, &info, &tables, &sqlite);
    let commit_after_a_retry = async {
        wait_for_a_retry(&db).await;
        writer.query_drop("COMMIT").await.unwrap();
    };
    let (outcome, ()) = tokio::join!(snap, commit_after_a_retry);
    let outcome = outcome.expect("the snapshot completes once the transaction has committed");
    assert_eq!(outcome.rows, vec![2]);
    assert_eq!(replica_v(&sqlite, 2), 3, "the committed row is in the replica");
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_lock_wait_config() {
    let (db, _cfg, dir, _sqlite) = setup("snapcfg").await;
    let base = replica_config(&db, &dir.path().join("x.db"), &["t"]);
    let with = |v: &str| Config::from_toml(&base.replace("[state]", &format!("snapshot_lock_wait = {v}\n[state]")));
    assert_eq!(Config::from_toml(&base).unwrap().mysql.snapshot_lock_wait, 5.0);
    assert_eq!(with("2.5").unwrap().mysql.snapshot_lock_wait, 2.5);
    assert_eq!(with("\"500ms\"").unwrap().mysql.snapshot_lock_wait, 0.5);
    assert_eq!(with("\"1m\"").unwrap().mysql.snapshot_lock_wait, 60.0);
    let p = with("0").unwrap().validate();
    assert!(p.iter().any(|p| p.key == "mysql.snapshot_lock_wait"), "{p:?}");
    let e = with("\"soon\"").unwrap_err();
    assert!(e.contains("snapshot_lock_wait") && e.contains("not a duration"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_blocked_by_a_table_lock_retries_and_heals() {
    // The server's own flavour: on MariaDB the table copy itself waits for
    // the metadata lock (a default lock_wait_timeout of a year would hang
    // the snapshot); on MySQL the LOCK TABLES … READ before it does.
    let (db, mut cfg, _dir, sqlite) = setup("snapmdl").await;
    grant_lock_tables(&db).await;
    cfg.mysql.snapshot_lock_wait = 1.0;
    let info = server_info(&mut connect(&cfg.mysql).await.unwrap()).await.unwrap();
    let mut admin = db.root_conn().await;
    admin.query_drop("LOCK TABLES t WRITE").await.unwrap();
    admin.query_drop("UPDATE t SET v = 4 WHERE id = 2").await.unwrap();
    let tables = cfg.mysql.table_refs();
    let snap = snapshot(&cfg.mysql, &info, &tables, &sqlite);
    let unlock_after_a_retry = async {
        wait_for_a_retry(&db).await;
        admin.query_drop("UNLOCK TABLES").await.unwrap();
    };
    let (outcome, ()) = tokio::join!(snap, unlock_after_a_retry);
    let outcome = outcome.expect("the snapshot completes once the lock is released");
    assert_eq!(outcome.rows, vec![2]);
    assert_eq!(replica_v(&sqlite, 2), 4, "the row written under the lock is in the replica");
}
