//! An `XA COMMIT` of a transaction tailcache never staged (prepared while
//! it was stopped, before the snapshot of a `--resync` start): its rows
//! are unknown, so the watched tables are snapshotted again at once (a
//! warning names the xid), and the row is in memcached within 2 s of the
//! commit, not at the next periodic resync.
//!
//! MariaDB's snapshot passes the prepared transaction, so its COMMIT is
//! the unknown one and re-snapshots. MySQL's snapshot (LOCK TABLES) waits
//! for it, even once its client has gone, and takes its rows in when it
//! commits: the same deadline holds, by another path.

use std::time::{Duration, Instant};

use mysql_async::prelude::*;

use crate::events::{SCHEMA, cached_name, config, replica_name, xa_prepare};
use crate::harness::{self, Daemon, Flavor, Memcached, wait_until};
use crate::replica::{assert_replica_matches, wait_caught_up};

#[tokio::test(flavor = "multi_thread")]
async fn xa_prepared_while_stopped_is_in_memcached_within_2s_of_its_commit() {
    prepared_while_stopped("xa_unstaged", false).await;
}

/// The same when the client that prepared it has gone (the transaction
/// stays prepared; another session commits it).
#[tokio::test(flavor = "multi_thread")]
async fn xa_prepared_while_stopped_by_a_client_that_left_is_in_memcached_within_2s_of_its_commit() {
    prepared_while_stopped("xa_unstaged_left", true).await;
}

async fn prepared_while_stopped(hint: &str, client_leaves: bool) {
    // A server of its own: an XA COMMIT unknown to a tailcache re-snapshots
    // every tailcache reading that binlog (the other tests' daemons).
    let private = tokio::task::spawn_blocking(|| harness::start_private_server(&[])).await.unwrap();
    let db = private.create_db(hint).await;
    let mut conn = db.root_conn().await;
    conn.query_drop(SCHEMA).await.unwrap();
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    // A short lock wait: on MySQL the snapshot waits for the prepared
    // transaction (LOCK TABLES) and retries.
    let cfg = config(&db, &state, &mc).replace("[state]", "snapshot_lock_wait = 1\n[state]");
    let mut daemon = Daemon::start(&cfg);
    wait_caught_up(&db, &state, &daemon).await;
    wait_until("app:1 = test0 in memcached", Duration::from_secs(30), || async {
        (cached_name(&mc, 1).as_deref() == Some("test0")).then_some(())
    })
    .await;
    daemon.stop();

    // Prepared while tailcache is stopped; it starts with a new snapshot,
    // which cannot see the prepared rows, and streams from after the
    // PREPARE.
    xa_prepare(&mut conn, "gap", "prepared-while-stopped").await;
    if client_leaves {
        conn.disconnect().await.unwrap();
        conn = db.root_conn().await;
    }
    let mut daemon = Daemon::start_args(&cfg, &["--resync"]);
    wait_until(
        "the snapshot to be taken (MariaDB) or to wait for the XA transaction (MySQL)",
        Duration::from_secs(60),
        || async {
            let l = daemon.log();
            let snapshotted = l.contains("streaming binlog");
            let waiting = l.contains("snapshot: an open transaction");
            (snapshotted || waiting).then_some(())
        },
    )
    .await;
    if harness::flavor() == Flavor::MariaDb {
        // The stale value is what the new snapshot published.
        wait_until("the --resync publish", Duration::from_secs(30), || async {
            daemon.log().contains("resync finished").then_some(())
        })
        .await;
        assert_eq!(cached_name(&mc, 1).as_deref(), Some("test0"));
    }
    conn.query_drop("XA COMMIT 'gap'").await.unwrap();
    let committed = Instant::now();
    wait_until(
        &format!("app:1 = prepared-while-stopped in memcached within 2 s of the XA COMMIT (log:\n{})", daemon.log()),
        Duration::from_secs(2),
        || async { (cached_name(&mc, 1).as_deref() == Some("prepared-while-stopped")).then_some(()) },
    )
    .await;
    eprintln!("in memcached {} ms after the XA COMMIT", committed.elapsed().as_millis());
    let log = daemon.log();
    if harness::flavor() == Flavor::MariaDb {
        // MariaDB snapshots past the prepared transaction: its COMMIT is
        // the unknown one, re-snapshotted at once and said so.
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains("XA COMMIT 'gap'")
                && l.contains("re-snapshotting the watched tables now")),
            "no warning naming the xid:\n{log}"
        );
    }
    assert!(daemon.is_running(), "the daemon must survive an unknown xid:\n{log}");
    assert!(!log.contains("replica needs a fresh snapshot"), "an unknown xid is not an error:\n{log}");
    wait_caught_up(&db, &state, &daemon).await;
    assert_eq!(replica_name(&state, 1).as_deref(), Some("prepared-while-stopped"));
    assert_replica_matches(&db, &state, "application", &["id"]).await;
}
