//! Command line: `tailcache run|check|resync|status|get`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH};

#[derive(Debug, Parser)]
#[command(
    name = "tailcache",
    version,
    about = "Keeps business-rule views of MySQL/MariaDB tables in memcached, from the binlog"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Configuration file (TOML).
    #[arg(long, short = 'c', default_value = DEFAULT_CONFIG_PATH, env = "TAILCACHE_CONFIG")]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replicate the watched tables and publish the views (the daemon).
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Take a fresh snapshot and republish everything instead of resuming.
        #[arg(long)]
        resync: bool,
        /// Log format.
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        log_format: String,
    },
    /// Check the configuration and the server: one line per check, non-zero exit on any problem.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Full resync now: asks the running daemon (admin endpoint) and prints its report; with no
    /// daemon reachable, takes a fresh snapshot and republishes everything itself, then exits.
    Resync {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print what memcached holds for KEY (key_prefix is added), decoded to JSON.
    Get {
        #[command(flatten)]
        config: ConfigArg,
        /// The key without memcached.key_prefix.
        key: String,
    },
    /// What the running daemon is doing (admin endpoint); with none, the stored checkpoint (read-only).
    Status {
        #[command(flatten)]
        config: ConfigArg,
    },
}

// `println!`/`eprintln!` panic when the reader of a pipe went away
// (`tailcache check | head -1`): these write what they can and carry on.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}
macro_rules! out_raw {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($t)*);
    }};
}
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

fn init_logging(json: bool) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, never in a pipe or the
    // journal. The writer ignores a closed stderr (tracing never panics).
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // Its default reports a failed write with eprintln!, which panics
        // when stderr is a closed pipe (`tailcache run 2>&1 | head -1`).
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        err!("error: {e}");
        ExitCode::from(2)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            err!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// Loads the config or returns its error's exit code from the caller.
macro_rules! try_load {
    ($arg:expr) => {
        match load(&$arg.config) {
            Ok(c) => c,
            Err(code) => return code,
        }
    };
}

pub fn main() -> ExitCode {
    let _crash_points = crate::failpoint::setup();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, resync, log_format } => {
            init_logging(log_format == "json");
            tracing::debug!("starting");
            let cfg = try_load!(config);
            tracing::debug!("configuration loaded");
            match runtime()
                .block_on(crate::daemon::run(cfg, crate::daemon::RunOptions { resync, ..Default::default() }))
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "tailcache stopped");
                    err!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { config } => {
            let cfg = try_load!(config);
            let rt = runtime();
            let report = rt.block_on(crate::check::run_checks(&cfg));
            out_raw!("{}", report.render());
            let views_ok = if report.ok() && !cfg.views.is_empty() {
                let problems = rt.block_on(async {
                    let mut conn = crate::source::conn::connect(&cfg.mysql).await?;
                    crate::daemon::check_views(&cfg, &mut conn).await
                });
                match problems {
                    Ok((p, maintenance)) if p.is_empty() => {
                        out!("ok   views: {} view(s) compile against the watched tables", cfg.views.len());
                        for m in maintenance {
                            out!("ok   view {m}");
                        }
                        true
                    }
                    Ok((p, _)) => {
                        out!("FAIL views: {} problem(s)\n{}", p.len(), p.join("\n"));
                        false
                    }
                    Err(e) => {
                        out!("FAIL views: cannot check them: {e}");
                        false
                    }
                }
            } else {
                true
            };
            if report.ok() && views_ok { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Command::Resync { config } => {
            let cfg = try_load!(config);
            resync(cfg)
        }
        Command::Get { config, key } => {
            let cfg = try_load!(config);
            let Some(mc) = &cfg.memcached else {
                err!("error: memcached: the config has no [memcached] section");
                return ExitCode::from(2);
            };
            let full = format!("{}{key}", mc.key_prefix);
            let sink = crate::sink::Sink::connect(mc);
            match runtime().block_on(sink.get(full.as_bytes())) {
                Ok(Some((bytes, _flags))) => {
                    out!("{}", render_value(mc.codec, &bytes));
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    out!("(no value for {full})");
                    ExitCode::from(1)
                }
                Err(e) => {
                    err!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Status { config } => {
            let cfg = try_load!(config);
            status(&cfg)
        }
    }
}

/// Where the CLI reaches the daemon's admin endpoint: the configured
/// address, with a wildcard replaced by loopback. `None`: disabled.
fn admin_target(cfg: &Config) -> Option<SocketAddr> {
    let mut a = cfg.admin.addr().ok().flatten()?;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() });
    }
    Some(a)
}

/// One request to the running daemon; `Err` when none answers.
fn ask_daemon(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> std::io::Result<(u16, String)> {
    rt.block_on(async {
        // Connecting is quick or refused on loopback; the answer may take as
        // long as the resync does.
        match tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_probe)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
        }
        crate::admin::request(addr, method, path).await
    })
}

fn resync(cfg: Config) -> ExitCode {
    let rt = runtime();
    let target = admin_target(&cfg);
    if let Some(addr) = target {
        match ask_daemon(&rt, addr, "POST", "/resync") {
            Ok((200, body)) => {
                match serde_json::from_str::<serde_json::Value>(&body) {
                    Ok(v) => out!("{}", render_resync(&v)),
                    Err(_) => out!("{}", body.trim_end()),
                }
                return ExitCode::SUCCESS;
            }
            Ok((202, _)) => {
                out!("the daemon at {addr} took the resync request (no [memcached]: no report to wait for)");
                return ExitCode::SUCCESS;
            }
            Ok((code, body)) => {
                err!("error: the daemon at {addr} answered {code}: {}", body.trim_end());
                return ExitCode::from(1);
            }
            Err(e) => err!("no daemon reachable at {addr} ({e}): resyncing here, once"),
        }
    } else {
        err!("admin endpoint disabled (admin.listen = \"\"): resyncing here, once");
    }
    one_shot_resync(cfg, rt)
}

/// `tailcache run --resync` until the first consistent publish, then exit.
fn one_shot_resync(cfg: Config, rt: tokio::runtime::Runtime) -> ExitCode {
    use std::io::IsTerminal as _;
    let terminal = std::io::stderr().is_terminal();
    // Warnings and errors only (RUST_LOG overrides); the progress bar, on a
    // terminal, tells the rest.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(terminal).with_writer(std::io::stderr).try_init();
    let status = std::sync::Arc::new(crate::status::Status::new());
    let publishing = cfg.memcached.is_some();
    let opts = crate::daemon::RunOptions { resync: true, once: true, status: Some(status.clone()) };
    let started = Instant::now();
    let result = rt.block_on(async {
        let progress = terminal.then(|| {
            let status = status.clone();
            tokio::spawn(async move {
                let bar = SpinnerGuard(indicatif::ProgressBar::new_spinner());
                bar.0.enable_steady_tick(Duration::from_millis(120));
                loop {
                    bar.0.set_message(progress_message(&status.snapshot()));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        let r = crate::daemon::run(cfg, opts).await;
        if let Some(p) = progress {
            p.abort();
            let _ = p.await;
        }
        r
    });
    if let Err(e) = result {
        err!("error: {e}");
        return ExitCode::from(1);
    }
    let view = status.snapshot();
    match &view.last_resync {
        Some(r) if publishing => match serde_json::to_value(r) {
            Ok(v) => out!("{}", render_resync(&v)),
            Err(e) => out!("resync done ({e})"),
        },
        _ if view.consistent => out!(
            "replica re-snapshotted at {} in {:.1} s (nothing published: no [memcached])",
            view.position.as_deref().unwrap_or("?"),
            started.elapsed().as_secs_f64()
        ),
        _ => {
            err!("error: stopped before the resync finished");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

/// Clears the spinner however its task ends (finished or aborted).
struct SpinnerGuard(indicatif::ProgressBar);

impl Drop for SpinnerGuard {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn progress_message(s: &crate::status::StatusView) -> String {
    match (&s.snapshot, s.consistent, s.source_error.as_deref()) {
        (Some(p), _, _) => match p.estimated_rows {
            Some(n) => format!("snapshot of {}: {} of ~{n} rows", p.table, p.rows_copied),
            None => format!("snapshot of {}: {} rows", p.table, p.rows_copied),
        },
        (None, _, Some(e)) => format!("waiting for the server: {e}"),
        (None, true, _) => "publishing every view".to_owned(),
        (None, false, _) => "connecting, preflight, snapshot".to_owned(),
    }
}

/// A resync report (JSON of [`crate::status::ResyncReport`]) for people.
fn render_resync(v: &serde_json::Value) -> String {
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let counts = |v: &serde_json::Value| {
        format!(
            "checked {}, missing {}, differed {}, deleted {}, unchanged {}, orphans {}",
            n(v, "checked"),
            n(v, "missing"),
            n(v, "differed"),
            n(v, "deleted"),
            n(v, "unchanged"),
            n(v, "orphans")
        )
    };
    let mut out = format!(
        "resync #{} done (trigger {}, {} ms): {}",
        n(v, "seq"),
        v.get("trigger").and_then(|t| t.as_str()).unwrap_or("?"),
        n(v, "duration_ms"),
        counts(v)
    );
    // Keys under the prefix that no view's template matches: left alone.
    out.push_str(&format!(", foreign keys left alone {}", n(v, "foreign")));
    if let Some(views) = v.get("views").and_then(|x| x.as_object()) {
        for (name, c) in views {
            out.push_str(&format!("\n  view {name}: {}", counts(c)));
        }
    }
    out
}

fn status(cfg: &Config) -> ExitCode {
    let rt = runtime();
    match admin_target(cfg) {
        Some(addr) => match ask_daemon(&rt, addr, "GET", "/status") {
            Ok((200, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => {
                    out!("{}", render_status(&v));
                    return ExitCode::SUCCESS;
                }
                Err(e) => {
                    err!("error: the daemon at {addr} sent a status that is not JSON: {e}");
                    return ExitCode::from(1);
                }
            },
            Ok((code, body)) => {
                err!("error: the daemon at {addr} answered {code}: {}", body.trim_end());
                return ExitCode::from(1);
            }
            Err(e) => out!("no daemon reachable at {addr} ({e})"),
        },
        None => out!("admin endpoint disabled (admin.listen = \"\"): cannot ask a running daemon"),
    }
    stored_status(cfg)
}

/// The checkpoint in the state file, opened read-only: never creates or
/// changes a file.
fn stored_status(cfg: &Config) -> ExitCode {
    if cfg.state.path == ":memory:" {
        out!("state.path is \":memory:\": nothing is stored between runs");
        return ExitCode::SUCCESS;
    }
    let path = std::path::Path::new(&cfg.state.path);
    if !path.exists() {
        out!("state file {} does not exist (no snapshot taken yet)", path.display());
        return ExitCode::SUCCESS;
    }
    // A read-only connection still creates the -wal/-shm files of a WAL
    // database. Without a -wal file the database file holds everything:
    // open it immutable (no lock, no side file). With one (a process died
    // before its last checkpoint) its transactions only show through the
    // shared index, which must already exist.
    let side = |ext: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(ext);
        std::path::PathBuf::from(p).exists()
    };
    let (wal, shm) = (side("-wal"), side("-shm"));
    use rusqlite::OpenFlags;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    let opened = if wal && shm {
        rusqlite::Connection::open_with_flags(path, flags)
    } else {
        if wal {
            out!("note: {}-wal exists without its -shm index; its last transactions are not shown", path.display());
        }
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let uri = format!("file:{}?immutable=1", uri_escape(&abs.to_string_lossy()));
        rusqlite::Connection::open_with_flags(uri, flags)
    };
    let conn = match opened {
        Ok(c) => c,
        Err(e) => {
            err!("error: cannot open {} read-only: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    match crate::replica::read_checkpoint(&conn) {
        Ok(Some((cp, consistent))) => {
            out!("stored checkpoint ({}):\nposition: {cp}\nconsistent: {consistent}", path.display());
            ExitCode::SUCCESS
        }
        Ok(None) => {
            out!("state file {}: no snapshot taken yet", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            err!("error: {}: {e}", path.display());
            ExitCode::from(1)
        }
    }
}

/// Percent-escapes what a SQLite URI path cannot hold as is.
fn uri_escape(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        match b {
            b'?' | b'#' | b'%' | b' ' | 0..=0x1f | 0x7f..=0xff => out.push_str(&format!("%{b:02X}")),
            _ => out.push(b as char),
        }
    }
    out
}

/// `GET /status` for people.
fn render_status(v: &serde_json::Value) -> String {
    use serde_json::Value as J;
    let s = |k: &str| v.get(k).and_then(J::as_str);
    let f = |v: &J, k: &str| v.get(k).and_then(J::as_f64);
    let now = crate::status::unix_now();
    let ago = |t: f64| format!("{:.1} s ago", (now - t).max(0.0));
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    let pid = v.get("pid").and_then(J::as_u64).map(|p| format!("pid {p}")).unwrap_or_default();
    let not_ready: Vec<&str> =
        v.get("not_ready").and_then(J::as_array).map(|a| a.iter().filter_map(J::as_str).collect()).unwrap_or_default();
    if not_ready.is_empty() {
        line(format!("daemon: {pid}, ready"));
    } else {
        line(format!("daemon: {pid}, NOT ready:"));
        for r in not_ready {
            line(format!("  - {r}"));
        }
    }
    let consistent = v.get("consistent").and_then(J::as_bool).unwrap_or(false);
    let gtid = s("gtid").map(|g| format!(" (gtid {g})")).unwrap_or_default();
    line(format!(
        "position: {}{gtid}, {}",
        s("position").unwrap_or("none yet"),
        if consistent { "consistent" } else { "NOT consistent yet" }
    ));
    let connected = v.get("source_connected").and_then(J::as_bool).unwrap_or(false);
    let lag = f(v, "lag_seconds").map(|l| format!(", lag {l:.1} s")).unwrap_or_default();
    match s("source_error") {
        Some(e) => {
            line(format!("source: {}{lag}; last error: {e}", if connected { "streaming" } else { "disconnected" }))
        }
        None => line(format!("source: {}{lag}", if connected { "streaming" } else { "disconnected" })),
    }
    match v.get("last_publish").filter(|p| !p.is_null()) {
        Some(p) => line(format!(
            "last publish: {} at {}, latency {:.1} ms",
            f(p, "at_unix").map(ago).unwrap_or_default(),
            p.get("position").and_then(J::as_str).unwrap_or("?"),
            f(p, "latency_ms").unwrap_or(0.0)
        )),
        None => line("last publish: none yet".into()),
    }
    if let Some(e) = s("publish_error") {
        line(format!("publish error: {e}"));
    }
    match v.get("last_resync").filter(|r| !r.is_null()) {
        Some(r) => line(format!(
            "last resync: {}; {}",
            f(r, "finished_at_unix").map(ago).unwrap_or_default(),
            render_resync(r).replace('\n', "\n  ")
        )),
        None => line("last resync: none since start".into()),
    }
    if let Some(views) = v.get("views").and_then(J::as_object).filter(|m| !m.is_empty()) {
        line("views:".into());
        for (name, vs) in views {
            let keys = vs.get("keys").and_then(J::as_u64).unwrap_or(0);
            let rejected: Vec<String> = v
                .get("entries_rejected")
                .and_then(|r| r.get(name))
                .and_then(J::as_object)
                .map(|m| m.iter().map(|(reason, n)| format!("{reason} {}", n.as_u64().unwrap_or(0))).collect())
                .unwrap_or_default();
            let rejected = if rejected.is_empty() {
                String::new()
            } else {
                format!(", entries rejected: {}", rejected.join(", "))
            };
            match vs.get("last_error").and_then(J::as_str) {
                Some(e) => line(format!("  {name}: {keys} keys{rejected}, FAILING: {e}")),
                None => line(format!("  {name}: {keys} keys{rejected}")),
            }
        }
    }
    if let Some(mc) = v.get("memcached").and_then(J::as_object).filter(|m| !m.is_empty()) {
        let list: Vec<String> = mc
            .iter()
            .map(|(server, up)| format!("{server} {}", if up.as_bool() == Some(true) { "up" } else { "DOWN" }))
            .collect();
        line(format!("memcached: {}", list.join(", ")));
    }
    match v.get("inspect").filter(|i| !i.is_null()) {
        Some(i) => {
            let summary =
                |span: &str| i.get(span).and_then(|s| s.get("summary")).and_then(J::as_str).unwrap_or("?").to_owned();
            let n = |k: &str| i.get("since_start").and_then(|s| s.get(k)).and_then(J::as_u64).unwrap_or(0);
            line(format!(
                "consistency: {} in the last hour; {} since start",
                summary("last_hour"),
                summary("since_start")
            ));
            line(format!(
                "  (inspector at {} keys/s; since start {} inconsistent, repaired; {} in flight)",
                i.get("keys_per_second").and_then(J::as_u64).unwrap_or(0),
                n("inconsistent"),
                n("in_flight")
            ));
        }
        None if v.get("memcached").and_then(J::as_object).is_some_and(|m| !m.is_empty()) => {
            line("consistency: not measured (inspector disabled: inspect.keys_per_second = 0)".into())
        }
        None => {}
    }
    if let Some(p) = v.get("snapshot").filter(|p| !p.is_null()) {
        let rows = p.get("rows_copied").and_then(J::as_u64).unwrap_or(0);
        let est = p.get("estimated_rows").and_then(J::as_u64).map(|e| format!(" of ~{e}")).unwrap_or_default();
        line(format!(
            "snapshot in progress: {} ({rows}{est} rows copied)",
            p.get("table").and_then(J::as_str).unwrap_or("?")
        ));
    }
    out.trim_end().to_owned()
}

/// A cached value as JSON text, whatever the codec (BLOBs as byte arrays).
fn render_value(codec: crate::config::Codec, bytes: &[u8]) -> String {
    if codec == crate::config::Codec::Json {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    if codec == crate::config::Codec::Pickle {
        return match serde_pickle::value_from_slice(bytes, serde_pickle::DeOptions::new()) {
            Ok(v) => serde_json::to_string(&pickle_to_json(&v)).unwrap_or_default(),
            Err(e) => format!("(not a pickle: {e}; {} bytes)", bytes.len()),
        };
    }
    let mut r = bytes;
    match rmpv::decode::read_value(&mut r) {
        Ok(v) => serde_json::to_string(&msgpack_to_json(&v)).unwrap_or_default(),
        Err(e) => format!("(not msgpack: {e}; {} bytes)", bytes.len()),
    }
}

fn pickle_to_json(v: &serde_pickle::Value) -> serde_json::Value {
    use serde_json::Value as J;
    use serde_pickle::Value as P;
    match v {
        P::None => J::Null,
        P::Bool(b) => J::Bool(*b),
        P::I64(i) => J::from(*i),
        P::Int(i) => J::String(i.to_string()),
        P::F64(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
        P::Bytes(b) => J::Array(b.iter().map(|x| J::from(*x)).collect()),
        P::String(s) => J::String(s.clone()),
        P::List(a) | P::Tuple(a) => J::Array(a.iter().map(pickle_to_json).collect()),
        P::Set(a) | P::FrozenSet(a) => J::Array(a.iter().map(|h| pickle_to_json(&h.clone().into_value())).collect()),
        P::Dict(m) => J::Object(
            m.iter()
                .map(|(k, v)| {
                    let k = match pickle_to_json(&k.clone().into_value()) {
                        J::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, pickle_to_json(v))
                })
                .collect(),
        ),
    }
}

fn msgpack_to_json(v: &rmpv::Value) -> serde_json::Value {
    use rmpv::Value as M;
    use serde_json::Value as J;
    match v {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(*b),
        M::Integer(i) => i.as_i64().map(J::from).or_else(|| i.as_u64().map(J::from)).unwrap_or(J::Null),
        M::F32(f) => serde_json::Number::from_f64(*f as f64).map(J::Number).unwrap_or(J::Null),
        M::F64(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
        M::String(s) => J::String(s.as_str().unwrap_or_default().to_owned()),
        M::Binary(b) => J::Array(b.iter().map(|x| J::from(*x)).collect()),
        M::Array(a) => J::Array(a.iter().map(msgpack_to_json).collect()),
        M::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| (k.as_str().map(str::to_owned).unwrap_or_else(|| k.to_string()), msgpack_to_json(v)))
                .collect(),
        ),
        M::Ext(_, b) => J::Array(b.iter().map(|x| J::from(*x)).collect()),
    }
}
