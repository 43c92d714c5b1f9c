//! `tailcache check`: everything that must hold before tailing can work,
//! each reported on one line with what was found and the exact fix.
//!
//! [`run_checks`] is the whole preflight (config, connection, server);
//! [`preflight`] is the server part, which `tailcache run` runs on its open
//! connection and refuses to start on any [`Outcome::Problem`].
//!
//! Nothing here panics on a server answer and nothing prints the password:
//! every text is scrubbed of it before it leaves this module.

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

/// Every check, in order: config, connection, then [`preflight`]. Never
/// panics; a failed connection is one Problem line and ends the report.
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
    c.binlog_settings().await;
    let account = c.privileges().await;
    c.tables(account.as_ref()).await;
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

    fn version(&mut self) {
        let info = self.info;
        let (maj, min, patch) = info.version_tuple;
        let shown = format!("{} {maj}.{min}.{patch}", info.flavor);
        let supported = "MySQL 5.7, 8.x or 9.x, or MariaDB 10.3 to 11.x";
        match info.flavor {
            Flavor::Mysql if (maj, min) < (5, 7) => self.r.problem(
                "server version",
                format!("{shown} ({})", info.version),
                supported,
                "upgrade the server: older versions lack the row-based binlog features tailcache reads",
            ),
            Flavor::MariaDb if (maj, min) < (10, 3) => self.r.problem(
                "server version",
                format!("{shown} ({})", info.version),
                supported,
                "upgrade the server: older versions lack the row-based binlog features tailcache reads",
            ),
            Flavor::Mysql if maj >= 10 => self.r.warn(
                "server version",
                format!("{shown}, newer than tailcache was tested with ({supported})"),
                "it will probably work; run the checks below and watch the first resync closely",
            ),
            Flavor::MariaDb if maj >= 12 => self.r.warn(
                "server version",
                format!("{shown}, newer than tailcache was tested with ({supported})"),
                "it will probably work; run the checks below and watch the first resync closely",
            ),
            _ => self.r.ok_line("server version", shown),
        }
    }

    async fn binlog_settings(&mut self) {
        const NAMES: [&str; 7] = [
            "log_bin",
            "binlog_format",
            "binlog_row_image",
            "binlog_row_metadata",
            "binlog_row_value_options",
            "binlog_transaction_compression",
            "log_bin_compress",
        ];
        let sql = format!(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN ({})",
            NAMES.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
        );
        let res = within(self.t, self.conn.query::<(String, Option<String>), _>(sql)).await;
        let vars: HashMap<String, String> = match self.q("SHOW GLOBAL VARIABLES", res) {
            Ok(rows) => rows.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v.unwrap_or_default())).collect(),
            Err(e) => {
                self.r.problem(
                    "binlog settings",
                    format!("cannot read the server variables: {e}"),
                    "SHOW GLOBAL VARIABLES to answer",
                    "check the server's health and re-run tailcache check",
                );
                return;
            }
        };
        let restart = "under [mysqld] in my.cnf and restart the server";
        let get = |n: &str| vars.get(n).map(|v| v.trim().to_owned());

        match get("log_bin") {
            Some(v) if v.eq_ignore_ascii_case("ON") || v == "1" => self.r.ok_line("log_bin", "ON"),
            found => self.r.problem(
                "log_bin",
                found.unwrap_or_else(|| "nothing (the server does not report log_bin)".into()),
                "ON (binary logging enabled)",
                format!("add `log_bin = mysql-bin` {restart} (log_bin cannot be changed at runtime)"),
            ),
        }
        let exact = |r: &mut Report, name: &str, want: &str, runtime: &str| {
            match get(name) {
            Some(v) if v.eq_ignore_ascii_case(want) => r.ok_line(name, want),
            found => r.problem(
                name,
                found.unwrap_or_else(|| format!("nothing (the server does not report {name})")),
                want,
                format!(
                    "add `{name} = {want}` {restart} (or SET GLOBAL {name} = {want} now, which only affects new connections{runtime})"
                ),
            ),
        }
        };
        exact(&mut self.r, "binlog_format", "ROW", "; statements already logged are not row events");
        exact(&mut self.r, "binlog_row_image", "FULL", "");

        // Optional but recommended where the server has it (MySQL 8.0.1+, MariaDB 10.5+).
        match get("binlog_row_metadata") {
            None => self.r.ok_line(
                "binlog_row_metadata",
                format!("not available on {} {} (column names come from information_schema)", self.info.flavor, self.short_version()),
            ),
            Some(v) if v.eq_ignore_ascii_case("FULL") => self.r.ok_line("binlog_row_metadata", "FULL"),
            Some(v) => self.r.warn(
                "binlog_row_metadata",
                format!("{v}, recommended FULL (column names and signedness in every table map let tailcache catch schema changes early)"),
                format!("add `binlog_row_metadata = FULL` {restart} (or SET GLOBAL binlog_row_metadata = FULL)"),
            ),
        }

        match self.info.flavor {
            Flavor::Mysql => {
                if let Some(v) = get("binlog_row_value_options") {
                    if v.to_ascii_uppercase().contains("PARTIAL_JSON") {
                        // Supported: the diffs are applied to the full
                        // before image (binlog_row_image=FULL).
                        self.r.ok_line(
                            "binlog_row_value_options",
                            "PARTIAL_JSON (JSON diffs are applied to the before image)",
                        );
                    } else {
                        self.r.ok_line("binlog_row_value_options", "'' (full JSON values)");
                    }
                }
                if let Some(v) = get("binlog_transaction_compression") {
                    self.r.ok_line(
                        "binlog_transaction_compression",
                        format!("{v} (compressed transactions are supported)"),
                    );
                }
            }
            Flavor::MariaDb => {
                if let Some(v) = get("log_bin_compress") {
                    if v.eq_ignore_ascii_case("ON") || v == "1" {
                        self.r.problem(
                            "log_bin_compress",
                            "ON",
                            "OFF (tailcache cannot read compressed binlog events)",
                            format!(
                                "set `log_bin_compress = OFF` {restart} (or SET GLOBAL log_bin_compress = OFF now)"
                            ),
                        );
                    } else {
                        self.r.ok_line("log_bin_compress", "OFF");
                    }
                }
            }
        }
    }

    fn short_version(&self) -> String {
        let (a, b, c) = self.info.version_tuple;
        format!("{a}.{b}.{c}")
    }

    /// Returns the account (for later messages) when it could be read.
    async fn privileges(&mut self) -> Option<Account> {
        if self.broken.is_some() {
            return None;
        }
        let res = within(self.t, self.conn.query_first::<String, _>("SELECT CURRENT_USER()")).await;
        let account = match self.q("SELECT CURRENT_USER()", res) {
            Ok(Some(u)) => Account::parse(&u),
            Ok(None) | Err(_) => {
                let user = self.cfg.mysql.parse_url().map(|u| u.user).unwrap_or_else(|_| "tailcache".into());
                Account::parse(&format!("{user}@%"))
            }
        };
        let grants = self.read_grants().await;
        let flavor = self.info.flavor;

        // REPLICATION SLAVE: reading the binlog stream. No cheap probe on
        // MariaDB, so SHOW GRANTS decides; on MySQL SHOW REPLICAS / SHOW
        // SLAVE HOSTS needs it, which confirms it.
        let name = "privilege REPLICATION SLAVE";
        let fix = format!("GRANT REPLICATION SLAVE ON *.* TO {account};");
        let in_grants = grants.as_ref().map(|g| g.has_global(&["REPLICATION SLAVE"]));
        let probe = if flavor == Flavor::Mysql && self.broken.is_none() {
            let sql = replicas_statement(self.info);
            let res = within(self.t, self.conn.query_drop(sql)).await;
            Some(self.q(sql, res))
        } else {
            None
        };
        match (in_grants, probe) {
            (Ok(true), _) | (_, Some(Ok(()))) => self.r.ok_line(name, "granted"),
            (Ok(false), _) if grants.as_ref().is_ok_and(|g| g.roles.is_empty()) => self.r.problem(
                name,
                format!("{account} without REPLICATION SLAVE"),
                "REPLICATION SLAVE ON *.* (to read the binlog stream)",
                fix,
            ),
            (Ok(false), _) => self.r.warn(
                name,
                format!(
                    "not in SHOW GRANTS for {account}, which has role(s) {} that may grant it; the binlog stream will fail without it",
                    grants.as_ref().map(|g| g.roles.join(", ")).unwrap_or_default()
                ),
                format!("{fix} (or make sure the role granting it is a default role)"),
            ),
            (Err(e), _) => self.r.warn(name, format!("cannot tell: SHOW GRANTS failed: {e}"), format!("make sure of it: {fix}")),
        }

        // REPLICATION CLIENT (BINLOG MONITOR on MariaDB 10.5.2+): SHOW
        // BINARY LOGS and SHOW MASTER STATUS; probed directly.
        let priv_name = server::binlog_monitor_privilege(self.info);
        let name = format!("privilege {priv_name}");
        let fix = format!("GRANT {priv_name} ON *.* TO {account};");
        let expected = format!("{priv_name} ON *.* (for SHOW BINARY LOGS and {})", self.info.status_statement());
        let mut verdict: Option<Result<(), String>> = None;
        for sql in ["SHOW BINARY LOGS", self.info.status_statement()] {
            if self.broken.is_some() {
                break;
            }
            let res = within(self.t, self.conn.query_drop(sql)).await;
            match self.q(sql, res) {
                Ok(()) => {
                    verdict.get_or_insert(Ok(()));
                }
                Err(QueryError::Server { code, message })
                    if code == codes::SPECIFIC_ACCESS_DENIED
                        || code == codes::ACCESS_DENIED
                        || code == codes::TABLEACCESS_DENIED =>
                {
                    verdict = Some(Err(format!("{sql} is denied: {message}")));
                    break;
                }
                // log_bin off: no verdict from this probe.
                Err(QueryError::Server { code: codes::NO_BINARY_LOGGING, .. }) => {}
                Err(_) => {}
            }
        }
        let in_grants = grants.as_ref().map(|g| {
            let mut names = vec!["REPLICATION CLIENT", "BINLOG MONITOR"];
            if flavor == Flavor::Mysql {
                names.push("SUPER");
            }
            g.has_global(&names)
        });
        match (verdict, in_grants) {
            (Some(Ok(())), _) => {
                self.r.ok_line(&name, format!("granted (SHOW BINARY LOGS and {} work)", self.info.status_statement()))
            }
            (Some(Err(found)), _) => self.r.problem(&name, found, expected, fix),
            (None, Ok(true)) => self.r.ok_line(&name, "granted (per SHOW GRANTS)"),
            (None, Ok(false)) => self.r.problem(&name, format!("{account} without {priv_name}"), expected, fix),
            (None, Err(e)) => self.r.warn(&name, format!("cannot tell: {e}"), format!("make sure of it: {fix}")),
        }

        // SELECT on every watched table: probed with the query the snapshot
        // runs (all columns), so column-level grants are caught too.
        for t in self.cfg.mysql.table_refs() {
            if self.broken.is_some() {
                break;
            }
            let name = format!("privilege SELECT on {t}");
            let sql = format!("SELECT * FROM {} LIMIT 0", t.mysql_quoted());
            let res = within(self.t, self.conn.query_drop(sql.as_str())).await;
            match self.q(&sql, res) {
                Ok(()) => self.r.ok_line(name, "granted"),
                Err(QueryError::Server { code, message })
                    if code == codes::TABLEACCESS_DENIED || code == codes::DBACCESS_DENIED || code == 1143 =>
                {
                    self.r.problem(
                        name,
                        format!("SELECT is denied: {message}"),
                        format!("SELECT on {t} (to snapshot it)"),
                        format!("GRANT SELECT ON {} TO {account};", t.mysql_quoted()),
                    );
                }
                // Missing table or database: reported by the table checks.
                Err(QueryError::Server { code, .. }) if code == codes::NO_SUCH_TABLE || code == codes::BAD_DB => {}
                Err(e) => self.r.warn(
                    name,
                    format!("cannot tell: {sql} failed: {e}"),
                    format!("make sure of it: GRANT SELECT ON {} TO {account};", t.mysql_quoted()),
                ),
            }
        }
        if flavor == Flavor::Mysql && self.broken.is_none() {
            self.lock_tables(&account).await;
        }
        Some(account)
    }

    /// MySQL only: the snapshot reads its start position under a brief
    /// `LOCK TABLES … READ` (see `snapshot::quiesced_position`). Probed by
    /// doing it; the privilege is checked before any wait, so a timeout
    /// still tells that it is granted.
    async fn lock_tables(&mut self, account: &Account) {
        let tables = self.cfg.mysql.table_refs();
        let name = "privilege LOCK TABLES";
        let fix = lock_tables_grants(&tables, &account.to_string());
        let res = within(self.t, self.conn.query_drop("SET SESSION lock_wait_timeout = 1")).await;
        if self.q("SET SESSION lock_wait_timeout = 1", res).is_err() {
            return;
        }
        let sql = lock_tables_statement(&tables);
        let res = within(self.t, self.conn.query_drop(sql.as_str())).await;
        match self.q(&sql, res) {
            Ok(()) => {
                let res = within(self.t, self.conn.query_drop("UNLOCK TABLES")).await;
                let _ = self.q("UNLOCK TABLES", res);
                self.r.ok_line(name, "granted (snapshots read their start position under a brief read lock)")
            }
            Err(QueryError::Server { code, .. }) if code == codes::LOCK_WAIT_TIMEOUT => {
                self.r.ok_line(name, "granted (the tables were busy during the probe)")
            }
            Err(QueryError::Server {
                code: codes::DBACCESS_DENIED | codes::TABLEACCESS_DENIED | codes::SPECIFIC_ACCESS_DENIED,
                message,
            }) => {
                self.r.warn(
                    name,
                    format!("not granted ({message}): a transaction committing just as a snapshot starts could be missing from the replica until the next resync"),
                    fix,
                )
            }
            // Missing tables are reported by the table checks.
            Err(QueryError::Server { code, .. }) if code == codes::NO_SUCH_TABLE || code == codes::BAD_DB => {}
            Err(e) => self.r.warn(name, format!("cannot tell: {sql} failed: {e}"), format!("make sure of it: {fix}")),
        }
    }

    /// `SHOW GRANTS` for the session's user and its active roles.
    async fn read_grants(&mut self) -> Result<Grants, String> {
        if let Some(b) = &self.broken {
            return Err(b.clone());
        }
        let mut sql = "SHOW GRANTS".to_owned();
        if self.info.flavor == Flavor::Mysql && self.info.version_tuple >= (8, 0, 0) {
            // MySQL lists only the role names unless asked to expand them.
            let res = within(self.t, self.conn.query_first::<String, _>("SELECT CURRENT_ROLE()")).await;
            if let Ok(Some(roles)) = self.q("SELECT CURRENT_ROLE()", res)
                && !roles.trim().is_empty()
                && !roles.eq_ignore_ascii_case("NONE")
            {
                sql = format!("SHOW GRANTS FOR CURRENT_USER() USING {roles}");
            }
        }
        let res = within(self.t, self.conn.query::<String, _>(sql.as_str())).await;
        match self.q(&sql, res) {
            Ok(lines) => Ok(Grants::parse(&lines)),
            Err(e) => Err(format!("{sql}: {e}")),
        }
    }

    async fn tables(&mut self, account: Option<&Account>) {
        let denied: Vec<String> = self
            .r
            .lines
            .iter()
            .filter(|l| l.outcome.is_problem())
            .filter_map(|l| l.name.strip_prefix("privilege SELECT on ").map(str::to_owned))
            .collect();
        for t in self.cfg.mysql.table_refs() {
            if self.broken.is_some() {
                return;
            }
            let name = format!("table {t}");
            let res = within(self.t, crate::source::catalog::load_table_schema(self.conn, &t)).await;
            let s = match self.q(&name, res) {
                Err(e) => {
                    self.r.problem(
                        name,
                        format!("cannot read its definition: {e}"),
                        "information_schema to answer",
                        "re-run tailcache check",
                    );
                    continue;
                }
                Ok(None) if denied.contains(&t.to_string()) => {
                    self.r.problem(
                        name,
                        format!(
                            "table {t} is not visible to {}",
                            account.map(|a| a.to_string()).unwrap_or_else(|| "this user".into())
                        ),
                        "a table the user can read",
                        "run the GRANT SELECT above (or fix the name in mysql.tables), then re-run tailcache check",
                    );
                    continue;
                }
                Ok(None) => {
                    self.r.problem(
                        name,
                        format!("table {t} does not exist"),
                        format!("an existing table {t}"),
                        format!("create {} or remove {:?} from mysql.tables", t.mysql_quoted(), self.table_entry(&t)),
                    );
                    continue;
                }
                Ok(Some(s)) => s,
            };
            // Kind and engine.
            let res = within(
                self.t,
                self.conn.exec_first::<(String, Option<String>), _, _>(
                    "SELECT CAST(TABLE_TYPE AS CHAR), CAST(ENGINE AS CHAR) FROM information_schema.TABLES \
                     WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                    (&t.schema, &t.name),
                ),
            )
            .await;
            let (kind, engine) = self.q(&name, res).ok().flatten().unwrap_or_default();
            let engine = engine.unwrap_or_default();
            if kind.to_ascii_uppercase().contains("VIEW") {
                self.r.problem(
                    name,
                    format!("{t} is a view"),
                    "a base table (views write nothing to the binlog)",
                    format!("watch the view's base tables instead of {:?} in mysql.tables", self.table_entry(&t)),
                );
                continue;
            }
            if s.primary_key.is_empty() {
                let suggestion = self.unique_not_null_columns(&t).await;
                let cols = match &suggestion {
                    Some(cols) => {
                        cols.iter().map(|c| format!("`{}`", c.replace('`', "``"))).collect::<Vec<_>>().join(", ")
                    }
                    None => "<columns that identify a row>".into(),
                };
                self.r.problem(
                    name,
                    format!("table {t} has no primary key"),
                    "a PRIMARY KEY (rows are replicated and published by it)",
                    format!("ALTER TABLE {} ADD PRIMARY KEY ({cols});", t.mysql_quoted()),
                );
            } else {
                let pk: Vec<&str> =
                    s.primary_key.iter().filter_map(|&i| s.columns.get(i).map(|c| c.name.as_str())).collect();
                let eng = if engine.is_empty() { String::new() } else { format!(", {engine}") };
                self.r.ok_line(name, format!("{} column(s), primary key ({}){eng}", s.columns.len(), pk.join(", ")));
            }
            let transactional = ["innodb", "xtradb", "rocksdb", "tokudb", "ndbcluster", "ndb"];
            if !engine.is_empty() && !transactional.contains(&engine.to_ascii_lowercase().as_str()) {
                self.r.warn(
                    format!("engine {t}"),
                    format!(
                        "{engine}, which is not transactional: its changes are logged per statement, outside the transaction, and are applied at each statement's COMMIT"
                    ),
                    format!("ALTER TABLE {} ENGINE = InnoDB; (if that suits the application)", t.mysql_quoted()),
                );
            }
        }
    }

    /// How the table is spelled in `mysql.tables`.
    fn table_entry(&self, t: &TableRef) -> String {
        let refs = self.cfg.mysql.table_refs();
        refs.iter()
            .position(|r| r == t)
            .and_then(|i| self.cfg.mysql.tables.get(i).cloned())
            .unwrap_or_else(|| t.sqlite_name())
    }

    /// The first unique index whose columns are all NOT NULL: a ready-made key.
    async fn unique_not_null_columns(&mut self, t: &TableRef) -> Option<Vec<String>> {
        let res = within(
            self.t,
            self.conn.exec::<(String, String, String), _, _>(
                "SELECT CAST(s.INDEX_NAME AS CHAR), CAST(s.COLUMN_NAME AS CHAR), CAST(c.IS_NULLABLE AS CHAR) \
                 FROM information_schema.STATISTICS s JOIN information_schema.COLUMNS c \
                   ON c.TABLE_SCHEMA = s.TABLE_SCHEMA AND c.TABLE_NAME = s.TABLE_NAME AND c.COLUMN_NAME = s.COLUMN_NAME \
                 WHERE s.TABLE_SCHEMA = ? AND s.TABLE_NAME = ? AND s.NON_UNIQUE = 0 \
                 ORDER BY s.INDEX_NAME, s.SEQ_IN_INDEX",
                (&t.schema, &t.name),
            ),
        )
        .await;
        let rows = self.q("unique indexes", res).ok()?;
        let mut by_index: Vec<(String, Vec<String>, bool)> = Vec::new();
        for (index, col, nullable) in rows {
            if by_index.last().is_none_or(|(i, _, _)| *i != index) {
                by_index.push((index.clone(), Vec::new(), true));
            }
            if let Some(last) = by_index.last_mut() {
                last.1.push(col);
                last.2 &= nullable.eq_ignore_ascii_case("NO");
            }
        }
        by_index.into_iter().find(|(_, _, not_null)| *not_null).map(|(_, cols, _)| cols)
    }

    async fn server_id(&mut self) {
        let ours = self.cfg.mysql.server_id;
        let name = "server_id";
        if ours == self.info.server_id {
            let free = server::free_server_id(&[], self.info.server_id, ours.max(4001));
            self.r.problem(
                name,
                format!("mysql.server_id = {ours}, the server's own @@server_id"),
                "an id different from the server's and every replica's",
                format!("set mysql.server_id = {free} (or another number no server or replica in this replication topology uses)"),
            );
            return;
        }
        if self.broken.is_some() {
            return;
        }
        let sql = replicas_statement(self.info);
        let user = self.cfg.mysql.parse_url().map(|u| u.user).unwrap_or_default();
        let res = within(self.t, server::server_id_use(self.conn, self.info, ours, &user)).await;
        let used = match self.q(sql, res) {
            Ok(u) => u,
            Err(_) => {
                self.r.ok_line(
                    name,
                    format!(
                        "{ours} differs from the server's {}; other replicas not checked ({sql} needs {})",
                        self.info.server_id,
                        server::replicas_privilege(self.info)
                    ),
                );
                return;
            }
        };
        match used {
            ServerIdUse::Free => self.r.ok_line(
                name,
                format!("{ours} (the server is {}; no other replica connected with {ours})", self.info.server_id),
            ),
            ServerIdUse::Own { threads } if self.kill_leftovers => {
                let ids = threads.iter().map(|t| t.id.to_string()).collect::<Vec<_>>().join(", ");
                let res = within(self.t, server::kill_own_leftover_dumps(self.conn, ours, &user)).await;
                match self.q("KILL leftover binlog dump", res) {
                    Ok(n) => self.r.ok_line(
                        name,
                        format!("{ours}; ended {n} binlog dump connection(s) of {user} from this host left with this id ({ids})"),
                    ),
                    Err(e) => self.r.ok_line(
                        name,
                        format!("{ours}; binlog dump connection(s) {ids} of {user} from this host hold this id and could not be ended ({e}); the server replaces them when tailcache starts reading"),
                    ),
                }
            }
            ServerIdUse::Own { threads } => self.r.ok_line(
                name,
                format!(
                    "{ours}, in use by {} binlog dump connection(s) of {user} from this host (this tailcache running, or one that just crashed); `tailcache run` takes it over",
                    threads.len()
                ),
            ),
            ServerIdUse::Other { replicas, foreign } => {
                let all = within(self.t, server::replicas(self.conn, self.info)).await;
                let used_ids: Vec<u32> = all.map(|v| v.iter().map(|r| r.server_id).collect()).unwrap_or_default();
                let free = server::free_server_id(&used_ids, self.info.server_id, ours);
                let mut who: Vec<String> = replicas.iter().map(|r| r.to_string()).collect();
                who.extend(
                    foreign.iter().map(|d| format!("a binlog dump connection {} of {} from {}", d.id, d.user, d.client)),
                );
                self.r.problem(
                    name,
                    format!(
                        "mysql.server_id = {ours} is already used by another binlog reader: {} (the server drops one of two readers with the same id)",
                        who.join(", ")
                    ),
                    "an id different from the server's and every replica's",
                    format!("set mysql.server_id = {free} (free: not the server's and no connected replica's); if that reader is another tailcache with this config, stop it first"),
                );
            }
        }
    }

    /// One line on the connection's encryption (`SHOW STATUS LIKE 'Ssl_%'`).
    async fn tls(&mut self) {
        if self.broken.is_some() {
            return;
        }
        let mode = self.cfg.mysql.tls;
        let res = within(self.t, crate::source::conn::tls_status(self.conn)).await;
        match self.q("SHOW STATUS LIKE 'Ssl_version'", res) {
            Ok(Some((version, cipher))) => {
                let verified = match mode {
                    TlsMode::VerifyIdentity => "certificate and host name verified",
                    TlsMode::VerifyCa => "certificate verified against mysql.tls_ca_file, host name not checked",
                    _ => "certificate not verified",
                };
                self.r.ok_line("tls", format!("encrypted ({version}, {cipher}; {verified}; mysql.tls = \"{mode}\")"))
            }
            Ok(None) if mode == TlsMode::Disabled => self.r.ok_line("tls", "not encrypted (mysql.tls = \"disabled\")"),
            Ok(None) => self.r.ok_line(
                "tls",
                format!("not encrypted: the server offers no TLS (mysql.tls = \"{mode}\" falls back to plain)"),
            ),
            Err(e) => self.r.warn("tls", format!("cannot tell: {e}"), "re-run tailcache check"),
        }
    }
}

// ---------------------------------------------------------------------------
// SHOW GRANTS parsing
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Grants {
    /// (privileges upper-cased, target)
    grants: Vec<(Vec<String>, Target)>,
    /// Roles granted to the account (their privileges may not be listed).
    roles: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Global,
    /// A database name or LIKE pattern (`app\_db`, `app%`).
    Db(String),
    Table(String, String),
    /// PROCEDURE/FUNCTION/PROXY and anything else we do not need.
    Other,
}

impl Grants {
    fn parse(lines: &[String]) -> Grants {
        let mut g = Grants::default();
        for line in lines {
            let Some(rest) = strip_prefix_ci(line.trim(), "GRANT ") else {
                continue;
            };
            match split_top_level(rest, " ON ") {
                Some((privs, rest)) => {
                    let target_text = split_top_level(rest, " TO ").map(|(t, _)| t).unwrap_or(rest);
                    let privs: Vec<String> = split_commas(privs)
                        .into_iter()
                        .map(|p| {
                            // Column-level grants (`SELECT (a, b)`) cover part of a table only.
                            match p.find('(') {
                                Some(i) => {
                                    format!("{} (COLUMNS)", p[..i].trim().to_ascii_uppercase())
                                }
                                None => p.trim().to_ascii_uppercase(),
                            }
                        })
                        .collect();
                    g.grants.push((privs, parse_target(target_text.trim())));
                }
                None => {
                    // `GRANT role[, role] TO user`
                    let roles = split_top_level(rest, " TO ").map(|(r, _)| r).unwrap_or(rest);
                    g.roles.extend(split_commas(roles).into_iter().map(|r| r.trim().to_owned()));
                }
            }
        }
        g
    }

    fn covers(privs: &[String], names: &[&str]) -> bool {
        privs.iter().any(|p| p == "ALL" || p == "ALL PRIVILEGES" || names.iter().any(|n| p == n))
    }

    fn has_global(&self, names: &[&str]) -> bool {
        self.grants.iter().any(|(p, t)| *t == Target::Global && Self::covers(p, names))
    }

    #[cfg(test)]
    fn has_select(&self, t: &TableRef) -> bool {
        self.grants.iter().any(|(p, target)| {
            Self::covers(p, &["SELECT"])
                && match target {
                    Target::Global => true,
                    Target::Db(pattern) => like(pattern, &t.schema),
                    Target::Table(db, name) => *db == t.schema && *name == t.name,
                    Target::Other => false,
                }
        })
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s.is_char_boundary(prefix.len()) && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// Splits at the first `sep` (ASCII, case-insensitive) outside quotes and
/// parentheses.
fn split_top_level<'a>(s: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    let bytes = s.as_bytes();
    let sep = sep.as_bytes();
    let (mut quote, mut depth) = (None::<u8>, 0i32);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'`' | b'\'' | b'"' => quote = Some(b),
                b'(' => depth += 1,
                b')' => depth -= 1,
                _ if depth == 0
                    && bytes.len() - i >= sep.len()
                    && bytes[i..i + sep.len()].eq_ignore_ascii_case(sep) =>
                {
                    return Some((&s[..i], &s[i + sep.len()..]));
                }
                _ => {}
            },
        }
        i += 1;
    }
    None
}

fn split_commas(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((a, b)) = split_top_level(rest, ",") {
        out.push(a.trim());
        rest = b;
    }
    if !rest.trim().is_empty() {
        out.push(rest.trim());
    }
    out
}

/// Reads one identifier (quoted or bare) and returns it with the rest.
fn identifier(s: &str) -> (String, &str) {
    let s = s.trim_start();
    if let Some(q) = s.chars().next().filter(|c| matches!(c, '`' | '\'' | '"')) {
        let mut out = String::new();
        let mut chars = s[1..].char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == q {
                if chars.peek().is_some_and(|&(_, n)| n == q) {
                    chars.next();
                    out.push(q);
                    continue;
                }
                return (out, &s[1 + i + c.len_utf8()..]);
            }
            out.push(c);
        }
        (out, "")
    } else {
        let end = s.find(['.', ' ']).unwrap_or(s.len());
        (s[..end].to_owned(), &s[end..])
    }
}

fn parse_target(t: &str) -> Target {
    let upper = t.to_ascii_uppercase();
    if upper.starts_with("PROCEDURE ") || upper.starts_with("FUNCTION ") || upper.starts_with("PACKAGE ") {
        return Target::Other;
    }
    let t = strip_prefix_ci(t, "TABLE ").unwrap_or(t).trim();
    if t == "*" || t == "*.*" {
        return Target::Global;
    }
    let (db, rest) = identifier(t);
    let Some(rest) = rest.strip_prefix('.') else {
        return Target::Other;
    };
    if rest.trim() == "*" {
        return Target::Db(db);
    }
    let (table, _) = identifier(rest);
    if table.is_empty() { Target::Other } else { Target::Table(db, table) }
}

/// MySQL's LIKE for database grants: `%`, `_`, `\` escapes.
#[cfg(test)]
fn like(pattern: &str, s: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some('%') => (0..=s.len()).any(|i| go(&p[1..], &s[i..])),
            Some('_') => !s.is_empty() && go(&p[1..], &s[1..]),
            Some('\\') if p.len() > 1 => s.first() == Some(&p[1]) && go(&p[2..], &s[1..]),
            Some(c) => s.first() == Some(c) && go(&p[1..], &s[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = s.chars().collect();
    go(&p, &s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn tref(s: &str, n: &str) -> TableRef {
        TableRef { schema: s.into(), name: n.into(), qualified: true }
    }

    #[test]
    fn grants_mariadb() {
        let g = Grants::parse(&lines(&[
            "GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO `tailcache`@`%` IDENTIFIED BY PASSWORD '*ABC'",
            "GRANT SELECT ON `app\\_db`.* TO `tailcache`@`%`",
            "GRANT SELECT (`a`, `b`) ON `other`.`t` TO `tailcache`@`%`",
            "GRANT EXECUTE ON PROCEDURE `app_db`.`p` TO `tailcache`@`%`",
            "GRANT `reader` TO `tailcache`@`%`",
        ]));
        assert!(g.has_global(&["REPLICATION SLAVE"]));
        assert!(g.has_global(&["REPLICATION CLIENT", "BINLOG MONITOR"]));
        assert!(g.has_select(&tref("app_db", "x")));
        assert!(!g.has_select(&tref("appxdb", "x")), "escaped _ is literal");
        assert!(!g.has_select(&tref("other", "t")), "column-level SELECT is not table SELECT");
        assert_eq!(g.roles, vec!["`reader`"]);
    }

    #[test]
    fn grants_mysql() {
        let g = Grants::parse(&lines(&[
            "GRANT USAGE ON *.* TO 'tailcache'@'%'",
            "GRANT ALL PRIVILEGES ON `appdb`.* TO 'tailcache'@'%'",
            "GRANT SELECT, INSERT ON `x`.`y.z` TO `tailcache`@`%`",
            "GRANT BACKUP_ADMIN,BINLOG_ADMIN ON *.* TO `tailcache`@`%` WITH GRANT OPTION",
        ]));
        assert!(!g.has_global(&["REPLICATION SLAVE"]));
        assert!(g.has_select(&tref("appdb", "feature")));
        assert!(g.has_select(&tref("x", "y.z")));
        assert!(!g.has_select(&tref("x", "y")));
        assert!(g.has_global(&["BINLOG_ADMIN"]));
        assert!(g.roles.is_empty());
        let all = Grants::parse(&lines(&["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION"]));
        assert!(all.has_global(&["REPLICATION SLAVE"]));
    }

    #[test]
    fn like_patterns() {
        assert!(like("app%", "appdb"));
        assert!(like("a_p", "app"));
        assert!(!like("a\\_p", "app"));
        assert!(like("a\\_p", "a_p"));
    }

    #[test]
    fn render_and_scrub() {
        let mut r = Report::default();
        r.ok_line("binlog_format", "ROW");
        r.problem("binlog_row_image", "MINIMAL", "FULL", "add `binlog_row_image = FULL`");
        r.warn("connect", "password hunter2 leaked", "x");
        r.scrub("hunter2");
        let text = r.render();
        assert_eq!(
            text,
            "ok   binlog_format: ROW\n\
             FAIL binlog_row_image: found MINIMAL, expected FULL; fix: add `binlog_row_image = FULL`\n\
             warn connect: found password *** leaked; fix: x\n"
        );
        assert!(!r.ok());
        assert_eq!(r.summary(), "1 problem(s), 1 warning(s)");
    }
}
