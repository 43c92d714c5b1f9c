//! Failures that heal and stops that are prompt: SIGTERM in the middle of
//! a snapshot, a schema change made while tailcache was stopped, a closed
//! log pipe.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;

use crate::harness::{self, Daemon, Flavor, Memcached};
use crate::replica::{assert_replica_matches, replica_config, wait_caught_up};

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process of this test.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Fills `big` with `n` rows in one statement.
async fn fill(conn: &mut mysql_async::Conn, n: u32) {
    conn.query_drop("CREATE TABLE big (id INT PRIMARY KEY, v VARCHAR(40), n BIGINT) ENGINE=InnoDB").await.unwrap();
    let insert = match harness::server().flavor {
        Flavor::MariaDb => format!("INSERT INTO big SELECT seq, CONCAT('row-', seq), seq * 7 FROM seq_1_to_{n}"),
        Flavor::Mysql => {
            conn.query_drop(format!("SET SESSION cte_max_recursion_depth = {}", n + 1)).await.unwrap();
            format!(
                "INSERT INTO big WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < {n}) \
                 SELECT x, CONCAT('row-', x), x * 7 FROM s"
            )
        }
    };
    conn.query_drop(insert).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_snapshot_exits_within_5s_and_the_next_start_is_correct() {
    let db = harness::server().create_db("sigterm_snap").await;
    let mut conn = db.root_conn().await;
    fill(&mut conn, 600_000).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let cfg = replica_config(&db, &state, &["big"]);
    let mut daemon = Daemon::start(&cfg);
    harness::wait_until("the snapshot to start copying", Duration::from_secs(60), || {
        let log = daemon.log();
        async move { (log.contains("taking a snapshot") && !log.contains("table copied")).then_some(()) }
    })
    .await;
    let asked = Instant::now();
    signal(daemon.pid(), libc::SIGTERM);
    let status =
        harness::wait_until_blocking("tailcache to exit after SIGTERM", Duration::from_secs(30), || daemon.try_wait());
    let took = asked.elapsed();
    let log = daemon.log();
    assert!(!log.contains("table copied"), "the snapshot finished before SIGTERM; the test proved nothing:\n{log}");
    assert!(took <= Duration::from_secs(5), "SIGTERM during a snapshot took {took:?} to stop:\n{log}");
    assert!(status.success(), "exit status {status:?}:\n{log}");
    // The interrupted snapshot left no half replica behind: the next start
    // takes a whole one and matches the server.
    conn.query_drop("UPDATE big SET v = 'after' WHERE id = 7").await.unwrap();
    let daemon = Daemon::start(&cfg);
    wait_caught_up(&db, &state, &daemon).await;
    assert_eq!(assert_replica_matches(&db, &state, "big", &["id"]).await, 600_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_change_while_stopped_does_not_stop_the_next_start() {
    let db = harness::server().create_db("ddl_stopped").await;
    let mut conn = db.root_conn().await;
    conn.query_drop(
        "CREATE TABLE app (id INT PRIMARY KEY, name VARCHAR(50), c INT); INSERT INTO app VALUES (1, 'one', 5)",
    )
    .await
    .unwrap();
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let base = format!(
        "{}\n[memcached]\nservers = [\"{}\"]\nkey_prefix = \"ds:\"\ncodec = \"json\"\n\n[[views]]\nname = \"c\"\nkey = \"c:{{id}}\"\nquery = \"SELECT id, c FROM app\"\n",
        replica_config(&db, &state, &["app"]),
        mc.addr()
    );
    let json = |k: &str| mc.get_raw(k).map(|(b, _)| serde_json::from_slice::<serde_json::Value>(&b).unwrap());
    let mut daemon = Daemon::start(&base);
    harness::wait_until("the first value", Duration::from_secs(60), || {
        let v = json("ds:c:1");
        async move { v.filter(|v| v["c"] == 5).map(|_| ()) }
    })
    .await;
    daemon.stop();
    // While stopped: the column a view reads is dropped and added again,
    // and a new column gets a new view.
    conn.query_drop("ALTER TABLE app DROP COLUMN c").await.unwrap();
    conn.query_drop(
        "ALTER TABLE app ADD COLUMN c INT NOT NULL DEFAULT 9, ADD COLUMN d VARCHAR(10) NOT NULL DEFAULT 'dee'",
    )
    .await
    .unwrap();
    let with_new_view =
        format!("{base}\n[[views]]\nname = \"d\"\nkey = \"d:{{id}}\"\nquery = \"SELECT id, d FROM app\"\n");
    let mut daemon = Daemon::start(&with_new_view);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (c, d) = (json("ds:c:1"), json("ds:d:1"));
        if c.is_some_and(|c| c["c"] == 9) && d.is_some_and(|d| d["d"] == "dee") {
            break;
        }
        assert!(Instant::now() < deadline, "both views never published the new schema; log:\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(daemon.is_running(), "the daemon exited:\n{}", daemon.log());
    wait_caught_up(&db, &state, &daemon).await;
    assert_replica_matches(&db, &state, "app", &["id"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_log_pipe_does_not_stop_the_daemon() {
    let db = harness::server().create_db("closed_pipe").await;
    let mut conn = db.root_conn().await;
    conn.query_drop("CREATE TABLE app (id INT PRIMARY KEY, name VARCHAR(50)); INSERT INTO app VALUES (1, 'one')")
        .await
        .unwrap();
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let cfg = format!(
        "{}\n[memcached]\nservers = [\"{}\"]\nkey_prefix = \"cp:\"\ncodec = \"json\"\n\n[[views]]\nname = \"a\"\nkey = \"a:{{id}}\"\nquery = \"SELECT id, name FROM app\"\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
        replica_config(&db, &state, &["app"]),
        mc.addr(),
        harness::free_port()
    );
    let path = dir.path().join("tailcache.toml");
    std::fs::write(&path, cfg).unwrap();
    // `tailcache run … 2>&1 | head -1`: the reader goes away after a line.
    let mut child = Command::new(harness::tailcache_bin())
        .args(["run", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut first = String::new();
    BufReader::new(stderr).read_line(&mut first).unwrap();
    assert!(!first.contains('\u{1b}'), "colour codes in a pipe: {first:?}");
    drop(child.stdout.take());
    // Both ends are closed now; the daemon must keep working.
    let json = |k: &str| mc.get_raw(k).map(|(b, _)| serde_json::from_slice::<serde_json::Value>(&b).unwrap());
    harness::wait_until("the first value", Duration::from_secs(60), || {
        let v = json("cp:a:1");
        async move { v.map(|_| ()) }
    })
    .await;
    conn.query_drop("UPDATE app SET name = 'after the pipe closed' WHERE id = 1").await.unwrap();
    harness::wait_until("a change after the pipe closed", Duration::from_secs(30), || {
        let v = json("cp:a:1");
        async move { v.filter(|v| v["name"] == "after the pipe closed").map(|_| ()) }
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "the daemon died with its log pipe: {:?}", child.try_wait());
    signal(child.id(), libc::SIGTERM);
    let status =
        harness::wait_until_blocking("tailcache to exit", Duration::from_secs(15), || child.try_wait().unwrap());
    assert!(status.success(), "exit after SIGTERM with closed pipes: {status:?} (101 = a panic)");
}
