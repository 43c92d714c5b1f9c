//! End-to-end performance benchmark of tailcache against the product's bar.
//!
//! Not a test: it starts a private MariaDB and memcached (the integration
//! harness), runs the release `tailcache` binary (cargo builds it with the
//! bench profile, i.e. `target/release/tailcache`) and prints one line per
//! metric: `BENCH <metric> = <value> (target <target>) PASS|MISS`.
//!
//! ```sh
//! cargo bench --bench pipeline                 # everything
//! cargo bench --bench pipeline -- latency      # only some: idle latency resync catchup bulk backlog inspect
//! ```
//!
//! Sizes can be shrunk for profiling: `BENCH_LATENCY_N`, `BENCH_CATCHUP_ROWS`,
//! `BENCH_BULK_ROWS`, `BENCH_RESYNC_ROWS`.

// The harness carries its own `#![allow(dead_code)]`.
#[path = "../tests/it/harness.rs"]
mod harness;
#[path = "support/killloop.rs"]
mod killloop;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use mysql_async::prelude::*;

use harness::{Daemon, Memcached, TestDb};

// ---------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------

struct Report {
    lines: Vec<String>,
}

impl Report {
    fn metric(&mut self, metric: &str, value: String, target: &str, pass: Option<bool>) {
        let verdict = match pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "info",
        };
        let line = format!("BENCH {metric:<44} = {value:>16}   (target {target}) {verdict}");
        println!("{line}");
        self.lines.push(line);
    }

    fn info(&mut self, metric: &str, value: String) {
        self.metric(metric, value, "-", None);
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of an ascending slice.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    pct(&v, 50.0)
}

// ---------------------------------------------------------------------------
// Binlog positions, the replica checkpoint, the daemon's log
// ---------------------------------------------------------------------------

/// (file number, offset): positions compare by binlog number, then offset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    num: u64,
    off: u64,
    file: String,
}

impl Pos {
    fn new(file: String, off: u64) -> Pos {
        let num = file.rsplit('.').next().and_then(|n| n.parse().ok()).unwrap_or(0);
        Pos { num, off, file }
    }
    fn reached(&self, target: &Pos) -> bool {
        (self.num, self.off) >= (target.num, target.off)
    }
}

async fn master_pos(conn: &mut mysql_async::Conn) -> Pos {
    let row: mysql_async::Row = conn.query_first("SHOW MASTER STATUS").await.unwrap().expect("binlog is on");
    Pos::new(row.get::<String, _>(0).unwrap(), row.get::<u64, _>(1).unwrap())
}

/// Reads `_tailcache_state` of a state file the daemon writes.
struct StateReader {
    conn: Option<rusqlite::Connection>,
    path: PathBuf,
}

impl StateReader {
    fn new(path: &Path) -> StateReader {
        StateReader { conn: None, path: path.to_owned() }
    }

    /// (checkpoint, consistent), or None before the daemon wrote one.
    fn read(&mut self) -> Option<(Pos, bool)> {
        if self.conn.is_none() {
            if !self.path.exists() {
                return None;
            }
            let c =
                rusqlite::Connection::open_with_flags(&self.path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE).ok()?;
            // No busy waiting inside SQLite: a locked file is "not yet" and
            // the caller polls again; a busy handler would sleep up to 100 ms.
            c.busy_timeout(Duration::ZERO).ok()?;
            self.conn = Some(c);
        }
        let c = self.conn.as_ref()?;
        let r: rusqlite::Result<(Option<String>, Option<i64>, bool)> =
            c.query_row("SELECT file, pos, consistent FROM _tailcache_state WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        match r {
            Ok((Some(f), Some(p), cons)) => Some((Pos::new(f, p as u64), cons)),
            _ => None,
        }
    }

    /// Polls every `every` until the checkpoint is consistent and at or past
    /// `target`; the instant it was first seen there.
    fn wait_reached(&mut self, target: &Pos, timeout: Duration, every: Duration, daemon: &Daemon) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((p, true)) = self.read()
                && p.reached(target)
            {
                return Instant::now();
            }
            if Instant::now() > deadline {
                panic!(
                    "checkpoint did not reach {target:?} within {timeout:?} (at {:?})\n{}",
                    self.read(),
                    tail_log(daemon, 40)
                );
            }
            std::thread::sleep(every);
        }
    }
}

fn tail_log(d: &Daemon, n: usize) -> String {
    let log = d.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One JSON log line (`--log-format json`) whose message is `message` and
/// that satisfies `pred`.
fn find_log(d: &Daemon, message: &str, pred: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
    d.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == message && pred(&v["fields"]))
}

fn wait_log(
    d: &Daemon,
    message: &str,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Instant) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = find_log(d, message, &pred) {
            return (v, Instant::now());
        }
        assert!(Instant::now() < deadline, "no log line {message:?} within {timeout:?}\n{}", tail_log(d, 40));
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The wall-clock timestamp of a JSON log line, as a `SystemTime`.
fn log_time(v: &serde_json::Value) -> Option<SystemTime> {
    // "2025-01-02T03:04:05.123456Z": only the time of day matters here.
    let ts = v["timestamp"].as_str()?;
    let (date, time) = ts.split_once('T')?;
    let time = time.trim_end_matches('Z');
    let mut hms = time.split(':');
    let h: u64 = hms.next()?.parse().ok()?;
    let m: u64 = hms.next()?.parse().ok()?;
    let s: f64 = hms.next()?.parse().ok()?;
    let mut d = date.split('-');
    let (y, mo, da): (i64, u64, u64) = (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    // Days since the epoch (civil calendar, Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = (y - era * 400) as u64;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe as i64 - 719_468;
    let secs = days as f64 * 86_400.0 + (h * 3600 + m * 60) as f64 + s;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs))
}

// ---------------------------------------------------------------------------
// memcached meta-protocol poller over one persistent connection
// ---------------------------------------------------------------------------

struct Mg {
    r: BufReader<TcpStream>,
    w: TcpStream,
    line: String,
}

impl Mg {
    fn connect(addr: &str) -> Mg {
        let s = TcpStream::connect(addr).expect("connect memcached");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Mg { r: BufReader::new(s.try_clone().unwrap()), w: s, line: String::new() }
    }

    /// `mg KEY v`: the value, or None on a miss.
    fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        self.w.write_all(format!("mg {key} v\r\n").as_bytes()).expect("write mg");
        self.line.clear();
        self.r.read_line(&mut self.line).expect("read mg");
        if self.line.starts_with("EN") {
            return None;
        }
        let len: usize = self
            .line
            .strip_prefix("VA ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected mg reply {:?}", self.line));
        let mut buf = vec![0; len + 2];
        self.r.read_exact(&mut buf).expect("read mg value");
        buf.truncate(len);
        Some(buf)
    }

    fn wait_present(&mut self, key: &str, timeout: Duration, daemon: &Daemon) {
        let deadline = Instant::now() + timeout;
        while self.get(key).is_none() {
            assert!(Instant::now() < deadline, "{key} never appeared in memcached\n{}", tail_log(daemon, 40));
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------
// Setup helpers
// ---------------------------------------------------------------------------

fn config(db: &TestDb, state: &Path, tables: &[&str], mc: Option<(&Memcached, &str)>, views: &str) -> String {
    let tables: Vec<String> = tables.iter().map(|t| format!("\"{t}\"")).collect();
    let mut s = format!(
        "[mysql]\nurl = \"{}\"\nserver_id = {}\ntables = [{}]\n\n[state]\npath = \"{}\"\n\n",
        db.url,
        db.server_id,
        tables.join(", "),
        state.display()
    );
    if let Some((mc, prefix)) = mc {
        s += &format!("[memcached]\nservers = [\"{}\"]\nkey_prefix = \"{prefix}\"\n\n", mc.addr());
    }
    s + views
}

async fn exec(conn: &mut mysql_async::Conn, sql: &str) {
    conn.query_drop(sql).await.unwrap_or_else(|e| panic!("`{sql}`: {e}"));
}

/// CPU time (ns, from schedstat) of the thread named `thread` and of all
/// live threads of `pid`.
fn cpu_ns(pid: u32, thread: &str) -> (u64, u64) {
    let (mut one, mut all) = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return (0, 0) };
    for t in tasks.flatten() {
        let p = t.path();
        let ns: u64 = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
            .unwrap_or(0);
        all += ns;
        if std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == thread) {
            one += ns;
        }
    }
    (one, all)
}

/// CPU time (ns, from schedstat) of each live thread of `pid`, by tid.
fn thread_cpu_ns(pid: u32) -> std::collections::HashMap<String, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Default::default() };
    tasks
        .flatten()
        .filter_map(|t| {
            let ns = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            Some((t.file_name().to_string_lossy().into_owned(), ns.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// The most CPU any one thread of `pid` used since `before` (a server's
/// binlog dump thread, during a catch-up).
fn busiest_thread_ns(pid: u32, before: &std::collections::HashMap<String, u64>) -> u64 {
    thread_cpu_ns(pid).iter().map(|(tid, ns)| ns - before.get(tid).copied().unwrap_or(0).min(*ns)).max().unwrap_or(0)
}

fn vm_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------
// 5. Idle memory
// ---------------------------------------------------------------------------

async fn bench_idle(rep: &mut Report, mc: &Memcached) {
    let db = harness::server().create_db("idle").await;
    let mut conn = db.root_conn().await;
    let schema = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/schema.sql")).unwrap();
    exec(&mut conn, &schema).await;
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")).unwrap();
    let mut cfg = example.clone();
    for (from, to) in [
        ("url = \"mysql://tailcache:secret@127.0.0.1:3306/appdb\"".to_owned(), format!("url = \"{}\"", db.url)),
        ("server_id = 4001".to_owned(), format!("server_id = {}", db.server_id)),
        (
            "path = \"/var/lib/tailcache/state.db\"".to_owned(),
            format!("path = \"{}\"", dir.path().join("s.db").display()),
        ),
        ("servers = [\"127.0.0.1:11211\"]".to_owned(), format!("servers = [\"{}\"]", mc.addr())),
    ] {
        assert!(cfg.contains(&from), "config.example.toml no longer contains {from}");
        cfg = cfg.replace(&from, &to);
    }
    let started = Instant::now();
    let daemon = Daemon::start(&cfg);
    let mut mg = Mg::connect(&mc.addr());
    mg.wait_present("myapp:apps", Duration::from_secs(30), &daemon);
    let ready = started.elapsed();
    // Let it settle (publisher idle, allocator caches warm), then sample.
    let mut rss = Vec::new();
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..5 {
        rss.push(vm_kb(daemon.pid(), "VmRSS:").expect("VmRSS"));
        std::thread::sleep(Duration::from_millis(400));
    }
    let hwm = vm_kb(daemon.pid(), "VmHWM:").unwrap_or(0);
    let max = *rss.iter().max().unwrap();
    rep.info("idle: start-up to first publish (example cfg)", format!("{:.0} ms", ms(ready)));
    rep.metric(
        "idle: RSS (VmRSS, max of 5 samples)",
        format!("{:.1} MB", max as f64 / 1024.0),
        "<= 30 MB",
        Some(max <= 30 * 1024),
    );
    rep.info("idle: peak RSS (VmHWM)", format!("{:.1} MB", hwm as f64 / 1024.0));
    drop(daemon);
}

// ---------------------------------------------------------------------------
// 1. Commit → readable in memcached
// ---------------------------------------------------------------------------

/// One view per entry of `sizes` (table `app{rows}` with that many rows,
/// view `app{rows}`), all in one daemon; `n` measured commits per view,
/// taken in turn (view 1, view 2, …, view 1, …), so every size sees the
/// same server, memcached and machine at the same moments: "side by side in
/// one run". With one size it measures that view alone.
/// `target`: whether these numbers are held against the targets.
/// Returns (p50, p99) per size.
async fn bench_latency(
    rep: &mut Report,
    mc: &Memcached,
    sizes: &[usize],
    n: usize,
    target: bool,
) -> Vec<(Duration, Duration)> {
    let tag: Vec<String> = sizes.iter().map(|r| r.to_string()).collect();
    let tag = tag.join("+");
    let db = harness::server().create_db(&format!("latency{}", tag.replace('+', "_"))).await;
    let mut conn = db.root_conn().await;
    let mut views = String::new();
    let tables: Vec<String> = sizes.iter().map(|r| format!("app{r}")).collect();
    for (&rows, t) in sizes.iter().zip(&tables) {
        exec(&mut conn, &format!("CREATE TABLE {t} (id INT PRIMARY KEY, name VARCHAR(64) NOT NULL, v INT NOT NULL)"))
            .await;
        exec(&mut conn, &format!("INSERT INTO {t} SELECT seq, CONCAT('app', seq), seq FROM seq_1_to_{rows}")).await;
        views += &format!("[[views]]\nname = \"{t}\"\nkey = \"{t}:{{id}}\"\nquery = \"SELECT id, name, v FROM {t}\"\n");
    }
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("lat{tag}:");
    let table_refs: Vec<&str> = tables.iter().map(String::as_str).collect();
    let cfg = config(&db, &dir.path().join("s.db"), &table_refs, Some((mc, &prefix)), &views);
    let loaded = Instant::now();
    let daemon = Daemon::start(&cfg);
    let mut mg = Mg::connect(&mc.addr());
    for (&rows, t) in sizes.iter().zip(&tables) {
        mg.wait_present(&format!("{prefix}{t}:{rows}"), Duration::from_secs(300), &daemon);
    }
    println!("  ({tag}-row views: start -> last key in memcached {:.0} ms)", ms(loaded.elapsed()));
    // The initial publish wrote `rows` rows of bookkeeping through the WAL;
    // its checkpoint runs in the background (0.4-0.8 s at 1M rows on this
    // VM). Measure the steady state: wait (at most 3 s: a small publish may
    // not reach the checkpoint threshold) until a checkpoint
    // finished after the full publish, and say how long that took.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(3) {
        let log = daemon.log();
        let full = log.rfind("full=true").filter(|_| log.contains("publish stages"));
        if full.is_some_and(|at| log[at..].contains("wal checkpoint")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("  ({tag}-row views: settled {:.0} ms after the initial publish)", ms(settle.elapsed()));
    let ckpt_before = log_fields(&daemon, "wal checkpoint").len();

    let k = sizes.len();
    let warmup = 20 * k;
    let mut lat = vec![Vec::with_capacity(n); k];
    let mut commit_rtt = vec![Vec::with_capacity(n); k];
    let mut polls = 0u64;
    let mut timeouts = vec![0; k];
    for i in 0..warmup + n * k {
        let which = i % k;
        let (rows, t) = (sizes[which], &tables[which]);
        let id = (i / k) % rows + 1;
        let marker = format!("m{i:07}");
        let mut tx = conn.start_transaction(Default::default()).await.unwrap();
        tx.exec_drop(format!("UPDATE {t} SET name = ? WHERE id = ?"), (&marker, id)).await.unwrap();
        let key = format!("{prefix}{t}:{id}");
        let t0 = Instant::now();
        tx.commit().await.unwrap();
        let committed = t0.elapsed();
        let deadline = t0 + Duration::from_secs(2);
        let t1 = loop {
            polls += 1;
            if mg.get(&key).is_some_and(|v| contains(&v, marker.as_bytes())) {
                break Some(Instant::now());
            }
            if Instant::now() > deadline {
                break None;
            }
        };
        if i >= warmup {
            match t1 {
                Some(t1) => lat[which].push(t1 - t0),
                None => timeouts[which] += 1,
            }
            commit_rtt[which].push(committed);
        }
        // Spaced commits: each one is a lone edit, not part of a burst.
        std::thread::sleep(Duration::from_millis(5));
    }
    let together = if k > 1 { format!(", side by side with {tag}-row views") } else { String::new() };
    let mut out = Vec::with_capacity(k);
    for (which, &rows) in sizes.iter().enumerate() {
        let (lat, commit_rtt, timeouts) = (&mut lat[which], &mut commit_rtt[which], timeouts[which]);
        lat.sort();
        commit_rtt.sort();
        let (p50, p99) = (pct(lat, 50.0), pct(lat, 99.0));
        let l = format!("latency[{rows} rows{together}]");
        let ok = |d: Duration, lim_us: u64| target.then_some(d <= Duration::from_micros(lim_us) && timeouts == 0);
        rep.info(&format!("{l}: samples (5 ms apart)"), format!("{} ok, {timeouts} >2s", lat.len()));
        rep.info(
            &format!("{l}: COMMIT round trip p50 / p99"),
            format!("{:.3} / {:.3} ms", ms(pct(commit_rtt, 50.0)), ms(pct(commit_rtt, 99.0))),
        );
        let tgt = |t: &str| if target { t.to_owned() } else { format!("{t}, info only") };
        rep.metric(
            &format!("{l}: commit -> memcached p50"),
            format!("{:.3} ms", ms(p50)),
            &tgt("<= 0.6 ms"),
            ok(p50, 600),
        );
        rep.metric(
            &format!("{l}: commit -> memcached p99"),
            format!("{:.3} ms", ms(p99)),
            &tgt("<= 1.5 ms"),
            ok(p99, 1500),
        );
        rep.info(
            &format!("{l}: commit -> memcached max"),
            format!("{:.3} ms", ms(*lat.last().unwrap_or(&Duration::ZERO))),
        );
        let view = (k > 1).then_some(tables[which].as_str());
        stage_report(rep, &l, &daemon, n, ckpt_before, view);
        out.push((p50, p99));
    }
    rep.info(&format!("latency[{tag}]: mg polls per sample"), format!("{:.0}", polls as f64 / (warmup + n * k) as f64));
    drop(daemon);
    for t in &tables {
        exec(&mut conn, &format!("DROP TABLE {t}")).await;
    }
    out
}

/// `name=value` fields of the daemon's text log lines with `message`.
fn log_fields(d: &Daemon, message: &str) -> Vec<std::collections::HashMap<String, String>> {
    d.log()
        .lines()
        .filter(|l| l.contains(message))
        .map(|l| {
            let ts = l.split_whitespace().next().unwrap_or("").to_owned();
            let mut m: std::collections::HashMap<String, String> = l
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            m.insert("timestamp".into(), ts);
            m
        })
        .collect()
}

/// The daemon's own per-publish stage timings (`publish stages` debug
/// lines) of the last `n` incremental publishes: p50 / p99 / max of each
/// stage, less sensitive to the machine's noise than the end-to-end figure,
/// plus the WAL checkpoints that ran meanwhile.
/// With `view`, only the publishes of that view and the replica commits of
/// its table (named alike), for a run with several views.
fn stage_report(rep: &mut Report, l: &str, daemon: &Daemon, n: usize, ckpt_before: usize, view: Option<&str>) {
    let names = |f: &std::collections::HashMap<String, String>, field: &str| {
        view.is_none_or(|v| f.get(field).is_some_and(|x| x == &format!("[\"{v}\"]")))
    };
    let lines: Vec<_> = log_fields(daemon, "publish stages")
        .into_iter()
        .filter(|f| f.get("full").map(String::as_str) == Some("false") && names(f, "views"))
        .collect();
    let last = &lines[lines.len().saturating_sub(n)..];
    let get = |f: &std::collections::HashMap<String, String>, k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
    // p50 / p99 / max of one `name_us` field over some log lines.
    let spread = |rep: &mut Report, what: String, lines: &[std::collections::HashMap<String, String>], k: &str| {
        let mut v: Vec<Duration> = lines.iter().filter_map(|x| get(x, k)).map(Duration::from_micros).collect();
        v.sort();
        let max = v.last().copied().unwrap_or_default();
        rep.info(&what, format!("{:.3} / {:.3} / {:.3} ms", ms(pct(&v, 50.0)), ms(pct(&v, 99.0)), ms(max)));
    };
    for stage in ["to_publisher_us", "waited_us", "compute_us", "memcached_us", "record_us", "total_us"] {
        spread(rep, format!("{l}: stage {stage} p50/p99/max"), last, stage);
    }
    // The replicator's side of to_publisher (its `applied` debug lines):
    // first event of the transaction → its XID read → replica committed.
    let applied: Vec<_> = log_fields(daemon, "applied").into_iter().filter(|f| names(f, "tables")).collect();
    let applied = &applied[applied.len().saturating_sub(n)..];
    for stage in ["received_us", "committed_us"] {
        spread(rep, format!("{l}: replicator {stage} p50/p99/max"), applied, stage);
    }
    let mut slow: Vec<_> = last.iter().collect();
    slow.sort_by_key(|x| std::cmp::Reverse(get(x, "total_us").unwrap_or(0)));
    for f in slow.iter().take(5) {
        let g = |k: &str| get(f, k).unwrap_or(0);
        println!(
            "  slow publish: total {} us = to_publisher {} + waited {} + compute {} + memcached {} (+ record {}) at {}",
            g("total_us"),
            g("to_publisher_us"),
            g("waited_us"),
            g("compute_us"),
            g("memcached_us"),
            g("record_us"),
            f.get("timestamp").map(String::as_str).unwrap_or("")
        );
    }
    let ckpt: Vec<(u64, u64)> = log_fields(daemon, "wal checkpoint")
        .iter()
        .skip(ckpt_before)
        .filter_map(|f| Some((get(f, "took_us")?, get(f, "copied").unwrap_or(0))))
        .collect();
    rep.info(
        &format!("{l}: background WAL checkpoints while measuring (count, max, max frames)"),
        format!(
            "{}, {:.1} ms, {}",
            ckpt.len(),
            ckpt.iter().map(|c| c.0).max().unwrap_or(0) as f64 / 1000.0,
            ckpt.iter().map(|c| c.1).max().unwrap_or(0)
        ),
    );
}

// ---------------------------------------------------------------------------
// 2. Catch-up through a mostly-unwatched binlog vs mariadb-binlog
// ---------------------------------------------------------------------------

fn backup_state(state: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", state.display()));
        let dst = to.join(format!("s.db{suffix}"));
        let _ = std::fs::remove_file(&dst);
        if from.exists() {
            std::fs::copy(&from, &dst).unwrap();
        }
    }
}

fn restore_state(from: &Path, state: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let src = from.join(format!("s.db{suffix}"));
        let dst = PathBuf::from(format!("{}{suffix}", state.display()));
        let _ = std::fs::remove_file(&dst);
        if src.exists() {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

async fn bench_catchup(rep: &mut Report, mc: &Memcached) {
    let total = env_usize("BENCH_CATCHUP_ROWS", 200_000);
    let per_txn = 1000;
    let watched_per_txn = 10; // 1%
    let txns = total / per_txn;
    let runs = env_usize("BENCH_CATCHUP_RUNS", 5);
    let server = harness::server();
    let db = server.create_db("catchup").await;
    let mut conn = db.root_conn().await;
    exec(&mut conn, "CREATE TABLE w (id INT PRIMARY KEY, v INT NOT NULL, pad VARCHAR(40) NOT NULL)").await;
    exec(&mut conn, "CREATE TABLE u (id INT PRIMARY KEY, v INT NOT NULL, pad VARCHAR(40) NOT NULL)").await;
    exec(&mut conn, "INSERT INTO w VALUES (0, 0, 'seed')").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let views = "[[views]]\nname = \"w\"\nkey = \"w:{id}\"\nquery = \"SELECT id, v, pad FROM w\"\n";
    let cfg = config(&db, &state, &["w"], Some((mc, "cu:")), views);
    let mut daemon = Daemon::start(&cfg);
    let here = master_pos(&mut conn).await;
    StateReader::new(&state).wait_reached(&here, Duration::from_secs(30), Duration::from_millis(5), &daemon);
    Mg::connect(&mc.addr()).wait_present("cu:w:0", Duration::from_secs(30), &daemon);
    daemon.stop();
    drop(daemon);
    let backup = dir.path().join("backup");
    backup_state(&state, &backup);

    // The backlog: `txns` transactions of 990 unwatched + 10 watched rows.
    let start = master_pos(&mut conn).await;
    let unwatched_per_txn = per_txn - watched_per_txn;
    let wrote = Instant::now();
    for t in 0..txns {
        let (ua, wa) = (t * unwatched_per_txn + 1, t * watched_per_txn + 1);
        let mut tx = conn.start_transaction(Default::default()).await.unwrap();
        tx.query_drop(format!(
            "INSERT INTO u SELECT seq, seq % 1000, REPEAT('u', 40) FROM seq_{ua}_to_{}",
            ua + unwatched_per_txn - 1
        ))
        .await
        .unwrap();
        tx.query_drop(format!(
            "INSERT INTO w SELECT seq, seq % 1000, REPEAT('w', 40) FROM seq_{wa}_to_{}",
            wa + watched_per_txn - 1
        ))
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
    let end = master_pos(&mut conn).await;
    let same_file = start.file == end.file;
    let bytes = if same_file { end.off - start.off } else { 0 };
    rep.info("catchup: backlog", format!("{} rows/{txns} txns, {:.1} MB", txns * per_txn, bytes as f64 / 1048576.0));
    println!("  (backlog written in {:.0} ms; {start:?} .. {end:?})", ms(wrote.elapsed()));

    // tailcache: restore the pre-backlog state, start, time to the end.
    let mut tc = Vec::new();
    let mut to_stream = Vec::new();
    let mut replicator_cpu = Vec::new();
    let mut process_cpu = Vec::new();
    // The server's busiest thread during each run: its binlog dump thread,
    // sending the backlog (what no reader can go faster than).
    let mut dump_cpu = Vec::new();
    for _ in 0..runs {
        restore_state(&backup, &state);
        let mut reader = StateReader::new(&state);
        let t0 = Instant::now();
        let wall0 = SystemTime::now();
        let server_before = server.pid().map(thread_cpu_ns);
        let mut d = Daemon::start_args(&cfg, &["--log-format", "json"]);
        let t1 = reader.wait_reached(&end, Duration::from_secs(300), Duration::from_millis(1), &d);
        tc.push(t1 - t0);
        if let (Some(pid), Some(before)) = (server.pid(), &server_before) {
            dump_cpu.push(Duration::from_nanos(busiest_thread_ns(pid, before)));
        }
        let (thread_ns, process_ns) = cpu_ns(d.pid(), "replicator");
        replicator_cpu.push(Duration::from_nanos(thread_ns));
        process_cpu.push(Duration::from_nanos(process_ns));
        if let Some(ts) = find_log(&d, "streaming binlog", |_| true).as_ref().and_then(log_time) {
            to_stream.push(ts.duration_since(wall0).unwrap_or_default());
        }
        d.stop();
        let n: i64 = reader.conn.as_ref().unwrap().query_row("SELECT count(*) FROM w", [], |r| r.get(0)).unwrap();
        assert_eq!(n as usize, txns * watched_per_txn + 1, "watched rows in the replica after catch-up");
        let batches = d.log().lines().filter(|l| l.contains("\"applied\"")).count();
        // When did the daemon do what (log timestamps relative to the spawn)?
        let at = |msg: &str| -> Vec<String> {
            d.log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["fields"]["message"] == msg)
                .filter_map(|v| {
                    let t = log_time(&v)?.duration_since(wall0).unwrap_or_default();
                    Some(format!("{:.0}{}", ms(t), if v["fields"]["full"] == true { "(full)" } else { "" }))
                })
                .collect()
        };
        if tc.len() == 1 {
            // Where the start-up goes: every log line up to the stream's
            // start, in ms after the spawn.
            for v in d.log().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
                let Some(t) = log_time(&v) else { continue };
                let msg = v["fields"]["message"].as_str().unwrap_or("").to_owned();
                println!("  (start-up: {:6.2} ms  {msg})", ms(t.duration_since(wall0).unwrap_or_default()));
                if msg == "streaming binlog" {
                    break;
                }
            }
        }
        println!(
            "  (run: {:.0} ms, {batches} replica commits with watched rows; ms after spawn: applied {:?}, published {:?})",
            ms(t1 - t0),
            at("applied"),
            at("published")
        );
    }

    // mariadb-binlog pulling the same byte range, raw, to a temp dir.
    let mut mb = Vec::new();
    let mut mb_dump_cpu = Vec::new();
    // The same command for an empty range (from the end): its own fixed
    // cost (process start, connection), to set against tailcache's
    // start-up when comparing the streaming alone.
    let mut mb_empty = Vec::new();
    let mut out_size = 0;
    for r in 0..runs * 2 {
        let empty = r >= runs;
        let out = dir.path().join(format!("raw{r}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut cmd = Command::new("mariadb-binlog");
        cmd.arg("--read-from-remote-server")
            .arg("--raw")
            .arg(format!("--host={}", server.host))
            .arg(format!("--port={}", server.port))
            .arg(format!("--user={}", db.user))
            .arg(format!("--password={}", db.password))
            .arg(format!("--start-position={}", if empty { end.off } else { start.off }))
            .arg(format!("--result-file={}/", out.display()));
        if !same_file && !empty {
            cmd.arg("--to-last-log");
        }
        cmd.arg(if empty { &end.file } else { &start.file })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let server_before = server.pid().map(thread_cpu_ns);
        let t0 = Instant::now();
        let o = cmd.output().expect("run mariadb-binlog");
        let took = t0.elapsed();
        assert!(o.status.success(), "mariadb-binlog failed: {}", String::from_utf8_lossy(&o.stderr));
        if empty {
            mb_empty.push(took);
            continue;
        }
        mb.push(took);
        if let (Some(pid), Some(before)) = (server.pid(), &server_before) {
            mb_dump_cpu.push(Duration::from_nanos(busiest_thread_ns(pid, before)));
        }
        out_size = std::fs::read_dir(&out).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum::<u64>();
    }
    let (tc_med, mb_med) = (median(tc.clone()), median(mb.clone()));
    let ratio = tc_med.as_secs_f64() / mb_med.as_secs_f64();
    let fmt = |v: &[Duration]| v.iter().map(|d| format!("{:.0}", ms(*d))).collect::<Vec<_>>().join("/");
    rep.info("catchup: tailcache start -> checkpoint at end", format!("{:.0} ms", ms(tc_med)));
    println!("  (tailcache runs {} ms; start -> 'streaming binlog' {} ms)", fmt(&tc), fmt(&to_stream));
    if !dump_cpu.is_empty() {
        println!(
            "  (server's busiest thread, i.e. its binlog dump thread, CPU during the tailcache runs: {} ms)",
            fmt(&dump_cpu)
        );
        rep.info("catchup: server's dump thread CPU while tailcache reads", format!("{:.0} ms", ms(median(dump_cpu))));
    }
    rep.info("catchup: mariadb-binlog --raw same range", format!("{:.0} ms", ms(mb_med)));
    println!("  (mariadb-binlog runs {} ms, {out_size} bytes written incl. its header)", fmt(&mb));
    if !mb_dump_cpu.is_empty() {
        println!("  (server's busiest thread CPU during the mariadb-binlog runs: {} ms)", fmt(&mb_dump_cpu));
    }
    rep.metric("catchup: tailcache / mariadb-binlog", format!("{ratio:.2}x"), "<= 0.5x", Some(ratio <= 0.5));
    // The streaming alone: tailcache from 'streaming binlog' to the end,
    // mariadb-binlog minus its time for an empty range.
    if to_stream.len() == tc.len() {
        let tc_stream: Vec<Duration> = tc.iter().zip(&to_stream).map(|(t, s)| t.saturating_sub(*s)).collect();
        let (tcs, mbe) = (median(tc_stream.clone()), median(mb_empty.clone()));
        let mbs = mb_med.saturating_sub(mbe);
        println!(
            "  (streaming alone: tailcache {} ms; mariadb-binlog for an empty range {} ms)",
            fmt(&tc_stream),
            fmt(&mb_empty)
        );
        rep.info(
            "catchup: streaming alone, tailcache / mariadb-binlog (both minus their start-up)",
            format!("{:.0} / {:.0} ms = {:.2}x", ms(tcs), ms(mbs), tcs.as_secs_f64() / mbs.as_secs_f64().max(1e-9)),
        );
    }
    let million = (txns * per_txn) as f64 / 1e6;
    let per_m = |d: Duration| d.as_secs_f64() / million;
    let (rc, pc) = (median(replicator_cpu.clone()), median(process_cpu.clone()));
    rep.metric(
        "catchup: replicator thread CPU per million rows",
        format!("{:.4} CPU-s", per_m(rc)),
        "<= 0.04 CPU-s",
        Some(per_m(rc) <= 0.04),
    );
    rep.info(
        "catchup: whole process CPU per million rows (incl. start-up, snapshot check, publish)",
        format!("{:.4} CPU-s", per_m(pc)),
    );
    println!("  (replicator thread CPU per run: {} ms)", fmt(&replicator_cpu));

    // Optional: the same catch-up under callgrind, for instruction counts
    // that do not depend on what else runs on the machine.
    // BENCH_CATCHUP_CALLGRIND=<dir> writes <dir>/callgrind.<n>.out per binary
    // (BENCH_CATCHUP_BINS: colon-separated tailcache binaries, default the
    // one just built), one file per thread (`-NN` suffix): read the
    // replicator thread's, e.g. the inclusive cost of `Replicator::pump`.
    // BENCH_CATCHUP_WRAP replaces the valgrind command line (`{out}` is the
    // output file), e.g. `strace -f -c -o {out}` to count system calls.
    if let Ok(out_dir) = std::env::var("BENCH_CATCHUP_CALLGRIND") {
        let bins =
            std::env::var("BENCH_CATCHUP_BINS").unwrap_or_else(|_| harness::tailcache_bin().display().to_string());
        let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let cfg_path = dir.path().join("callgrind.toml");
        std::fs::write(&cfg_path, format!("{cfg}\n[admin]\nlisten = \"{admin}\"\n")).unwrap();
        for (n, bin) in bins.split(':').enumerate() {
            restore_state(&backup, &state);
            let out = format!("{out_dir}/callgrind.{n}.out");
            let wrap = std::env::var("BENCH_CATCHUP_WRAP").unwrap_or_else(|_| {
                "valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file={out}".into()
            });
            let wrap: Vec<String> = wrap.split_whitespace().map(|w| w.replace("{out}", &out)).collect();
            let mut child = Command::new(&wrap[0])
                .args(&wrap[1..])
                .arg(bin)
                .args(["run", "--config"])
                .arg(&cfg_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run valgrind");
            let mut reader = StateReader::new(&state);
            let deadline = Instant::now() + Duration::from_secs(600);
            while !reader.read().is_some_and(|(p, ok)| ok && p.reached(&end)) {
                assert!(Instant::now() < deadline, "{bin} under callgrind did not reach {end:?}");
                assert!(child.try_wait().unwrap().is_none(), "{bin} under callgrind exited early");
                std::thread::sleep(Duration::from_millis(50));
            }
            // SAFETY: kill(2) on our own, not yet reaped child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            child.wait().unwrap();
            println!("  (callgrind: {bin} -> {out})");
        }
    }
}

// ---------------------------------------------------------------------------
// 3. Watched rows applied per second (one big transaction)
// ---------------------------------------------------------------------------

async fn bench_bulk(rep: &mut Report) {
    let rows = env_usize("BENCH_BULK_ROWS", 1_000_000);
    let db = harness::server().create_db("bulk").await;
    let mut conn = db.root_conn().await;
    exec(&mut conn, "CREATE TABLE big (id INT PRIMARY KEY, v INT NOT NULL, s VARCHAR(32) NOT NULL)").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    // Replica only: no view reads `big`, so this times decoding + SQLite apply.
    let cfg = config(&db, &state, &["big"], None, "");
    let daemon = Daemon::start(&cfg);
    let mut reader = StateReader::new(&state);
    let here = master_pos(&mut conn).await;
    reader.wait_reached(&here, Duration::from_secs(30), Duration::from_millis(5), &daemon);

    let hwm_idle = vm_kb(daemon.pid(), "VmHWM:").unwrap_or(0);
    let mut tx = conn.start_transaction(Default::default()).await.unwrap();
    let loaded = Instant::now();
    tx.query_drop(format!("INSERT INTO big SELECT seq, seq, 'abcdefghijklmnop' FROM seq_1_to_{rows}")).await.unwrap();
    let load = loaded.elapsed();
    // CPU time, unlike wall time, barely depends on what else runs on the
    // machine: it shows what the apply costs per row.
    let (thread0, process0) = cpu_ns(daemon.pid(), "replicator");
    let t0 = Instant::now();
    tx.commit().await.unwrap();
    let commit = t0.elapsed();
    let end = master_pos(&mut conn).await;
    let t1 = reader.wait_reached(&end, Duration::from_secs(600), Duration::from_millis(2), &daemon);
    let el = t1 - t0;
    let (thread1, process1) = cpu_ns(daemon.pid(), "replicator");
    let hwm = vm_kb(daemon.pid(), "VmHWM:").unwrap_or(0);
    let rate = rows as f64 / el.as_secs_f64();
    println!("  (INSERT took {:.0} ms inside the transaction, COMMIT {:.0} ms; {end:?})", ms(load), ms(commit));
    rep.info("bulk: COMMIT -> checkpoint past it", format!("{:.0} ms", ms(el)));
    rep.metric(
        &format!("bulk: watched rows applied/s ({rows} rows)"),
        format!("{:.0}", rate),
        ">= 3000000/s",
        Some(rate >= 3e6),
    );
    let per_row = |ns: u64| format!("{:.0} ns", ns as f64 / rows as f64);
    rep.info("bulk: replicator thread CPU per row", per_row(thread1.saturating_sub(thread0)));
    rep.info("bulk: process CPU per row", per_row(process1.saturating_sub(process0)));
    rep.info("bulk: peak RSS (VmHWM) before the transaction", format!("{:.1} MB", hwm_idle as f64 / 1024.0));
    rep.metric(
        "bulk: peak RSS (VmHWM) after applying it",
        format!("{:.1} MB", hwm as f64 / 1024.0),
        "<= 30 MB",
        Some(hwm <= 30 * 1024),
    );
    let n: i64 =
        rusqlite::Connection::open(&state).unwrap().query_row("SELECT count(*) FROM big", [], |r| r.get(0)).unwrap();
    assert_eq!(n as usize, rows, "replica row count");
    drop(daemon);
}

/// A backlog of watched rows in many transactions, read by a view published
/// to memcached: the catch-up after a stop while the admin app kept
/// writing. Times the apply (start → checkpoint at the end) and the publish
/// (→ the last row's key in memcached), and the peak RSS, which must not
/// follow the backlog (the replicator's notices queue up while the
/// publisher works on the previous ones).
async fn bench_backlog(rep: &mut Report, mc: &Memcached) {
    let rows = env_usize("BENCH_BACKLOG_ROWS", 1_000_000);
    let per_txn = env_usize("BENCH_BACKLOG_TXN_ROWS", 1_000).max(1);
    let db = harness::server().create_db("backlog").await;
    let mut conn = db.root_conn().await;
    exec(&mut conn, "CREATE TABLE bk (id INT PRIMARY KEY, v INT NOT NULL, s VARCHAR(32) NOT NULL)").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let views = "[[views]]\nname = \"bk\"\nkey = \"bk:{id}\"\nquery = \"SELECT id, v, s FROM bk\"\n";
    let cfg = config(&db, &state, &["bk"], Some((mc, "backlog:")), views);
    let mut reader = StateReader::new(&state);
    {
        // The first start: snapshot of the empty table, then stop.
        let mut d = Daemon::start(&cfg);
        let here = master_pos(&mut conn).await;
        reader.wait_reached(&here, Duration::from_secs(30), Duration::from_millis(5), &d);
        d.stop();
    }
    let wrote = Instant::now();
    let mut first = 1;
    while first <= rows {
        let last = (first + per_txn - 1).min(rows);
        exec(&mut conn, &format!("INSERT INTO bk SELECT seq, seq, 'abcdefghijklmnop' FROM seq_{first}_to_{last}"))
            .await;
        first = last + 1;
    }
    let end = master_pos(&mut conn).await;
    let txns = rows.div_ceil(per_txn);
    println!("  (backlog: {rows} rows in {txns} transactions, written in {:.0} ms)", ms(wrote.elapsed()));
    let t0 = Instant::now();
    let mut d = Daemon::start(&cfg);
    let applied = reader.wait_reached(&end, Duration::from_secs(600), Duration::from_millis(2), &d) - t0;
    let mut mg = Mg::connect(&mc.addr());
    mg.wait_present(&format!("backlog:bk:{rows}"), Duration::from_secs(600), &d);
    let published = t0.elapsed();
    let hwm = vm_kb(d.pid(), "VmHWM:").unwrap_or(0);
    let rate = rows as f64 / applied.as_secs_f64();
    rep.info(
        &format!("backlog: {rows} watched rows in {txns} txns, start -> checkpoint at end"),
        format!("{:.0} ms = {:.2} M rows/s", ms(applied), rate / 1e6),
    );
    rep.info("backlog: start -> last row's key in memcached", format!("{:.0} ms", ms(published)));
    rep.metric(
        "backlog: peak RSS (VmHWM)",
        format!("{:.1} MB", hwm as f64 / 1024.0),
        "<= 30 MB",
        Some(hwm <= 30 * 1024),
    );
    d.stop();
}

// ---------------------------------------------------------------------------
// 4. Full resync of a 100k-row table
// ---------------------------------------------------------------------------

async fn bench_resync(rep: &mut Report, mc: &Memcached) {
    let rows = env_usize("BENCH_RESYNC_ROWS", 100_000);
    let db = harness::server().create_db("resync").await;
    let mut conn = db.root_conn().await;
    exec(
        &mut conn,
        "CREATE TABLE r (id INT PRIMARY KEY, name VARCHAR(64) NOT NULL, v INT NOT NULL, price DECIMAL(10,2))",
    )
    .await;
    exec(
        &mut conn,
        &format!("INSERT INTO r SELECT seq, CONCAT('row-', seq), seq % 977, seq / 100 FROM seq_1_to_{rows}"),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let views = "[[views]]\nname = \"r\"\nkey = \"r:{id}\"\nquery = \"SELECT id, name, v, price FROM r\"\n";
    let cfg = config(&db, &state, &["r"], Some((mc, "rs:")), views);
    let mut mg = Mg::connect(&mc.addr());
    let last_key = format!("rs:r:{rows}");

    for (label, args) in
        [("empty state", &["--log-format", "json"][..]), ("--resync", &["--log-format", "json", "--resync"][..])]
    {
        let t0 = Instant::now();
        let mut d = Daemon::start_args(&cfg, args);
        let (snap, t_snap) = wait_log(&d, "replica replaced by snapshot", Duration::from_secs(120), |_| true);
        // A resync reads memcached back and writes only what differs: on the
        // existing state nothing is written, so wait for its report.
        let (_, t_pub) =
            wait_log(&d, "resync finished", Duration::from_secs(120), |f| f["checked"].as_u64() == Some(rows as u64));
        mg.wait_present(&last_key, Duration::from_secs(5), &d);
        let snap_ms = snap["fields"]["elapsed_ms"].as_u64().unwrap_or(u64::MAX);
        let publish = t_pub - t0;
        rep.metric(
            &format!("resync ({label}): snapshot elapsed_ms (log)"),
            format!("{snap_ms} ms"),
            "<= 1000 ms",
            Some(snap_ms <= 1000),
        );
        rep.info(&format!("resync ({label}): start -> snapshot logged"), format!("{:.0} ms", ms(t_snap - t0)));
        rep.metric(
            &format!("resync ({label}): start -> {rows} keys published (resync finished)"),
            format!("{:.0} ms", ms(publish)),
            "<= 1000 ms",
            Some(publish <= Duration::from_millis(1000)),
        );
        d.stop();
    }
}

/// Latency A/B in one process: the 100-row and the 100,000-row view alone,
/// each measured with this build and with `BENCH_AB_BIN` in turn
/// (new, old, new, old, … `BENCH_AB_ROUNDS` times each), against the same
/// server and memcached, so both builds see the machine's drift alike.
async fn latency_ab(rep: &mut Report, old: PathBuf) {
    let n = env_usize("BENCH_LATENCY_N", 300);
    let rounds = env_usize("BENCH_AB_ROUNDS", 2);
    let new = harness::tailcache_bin();
    println!("latency A/B: new = {}, old = {}, {rounds} rounds", new.display(), old.display());
    let big_mc = Memcached::start_with(&["-m", "1024"]);
    let mut res: std::collections::BTreeMap<(usize, &str), Vec<(Duration, Duration)>> = Default::default();
    for round in 0..rounds {
        for size in [100, 100_000] {
            for (label, bin) in [("new", &new), ("old", &old)] {
                // SAFETY: set between runs, while no other thread of this
                // process reads the environment (no daemon is being spawned;
                // the harness reads TAILCACHE_BIN when it spawns one).
                unsafe { std::env::set_var("TAILCACHE_BIN", bin) };
                println!("  (A/B round {round}: {label} build, {size}-row view)");
                let r = bench_latency(rep, &big_mc, &[size], n, false).await[0];
                res.entry((size, label)).or_default().push(r);
            }
        }
    }
    // SAFETY: as above.
    unsafe { std::env::set_var("TAILCACHE_BIN", &new) };
    for ((size, label), v) in &res {
        let p50: Vec<String> = v.iter().map(|r| format!("{:.3}", ms(r.0))).collect();
        let p99: Vec<String> = v.iter().map(|r| format!("{:.3}", ms(r.1))).collect();
        rep.info(
            &format!("latency A/B [{size} rows, {label}]: p50 / p99 per round"),
            format!("{} / {} ms", p50.join(" "), p99.join(" ")),
        );
    }
    for size in [100, 100_000] {
        let med =
            |label: &str, f: fn(&(Duration, Duration)) -> Duration| median(res[&(size, label)].iter().map(f).collect());
        let d50 = ms(med("new", |r| r.0)) - ms(med("old", |r| r.0));
        let d99 = ms(med("new", |r| r.1)) - ms(med("old", |r| r.1));
        rep.metric(
            &format!("latency A/B [{size} rows]: new - old, median p50"),
            format!("{d50:+.3} ms"),
            "<= +0.05 ms",
            Some(d50 <= 0.05),
        );
        rep.info(&format!("latency A/B [{size} rows]: new - old, median p99"), format!("{d99:+.3} ms"));
    }
}

// ---------------------------------------------------------------------------
// 7. Consistency inspector: CPU of an idle daemon, default rate vs disabled
// ---------------------------------------------------------------------------

/// `GET /status` of the admin endpoint on `port`, as JSON.
fn admin_status(port: u16) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    serde_json::from_str(raw.split_once("\r\n\r\n")?.1).ok()
}

/// utime + stime of `pid` (all threads), in clock ticks (`/proc/<pid>/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the `(comm)` field: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
    f.iter().sum()
}

/// The publisher thread's name as `/proc/…/comm` shows it (15 bytes).
const PUBLISHER_COMM: &str = "tailcache-publi";

async fn bench_inspect(rep: &mut Report, mc: &Memcached) {
    let rows = env_usize("BENCH_INSPECT_ROWS", 100_000);
    let secs = env_usize("BENCH_INSPECT_SECS", 60) as u64;
    let db = harness::server().create_db("inspect").await;
    let mut conn = db.root_conn().await;
    exec(&mut conn, "CREATE TABLE r (id INT PRIMARY KEY, name VARCHAR(64) NOT NULL, v INT NOT NULL)").await;
    exec(&mut conn, &format!("INSERT INTO r SELECT seq, CONCAT('row-', seq), seq % 977 FROM seq_1_to_{rows}")).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.db");
    let views = "[[views]]\nname = \"r\"\nkey = \"r:{id}\"\nquery = \"SELECT id, name, v FROM r\"\n";
    let base = config(&db, &state, &["r"], Some((mc, "in:")), views);
    // Disabled first (it also builds the state), then the default rate, on
    // the same state: each daemon idle once its start-up publish is done.
    for (label, rate) in [("disabled (keys_per_second = 0)", 0u32), ("default rate (keys_per_second = 50)", 50)] {
        let port = harness::free_port();
        let cfg = format!("{base}\n[inspect]\nkeys_per_second = {rate}\n\n[admin]\nlisten = \"127.0.0.1:{port}\"\n");
        let mut d = Daemon::start(&cfg);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let st = admin_status(port);
            let keys = st.as_ref().and_then(|s| s["views"]["r"]["keys"].as_u64());
            if st.as_ref().is_some_and(|s| s["published_consistent"] == true) && keys == Some(rows as u64) {
                break;
            }
            assert!(Instant::now() < deadline, "{rows} keys not published:\n{}", tail_log(&d, 40));
            std::thread::sleep(Duration::from_millis(50));
        }
        // Settle (the start-up publish's aftermath: checkpoints, caches),
        // then measure an idle window.
        std::thread::sleep(Duration::from_secs(5));
        let before = admin_status(port).and_then(|s| s["inspect"]["since_start"]["keys"].as_u64()).unwrap_or(0);
        let (t0, c0, (p0, a0)) = (Instant::now(), cpu_ticks(d.pid()), cpu_ns(d.pid(), PUBLISHER_COMM));
        std::thread::sleep(Duration::from_secs(secs));
        let (c1, (p1, a1)) = (cpu_ticks(d.pid()), cpu_ns(d.pid(), PUBLISHER_COMM));
        let wall = t0.elapsed().as_secs_f64();
        let after = admin_status(port).and_then(|s| s["inspect"]["since_start"]["keys"].as_u64()).unwrap_or(0);
        let tick = 100.0; // USER_HZ
        let process_ms = (c1 - c0) as f64 * 1000.0 / tick;
        let publisher_ms = (p1 - p0) as f64 / 1e6;
        let threads_ms = a1.saturating_sub(a0) as f64 / 1e6;
        rep.info(
            &format!("inspect: idle {rows}-key view, {label}"),
            format!(
                "process {process_ms:.0} ms CPU in {wall:.0} s ({:.3} % of a core; stat ticks), all threads {threads_ms:.1} ms, publisher thread {publisher_ms:.1} ms ({:.3} %; schedstat), {} keys inspected",
                process_ms / wall / 10.0,
                publisher_ms / wall / 10.0,
                after - before
            ),
        );
        if rate > 0 {
            assert!(after > before, "the inspector inspected nothing:\n{}", tail_log(&d, 40));
        }
        d.stop();
    }
}

// ---------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| name.contains(a.as_str()));
    let bin = harness::tailcache_bin();
    println!("tailcache binary: {}", bin.display());
    if !bin.components().any(|c| c.as_os_str() == "release") {
        println!("WARNING: not a release build of tailcache; numbers are not representative");
    }
    println!("cpus: {}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let server = harness::server();
        println!(
            "server: {} on port {} (started in {:.1} s)",
            server.version,
            server.port,
            started.elapsed().as_secs_f64()
        );
        let mc = Memcached::start();
        let mut rep = Report { lines: Vec::new() };
        if want("idle") {
            bench_idle(&mut rep, &mc).await;
        }
        if want("inspect") {
            bench_inspect(&mut rep, &mc).await;
        }
        if let Some(old) = std::env::var_os("BENCH_AB_BIN").filter(|_| want("latency")) {
            latency_ab(&mut rep, PathBuf::from(old)).await;
        } else if want("latency") {
            let n = env_usize("BENCH_LATENCY_N", 300);
            // 1M keys need more than memcached's default 64 MB.
            let big_mc = Memcached::start_with(&["-m", "1024"]);
            // Each size alone (its own daemon and server state), in turn.
            let small = bench_latency(&mut rep, &big_mc, &[100], n, true).await[0];
            // p50 / p99 of `big` over those of the 100-row view.
            let ratio = |(b50, b99): (Duration, Duration)| {
                format!(
                    "{:.2}x / {:.2}x",
                    b50.as_secs_f64() / small.0.as_secs_f64(),
                    b99.as_secs_f64() / small.1.as_secs_f64()
                )
            };
            // The same with bigger views: incremental maintenance keeps a
            // one-row commit at one row's cost whatever the view's size.
            let medium = bench_latency(&mut rep, &big_mc, &[100_000], n, true).await[0];
            rep.info("latency: 100k-row / 100-row view measured one after the other, p50 / p99", ratio(medium));
            if env_usize("BENCH_LATENCY_1M", 1) > 0 {
                let big = bench_latency(&mut rep, &big_mc, &[1_000_000], n, true).await[0];
                rep.info("latency: 1M-row / 100-row view measured one after the other, p50 / p99", ratio(big));
            }
            // Side by side: one daemon, both views, commits alternating, so
            // the server's and the machine's drift between the runs above
            // (the server's own COMMIT round trip moves 2x between them)
            // falls on both sizes alike.
            let both = bench_latency(&mut rep, &big_mc, &[100, 100_000], n, true).await;
            let r50 = both[1].0.as_secs_f64() / both[0].0.as_secs_f64();
            let r99 = both[1].1.as_secs_f64() / both[0].1.as_secs_f64();
            rep.metric(
                "latency: 100k-row / 100-row view side by side, p50",
                format!("{r50:.2}x"),
                "<= 1.3x",
                Some(r50 <= 1.3),
            );
            rep.metric(
                "latency: 100k-row / 100-row view side by side, p99",
                format!("{r99:.2}x"),
                "<= 1.3x",
                Some(r99 <= 1.3),
            );
        }
        if want("resync") {
            bench_resync(&mut rep, &mc).await;
        }
        if want("catchup") {
            bench_catchup(&mut rep, &mc).await;
        }
        if want("bulk") {
            bench_bulk(&mut rep).await;
        }
        if want("backlog") {
            bench_backlog(&mut rep, &mc).await;
        }
        // Only when named (≈ 2 min for 200 iterations): not part of "all".
        if args.iter().any(|a| "killloop".contains(a.as_str())) {
            killloop::bench_killloop(&mut rep).await;
        }
        println!("\n=== summary ({:.0} s) ===", started.elapsed().as_secs_f64());
        for l in &rep.lines {
            println!("{l}");
        }
    });
}
