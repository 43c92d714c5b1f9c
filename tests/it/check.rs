//! `tailcache check` against real servers: each misconfiguration a user can
//! have shows up as one line naming it and the fix.

use mysql_async::prelude::*;

use tailcache::check::{Report, preflight, run_checks};
use tailcache::config::Config;

use crate::harness::{self, TestDb};

fn config(url: &str, server_id: u32, tables: &[&str]) -> Config {
    let tables = tables.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", ");
    let text = format!(
        "[mysql]\nurl = {url:?}\nserver_id = {server_id}\ntables = [{tables}]\nconnect_timeout_secs = 20\n[state]\npath = \":memory:\"\n"
    );
    Config::from_toml(&text).expect("test config parses")
}

/// The rendered line for check `name` (panics with the whole report if none).
fn line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| l.get(5..).is_some_and(|rest| rest.starts_with(&format!("{name}: "))))
        .unwrap_or_else(|| panic!("no line for {name:?} in report:\n{text}"))
}

async fn root_exec(db: &TestDb, stmts: &[String]) {
    let mut root = db.root_conn().await;
    for s in stmts {
        root.query_drop(s).await.unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    root.disconnect().await.expect("disconnect root");
}

fn assert_no_secret(report: &Report, db: &TestDb) {
    let text = report.render();
    assert!(!text.contains(&db.password), "the password leaked into the report:\n{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn all_ok_on_a_well_configured_server() {
    let db = harness::server().create_db("check ok").await;
    root_exec(
        &db,
        &[
            "CREATE TABLE feature (id INT PRIMARY KEY, name VARCHAR(20)) ENGINE=InnoDB".into(),
            "CREATE TABLE app (a INT, b INT, PRIMARY KEY (a, b))".into(),
        ],
    )
    .await;
    let cfg = config(&db.url, db.server_id, &["feature", "app"]);
    let report = run_checks(&cfg).await;
    let text = report.render();
    assert!(report.ok(), "expected no problem:\n{text}");
    assert!(report.warnings().next().is_none(), "expected no warning:\n{text}");
    assert!(line(&text, "connect").starts_with("ok "), "{text}");
    let version_prefix = match harness::server().flavor {
        harness::Flavor::MariaDb => "ok   server version: MariaDB 1",
        harness::Flavor::Mysql => "ok   server version: MySQL ",
    };
    assert!(line(&text, "server version").starts_with(version_prefix), "{text}");
    assert_eq!(line(&text, "log_bin"), "ok   log_bin: ON");
    assert_eq!(line(&text, "binlog_format"), "ok   binlog_format: ROW");
    assert_eq!(line(&text, "binlog_row_image"), "ok   binlog_row_image: FULL");
    assert!(line(&text, "privilege REPLICATION SLAVE").starts_with("ok "), "{text}");
    assert!(line(&text, &format!("privilege SELECT on {}.feature", db.name)).starts_with("ok "), "{text}");
    if harness::server().flavor == harness::Flavor::Mysql {
        // Only MySQL's snapshot takes a brief LOCK TABLES … READ.
        assert!(line(&text, "privilege LOCK TABLES").starts_with("ok "), "{text}");
    }
    assert!(line(&text, &format!("table {}.feature", db.name)).contains("primary key (id)"), "{text}");
    assert!(line(&text, &format!("table {}.app", db.name)).contains("primary key (a, b)"), "{text}");
    assert!(line(&text, "server_id").starts_with(&format!("ok   server_id: {}", db.server_id)), "{text}");
    assert_no_secret(&report, &db);
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_on_an_open_connection() {
    let db = harness::server().create_db("check preflight").await;
    root_exec(&db, &["CREATE TABLE feature (id INT PRIMARY KEY)".into()]).await;
    let cfg = config(&db.url, db.server_id, &["feature"]);
    let mut conn = tailcache::source::conn::connect(&cfg.mysql).await.expect("connect");
    let info = tailcache::source::conn::server_info(&mut conn).await.expect("server info");
    let report = preflight(&mut conn, &info, &cfg).await;
    assert!(report.ok(), "{}", report.render());
    // The connection is still usable afterwards.
    let one: Option<u32> = conn.query_first("SELECT 1").await.expect("conn still usable");
    assert_eq!(one, Some(1));
    conn.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread")]
async fn statement_binlog_format_is_a_problem_with_the_my_cnf_fix() {
    let private = tokio::task::spawn_blocking(|| harness::start_private_server(&["--binlog-format=STATEMENT"]))
        .await
        .expect("start private server");
    let db = private.create_db("check stmt").await;
    root_exec(&db, &["CREATE TABLE feature (id INT PRIMARY KEY)".into()]).await;
    let report = run_checks(&config(&db.url, db.server_id, &["feature"])).await;
    let text = report.render();
    assert!(!report.ok(), "{text}");
    let l = line(&text, "binlog_format");
    assert!(l.starts_with("FAIL binlog_format: found STATEMENT, expected ROW; fix: "), "{l}");
    assert!(l.contains("`binlog_format = ROW` under [mysqld] in my.cnf"), "{l}");
    assert!(l.contains("restart"), "{l}");
    // Everything else is fine on that server.
    assert_eq!(report.problems().count(), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_select_grant_prints_the_exact_grant() {
    let db = harness::server().create_db("check grant").await;
    let other = format!("{}_other", db.name);
    root_exec(
        &db,
        &[
            "CREATE TABLE feature (id INT PRIMARY KEY)".into(),
            format!("DROP DATABASE IF EXISTS `{other}`"),
            format!("CREATE DATABASE `{other}`"),
            format!("CREATE TABLE `{other}`.t (id INT PRIMARY KEY)"),
        ],
    )
    .await;
    let report = run_checks(&config(&db.url, db.server_id, &["feature", &format!("{other}.t")])).await;
    let text = report.render();
    assert!(!report.ok(), "{text}");
    let l = line(&text, &format!("privilege SELECT on {other}.t"));
    assert!(l.starts_with("FAIL "), "{l}");
    assert!(l.ends_with(&format!("fix: GRANT SELECT ON `{other}`.`t` TO '{}'@'%';", db.user)), "{l}");
    // The table itself is not visible without the grant: said so, not "does not exist".
    let t = line(&text, &format!("table {other}.t"));
    assert!(t.contains("not visible"), "{t}");
    assert!(line(&text, &format!("privilege SELECT on {}.feature", db.name)).starts_with("ok "), "{text}");
    assert_no_secret(&report, &db);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_replication_grants_print_the_exact_grants() {
    let db = harness::server().create_db("check repl").await;
    root_exec(
        &db,
        &[
            "CREATE TABLE feature (id INT PRIMARY KEY)".into(),
            format!("REVOKE REPLICATION SLAVE, REPLICATION CLIENT ON *.* FROM '{}'@'%'", db.user),
        ],
    )
    .await;
    let report = run_checks(&config(&db.url, db.server_id, &["feature"])).await;
    let text = report.render();
    let l = line(&text, "privilege REPLICATION SLAVE");
    assert!(l.starts_with("FAIL "), "{l}");
    assert!(l.ends_with(&format!("fix: GRANT REPLICATION SLAVE ON *.* TO '{}'@'%';", db.user)), "{l}");
    // MariaDB 10.5+ calls REPLICATION CLIENT "BINLOG MONITOR".
    let s = harness::server();
    let client =
        if s.flavor == harness::Flavor::MariaDb && !s.version.starts_with("10.3") && !s.version.starts_with("10.4") {
            "BINLOG MONITOR"
        } else {
            "REPLICATION CLIENT"
        };
    let l = line(&text, &format!("privilege {client}"));
    assert!(l.starts_with("FAIL "), "{l}");
    assert!(l.ends_with(&format!("fix: GRANT {client} ON *.* TO '{}'@'%';", db.user)), "{l}");
}

#[tokio::test(flavor = "multi_thread")]
async fn table_without_primary_key_is_named() {
    let db = harness::server().create_db("check nopk").await;
    root_exec(
        &db,
        &[
            "CREATE TABLE loose (a INT, b INT)".into(),
            "CREATE TABLE coded (code VARCHAR(10) NOT NULL, v INT, UNIQUE KEY by_code (code))".into(),
            "CREATE TABLE feature (id INT PRIMARY KEY)".into(),
        ],
    )
    .await;
    let report = run_checks(&config(&db.url, db.server_id, &["loose", "coded", "feature"])).await;
    let text = report.render();
    let l = line(&text, &format!("table {}.loose", db.name));
    assert!(
        l.starts_with(&format!("FAIL table {}.loose: found table {}.loose has no primary key", db.name, db.name)),
        "{l}"
    );
    assert!(l.contains(&format!("ALTER TABLE `{}`.`loose` ADD PRIMARY KEY (", db.name)), "{l}");
    // A unique NOT NULL key is offered as the primary key.
    let l = line(&text, &format!("table {}.coded", db.name));
    assert!(l.ends_with(&format!("fix: ALTER TABLE `{}`.`coded` ADD PRIMARY KEY (`code`);", db.name)), "{l}");
    assert!(line(&text, &format!("table {}.feature", db.name)).starts_with("ok "), "{text}");
    assert_eq!(report.problems().count(), 2, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nonexistent_table_is_named() {
    let db = harness::server().create_db("check missing").await;
    root_exec(&db, &["CREATE TABLE feature (id INT PRIMARY KEY)".into()]).await;
    let report = run_checks(&config(&db.url, db.server_id, &["feature", "nosuch"])).await;
    let text = report.render();
    assert!(!report.ok(), "{text}");
    let l = line(&text, &format!("table {}.nosuch", db.name));
    assert!(
        l.starts_with(&format!("FAIL table {}.nosuch: found table {}.nosuch does not exist", db.name, db.name)),
        "{l}"
    );
    assert!(l.contains("remove \"nosuch\" from mysql.tables"), "{l}");
    assert_eq!(report.problems().count(), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_says_access_denied_and_never_prints_a_password() {
    let db = harness::server().create_db("check pw").await;
    let wrong = "Wr0ng-Pa55word-xyz";
    let url = db.url.replace(&format!(":{}@", db.password), &format!(":{wrong}@"));
    assert_ne!(url, db.url);
    let report = run_checks(&config(&url, db.server_id, &["feature"])).await;
    let text = report.render();
    assert!(!report.ok(), "{text}");
    let l = line(&text, "connect");
    assert!(l.starts_with("FAIL connect: "), "{l}");
    assert!(l.contains("access denied"), "{l}");
    assert!(l.contains("check the user name in mysql.url and the password"), "{l}");
    assert!(!text.contains(wrong), "the password leaked:\n{text}");
    assert!(!text.contains(&db.password), "the password leaked:\n{text}");
    // Nothing after a failed connection.
    assert_eq!(text.lines().last(), Some(l), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn myisam_is_a_warning_and_a_view_is_a_problem() {
    let db = harness::server().create_db("check engine").await;
    root_exec(
        &db,
        &[
            "CREATE TABLE legacy (id INT PRIMARY KEY) ENGINE=MyISAM".into(),
            "CREATE TABLE feature (id INT PRIMARY KEY)".into(),
            "CREATE VIEW feature_v AS SELECT id FROM feature".into(),
        ],
    )
    .await;
    let report = run_checks(&config(&db.url, db.server_id, &["legacy", "feature_v"])).await;
    let text = report.render();
    let l = line(&text, &format!("engine {}.legacy", db.name));
    assert!(l.starts_with("warn ") && l.contains("MyISAM") && l.contains("not transactional"), "{l}");
    let l = line(&text, &format!("table {}.feature_v", db.name));
    assert!(l.starts_with("FAIL ") && l.contains("is a view"), "{l}");
    assert_eq!(report.problems().count(), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_id_equal_to_the_servers_own_is_a_problem() {
    let db = harness::server().create_db("check sid").await;
    root_exec(&db, &["CREATE TABLE feature (id INT PRIMARY KEY)".into()]).await;
    let mut root = db.root_conn().await;
    let own: u32 = root.query_first("SELECT @@server_id").await.expect("server_id").expect("a row");
    root.disconnect().await.expect("disconnect");
    let report = run_checks(&config(&db.url, own, &["feature"])).await;
    let text = report.render();
    let l = line(&text, "server_id");
    assert!(
        l.starts_with(&format!("FAIL server_id: found mysql.server_id = {own}, the server's own @@server_id")),
        "{l}"
    );
    assert!(l.contains("set mysql.server_id"), "{l}");
    assert_eq!(report.problems().count(), 1, "{text}");
}

/// Through the binary, as a user runs it.
#[tokio::test(flavor = "multi_thread")]
async fn binary_check_exit_codes() {
    let db = harness::server().create_db("check bin").await;
    root_exec(&db, &["CREATE TABLE feature (id INT PRIMARY KEY)".into()]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, tables: &str| {
        let path = dir.path().join(name);
        let text = format!(
            "[mysql]\nurl = {:?}\nserver_id = {}\ntables = [{tables}]\n[state]\npath = \":memory:\"\n",
            db.url, db.server_id
        );
        std::fs::write(&path, text).expect("write config");
        path.to_string_lossy().into_owned()
    };
    let good = write("good.toml", "\"feature\"");
    let out = harness::run_tailcache(&["check", "--config", &good]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("ok   binlog_format: ROW"), "{stdout}");
    assert!(!stdout.contains(&db.password));

    let bad = write("bad.toml", "\"feature\", \"nosuch\"");
    let out = harness::run_tailcache(&["check", "--config", &bad]);
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{all}");
    assert!(all.contains(&format!("FAIL table {}.nosuch", db.name)), "{all}");
    assert!(!all.contains(&db.password));
}

fn with_memcached(db: &TestDb, state: &str, memcached: &str, views: &str) -> String {
    format!(
        "[mysql]\nurl = {:?}\nserver_id = {}\ntables = [\"feature\"]\nconnect_timeout_secs = 20\n\
         [state]\npath = {state:?}\n[memcached]\n{memcached}\n{views}",
        db.url, db.server_id
    )
}

/// memcached: reachable with its version, item_size_max against
/// memcached.max_item_size, memcached.exptime, and the state directory.
#[tokio::test(flavor = "multi_thread")]
async fn memcached_exptime_item_size_and_state_dir() {
    let db = harness::server().create_db("check memcached").await;
    root_exec(&db, &["CREATE TABLE feature (id INT PRIMARY KEY)".into()]).await;
    let small = harness::Memcached::start_with(&["-I", "1m"]);
    let big = harness::Memcached::start_with(&["-I", "4m"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.db");
    let state = state.to_str().unwrap();

    // all fine
    let text = with_memcached(&db, state, &format!("servers = [\"{}\"]\nmax_item_size = 2097152", big.addr()), "");
    let report = run_checks(&Config::from_toml(&text).unwrap()).await;
    let out = report.render();
    assert!(report.ok(), "{out}");
    assert!(line(&out, &format!("memcached {}", big.addr())).starts_with("ok   "), "{out}");
    assert!(line(&out, &format!("memcached {}", big.addr())).contains("item_size_max = 4194304"), "{out}");
    assert!(line(&out, "memcached.exptime").starts_with("ok   "), "{out}");
    assert!(line(&out, "state.path").starts_with("ok   "), "{out}");

    // memcached -I 1m with max_item_size = 2 MB, an exptime that does not
    // fit, a server that is down, a state directory that does not exist
    let down = {
        let mut m = harness::Memcached::start();
        let a = m.addr();
        m.stop();
        a
    };
    let missing = dir.path().join("nope/state.db");
    let text = with_memcached(
        &db,
        missing.to_str().unwrap(),
        &format!("servers = [\"{}\", \"{down}\"]\nmax_item_size = 2097152\nexptime = 4000000000", small.addr()),
        "",
    );
    let report = run_checks(&Config::from_toml(&text).unwrap()).await;
    let out = report.render();
    let l = line(&out, &format!("memcached {}", small.addr()));
    assert!(l.starts_with("FAIL ") && l.contains("item_size_max = 1048576"), "{out}");
    assert!(l.contains("memcached.max_item_size = 2097152") && l.contains("-I 2m"), "{out}");
    let l = line(&out, &format!("memcached {down}"));
    assert!(l.starts_with("FAIL ") && l.contains("cannot connect"), "{out}");
    let l = line(&out, "config memcached.exptime");
    assert!(l.starts_with("FAIL ") && l.contains("4000000000") && l.contains("2147483647"), "{out}");
    let l = line(&out, "state.path");
    assert!(l.starts_with("FAIL ") && l.contains("does not exist"), "{out}");
    assert_eq!(report.problems().count(), 4, "{out}");
    // the MySQL checks still ran
    assert_eq!(line(&out, "binlog_format"), "ok   binlog_format: ROW");
}

/// A view reading a table that is not watched names mysql.tables.
#[tokio::test(flavor = "multi_thread")]
async fn binary_check_names_mysql_tables_for_an_unwatched_view_table() {
    let db = harness::server().create_db("check views").await;
    root_exec(
        &db,
        &["CREATE TABLE feature (id INT PRIMARY KEY)".into(), "CREATE TABLE other (id INT PRIMARY KEY)".into()],
    )
    .await;
    let m = harness::Memcached::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let text = with_memcached(
        &db,
        ":memory:",
        &format!("servers = [\"{}\"]", m.addr()),
        "[[views]]\nname = \"o\"\nkey = \"o:{id}\"\nquery = \"SELECT id FROM other\"\n",
    );
    let path = dir.path().join("views.toml");
    std::fs::write(&path, text).unwrap();
    let out = harness::run_tailcache(&["check", "--config", path.to_str().unwrap()]);
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("FAIL views"), "{all}");
    assert!(all.contains("\"other\"") && all.contains("not in mysql.tables"), "{all}");
    assert!(!all.contains("no such table"), "{all}");
}
