use super::*;

impl Ctx<'_> {
    pub(super) async fn tables(&mut self, account: Option<&Account>) {
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
}
