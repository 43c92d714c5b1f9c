//! Keys in doubt: the write-ahead half of the publishing invariant.
//!
//! memcached and the bookkeeping (`_tailcache_published`) are two stores
//! with no shared transaction. The rule that keeps them honest: for every
//! key, either the bookkeeping's record equals what memcached holds, or the
//! key is *in doubt*. Before a round sends anything to memcached, the keys
//! it is about to set or delete are written here, as one row (the round's
//! key list), and committed. Once memcached acknowledged every op and the
//! bookkeeping recorded the outcome, the row is no longer needed and is
//! deleted (lazily, in the same commit as the next round's row, so a round
//! costs one commit here). A row still present is a round whose outcome is
//! unknown: the process died between the two stores, a server timed out
//! (it may have applied the set anyway), a connection broke mid-batch.
//!
//! Such rows are *absorbed* before the next round (at start, and after any
//! round that failed): every key they name is recorded in the bookkeeping
//! with [`DOUBT`], a hash no entry has. From then on the normal machinery
//! heals them: a key the view still produces differs from its record and is
//! set again; a key the view no longer produces is recorded, so it is
//! deleted (a key never recorded before, whose first set may have landed,
//! is thereby remembered too). The rows are deleted only after that
//! bookkeeping commit, so a crash in between absorbs them again (it is
//! idempotent).
//!
//! Why a file of its own (`<state>.in-doubt`, WAL, `synchronous=NORMAL`):
//! the mark must be durable *before* memcached is written, and a full
//! publish writes memcached while the round's read transaction is open on
//! the replica. Under a rollback journal (attached schemas) no connection
//! can commit to the state file then. A separate file commits at any time,
//! and under WAL it costs the same. Its WAL is checkpointed by a thread of
//! its own ([`super::checkpoint`]), never inside a mark (a checkpoint
//! fsyncs). `synchronous=NORMAL` survives a crash
//! of the process (the data is in the OS's page cache), which is the
//! failure this guards against; a crash of the whole host can also roll the
//! replica and the bookkeeping back, see the README.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::published::{Change, Published};
use crate::error::{Error, Result};

pub use super::published::DOUBT;

/// The side file next to the state file.
pub fn path(state: &Path) -> PathBuf {
    let mut name = state.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    // A schema name (attached files are `<state>.<schema>`) cannot hold a
    // hyphen, so this never clashes with one.
    name.push(".in-doubt");
    state.with_file_name(name)
}

/// The keys in doubt, and which of them can be let go.
pub struct InDoubt {
    conn: Connection,
    /// Id of the next round's row.
    next: i64,
    /// Rows written by this round whose ops all succeeded, waiting for the
    /// bookkeeping to record them.
    written: Vec<i64>,
    /// Rows whose outcome is recorded: deleted with the next row.
    settled: Vec<i64>,
    /// Rows of rounds that failed or of a previous process: absorbed
    /// before the next round.
    unsettled: bool,
}

fn ctx(what: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| Error::sqlite(what, e)
}

impl InDoubt {
    /// Opens (creating) the side file of `state`.
    pub fn open(state: &Path) -> Result<InDoubt> {
        let p = path(state);
        let conn = Connection::open_with_flags(
            &p,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| Error::sqlite(format!("open {}", p.display()), e))?;
        let mut doubt = Self::with_connection(conn)?;
        // Checkpoints on a thread of their own, not inside a mark (on the
        // commit -> memcached path: a checkpoint fsyncs, 1-8 ms measured).
        match Connection::open_with_flags(&p, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX) {
            Ok(own) => super::checkpoint::start_with(&mut doubt.conn, own),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the in-doubt file for WAL checkpoints; SQLite checkpoints in the mark")
            }
        }
        Ok(doubt)
    }

    /// Uses `conn` (a file or, in unit tests, memory).
    pub fn with_connection(conn: Connection) -> Result<InDoubt> {
        conn.pragma_update(None, "journal_mode", "WAL").map_err(ctx("set journal_mode of the in-doubt file"))?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(ctx("set synchronous of the in-doubt file"))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS _tailcache_in_doubt (round INTEGER PRIMARY KEY, keys BLOB NOT NULL)",
        )
        .map_err(ctx("create _tailcache_in_doubt"))?;
        let (max, rows): (Option<i64>, i64) = conn
            .query_row("SELECT max(round), count(*) FROM _tailcache_in_doubt", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(ctx("read _tailcache_in_doubt"))?;
        Ok(InDoubt { conn, next: max.unwrap_or(0) + 1, written: Vec::new(), settled: Vec::new(), unsettled: rows > 0 })
    }

    /// Whether rows of failed rounds (or of a previous process) wait to be
    /// absorbed.
    pub fn unsettled(&self) -> bool {
        self.unsettled
    }

    /// Marks the keys of `changes` in doubt, durably, before their ops are
    /// sent. Returns the row's id, for [`Self::succeeded`].
    pub fn mark(&mut self, changes: &[Change]) -> Result<Option<i64>> {
        if changes.is_empty() {
            return Ok(None);
        }
        let mut blob = Vec::with_capacity(changes.iter().map(|c| c.key().len() + 12).sum());
        for c in changes {
            let (Change::Put { view, key, .. } | Change::Remove { view, key }) = c;
            push_part(&mut blob, view.as_bytes());
            push_part(&mut blob, key);
        }
        let id = self.next;
        let tx = self.conn.unchecked_transaction().map_err(ctx("mark keys in doubt"))?;
        if !self.settled.is_empty() {
            let mut del = tx
                .prepare_cached("DELETE FROM _tailcache_in_doubt WHERE round = ?1")
                .map_err(ctx("mark keys in doubt"))?;
            for r in &self.settled {
                del.execute([r]).map_err(ctx("mark keys in doubt"))?;
            }
        }
        tx.prepare_cached("INSERT INTO _tailcache_in_doubt (round, keys) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute((id, &blob)))
            .map_err(ctx("mark keys in doubt"))?;
        tx.commit().map_err(ctx("mark keys in doubt"))?;
        self.settled.clear();
        self.next += 1;
        crate::failpoint!("publish.after_doubt_mark");
        Ok(Some(id))
    }

    /// Every op of row `id` was acknowledged: once its outcome is recorded
    /// ([`Self::recorded`]) the row can go.
    pub fn succeeded(&mut self, id: Option<i64>) {
        self.written.extend(id);
    }

    /// Deletes the rows whose outcome is recorded now rather than with the
    /// next round's (when idle, and at shutdown: a restart then has
    /// nothing to absorb).
    pub fn flush(&mut self) -> Result<()> {
        if self.settled.is_empty() {
            return Ok(());
        }
        let tx = self.conn.unchecked_transaction().map_err(ctx("clear _tailcache_in_doubt"))?;
        {
            let mut del = tx
                .prepare_cached("DELETE FROM _tailcache_in_doubt WHERE round = ?1")
                .map_err(ctx("clear _tailcache_in_doubt"))?;
            for r in &self.settled {
                del.execute([r]).map_err(ctx("clear _tailcache_in_doubt"))?;
            }
        }
        tx.commit().map_err(ctx("clear _tailcache_in_doubt"))?;
        self.settled.clear();
        Ok(())
    }

    /// Some op of row `id` failed or is unknown: the row stays until it is
    /// absorbed.
    pub fn failed(&mut self, _id: Option<i64>) {
        self.unsettled = true;
    }

    /// The bookkeeping committed the outcome of every row that succeeded.
    pub fn recorded(&mut self) {
        self.settled.append(&mut self.written);
    }

    /// A round ended without recording (an error): rows that succeeded
    /// were not recorded, so they count as failed.
    pub fn abandon(&mut self) {
        if !self.written.is_empty() {
            self.written.clear();
            self.unsettled = true;
        }
    }

    /// Records every key of the rows left over as [`DOUBT`] in the
    /// bookkeeping (one commit on `book`), then deletes the rows.
    pub fn absorb(&mut self, book: &Connection, published: &mut Published) -> Result<Absorbed> {
        self.abandon();
        let rows: Vec<(i64, Vec<u8>)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT round, keys FROM _tailcache_in_doubt ORDER BY round")
                .map_err(ctx("read _tailcache_in_doubt"))?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(ctx("read _tailcache_in_doubt"))?
                .collect::<rusqlite::Result<_>>()
                .map_err(ctx("read _tailcache_in_doubt"))?
        };
        let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
        let mut malformed = 0;
        for (round, blob) in &rows {
            match parse(blob) {
                Some(parsed) => keys.extend(parsed),
                // Written by this module only, and a row commits whole: only
                // a damaged file gets here. Its keys are unknown, which the
                // caller heals with a full resync (read-back, orphan sweep).
                None => {
                    tracing::error!(round, "a row of the in-doubt file is malformed; a full resync will follow");
                    malformed += 1;
                }
            }
        }
        let n = keys.len();
        if n > 0 {
            published.doubt(book, &keys)?;
        }
        let tx = self.conn.unchecked_transaction().map_err(ctx("clear _tailcache_in_doubt"))?;
        {
            let mut del = tx
                .prepare_cached("DELETE FROM _tailcache_in_doubt WHERE round = ?1")
                .map_err(ctx("clear _tailcache_in_doubt"))?;
            for (r, _) in &rows {
                del.execute([r]).map_err(ctx("clear _tailcache_in_doubt"))?;
            }
        }
        tx.commit().map_err(ctx("clear _tailcache_in_doubt"))?;
        self.settled.clear();
        self.unsettled = false;
        Ok(Absorbed { keys: n, malformed })
    }
}

/// What [`InDoubt::absorb`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Absorbed {
    /// Keys recorded as in doubt (a key counts once per row naming it).
    pub keys: usize,
    /// Rows that could not be read: their keys are unknown.
    pub malformed: usize,
}

fn push_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_le_bytes());
    out.extend_from_slice(part);
}

/// The (view, key) pairs of one row; `None` when it is malformed.
fn parse(mut blob: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let take = |b: &mut &[u8]| -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let part = b.get(4..4 + len)?.to_vec();
        *b = &b[4 + len..];
        Some(part)
    };
    while !blob.is_empty() {
        let view = String::from_utf8(take(&mut blob)?).ok()?;
        let key = take(&mut blob)?;
        out.push((view, key));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn put(view: &str, key: &str) -> Change {
        Change::Put { view: Arc::from(view), key: key.into(), hash: [7; 16], vhash: [7; 16] }
    }

    #[test]
    fn rows_encode_and_parse_back() {
        let mut blob = Vec::new();
        for (v, k) in [("v", &b"k 1"[..]), ("view", b""), ("w", &[0xff, 0])] {
            push_part(&mut blob, v.as_bytes());
            push_part(&mut blob, k);
        }
        let parsed = parse(&blob).unwrap();
        assert_eq!(parsed[0], ("v".to_owned(), b"k 1".to_vec()));
        assert_eq!(parsed[2], ("w".to_owned(), vec![0xff, 0]));
        assert!(parse(&blob[..blob.len() - 1]).is_none(), "a torn row is malformed");
    }

    #[test]
    fn a_failed_round_leaves_its_keys_in_doubt_until_absorbed() {
        let dir =
            std::env::temp_dir().join(format!("tc-doubt-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = dir.join("state.db");
        let book = Connection::open_in_memory().unwrap();
        let mut published = Published::load(&book).unwrap();
        published.record(&book, &[put("v", "old")], None).unwrap();

        let mut d = InDoubt::open(&state).unwrap();
        assert!(!d.unsettled());
        // Round 1 succeeds and is recorded: its row goes with round 2's.
        let r1 = d.mark(&[put("v", "a")]).unwrap();
        d.succeeded(r1);
        d.recorded();
        // Round 2's ops fail: it stays.
        let r2 = d.mark(&[put("v", "old"), put("v", "new")]).unwrap();
        d.failed(r2);
        assert!(d.unsettled());
        // Round 3 is acknowledged but the process dies before recording.
        let r3 = d.mark(&[put("w", "x")]).unwrap();
        d.succeeded(r3);
        drop(d);

        let mut d = InDoubt::open(&state).unwrap();
        assert!(d.unsettled(), "rows of a previous process are in doubt");
        assert_eq!(d.absorb(&book, &mut published).unwrap().keys, 3, "round 2's two keys and round 3's");
        assert_eq!(Published::hash(&book, "v", b"old").unwrap(), Some(DOUBT));
        assert_eq!(Published::hash(&book, "v", b"new").unwrap(), Some(DOUBT), "a key never recorded is remembered");
        assert_eq!(Published::hash(&book, "w", b"x").unwrap(), Some(DOUBT));
        assert_eq!(Published::hash(&book, "v", b"a").unwrap(), None, "round 1 was settled");
        assert_eq!((published.keys("v"), published.keys("w")), (2, 1));
        assert!(!d.unsettled());
        drop(d);
        let mut d = InDoubt::open(&state).unwrap();
        assert!(!d.unsettled(), "absorbed rows are gone");
        assert_eq!(d.absorb(&book, &mut published).unwrap(), Absorbed::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
