//! The consistency inspector against a real server and memcached: keys
//! that hold what was published count as consistent, a key overwritten
//! behind tailcache's back is counted as inconsistent, logged and repaired
//! within the inspector's period, and the numbers show in `/metrics`,
//! `/status` and `tailcache status`.

use std::path::Path;
use std::time::{Duration, Instant};

use mysql_async::prelude::*;

use crate::admin::{http, parse_prometheus};
use crate::harness::{self, Daemon, Memcached, TestDb, free_port, run_tailcache, wait_until};

const ROWS: u32 = 20;
/// Every key is looked at in each inspection: 20 keys, 1000 keys/s.
const RATE: u32 = 1000;
const DEADLINE: Duration = Duration::from_secs(30);
/// One inspection finds the key, the next one (a tick later) confirms it,
/// the round after rewrites it: three ticks of one second, and some slack
/// for a loaded machine.
const REPAIR_WITHIN: Duration = Duration::from_secs(6);

fn config(db: &TestDb, state: &Path, mc: &Memcached, admin_port: u16, rate: u32) -> String {
    format!(
        "[mysql]\nurl = \"{url}\"\nserver_id = {sid}\ntables = [\"item\"]\nheartbeat_secs = 0.5\n\n\
         [state]\npath = \"{state}\"\n\n[memcached]\nservers = [\"{mc}\"]\nkey_prefix = \"i:\"\ncodec = \"json\"\n\n\
         [inspect]\nkeys_per_second = {rate}\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n\
         [[views]]\nname = \"item\"\nkey = \"item:{{id}}\"\nquery = \"SELECT id, name FROM item\"\n",
        url = db.url,
        sid = db.server_id,
        state = state.display(),
        mc = mc.addr(),
    )
}

fn status(port: u16) -> Option<serde_json::Value> {
    let (code, body) = http(port, "GET", "/status")?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}

/// `tailcache_inspected_keys_total{result=…}`.
fn inspected(port: u16, result: &str) -> f64 {
    let (code, body) = http(port, "GET", "/metrics").expect("the admin endpoint answers");
    assert_eq!(code, 200, "{body}");
    parse_prometheus(&body)
        .into_iter()
        .filter(|(n, l, _)| {
            n == "tailcache_inspected_keys_total" && l.get("result").map(String::as_str) == Some(result)
        })
        .map(|(_, _, v)| v)
        .sum()
}

fn since_start(st: &serde_json::Value, k: &str) -> u64 {
    st["inspect"]["since_start"][k].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_overwritten_behind_tailcaches_back_is_counted_logged_and_repaired() {
    let db = harness::server().create_db("inspect").await;
    let mut conn = db.root_conn().await;
    conn.query_drop("CREATE TABLE item (id INT PRIMARY KEY, name VARCHAR(64) NOT NULL)").await.unwrap();
    let values: Vec<String> = (1..=ROWS).map(|i| format!("({i}, 'item {i}')")).collect();
    conn.query_drop(format!("INSERT INTO item VALUES {}", values.join(", "))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let mc = Memcached::start();
    let port = free_port();
    let mut daemon = Daemon::start(&config(&db, &state, &mc, port, RATE));
    let cfg_path = daemon.config_path().to_str().unwrap().to_owned();

    let good = wait_until("every key published", DEADLINE, || async {
        (1..=ROWS).map(|i| mc.get_raw(&format!("i:item:{i}"))).collect::<Option<Vec<_>>>()
    })
    .await;
    // Every key inspected at least once, all consistent.
    let st = wait_until("a full pass of the inspector", DEADLINE, || async {
        status(port).filter(|s| since_start(s, "consistent") >= u64::from(ROWS))
    })
    .await;
    assert_eq!(since_start(&st, "inconsistent"), 0, "{st}\n{}", daemon.log());
    assert_eq!(st["inspect"]["keys_per_second"], RATE, "{st}");
    assert!(
        st["inspect"]["since_start"]["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("100 % (none inconsistent) over ")),
        "{st}"
    );
    assert!(inspected(port, "consistent") >= f64::from(ROWS));
    assert_eq!(inspected(port, "inconsistent"), 0.0);

    // Behind tailcache's back: item 2 gets other bytes.
    let (good2, flags2) = good[1].clone();
    mc.set_raw("i:item:2", b"{\"id\":2,\"name\":\"tampered\"}", flags2);
    let tampered = Instant::now();
    wait_until("the tampered key repaired", REPAIR_WITHIN, || async {
        (mc.get_raw("i:item:2") == Some((good2.clone(), flags2))).then_some(())
    })
    .await;
    let repaired_in = tampered.elapsed();
    let st = wait_until("the inconsistency counted", DEADLINE, || async {
        status(port).filter(|s| since_start(s, "inconsistent") >= 1)
    })
    .await;
    assert_eq!(since_start(&st, "inconsistent"), 1, "exactly the one key: {st}");
    assert_eq!(st["inspect"]["last_hour"]["inconsistent"], 1, "{st}");
    let keys = st["inspect"]["since_start"]["keys"].as_u64().unwrap();
    let summary = st["inspect"]["last_hour"]["summary"].as_str().unwrap().to_owned();
    assert!(summary.contains(" % (") && summary.contains(" nines) over "), "{summary}");
    assert!(st["inspect"]["last_hour"]["nines"].as_f64().is_some_and(|n| n > 0.0), "{st}");
    assert!(keys > u64::from(ROWS), "{st}");
    assert_eq!(inspected(port, "inconsistent"), 1.0);
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("memcached does not hold what was published"))
        .unwrap_or_else(|| panic!("no inconsistency logged:\n{log}"));
    assert!(line.contains("WARN") && line.contains("view=item") && line.contains("key=i:item:2"), "{line}");
    assert!(line.contains("expected=") && line.contains("found="), "{line}");
    // The other keys were never touched.
    for i in (1..=ROWS).filter(|&i| i != 2) {
        assert_eq!(mc.get_raw(&format!("i:item:{i}")).as_ref(), Some(&good[i as usize - 1]), "item {i}");
    }
    // The repaired key counts as consistent again; nothing else is found.
    let before = since_start(&st, "consistent");
    let st = wait_until("inspections after the repair", DEADLINE, || async {
        status(port).filter(|s| since_start(s, "consistent") >= before + u64::from(ROWS))
    })
    .await;
    assert_eq!(since_start(&st, "inconsistent"), 1, "{st}\n{}", daemon.log());

    let out = run_tailcache(&["status", "-c", &cfg_path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("consistency: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.contains(" nines) over ") && line.contains("in the last hour") && line.contains("since start"),
        "{line}"
    );
    assert!(stdout.contains(&format!("inspector at {RATE} keys/s; since start 1 inconsistent")), "{stdout}");
    eprintln!("repaired {repaired_in:?} after the overwrite; {line}");
    daemon.stop();

    // Disabled: no tally, and the status says so.
    let port = free_port();
    let daemon = Daemon::start(&config(&db, &state, &mc, port, 0));
    let st = wait_until("the restarted daemon publishing", DEADLINE, || async {
        status(port).filter(|s| s["published_consistent"] == true)
    })
    .await;
    assert!(st["inspect"].is_null(), "{st}");
    let out = run_tailcache(&["status", "-c", daemon.config_path().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("consistency: not measured (inspector disabled: inspect.keys_per_second = 0)"), "{stdout}");
}
