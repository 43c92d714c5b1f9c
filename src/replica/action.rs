//! What the source asks the replica to do: a narrow, typed vocabulary that
//! knows nothing about binlog events, so the source (decoding, ordering,
//! positions) and the applier (SQLite) can change independently.

use rusqlite::types::{Value, ValueRef};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;

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

/// As `XA COMMIT` would spell it: `'gtrid'[,'bqual'[,formatID]]`, each
/// part quoted when it is printable ASCII, `X'…'` otherwise (the canonical
/// form is `gtrid_hex,bqual_hex,formatID`).
impl std::fmt::Display for Xid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<&str> = self.0.split(',').collect();
        let [gtrid, bqual, format_id] = parts[..] else { return f.write_str(&self.0) };
        let part = |hex: &str| -> String {
            let bytes: Option<Vec<u8>> =
                (0..hex.len() / 2 * 2).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect();
            match bytes {
                Some(b)
                    if hex.len() % 2 == 0
                        && b.iter().all(|c| (0x20..0x7f).contains(c) && *c != b'\'' && *c != b'\\') =>
                {
                    format!("'{}'", String::from_utf8_lossy(&b))
                }
                _ => format!("X'{hex}'"),
            }
        };
        write!(f, "{}", part(gtrid))?;
        if !bqual.is_empty() || !matches!(format_id, "" | "1") {
            write!(f, ",{}", part(bqual))?;
        }
        if !matches!(format_id, "" | "1") {
            write!(f, ",{format_id}")?;
        }
        Ok(())
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

/// The replicator → publisher channel of [`CommitNotice`]s. It never blocks
/// the replicator, yet what waits in it stays bounded: the row images of
/// the notices not yet received count against [`CHANGE_CAP`], and a notice
/// that would pass it is sent without its images (its touched tables then
/// count as "unknown", and the views reading them are recomputed in full,
/// which is what the publisher does anyway once merged images pass the
/// cap). Without the bound a publisher busy with a long publish let a
/// catch-up queue every batch's images: 429 MB peak RSS for 1,000,000
/// watched rows in 1,000 transactions (`cargo bench --bench pipeline --
/// backlog`).
pub fn notice_channel() -> (NoticeSender, NoticeReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let images = Arc::new(AtomicUsize::new(0));
    (NoticeSender { tx, images: images.clone() }, NoticeReceiver { rx, images })
}

/// The sending half of [`notice_channel`].
#[derive(Debug, Clone)]
pub struct NoticeSender {
    tx: mpsc::UnboundedSender<CommitNotice>,
    /// Row images in notices sent and not yet received.
    images: Arc<AtomicUsize>,
}

impl NoticeSender {
    /// Sends `n`, without its row images when those waiting would pass
    /// [`CHANGE_CAP`]; [`Closed`] when the receiver is gone.
    pub fn send(&self, mut n: CommitNotice) -> Result<(), Closed> {
        let len = n.changes.len();
        if len > 0 && self.images.load(Ordering::Relaxed) + len > CHANGE_CAP {
            n.changes = ChangeSet::default();
        }
        let len = n.changes.len();
        self.images.fetch_add(len, Ordering::Relaxed);
        self.tx.send(n).map_err(|_| {
            self.images.fetch_sub(len, Ordering::Relaxed);
            Closed
        })
    }
}

/// The receiving half of a [`notice_channel`] is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the publisher stopped receiving commit notices")]
pub struct Closed;

/// The receiving half of [`notice_channel`].
#[derive(Debug)]
pub struct NoticeReceiver {
    rx: mpsc::UnboundedReceiver<CommitNotice>,
    images: Arc<AtomicUsize>,
}

impl NoticeReceiver {
    /// The next notice; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<CommitNotice> {
        let n = self.rx.recv().await?;
        self.received(&n);
        Some(n)
    }

    /// A notice already waiting, if any.
    pub fn try_recv(&mut self) -> Result<CommitNotice, mpsc::error::TryRecvError> {
        let n = self.rx.try_recv()?;
        self.received(&n);
        Ok(n)
    }

    fn received(&self, n: &CommitNotice) {
        self.images.fetch_sub(n.changes.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::{BinlogPosition, Checkpoint};

    /// A notice touching `t` with `rows` one-column row images.
    fn notice(rows: usize) -> CommitNotice {
        CommitNotice {
            touched: vec!["t".into()],
            checkpoint: Checkpoint { position: BinlogPosition::new("b.000001", 4), gtid: None },
            arrived: Instant::now(),
            full: false,
            schema_changed: false,
            trigger: None,
            changes: ChangeSet {
                tables: vec![TableDelta { table: "t".into(), columns: 1, values: vec![Value::Integer(1); rows] }],
            },
        }
    }

    #[test]
    fn waiting_row_images_stay_within_the_cap() {
        let (tx, mut rx) = notice_channel();
        tx.send(notice(CHANGE_CAP - 5_000)).unwrap();
        // Would pass the cap while the first still waits: sent without its
        // images, its table still touched (so its views recompute in full).
        tx.send(notice(10_000)).unwrap();
        // Fits what is left.
        tx.send(notice(5_000)).unwrap();
        let a = rx.try_recv().unwrap();
        let b = rx.try_recv().unwrap();
        let c = rx.try_recv().unwrap();
        assert_eq!((a.changes.len(), b.changes.len(), c.changes.len()), (CHANGE_CAP - 5_000, 0, 5_000));
        assert_eq!(b.touched, vec!["t".to_owned()]);
        assert!(b.changes.get("t").is_none(), "the dropped notice's table reads as unknown");
        // Everything received: the whole cap is available again.
        tx.send(notice(CHANGE_CAP)).unwrap();
        assert_eq!(rx.try_recv().unwrap().changes.len(), CHANGE_CAP);
    }

    #[test]
    fn a_notice_sent_to_a_closed_channel_is_not_counted() {
        let (tx, rx) = notice_channel();
        drop(rx);
        assert!(tx.send(notice(CHANGE_CAP)).is_err());
        assert_eq!(tx.images.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn xids_show_as_xa_commit_spells_them() {
        let shown = |c: &str| Xid(c.to_owned()).to_string();
        assert_eq!(shown("676170,,1"), "'gap'");
        assert_eq!(shown("6131,6232,7"), "'a1','b2',7");
        assert_eq!(shown("6131,,2"), "'a1','',2");
        assert_eq!(shown("00ff,27,1"), "X'00ff',X'27'");
        assert_eq!(shown("not canonical"), "not canonical");
    }
}
