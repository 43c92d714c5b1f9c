//! The applier: the only writer of the replica's rows. It applies the
//! source's [`Action`]s inside one SQLite transaction per batch of MySQL
//! transactions, with one statement prepared per table and operation (no
//! per-row statement lookup), and stages XA transactions until they commit.

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, Statement, params};

use crate::config::TableRef;
use crate::error::{Error, Result};
use crate::replica::action::{Action, CHANGE_CAP, ChangeSet, RowChange, TableDelta, Xid};
use crate::replica::tables::{qualified, quote_ident, write_checkpoint};
use crate::schema::TableSchema;

/// XA rows wait here between `XA PREPARE` and `XA COMMIT`. The table is in
/// the state file, so a prepared transaction survives a restart, and it is
/// written in the same SQLite transaction as the checkpoint after the
/// PREPARE, so staging and position never disagree.
const XA_TABLE_DDL: &str = "CREATE TABLE IF NOT EXISTS _tailcache_xa (
    xid TEXT NOT NULL, seq INTEGER NOT NULL, tbl TEXT NOT NULL, op INTEGER NOT NULL,
    before BLOB, after BLOB, PRIMARY KEY (xid, seq)) WITHOUT ROWID";

const OP_INSERT: i64 = 0;
const OP_DELETE: i64 = 1;
const OP_UPDATE: i64 = 2;
/// Row `seq = 0` of a prepared xid: "its PREPARE was seen". Staged rows
/// start at seq 1. An XA COMMIT finding neither marker nor rows belongs to
/// a transaction prepared before the replica's snapshot (its rows were
/// invisible to the snapshot and its PREPARE is before our stream), which
/// only a new snapshot can bring.
const OP_PREPARED: i64 = 3;

/// At most this many rows go into one multi-row UPSERT. Executing a
/// statement costs about as much as inserting a row (bind, step, halt, reset,
/// cursor open and close); 64 rows per statement removes most of that
/// (callgrind: 4,700 → 2,500 instructions per row for a 3-column table);
/// 256 rows per statement cost 8 % more than 64.
const MAX_ROWS_PER_STATEMENT: usize = 64;

/// Parameters per multi-row statement stay within SQLite's historical
/// default `SQLITE_MAX_VARIABLE_NUMBER`, whatever the build's limit.
const MAX_PARAMS_PER_STATEMENT: usize = 999;

/// Prepared statements for one replica table, built from its schema.
struct TableStatements<'c> {
    upsert: Statement<'c>,
    /// `multi[k]` upserts `2^(k+1)` rows at once (prepared on first use):
    /// any row count is executed as a sum of powers of two, in order.
    multi: Vec<Option<Statement<'c>>>,
    /// The multi-row upsert as `{head}(…), (…){tail}`.
    multi_head: String,
    multi_tail: String,
    delete: Statement<'c>,
    truncate: Statement<'c>,
    pk: Vec<usize>,
    columns: usize,
    /// Rows per statement at most (a power of two; 1: no multi-row).
    max_rows: usize,
}

impl<'c> TableStatements<'c> {
    fn prepare(conn: &'c Connection, schema: &TableSchema) -> Result<Self> {
        let name = qualified(schema);
        let cols: Vec<String> = schema.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let params: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
        let pk_cols: Vec<String> = schema.primary_key.iter().map(|&i| cols[i].clone()).collect();
        let non_pk: Vec<String> = (0..cols.len())
            .filter(|i| !schema.primary_key.contains(i))
            .map(|i| format!("{c} = excluded.{c}", c = cols[i]))
            .collect();
        // An UPSERT updates the row in place; INSERT OR REPLACE would
        // delete it and insert it again (two b-tree operations). A
        // multi-row UPSERT handles its rows one after the other, exactly
        // like as many single-row statements: a later row of the same key
        // updates the one an earlier row inserted.
        // OR FAIL: a failing row (a NULL key) ends the statement without
        // undoing its earlier rows, so SQLite keeps no statement journal (a
        // copy of every page a multi-row statement touches first); any
        // error rolls the whole SQLite transaction back anyway.
        let head = format!("INSERT OR FAIL INTO {name} ({}) VALUES ", cols.join(", "));
        let tail = if pk_cols.is_empty() {
            String::new()
        } else if non_pk.is_empty() {
            format!(" ON CONFLICT ({}) DO NOTHING", pk_cols.join(", "))
        } else {
            format!(" ON CONFLICT ({}) DO UPDATE SET {}", pk_cols.join(", "), non_pk.join(", "))
        };
        let upsert = format!("{head}({}){tail}", params.join(", "));
        let fit = MAX_ROWS_PER_STATEMENT.min(MAX_PARAMS_PER_STATEMENT / cols.len().max(1)).max(1);
        // The largest power of two that fits.
        let max_rows: usize = 1 << fit.ilog2();
        let pk_cond: Vec<String> = pk_cols.iter().enumerate().map(|(n, c)| format!("{c} = ?{}", n + 1)).collect();
        let delete = if pk_cond.is_empty() {
            // Without a key a row is identified by all its values.
            let all: Vec<String> = cols.iter().enumerate().map(|(n, c)| format!("{c} IS ?{}", n + 1)).collect();
            format!("DELETE FROM {name} WHERE rowid = (SELECT rowid FROM {name} WHERE {} LIMIT 1)", all.join(" AND "))
        } else {
            format!("DELETE FROM {name} WHERE {}", pk_cond.join(" AND "))
        };
        let prep = |sql: &str| {
            conn.prepare(sql).map_err(|e| Error::sqlite(format!("prepare statement for {}: {sql}", schema.table), e))
        };
        Ok(Self {
            upsert: prep(&upsert)?,
            multi: (0..max_rows.ilog2()).map(|_| None).collect(),
            multi_head: head,
            multi_tail: tail,
            delete: prep(&delete)?,
            truncate: prep(&format!("DELETE FROM {name}"))?,
            pk: schema.primary_key.clone(),
            columns: cols.len(),
            max_rows,
        })
    }

    /// The upsert of `rows` rows (a power of two, at most `max_rows`),
    /// prepared on first use.
    fn upsert_of(&mut self, conn: &'c Connection, rows: usize) -> rusqlite::Result<&mut Statement<'c>> {
        if rows <= 1 {
            return Ok(&mut self.upsert);
        }
        let k = rows.ilog2() as usize - 1;
        match &mut self.multi[k] {
            Some(st) => Ok(st),
            slot @ None => {
                let mut sql = String::with_capacity(self.multi_head.len() + rows * self.columns * 7);
                sql.push_str(&self.multi_head);
                let mut n = 0;
                for r in 0..rows {
                    sql.push_str(if r == 0 { "(" } else { ", (" });
                    for c in 0..self.columns {
                        n += 1;
                        if c > 0 {
                            sql.push_str(", ");
                        }
                        sql.push('?');
                        sql.push_str(&n.to_string());
                    }
                    sql.push(')');
                }
                sql.push_str(&self.multi_tail);
                Ok(slot.insert(conn.prepare(&sql)?))
            }
        }
    }

    fn upsert(&mut self, row: &[ValueRef<'_>]) -> rusqlite::Result<()> {
        for (i, v) in row.iter().take(self.columns).enumerate() {
            self.upsert.raw_bind_parameter(i + 1, ToSqlOutput::Borrowed(*v))?;
        }
        self.upsert.raw_execute()?;
        Ok(())
    }

    fn delete(&mut self, row: &[ValueRef<'_>]) -> rusqlite::Result<()> {
        if self.pk.is_empty() {
            for (i, v) in row.iter().take(self.columns).enumerate() {
                self.delete.raw_bind_parameter(i + 1, ToSqlOutput::Borrowed(*v))?;
            }
        } else {
            for (n, &i) in self.pk.iter().enumerate() {
                let v = row.get(i).copied().unwrap_or(ValueRef::Null);
                self.delete.raw_bind_parameter(n + 1, ToSqlOutput::Borrowed(v))?;
            }
        }
        self.delete.raw_execute()?;
        Ok(())
    }

    fn same_key(&self, a: &[ValueRef<'_>], b: &[ValueRef<'_>]) -> bool {
        !self.pk.is_empty() && self.pk.iter().all(|&i| a.get(i) == b.get(i))
    }

    fn apply(&mut self, change: &RowChange<'_>) -> rusqlite::Result<()> {
        match change {
            RowChange::Insert(row) => self.upsert(row),
            RowChange::Delete(row) => self.delete(row),
            RowChange::Update { before, after } => {
                if !self.same_key(before, after) {
                    self.delete(before)?;
                }
                self.upsert(after)
            }
        }
    }
}

pub struct Applier<'c> {
    conn: &'c Connection,
    tables: Vec<TableRef>,
    stmts: Vec<Option<TableStatements<'c>>>,
    /// A SQLite transaction is open.
    open: bool,
    /// Rows go to the XA staging table under this xid, not to the replica.
    staging: Option<Xid>,
    /// The open transaction holds an XA PREPARE (for a crash point).
    prepared_in_tx: bool,
    staged_seq: i64,
    scratch: Vec<u8>,
    scratch2: Vec<u8>,
    /// Row images of the open batch, per table (see [`Capture`]).
    capture: Vec<Capture>,
    captured: usize,
    /// Upserts of one table waiting for [`Applier::flush_rows`] (see
    /// [`Applier::buffer_row`]): their values, `columns` per row, with text
    /// and blob bytes in `pending_bytes`. Both buffers are reused.
    pending_table: usize,
    pending_rows: usize,
    pending: Vec<Pending>,
    pending_bytes: Vec<u8>,
}

/// A buffered value; text and blobs are ranges of `pending_bytes`.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Null,
    Int(i64),
    Real(f64),
    Text(usize, usize),
    Blob(usize, usize),
}

/// The changed rows of one table in the open batch, for incremental view
/// maintenance: `Exact` holds every before and after image; `Unknown`
/// means too many rows (past [`CHANGE_CAP`]), a TRUNCATE or a re-snapshot.
#[derive(Debug, Default)]
enum Capture {
    #[default]
    Untouched,
    Exact(Vec<Value>),
    Unknown,
}

impl<'c> Applier<'c> {
    pub fn new(conn: &'c Connection, tables: Vec<TableRef>) -> Result<Self> {
        conn.execute_batch(XA_TABLE_DDL).map_err(|e| Error::sqlite("create _tailcache_xa", e))?;
        let n = tables.len();
        Ok(Self {
            conn,
            tables,
            stmts: (0..n).map(|_| None).collect(),
            open: false,
            staging: None,
            prepared_in_tx: false,
            staged_seq: 0,
            scratch: Vec::new(),
            scratch2: Vec::new(),
            capture: (0..n).map(|_| Capture::Untouched).collect(),
            captured: 0,
            pending_table: 0,
            pending_rows: 0,
            pending: Vec::new(),
            pending_bytes: Vec::new(),
        })
    }

    /// Applies a row change like [`Applier::apply`] with [`Action::Row`],
    /// except that inserts and same-key updates may wait in a buffer to be
    /// upserted many rows per statement: the caller must call
    /// [`Applier::flush_rows`] before anything else reads or writes the
    /// replica through [`Applier::conn`] (every other `Applier` method
    /// flushes by itself). The replicator flushes after each rows event.
    pub fn buffer_row(&mut self, table: usize, change: RowChange<'_>) -> Result<()> {
        let after = match change {
            _ if self.staging.is_some() => None,
            RowChange::Insert(row) => Some(row),
            RowChange::Update { before, after } => {
                let st = self.statements(table)?;
                if st.same_key(before, after) { Some(after) } else { None }
            }
            RowChange::Delete(_) => None,
        };
        let Some(row) =
            after.filter(|_| self.stmts.get(table).is_some_and(|s| s.as_ref().is_some_and(|s| s.max_rows > 1)))
        else {
            self.apply(Action::Row { table, change })?;
            return Ok(());
        };
        if self.pending_rows > 0 && self.pending_table != table {
            self.flush_rows()?;
        }
        self.begin()?;
        let columns = self.statements(table)?.columns;
        let max_rows = self.statements(table)?.max_rows;
        self.pending_table = table;
        for i in 0..columns {
            let v = row.get(i).copied().unwrap_or(ValueRef::Null);
            let mut bytes = |b: &[u8]| {
                let start = self.pending_bytes.len();
                self.pending_bytes.extend_from_slice(b);
                (start, self.pending_bytes.len())
            };
            let p = match v {
                ValueRef::Null => Pending::Null,
                ValueRef::Integer(i) => Pending::Int(i),
                ValueRef::Real(f) => Pending::Real(f),
                ValueRef::Text(t) => {
                    let (a, b) = bytes(t);
                    Pending::Text(a, b)
                }
                ValueRef::Blob(t) => {
                    let (a, b) = bytes(t);
                    Pending::Blob(a, b)
                }
            };
            self.pending.push(p);
        }
        self.pending_rows += 1;
        self.capture(table, &change);
        if self.pending_rows >= max_rows {
            self.flush_rows()?;
        }
        Ok(())
    }

    /// Upserts the rows [`Applier::buffer_row`] holds, in their order.
    pub fn flush_rows(&mut self) -> Result<()> {
        if self.pending_rows == 0 {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending_rows);
        let table = self.pending_table;
        let conn = self.conn;
        let (pending, bytes) = (&self.pending, &self.pending_bytes);
        let Some(st) = self.stmts.get_mut(table).and_then(Option::as_mut) else {
            return Err(Error::Transient(format!(
                "no schema loaded for watched table {} (internal ordering)",
                self.tables[table]
            )));
        };
        let columns = st.columns;
        let mut done = 0;
        let result = (|| -> rusqlite::Result<()> {
            while done < rows {
                // The largest power of two that fits what is left.
                let n = 1 << (rows - done).min(st.max_rows).ilog2();
                let stmt = st.upsert_of(conn, n)?;
                for (i, p) in pending[done * columns..(done + n) * columns].iter().enumerate() {
                    let v = match *p {
                        Pending::Null => ValueRef::Null,
                        Pending::Int(i) => ValueRef::Integer(i),
                        Pending::Real(f) => ValueRef::Real(f),
                        Pending::Text(a, b) => ValueRef::Text(&bytes[a..b]),
                        Pending::Blob(a, b) => ValueRef::Blob(&bytes[a..b]),
                    };
                    stmt.raw_bind_parameter(i + 1, ToSqlOutput::Borrowed(v))?;
                }
                stmt.raw_execute()?;
                done += n;
            }
            Ok(())
        })();
        self.pending.clear();
        self.pending_bytes.clear();
        result.map_err(|e| Error::sqlite("apply rows", e))
    }

    /// Records the images of one applied row change.
    fn capture(&mut self, table: usize, change: &RowChange<'_>) {
        let Some(c) = self.capture.get_mut(table) else { return };
        if matches!(c, Capture::Unknown) {
            return;
        }
        let images = match change {
            RowChange::Insert(_) | RowChange::Delete(_) => 1,
            RowChange::Update { .. } => 2,
        };
        if self.captured + images > CHANGE_CAP {
            *c = Capture::Unknown;
            return;
        }
        self.captured += images;
        if matches!(c, Capture::Untouched) {
            *c = Capture::Exact(Vec::new());
        }
        let Capture::Exact(v) = c else { return };
        let ok = match change {
            RowChange::Insert(r) | RowChange::Delete(r) => own_row(r, v),
            RowChange::Update { before, after } => own_row(before, v) && own_row(after, v),
        };
        if !ok {
            // Text that is not UTF-8 has no owned `Value`: unknown.
            *c = Capture::Unknown;
        }
    }

    /// Marks the table's changes in this batch as unknown (TRUNCATE,
    /// re-snapshot): the views reading it are recomputed in full.
    pub fn changes_unknown(&mut self, table: usize) {
        if let Some(c) = self.capture.get_mut(table) {
            *c = Capture::Unknown;
        }
    }

    /// The row images captured since the last call (tables whose changes
    /// are known exactly), and resets the capture.
    pub fn take_changes(&mut self) -> ChangeSet {
        let mut out = ChangeSet::default();
        for (i, c) in self.capture.iter_mut().enumerate() {
            if let Capture::Exact(values) = std::mem::take(c) {
                let columns = self.stmts[i].as_ref().map_or(0, |s| s.columns);
                if columns > 0 {
                    out.tables.push(TableDelta { table: self.tables[i].sqlite_name(), columns, values });
                }
            }
        }
        self.captured = 0;
        out
    }

    /// The connection, for the snapshot's bulk copy (inside [`begin`](Self::begin)).
    /// Rows held by [`Applier::buffer_row`] are not in it until
    /// [`Applier::flush_rows`].
    pub fn conn(&self) -> &'c Connection {
        self.conn
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Rows are being staged for an XA transaction.
    pub fn staging(&self) -> bool {
        self.staging.is_some()
    }

    /// Prepares the table's statements for its (new) schema. Call after the
    /// replica table was (re)created.
    pub fn set_schema(&mut self, idx: usize, schema: &TableSchema) -> Result<()> {
        self.flush_rows()?;
        self.stmts[idx] = None;
        self.changes_unknown(idx);
        self.stmts[idx] = Some(TableStatements::prepare(self.conn, schema)?);
        Ok(())
    }

    /// Drops the table's statements before its replica table is replaced.
    pub fn forget_schema(&mut self, idx: usize) {
        // The table is about to be replaced (dropped, re-snapshotted): rows
        // still buffered for it would go to the table being replaced.
        if self.pending_rows > 0 && self.pending_table == idx {
            self.pending_rows = 0;
            self.pending.clear();
            self.pending_bytes.clear();
        }
        self.stmts[idx] = None;
        self.changes_unknown(idx);
    }

    pub fn begin(&mut self) -> Result<()> {
        if !self.open {
            self.exec("BEGIN IMMEDIATE")?;
            self.open = true;
        }
        Ok(())
    }

    pub fn rollback(&mut self) {
        self.pending_rows = 0;
        self.pending.clear();
        self.pending_bytes.clear();
        if self.open {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.open = false;
        }
        self.staging = None;
        self.take_changes();
    }

    /// BEGIN / COMMIT, once per transaction: cached like every statement
    /// on the per-commit path.
    fn exec(&self, sql: &str) -> Result<()> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut st| st.execute([]))
            .map(drop)
            .map_err(|e| Error::sqlite(sql.to_owned(), e))
    }

    fn statements(&mut self, idx: usize) -> Result<&mut TableStatements<'c>> {
        let name = &self.tables[idx];
        self.stmts[idx]
            .as_mut()
            .ok_or_else(|| Error::Transient(format!("no schema loaded for watched table {name} (internal ordering)")))
    }

    /// Applies one action; returns the indexes of tables whose replica rows
    /// changed because of it (XA commits touch what was staged).
    pub fn apply(&mut self, action: Action<'_>) -> Result<Touched> {
        // Buffered rows come before whatever follows them.
        self.flush_rows()?;
        match action {
            Action::Row { table, change } => {
                self.begin()?;
                if self.staging.is_some() {
                    self.stage(table, &change)?;
                    return Ok(Touched::None);
                }
                self.statements(table)?.apply(&change).map_err(|e| Error::sqlite("apply row", e))?;
                self.capture(table, &change);
                Ok(Touched::One(table))
            }
            Action::Truncate { table } => {
                self.begin()?;
                self.statements(table)?.truncate.raw_execute().map_err(|e| Error::sqlite("truncate", e))?;
                self.changes_unknown(table);
                Ok(Touched::One(table))
            }
            Action::XaStart { xid } => {
                self.begin()?;
                // A reused xid must not inherit rows of an older one.
                self.conn
                    .execute("DELETE FROM _tailcache_xa WHERE xid = ?1", [&xid.0])
                    .map_err(|e| Error::sqlite("clear XA staging", e))?;
                self.staging = Some(xid);
                self.staged_seq = 0;
                Ok(Touched::None)
            }
            Action::XaPrepare { one_phase } => {
                let Some(xid) = self.staging.take() else { return Ok(Touched::None) };
                if one_phase {
                    return self.apply_staged(&xid, false);
                }
                self.conn
                    .execute(
                        "INSERT OR REPLACE INTO _tailcache_xa (xid, seq, tbl, op) VALUES (?1, 0, '', ?2)",
                        params![xid.0, OP_PREPARED],
                    )
                    .map_err(|e| Error::sqlite("mark XA prepared", e))?;
                self.prepared_in_tx = true;
                Ok(Touched::None)
            }
            Action::XaCommit { xid } => {
                self.begin()?;
                self.staging = None;
                self.apply_staged(&xid, true)
            }
            Action::XaRollback { xid } => {
                self.begin()?;
                self.staging = None;
                let n = self
                    .conn
                    .execute("DELETE FROM _tailcache_xa WHERE xid = ?1", [&xid.0])
                    .map_err(|e| Error::sqlite("discard XA staging", e))?;
                tracing::info!(xid = %xid, rows = n, "XA ROLLBACK: staged rows discarded");
                Ok(Touched::None)
            }
            Action::Commit { checkpoint, consistent } => {
                self.begin()?;
                write_checkpoint(self.conn, checkpoint, consistent)?;
                self.exec("COMMIT")?;
                self.open = false;
                if std::mem::take(&mut self.prepared_in_tx) {
                    // Staged and committed; the XA COMMIT has not come yet.
                    crate::failpoint!("xa.after_stage");
                }
                Ok(Touched::None)
            }
        }
    }

    fn stage(&mut self, table: usize, change: &RowChange<'_>) -> Result<()> {
        let xid = self.staging.clone().unwrap_or_else(|| Xid(String::new()));
        let (op, before, after) = match change {
            RowChange::Insert(r) => (OP_INSERT, None, Some(*r)),
            RowChange::Delete(r) => (OP_DELETE, Some(*r), None),
            RowChange::Update { before, after } => (OP_UPDATE, Some(*before), Some(*after)),
        };
        self.scratch.clear();
        self.scratch2.clear();
        let b = before.map(|r| encode_row(r, &mut self.scratch)).transpose()?.map(|_| self.scratch.as_slice());
        let a = after.map(|r| encode_row(r, &mut self.scratch2)).transpose()?.map(|_| self.scratch2.as_slice());
        self.staged_seq += 1;
        let mut st = self
            .conn
            .prepare_cached(
                "INSERT OR REPLACE INTO _tailcache_xa (xid, seq, tbl, op, before, after) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(|e| Error::sqlite("prepare XA staging", e))?;
        st.execute(params![xid.0, self.staged_seq, self.tables[table].to_string(), op, b, a])
            .map_err(|e| Error::sqlite("stage XA row", e))?;
        Ok(())
    }

    /// Applies and clears what `xid` staged. `prepared_here`: the commit of
    /// a two-phase transaction, whose PREPARE must have been seen
    /// ([`Touched::Unstaged`] when it was not).
    fn apply_staged(&mut self, xid: &Xid, prepared_here: bool) -> Result<Touched> {
        let rows: Vec<StagedRow> = {
            let mut st = self
                .conn
                .prepare_cached("SELECT tbl, op, before, after FROM _tailcache_xa WHERE xid = ?1 ORDER BY seq")
                .map_err(|e| Error::sqlite("read XA staging", e))?;
            st.query_map([&xid.0], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .and_then(|it| it.collect())
                .map_err(|e| Error::sqlite("read XA staging", e))?
        };
        if prepared_here && rows.is_empty() {
            // Nothing applied: the caller rolls the batch back and takes a
            // new snapshot, so that the checkpoint never passes this COMMIT
            // without its rows.
            return Ok(Touched::Unstaged(format!(
                "XA COMMIT {xid} of a transaction prepared before the replica's snapshot: its rows were invisible to the snapshot and its PREPARE precedes the stream, so its changes are unknown; a new snapshot brings them"
            )));
        }
        let mut touched = vec![false; self.tables.len()];
        for (tbl, op, before, after) in &rows {
            if *op == OP_PREPARED {
                continue;
            }
            // A table no longer watched (config changed since PREPARE) is
            // not ours to apply.
            let Some(idx) = self.tables.iter().position(|t| t.to_string() == *tbl) else { continue };
            let before = before.as_deref().map(decode_row).transpose()?;
            let after = after.as_deref().map(decode_row).transpose()?;
            let b: Option<Vec<ValueRef<'_>>> = before.as_ref().map(|r| r.iter().map(ValueRef::from).collect());
            let a: Option<Vec<ValueRef<'_>>> = after.as_ref().map(|r| r.iter().map(ValueRef::from).collect());
            let change = match (*op, b.as_deref(), a.as_deref()) {
                (OP_INSERT, _, Some(a)) => RowChange::Insert(a),
                (OP_DELETE, Some(b), _) => RowChange::Delete(b),
                (OP_UPDATE, Some(b), Some(a)) => RowChange::Update { before: b, after: a },
                _ => return Err(Error::Transient(format!("corrupt XA staging row for xid {xid}"))),
            };
            self.statements(idx)?.apply(&change).map_err(|e| Error::sqlite("apply XA row", e))?;
            self.capture(idx, &change);
            touched[idx] = true;
        }
        self.conn
            .execute("DELETE FROM _tailcache_xa WHERE xid = ?1", [&xid.0])
            .map_err(|e| Error::sqlite("clear XA staging", e))?;
        let staged = rows.iter().filter(|r| r.1 != OP_PREPARED).count();
        tracing::info!(xid = %xid, rows = staged, "XA COMMIT: staged rows applied");
        Ok(Touched::Many(touched))
    }
}

/// Appends an owned copy of `row`; false when a text is not UTF-8.
fn own_row(row: &[ValueRef<'_>], out: &mut Vec<Value>) -> bool {
    for v in row {
        out.push(match *v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(f) => Value::Real(f),
            ValueRef::Text(t) => match std::str::from_utf8(t) {
                Ok(t) => Value::Text(t.to_owned()),
                Err(_) => return false,
            },
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        });
    }
    true
}

/// (table, operation, before image, after image) as staged.
type StagedRow = (String, i64, Option<Vec<u8>>, Option<Vec<u8>>);

/// Which watched tables an action changed.
#[derive(Debug)]
pub enum Touched {
    None,
    One(usize),
    Many(Vec<bool>),
    /// An `XA COMMIT` of an xid whose PREPARE was never seen (prepared
    /// before the replica's snapshot): what it changed is unknown and
    /// nothing was applied; the watched tables must be snapshotted again
    /// before the checkpoint passes it. Why, for the log.
    Unstaged(String),
}

/// A staged row as msgpack: an array of nil / int / float / str / bin.
fn encode_row(row: &[ValueRef<'_>], out: &mut Vec<u8>) -> Result<()> {
    let io = |e: rmp::encode::ValueWriteError| Error::Transient(format!("encode XA row: {e}"));
    rmp::encode::write_array_len(out, row.len() as u32).map_err(io)?;
    for v in row {
        match *v {
            ValueRef::Null => {
                rmp::encode::write_nil(out).map_err(|e| Error::Transient(format!("encode XA row: {e}")))?
            }
            ValueRef::Integer(i) => {
                rmp::encode::write_sint(out, i).map_err(io)?;
            }
            ValueRef::Real(f) => rmp::encode::write_f64(out, f).map_err(io)?,
            ValueRef::Text(t) => {
                // Text is UTF-8 in the replica; keep the bytes as they are.
                rmp::encode::write_str_len(out, t.len() as u32).map_err(io)?;
                out.extend_from_slice(t);
            }
            ValueRef::Blob(b) => rmp::encode::write_bin(out, b).map_err(io)?,
        }
    }
    Ok(())
}

fn decode_row(bytes: &[u8]) -> Result<Vec<Value>> {
    let bad = |what: &str| Error::Transient(format!("corrupt XA staging row: {what}"));
    let v = rmpv::decode::read_value(&mut &bytes[..]).map_err(|e| bad(&e.to_string()))?;
    let rmpv::Value::Array(items) = v else { return Err(bad("not an array")) };
    items
        .into_iter()
        .map(|v| match v {
            rmpv::Value::Nil => Ok(Value::Null),
            rmpv::Value::Integer(i) => i.as_i64().map(Value::Integer).ok_or_else(|| bad("integer out of range")),
            rmpv::Value::F64(f) => Ok(Value::Real(f)),
            rmpv::Value::F32(f) => Ok(Value::Real(f as f64)),
            rmpv::Value::String(s) => Ok(Value::Text(String::from_utf8_lossy(s.as_bytes()).into_owned())),
            rmpv::Value::Binary(b) => Ok(Value::Blob(b)),
            _ => Err(bad("unexpected value type")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::{BinlogPosition, Checkpoint};
    use crate::schema::ColumnDef;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn schema(name: &str, pk: &[usize]) -> TableSchema {
        let col = ColumnDef::for_tests;
        TableSchema {
            table: TableRef { schema: "db".into(), name: name.into(), qualified: false },
            columns: vec![col("id", "int"), col("v", "int"), col("s", "varchar"), col("b", "blob")],
            primary_key: pk.to_vec(),
        }
    }

    fn dump(conn: &Connection, table: &str) -> Vec<Vec<Value>> {
        let mut st = conn.prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2, 3, 4")).unwrap();
        st.query_map([], |r| (0..4).map(|i| r.get::<_, Value>(i)).collect()).unwrap().map(|r| r.unwrap()).collect()
    }

    /// Random inserts, updates (same key and moved key) and deletes over a
    /// keyed and a keyless table, applied once through `buffer_row` and
    /// once row by row through `apply`: the replicas must be identical
    /// after every commit, and so must the captured changes.
    #[test]
    fn buffered_rows_equal_rows_applied_one_by_one() {
        let seed: u64 = std::env::var("TAILCACHE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::rng().random());
        eprintln!("buffered rows test: TAILCACHE_TEST_SEED={seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let schemas = [schema("k", &[0]), schema("nokey", &[])];
        let refs: Vec<TableRef> = schemas.iter().map(|s| s.table.clone()).collect();
        let open = |name: &str| {
            let conn = crate::replica::open_connection(&dir.path().join(name), &refs).unwrap();
            for s in &schemas {
                crate::replica::tables::recreate_table(&conn, s).unwrap();
            }
            conn
        };
        let (ca, cb) = (open("a.db"), open("b.db"));
        let (mut a, mut b) = (Applier::new(&ca, refs.clone()).unwrap(), Applier::new(&cb, refs.clone()).unwrap());
        for (i, s) in schemas.iter().enumerate() {
            a.set_schema(i, s).unwrap();
            b.set_schema(i, s).unwrap();
        }
        // What table `k` holds, to pick updates and deletes of real rows.
        let mut keyed: std::collections::BTreeMap<i64, Vec<Value>> = Default::default();
        let mut keyless: Vec<Vec<Value>> = Vec::new();
        let row = |rng: &mut StdRng, id: i64| {
            vec![
                Value::Integer(id),
                if rng.random_bool(0.1) { Value::Null } else { Value::Integer(rng.random_range(0..5)) },
                Value::Text(["", "x", "héllo", "a longer text value"][rng.random_range(0..4)].to_owned()),
                if rng.random_bool(0.5) { Value::Null } else { Value::Blob(vec![0, rng.random(), 255]) },
            ]
        };
        for txn in 0..60 {
            let events = rng.random_range(1..6);
            for _ in 0..events {
                // One "rows event": many changes, then a flush.
                let len = if rng.random_bool(0.3) { rng.random_range(60..300) } else { rng.random_range(1..20) };
                // Like a rows event, mostly one table; half of them only
                // insert or update in place (long runs of buffered rows,
                // the same key several times in one statement).
                let keyed_event = rng.random_bool(0.7);
                let churn = if rng.random_bool(0.5) { 0.0 } else { 0.2 };
                for _ in 0..len {
                    let (table, before, after) = if keyed_event || rng.random_bool(0.1) {
                        let id = rng.random_range(0..200);
                        let after = row(&mut rng, id);
                        match keyed.get(&id).cloned() {
                            None => (0, None, Some(after)),
                            Some(old) if rng.random_bool(churn) => (0, Some(old), None),
                            Some(old) if rng.random_bool(churn) => {
                                let to = rng.random_range(0..200);
                                if keyed.contains_key(&to) {
                                    continue;
                                }
                                (0, Some(old), Some(row(&mut rng, to)))
                            }
                            Some(old) => (0, Some(old), Some(after)),
                        }
                    } else if !keyless.is_empty() && rng.random_bool(0.3) {
                        let i = rng.random_range(0..keyless.len());
                        let old = keyless.remove(i);
                        if rng.random_bool(0.5) { (1, Some(old), None) } else { (1, Some(old), Some(row(&mut rng, 7))) }
                    } else {
                        let id = rng.random_range(0..3);
                        (1, None, Some(row(&mut rng, id)))
                    };
                    if table == 0 {
                        if let Some(b) = &before {
                            keyed.remove(&b[0].clone().try_into_i64());
                        }
                        if let Some(a) = &after {
                            keyed.insert(a[0].clone().try_into_i64(), a.clone());
                        }
                    } else if let Some(a) = &after {
                        keyless.push(a.clone());
                    }
                    let (bv, av) = (before.as_deref().map(vr), after.as_deref().map(vr));
                    let change = || match (&bv, &av) {
                        (None, Some(a)) => RowChange::Insert(a),
                        (Some(b), None) => RowChange::Delete(b),
                        (Some(b), Some(a)) => RowChange::Update { before: b, after: a },
                        (None, None) => unreachable!(),
                    };
                    a.buffer_row(table, change()).unwrap();
                    b.apply(Action::Row { table, change: change() }).unwrap();
                }
                a.flush_rows().unwrap();
            }
            let cp = Checkpoint { position: BinlogPosition::new("bin.000001", 4 + txn), gtid: None };
            a.apply(Action::Commit { checkpoint: &cp, consistent: true }).unwrap();
            b.apply(Action::Commit { checkpoint: &cp, consistent: true }).unwrap();
            assert_eq!(a.take_changes(), b.take_changes(), "captured changes after transaction {txn}");
            for t in ["k", "nokey"] {
                assert_eq!(dump(&ca, t), dump(&cb, t), "table {t} after transaction {txn} (seed {seed})");
            }
        }
        assert!(!dump(&ca, "k").is_empty() && !dump(&ca, "nokey").is_empty());
    }

    fn vr(r: &[Value]) -> Vec<ValueRef<'_>> {
        r.iter().map(ValueRef::from).collect()
    }

    trait IntValue {
        fn try_into_i64(self) -> i64;
    }
    impl IntValue for Value {
        fn try_into_i64(self) -> i64 {
            match self {
                Value::Integer(i) => i,
                other => panic!("not an integer: {other:?}"),
            }
        }
    }

    /// A rolled-back batch leaves nothing buffered behind.
    #[test]
    fn rollback_discards_buffered_rows() {
        let dir = tempfile::tempdir().unwrap();
        let s = schema("k", &[0]);
        let conn = crate::replica::open_connection(&dir.path().join("s.db"), std::slice::from_ref(&s.table)).unwrap();
        crate::replica::tables::recreate_table(&conn, &s).unwrap();
        let mut a = Applier::new(&conn, vec![s.table.clone()]).unwrap();
        a.set_schema(0, &s).unwrap();
        let r = [ValueRef::Integer(1), ValueRef::Null, ValueRef::Text(b"x"), ValueRef::Null];
        a.buffer_row(0, RowChange::Insert(&r)).unwrap();
        a.rollback();
        let cp = Checkpoint { position: BinlogPosition::new("bin.000001", 4), gtid: None };
        a.apply(Action::Commit { checkpoint: &cp, consistent: true }).unwrap();
        assert!(dump(&conn, "k").is_empty());
    }

    #[test]
    fn staged_rows_round_trip() {
        let row = [
            ValueRef::Null,
            ValueRef::Integer(-5),
            ValueRef::Integer(i64::MAX),
            ValueRef::Real(1.5),
            ValueRef::Text("héllo".as_bytes()),
            ValueRef::Blob(&[0, 255]),
        ];
        let mut out = Vec::new();
        encode_row(&row, &mut out).unwrap();
        let back = decode_row(&out).unwrap();
        let back: Vec<ValueRef<'_>> = back.iter().map(ValueRef::from).collect();
        assert_eq!(back, row);
    }
}
