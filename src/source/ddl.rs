//! Recognises statements in QUERY events that change a table's rows or
//! shape outside row events: TRUNCATE, ALTER, RENAME, DROP, CREATE.
//!
//! This is deliberately a tokenizer, not a SQL parser: we only need the
//! statement kind and the table names it names.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DdlKind {
    /// Empties the table; its shape is unchanged.
    Truncate,
    /// May change columns or replace the table: re-read and re-snapshot.
    Reshape,
    /// Every table of a schema is affected.
    DropDatabase(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ddl {
    pub kind: DdlKind,
    /// (schema, table); schema `None` means the event's default schema.
    pub tables: Vec<(Option<String>, String)>,
}

fn tokens(sql: &str) -> Vec<String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'#' || (c == b'-' && b.get(i + 1) == Some(&b'-')) {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            // MySQL executes /*!NNNNN ... */ bodies: keep their content.
            if b.get(i + 2) == Some(&b'!') {
                i += 3;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                continue;
            }
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if c == b'*' && b.get(i + 1) == Some(&b'/') {
            i += 2;
        } else if c == b'`' || c == b'"' {
            let q = c;
            let mut s = String::new();
            i += 1;
            while i < b.len() {
                if b[i] == q {
                    if b.get(i + 1) == Some(&q) {
                        s.push(q as char);
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                let start = i;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
                s.push_str(&String::from_utf8_lossy(&b[start..i]));
            }
            // Quoted identifiers are marked so keywords never match them.
            out.push(format!("\u{1}{s}"));
        } else if c == b'.' || c == b',' || c == b'(' || c == b')' || c == b';' {
            out.push((c as char).to_string());
            i += 1;
        } else if c == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push("'".into());
        } else {
            let start = i;
            while i < b.len() && !b[i].is_ascii_whitespace() && !b".,();`\"'".contains(&b[i]) {
                i += 1;
            }
            if i == start {
                i += 1;
                continue;
            }
            out.push(String::from_utf8_lossy(&b[start..i]).into_owned());
        }
    }
    out
}

fn kw(t: &str, k: &str) -> bool {
    !t.starts_with('\u{1}') && t.eq_ignore_ascii_case(k)
}

fn ident(t: &str) -> String {
    t.strip_prefix('\u{1}').unwrap_or(t).to_owned()
}

/// Reads `name` or `schema.name` at `i`.
fn table_at(t: &[String], i: &mut usize) -> Option<(Option<String>, String)> {
    let first = ident(t.get(*i)?);
    *i += 1;
    if t.get(*i).map(String::as_str) == Some(".") {
        let second = ident(t.get(*i + 1)?);
        *i += 2;
        return Some((Some(first), second));
    }
    Some((None, first))
}

fn skip_kw(t: &[String], i: &mut usize, words: &[&str]) {
    while t.get(*i).is_some_and(|x| words.iter().any(|w| kw(x, w))) {
        *i += 1;
    }
}

pub fn parse(sql: &str) -> Option<Ddl> {
    let t = tokens(sql);
    let mut i = 0;
    let first = t.first()?;
    if kw(first, "TRUNCATE") {
        i += 1;
        skip_kw(&t, &mut i, &["TABLE"]);
        return Some(Ddl { kind: DdlKind::Truncate, tables: vec![table_at(&t, &mut i)?] });
    }
    if kw(first, "ALTER") {
        i += 1;
        skip_kw(&t, &mut i, &["ONLINE", "OFFLINE", "IGNORE"]);
        if !t.get(i).is_some_and(|x| kw(x, "TABLE")) {
            return None;
        }
        i += 1;
        skip_kw(&t, &mut i, &["IF", "EXISTS"]);
        let mut tables = vec![table_at(&t, &mut i)?];
        // ALTER TABLE a RENAME [TO|AS] b
        while i < t.len() {
            if kw(&t[i], "RENAME") && !t.get(i + 1).is_some_and(|x| kw(x, "COLUMN") || kw(x, "INDEX") || kw(x, "KEY")) {
                i += 1;
                skip_kw(&t, &mut i, &["TO", "AS"]);
                if let Some(tb) = table_at(&t, &mut i) {
                    tables.push(tb);
                }
            } else {
                i += 1;
            }
        }
        return Some(Ddl { kind: DdlKind::Reshape, tables });
    }
    if kw(first, "RENAME") {
        i += 1;
        if !t.get(i).is_some_and(|x| kw(x, "TABLE") || kw(x, "TABLES")) {
            return None;
        }
        i += 1;
        let mut tables = Vec::new();
        while i < t.len() {
            skip_kw(&t, &mut i, &["IF", "EXISTS", "WAIT", "NOWAIT"]);
            if t.get(i).is_some_and(|x| x.chars().all(|c| c.is_ascii_digit())) {
                i += 1;
            }
            tables.push(table_at(&t, &mut i)?);
            skip_kw(&t, &mut i, &["TO"]);
            if t.get(i).map(String::as_str) == Some(",") {
                i += 1;
            }
        }
        return Some(Ddl { kind: DdlKind::Reshape, tables });
    }
    if kw(first, "DROP") || kw(first, "CREATE") {
        i += 1;
        skip_kw(&t, &mut i, &["OR", "REPLACE", "TEMPORARY", "GLOBAL"]);
        let what = t.get(i)?;
        if kw(first, "DROP") && (kw(what, "DATABASE") || kw(what, "SCHEMA")) {
            i += 1;
            skip_kw(&t, &mut i, &["IF", "EXISTS"]);
            return Some(Ddl { kind: DdlKind::DropDatabase(ident(t.get(i)?)), tables: Vec::new() });
        }
        if !kw(what, "TABLE") {
            return None;
        }
        i += 1;
        skip_kw(&t, &mut i, &["IF", "NOT", "EXISTS"]);
        let mut tables = vec![table_at(&t, &mut i)?];
        if kw(first, "DROP") {
            while t.get(i).map(String::as_str) == Some(",") {
                i += 1;
                tables.push(table_at(&t, &mut i)?);
            }
        }
        return Some(Ddl { kind: DdlKind::Reshape, tables });
    }
    None
}

/// A row-changing statement logged in statement format (a session ran with
/// `binlog_format=STATEMENT` or `MIXED`): its rows never arrive as row
/// events. Returns every table the statement names, conservatively (any
/// identifier, or `schema.name` pair, in the text), so a caller that
/// re-snapshots the watched ones among them can never miss a change; an
/// extra re-snapshot is the price of not parsing SQL.
pub fn statement_dml_tables(sql: &str) -> Option<Vec<(Option<String>, String)>> {
    let t = tokens(sql);
    let first = t.first()?;
    let dml = ["INSERT", "UPDATE", "DELETE", "REPLACE", "LOAD", "WITH", "CALL"];
    if !dml.iter().any(|k| kw(first, k)) {
        return None;
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < t.len() {
        let tok = &t[i];
        if tok.len() == 1 && ".,();'".contains(tok.as_str()) {
            i += 1;
            continue;
        }
        if let Some(tb) = table_at(&t, &mut i) {
            out.push(tb);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_dml_names_its_tables() {
        let has = |sql: &str, s: Option<&str>, n: &str| {
            statement_dml_tables(sql).unwrap().iter().any(|(a, b)| a.as_deref() == s && b.eq_ignore_ascii_case(n))
        };
        assert!(has("INSERT INTO application VALUES (1)", None, "application"));
        assert!(has("update `shop`.`feature` set x=1", Some("shop"), "feature"));
        assert!(has("DELETE a FROM application a JOIN other o ON o.id=a.id", None, "other"));
        assert!(has("LOAD DATA INFILE '/tmp/x' INTO TABLE t1", None, "t1"));
        assert!(statement_dml_tables("ALTER TABLE t ADD c INT").is_none());
        assert!(statement_dml_tables("BEGIN").is_none());
        assert!(statement_dml_tables("SAVEPOINT a").is_none());
    }

    fn tb(s: Option<&str>, n: &str) -> (Option<String>, String) {
        (s.map(Into::into), n.into())
    }

    #[test]
    fn recognises_ddl() {
        assert_eq!(
            parse("TRUNCATE TABLE `app`").unwrap(),
            Ddl { kind: DdlKind::Truncate, tables: vec![tb(None, "app")] }
        );
        assert_eq!(parse("truncate db.app").unwrap().tables, vec![tb(Some("db"), "app")]);
        let d = parse("ALTER TABLE feature ADD COLUMN x INT, RENAME TO feature2").unwrap();
        assert_eq!(d.kind, DdlKind::Reshape);
        assert_eq!(d.tables, vec![tb(None, "feature"), tb(None, "feature2")]);
        assert_eq!(parse("alter table a rename column b to c").unwrap().tables, vec![tb(None, "a")]);
        assert_eq!(
            parse("RENAME TABLE a TO b, `x`.`y` TO z").unwrap().tables,
            vec![tb(None, "a"), tb(None, "b"), tb(Some("x"), "y"), tb(None, "z")]
        );
        assert_eq!(
            parse("DROP TABLE IF EXISTS `a`,b /* generated by server */").unwrap().tables,
            vec![tb(None, "a"), tb(None, "b")]
        );
        assert_eq!(parse("CREATE TABLE IF NOT EXISTS t (id int primary key)").unwrap().tables, vec![tb(None, "t")]);
        assert_eq!(parse("/* c */ CREATE OR REPLACE TABLE t2 LIKE t").unwrap().tables, vec![tb(None, "t2")]);
        assert_eq!(parse("DROP DATABASE IF EXISTS `shop`").unwrap().kind, DdlKind::DropDatabase("shop".into()));
        assert!(parse("BEGIN").is_none());
        assert!(parse("COMMIT").is_none());
        assert!(parse("INSERT INTO t VALUES (1)").is_none());
        assert!(parse("CREATE INDEX i ON t (a)").is_none());
        assert!(parse("ALTER USER x").is_none());
        assert!(parse("").is_none());
    }
}
