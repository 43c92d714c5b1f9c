//! Nothing dropped without a word: an entry a view rejects while the
//! daemon runs and the view is maintained incrementally (a key with a
//! space, a NULL key column, a value too large) is logged naming view and
//! key, counted in `tailcache_entries_rejected_total{view,reason}` and
//! shown in `/status`, and the value published before under that key is
//! deleted, as when the view is computed in full.

use std::path::Path;
use std::time::Duration;

use mysql_async::prelude::*;

use crate::admin::{http, parse_prometheus};
use crate::harness::{self, Daemon, Memcached, TestDb, free_port, run_tailcache, wait_until};

const SCHEMA: &str = "
CREATE TABLE page (id INT PRIMARY KEY, slug VARCHAR(100) NULL, body TEXT NOT NULL, live INT NOT NULL)
  DEFAULT CHARSET=utf8mb4;
INSERT INTO page VALUES (1, 'home', 'hello', 1), (2, 'draft', 'not yet', 0);
";

const DEADLINE: Duration = Duration::from_secs(30);

fn config(db: &TestDb, state: &Path, mc: &Memcached, admin: u16) -> String {
    format!(
        "[mysql]\nurl = \"{url}\"\nserver_id = {sid}\ntables = [\"page\"]\nheartbeat_secs = 0.5\n\n\
         [state]\npath = \"{state}\"\n\n[memcached]\nservers = [\"{mc}\"]\nkey_prefix = \"rj:\"\nmax_item_size = 2048\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[views]]\nname = \"pages\"\nkey = \"page:{{slug}}\"\nquery = \"SELECT id, slug, body FROM page WHERE live = 1\"\n",
        url = db.url,
        sid = db.server_id,
        state = state.display(),
        mc = mc.addr(),
    )
}

/// `tailcache_entries_rejected_total{view="pages",reason}`, 0 when absent.
fn rejected_metric(admin: u16, reason: &str) -> f64 {
    let (code, body) = http(admin, "GET", "/metrics").expect("the admin endpoint answers");
    assert_eq!(code, 200, "{body}");
    parse_prometheus(&body)
        .iter()
        .filter(|(n, l, _)| {
            n == "tailcache_entries_rejected_total"
                && l.get("view").map(String::as_str) == Some("pages")
                && l.get("reason").map(String::as_str) == Some(reason)
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// `entries_rejected.pages.<reason>` of `/status`, 0 when absent.
fn rejected_status(admin: u16, reason: &str) -> u64 {
    let (code, body) = http(admin, "GET", "/status").expect("the admin endpoint answers");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("/status is JSON");
    let rejected = v.get("entries_rejected").unwrap_or_else(|| panic!("/status has no entries_rejected: {body}"));
    rejected.get("pages").and_then(|p| p.get(reason)).and_then(|n| n.as_u64()).unwrap_or(0)
}

/// Waits until the row change `sql` is rejected for `reason` (the count
/// going from `before` to `before + 1`) in the log (from `log_from` on,
/// naming `key`), `/metrics` and `/status`; and asserts it was published
/// incrementally.
async fn expect_rejected(daemon: &Daemon, admin: u16, log_from: usize, reason: &str, before: u64, logged: &str) {
    let what = format!("{reason} rejection #{} in /metrics and /status (log:\n{})", before + 1, daemon.log());
    wait_until(&what, DEADLINE, || async {
        (rejected_metric(admin, reason) == (before + 1) as f64 && rejected_status(admin, reason) == before + 1)
            .then_some(())
    })
    .await;
    let log = daemon.log();
    let new = &log[log_from..];
    assert!(
        new.lines().any(|l| l.contains("ERROR") && l.contains(logged)),
        "no error line containing {logged:?} in the log since the change:\n{new}"
    );
    assert!(
        new.lines()
            .any(|l| l.contains("publish stages") && l.contains("incremental_views=1") && l.contains("full=false")),
        "the change was not published incrementally (the path under test):\n{new}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_entries_of_an_incremental_publish_are_logged_counted_and_shown() {
    let db = harness::server().create_db("rejects").await;
    let mut conn = db.root_conn().await;
    conn.query_drop(SCHEMA).await.unwrap();
    let mc = Memcached::start();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let admin = free_port();
    let daemon = Daemon::start(&config(&db, &state, &mc, admin));
    let cached = |key: &'static str| {
        let mc = &mc;
        move || async move { mc.get_raw(key).map(|_| ()) }
    };
    wait_until("page:home in memcached", DEADLINE, cached("rj:page:home")).await;
    wait_until("the first publish's /status", DEADLINE, || async {
        let (code, body) = http(admin, "GET", "/status")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 200 && v.get("published_consistent") == Some(&serde_json::Value::Bool(true))).then_some(())
    })
    .await;
    assert!(daemon.log().contains("incremental=true"), "the view must be maintained incrementally:\n{}", daemon.log());
    assert_eq!(rejected_metric(admin, "bad_key"), 0.0);
    assert_eq!(rejected_status(admin, "bad_key"), 0);

    // A new row whose key has a space, alone in its transaction.
    let from = daemon.log().len();
    conn.query_drop("INSERT INTO page VALUES (3, 'has space', 'x', 1)").await.unwrap();
    expect_rejected(&daemon, admin, from, "bad_key", 0, "view \"pages\", key \"rj:page:has space\"").await;

    // A published row whose slug gets a space: the new entry is rejected
    // and the old key deleted, not left stale.
    let from = daemon.log().len();
    conn.query_drop("UPDATE page SET slug = 'home page' WHERE id = 1").await.unwrap();
    expect_rejected(&daemon, admin, from, "bad_key", 1, "view \"pages\", key \"rj:page:home page\"").await;
    wait_until("page:home deleted from memcached", DEADLINE, || async {
        mc.get_raw("rj:page:home").is_none().then_some(())
    })
    .await;

    // A NULL key column.
    conn.query_drop("INSERT INTO page VALUES (4, 'four', 'x', 1)").await.unwrap();
    wait_until("page:four in memcached", DEADLINE, cached("rj:page:four")).await;
    let from = daemon.log().len();
    conn.query_drop("UPDATE page SET slug = NULL WHERE id = 4").await.unwrap();
    expect_rejected(&daemon, admin, from, "key_column", 0, "view \"pages\": key column \"slug\" is NULL").await;
    wait_until("page:four deleted from memcached", DEADLINE, || async {
        mc.get_raw("rj:page:four").is_none().then_some(())
    })
    .await;

    // A value over max_item_size.
    conn.query_drop("INSERT INTO page VALUES (5, 'five', 'x', 1)").await.unwrap();
    wait_until("page:five in memcached", DEADLINE, cached("rj:page:five")).await;
    let from = daemon.log().len();
    conn.query_drop("UPDATE page SET body = REPEAT('y', 4000) WHERE id = 5").await.unwrap();
    expect_rejected(&daemon, admin, from, "too_large", 0, "view \"pages\", key \"rj:page:five\": value is").await;
    wait_until("page:five deleted from memcached", DEADLINE, || async {
        mc.get_raw("rj:page:five").is_none().then_some(())
    })
    .await;

    // A row the view filters out is nobody's rejection, whatever its key.
    conn.query_drop("INSERT INTO page VALUES (6, 'not live', 'x', 0)").await.unwrap();
    conn.query_drop("INSERT INTO page VALUES (7, 'seven', 'x', 1)").await.unwrap();
    wait_until("page:seven in memcached", DEADLINE, cached("rj:page:seven")).await;
    assert_eq!(rejected_metric(admin, "bad_key"), 2.0, "{}", daemon.log());
    assert_eq!(rejected_status(admin, "bad_key"), 2);
    assert!(!daemon.log().contains("not live"), "{}", daemon.log());

    // `tailcache status` shows them with the view.
    let out = run_tailcache(&["status", "-c", daemon.config_path().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let line = text.lines().find(|l| l.trim_start().starts_with("pages:")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("entries rejected: bad_key 2, key_column 1, too_large 1"), "{text}");
}
