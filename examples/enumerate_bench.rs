//! The cost of orphan enumeration (`sink::enumerate`): one memcached
//! (`-m 1024`) holding `BENCH_OWN` keys under the prefix (default 100,000)
//! and `BENCH_FOREIGN` keys of another application (default 1,000,000);
//! each round lists the keys under the prefix with `lru_crawler metadump
//! all` and checks each against a view's key template
//! (`KeyTemplate::matches`), as a full resync does.
//!
//! Not a test: it prints wall time, this process's CPU time, and the
//! enumerator's peak heap (a counting allocator, reset before each round)
//! and peak RSS (VmHWM, reset through /proc/self/clear_refs).
//!
//! ```sh
//! cargo run --release --example enumerate_bench
//! BENCH_OWN=1000 BENCH_FOREIGN=10000 BENCH_ROUNDS=1 cargo run --example enumerate_bench
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tailcache::sink::enumerate::{KeyEnumerator, Options, Walk};
use tailcache::views::template::KeyTemplate;

/// A memcached of our own (the integration harness needs a test binary's
/// environment), killed on drop.
struct Memcached {
    child: Child,
    port: u16,
}

impl Memcached {
    fn start_with(args: &[&str]) -> Memcached {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("/usr/bin/memcached")
            .args(["-U", "0", "-l", "127.0.0.1", "-p", &port.to_string(), "-t", "2", "-u", "root"])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn /usr/bin/memcached");
        let m = Memcached { child, port };
        // Up when it answers `version`.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(m.addr()) {
                s.write_all(b"version\r\n").unwrap();
                let mut line = String::new();
                if BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("VERSION ") {
                    return m;
                }
            }
            assert!(Instant::now() < deadline, "memcached did not answer on port {port}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Memcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn cpu() -> Duration {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Stores the keys with noreply sets on one connection, then waits for
/// `version` (answered after everything before it).
fn load(m: &Memcached, own: usize, foreign: usize) {
    let s = TcpStream::connect(m.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut w = BufWriter::with_capacity(1 << 20, s.try_clone().unwrap());
    let own_value = [b'o'; 100];
    let foreign_value = [b'f'; 50];
    for i in 0..own.max(foreign) {
        if i < own {
            write!(w, "set bench:page:p{i:07} 0 0 {} noreply\r\n", own_value.len()).unwrap();
            w.write_all(&own_value).unwrap();
            w.write_all(b"\r\n").unwrap();
        }
        if i < foreign {
            write!(w, "set other-app:session:{i:08} 0 0 {} noreply\r\n", foreign_value.len()).unwrap();
            w.write_all(&foreign_value).unwrap();
            w.write_all(b"\r\n").unwrap();
        }
    }
    w.write_all(b"version\r\nstats\r\n").unwrap();
    w.flush().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("VERSION "), "{line:?}");
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("END") {
            break;
        }
        if line.starts_with("STAT curr_items ") || line.starts_with("STAT evictions ") {
            print!("memcached {}", line.trim_start_matches("STAT "));
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let own = env_usize("BENCH_OWN", 100_000);
    let foreign = env_usize("BENCH_FOREIGN", 1_000_000);
    let rounds = env_usize("BENCH_ROUNDS", 3);
    let m = Memcached::start_with(&["-m", "1024"]);
    let t = Instant::now();
    load(&m, own, foreign);
    println!("loaded {own} own + {foreign} foreign keys in {:.2} s", t.elapsed().as_secs_f64());

    let template = KeyTemplate::compile("page:{slug}", &["slug".to_string()]).unwrap();
    let prefix = "bench:";
    // The hash walk first (what a current memcached does), then the LRU
    // walk an older one falls back to.
    let walks = [Walk::Hash, Walk::Lru];
    for (walk, round) in walks.iter().flat_map(|w| (1..=rounds).map(move |r| (*w, r))) {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let rss_before = status_kb("VmRSS:");
        let heap_before = CURRENT.load(Ordering::Relaxed);
        PEAK.store(heap_before, Ordering::Relaxed);
        let (cpu0, t) = (cpu(), Instant::now());

        let mut e =
            KeyEnumerator::start(&m.addr(), prefix.as_bytes(), &Options { walk, ..Options::default() }).await.unwrap();
        let mut matched = 0u64;
        let mut first = None;
        while let Some(batch) = e.next_batch().await.unwrap() {
            first.get_or_insert_with(|| t.elapsed());
            matched += batch.iter().filter(|k| template.matches(prefix, k)).count() as u64;
        }

        let (wall, cpu_used) = (t.elapsed(), cpu() - cpu0);
        let c = e.counts();
        assert_eq!(c.walk, walk);
        assert_eq!(matched, c.under_prefix);
        if walk == Walk::Hash {
            assert_eq!(c.seen, (own + foreign) as u64, "the hash walk listed {} of {} keys", c.seen, own + foreign);
            assert_eq!(c.under_prefix, own as u64);
        }
        println!(
            "{walk:?} walk, round {round}: {} keys listed ({} missed), {} under the prefix ({} missed), \
             {matched} matching; wall {:.3} s \
             (first batch after {:.1} ms), client CPU {:.3} s; peak heap +{:.1} KiB, VmHWM {} kB (RSS before {} kB)",
            c.seen,
            (own + foreign) as u64 - c.seen,
            c.under_prefix,
            own as u64 - c.under_prefix,
            wall.as_secs_f64(),
            first.unwrap_or_default().as_secs_f64() * 1e3,
            cpu_used.as_secs_f64(),
            (PEAK.load(Ordering::Relaxed) - heap_before) as f64 / 1024.0,
            status_kb("VmHWM:"),
            rss_before,
        );
    }
}
