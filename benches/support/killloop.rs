//! The random `kill -9` loop (issue 15): a writer task commits without a
//! pause, moving rows into and out of the views (directly and through a
//! joined table); the daemon under test is killed with SIGKILL at a random
//! instant, restarted with the writes paused, and memcached must then hold,
//! key for key and byte for byte, what a reference daemon (a state file of
//! its own, started once, never killed) publishes to a memcached of its own.
//!
//! Each iteration:
//!
//! 1. writes resume; the victim is either the daemon already running (its
//!    incremental rounds under load) or a daemon started now (its start-up:
//!    catch-up, absorbing keys in doubt, the full publish in pieces), a coin
//!    toss; it is killed with SIGKILL after a random delay (0..=`max_delay`);
//! 2. writes pause (the writer finishes the transaction it is in); one
//!    marker commit (`mark`, a view of its own) is made, and the daemon
//!    restarted;
//! 3. once both memcacheds hold the marker (both daemons published past
//!    every commit), their contents are compared until they are equal or a
//!    deadline passes; then what differs is counted, per key:
//!    * missing: the reference holds it, the daemon's memcached does not;
//!    * differing: both hold it, with other bytes (or flags);
//!    * stale: only the daemon's memcached holds it, and the daemon's
//!      bookkeeping (`_tailcache_published`) lists it (a published key
//!      that left the view and was never deleted);
//!    * orphan: only the daemon's memcached holds it, and nothing in the
//!      bookkeeping names it (a key nobody remembers).
//!
//! The seed (printed; `BENCH_KILL_SEED` replays it) drives the delays, the
//! victim choice and the writer's choices; the interleaving with the
//! daemon's threads is the machine's, so a replay is the same schedule of
//! kills, not the same instants in the daemon. A mismatch leaves its details
//! (key diffs, both daemons' logs, the state files) under
//! `target/killloop/seed-<seed>/iter-<n>/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::harness::{self, Daemon, Memcached, TestDb};
use crate::{Report, env_usize, ms, pct};

const PREFIX: &str = "kl:";
const GROUPS: u32 = 30;
/// The marker and the comparison: generous, a loaded machine must not turn
/// a slow start into a "mismatch" (a real one stays wrong past it).
const MARKER_DEADLINE: Duration = Duration::from_secs(30);
const EQUAL_DEADLINE: Duration = Duration::from_secs(5);

type Dump = BTreeMap<String, (Vec<u8>, u32)>;

fn config(db: &TestDb, server_id: u32, state: &Path, mc: &Memcached) -> String {
    format!(
        r#"[mysql]
url = {url:?}
server_id = {server_id}
tables = ["page", "grp", "mark"]
heartbeat_secs = 0.5

[state]
path = {state:?}

[memcached]
servers = ["{mc}"]
key_prefix = "{PREFIX}"
codec = "json"

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

[[views]]
name = "mark"
key = "mark:{{id}}"
query = "SELECT id, v FROM mark"
"#,
        url = db.url,
        mc = mc.addr(),
        state = state.display().to_string(),
    )
}

/// What a reader finds under the prefix, the sentinel key left out (its
/// token differs per instance by design).
fn contents(mc: &Memcached) -> Dump {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut m = loop {
        match dump(&mc.addr(), PREFIX) {
            Some(m) => break m,
            // The crawler is still walking for the previous dump: poll again.
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            None => panic!("memcached at {} answered BUSY to `lru_crawler metadump all` for 10 s", mc.addr()),
        }
    };
    m.remove(&format!("{PREFIX}{}", tailcache::sink::EPOCH_KEY_SUFFIX));
    m
}

/// `Memcached::dump` of the test harness, but `None` when the crawler is
/// busy (it still walks for the previous request; the harness panics):
/// every key under `prefix` with its value and flags.
fn dump(addr: &str, prefix: &str) -> Option<Dump> {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect memcached");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"lru_crawler metadump all\r\n").expect("write metadump");
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut keys = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("read metadump");
        let line = line.trim_end();
        if line == "END" {
            break;
        }
        if line.starts_with("BUSY") {
            return None;
        }
        assert!(!line.starts_with("ERROR") && !line.starts_with("CLIENT_ERROR"), "metadump refused: {line}");
        let Some(enc) = line.strip_prefix("key=").and_then(|l| l.split(' ').next()) else { continue };
        // Keys here are plain ASCII; `%XX` decoded all the same.
        let mut key = Vec::new();
        let b = enc.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match (b[i], enc.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())) {
                (b'%', Some(v)) => {
                    key.push(v);
                    i += 3;
                }
                (c, _) => {
                    key.push(c);
                    i += 1;
                }
            }
        }
        let key = String::from_utf8_lossy(&key).into_owned();
        if key.starts_with(prefix) {
            keys.push(key);
        }
    }
    let mut out = Dump::new();
    for chunk in keys.chunks(100) {
        s.write_all(format!("get {}\r\n", chunk.join(" ")).as_bytes()).expect("write get");
        loop {
            let mut line = String::new();
            r.read_line(&mut line).expect("read get");
            if line == "END\r\n" {
                break;
            }
            let parts: Vec<&str> = line.trim_end().split(' ').collect();
            let ["VALUE", k, flags, len, ..] = parts.as_slice() else { panic!("unexpected reply {line:?}") };
            let mut data = vec![0u8; len.parse::<usize>().unwrap() + 2];
            r.read_exact(&mut data).expect("read value");
            data.truncate(data.len() - 2);
            out.insert(k.to_string(), (data, flags.parse().unwrap()));
        }
    }
    Some(out)
}

fn has_marker(mc: &Memcached, marker: &str) -> bool {
    mc.get_raw(&format!("{PREFIX}mark:1")).is_some_and(|(v, _)| v.windows(marker.len()).any(|w| w == marker.as_bytes()))
}

#[derive(Default, Debug, Clone)]
struct Diff {
    missing: Vec<String>,
    differing: Vec<String>,
    stale: Vec<String>,
    orphan: Vec<String>,
}

/// Whether the daemon's bookkeeping lists `key` (with or without the prefix:
/// read-only, beside the running daemon; WAL lets it read).
fn recorded(state: &Path, key: &str) -> bool {
    let Ok(c) = rusqlite::Connection::open_with_flags(state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return false;
    };
    let _ = c.busy_timeout(Duration::from_secs(2));
    let bare = key.strip_prefix(PREFIX).unwrap_or(key);
    c.query_row(
        "SELECT count(*) FROM _tailcache_published WHERE key = ?1 OR key = ?2",
        (key.as_bytes(), bare.as_bytes()),
        |r| r.get::<_, i64>(0),
    )
    .is_ok_and(|n| n > 0)
}

fn diff(got: &Dump, want: &Dump, state: &Path) -> Diff {
    let mut d = Diff::default();
    for (k, v) in want {
        match got.get(k) {
            None => d.missing.push(k.clone()),
            Some(g) if g != v => d.differing.push(k.clone()),
            Some(_) => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        if recorded(state, k) { d.stale.push(k.clone()) } else { d.orphan.push(k.clone()) }
    }
    d
}

fn show(v: Option<&(Vec<u8>, u32)>) -> String {
    match v {
        None => "(absent)".into(),
        Some((b, f)) => format!("flags {f} {:?}", String::from_utf8_lossy(b)),
    }
}

/// Writes what a mismatch looked like to `dir`: the keys with both sides'
/// values, both logs, copies of the state files.
#[allow(clippy::too_many_arguments)]
fn save_mismatch(
    dir: &Path,
    seed: u64,
    iter: usize,
    what: &str,
    d: &Diff,
    got: &Dump,
    want: &Dump,
    victim_log: &str,
    restart_log: &str,
    state: &Path,
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut s = format!("seed {seed} iteration {iter}: {what}\n");
    s += &format!(
        "missing {}, differing {}, stale {}, orphan {}\n\n",
        d.missing.len(),
        d.differing.len(),
        d.stale.len(),
        d.orphan.len()
    );
    for (kind, keys) in
        [("missing", &d.missing), ("differing", &d.differing), ("stale", &d.stale), ("orphan", &d.orphan)]
    {
        for k in keys {
            s += &format!("{kind} {k}\n  daemon:    {}\n  reference: {}\n", show(got.get(k)), show(want.get(k)));
        }
    }
    std::fs::write(dir.join("diff.txt"), s).unwrap();
    std::fs::write(dir.join("victim.log"), victim_log).unwrap();
    std::fs::write(dir.join("restart.log"), restart_log).unwrap();
    for suffix in ["", "-wal", "-shm", ".in-doubt", ".in-doubt-wal", ".in-doubt-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", state.display()));
        if from.exists() {
            let _ = std::fs::copy(&from, dir.join(format!("state.db{suffix}")));
        }
    }
}

/// One writer transaction: a page moved to another group with a new title,
/// a page added, one deleted; now and then a group switched (all its pages
/// in or out of the view through the join) or renamed (every value of its
/// pages changes).
async fn churn(conn: &mut mysql_async::Conn, rng: &mut StdRng, round: u64, max_id: &mut u64) {
    let mut sql = String::from("START TRANSACTION;");
    if rng.random_bool(0.25) {
        sql += &format!("UPDATE grp SET active = 1 - active WHERE id = {};", rng.random_range(1..=GROUPS));
    }
    if rng.random_bool(0.05) {
        let g = rng.random_range(1..=GROUPS);
        sql += &format!("UPDATE grp SET name = 'g{g}-{round}' WHERE id = {g};");
    }
    let p = rng.random_range(1..=*max_id);
    sql +=
        &format!("UPDATE page SET grp_id = {}, title = 'moved {round}' WHERE id = {p};", rng.random_range(1..=GROUPS));
    sql += &format!(
        "INSERT INTO page (slug, title, grp_id) VALUES ('n{round}', 'new', {});",
        rng.random_range(1..=GROUPS)
    );
    *max_id += 1;
    sql += &format!("DELETE FROM page WHERE id = {};", rng.random_range(1..=*max_id));
    sql += "COMMIT";
    conn.query_drop(sql).await.unwrap();
}

pub async fn bench_killloop(rep: &mut Report) {
    let iterations = env_usize("BENCH_KILL_ITERATIONS", 200);
    let max_delay = env_usize("BENCH_KILL_MAX_DELAY_MS", 300) as u64;
    let pages = env_usize("BENCH_KILL_PAGES", 9_000) as u64;
    let seed: u64 =
        std::env::var("BENCH_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    println!(
        "  killloop: seed {seed} (replay: BENCH_KILL_SEED={seed}), {iterations} iterations, delay 0..={max_delay} ms, {pages} pages"
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let server = harness::server();
    let db = server.create_db("killloop").await;
    // The reference reads as a user of its own with a server_id of its own
    // (tailcache tells its own leftover dump connections apart by user).
    let ref_db = server.create_db("killloop_ref").await;
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
                            title VARCHAR(200) NOT NULL, grp_id INT NOT NULL);
         CREATE TABLE mark (id INT PRIMARY KEY, v VARCHAR(32) NOT NULL);
         INSERT INTO mark VALUES (1, 'start')",
    )
    .await
    .unwrap();
    let groups: Vec<String> = (1..=GROUPS).map(|g| format!("({g}, 'g{g}', 1)")).collect();
    root.query_drop(format!("INSERT INTO grp VALUES {}", groups.join(","))).await.unwrap();
    root.query_drop(format!(
        "INSERT INTO page (slug, title, grp_id) SELECT CONCAT('p', seq), CONCAT('title ', seq), seq % {GROUPS} + 1 FROM seq_1_to_{pages}"
    ))
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db");
    let ref_state = dir.path().join("ref.db");
    let (mc, mc_ref) = (Memcached::start(), Memcached::start());
    let text = config(&db, db.server_id, &state, &mc);
    let _reference = Daemon::start(&config(&ref_db, ref_id, &ref_state, &mc_ref));
    let out_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/killloop")).join(format!("seed-{seed}"));

    // The writer: one transaction at a time under `gate`; the loop pauses it
    // by taking the gate (tokio's mutex is fair: it gets it after the
    // transaction in flight).
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let mut paused = Some(gate.clone().lock_owned().await);
    let writer = {
        let (gate, stop, commits) = (gate.clone(), stop.clone(), commits.clone());
        let mut conn = db.root_conn().await;
        let mut wrng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let mut max_id = pages;
        tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _g = gate.lock().await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                round += 1;
                churn(&mut conn, &mut wrng, round, &mut max_id).await;
                commits.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    // The first start: converge once before the loop.
    let mut daemon = Daemon::start(&text);
    let t_first = Instant::now();
    let mut marker_n = 0u64;

    let started = Instant::now();
    let (mut stale, mut missing, mut orphan, mut differing) = (0usize, 0usize, 0usize, 0usize);
    let mut failed_iters: Vec<usize> = Vec::new();
    let mut converge_times = Vec::with_capacity(iterations);
    let mut fresh_victims = 0;
    let mut died_before_kill = 0;
    let mut commits_at_kill = Vec::new();
    for iter in 0..=iterations {
        // Iteration 0 is the first start: checked like the others, not counted.
        let mut victim_log = String::new();
        let mut delay = 0;
        if iter > 0 {
            let c0 = commits.load(Ordering::Relaxed);
            drop(paused.take());
            let mut victim = if rng.random_bool(0.5) {
                fresh_victims += 1;
                daemon.kill9();
                Daemon::start(&text)
            } else {
                daemon
            };
            delay = rng.random_range(0..=max_delay);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            if victim.try_wait().is_some() {
                died_before_kill += 1;
                println!("  killloop iteration {iter}: the daemon exited on its own before the kill");
            }
            victim.kill9();
            victim_log = victim.log();
            paused = Some(gate.clone().lock_owned().await);
            commits_at_kill.push(commits.load(Ordering::Relaxed) - c0);
            daemon = Daemon::start(&text);
        }
        // Writes paused: a marker commit, then both must publish past it.
        marker_n += 1;
        let marker = format!("it{marker_n}x");
        root.query_drop(format!("UPDATE mark SET v = '{marker}' WHERE id = 1")).await.unwrap();
        let t0 = Instant::now();
        let mut what = String::new();
        while !(has_marker(&mc_ref, &marker) && has_marker(&mc, &marker)) {
            if t0.elapsed() > MARKER_DEADLINE {
                what = format!(
                    "the marker {marker} was not published within {MARKER_DEADLINE:?} (daemon: {}, reference: {})",
                    has_marker(&mc, &marker),
                    has_marker(&mc_ref, &marker)
                );
                break;
            }
            if daemon.try_wait().is_some() {
                what = "the restarted daemon exited".into();
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let (mut got, mut want) = (contents(&mc), contents(&mc_ref));
        let t_eq = Instant::now();
        while got != want && t_eq.elapsed() < EQUAL_DEADLINE {
            tokio::time::sleep(Duration::from_millis(20)).await;
            (got, want) = (contents(&mc), contents(&mc_ref));
        }
        if iter == 0 {
            println!("  killloop: first start converged in {:.0} ms", ms(t_first.elapsed()));
        } else {
            converge_times.push(t0.elapsed());
        }
        if got != want || !what.is_empty() {
            let d = diff(&got, &want, &state);
            if what.is_empty() {
                what = format!("memcached still differs from the reference {EQUAL_DEADLINE:?} after the marker");
            }
            let sub = out_dir.join(format!("iter-{iter}"));
            save_mismatch(&sub, seed, iter, &what, &d, &got, &want, &victim_log, &daemon.log(), &state);
            println!(
                "  killloop MISMATCH at iteration {iter} (delay {delay} ms): {what}; missing {} differing {} stale {} orphan {}; details in {}",
                d.missing.len(),
                d.differing.len(),
                d.stale.len(),
                d.orphan.len(),
                sub.display()
            );
            for (kind, keys) in
                [("missing", &d.missing), ("differing", &d.differing), ("stale", &d.stale), ("orphan", &d.orphan)]
            {
                if !keys.is_empty() {
                    println!("    {kind} (first 5): {:?}", &keys[..keys.len().min(5)]);
                }
            }
            if iter > 0 {
                failed_iters.push(iter);
                stale += d.stale.len();
                missing += d.missing.len();
                orphan += d.orphan.len();
                differing += d.differing.len();
            }
            if std::env::var("BENCH_KILL_STOP_ON_MISMATCH").is_ok_and(|v| v == "1") {
                break;
            }
        }
        if iter > 0 && iter % 20 == 0 {
            println!(
                "  killloop: {iter}/{iterations} iterations, {:.0} s, {} commits, {} failed",
                started.elapsed().as_secs_f64(),
                commits.load(Ordering::Relaxed),
                failed_iters.len()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    drop(paused.take());
    writer.await.unwrap();
    daemon.stop();
    let done = converge_times.len();
    converge_times.sort();
    let keys = contents(&mc_ref).len();
    rep.info("killloop_seed", format!("{seed}"));
    rep.info("killloop_iterations", format!("{done}"));
    rep.info(
        "killloop: duration / commits / keys at the end",
        format!("{:.0} s / {} / {keys}", started.elapsed().as_secs_f64(), commits.load(Ordering::Relaxed)),
    );
    rep.info(
        "killloop: victims started fresh / already running",
        format!("{fresh_victims} / {}", done - fresh_victims),
    );
    commits_at_kill.sort();
    rep.info(
        "killloop: writer commits between resume and kill, p50 / max",
        format!(
            "{} / {}",
            commits_at_kill.get(commits_at_kill.len() / 2).copied().unwrap_or(0),
            commits_at_kill.last().copied().unwrap_or(0)
        ),
    );
    rep.info(
        "killloop: restart -> equal to the reference, p50 / p99 / max",
        format!(
            "{:.0} / {:.0} / {:.0} ms",
            ms(pct(&converge_times, 50.0)),
            ms(pct(&converge_times, 99.0)),
            ms(converge_times.last().copied().unwrap_or_default())
        ),
    );
    if died_before_kill > 0 {
        rep.info("killloop: daemons that exited before their kill", format!("{died_before_kill}"));
    }
    for (name, n) in [
        ("killloop_stale", stale),
        ("killloop_missing", missing),
        ("killloop_orphan", orphan),
        ("killloop_differing", differing),
        ("killloop_failed_iterations", failed_iters.len()),
    ] {
        rep.metric(name, format!("{n}"), "0", Some(n == 0));
    }
    if !failed_iters.is_empty() {
        println!("  killloop: failed iterations {failed_iters:?}; details under {}", out_dir.display());
    }
}
