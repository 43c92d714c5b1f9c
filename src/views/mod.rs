//! Views: SQL over the replica, turned into cache entries.
//!
//! Each `[[views]]` entry is a query over the replica (tables named like the
//! MySQL tables; `schema.table` for watched tables of another schema) plus
//! a key template and a shape. [`ViewSet::compile`] checks every view
//! against the replica schema before anything runs; [`ViewSet::compute`]
//! runs one inside the caller's read transaction and builds its entries;
//! [`published`] diffs them against what memcached was last given;
//! [`publisher`] runs the whole loop.
//!
//! # Encoding contract
//!
//! **Rows.** A row is a msgpack *map* from column name (str) to value, in
//! the query's column order. SQLite INTEGER → int (smallest msgpack
//! representation), REAL → float64, TEXT → str (invalid UTF-8 replaced by
//! U+FFFD), BLOB → bin, NULL → nil. MySQL DECIMAL arrives as TEXT (e.g.
//! `"12.50"`, exact), DATETIME/TIMESTAMP as TEXT (`"2024-05-01 12:00:00.123456"`).
//!
//! **JSON columns.** A column listed in `json_columns` holds JSON text
//! (e.g. built with `json_object`/`json_group_array`) and is written as
//! nested msgpack: object → map keeping the document's key order, array →
//! array, true/false → bool, integers (within i64, or u64) → int, other
//! numbers → float64, string → str, null → nil. A NULL column value → nil;
//! an INTEGER/REAL value (e.g. from `json_extract`) → that number. Text that
//! is not valid JSON (or a BLOB) is an error naming the view, key and
//! column: that entry is not written.
//!
//! **`value_column`.** When set, each row is replaced by that column's
//! value alone (encoded as above) instead of the row map.
//!
//! **Shapes.**
//! * `row`: one entry per row, key from the template's `{column}`s. Two rows
//!   rendering the same key: the later row (in query order) wins (a view
//!   published in pieces writes each such row in turn, the later last; see
//!   [`published::Sweep`]).
//! * `list`: one entry, an array of the rows in query order (empty array
//!   for no rows).
//! * `map`: one entry, a map from the `map_key` column's value (encoded as
//!   above: int, float64 or str) to the row. Duplicate map keys: the later
//!   row's value wins, at the position of the first occurrence (what
//!   building a Python dict in query order gives). A NULL or BLOB `map_key`
//!   value is an error: the entry is not written.
//!
//! **Codecs** (`memcached.codec`); client flags 0 unless said otherwise:
//! * `msgpack`: the bytes above.
//! * `dogpile`: dogpile.cache's `CachedValue` as its msgpack proxy stores
//!   it: a 2-array `[value, {"ct": <unix time as float64>, "v": 2}]`, where
//!   `ct` is when tailcache computed the entry and 2 is dogpile's
//!   `value_version`. Read with `CachedValue(*msgpack.unpackb(b))`.
//! * `json`: UTF-8 JSON of the same value: maps → objects (a non-string
//!   map key becomes a string of its JSON text: `1` → `"1"`), BLOB →
//!   standard base64 string with padding, non-finite floats → `null`.
//!   Client flags 2 (`FLAG_JSON`, the flag of pymemcache's documented
//!   `JsonSerde`).
//! * `pickle`: a Python pickle (protocol 3, plain data only) of the same
//!   value: map → dict, array → list, str → str, bin → bytes, int → int,
//!   float → float, nil → None. Client flags 1, the "pickled" flag of
//!   pymemcache, pylibmc and python-memcached, so Django's
//!   `PyMemcacheCache`/`PyLibMCCache` and those clients' default
//!   deserializers return the dict.
//!
//! **Keys.** `memcached.key_prefix` + the rendered template (see
//! [`template`]). A NULL or BLOB placeholder value, or a key over 250 bytes
//! or containing whitespace/control characters: the entry is not written.
//!
//! **Size.** An entry is written only when
//! `key bytes + value bytes + ITEM_OVERHEAD (`[`ITEM_OVERHEAD`]` = 96) <=
//! memcached.max_item_size`, the overhead covering memcached's item header,
//! CAS and CRLF (about 60 bytes in memcached 1.6), so a value tailcache
//! accepts is never refused with "object too large".
//!
//! **Rejected entries** (any of the above): an error is logged (at most 10
//! lines a minute, the rest counted in the next line) naming the
//! view, the key (when there is one) and the size or column, the
//! `tailcache_entries_rejected_total` counter increments (also shown in
//! `/status` as `entries_rejected`), the rest of the view is still
//! published, and a value published earlier under that key is deleted
//! rather than left stale. The same whether the view is computed in full
//! or maintained incrementally: a changed row the view rejects is reported
//! each time it changes (a full computation reports every rejected row of
//! the view each time it runs).
//!
//! **Change detection.** Each entry's payload (for `dogpile` the inner
//! value, not the timestamped wrapper) is hashed with xxh3-128, salted with
//! the codec and exptime; an entry whose hash equals the published one is
//! not rewritten.

pub mod checkpoint;
pub mod doubt;
pub mod encode;
pub mod incremental;
pub mod inspect;
pub mod ordered;
pub mod orphans;
pub mod published;
pub mod publisher;
pub mod template;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;

use crate::config::{Codec, MemcachedConfig, Shape, TableRef, ViewConfig};
use crate::replica::INTERNAL_PREFIX;
pub use crate::replica::action::ChangeSet;
use encode::{ValueError, mp};
pub use publisher::{Committed, compute_all, spawn_publisher};
use template::{KeyError, KeyTemplate};

/// Bytes memcached needs per item besides key and value (item header, CAS,
/// CRLF, flags); see the size rule in the module docs.
pub const ITEM_OVERHEAD: usize = 96;

/// Distinct key tuples holding a NULL that one incremental computation
/// queries one by one (see [`ViewSet::compute_incremental`]); more
/// recompute the view in full.
const MAX_NULL_TUPLES: usize = 64;

/// Table-valued functions a view may read besides the watched tables.
const ALLOWED_FUNCTIONS: &[&str] = &["json_each", "json_tree", "jsonb_each", "jsonb_tree"];

/// One problem with one view, found before anything runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewProblem {
    pub view: String,
    pub message: String,
}

impl fmt::Display for ViewProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "view {:?}: {}", self.view, self.message)
    }
}

/// A cache entry ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Full key, prefix included.
    pub key: String,
    /// Encoded with the configured codec.
    pub value: Vec<u8>,
    pub flags: u32,
    /// xxh3-128 of the payload (see the module docs).
    pub hash: [u8; 16],
}

/// An entry that is not written, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryError {
    /// A key placeholder column is NULL or a BLOB.
    KeyColumn { view: String, column: String, kind: &'static str },
    /// The rendered key breaks memcached's rules.
    BadKey { view: String, key: String, reason: String },
    /// The `map_key` column is NULL or a BLOB.
    MapKey { view: String, key: String, column: String, kind: &'static str },
    /// A `json_columns` value is not valid JSON.
    Json { view: String, key: String, column: String, error: String },
    /// The encoded value does not fit `max_item_size`.
    TooLarge { view: String, key: String, size: usize, limit: usize },
}

impl EntryError {
    /// The `reason` label of `tailcache_entries_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            EntryError::KeyColumn { .. } => "key_column",
            EntryError::BadKey { .. } => "bad_key",
            EntryError::MapKey { .. } => "map_key",
            EntryError::Json { .. } => "json",
            EntryError::TooLarge { .. } => "too_large",
        }
    }
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryError::KeyColumn { view, column, kind } => {
                write!(f, "view {view:?}: key column {column:?} is {kind}; the row is not written")
            }
            EntryError::BadKey { view, key, reason } => {
                write!(f, "view {view:?}, key {key:?} ({} bytes): {reason}; the entry is not written", key.len())
            }
            EntryError::MapKey { view, key, column, kind } => {
                write!(f, "view {view:?}, key {key:?}: map_key column {column:?} is {kind}; the entry is not written")
            }
            EntryError::Json { view, key, column, error } => write!(
                f,
                "view {view:?}, key {key:?}: column {column:?} is listed in json_columns but is not valid JSON ({error}); the entry is not written"
            ),
            EntryError::TooLarge { view, key, size, limit } => write!(
                f,
                "view {view:?}, key {key:?}: value is {size} bytes; with the {}-byte key and {ITEM_OVERHEAD} bytes of item overhead it exceeds memcached.max_item_size = {limit}; the entry is not written",
                key.len()
            ),
        }
    }
}

impl EntryError {
    pub fn view(&self) -> &str {
        match self {
            EntryError::KeyColumn { view, .. }
            | EntryError::BadKey { view, .. }
            | EntryError::MapKey { view, .. }
            | EntryError::Json { view, .. }
            | EntryError::TooLarge { view, .. } => view,
        }
    }
}

/// A whole view could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("view {view:?}: query failed: {source}")]
    Sqlite {
        view: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "view {view:?}: the query's result columns changed from ({expected}) to ({found}) since the views were compiled (DDL?) and the view no longer compiles; fix the view or the table, then run `tailcache resync`"
    )]
    ColumnsChanged { view: String, expected: String, found: String },
}

impl From<ViewError> for crate::Error {
    fn from(e: ViewError) -> Self {
        crate::Error::Transient(e.to_string())
    }
}

/// The entries of one view, computed from one replica state.
#[derive(Debug, Clone, Default)]
pub struct ComputedView {
    pub view: String,
    pub entries: Vec<Entry>,
    pub rejected: Vec<EntryError>,
    /// Rows whose key an earlier row of the same view also rendered (row
    /// shape; the later row won).
    pub duplicate_keys: usize,
    /// `Some`: an incremental result, covering only these keys (entries
    /// among them are the view's; published keys among them that are not
    /// entries left the view). `None`: the whole view.
    pub scope: Option<HashSet<String>>,
    /// Computed from the transaction's changed rows only (a `row` view's
    /// affected keys, or a `map`/`list` entry patched in place).
    pub incremental: bool,
}

/// One compiled view.
#[derive(Debug, Clone)]
pub struct CompiledView {
    name: String,
    query: String,
    shape: Shape,
    key: KeyTemplate,
    columns: Vec<String>,
    /// Each column name pre-encoded as a msgpack str.
    column_keys: Vec<Vec<u8>>,
    json: Vec<bool>,
    map_key: Option<usize>,
    value_column: Option<usize>,
    reads: Vec<String>,
    /// How the view is maintained incrementally, or why it is not.
    ivm: Result<incremental::IvmPlan, String>,
}

impl CompiledView {
    /// The incremental plan, or why the view is recomputed in full.
    pub fn incremental(&self) -> Result<&incremental::IvmPlan, &str> {
        self.ivm.as_ref().map_err(String::as_str)
    }

    /// One line for the log and `tailcache check`.
    pub fn maintenance(&self) -> String {
        match &self.ivm {
            Ok(p) => p.describe(),
            Err(why) => format!("full recompute: {why}"),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    /// Result column names, in order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }
    /// Watched tables the query reads, as `TableRef::sqlite_name()`.
    pub fn reads(&self) -> &[String] {
        &self.reads
    }
    pub fn shape(&self) -> Shape {
        self.shape
    }
}

/// Reusable buffers for [`ViewSet::compute`].
#[derive(Debug, Default)]
pub struct Scratch {
    key: String,
    payload: Vec<u8>,
    body: Vec<u8>,
    json: Vec<u8>,
    spans: Vec<(usize, usize, usize, usize)>,
    index: HashMap<u128, usize>,
    /// The stored rows of patchable `map`/`list` views, by view name.
    ordered: HashMap<String, ordered::Rows>,
    /// `CREATE TEMP TABLE IF NOT EXISTS` statements already run on this
    /// connection: parsing one costs more than the rest of a one-row
    /// publish's bookkeeping.
    created: HashSet<String>,
}

impl Scratch {
    /// Runs `create_sql` (an idempotent `CREATE TEMP TABLE IF NOT EXISTS`)
    /// once per connection.
    fn ensure_created(&mut self, conn: &Connection, create_sql: &str) -> rusqlite::Result<()> {
        if !self.created.contains(create_sql) {
            conn.execute_batch(create_sql)?;
            self.created.insert(create_sql.to_owned());
        }
        Ok(())
    }
}

/// All configured views, compiled against the replica schema.
#[derive(Debug, Clone)]
pub struct ViewSet {
    views: Vec<CompiledView>,
    /// Views that did not compile (name, problems, what to do with their
    /// keys); the others run without them.
    broken: Vec<(String, String, crate::config::OnError)>,
    prefix: String,
    codec: Codec,
    exptime: u32,
    max_item_size: usize,
    /// Distinguishes compilations, so that the stored rows of a patchable
    /// view (in [`Scratch`]) are never patched by another compilation's plan.
    generation: u64,
}

static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

struct Access {
    problems: BTreeSet<String>,
    /// (database, table) pairs read.
    reads: BTreeSet<(String, String)>,
}

/// Prepares `sql` on `conn` with an authorizer recording what it touches.
fn prepare_observed(conn: &Connection, sql: &str) -> (rusqlite::Result<(Vec<String>, bool)>, Access) {
    let access = Arc::new(Mutex::new(Access { problems: BTreeSet::new(), reads: BTreeSet::new() }));
    let log = Arc::clone(&access);
    let hook = move |ctx: AuthContext<'_>| {
        if let Ok(mut a) = log.lock() {
            match ctx.action {
                AuthAction::Read { table_name, .. } => {
                    a.reads.insert((ctx.database_name.unwrap_or("main").to_owned(), table_name.to_owned()));
                }
                AuthAction::Select | AuthAction::Function { .. } | AuthAction::Recursive => {}
                other => {
                    a.problems
                        .insert(format!("the query performs {other:?}; a view must be a single read-only SELECT"));
                }
            }
        }
        Authorization::Allow
    };
    // `Connection::authorizer` needs `&mut Connection`, but the caller only
    // lends `&Connection`. A second, non-owning `Connection` over the same
    // handle installs the hook on it.
    // SAFETY: `conn` outlives `observer` (both live in this frame; `conn` is
    // borrowed for the whole call); `from_handle` never closes the handle;
    // `Connection` is `!Sync`, so nothing else uses the handle while we
    // hold `&conn`; the hook is removed before `observer` is dropped, which
    // frees the boxed closure through SQLite's client-data destructor.
    let observer = unsafe { Connection::from_handle(conn.handle()) };
    let mut observer = match observer {
        Ok(o) => o,
        Err(e) => {
            let a = Access { problems: BTreeSet::new(), reads: BTreeSet::new() };
            return (Err(e), a);
        }
    };
    let installed = observer.authorizer(Some(hook));
    let result = installed.and_then(|()| {
        let stmt = conn.prepare(sql)?;
        Ok((stmt.column_names().map(str::to_owned).collect::<Vec<_>>(), stmt.readonly()))
    });
    let _ = observer.authorizer(None::<fn(AuthContext<'_>) -> Authorization>);
    drop(observer);
    let access = match Arc::try_unwrap(access) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(shared) => {
            let g = shared.lock().unwrap_or_else(|p| p.into_inner());
            Access { problems: g.problems.clone(), reads: g.reads.clone() }
        }
    };
    (result, access)
}

fn compile_view(conn: &Connection, v: &ViewConfig, watched: &[TableRef]) -> Result<CompiledView, Vec<String>> {
    let mut problems = Vec::new();
    let (prepared, access) = prepare_observed(conn, &v.query);
    let (columns, readonly) = match prepared {
        Ok(x) => x,
        Err(e) => {
            let text = e.to_string();
            if let Some(table) = text.strip_prefix("no such table: ") {
                // The replica holds only the watched tables.
                return Err(vec![format!(
                    "query reads table {table:?}, which is not in mysql.tables (the replica holds only the watched tables); add it to mysql.tables or change the query"
                )]);
            }
            return Err(vec![format!("query does not compile against the replica: {text}")]);
        }
    };
    problems.extend(access.problems);
    if columns.is_empty() {
        problems.push("the query returns no columns; a view must be a SELECT".into());
    }
    if !readonly {
        problems.push("the query writes to the database; a view must be a read-only SELECT".into());
    }
    let mut reads = BTreeSet::new();
    for (db, table) in &access.reads {
        let shown = if db == "main" { table.clone() } else { format!("{db}.{table}") };
        if table.len() >= INTERNAL_PREFIX.len() && table[..INTERNAL_PREFIX.len()].eq_ignore_ascii_case(INTERNAL_PREFIX)
        {
            problems.push(format!("the query reads internal table {shown:?}; a view may read only the watched tables"));
            continue;
        }
        let found = watched.iter().find(|t| {
            t.name.eq_ignore_ascii_case(table)
                && if t.qualified { t.schema.eq_ignore_ascii_case(db) } else { db == "main" }
        });
        match found {
            Some(t) => {
                reads.insert(t.sqlite_name());
            }
            None if db == "main" && ALLOWED_FUNCTIONS.iter().any(|f| f.eq_ignore_ascii_case(table)) => {}
            None => problems.push(format!(
                "query reads table {shown:?} which is not watched; add it to mysql.tables or change the query"
            )),
        }
    }
    let mut seen = HashSet::new();
    for c in &columns {
        if !seen.insert(c.as_str()) {
            problems.push(format!("the result has more than one column named {c:?}; give them distinct names with AS"));
        }
    }
    let key = match KeyTemplate::compile(&v.key, &columns) {
        Ok(k) => Some(k),
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    let find = |what: &str, name: &str, problems: &mut Vec<String>| {
        let i = columns.iter().position(|c| c == name);
        if i.is_none() {
            problems.push(format!(
                "{what} {name:?} is not a column of the query's result (columns: {})",
                columns.join(", ")
            ));
        }
        i
    };
    let map_key = match (&v.shape, &v.map_key) {
        (_, Some(m)) => find("map_key", m, &mut problems),
        (Shape::Map, None) => {
            problems.push("shape = \"map\" needs map_key = \"<column>\"".into());
            None
        }
        _ => None,
    };
    let value_column = v.value_column.as_deref().and_then(|c| find("value_column", c, &mut problems));
    let mut json = vec![false; columns.len()];
    for c in &v.json_columns {
        if let Some(i) = find("json_columns entry", c, &mut problems) {
            json[i] = true;
        }
    }
    match (&key, v.shape) {
        (Some(k), Shape::Row) if k.is_fixed() => problems.push(format!(
            "key {:?} has no {{column}} placeholder, but shape = \"row\" writes one entry per row",
            v.key
        )),
        (Some(k), Shape::List | Shape::Map) if !k.is_fixed() => problems.push(format!(
            "key {:?} has a placeholder, but shape = \"{}\" writes one entry under a fixed key",
            v.key,
            if v.shape == Shape::List { "list" } else { "map" }
        )),
        _ => {}
    }
    match key {
        Some(key) if problems.is_empty() => {
            let column_keys = columns
                .iter()
                .map(|c| {
                    let mut b = Vec::with_capacity(c.len() + 5);
                    mp::str(&mut b, c);
                    b
                })
                .collect();
            let reads: Vec<String> = reads.into_iter().collect();
            let ivm = match v.shape {
                Shape::Row => incremental::analyze(conn, &v.name, &v.query, &columns, &key, &reads),
                Shape::List | Shape::Map => {
                    incremental::analyze_ordered(conn, &v.name, &v.query, &columns, map_key, &reads)
                }
            };
            Ok(CompiledView {
                ivm,
                name: v.name.clone(),
                query: v.query.clone(),
                shape: v.shape,
                key,
                columns,
                column_keys,
                json,
                map_key,
                value_column,
                reads,
            })
        }
        _ => Err(problems),
    }
}

enum RowError {
    Sqlite(rusqlite::Error),
    Value { column: usize, error: ValueError },
}

impl ViewSet {
    /// Checks every view against the replica reachable through `conn` and
    /// compiles them; on failure returns every problem of every view. Each
    /// query must prepare, be a read-only SELECT, read only `watched`
    /// tables (never the internal `_tailcache_*` ones), and have result
    /// columns for every key placeholder, `map_key`, `value_column` and
    /// `json_columns` entry, with no two result columns of the same name.
    /// Two views may not write the same fixed key, and no view may write
    /// the sink's sentinel key.
    ///
    /// Uses SQLite's authorizer on `conn` while preparing; an authorizer
    /// the caller installed on `conn` is removed.
    pub fn compile(
        conn: &Connection,
        views: &[ViewConfig],
        mc: &MemcachedConfig,
        watched: &[TableRef],
    ) -> Result<ViewSet, Vec<ViewProblem>> {
        let mut problems = Vec::new();
        let mut compiled = Vec::new();
        let mut fixed: HashMap<String, &str> = HashMap::new();
        let sentinel = format!("{}{}", mc.key_prefix, crate::sink::EPOCH_KEY_SUFFIX);
        for (i, v) in views.iter().enumerate() {
            let view_problem = |message: String| ViewProblem { view: v.name.clone(), message };
            if views[..i].iter().any(|o| o.name == v.name) {
                problems.push(view_problem("another view has the same name; view names must be unique".into()));
            }
            match compile_view(conn, v, watched) {
                Ok(c) => {
                    if let Some(k) = c.key.fixed(&mc.key_prefix) {
                        if k == sentinel {
                            problems.push(view_problem(format!(
                                "key {k:?} is tailcache's own sentinel key; choose another key"
                            )));
                        } else if let Some(other) = fixed.get(&k) {
                            problems.push(view_problem(format!(
                                "key {k:?} is also written by view {other:?}; each view needs its own key"
                            )));
                        } else {
                            fixed.insert(k, &v.name);
                        }
                    }
                    compiled.push(c);
                }
                Err(ps) => problems.extend(ps.into_iter().map(view_problem)),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(ViewSet::of(compiled, mc))
    }

    fn of(views: Vec<CompiledView>, mc: &MemcachedConfig) -> ViewSet {
        ViewSet {
            views,
            broken: Vec::new(),
            prefix: mc.key_prefix.clone(),
            codec: mc.codec,
            exptime: mc.exptime,
            max_item_size: mc.max_item_size,
            generation: next_generation(),
        }
    }

    pub fn views(&self) -> &[CompiledView] {
        &self.views
    }

    /// Compiles what compiles: a view with a problem is left out (and
    /// listed in [`broken`](Self::broken)) while the others run, the same
    /// at start as after a schema change.
    pub fn compile_lenient(
        conn: &Connection,
        views: &[ViewConfig],
        mc: &MemcachedConfig,
        watched: &[TableRef],
    ) -> ViewSet {
        match Self::compile(conn, views, mc, watched) {
            Ok(vs) => vs,
            Err(problems) => {
                let bad: BTreeSet<&str> = problems.iter().map(|p| p.view.as_str()).collect();
                let good: Vec<ViewConfig> = views.iter().filter(|v| !bad.contains(v.name.as_str())).cloned().collect();
                let mut vs = match Self::compile(conn, &good, mc, watched) {
                    Ok(vs) => vs,
                    // Problems between views (a shared key) surface only
                    // together; then nothing is safe to publish.
                    Err(_) => ViewSet::of(Vec::new(), mc),
                };
                for v in views.iter().filter(|v| !vs.views.iter().any(|c| c.name() == v.name)) {
                    let msg: Vec<String> =
                        problems.iter().filter(|p| p.view == v.name).map(|p| p.message.clone()).collect();
                    let msg = if msg.is_empty() { "conflicts with another view".to_owned() } else { msg.join("; ") };
                    vs.broken.push((v.name.clone(), msg, v.on_error));
                }
                vs
            }
        }
    }

    /// Views left out because they do not compile: (name, why, on_error).
    pub fn broken(&self) -> &[(String, String, crate::config::OnError)] {
        &self.broken
    }

    /// A broken view whose keys stay in memcached (`on_error = "keep"`).
    /// The compiled views whose key template could have rendered `key`
    /// (with `prefix`).
    pub fn views_matching<'a>(&'a self, prefix: &'a str, key: &'a [u8]) -> impl Iterator<Item = &'a str> + 'a {
        self.views.iter().filter(move |v| v.key.matches(prefix, key)).map(|v| v.name.as_str())
    }

    pub fn keeps_keys_of(&self, name: &str) -> bool {
        self.broken.iter().any(|(n, _, o)| n == name && *o == crate::config::OnError::Keep)
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    pub fn exptime(&self) -> u32 {
        self.exptime
    }

    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// Indices of the views reading any of `touched` (sqlite names).
    pub fn affected(&self, touched: &HashSet<String>) -> Vec<usize> {
        (0..self.views.len()).filter(|&i| self.views[i].reads.iter().any(|t| touched.contains(t))).collect()
    }

    /// The query of view `index`, prepared on `conn`, once its result
    /// columns are checked against the compiled ones (a DDL may have
    /// changed them).
    pub fn full_query<'c>(
        &self,
        conn: &'c Connection,
        index: usize,
    ) -> Result<rusqlite::CachedStatement<'c>, ViewError> {
        let v = &self.views[index];
        let stmt =
            conn.prepare_cached(&v.query).map_err(|source| ViewError::Sqlite { view: v.name.clone(), source })?;
        if stmt.column_count() != v.columns.len() || stmt.column_names().zip(&v.columns).any(|(a, b)| a != b) {
            return Err(ViewError::ColumnsChanged {
                view: v.name.clone(),
                expected: v.columns.join(", "),
                found: stmt.column_names().collect::<Vec<_>>().join(", "),
            });
        }
        Ok(stmt)
    }

    /// The entries of the next (at most) `max` rows of `row` view `index`
    /// from `rows`, its [`full_query`](Self::full_query): a view computed
    /// piece by piece, so that its size does not decide the memory it
    /// takes. Rows of one piece rendering the same key: the later wins
    /// (across pieces, see [`published::Sweep`]). The bool is true once
    /// the rows are exhausted.
    pub fn row_piece(
        &self,
        index: usize,
        rows: &mut rusqlite::Rows<'_>,
        now: SystemTime,
        s: &mut Scratch,
        max: usize,
    ) -> Result<(ComputedView, bool), ViewError> {
        let v = &self.views[index];
        let created = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut out = ComputedView { view: v.name.clone(), ..Default::default() };
        let done = self.row_entries(v, rows, s, created, &mut out, max)?;
        out.duplicate_keys = dedup_later_wins(&mut out.entries);
        Ok((out, done))
    }

    /// Runs view `index` on `conn` and builds its entries. Call it inside a
    /// read transaction so all views see one committed state. `now` is the
    /// dogpile creation time.
    pub fn compute(
        &self,
        conn: &Connection,
        index: usize,
        now: SystemTime,
        s: &mut Scratch,
    ) -> Result<ComputedView, ViewError> {
        let v = &self.views[index];
        let sql_err = |source| ViewError::Sqlite { view: v.name.clone(), source };
        let mut stmt = self.full_query(conn, index)?;
        let created = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut out = ComputedView { view: v.name.clone(), ..Default::default() };
        let mut rows = stmt.query([]).map_err(sql_err)?;
        match v.shape {
            Shape::Row => return self.row_piece(index, &mut rows, now, s, usize::MAX).map(|(out, _)| out),
            Shape::List | Shape::Map => {
                // Rebuilt below when the view can be patched and the rows allow.
                s.ordered.remove(&v.name);
                let key = v.key.fixed(&self.prefix).unwrap_or_default();
                if let Err(reason) = template::validate_key(&key) {
                    out.rejected.push(EntryError::BadKey { view: v.name.clone(), key, reason });
                    return Ok(out);
                }
                s.body.clear();
                s.spans.clear();
                s.index.clear();
                let order = match &v.ivm {
                    Ok(plan) if !plan.order.is_empty() => Some(plan),
                    _ => None,
                };
                let mut stored = order.map(|_| ordered::Rows::new(self.generation));
                let desc: Arc<[bool]> = order.map(|p| p.order.iter().map(|(_, d)| *d).collect()).unwrap_or_default();
                let mut count = 0usize;
                while let Some(row) = rows.next().map_err(sql_err)? {
                    let key_start = s.body.len();
                    if let Some(mk) = v.map_key {
                        let kv = row.get_ref(mk).map_err(sql_err)?;
                        if let ValueRef::Null | ValueRef::Blob(_) = kv {
                            let kind = if kv == ValueRef::Null { "NULL" } else { "a BLOB" };
                            out.rejected.push(EntryError::MapKey {
                                view: v.name.clone(),
                                key,
                                column: v.columns[mk].clone(),
                                kind,
                            });
                            return Ok(out);
                        }
                        encode::sqlite_value(&mut s.body, kv);
                    }
                    let value_start = s.body.len();
                    match v.encode_row(row, &mut s.body) {
                        Ok(()) => {}
                        Err(RowError::Sqlite(e)) => return Err(sql_err(e)),
                        Err(RowError::Value { column, error }) => {
                            out.rejected.push(v.value_error(&key, column, error));
                            return Ok(out);
                        }
                    }
                    count += 1;
                    if let (Some(rows), Some(plan)) = (&mut stored, order) {
                        // A tie, a repeated identity or one that is not valid
                        // UTF-8 text: not patchable.
                        let kept = match sort_and_identity(plan, row, &desc).map_err(sql_err)? {
                            Some((sort, identity)) => rows.push_in_order(sort, identity, s.body[key_start..].to_vec()),
                            None => false,
                        };
                        if !kept {
                            stored = None;
                        }
                    }
                    if v.map_key.is_some() {
                        // Keys compare by their encoded bytes; a 128-bit
                        // hash stands in for them (collisions: ~2^-128).
                        let h = xxhash_rust::xxh3::xxh3_128(&s.body[key_start..value_start]);
                        let span = (key_start, value_start, value_start, s.body.len());
                        match s.index.get(&h) {
                            Some(&at) => {
                                let first = s.spans[at];
                                s.spans[at] = (first.0, first.1, span.2, span.3);
                            }
                            None => {
                                s.index.insert(h, s.spans.len());
                                s.spans.push(span);
                            }
                        }
                    }
                }
                s.payload.clear();
                if v.map_key.is_some() {
                    mp::map_len(&mut s.payload, s.spans.len());
                    for &(ks, ke, vs, ve) in &s.spans {
                        s.payload.extend_from_slice(&s.body[ks..ke]);
                        s.payload.extend_from_slice(&s.body[vs..ve]);
                    }
                } else {
                    mp::array_len(&mut s.payload, count);
                    s.payload.extend_from_slice(&s.body);
                }
                match self.finish(v, &key, &s.payload, &mut s.json, created) {
                    Ok(e) => out.entries.push(e),
                    Err(e) => out.rejected.push(e),
                }
                if let Some(rows) = stored {
                    s.ordered.insert(v.name.clone(), rows);
                }
            }
        }
        Ok(out)
    }

    /// Patches the stored rows of a `map`/`list` view with the rows of the
    /// affected identities (already in the plan's keys table) and builds the
    /// entry from them: byte for byte what [`compute`](Self::compute) gives.
    /// `Ok(None)`: no stored rows, or the changed rows do not allow patching
    /// (a repeated identity, a tie, a value that would be rejected): compute
    /// in full.
    fn patch_ordered(
        &self,
        conn: &Connection,
        v: &CompiledView,
        plan: &incremental::IvmPlan,
        now: SystemTime,
        s: &mut Scratch,
    ) -> Result<Option<ComputedView>, ViewError> {
        let sql_err = |source| ViewError::Sqlite { view: v.name.clone(), source };
        // Taken out: put back only once patched, so a failure leaves none.
        let Some(mut rows) = s.ordered.remove(&v.name) else { return Ok(None) };
        if rows.generation != self.generation {
            return Ok(None);
        }
        let key = v.key.fixed(&self.prefix).unwrap_or_default();
        if template::validate_key(&key).is_err() {
            return Ok(None);
        }
        let mut affected = HashSet::new();
        {
            let mut st = conn.prepare_cached(&plan.distinct_sql).map_err(sql_err)?;
            let n = plan.tuple.len();
            let mut q = st.query([]).map_err(sql_err)?;
            while let Some(r) = q.next().map_err(sql_err)? {
                let mut id = Vec::new();
                for i in 0..n {
                    let v = r.get_ref(i).map_err(sql_err)?;
                    if v == ValueRef::Null {
                        // `(NULL) IN (…)` is never true: the restricted
                        // query could not return that row.
                        return Ok(None);
                    }
                    identity_value(&mut id, v);
                }
                affected.insert(id);
            }
        }
        for id in &affected {
            rows.remove(id);
        }
        if !affected.is_empty() {
            let desc: Arc<[bool]> = plan.order.iter().map(|(_, d)| *d).collect();
            let mut stmt = conn.prepare_cached(&plan.restricted_sql).map_err(sql_err)?;
            if stmt.column_count() != v.columns.len() {
                return Ok(None);
            }
            let mut q = stmt.query([]).map_err(sql_err)?;
            let mut piece = Vec::new();
            while let Some(row) = q.next().map_err(sql_err)? {
                piece.clear();
                if let Some(mk) = v.map_key {
                    match row.get_ref(mk).map_err(sql_err)? {
                        ValueRef::Null | ValueRef::Blob(_) => return Ok(None),
                        kv => encode::sqlite_value(&mut piece, kv),
                    }
                }
                match v.encode_row(row, &mut piece) {
                    Ok(()) => {}
                    Err(RowError::Sqlite(e)) => return Err(sql_err(e)),
                    Err(RowError::Value { .. }) => return Ok(None),
                }
                let Some((sort, identity)) = sort_and_identity(plan, row, &desc).map_err(sql_err)? else {
                    return Ok(None);
                };
                if !affected.contains(&identity) || !rows.insert(sort, identity, piece.clone()) {
                    return Ok(None);
                }
            }
        }
        s.payload.clear();
        s.payload.reserve(rows.bytes() + 5);
        if v.map_key.is_some() {
            mp::map_len(&mut s.payload, rows.len());
        } else {
            mp::array_len(&mut s.payload, rows.len());
        }
        for p in rows.pieces() {
            s.payload.extend_from_slice(p);
        }
        let created = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut out = ComputedView { view: v.name.clone(), incremental: true, ..Default::default() };
        match self.finish(v, &key, &s.payload, &mut s.json, created) {
            Ok(e) => out.entries.push(e),
            Err(e) => out.rejected.push(e),
        }
        s.ordered.insert(v.name.clone(), rows);
        Ok(Some(out))
    }

    /// Builds the entries of (at most `max` of) a `row` view's result
    /// rows; true once `rows` is exhausted.
    fn row_entries(
        &self,
        v: &CompiledView,
        rows: &mut rusqlite::Rows<'_>,
        s: &mut Scratch,
        created: f64,
        out: &mut ComputedView,
        max: usize,
    ) -> Result<bool, ViewError> {
        let sql_err = |source| ViewError::Sqlite { view: v.name.clone(), source };
        let mut taken = 0usize;
        loop {
            if taken == max {
                return Ok(false);
            }
            let Some(row) = rows.next().map_err(sql_err)? else { return Ok(true) };
            taken += 1;
            if let Err(e) = v.key.render(&self.prefix, |i| row.get_ref(i).ok(), &mut s.key) {
                out.rejected.push(key_error(&v.name, e));
                continue;
            }
            s.payload.clear();
            match v.encode_row(row, &mut s.payload) {
                Ok(()) => {}
                Err(RowError::Sqlite(e)) => return Err(sql_err(e)),
                Err(RowError::Value { column, error }) => {
                    out.rejected.push(v.value_error(&s.key, column, error));
                    continue;
                }
            }
            match self.finish(v, &s.key, &s.payload, &mut s.json, created) {
                Ok(e) => out.entries.push(e),
                Err(e) => out.rejected.push(e),
            }
        }
    }

    /// Whether view `index` can be maintained incrementally for a batch
    /// that touched `touched` with the row images `changes` (every touched
    /// table it reads is its key table or linked to it, with known rows).
    pub fn can_increment(&self, index: usize, touched: &HashSet<String>, changes: &ChangeSet) -> bool {
        let v = &self.views[index];
        let Ok(plan) = &v.ivm else { return false };
        v.reads.iter().filter(|t| touched.contains(*t)).all(|t| plan.handles(t) && changes.get(t).is_some())
    }

    /// Recomputes only the keys of view `index` that `changes` can affect
    /// (see [`incremental`]). `Ok(None)`: not possible for this batch (use
    /// [`compute`](Self::compute)). Call inside the read transaction, after
    /// checking [`can_increment`](Self::can_increment).
    pub fn compute_incremental(
        &self,
        conn: &Connection,
        index: usize,
        touched: &HashSet<String>,
        changes: &ChangeSet,
        now: SystemTime,
        s: &mut Scratch,
    ) -> Result<Option<ComputedView>, ViewError> {
        let r = self.compute_incremental_in(conn, index, touched, changes, now, s);
        if r.is_err() {
            // Perhaps a TEMP table went missing: create them all again.
            s.created.clear();
        }
        r
    }

    fn compute_incremental_in(
        &self,
        conn: &Connection,
        index: usize,
        touched: &HashSet<String>,
        changes: &ChangeSet,
        now: SystemTime,
        s: &mut Scratch,
    ) -> Result<Option<ComputedView>, ViewError> {
        if !self.can_increment(index, touched, changes) {
            return Ok(None);
        }
        let v = &self.views[index];
        let Ok(plan) = &v.ivm else { return Ok(None) };
        let sql_err = |source| ViewError::Sqlite { view: v.name.clone(), source };
        s.ensure_created(conn, &plan.create_sql).map_err(sql_err)?;
        conn.prepare_cached(&plan.clear_sql).and_then(|mut st| st.execute([])).map_err(sql_err)?;
        for t in v.reads.iter().filter(|t| touched.contains(*t)) {
            let Some(delta) = changes.get(t) else { return Ok(None) };
            if *t == plan.key_table {
                let mut ins = conn.prepare_cached(&plan.insert_sql).map_err(sql_err)?;
                for tuple in incremental::key_tuples(plan, delta.rows()) {
                    for (n, val) in tuple.iter().enumerate() {
                        ins.raw_bind_parameter(n + 1, *val).map_err(sql_err)?;
                    }
                    ins.raw_execute().map_err(sql_err)?;
                }
            } else {
                let Some(link) = plan.links.iter().find(|l| l.table == *t) else { return Ok(None) };
                s.ensure_created(conn, &link.create_sql).map_err(sql_err)?;
                conn.prepare_cached(&link.clear_sql).and_then(|mut st| st.execute([])).map_err(sql_err)?;
                {
                    let mut ins = conn.prepare_cached(&link.insert_sql).map_err(sql_err)?;
                    for val in incremental::distinct_values(delta.rows(), link.t_index) {
                        ins.execute([val]).map_err(sql_err)?;
                    }
                }
                conn.prepare_cached(&link.fill_sql).and_then(|mut st| st.execute([])).map_err(sql_err)?;
            }
        }
        if !plan.order.is_empty() {
            return self.patch_ordered(conn, v, plan, now, s);
        }
        let mut scope = HashSet::new();
        // Tuples whose key does not render (a BLOB placeholder, a key too
        // long or with whitespace): not in the scope (no entry can have
        // that key), but the view's rows carrying them are rejected as a
        // full computation rejects them, so the restricted query runs for
        // them too. Tuples holding a NULL, which its `IN` never matches,
        // are queried one by one.
        let mut unrenderable = false;
        let mut null_tuples = Vec::new();
        {
            let mut st = conn.prepare_cached(&plan.distinct_sql).map_err(sql_err)?;
            let n = plan.tuple.len();
            let mut rows = st.query([]).map_err(sql_err)?;
            let mut tuple = Vec::with_capacity(n);
            while let Some(r) = rows.next().map_err(sql_err)? {
                tuple.clear();
                for i in 0..n {
                    tuple.push(r.get::<_, rusqlite::types::Value>(i).map_err(sql_err)?);
                }
                if tuple.contains(&rusqlite::types::Value::Null) {
                    if null_tuples.len() == MAX_NULL_TUPLES {
                        return Ok(None);
                    }
                    null_tuples.push(tuple.clone());
                } else if plan.render(&v.key, &self.prefix, &tuple, &mut s.key) {
                    scope.insert(s.key.clone());
                } else {
                    unrenderable = true;
                }
            }
        }
        let created = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut out = ComputedView { view: v.name.clone(), ..Default::default() };
        if !scope.is_empty() || unrenderable {
            let mut stmt = conn.prepare_cached(&plan.restricted_sql).map_err(sql_err)?;
            if stmt.column_count() != v.columns.len() {
                return Ok(None);
            }
            let mut rows = stmt.query([]).map_err(sql_err)?;
            self.row_entries(v, &mut rows, s, created, &mut out, usize::MAX)?;
        }
        for tuple in &null_tuples {
            // Not preparing (a query shape the rewrite does not fit): the
            // full computation reports those rows, or the error.
            let Ok(mut stmt) = conn.prepare_cached(&plan.restricted_null_sql) else { return Ok(None) };
            if stmt.column_count() != v.columns.len() {
                return Ok(None);
            }
            for (n, val) in tuple.iter().enumerate() {
                stmt.raw_bind_parameter(n + 1, val).map_err(sql_err)?;
            }
            let mut rows = stmt.raw_query();
            // Every row it returns has a NULL key column: rejected.
            self.row_entries(v, &mut rows, s, created, &mut out, usize::MAX)?;
        }
        let mut seen = HashSet::with_capacity(out.entries.len());
        for e in &out.entries {
            // A key rendered twice (the full query's order decides which
            // row wins) or outside the scope: not for this path.
            if !seen.insert(e.key.as_str()) || !scope.contains(&e.key) {
                return Ok(None);
            }
        }
        drop(seen);
        out.scope = Some(scope);
        out.incremental = true;
        Ok(Some(out))
    }

    /// Encodes `payload` with the codec, hashes it and checks the size.
    fn finish(
        &self,
        v: &CompiledView,
        key: &str,
        payload: &[u8],
        json: &mut Vec<u8>,
        created: f64,
    ) -> Result<Entry, EntryError> {
        let hash = encode::entry_hash(self.codec, self.exptime, payload);
        let value = match self.codec {
            Codec::Msgpack => payload.to_vec(),
            Codec::Dogpile => {
                let mut b = Vec::with_capacity(payload.len() + 24);
                mp::array_len(&mut b, 2);
                b.extend_from_slice(payload);
                encode::dogpile_metadata(&mut b, created);
                b
            }
            Codec::Json | Codec::Pickle => {
                let transcode =
                    if self.codec == Codec::Json { encode::msgpack_to_json } else { encode::msgpack_to_pickle };
                json.clear();
                // Only fails on msgpack this module did not write.
                if let Err(error) = transcode(payload, json) {
                    return Err(EntryError::Json {
                        view: v.name.clone(),
                        key: key.to_owned(),
                        column: String::new(),
                        error,
                    });
                }
                json.clone()
            }
        };
        if key.len() + value.len() + ITEM_OVERHEAD > self.max_item_size {
            return Err(EntryError::TooLarge {
                view: v.name.clone(),
                key: key.to_owned(),
                size: value.len(),
                limit: self.max_item_size,
            });
        }
        Ok(Entry { key: key.to_owned(), value, flags: self.codec.flags(), hash })
    }
}

impl CompiledView {
    fn encode_row(&self, row: &rusqlite::Row<'_>, out: &mut Vec<u8>) -> Result<(), RowError> {
        if let Some(c) = self.value_column {
            return self.encode_column(row, c, out);
        }
        mp::map_len(out, self.columns.len());
        for (i, name) in self.column_keys.iter().enumerate() {
            out.extend_from_slice(name);
            self.encode_column(row, i, out)?;
        }
        Ok(())
    }

    fn encode_column(&self, row: &rusqlite::Row<'_>, i: usize, out: &mut Vec<u8>) -> Result<(), RowError> {
        let v = row.get_ref(i).map_err(RowError::Sqlite)?;
        if self.json[i] {
            encode::json_value(out, v).map_err(|error| RowError::Value { column: i, error })
        } else {
            encode::sqlite_value(out, v);
            Ok(())
        }
    }

    fn value_error(&self, key: &str, column: usize, error: ValueError) -> EntryError {
        let ValueError::InvalidJson(error) = error;
        EntryError::Json { view: self.name.clone(), key: key.to_owned(), column: self.columns[column].clone(), error }
    }
}

/// A row's `ORDER BY` values and its identity (the plan's key tuple,
/// encoded by [`identity_value`]). `None` when an identity value is NULL
/// (the restricted query's `IN` never matches it, so the row could not be
/// re-queried) or TEXT that is not valid UTF-8 (encoded as msgpack, lossily,
/// two such map keys could merge into one in a full computation, which the
/// stored rows would not reproduce).
fn sort_and_identity(
    plan: &incremental::IvmPlan,
    row: &rusqlite::Row<'_>,
    desc: &Arc<[bool]>,
) -> rusqlite::Result<Option<(ordered::SortKey, Vec<u8>)>> {
    let mut vals = Vec::with_capacity(plan.order.len());
    for (c, _) in &plan.order {
        vals.push(ordered::SortVal::from_ref(row.get_ref(*c)?));
    }
    let mut identity = Vec::new();
    for t in &plan.tuple {
        let v = row.get_ref(t.output)?;
        match v {
            ValueRef::Null => return Ok(None),
            ValueRef::Text(b) if std::str::from_utf8(b).is_err() => return Ok(None),
            _ => {}
        }
        identity_value(&mut identity, v);
    }
    Ok(Some((ordered::SortKey { vals, desc: desc.clone() }, identity)))
}

/// Appends one value of a row identity, losslessly (type tag, length,
/// bytes), so that distinct values never share an identity.
fn identity_value(out: &mut Vec<u8>, v: ValueRef<'_>) {
    match v {
        ValueRef::Null => out.push(0),
        ValueRef::Integer(i) => {
            out.push(1);
            out.extend_from_slice(&i.to_be_bytes());
        }
        ValueRef::Real(f) => {
            out.push(2);
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            out.push(if matches!(v, ValueRef::Text(_)) { 3 } else { 4 });
            out.extend_from_slice(&(t.len() as u64).to_be_bytes());
            out.extend_from_slice(t);
        }
    }
}

fn key_error(view: &str, e: KeyError) -> EntryError {
    match e {
        KeyError::Column { column, kind } => EntryError::KeyColumn { view: view.to_owned(), column, kind },
        KeyError::Invalid { key, reason } => EntryError::BadKey { view: view.to_owned(), key, reason },
    }
}

/// Keeps the last entry of each key; returns how many were dropped.
fn dedup_later_wins(entries: &mut Vec<Entry>) -> usize {
    let mut seen = HashSet::with_capacity(entries.len());
    let keep: Vec<bool> = entries.iter().rev().map(|e| seen.insert(e.key.as_str())).collect();
    drop(seen);
    let dropped = keep.iter().filter(|k| !**k).count();
    if dropped > 0 {
        let mut it = keep.into_iter().rev();
        entries.retain(|_| it.next().unwrap_or(true));
    }
    dropped
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod ivm_tests;
