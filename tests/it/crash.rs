//! Crash-exact publishing: the daemon is aborted at every crash point
//! (`src/failpoint.rs`, built with the `failpoints` feature) in turn, rows
//! move into and out of the views while it is down, and after a restart
//! memcached must hold, key for key and byte for byte, what a fresh
//! tailcache computes from the server: no missing key, no stale key, no
//! orphan.
//!
//! The reference is a second daemon with a state file of its own, started
//! once and left running, publishing to a memcached of its own: "what the
//! views say over a fresh read of the server".

use std::collections::BTreeMap;
use std::time::Duration;

use mysql_async::prelude::*;

use crate::harness::{self, Daemon, Memcached, TestDb, wait_until};

const PREFIX: &str = "cr:";
/// Pages: more than two pieces (`PIECE` = 4096) in the `page` view.
const PAGES: u32 = 9_000;
const GROUPS: u32 = 10;
const CONVERGE: Duration = Duration::from_secs(60);
const CRASH: Duration = Duration::from_secs(60);

fn config(db: &TestDb, server_id: u32, state: &str, mc: &Memcached) -> String {
    format!(
        r#"[mysql]
url = {url:?}
server_id = {server_id}
tables = ["page", "grp"]
heartbeat_secs = 0.5

[state]
path = {state:?}

[memcached]
servers = ["{mc}"]
key_prefix = "{PREFIX}"
codec = "json"

# Off: this test checks what the restart itself heals; the consistency
# inspector would repair recorded keys behind its back.
[inspect]
keys_per_second = 0

[[views]]
name = "page"
key = "page:{{slug}}"
query = "SELECT p.slug, p.title, g.name AS grp FROM page p JOIN grp g ON g.id = p.grp_id WHERE g.active = 1"

[[views]]
name = "groups"
key = "groups"
shape = "list"
value_column = "name"
query = "SELECT name FROM grp WHERE active = 1 ORDER BY id"
"#,
        url = db.url,
        mc = mc.addr(),
    )
}

/// What a reader finds under the prefix, the sentinel key left out (its
/// token differs per instance by design).
fn contents(mc: &Memcached) -> BTreeMap<String, (Vec<u8>, u32)> {
    let mut m = mc.dump(PREFIX);
    m.remove(&format!("{PREFIX}{}", tailcache::sink::EPOCH_KEY_SUFFIX));
    m
}

/// A short account of how two dumps differ, for the failure message.
fn differences(got: &BTreeMap<String, (Vec<u8>, u32)>, want: &BTreeMap<String, (Vec<u8>, u32)>) -> String {
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).take(5).collect();
    let differ: Vec<&String> =
        want.iter().filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v)).map(|(k, _)| k).take(5).collect();
    format!(
        "{} keys held, {} expected; missing (first 5): {missing:?}; stale or orphan: {extra:?}; different values: {differ:?}",
        got.len(),
        want.len()
    )
}

/// Waits until `mc` holds exactly what the reference holds, once both
/// published a commit made now (a marker page's new title): equality
/// before that could be two daemons equally behind.
async fn converged(root: &mut mysql_async::Conn, mc: &Memcached, reference: &Memcached, when: &str) {
    let mark = format!("mark-{}", rand::random::<u64>());
    root.query_drop(format!("UPDATE page SET title = '{mark}' WHERE slug = 'marker'")).await.unwrap();
    let marked = |m: &BTreeMap<String, (Vec<u8>, u32)>| {
        m.get(&format!("{PREFIX}page:marker")).is_some_and(|(v, _)| v.windows(mark.len()).any(|w| w == mark.as_bytes()))
    };
    let mut last = String::new();
    let r = tokio::time::timeout(CONVERGE, async {
        loop {
            let (got, want) = (contents(mc), contents(reference));
            if marked(&want) && got == want {
                return;
            }
            last = differences(&got, &want);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(r.is_ok(), "{when}: memcached did not converge to what the views say within {CONVERGE:?}: {last}");
}

/// Waits for the daemon's first publish after start (its debug line).
async fn started_publishing(d: &Daemon) {
    wait_until("the first publish after start", CONVERGE, || async {
        d.log().contains("publish stages").then_some(())
    })
    .await;
}

/// Waits for the daemon to abort at `point`.
async fn crashed_at(d: &mut Daemon, point: &str) {
    let what = format!("the daemon to reach crash point {point}");
    let status = wait_until(&what, CRASH, || {
        let s = d.try_wait();
        async move { s }
    })
    .await;
    let log = d.log();
    assert!(
        log.contains(&format!("crash point {point} reached")),
        "the daemon exited ({status:?}) without reaching {point}:\n{}",
        &log[log.len().saturating_sub(4000)..]
    );
    assert!(!status.success(), "an abort is not a clean exit: {status:?}");
}

/// Moves rows into and out of the views: group `g` switched (all its
/// pages with it, through the join), a page moved to another group, one
/// page added and one deleted, a title changed.
async fn churn(conn: &mut mysql_async::Conn, g: u32, round: u32) {
    let p = (round * 7919) % PAGES + 1;
    conn.query_drop(format!(
        "START TRANSACTION;
         UPDATE grp SET active = 1 - active WHERE id = {g};
         UPDATE page SET grp_id = {}, title = CONCAT('moved ', {round}) WHERE id = {p};
         INSERT INTO page (slug, title, grp_id) VALUES ('new-{round}', 'new', {g});
         DELETE FROM page WHERE id = {};
         COMMIT",
        (g % GROUPS) + 1,
        (p + 13) % PAGES + 1,
    ))
    .await
    .unwrap();
}

/// A database with the workload's tables, the daemon's config, its
/// memcached, and a reference daemon publishing to a memcached of its own.
struct Rig {
    db: TestDb,
    root: mysql_async::Conn,
    text: String,
    mc: Memcached,
    mc_ref: Memcached,
    _reference: Daemon,
    _dir: tempfile::TempDir,
}

async fn rig(hint: &str) -> Rig {
    if !tailcache::failpoint::ENABLED {
        panic!("this build has no crash points: run the tests with `--features failpoints` (scripts/test.sh does)");
    }
    let server = harness::server();
    let db = server.create_db(hint).await;
    // The reference daemon reads as a user of its own, with a server_id of
    // its own (tailcache tells its own leftover binlog dump connections
    // apart from other readers by user and host).
    let ref_db = server.create_db(&format!("{hint}_ref")).await;
    let mut root = db.root_conn().await;
    root.query_drop(format!("GRANT SELECT ON `{}`.* TO '{}'@'%'", db.name, ref_db.user)).await.unwrap();
    if server.flavor == harness::Flavor::Mysql {
        root.query_drop(format!("GRANT LOCK TABLES ON `{}`.* TO '{}'@'%'", db.name, ref_db.user)).await.unwrap();
    }
    let ref_url = ref_db.url.replace(&format!("/{}", ref_db.name), &format!("/{}", db.name));
    let ref_id = ref_db.server_id;
    let ref_db = TestDb { url: ref_url, ..db.clone() };
    root.query_drop(
        "CREATE TABLE grp (id INT PRIMARY KEY, name VARCHAR(32) NOT NULL, active TINYINT NOT NULL);
         CREATE TABLE page (id INT AUTO_INCREMENT PRIMARY KEY, slug VARCHAR(64) NOT NULL UNIQUE,
                            title VARCHAR(200) NOT NULL, grp_id INT NOT NULL)",
    )
    .await
    .unwrap();
    // Group 0 is never switched: it holds the marker page (see `converged`).
    let groups: Vec<String> = (0..=GROUPS).map(|g| format!("({g}, 'g{g}', 1)")).collect();
    root.query_drop(format!("INSERT INTO grp VALUES {}", groups.join(","))).await.unwrap();
    for chunk in (1..=PAGES).collect::<Vec<_>>().chunks(1000) {
        let rows: Vec<String> = chunk.iter().map(|i| format!("('p{i}', 'title {i}', {})", i % GROUPS + 1)).collect();
        root.query_drop(format!("INSERT INTO page (slug, title, grp_id) VALUES {}", rows.join(","))).await.unwrap();
    }
    root.query_drop("INSERT INTO page (slug, title, grp_id) VALUES ('marker', 'mark', 0)").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db").to_string_lossy().into_owned();
    let ref_state = dir.path().join("ref.db").to_string_lossy().into_owned();
    let (mc, mc_ref) = (Memcached::start(), Memcached::start());
    let text = config(&db, db.server_id, &state, &mc);
    let reference = Daemon::start(&config(&ref_db, ref_id, &ref_state, &mc_ref));
    let mut d = Daemon::start(&text);
    converged(&mut root, &mc, &mc_ref, "first start").await;
    d.stop();
    Rig { db, root, text, mc, mc_ref, _reference: reference, _dir: dir }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_every_point_heals_to_exactly_what_the_views_say() {
    let Rig { db, mut root, text, mc, mc_ref, _reference, _dir } = rig("crash").await;

    let mut round = 0;
    let mut reached = Vec::new();
    for point in tailcache::failpoint::POINTS {
        round += 1;
        // The start's full publish waits for the catch-up, so that what
        // changed while it was down is in it (its pieces, its deletes).
        let crash_env = [("FAILPOINTS", format!("publish.start=sleep(2000);{point}=return"))];
        let env: Vec<(&str, &str)> = crash_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut xa: Option<mysql_async::Conn> = None;
        // The group the crash round switches; switched back while the
        // daemon is down, so that keys the crashed round wrote leave again
        // (stale if never recorded) and keys it deleted come back unchanged
        // (missing if still recorded).
        let g = if *point == "publish.mid_deletes" {
            // An active one, so that its pages are deleted.
            root.query_first("SELECT MIN(id) FROM grp WHERE active = 1 AND id > 0").await.unwrap().unwrap()
        } else {
            round % GROUPS + 1
        };
        let mut d = match *point {
            // A snapshot: the start of a forced resync.
            "snapshot.mid_table" => Daemon::start_with_env(&text, &["--resync"], &env),
            // The start's full publish: more than two pieces, and (for the
            // deletes) a group's pages that left while it was down.
            "publish.between_pieces" | "publish.mid_deletes" => {
                churn(&mut root, g, round).await;
                Daemon::start_with_env(&text, &[], &env)
            }
            // A running daemon, up to date, meets the point with a commit.
            _ => {
                let d = Daemon::start_with_env(&text, &[], &env);
                // Its start's publish done first (it has nothing to write),
                // so that the commit below is what reaches the point.
                started_publishing(&d).await;
                if *point == "xa.after_stage" {
                    let mut c = db.root_conn().await;
                    c.query_drop(format!(
                        "XA START 'crash{round}'; UPDATE grp SET active = 1 - active WHERE id = {g};
                         XA END 'crash{round}'; XA PREPARE 'crash{round}'"
                    ))
                    .await
                    .unwrap();
                    xa = Some(c);
                } else {
                    churn(&mut root, g, round).await;
                }
                d
            }
        };
        crashed_at(&mut d, point).await;
        reached.push(*point);
        // Rows move while it is down, back where they were.
        if let Some(mut c) = xa.take() {
            c.query_drop(format!("XA COMMIT 'crash{round}'")).await.unwrap();
        }
        round += 1;
        churn(&mut root, g, round).await;
        // The restart's first publish waits for the replicator to catch up
        // with what changed while it was down: keys the crashed round wrote
        // and that left since are stale unless remembered, keys it deleted
        // and that came back unchanged are missing unless remembered.
        let mut d = Daemon::start_with_env(&text, &[], &[("FAILPOINTS", "publish.start=sleep(2000)")]);
        converged(&mut root, &mc, &mc_ref, &format!("restart after a crash at {point}")).await;
        // And it keeps publishing.
        round += 1;
        churn(&mut root, round % GROUPS + 1, round).await;
        converged(&mut root, &mc, &mc_ref, &format!("a commit after the restart that followed {point}")).await;
        d.stop();
    }
    assert_eq!(reached, tailcache::failpoint::POINTS, "every crash point was reached");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_at_random_instants_heals_to_exactly_what_the_views_say() {
    use rand::{Rng, SeedableRng};
    let Rig { db, mut root, text, mc, mc_ref, _reference, _dir } = rig("kill9").await;
    let seed: u64 = std::env::var("TAILCACHE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("kill9_at_random_instants: seed {seed} (TAILCACHE_TEST_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut round = 1000;
    for iteration in 0..8 {
        let mut d = Daemon::start(&text);
        // Commits keep coming while the daemon starts, publishes, and dies
        // at a random instant.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (stop, url, first) = (stop.clone(), db.root_url.clone(), round);
            tokio::spawn(async move {
                let mut c = mysql_async::Conn::from_url(url).await.unwrap();
                let mut r = first;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    r += 1;
                    churn(&mut c, r % GROUPS + 1, r).await;
                }
                r
            })
        };
        let after = Duration::from_millis(rng.random_range(0..400));
        tokio::time::sleep(after).await; // the random instant, not a synchronisation
        d.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        round = writer.await.unwrap();
        // More rows move while it is down.
        round += 1;
        churn(&mut root, round % GROUPS + 1, round).await;
        let mut d = Daemon::start_with_env(&text, &[], &[("FAILPOINTS", "publish.start=sleep(2000)")]);
        converged(
            &mut root,
            &mc,
            &mc_ref,
            &format!("seed {seed}, iteration {iteration}: restart after kill -9 at {after:?}"),
        )
        .await;
        d.stop();
    }
}
