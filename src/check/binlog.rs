use super::*;

impl Ctx<'_> {
    pub(super) fn version(&mut self) {
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

    pub(super) async fn binlog_settings(&mut self) {
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

    pub(super) async fn server_id(&mut self) {
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
    pub(super) async fn tls(&mut self) {
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
