//! Command line: `tailcache run|check|resync|status`.

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Ask the running daemon (by its pid file) for a full resync now.
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
    /// Print the replica's checkpoint and whether it is consistent.
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
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, resync, log_format } => {
            init_logging(log_format == "json");
            let cfg = try_load!(config);
            match runtime().block_on(crate::daemon::run(cfg, crate::daemon::RunOptions { resync })) {
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
                    crate::daemon::validate_views(&cfg, &mut conn).await
                });
                match problems {
                    Ok(p) if p.is_empty() => {
                        out!("ok   views: {} view(s) compile against the watched tables", cfg.views.len());
                        true
                    }
                    Ok(p) => {
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
            let pid_path = crate::daemon::pid_file(&cfg);
            let pid = match std::fs::read_to_string(&pid_path).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
                Some(p) => p,
                None => {
                    err!(
                        "error: no running tailcache found (pid file {} missing or unreadable); start it with `tailcache run`, or use `tailcache run --resync`",
                        pid_path.display()
                    );
                    return ExitCode::from(1);
                }
            };
            match std::process::Command::new("kill").arg("-HUP").arg(pid.to_string()).status() {
                Ok(s) if s.success() => {
                    out!("asked tailcache (pid {pid}) for a full resync");
                    ExitCode::SUCCESS
                }
                _ => {
                    err!("error: cannot signal pid {pid} from {}: is tailcache running?", pid_path.display());
                    ExitCode::from(1)
                }
            }
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
            if cfg.state.path == ":memory:" {
                err!("error: state.path is \":memory:\": there is no state to inspect");
                return ExitCode::from(1);
            }
            let conn =
                match crate::replica::open_connection(std::path::Path::new(&cfg.state.path), &cfg.mysql.table_refs()) {
                    Ok(c) => c,
                    Err(e) => {
                        err!("error: {e}");
                        return ExitCode::from(1);
                    }
                };
            match crate::replica::read_checkpoint(&conn) {
                Ok(Some((cp, consistent))) => {
                    out!("position: {cp}\nconsistent: {consistent}");
                    ExitCode::SUCCESS
                }
                Ok(None) => {
                    out!("no replica yet (no snapshot taken)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    err!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// A cached value as JSON text, whatever the codec (BLOBs as byte arrays).
fn render_value(codec: crate::config::Codec, bytes: &[u8]) -> String {
    if codec == crate::config::Codec::Json {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut r = bytes;
    match rmpv::decode::read_value(&mut r) {
        Ok(v) => serde_json::to_string(&msgpack_to_json(&v)).unwrap_or_default(),
        Err(e) => format!("(not msgpack: {e}; {} bytes)", bytes.len()),
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
