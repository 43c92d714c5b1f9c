//! A full resync finds keys nobody remembers: a key under the prefix that
//! a view's key template could have rendered, but that no view produces
//! and the bookkeeping does not hold, is deleted and reported as an
//! orphan; a key under the prefix that matches no template is left alone
//! and counted as foreign. A redeploy with a new state file cleans up
//! what the previous deployment left.

use std::path::Path;
use std::time::Duration;

use mysql_async::prelude::*;

use crate::admin::{http, parse_prometheus};
use crate::harness::{self, Daemon, Memcached, TestDb, free_port, run_tailcache, wait_until};

const WAIT: Duration = Duration::from_secs(30);

fn config(db: &TestDb, state: &Path, mc: &Memcached, admin: u16) -> String {
    format!(
        r#"[mysql]
url = {url:?}
server_id = {sid}
tables = ["page"]
heartbeat_secs = 0.5

[state]
path = {state:?}

[memcached]
servers = ["{mc}"]
key_prefix = "or:"
codec = "json"

[admin]
listen = "127.0.0.1:{admin}"

[[views]]
name = "page"
key = "page:{{slug}}"
query = "SELECT slug, title FROM page WHERE live = 1"
"#,
        url = db.url,
        sid = db.server_id,
        state = state.display().to_string(),
        mc = mc.addr(),
    )
}

async fn setup(hint: &str) -> TestDb {
    let db = harness::server().create_db(hint).await;
    db.root_conn()
        .await
        .query_drop(
            "CREATE TABLE page (id INT PRIMARY KEY, slug VARCHAR(64) NOT NULL, title TEXT, live TINYINT NOT NULL);
             INSERT INTO page VALUES (1, 'home', 'Home', 1), (2, 'about', 'About', 1), (3, 'draft', 'Draft', 0)",
        )
        .await
        .unwrap();
    db
}

/// The `tailcache_resync_drift_keys_total{kind}` sample.
fn drift_metric(admin: u16, kind: &str) -> f64 {
    let (_, body) = http(admin, "GET", "/metrics").expect("/metrics answers");
    parse_prometheus(&body)
        .into_iter()
        .find(|(name, labels, _)| {
            name == "tailcache_resync_drift_keys_total" && labels.get("kind").map(String::as_str) == Some(kind)
        })
        .map_or(0.0, |(_, _, v)| v)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resync_deletes_orphans_matching_a_template_and_leaves_foreign_keys() {
    let db = setup("orphans").await;
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let d = Daemon::start(&config(&db, &dir.path().join("s.db"), &mc, admin));
    // The start's full publish (a resync: memcached has no sentinel yet)
    // done, so that the resync asked for below is a new one.
    wait_until("the start's resync reported", WAIT, || async {
        let (_, body) = http(admin, "GET", "/status")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["last_resync"].is_object().then_some(())
    })
    .await;
    assert!(mc.get_raw("or:page:about").is_some());

    // Planted behind tailcache's back.
    mc.set_raw("or:page:ghost", b"{\"slug\":\"ghost\"}", 2);
    mc.set_raw("or:page:draft", b"{\"slug\":\"draft\"}", 2);
    mc.set_raw("or:sessions:42", b"not ours", 0);
    mc.set_raw("elsewhere:page:ghost", b"outside the prefix", 0);

    let cfg = d.config_path().to_str().unwrap().to_owned();
    let out = run_tailcache(&["resync", "-c", &cfg]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("orphans 2"), "the report counts both orphans: {stdout}");
    assert!(stdout.contains("foreign keys left alone 1"), "the report counts the foreign key: {stdout}");

    assert_eq!(mc.get_raw("or:page:ghost"), None, "an orphan matching page:{{slug}} is deleted");
    assert_eq!(mc.get_raw("or:page:draft"), None, "a key of a row outside the view is deleted");
    assert!(mc.get_raw("or:page:home").is_some() && mc.get_raw("or:page:about").is_some(), "the view's keys stay");
    assert_eq!(mc.get_raw("or:sessions:42").map(|v| v.0), Some(b"not ours".to_vec()), "a foreign key is left alone");
    assert!(mc.get_raw("elsewhere:page:ghost").is_some(), "a key outside the prefix is never looked at");

    // /status and /metrics say the same.
    let (_, body) = http(admin, "GET", "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let last = &status["last_resync"];
    assert_eq!((last["orphans"].as_u64(), last["foreign"].as_u64()), (Some(2), Some(1)), "{body}");
    assert_eq!(last["views"]["page"]["orphans"].as_u64(), Some(2), "{body}");
    assert_eq!(drift_metric(admin, "orphan"), 2.0);
    assert!(d.log().contains("deleted keys under the prefix that match a view's key template"), "logged");

    // A second resync finds nothing more.
    let out = run_tailcache(&["resync", "-c", &cfg]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("orphans 0") && stdout.contains("foreign keys left alone 1"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redeploy_with_a_new_state_file_deletes_the_keys_the_old_one_left() {
    let db = setup("redeploy").await;
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&config(&db, &dir.path().join("old.db"), &mc, free_port()));
    wait_until("the view published", WAIT, || async { mc.get_raw("or:page:about").map(drop) }).await;
    d.stop();
    // While nothing runs, a page leaves the view; the new deployment does
    // not have the old one's state.
    db.root_conn().await.query_drop("UPDATE page SET live = 0 WHERE slug = 'about'").await.unwrap();
    let _d = Daemon::start(&config(&db, &dir.path().join("new.db"), &mc, free_port()));
    wait_until("the old deployment's key of a page that left is deleted", WAIT, || async {
        mc.get_raw("or:page:about").is_none().then_some(())
    })
    .await;
    assert!(mc.get_raw("or:page:home").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_refuses_to_list_its_keys_is_reported_once_and_the_resync_goes_on() {
    let db = setup("unlistable").await;
    let mc = Memcached::start_with(&["-o", "no_lru_crawler"]);
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&config(&db, &dir.path().join("s.db"), &mc, free_port()));
    wait_until("the view published", WAIT, || async { mc.get_raw("or:page:about").map(drop) }).await;
    mc.set_raw("or:page:about", b"tampered", 0);
    let cfg = d.config_path().to_str().unwrap().to_owned();
    for _ in 0..2 {
        let out = run_tailcache(&["resync", "-c", &cfg]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_ne!(mc.get_raw("or:page:about").map(|v| v.0), Some(b"tampered".to_vec()), "the read-back still repairs");
    assert_eq!(d.log().matches("memcached refuses to list its keys").count(), 1, "said once:\n{}", d.log());
    // `tailcache check` says so beforehand, as a warning.
    let out = run_tailcache(&["check", "-c", &cfg]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line =
        stdout.lines().find(|l| l.contains("key listing")).unwrap_or_else(|| panic!("no key listing line:\n{stdout}"));
    assert!(line.contains("lru_crawler no") && line.contains("-o no_lru_crawler"), "{line}");
}
