//! Incremental view maintenance for `row` views: which output keys a
//! transaction's changed rows can affect, so that only those are
//! recomputed.
//!
//! A `row` view is *incremental* when it has a **key table** K: every key
//! placeholder is a column that SQLite reports (`sqlite3_column_table_name`
//! / `_origin_name`) as taken unchanged from one table K, K appears exactly
//! once in the query, in its top-level `FROM`, and the top level has no
//! `LIMIT`/`OFFSET`, no aggregate without a `GROUP BY` that lists every key
//! column of K; the query has no window function, compound `SELECT`, CTE
//! or non-deterministic function. Then every output row comes from K rows
//! carrying its key tuple, so:
//!
//! * a change to a row of K can affect only the keys of its before and
//!   after images' key columns;
//! * a change to another table T the view reads affects only the keys of
//!   the K rows it is *linked* to: T appears once, and its scope (the
//!   subquery or top level it is in) has a conjunct `T.c = K.d` (WHERE or
//!   ON, joined by AND only, no OR in that scope). The affected keys are
//!   those of the K rows with `d` equal to the changed T rows' `c` (K read
//!   after the transaction; K rows that changed in it are covered by K's
//!   own images). A table read without such a link recomputes the view in
//!   full when it changes.
//!
//! The affected key tuples go to a TEMP table; the view's query restricted
//! to them (`SELECT * FROM (<query>) WHERE (<key columns>) IN (SELECT …)`,
//! which SQLite pushes down to K's primary key for simple queries) gives
//! their new rows; keys among them not produced any more are deleted. A
//! restricted result holding one key twice falls back to the full
//! recompute (the "later row wins" order is the full query's).
//!
//! `map` and `list` views ([`analyze_ordered`]) use the same analysis with
//! a row identity in place of the key: the affected identities' rows are
//! recomputed and patched into the stored, ordered rows of the entry (see
//! [`super::ordered`]).

use std::collections::HashSet;

use rusqlite::Connection;
use rusqlite::types::Value;

use super::template::KeyTemplate;
use crate::replica::tables::quote_ident;

/// One column of the key tuple.
#[derive(Debug, Clone)]
pub struct TupleCol {
    /// Index in the view's result.
    pub output: usize,
    /// Index in K's replica columns.
    pub k_index: usize,
    pub k_name: String,
}

/// A table other than K whose changes map to K rows.
#[derive(Debug, Clone)]
pub struct Link {
    /// `TableRef::sqlite_name()` of T.
    pub table: String,
    /// T's column in the equality.
    pub t_index: usize,
    pub t_col: String,
    /// K's column in the equality.
    pub k_col: String,
    /// TEMP table holding the changed T rows' values of that column.
    pub values_table: String,
    /// Fills the keys table with the tuples of the K rows linked to them.
    pub fill_sql: String,
    pub insert_sql: String,
    pub clear_sql: String,
    pub create_sql: String,
    /// `T.c = K.d`, for the log.
    pub shown: String,
}

/// How to maintain one view incrementally.
#[derive(Debug, Clone)]
pub struct IvmPlan {
    /// `sqlite_name` of K.
    pub key_table: String,
    pub tuple: Vec<TupleCol>,
    pub links: Vec<Link>,
    /// Tables read whose changes recompute in full, with why.
    pub unlinked: Vec<(String, String)>,
    pub create_sql: String,
    pub clear_sql: String,
    pub insert_sql: String,
    pub distinct_sql: String,
    pub restricted_sql: String,
    /// The view's query restricted to one key tuple given as parameters
    /// `?1…` and compared with `IS`: the rows of a tuple holding a NULL,
    /// which `restricted_sql`'s `IN` never matches (a full computation
    /// rejects such rows; so must the incremental path).
    pub restricted_null_sql: String,
    /// The restricted query's plan does not SEARCH K (no usable index):
    /// still correct, not faster.
    pub scans_key_table: bool,
    /// `map`/`list` views: the `ORDER BY` result columns (index, DESC) by
    /// which the stored rows are kept in order and patched. Empty for `row`.
    pub order: Vec<(usize, bool)>,
}

impl IvmPlan {
    /// One line for the start-up log and `tailcache check`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "incremental{}: key table {} ({})",
            if self.order.is_empty() { "" } else { ", the entry patched in place" },
            self.key_table,
            self.tuple.iter().map(|t| t.k_name.as_str()).collect::<Vec<_>>().join(", ")
        );
        for l in &self.links {
            s.push_str(&format!("; {} via {}", l.table, l.shown));
        }
        for (t, why) in &self.unlinked {
            s.push_str(&format!("; changes to {t} recompute in full ({why})"));
        }
        if self.scans_key_table {
            s.push_str("; note: the restricted query scans the key table (SQLite did not push the key filter down)");
        }
        s
    }

    /// Whether a change to `table` can be handled incrementally.
    pub fn handles(&self, table: &str) -> bool {
        table == self.key_table || self.links.iter().any(|l| l.table == table)
    }

    /// Renders the key of one tuple (values in tuple order).
    pub fn render(&self, key: &KeyTemplate, prefix: &str, tuple: &[Value], out: &mut String) -> bool {
        let get = |i: usize| {
            self.tuple
                .iter()
                .position(|t| t.output == i)
                .and_then(|p| tuple.get(p))
                .map(rusqlite::types::ValueRef::from)
        };
        key.render(prefix, get, out).is_ok()
    }
}

// ---------------------------------------------------------------------------
// Tokens

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// Identifier or keyword, lower-cased; `true` when quoted.
    Word(String, bool),
    Str(String),
    Num,
    Punct(String),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// Byte offset of the token in the query text.
    start: usize,
    /// Index of the innermost enclosing `(` token; `usize::MAX` at the top.
    group: usize,
}

const TOP: usize = usize::MAX;

fn tokenize(sql: &str) -> Option<Vec<Token>> {
    let b = sql.as_bytes();
    let mut out: Vec<Token> = Vec::new();
    let mut stack: Vec<usize> = Vec::new();
    let mut i = 0;
    let group = |stack: &Vec<usize>| stack.last().copied().unwrap_or(TOP);
    while i < b.len() {
        let c = b[i];
        let at = i;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if c == b'\'' || c == b'"' || c == b'`' || c == b'[' {
            let close = if c == b'[' { b']' } else { c };
            let mut j = i + 1;
            let mut text = Vec::new();
            loop {
                if j >= b.len() {
                    return None;
                }
                if b[j] == close {
                    if close != b']' && b.get(j + 1) == Some(&close) {
                        text.push(close);
                        j += 2;
                        continue;
                    }
                    break;
                }
                text.push(b[j]);
                j += 1;
            }
            let text = String::from_utf8_lossy(&text).into_owned();
            let tok = if c == b'\'' { Tok::Str(text) } else { Tok::Word(text.to_lowercase(), true) };
            out.push(Token { tok, start: at, group: group(&stack) });
            i = j + 1;
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80) {
                i += 1;
            }
            out.push(Token { tok: Tok::Word(sql[s..i].to_lowercase(), false), start: at, group: group(&stack) });
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            out.push(Token { tok: Tok::Num, start: at, group: group(&stack) });
        } else if c == b'(' {
            out.push(Token { tok: Tok::Punct("(".into()), start: at, group: group(&stack) });
            stack.push(out.len() - 1);
            i += 1;
        } else if c == b')' {
            stack.pop()?;
            out.push(Token { tok: Tok::Punct(")".into()), start: at, group: group(&stack) });
            i += 1;
        } else {
            let two = &b[i..(i + 2).min(b.len())];
            let p = if matches!(two, b"==" | b"!=" | b"<>" | b"<=" | b">=" | b"||" | b"<<" | b">>" | b"->") {
                i += 2;
                String::from_utf8_lossy(two).into_owned()
            } else {
                i += 1;
                (c as char).to_string()
            };
            out.push(Token { tok: Tok::Punct(p), start: at, group: group(&stack) });
        }
    }
    if !stack.is_empty() {
        return None;
    }
    Some(out)
}

fn kw(t: Option<&Token>, k: &str) -> bool {
    matches!(t, Some(Token { tok: Tok::Word(w, false), .. }) if w == k)
}

fn punct(t: Option<&Token>, p: &str) -> bool {
    matches!(t, Some(Token { tok: Tok::Punct(x), .. }) if x == p)
}

fn word(t: Option<&Token>) -> Option<&str> {
    match t {
        Some(Token { tok: Tok::Word(w, _), .. }) => Some(w),
        _ => None,
    }
}

/// Words that end a table reference rather than name its alias.
const NOT_ALIAS: &[&str] = &[
    "on",
    "using",
    "join",
    "left",
    "right",
    "full",
    "inner",
    "cross",
    "natural",
    "outer",
    "where",
    "group",
    "order",
    "having",
    "limit",
    "window",
    "union",
    "intersect",
    "except",
    "indexed",
    "not",
    "as",
];

const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "total",
    "avg",
    "min",
    "max",
    "group_concat",
    "string_agg",
    "json_group_array",
    "json_group_object",
    "jsonb_group_array",
    "jsonb_group_object",
    "median",
    "percentile",
    "percentile_cont",
    "percentile_disc",
];

/// A table reference: where it is and the names that qualify its columns.
struct TableRef {
    at: usize,
    group: usize,
    quals: Vec<String>,
}

/// References to table `name`: words equal to it not followed by `.`.
fn table_refs(toks: &[Token], name: &str) -> Vec<TableRef> {
    let name = name.to_lowercase();
    let mut out = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        let Tok::Word(w, _) = &t.tok else { continue };
        // `x AS name` names a result column or another table's alias.
        if *w != name || punct(toks.get(i + 1), ".") || (i > 0 && kw(toks.get(i - 1), "as")) {
            continue;
        }
        let mut quals = vec![name.clone()];
        let alias = if kw(toks.get(i + 1), "as") {
            word(toks.get(i + 2))
        } else {
            match toks.get(i + 1) {
                Some(Token { tok: Tok::Word(a, q), .. }) if *q || !NOT_ALIAS.contains(&a.as_str()) => Some(a.as_str()),
                _ => None,
            }
        };
        if let Some(a) = alias {
            // With an alias, the table's own name no longer qualifies.
            quals = vec![a.to_owned()];
        }
        out.push(TableRef { at: i, group: t.group, quals });
    }
    out
}

/// A column reference ending at or starting at a token: (qualifier, column).
fn col_before(toks: &[Token], end: usize) -> Option<(Option<String>, String, usize)> {
    let c = word(toks.get(end))?.to_owned();
    if end >= 2 && punct(toks.get(end - 1), ".") {
        let q = word(toks.get(end - 2))?.to_owned();
        if end >= 3 && punct(toks.get(end - 3), ".") {
            return None;
        }
        Some((Some(q), c, end - 2))
    } else {
        Some((None, c, end))
    }
}

fn col_after(toks: &[Token], start: usize) -> Option<(Option<String>, String, usize)> {
    let a = word(toks.get(start))?.to_owned();
    if punct(toks.get(start + 1), ".") {
        let c = word(toks.get(start + 2))?.to_owned();
        if punct(toks.get(start + 3), ".") {
            return None;
        }
        Some((Some(a), c, start + 2))
    } else {
        Some((None, a, start))
    }
}

/// Columns (name, declared type) of a replica table.
fn table_columns(conn: &Connection, db: &str, table: &str) -> Vec<(String, String)> {
    let Ok(mut st) = conn.prepare("SELECT name, type FROM pragma_table_info(?1, ?2) ORDER BY cid") else {
        return Vec::new();
    };
    st.query_map([table, db], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .and_then(|it| it.collect())
        .unwrap_or_default()
}

fn split_name(sqlite_name: &str) -> (&str, &str) {
    match sqlite_name.split_once('.') {
        Some((db, t)) => (db, t),
        None => ("main", sqlite_name),
    }
}

fn qualified_sql(sqlite_name: &str) -> String {
    let (db, t) = split_name(sqlite_name);
    format!("{}.{}", quote_ident(db), quote_ident(t))
}

/// Works out whether (and how) a `row` view is maintained incrementally;
/// `Err` says why not. `reads` are the watched tables the query reads
/// (sqlite names), `name` the view's, for its TEMP tables.
pub fn analyze(
    conn: &Connection,
    name: &str,
    query: &str,
    columns: &[String],
    key: &KeyTemplate,
    reads: &[String],
) -> Result<IvmPlan, String> {
    analyze_tuple(conn, name, query, columns, &key.placeholder_columns(), reads)
}

/// Works out whether a `map` or `list` view can be patched in place rather
/// than rebuilt (see [`super::ordered`]); `Err` says why not.
///
/// The entry's rows must be in an order tailcache can reproduce: the top
/// level ends in `ORDER BY` terms that are each a result column's name
/// (optionally `ASC`/`DESC`), with no `COLLATE` anywhere (the replica's
/// columns are all BINARY), so rows compare by their output values as
/// SQLite compares them. The row identity (the key tuple of the key-table
/// analysis) is the `map_key` column for a map, and for a list the
/// `ORDER BY` columns taken unchanged from the last such term's table; it must be among the
/// `ORDER BY` columns, so that distinct rows never tie.
pub fn analyze_ordered(
    conn: &Connection,
    name: &str,
    query: &str,
    columns: &[String],
    map_key: Option<usize>,
    reads: &[String],
) -> Result<IvmPlan, String> {
    let toks = tokenize(query).ok_or("the query could not be tokenized")?;
    if toks.iter().any(|t| matches!(&t.tok, Tok::Word(w, false) if w == "collate")) {
        return Err("the query uses COLLATE (rows are ordered by their values, BINARY)".into());
    }
    let order_at = (0..toks.len())
        .rev()
        .find(|&i| toks[i].group == TOP && kw(toks.get(i), "order") && kw(toks.get(i + 1), "by"))
        .ok_or("no ORDER BY at the top level (the order of the rows is SQLite's choice)")?;
    let mut order = Vec::new();
    let mut i = order_at + 2;
    while i < toks.len() {
        let Some(Token { tok: Tok::Word(w, _), .. }) = toks.get(i) else {
            return Err("an ORDER BY term is not a result column's name".into());
        };
        if punct(toks.get(i + 1), ".") {
            return Err("an ORDER BY term is qualified (use a result column's name)".into());
        }
        let col = columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(w))
            .ok_or_else(|| format!("ORDER BY {w} is not a result column"))?;
        i += 1;
        let desc = if kw(toks.get(i), "desc") {
            i += 1;
            true
        } else {
            if kw(toks.get(i), "asc") {
                i += 1;
            }
            false
        };
        if kw(toks.get(i), "nulls") {
            return Err("ORDER BY … NULLS FIRST/LAST".into());
        }
        order.push((col, desc));
        match toks.get(i) {
            None => break,
            Some(t) if punct(Some(t), ",") => i += 1,
            Some(_) => return Err("the ORDER BY clause is not a list of result column names".into()),
        }
    }
    let identity: Vec<usize> = match map_key {
        Some(mk) => {
            if !order.iter().any(|(c, _)| *c == mk) {
                return Err(format!("map_key {:?} is not among the ORDER BY columns", columns[mk]));
            }
            vec![mk]
        }
        None => {
            // The ORDER BY columns taken from one table: the last term's
            // (usually the tie-breaker, so the identity is unique).
            let stmt = conn.prepare(query).map_err(|e| format!("query does not prepare: {e}"))?;
            let meta: Vec<Option<(String, String)>> = stmt
                .columns_with_metadata()
                .map(|m| match (m.database_name(), m.table_name(), m.origin_name()) {
                    (Some(d), Some(t), Some(_)) => Some((d.to_lowercase(), t.to_lowercase())),
                    _ => None,
                })
                .collect();
            drop(stmt);
            let first = order
                .iter()
                .rev()
                .find_map(|(c, _)| meta.get(*c).cloned().flatten())
                .ok_or("no ORDER BY column is a table's column")?;
            order
                .iter()
                .filter(|(c, _)| meta.get(*c).cloned().flatten().as_ref() == Some(&first))
                .map(|(c, _)| *c)
                .collect()
        }
    };
    let mut plan = analyze_tuple(conn, name, query, columns, &identity, reads)?;
    plan.order = order;
    Ok(plan)
}

fn analyze_tuple(
    conn: &Connection,
    name: &str,
    query: &str,
    columns: &[String],
    placeholders: &[usize],
    reads: &[String],
) -> Result<IvmPlan, String> {
    let toks = tokenize(query).ok_or("the query could not be tokenized")?;
    for (i, t) in toks.iter().enumerate() {
        match &t.tok {
            Tok::Word(w, false) => {
                let w = w.as_str();
                if matches!(w, "union" | "intersect" | "except") {
                    return Err("compound SELECT (UNION/INTERSECT/EXCEPT)".into());
                }
                if matches!(w, "with" | "recursive") {
                    return Err("common table expression (WITH)".into());
                }
                if matches!(w, "over" | "window") {
                    return Err("window function".into());
                }
                if matches!(
                    w,
                    "random"
                        | "randomblob"
                        | "changes"
                        | "total_changes"
                        | "last_insert_rowid"
                        | "current_timestamp"
                        | "current_date"
                        | "current_time"
                ) {
                    return Err(format!("non-deterministic function {w}"));
                }
                if t.group == TOP && matches!(w, "limit" | "offset") {
                    return Err("LIMIT/OFFSET at the top level".into());
                }
            }
            Tok::Str(s) if s.eq_ignore_ascii_case("now") => {
                return Err("non-deterministic 'now'".into());
            }
            _ => {}
        }
        let _ = i;
    }

    // The key table: origin of every placeholder column.
    let stmt = conn.prepare(query).map_err(|e| format!("query does not prepare: {e}"))?;
    let meta: Vec<(Option<String>, Option<String>, Option<String>)> = stmt
        .columns_with_metadata()
        .map(|m| {
            (
                m.database_name().map(str::to_owned),
                m.table_name().map(str::to_owned),
                m.origin_name().map(str::to_owned),
            )
        })
        .collect();
    drop(stmt);
    let mut key_table: Option<(String, String)> = None;
    let mut origin_cols = Vec::new();
    for &p in placeholders {
        let (Some(db), Some(table), Some(col)) = meta.get(p).cloned().unwrap_or((None, None, None)) else {
            return Err(format!("key column {:?} is computed, not a column of one table", columns[p]));
        };
        match &key_table {
            None => key_table = Some((db, table)),
            Some((d, t)) if d.eq_ignore_ascii_case(&db) && t.eq_ignore_ascii_case(&table) => {}
            Some(_) => return Err("the key columns come from more than one table".into()),
        }
        origin_cols.push((p, col));
    }
    let Some((k_db, k_table)) = key_table else { return Err("the key has no placeholder".into()) };
    let k_name = reads
        .iter()
        .find(|r| {
            let (d, t) = split_name(r);
            d.eq_ignore_ascii_case(&k_db) && t.eq_ignore_ascii_case(&k_table)
        })
        .cloned()
        .ok_or_else(|| format!("key table {k_table} is not among the watched tables read"))?;
    let k_refs = table_refs(&toks, &k_table);
    if k_refs.len() != 1 {
        return Err(format!(
            "key table {k_name} is named {} times in the query (must be read exactly once)",
            k_refs.len()
        ));
    }
    let k_ref = &k_refs[0];
    if k_ref.group != TOP {
        return Err(format!("key table {k_name} is not in the top-level FROM"));
    }
    let k_cols = table_columns(conn, &k_db, &k_table);
    let mut tuple = Vec::new();
    for (output, col) in &origin_cols {
        let k_index = k_cols
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(col))
            .ok_or_else(|| format!("key column {col} not found in {k_name}"))?;
        tuple.push(TupleCol { output: *output, k_index, k_name: k_cols[k_index].0.clone() });
    }

    // Aggregates at the top level: only grouped by every key column.
    let top = |i: usize| toks[i].group == TOP;
    let group_at = (0..toks.len()).find(|&i| top(i) && kw(toks.get(i), "group") && kw(toks.get(i + 1), "by"));
    match group_at {
        Some(g) => {
            let end = (g + 2..toks.len())
                .find(|&i| top(i) && ["having", "order", "limit", "window"].iter().any(|k| kw(toks.get(i), k)))
                .unwrap_or(toks.len());
            for t in &tuple {
                let col = t.k_name.to_lowercase();
                let out_name = columns[t.output].to_lowercase();
                let grouped = (g + 2..end).filter(|&i| top(i)).any(|i| match col_after(&toks, i) {
                    Some((Some(q), c, _)) => c == col && k_ref.quals.contains(&q),
                    Some((None, c, at)) => {
                        c == col && c == out_name && !(i > 0 && punct(toks.get(i - 1), ".")) && at == i
                    }
                    None => false,
                });
                if !grouped {
                    return Err(format!("GROUP BY does not list key column {}", t.k_name));
                }
            }
        }
        None => {
            let agg = (0..toks.len()).any(|i| {
                top(i)
                    && (kw(toks.get(i), "having")
                        || (word(toks.get(i)).is_some_and(|w| AGGREGATES.contains(&w)) && punct(toks.get(i + 1), "(")))
            });
            if agg {
                return Err("aggregate without GROUP BY at the top level".into());
            }
        }
    }

    let h = xxhash_rust::xxh3::xxh3_64(format!("{name}\u{0}{query}").as_bytes());
    let keys_table = format!("_tailcache_ivm_{h:016x}");
    let decls: Vec<String> =
        tuple.iter().enumerate().map(|(n, t)| format!("k{n} {}", k_cols[t.k_index].1).trim_end().to_owned()).collect();
    let knames: Vec<String> = (0..tuple.len()).map(|n| format!("k{n}")).collect();
    let create_sql = format!("CREATE TEMP TABLE IF NOT EXISTS {} ({})", quote_ident(&keys_table), decls.join(", "));
    let clear_sql = format!("DELETE FROM temp.{}", quote_ident(&keys_table));
    let params: Vec<String> = (1..=tuple.len()).map(|i| format!("?{i}")).collect();
    let insert_sql = format!("INSERT INTO temp.{} VALUES ({})", quote_ident(&keys_table), params.join(", "));
    let distinct_sql = format!("SELECT DISTINCT {} FROM temp.{}", knames.join(", "), quote_ident(&keys_table));
    let outs: Vec<String> = tuple.iter().map(|t| format!("_tailcache_q.{}", quote_ident(&columns[t.output]))).collect();
    // The same with the key tuple as parameters compared with `IS`, for a
    // tuple holding a NULL (which `IN` never matches).
    let is_params = |cols: &[String]| {
        cols.iter().enumerate().map(|(n, c)| format!("{c} IS ?{}", n + 1)).collect::<Vec<_>>().join(" AND ")
    };
    // A GROUP BY over the key columns hides the outer filter from SQLite's
    // planner (it does not push it into an aggregate), so filter K's rows
    // before grouping too: a group is made of the K rows carrying its key.
    let body = |null_aware: bool| match group_at {
        Some(g) => {
            let q = k_ref.quals.last().cloned().unwrap_or_else(|| k_table.clone());
            let cols: Vec<String> =
                tuple.iter().map(|t| format!("{}.{}", quote_ident(&q), quote_ident(&t.k_name))).collect();
            let filter = if null_aware {
                format!("({})", is_params(&cols))
            } else {
                format!(
                    "({}) IN (SELECT {} FROM temp.{})",
                    cols.join(", "),
                    knames.join(", "),
                    quote_ident(&keys_table)
                )
            };
            // Token offsets are into `query` itself, not the trimmed body.
            let g_at = toks[g].start;
            let tail = query[g_at..].trim_end().trim_end_matches(';');
            match (0..g).find(|&i| top(i) && kw(toks.get(i), "where")) {
                Some(w) => {
                    let w_end = toks[w].start + "where".len();
                    format!("{} {filter} AND ({}\n) {tail}", &query[..w_end], &query[w_end..g_at])
                }
                None => format!("{}\nWHERE {filter} {tail}", &query[..g_at]),
            }
        }
        None => query.trim().trim_end_matches(';').to_owned(),
    };
    let restricted_sql = format!(
        "SELECT * FROM ({}\n) AS _tailcache_q WHERE ({}) IN (SELECT {} FROM temp.{})",
        body(false),
        outs.join(", "),
        knames.join(", "),
        quote_ident(&keys_table)
    );
    let restricted_null_sql = format!("SELECT * FROM ({}\n) AS _tailcache_q WHERE {}", body(true), is_params(&outs));

    // Other tables: a link T.c = K.d in T's scope.
    let all_refs: Vec<(String, Vec<TableRef>)> =
        reads.iter().map(|r| (r.clone(), table_refs(&toks, split_name(r).1))).collect();
    let mut links = Vec::new();
    let mut unlinked = Vec::new();
    for (t_name, refs) in &all_refs {
        if *t_name == k_name {
            continue;
        }
        match find_link(&toks, refs, k_ref, &all_refs, &k_name) {
            Ok((t_col, k_col)) => {
                let (t_db, t_table) = split_name(t_name);
                let t_cols = table_columns(conn, t_db, t_table);
                let (Some(t_index), Some(k_index)) = (
                    t_cols.iter().position(|(n, _)| n.eq_ignore_ascii_case(&t_col)),
                    k_cols.iter().position(|(n, _)| n.eq_ignore_ascii_case(&k_col)),
                ) else {
                    unlinked.push((t_name.clone(), format!("{t_col} = {k_col}: column not found")));
                    continue;
                };
                let values_table = format!("{keys_table}_{}", links.len());
                let kt: Vec<String> = tuple.iter().map(|t| format!("_k.{}", quote_ident(&t.k_name))).collect();
                let fill_sql = format!(
                    "INSERT INTO temp.{} SELECT {} FROM {} AS _k WHERE _k.{} IN (SELECT v FROM temp.{})",
                    quote_ident(&keys_table),
                    kt.join(", "),
                    qualified_sql(&k_name),
                    quote_ident(&k_cols[k_index].0),
                    quote_ident(&values_table)
                );
                links.push(Link {
                    table: t_name.clone(),
                    t_index,
                    t_col: t_cols[t_index].0.clone(),
                    k_col: k_cols[k_index].0.clone(),
                    create_sql: format!(
                        "CREATE TEMP TABLE IF NOT EXISTS {} ({})",
                        quote_ident(&values_table),
                        format!("v {}", t_cols[t_index].1).trim_end()
                    ),
                    clear_sql: format!("DELETE FROM temp.{}", quote_ident(&values_table)),
                    insert_sql: format!("INSERT INTO temp.{} VALUES (?1)", quote_ident(&values_table)),
                    values_table,
                    fill_sql,
                    shown: format!("{t_name}.{} = {k_name}.{}", t_cols[t_index].0, k_cols[k_index].0),
                });
            }
            Err(why) => unlinked.push((t_name.clone(), why)),
        }
    }

    // The lookups the incremental path makes must be index searches, or a
    // one-row commit costs a scan of the table: K by its key columns (the
    // restricted query) and by each link column (the fill), and each linked
    // table by its link column (the correlated subquery or join, per key).
    let mut wanted: Vec<(String, Vec<String>)> =
        vec![(k_name.clone(), tuple.iter().map(|t| t.k_name.clone()).collect())];
    for l in &links {
        wanted.push((l.table.clone(), vec![l.t_col.clone()]));
        wanted.push((k_name.clone(), vec![l.k_col.clone()]));
    }
    for (table, cols) in &wanted {
        ensure_index(conn, table, cols);
    }

    // Does SQLite push the key filter down to K?
    let mut scans_key_table = true;
    // Recompiled (after DDL): the TEMP tables follow the new column types.
    let mut drop_sql = format!("DROP TABLE IF EXISTS temp.{};", quote_ident(&keys_table));
    for l in &links {
        drop_sql.push_str(&format!("DROP TABLE IF EXISTS temp.{};", quote_ident(&l.values_table)));
    }
    let _ = conn.execute_batch(&drop_sql);
    // Every TEMP table exists after a compile: a publish creates them only
    // when it has not seen their statement on this connection yet.
    for l in &links {
        let _ = conn.execute_batch(&l.create_sql);
    }
    if conn.execute_batch(&create_sql).is_ok() {
        if let Ok(mut st) = conn.prepare(&format!("EXPLAIN QUERY PLAN {restricted_sql}")) {
            let details: Vec<String> =
                st.query_map([], |r| r.get::<_, String>(3)).and_then(|it| it.collect()).unwrap_or_default();
            let names: Vec<String> =
                k_ref.quals.iter().chain(std::iter::once(&k_table.to_lowercase())).cloned().collect();
            scans_key_table = !details.iter().any(|d| {
                let d = d.to_lowercase();
                d.starts_with("search ") && names.iter().any(|n| d[7..].starts_with(&format!("{n} ")))
            });
        }
    }
    Ok(IvmPlan {
        key_table: k_name,
        tuple,
        links,
        unlinked,
        create_sql,
        clear_sql,
        insert_sql,
        distinct_sql,
        restricted_sql,
        restricted_null_sql,
        scans_key_table,
        order: Vec::new(),
    })
}

/// Creates, in the replica, an index on `table (cols)` unless one (or the
/// rowid) already leads with those columns. The index only speeds the
/// incremental path up, so a failure (e.g. the applier held the write lock
/// past the busy timeout) is logged, not fatal; the view stays correct.
fn ensure_index(conn: &Connection, sqlite_table: &str, cols: &[String]) {
    let (db, table) = split_name(sqlite_table);
    let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    // An INTEGER PRIMARY KEY column is the rowid itself.
    let rowid_pk = conn
        .prepare("SELECT name, type, pk FROM pragma_table_info(?1, ?2)")
        .and_then(|mut st| {
            st.query_map([table, db], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        })
        .unwrap_or_default();
    let pks: Vec<_> = rowid_pk.iter().filter(|c| c.2 > 0).collect();
    if let [(n, ty, _)] = pks.as_slice() {
        if same(ty, "INTEGER") && same(n, &cols[0]) {
            return;
        }
    }
    let leading: Vec<Vec<String>> = conn
        .prepare(
            "SELECT il.name, ii.name FROM pragma_index_list(?1, ?2) AS il, pragma_index_info(il.name, ?2) AS ii ORDER BY il.name, ii.seqno",
        )
        .and_then(|mut st| {
            let rows: Vec<(String, Option<String>)> = st
                .query_map([table, db], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|it| it.collect())?;
            let mut out: Vec<(String, Vec<String>)> = Vec::new();
            for (ix, col) in rows {
                match out.last_mut() {
                    Some((name, cs)) if *name == ix => cs.push(col.unwrap_or_default()),
                    _ => out.push((ix, vec![col.unwrap_or_default()])),
                }
            }
            Ok(out.into_iter().map(|(_, cs)| cs).collect())
        })
        .unwrap_or_default();
    if leading.iter().any(|ix| ix.len() >= cols.len() && ix.iter().zip(cols).all(|(a, b)| same(a, b))) {
        return;
    }
    let h = xxhash_rust::xxh3::xxh3_64(format!("{table}\u{0}{}", cols.join("\u{0}").to_lowercase()).as_bytes());
    let sql = format!(
        "CREATE INDEX IF NOT EXISTS {}.{} ON {} ({})",
        quote_ident(db),
        quote_ident(&format!("_tailcache_ix_{h:016x}")),
        quote_ident(table),
        cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
    );
    match conn.execute_batch(&sql) {
        Ok(()) => {
            tracing::info!(table = %sqlite_table, columns = %cols.join(", "), "replica index for incremental view maintenance")
        }
        Err(e) => {
            tracing::warn!(table = %sqlite_table, columns = %cols.join(", "), error = %e, "could not create a replica index; incremental recomputes of this view scan the table")
        }
    }
}

/// Finds `T.c = K.d` as a conjunct of T's scope: (c, d).
fn find_link(
    toks: &[Token],
    t_refs: &[TableRef],
    k_ref: &TableRef,
    all: &[(String, Vec<TableRef>)],
    k_name: &str,
) -> Result<(String, String), String> {
    if t_refs.len() != 1 {
        return Err(format!("named {} times in the query", t_refs.len()));
    }
    let t = &t_refs[0];
    let g = t.group;
    // K's qualifiers must not be reused by another table.
    for (name, refs) in all {
        for r in refs {
            if r.at != k_ref.at && r.quals.iter().any(|q| k_ref.quals.contains(q)) {
                return Err(format!("{name} shares a qualifier with {k_name}"));
            }
        }
    }
    let in_group = |i: usize| toks.get(i).is_some_and(|x| x.group == g);
    if (0..toks.len()).any(|i| in_group(i) && (kw(toks.get(i), "or") || kw(toks.get(i), "between"))) {
        return Err("its scope has OR/BETWEEN".into());
    }
    let tables_in_group = all.iter().flat_map(|(_, rs)| rs.iter()).filter(|r| r.group == g).count();
    let resolve = |q: &Option<String>| -> Option<bool> {
        // Some(true): T's column; Some(false): K's column.
        match q {
            Some(q) if t.quals.contains(q) => Some(true),
            Some(q) if k_ref.quals.contains(q) => Some(false),
            None if tables_in_group == 1 => Some(true),
            _ => None,
        }
    };
    for i in 0..toks.len() {
        if !(in_group(i) && (punct(toks.get(i), "=") || punct(toks.get(i), "=="))) || i == 0 {
            continue;
        }
        let (Some(l), Some(r)) = (col_before(toks, i - 1), col_after(toks, i + 1)) else { continue };
        let (start, end) = (l.2, r.2);
        if !(start..=end).all(in_group) {
            continue;
        }
        let before_ok = start > 0 && ["where", "on", "and"].iter().any(|k| kw(toks.get(start - 1), k));
        let after = toks.get(end + 1);
        let after_ok = after.is_none()
            || punct(after, ")")
            || punct(after, ",")
            || [
                "and", "group", "order", "having", "limit", "join", "left", "right", "full", "inner", "cross",
                "natural", "where", "window",
            ]
            .iter()
            .any(|k| kw(after, k));
        if !(before_ok && after_ok) {
            continue;
        }
        match (resolve(&l.0), resolve(&r.0)) {
            (Some(true), Some(false)) => return Ok((l.1, r.1)),
            (Some(false), Some(true)) => return Ok((r.1, l.1)),
            _ => {}
        }
    }
    Err(format!("no conjunct `<column> = {k_name}.<column>` in its scope"))
}

/// The tuples affected by `delta` rows of K: each image's key columns.
pub fn key_tuples<'a>(
    plan: &'a IvmPlan,
    rows: impl Iterator<Item = &'a [Value]> + 'a,
) -> impl Iterator<Item = Vec<&'a Value>> + 'a {
    rows.map(move |r| plan.tuple.iter().map(|t| r.get(t.k_index).unwrap_or(&Value::Null)).collect())
}

/// Distinct values, for link tables.
pub fn distinct_values<'a>(rows: impl Iterator<Item = &'a [Value]>, index: usize) -> Vec<&'a Value> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for r in rows {
        if let Some(v) = r.get(index) {
            let k = format!("{v:?}");
            if seen.insert(k) {
                out.push(v);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_tracks_groups_and_skips_strings_and_comments() {
        let t = tokenize("SELECT a.id, (SELECT 'x(' FROM f WHERE f.a = a.id) -- )\n FROM app a").unwrap();
        let groups: Vec<usize> = t.iter().map(|t| t.group).collect();
        assert_eq!(groups[0], TOP);
        assert!(groups.iter().filter(|&&g| g != TOP).count() >= 8);
        assert_eq!(t.last().map(|t| t.group), Some(TOP));
        assert!(tokenize("SELECT (").is_none());
    }
}
