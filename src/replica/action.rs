//! What the source asks the replica to do: a narrow, typed vocabulary that
//! knows nothing about binlog events, so the source (decoding, ordering,
//! positions) and the applier (SQLite) can change independently.

use rusqlite::types::ValueRef;

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
}
