//! What the source asks the replica to do: a narrow, typed vocabulary that
//! knows nothing about binlog events, so the source (decoding, ordering,
//! positions) and the applier (SQLite) can change independently.

use rusqlite::types::{Value, ValueRef};

use std::time::Instant;

use crate::position::Checkpoint;

/// One change to one row, each image a full row in the schema's column
/// order, borrowed from the decoder's buffers (never copied on the way).
#[derive(Debug)]
pub enum RowChange<'a> {
    Insert(&'a [ValueRef<'a>]),
    Delete(&'a [ValueRef<'a>]),
    Update { before: &'a [ValueRef<'a>], after: &'a [ValueRef<'a>] },
}

/// An XA transaction's identity, canonical whatever way the statement
/// spelled it (`'a1'`, `X'6131'`, `0x6131`, with or without bqual and
/// formatID), so that `XA START` and a later `XA COMMIT` match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Xid(pub String);

impl std::fmt::Display for Xid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The actions, in binlog order. Row changes and truncates between two
/// commits form one MySQL transaction; the applier makes them visible only
/// together with the `Commit` that carries their checkpoint.
#[derive(Debug)]
pub enum Action<'a> {
    /// A row of the watched table with this index changed.
    Row { table: usize, change: RowChange<'a> },
    /// The watched table was emptied (TRUNCATE, or dropped).
    Truncate { table: usize },
    /// An XA transaction begins: its rows are staged, not applied.
    XaStart { xid: Xid },
    /// The XA transaction was prepared; `one_phase` (XA COMMIT … ONE PHASE)
    /// means it committed at the same moment.
    XaPrepare { one_phase: bool },
    /// A prepared XA transaction committed: apply what was staged for it.
    XaCommit { xid: Xid },
    /// A prepared XA transaction rolled back: discard what was staged.
    XaRollback { xid: Xid },
    /// Everything applied since the last commit is one committed state of
    /// the database, at this checkpoint.
    Commit { checkpoint: &'a Checkpoint, consistent: bool },
}

/// What the replica tells the views after each SQLite commit (the applier's
/// committed notice).
#[derive(Debug, Clone)]
pub struct CommitNotice {
    /// SQLite names of the tables the committed transactions changed.
    pub touched: Vec<String>,
    pub checkpoint: Checkpoint,
    /// When the first binlog event of these transactions arrived.
    pub arrived: Instant,
    /// A snapshot replaced the replica: recompute and repair everything.
    pub full: bool,
    /// A watched table changed shape (DDL, re-snapshotted): the views
    /// must be compiled again before they run.
    pub schema_changed: bool,
    /// Set when a full resync (snapshot) produced this notice: why it was
    /// taken (`periodic resync`, `SIGHUP / tailcache resync`, `admin`, …),
    /// for the resync report.
    pub trigger: Option<String>,
    /// The before and after images of the changed rows, for incremental
    /// view maintenance. A touched table missing from it (too many rows, a
    /// TRUNCATE, a re-snapshot) means "unknown": the views reading it are
    /// recomputed in full.
    pub changes: ChangeSet,
}

/// At most this many row images are kept per batch of transactions; past
/// it the table's changes are "unknown" (its views are recomputed in full,
/// which at that size costs about as much as the incremental path).
pub const CHANGE_CAP: usize = 20_000;

/// Row images of one table's changed rows, in the replica's column order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableDelta {
    /// `TableRef::sqlite_name()`.
    pub table: String,
    pub columns: usize,
    /// Before and after images alike, flattened (`columns` values each).
    pub values: Vec<Value>,
}

impl TableDelta {
    pub fn rows(&self) -> impl Iterator<Item = &[Value]> {
        self.values.chunks(self.columns.max(1))
    }
    pub fn len(&self) -> usize {
        self.values.len() / self.columns.max(1)
    }
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// The changed rows of a batch, per table whose changes are known exactly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeSet {
    pub tables: Vec<TableDelta>,
}

impl ChangeSet {
    pub fn get(&self, table: &str) -> Option<&TableDelta> {
        self.tables.iter().find(|t| t.table == table)
    }

    /// Total row images held.
    pub fn len(&self) -> usize {
        self.tables.iter().map(TableDelta::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(TableDelta::is_empty)
    }

    /// Adds `other`'s images of the tables both know; returns the tables
    /// whose images cannot be merged (a different column count: the table
    /// changed shape in between), which are dropped.
    pub fn merge(&mut self, other: ChangeSet) -> Vec<String> {
        let mut lost = Vec::new();
        for t in other.tables {
            match self.tables.iter_mut().find(|x| x.table == t.table) {
                Some(x) if x.columns == t.columns => x.values.extend(t.values),
                Some(_) => lost.push(t.table),
                None => self.tables.push(t),
            }
        }
        for t in &lost {
            self.forget(t);
        }
        lost
    }

    /// Drops `table` (its changes are unknown from now on).
    pub fn forget(&mut self, table: &str) {
        self.tables.retain(|t| t.table != table);
    }
}
