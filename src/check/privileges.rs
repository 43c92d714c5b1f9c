use super::*;

impl Ctx<'_> {
    /// Returns the account (for later messages) when it could be read.
    pub(super) async fn privileges(&mut self) -> Option<Account> {
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
