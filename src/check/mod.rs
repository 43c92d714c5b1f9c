//! `tailcache check`: everything that must hold before tailing can work,
//! each reported on one line with what was found and the exact fix.
//!
//! [`run_checks`] is the whole preflight (config, connection, server);
//! [`preflight`] is the server part, which `tailcache run` runs on its open
//! connection and refuses to start on any [`Outcome::Problem`].
//!
//! Nothing here panics on a server answer and nothing prints the password:
//! every text is scrubbed of it before it leaves this module.
//!
//! One file per concern: `binlog` (version, TLS, binlog settings,
//! server_id), `privileges` (grants and the `SHOW GRANTS` parser),
//! `tables` (the watched tables), [`memcached`] (each server, its item
//! size limit, `memcached.exptime`) and [`state`] (the state file's
//! directory).

mod binlog;
pub mod memcached;
mod privileges;
pub mod state;
mod tables;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use mysql_async::Conn;
use mysql_async::prelude::*;

use crate::config::{Config, TableRef, TlsMode};
use crate::error::codes;
use crate::source::server::{
    self, Account, Flavor, ServerIdUse, ServerInfo, lock_tables_grants, lock_tables_statement, replicas_statement,
};

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Fine; the detail says what was seen, e.g. `ROW`.
    Ok(String),
    /// Works, but something is worth changing.
    Warn { found: String, fix: String },
    /// Tailing cannot work (or cannot be trusted) until this is fixed.
    Problem { found: String, expected: String, fix: String },
}

impl Outcome {
    pub fn is_problem(&self) -> bool {
        matches!(self, Outcome::Problem { .. })
    }
    pub fn is_warn(&self) -> bool {
        matches!(self, Outcome::Warn { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    /// What was checked: `binlog_format`, `privilege SELECT on appdb.feature`, ...
    pub name: String,
    pub outcome: Outcome,
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Ok(detail) => write!(f, "ok   {}: {detail}", self.name),
            Outcome::Warn { found, fix } => {
                write!(f, "warn {}: found {found}; fix: {fix}", self.name)
            }
            Outcome::Problem { found, expected, fix } => {
                write!(f, "FAIL {}: found {found}, expected {expected}; fix: {fix}", self.name)
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub lines: Vec<CheckLine>,
}

impl Report {
    /// True when no line is a [`Outcome::Problem`] (warnings are fine).
    pub fn ok(&self) -> bool {
        !self.lines.iter().any(|l| l.outcome.is_problem())
    }

    pub fn problems(&self) -> impl Iterator<Item = &CheckLine> {
        self.lines.iter().filter(|l| l.outcome.is_problem())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &CheckLine> {
        self.lines.iter().filter(|l| l.outcome.is_warn())
    }

    /// One line per check, newline-terminated.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            s.push_str(&l.to_string());
            s.push('\n');
        }
        s
    }

    /// E.g. `2 problem(s), 1 warning(s)` or `all 14 checks passed`.
    pub fn summary(&self) -> String {
        let (p, w) = (self.problems().count(), self.warnings().count());
        match (p, w) {
            (0, 0) => format!("all {} checks passed", self.lines.len()),
            (0, w) => format!("no problems, {w} warning(s)"),
            (p, w) => format!("{p} problem(s), {w} warning(s)"),
        }
    }

    fn ok_line(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.lines.push(CheckLine { name: name.into(), outcome: Outcome::Ok(detail.into()) });
    }

    fn warn(&mut self, name: impl Into<String>, found: impl Into<String>, fix: impl Into<String>) {
        self.lines
            .push(CheckLine { name: name.into(), outcome: Outcome::Warn { found: found.into(), fix: fix.into() } });
    }

    fn problem(
        &mut self,
        name: impl Into<String>,
        found: impl Into<String>,
        expected: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.lines.push(CheckLine {
            name: name.into(),
            outcome: Outcome::Problem { found: found.into(), expected: expected.into(), fix: fix.into() },
        });
    }

    /// Replaces every occurrence of `secret` in every text with `***`.
    fn scrub(&mut self, secret: &str) {
        if secret.is_empty() {
            return;
        }
        let s = |t: &mut String| {
            if t.contains(secret) {
                *t = t.replace(secret, "***");
            }
        };
        for l in &mut self.lines {
            s(&mut l.name);
            match &mut l.outcome {
                Outcome::Ok(d) => s(d),
                Outcome::Warn { found, fix } => {
                    s(found);
                    s(fix);
                }
                Outcome::Problem { found, expected, fix } => {
                    s(found);
                    s(expected);
                    s(fix);
                }
            }
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// Every check, in order: config, memcached and the state file (they need
/// no MySQL), connection, then [`preflight`]. Never panics; a failed
/// connection is one Problem line and ends the report.
pub async fn run_checks(cfg: &Config) -> Report {
    let mut r = Report::default();
    let password = cfg.mysql.password().ok().flatten();

    // 1. configuration
    let problems = cfg.validate();
    if problems.is_empty() {
        r.ok_line("config", format!("valid ({} watched table(s))", cfg.mysql.tables.len()));
    }
    let url_ok = !problems.iter().any(|p| p.key == "mysql.url");
    for p in problems {
        r.problem(format!("config {}", p.key), p.found, p.expected, format!("edit {} in the config file", p.key));
    }
    if let Some(mc) = &cfg.memcached {
        memcached::check(mc, &mut r).await;
    }
    state::check(&cfg.state.path, &mut r);
    if let Err(e) = cfg.mysql.password() {
        r.problem(
            "config mysql.password_file",
            e.to_string(),
            "a readable file holding the password",
            "fix the path or the file's permissions",
        );
    }
    if !url_ok {
        r.problem(
            "connect",
            "no usable mysql.url",
            "a URL like mysql://tailcache@127.0.0.1:3306/appdb",
            "fix mysql.url; the server checks were skipped",
        );
        if let Some(p) = &password {
            r.scrub(p);
        }
        return r;
    }

    // 2. connect and authenticate
    let where_ = cfg.mysql.parse_url().map(|u| format!("{}@{}:{}", u.user, u.host, u.port)).unwrap_or_default();
    match crate::source::conn::connect(&cfg.mysql).await {
        Err(e) => {
            let expected = format!("a successful login at {where_}");
            let fix = if e.to_string().contains("requires TLS") || e.to_string().starts_with("mysql.tls") {
                "set mysql.tls (and mysql.tls_ca_file) as the message says; the server checks were skipped"
            } else if e.to_string().contains("access denied") {
                "check the user name in mysql.url and the password (mysql.password_file, $TAILCACHE_MYSQL_PASSWORD or the URL)"
            } else {
                "check mysql.url (host, port, database) and that the server is running and reachable; the server checks were skipped"
            };
            r.problem("connect", e.to_string(), expected, fix);
        }
        Ok(mut conn) => {
            r.ok_line("connect", format!("logged in as {where_}"));
            let t = query_timeout(cfg);
            match within(t, crate::source::conn::server_info(&mut conn)).await {
                Ok(info) => {
                    // `check` only looks: a running tailcache keeps its stream.
                    let rest = preflight_with(&mut conn, &info, cfg, false).await;
                    r.lines.extend(rest.lines);
                }
                Err(e) => r.problem(
                    "server version",
                    format!("cannot read the server version: {e}"),
                    "SELECT VERSION(), @@server_id to answer",
                    "check the server's health; the server checks were skipped",
                ),
            }
            let _ = tokio::time::timeout(t, conn.disconnect()).await;
        }
    }
    if let Some(p) = &password {
        r.scrub(p);
    }
    r
}

/// The server checks on an open connection (what `tailcache run` runs before
/// starting): version, TLS, binlog settings, privileges, tables, server_id.
/// Binlog dump connections of our own user from this host still holding
/// our server_id (left by a crash a moment ago) are ended, not reported.
pub async fn preflight(conn: &mut Conn, info: &ServerInfo, cfg: &Config) -> Report {
    preflight_with(conn, info, cfg, true).await
}

async fn preflight_with(conn: &mut Conn, info: &ServerInfo, cfg: &Config, kill_leftovers: bool) -> Report {
    let mut c = Ctx { conn, info, cfg, t: query_timeout(cfg), broken: None, kill_leftovers, r: Report::default() };
    c.version();
    c.tls().await;
    tracing::debug!("preflight: tls checked");
    c.binlog_settings().await;
    tracing::debug!("preflight: binlog settings checked");
    let account = c.privileges().await;
    tracing::debug!("preflight: privileges checked");
    c.tables(account.as_ref()).await;
    tracing::debug!("preflight: tables checked");
    c.server_id().await;
    if let Some(why) = c.broken.take() {
        c.r.problem(
            "server checks",
            format!("stopped early: {why}"),
            "every query to answer",
            "look for long-running DDL or locks on the watched tables (SHOW PROCESSLIST), then re-run tailcache check",
        );
    }
    let mut r = c.r;
    if let Ok(Some(p)) = cfg.mysql.password() {
        r.scrub(&p);
    }
    r
}

fn query_timeout(cfg: &Config) -> Duration {
    let secs = cfg.mysql.connect_timeout_secs;
    Duration::from_secs_f64(if secs.is_finite() { secs.clamp(5.0, 120.0) } else { 10.0 })
}

#[derive(Debug)]
enum QueryError {
    Timeout(Duration),
    Server { code: u16, message: String },
    Other(String),
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::Timeout(t) => write!(f, "no answer within {t:?}"),
            QueryError::Server { code, message } => write!(f, "{message} (error {code})"),
            QueryError::Other(m) => f.write_str(m),
        }
    }
}

impl From<mysql_async::Error> for QueryError {
    fn from(e: mysql_async::Error) -> Self {
        match e {
            mysql_async::Error::Server(s) => QueryError::Server { code: s.code, message: s.message },
            e => QueryError::Other(e.to_string()),
        }
    }
}

impl From<crate::Error> for QueryError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Mysql { source: mysql_async::Error::Server(s), .. } => {
                QueryError::Server { code: s.code, message: s.message }
            }
            e => QueryError::Other(e.to_string()),
        }
    }
}

async fn within<T, E: Into<QueryError>>(t: Duration, fut: impl Future<Output = Result<T, E>>) -> Result<T, QueryError> {
    match tokio::time::timeout(t, fut).await {
        Err(_) => Err(QueryError::Timeout(t)),
        Ok(r) => r.map_err(Into::into),
    }
}

struct Ctx<'a> {
    conn: &'a mut Conn,
    info: &'a ServerInfo,
    cfg: &'a Config,
    t: Duration,
    /// Set once a query timed out or the link broke: the connection is in an
    /// unknown state, so the remaining server checks are skipped.
    broken: Option<String>,
    /// End binlog dump connections our own user left behind with our
    /// server_id (`tailcache run`), instead of only reporting them.
    kill_leftovers: bool,
    r: Report,
}

impl Ctx<'_> {
    /// Runs one query unless the connection is already known broken; a
    /// timeout or a lost link marks it broken.
    fn q<T>(&mut self, what: &str, res: Result<T, QueryError>) -> Result<T, QueryError> {
        if let Err(e) = &res
            && !matches!(e, QueryError::Server { .. })
            && self.broken.is_none()
        {
            self.broken = Some(format!("{what}: {e}"));
        }
        res
    }
}
