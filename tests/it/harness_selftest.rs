//! Proves the harness itself works: servers start, are configured as the
//! other tests expect, and test users get exactly tailcache's privileges.
use std::time::Duration;

use mysql_async::prelude::*;

use crate::harness::{self, Flavor, Memcached};

async fn variable(conn: &mut mysql_async::Conn, name: &str) -> String {
    let row: Option<(String, String)> =
        conn.query_first(format!("SHOW GLOBAL VARIABLES LIKE '{name}'")).await.expect("SHOW VARIABLES");
    row.unwrap_or_else(|| panic!("variable {name} not found")).1
}

#[tokio::test(flavor = "multi_thread")]
async fn shared_server_has_row_binlog() {
    let s = harness::server();
    let mut conn = s.root_conn(None).await;
    assert_eq!(variable(&mut conn, "log_bin").await, "ON");
    assert_eq!(variable(&mut conn, "binlog_format").await, "ROW");
    assert_eq!(variable(&mut conn, "binlog_row_image").await, "FULL");
    let v: String = conn.query_first("SELECT VERSION()").await.unwrap().unwrap();
    assert_eq!(v, s.version);
    if s.is_private() {
        assert_eq!(s.flavor, harness::flavor(), "the flavour TAILCACHE_TEST_FLAVOR asked for");
        assert_ne!(s.port, 3306, "must never use the system MariaDB");
    }
    let lower = v.to_ascii_lowercase();
    match s.flavor {
        Flavor::MariaDb => assert!(lower.contains("mariadb"), "{v}"),
        Flavor::Mysql => {
            assert!(!lower.contains("mariadb"), "{v}");
            if s.is_private() {
                // The whole MySQL run exercises GTIDs and compressed transactions.
                assert_eq!(variable(&mut conn, "gtid_mode").await, "ON");
                assert_eq!(variable(&mut conn, "binlog_transaction_compression").await, "ON");
                // ... and a transaction really is logged compressed.
                let db = s.create_db("selftest zstd").await;
                let mut root = db.root_conn().await;
                root.query_drop("CREATE TABLE t (id INT PRIMARY KEY)").await.unwrap();
                let status: mysql_async::Row = root.query_first("SHOW BINARY LOG STATUS").await.unwrap().unwrap();
                let (file, pos): (String, u64) = (status.get(0).unwrap(), status.get(1).unwrap());
                root.query_drop("INSERT INTO t VALUES (1)").await.unwrap();
                let events: Vec<mysql_async::Row> =
                    root.query(format!("SHOW BINLOG EVENTS IN '{file}' FROM {pos}")).await.unwrap();
                let types: Vec<String> = events.iter().map(|r| r.get::<String, _>("Event_type").unwrap()).collect();
                assert!(types.iter().any(|t| t == "Transaction_payload"), "no compressed transaction: {types:?}");
                root.disconnect().await.unwrap();
            }
        }
    }
    conn.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn create_db_user_has_only_what_tailcache_needs() {
    let s = harness::server();
    let db = s.create_db("selftest privs").await;
    assert!(db.name.starts_with("t_selftest_privs_"), "{}", db.name);
    assert!(db.url.ends_with(&format!("/{}", db.name)));

    let mut root = db.root_conn().await;
    root.query_drop("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(10))").await.unwrap();
    root.query_drop("INSERT INTO t VALUES (1, 'a')").await.unwrap();

    let mut user = mysql_async::Conn::new(
        mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&db.url).unwrap()).prefer_socket(false),
    )
    .await
    .expect("tailcache user can connect with its URL");
    let current_db: Option<String> = user.query_first("SELECT DATABASE()").await.unwrap();
    assert_eq!(current_db.as_deref(), Some(db.name.as_str()));
    // REPLICATION CLIENT (BINLOG MONITOR on MariaDB); MySQL 8.4 removed SHOW MASTER STATUS.
    let show_status = match s.flavor {
        Flavor::MariaDb => "SHOW MASTER STATUS",
        Flavor::Mysql => "SHOW BINARY LOG STATUS",
    };
    let status: Option<mysql_async::Row> =
        user.query_first(show_status).await.unwrap_or_else(|e| panic!("{show_status} as tailcache user: {e}"));
    assert!(status.is_some(), "{show_status} returned no row: is the binlog on?");
    let v: Option<String> = user.query_first("SELECT v FROM t WHERE id = 1").await.expect("SELECT as tailcache user");
    assert_eq!(v.as_deref(), Some("a"));
    // LOCK TABLES only where tailcache asks for it (its MySQL snapshot).
    let lock = user.query_drop("LOCK TABLES t READ").await;
    match s.flavor {
        Flavor::Mysql => {
            lock.unwrap_or_else(|e| panic!("LOCK TABLES as tailcache user on MySQL: {e}"));
            user.query_drop("UNLOCK TABLES").await.unwrap();
        }
        Flavor::MariaDb => {
            let err = lock.expect_err("LOCK TABLES must be denied on MariaDB");
            assert!(err.to_string().contains("denied"), "unexpected error: {err}");
        }
    }
    let err = user.query_drop("INSERT INTO t VALUES (2, 'b')").await.expect_err("INSERT must be denied");
    assert!(err.to_string().contains("denied"), "unexpected error: {err}");
    let err = user.query_drop("CREATE TABLE t2 (id INT)").await.expect_err("CREATE must be denied");
    assert!(err.to_string().contains("denied"), "unexpected error: {err}");

    user.disconnect().await.unwrap();
    root.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn create_db_gives_distinct_names_and_server_ids() {
    let s = harness::server();
    let (a, b) = tokio::join!(s.create_db("seed"), s.create_db("seed"));
    assert_ne!(a.name, b.name);
    assert_ne!(a.user, b.user);
    assert_ne!(a.server_id, b.server_id);
    assert!(a.server_id >= 1000 && b.server_id >= 1000);
    assert!(a.url.contains(&a.user) && !a.url.contains("root"));
    assert!(a.root_url.starts_with("mysql://root:"));
}

#[test]
fn memcached_set_get_restart_empty() {
    let mut m = Memcached::start_with(&["-I", "2m"]);
    let port_before = m.port();
    assert_eq!(m.get_raw("missing"), None);
    m.set_raw("k1", b"hello\r\nworld", 42);
    assert_eq!(m.get_raw("k1"), Some((b"hello\r\nworld".to_vec(), 42)));
    // -I 2m allows items above the default 1 MiB limit.
    let big = vec![b'x'; 1_500_000];
    m.set_raw("big", &big, 0);
    assert_eq!(m.get_raw("big").map(|(v, _)| v.len()), Some(big.len()));

    m.restart_empty();
    assert_eq!(m.port(), port_before, "restart_empty must keep the port");
    assert_eq!(m.addr(), format!("127.0.0.1:{port_before}"));
    assert_eq!(m.get_raw("k1"), None, "restart_empty must lose the data");

    m.stop();
    assert!(std::net::TcpStream::connect(m.addr()).is_err(), "memcached still listening after stop()");
}

#[test]
fn private_server_with_statement_binlog() {
    let p = harness::start_private_server(&["--binlog-format=STATEMENT"]);
    assert!(p.is_private());
    assert_eq!(p.flavor, harness::flavor());
    assert_ne!(p.port, 3306, "never the system MariaDB");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut conn = p.root_conn(None).await;
        assert_eq!(variable(&mut conn, "binlog_format").await, "STATEMENT");
        assert_eq!(variable(&mut conn, "log_bin").await, "ON");
        conn.disconnect().await.unwrap();
        let db = p.create_db("private").await;
        let mut c = db.root_conn().await;
        c.query_drop("CREATE TABLE t (id INT PRIMARY KEY)").await.unwrap();
        c.disconnect().await.unwrap();
    });
    let port = p.port;
    drop(p);
    harness::wait_until_blocking("private server to stop listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err().then_some(())
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_until_polls_until_some() {
    let mut n = 0;
    let got = harness::wait_until("counter to reach 3", Duration::from_secs(5), || {
        n += 1;
        let v = n;
        async move { (v >= 3).then_some(v) }
    })
    .await;
    assert_eq!(got, 3);
}

#[test]
#[should_panic(expected = "timed out after")]
fn wait_until_blocking_times_out_with_message() {
    harness::wait_until_blocking::<()>("nothing", Duration::from_millis(20), || None);
}

#[test]
#[should_panic(expected = "exited with")]
fn private_server_bad_option_fails_clearly() {
    // The panic message names what failed and carries the error log tail.
    harness::start_private_server(&["--no-such-option-for-the-selftest"]);
}
