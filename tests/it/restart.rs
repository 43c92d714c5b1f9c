//! A restart right after a crash: the binlog dump connection the dead
//! daemon left behind still holds its server_id for a moment; it is ours,
//! so it is ended, not reported as a clash. A reader of another user with
//! the same id is a clash, named, with a free id suggested.

use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{BinlogStreamRequest, Conn};
use tailcache::check::run_checks;
use tailcache::config::Config;
use tailcache::source::conn::{connect, kill_own_leftover_dumps};

use crate::harness::{self, Daemon, Memcached, TestDb};
use crate::replica::master_position;

/// SHOW SLAVE HOSTS needs REPLICATION MASTER ADMIN on MariaDB 10.5+ (on
/// MySQL, REPLICATION SLAVE is enough): without it the check cannot see
/// the other readers at all.
async fn setup(hint: &str) -> TestDb {
    let db = harness::server().create_db(hint).await;
    let mut root = db.root_conn().await;
    root.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v INT); INSERT INTO t VALUES (1, 10)").await.unwrap();
    if harness::server().flavor == harness::Flavor::MariaDb {
        root.query_drop(format!("GRANT REPLICATION MASTER ADMIN ON *.* TO '{}'@'%'", db.user)).await.unwrap();
    }
    root.disconnect().await.unwrap();
    db
}

fn config_text(db: &TestDb, state: &str, mc: &Memcached) -> String {
    format!(
        "[mysql]\nurl = {:?}\nserver_id = {}\ntables = [\"t\"]\nheartbeat_secs = 0.5\n\n[state]\npath = {state:?}\n\n\
         [memcached]\nservers = [\"{}\"]\nkey_prefix = \"rs:\"\ncodec = \"json\"\n\n\
         [[views]]\nname = \"t\"\nkey = \"t:{{id}}\"\nquery = \"SELECT id, v FROM t\"\n",
        db.url,
        db.server_id,
        mc.addr()
    )
}

/// Opens a binlog stream as `url`'s user with `server_id` and keeps it
/// open (a reader registered with that id).
async fn open_dump(url: &str, server_id: u32) -> mysql_async::BinlogStream {
    let opts = mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(url).unwrap()).prefer_socket(false);
    let mut conn = Conn::new(opts).await.unwrap();
    let pos = master_position(&mut conn).await;
    conn.get_binlog_stream(BinlogStreamRequest::new(server_id).with_filename(pos.file.as_bytes()).with_pos(pos.pos))
        .await
        .unwrap()
}

async fn registered(db: &TestDb, server_id: u32) -> bool {
    let mut root = db.root_conn().await;
    // MySQL 8.4 removed SHOW SLAVE HOSTS; MariaDB has no SHOW REPLICAS.
    let rows: Vec<mysql_async::Row> = match root.query("SHOW REPLICAS").await {
        Ok(rows) => rows,
        Err(_) => root.query("SHOW SLAVE HOSTS").await.expect("SHOW SLAVE HOSTS"),
    };
    let _ = root.disconnect().await;
    rows.iter().any(|r| r.get::<u32, _>(0) == Some(server_id))
}

fn value(mc: &Memcached, key: &str) -> Option<serde_json::Value> {
    mc.get_raw(key).map(|(b, _)| serde_json::from_slice(&b).expect("JSON value"))
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_within_a_second_of_kill9_starts_cleanly() {
    let db = setup("restart kill9").await;
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db").display().to_string();
    let cfg = config_text(&db, &state, &mc);
    let mut daemon = Daemon::start(&cfg);
    harness::wait_until("the first row in memcached", Duration::from_secs(60), || {
        let v = value(&mc, "rs:t:1");
        async move { v.map(|_| ()) }
    })
    .await;
    harness::wait_until("the daemon's binlog reader to register", Duration::from_secs(30), || {
        let db = &db;
        async move { registered(db, db.server_id).await.then_some(()) }
    })
    .await;
    daemon.kill9();
    let daemon = Daemon::start(&cfg);
    root_insert(&db, "INSERT INTO t VALUES (2, 20)").await;
    harness::wait_until("a commit after the restart in memcached", Duration::from_secs(60), || {
        let v = value(&mc, "rs:t:2");
        async move { v.filter(|v| v["v"] == 20).map(|_| ()) }
    })
    .await;
    let mut daemon = daemon;
    assert!(daemon.is_running(), "{}", daemon.log());
    assert!(!daemon.log().contains("already used"), "{}", daemon.log());
}

async fn root_insert(db: &TestDb, sql: &str) {
    let mut root = db.root_conn().await;
    root.query_drop(sql).await.unwrap();
    root.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn own_leftover_dump_is_ended_and_another_users_reader_is_a_clash() {
    let db = setup("restart own").await;
    let cfg = Config::from_toml(&format!(
        "[mysql]\nurl = {:?}\nserver_id = {}\ntables = [\"t\"]\n[state]\npath = \":memory:\"\n",
        db.url, db.server_id
    ))
    .unwrap();

    // A reader of our own user with our id, as a crashed daemon leaves it.
    let leftover = open_dump(&db.url, db.server_id).await;
    harness::wait_until("the leftover reader to register", Duration::from_secs(30), || {
        let db = &db;
        async move { registered(db, db.server_id).await.then_some(()) }
    })
    .await;
    // `check` only reports it...
    let report = run_checks(&cfg).await;
    let text = report.render();
    assert!(report.ok(), "{text}");
    assert!(text.contains("in use by 1 binlog dump connection(s)"), "{text}");
    // ...the daemon's preflight ends it.
    let mut conn = connect(&cfg.mysql).await.unwrap();
    let user = cfg.mysql.parse_url().unwrap().user;
    assert_eq!(kill_own_leftover_dumps(&mut conn, db.server_id, &user).await.unwrap(), 1);
    harness::wait_until("the leftover reader to be gone", Duration::from_secs(30), || {
        let db = &db;
        async move { (!registered(db, db.server_id).await).then_some(()) }
    })
    .await;
    assert_eq!(kill_own_leftover_dumps(&mut conn, db.server_id, &user).await.unwrap(), 0);
    conn.disconnect().await.unwrap();
    drop(leftover);

    // Another user's reader with our id: a clash, never killed.
    let other = format!("{}_o", db.user);
    let mut root = db.root_conn().await;
    root.query_drop(format!("CREATE USER '{other}'@'%' IDENTIFIED BY '{}'", db.password)).await.unwrap();
    root.query_drop(format!("GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{other}'@'%'")).await.unwrap();
    root.query_drop(format!("GRANT SELECT ON `{}`.* TO '{other}'@'%'", db.name)).await.unwrap();
    root.disconnect().await.unwrap();
    let other_url = db.url.replacen(&format!("//{}:", db.user), &format!("//{other}:"), 1);
    let _theirs = open_dump(&other_url, db.server_id).await;
    harness::wait_until("the other reader to register", Duration::from_secs(30), || {
        let db = &db;
        async move { registered(db, db.server_id).await.then_some(()) }
    })
    .await;
    let mut conn = connect(&cfg.mysql).await.unwrap();
    assert_eq!(kill_own_leftover_dumps(&mut conn, db.server_id, &user).await.unwrap(), 0);
    conn.disconnect().await.unwrap();
    let report = run_checks(&cfg).await;
    let text = report.render();
    let l = text.lines().find(|l| l.contains("server_id: ")).unwrap_or_else(|| panic!("{text}"));
    assert!(l.starts_with("FAIL server_id: "), "{l}");
    assert!(l.contains(&format!("replica server_id {}", db.server_id)), "{l}");
    let suggested: u32 = l
        .split("set mysql.server_id = ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no suggested id in {l}"));
    assert_ne!(suggested, db.server_id);
    assert!(!registered(&db, suggested).await, "{suggested} is in use");
}
