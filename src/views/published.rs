//! What memcached was last given, persisted in the state file.
//!
//! `_tailcache_published(view, key, hash, vhash)` holds, for every key a
//! view has written, the hash of the entry written (`hash`, of its payload:
//! see [`super::encode::entry_hash`]) and the hash of the bytes and flags
//! memcached was given (`vhash`, see [`value_hash`]; what the consistency
//! inspector, [`super::inspect`], compares what memcached holds with;
//! `NULL` in rows written before it existed). A computed view is diffed
//! against it: entries that are new or whose hash changed become sets,
//! published keys the view no longer produces become deletes. Once
//! memcached has acknowledged the ops, [`Published::record`] stores the new
//! hashes and forgets the deleted keys in one write transaction. A restart
//! thus neither rewrites unchanged keys nor forgets what to delete.
//!
//! Nothing here holds a view's keys in memory: a view of a million keys
//! would cost hundreds of MB. Hashes are looked up in the table, on a
//! connection of their own (the "book"), and a view computed in full is
//! diffed piece by piece, in a [`Sweep`]: each piece's keys are marked in a
//! TEMP table (kept in a temporary file, not in memory), and once the view
//! is complete the published keys it did not mark are the ones that left.
//! Only per-view key counts are kept, for the status.
//!
//! Keys of a view that is no longer configured are deleted by the first
//! publish after start-up (every round includes them until they are gone).
//!
//! `_tailcache_epoch` holds the token of the sink's sentinel key after the
//! last acknowledged full republish (see [`crate::sink`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use xxhash_rust::xxh3::Xxh3;

use super::{ComputedView, Entry, ViewSet};
use crate::config::Codec;
use crate::error::{Error, Result};
use crate::sink::{Held, Op, Rejection};
use crate::status::ResyncCounts;

/// The keys a [`Sweep`] has marked; TEMP, so per connection.
const SEEN_TABLE: &str = "CREATE TEMP TABLE IF NOT EXISTS _tailcache_seen (key BLOB PRIMARY KEY) WITHOUT ROWID";

/// The hash recorded for a key in doubt (see [`super::doubt`]). Entry
/// hashes are xxh3-128 of the payload: this value is never one in practice
/// (2^-128).
pub const DOUBT: [u8; 16] = [0; 16];

/// Creates the bookkeeping tables when missing.
pub fn ensure_tables(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _tailcache_published (
            view TEXT NOT NULL,
            key BLOB NOT NULL,
            hash BLOB NOT NULL,
            vhash BLOB,
            PRIMARY KEY (view, key)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS _tailcache_epoch (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            token BLOB NOT NULL
        );",
    )
    .map_err(|e| Error::sqlite("create _tailcache_published", e))?;
    // State files written before the inspector have no `vhash`: added
    // (NULL in every existing row, which the inspector skips until the key
    // is written again).
    let has_vhash = conn
        .prepare("SELECT 1 FROM pragma_table_info('_tailcache_published') WHERE name = 'vhash'")
        .and_then(|mut s| s.exists([]))
        .map_err(|e| Error::sqlite("read the columns of _tailcache_published", e))?;
    if !has_vhash {
        conn.execute_batch("ALTER TABLE _tailcache_published ADD COLUMN vhash BLOB")
            .map_err(|e| Error::sqlite("add column vhash to _tailcache_published", e))?;
    }
    Ok(())
}

/// The hash of a value as memcached holds it: xxh3-128 of its client
/// flags and bytes. For `dogpile`, whose value carries its computation
/// time, the wrapper's `ct` float is left out (as [`same_value`] does), so
/// an identical entry computed at another time hashes the same.
pub fn value_hash(codec: Codec, value: &[u8], flags: u32) -> [u8; 16] {
    let mut h = Xxh3::new();
    h.update(&flags.to_le_bytes());
    match dogpile_float(codec, value) {
        Some((start, end)) => {
            h.update(&value[..start]);
            h.update(&value[end..]);
        }
        None => h.update(value),
    }
    h.digest128().to_be_bytes()
}

/// Where a `dogpile` value's `ct` float is: in `[value, {"ct": <f64>,
/// "v": 2}]` the metadata map is the last 16 bytes, of which the f64 is
/// bytes 5..13 (after its 0xcb marker, which stays in what is compared).
fn dogpile_float(codec: Codec, value: &[u8]) -> Option<(usize, usize)> {
    let n = value.len();
    (codec == Codec::Dogpile && n >= 17 && value[n - 12] == 0xcb).then(|| (n - 11, n - 3))
}

/// The sentinel token stored after the last full republish.
pub fn read_epoch(conn: &Connection) -> Result<Option<Vec<u8>>> {
    conn.query_row("SELECT token FROM _tailcache_epoch WHERE id = 1", [], |r| r.get(0))
        .optional()
        .map_err(|e| Error::sqlite("read _tailcache_epoch", e))
}

/// A change to the bookkeeping, applied once memcached acknowledged. The
/// view name is shared by all changes of one view (one per entry of a full
/// publish: a copy each would cost an allocation per entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `vhash`: [`value_hash`] of the value written (or, for an entry a
    /// resync's read-back found identical, of the value held).
    Put {
        view: Arc<str>,
        key: Vec<u8>,
        hash: [u8; 16],
        vhash: [u8; 16],
    },
    Remove {
        view: Arc<str>,
        key: Vec<u8>,
    },
}

impl Change {
    pub fn key(&self) -> &[u8] {
        match self {
            Change::Put { key, .. } | Change::Remove { key, .. } => key,
        }
    }
}

/// Per-view counts of a plan, for the publish log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewCounts {
    pub view: String,
    pub set: usize,
    pub deleted: usize,
    /// On a full republish: entries whose value differed from what was
    /// last published (or had to be deleted), i.e. what incremental
    /// publishing had missed. Non-zero drift after a resync is worth a look.
    pub drift: usize,
}

impl ViewCounts {
    pub fn add(&mut self, o: &ViewCounts) {
        self.set += o.set;
        self.deleted += o.deleted;
        self.drift += o.drift;
    }
}

/// Ops for memcached plus the bookkeeping they imply.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub changes: Vec<Change>,
    pub counts: Vec<ViewCounts>,
}

/// What a [`Sweep`] found for one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// The hash recorded for the key, if any.
    pub published: Option<[u8; 16]>,
    /// An earlier piece of the same sweep had the key (rows rendering the
    /// same key: the later one wins, so it is written again).
    pub repeated: bool,
}

impl Mark {
    /// Whether the key is recorded with `hash` (and was not just written
    /// with another value by an earlier piece).
    pub fn current(&self, hash: &[u8; 16]) -> bool {
        !self.repeated && self.published.as_ref() == Some(hash)
    }
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// One piece of a view computed in full (see [`Sweep`]): a set for each
    /// entry not recorded with its hash.
    pub fn sets(view: &Arc<str>, entries: Vec<Entry>, marks: &[Mark], exptime: u32, codec: Codec) -> Plan {
        let mut plan = Plan::default();
        let mut counts = ViewCounts { view: view.to_string(), ..Default::default() };
        for (e, m) in entries.into_iter().zip(marks) {
            if !m.current(&e.hash) {
                let key = e.key.into_bytes();
                let vhash = value_hash(codec, &e.value, e.flags);
                plan.changes.push(Change::Put { view: view.clone(), key: key.clone(), hash: e.hash, vhash });
                plan.ops.push(Op::Set { key, value: e.value, flags: e.flags, exptime });
                counts.set += 1;
            }
        }
        plan.counts.push(counts);
        plan
    }

    /// Deletes of published keys that left `view`.
    pub fn deletes(view: &Arc<str>, keys: Vec<Vec<u8>>) -> Plan {
        let mut plan = Plan::default();
        let counts = ViewCounts { view: view.to_string(), deleted: keys.len(), ..Default::default() };
        for k in keys {
            plan.ops.push(Op::Delete { key: k.clone() });
            plan.changes.push(Change::Remove { view: view.clone(), key: k });
        }
        plan.counts.push(counts);
        plan
    }

    /// Takes memcached's per-entry refusals into account once the ops were
    /// applied: a refused set is not recorded as published (the entry is
    /// forgotten, so the next publish of its view tries again) and its key
    /// is returned, with its view, to be deleted rather than left stale.
    pub fn reject(&mut self, rejected: &[Rejection]) -> Vec<(String, Vec<u8>)> {
        if rejected.is_empty() {
            return Vec::new();
        }
        let keys: HashSet<&[u8]> = rejected.iter().filter(|r| r.verb == "set").map(|r| r.key.as_slice()).collect();
        let mut out = Vec::new();
        for c in &mut self.changes {
            if let Change::Put { view, key, .. } = c {
                if keys.contains(key.as_slice()) {
                    out.push((view.to_string(), key.clone()));
                    *c = Change::Remove { view: view.clone(), key: std::mem::take(key) };
                }
            }
        }
        for (view, _) in &out {
            if let Some(c) = self.counts.iter_mut().find(|c| c.view == *view) {
                c.set = c.set.saturating_sub(1);
            }
        }
        out
    }
}

/// A piece of a full resync of one view between computing and writing:
/// entries produced and keys published before that no longer belong,
/// waiting for what memcached holds ([`crate::sink::Sink::read_back`]).
#[derive(Debug)]
pub struct Resync {
    view: Arc<str>,
    /// (entry, already recorded with this hash)
    entries: Vec<(Entry, bool)>,
    stale: Vec<Vec<u8>>,
    codec: Codec,
    exptime: u32,
}

/// Whether `found` (read back from memcached) is the entry `expected`
/// encodes. For `dogpile`, whose value carries its computation time, the
/// wrapper's `ct` float is not compared: the payload and the rest of the
/// wrapper are.
pub fn same_value(codec: Codec, expected: &[u8], flags: u32, found: &[u8], found_flags: u32) -> bool {
    if flags != found_flags || expected.len() != found.len() {
        return false;
    }
    match dogpile_float(codec, expected) {
        Some((float_start, float_end)) => {
            expected[..float_start] == found[..float_start] && expected[float_end..] == found[float_end..]
        }
        None => expected == found,
    }
}

impl Resync {
    /// A piece of `view`: `entries` with their [`Mark`]s (one each), and
    /// `stale` published keys the view no longer produces.
    pub fn new(view: Arc<str>, viewset: &ViewSet, entries: Vec<Entry>, marks: &[Mark], stale: Vec<Vec<u8>>) -> Resync {
        let entries = entries
            .into_iter()
            .zip(marks)
            .map(|(e, m)| {
                let recorded = m.current(&e.hash);
                (e, recorded)
            })
            .collect();
        Resync { view, entries, stale, codec: viewset.codec(), exptime: viewset.exptime() }
    }

    pub fn view(&self) -> &Arc<str> {
        &self.view
    }

    /// Keys to read back: the entries' keys, then the stale keys.
    pub fn keys(&self) -> Vec<&[u8]> {
        self.entries.iter().map(|(e, _)| e.key.as_bytes()).chain(self.stale.iter().map(|k| k.as_slice())).collect()
    }

    /// The value size each key of [`keys`](Self::keys) should hold.
    pub fn expected_len(&self) -> Vec<usize> {
        self.entries.iter().map(|(e, _)| e.value.len()).chain(self.stale.iter().map(|_| 0)).collect()
    }

    /// Whether `value`/`flags` read back for key `i` of
    /// [`keys`](Self::keys) is what it should be. A stale key should not be
    /// there at all: found, it never is, so that one server still holding
    /// it makes it [`Held::Differs`] (deleted) even when another lacks it
    /// (the read-back keeps the worst answer, and `Missing` is worse than
    /// `Same`).
    pub fn same(&self, i: usize, value: &[u8], flags: u32) -> bool {
        match self.entries.get(i) {
            Some((e, _)) => same_value(self.codec, &e.value, e.flags, value, flags),
            None => false,
        }
    }

    /// Exptime of the entries, for touching identical ones while reading.
    pub fn exptime(&self) -> u32 {
        self.exptime
    }

    /// Turns what memcached holds (`held`, one per [`keys`](Self::keys))
    /// into the ops and bookkeeping: a set for each missing or different
    /// entry, a delete for each stale key still present, and a record of
    /// every entry not recorded with its hash yet (identical ones
    /// included) and the removal of every stale key. Also returns the
    /// counts of the report.
    pub fn plan(self, held: &[Held]) -> (Plan, ResyncCounts) {
        let mut plan = Plan::default();
        let mut counts = ResyncCounts::default();
        let mut view_counts = ViewCounts { view: self.view.to_string(), ..Default::default() };
        let n = self.entries.len();
        for (i, (e, recorded)) in self.entries.into_iter().enumerate() {
            counts.checked += 1;
            let h = held.get(i).copied().unwrap_or(Held::Missing);
            match h {
                Held::Same => counts.unchanged += 1,
                Held::Missing => counts.missing += 1,
                Held::Differs => counts.differed += 1,
            }
            let key = e.key.into_bytes();
            // Identical (ct aside, for dogpile) to what memcached holds
            // when not rewritten: the same value hash either way.
            let vhash = value_hash(self.codec, &e.value, e.flags);
            if h != Held::Same {
                plan.ops.push(Op::Set { key: key.clone(), value: e.value, flags: e.flags, exptime: self.exptime });
                view_counts.set += 1;
                view_counts.drift += 1;
            }
            // Rewritten entries are recorded even when their hash is, so a
            // refusal of the rewrite (Plan::reject) can unrecord them.
            if !recorded || h != Held::Same {
                plan.changes.push(Change::Put { view: self.view.clone(), key, hash: e.hash, vhash });
            }
        }
        for (j, key) in self.stale.into_iter().enumerate() {
            if held.get(n + j).copied().unwrap_or(Held::Differs) != Held::Missing {
                plan.ops.push(Op::Delete { key: key.clone() });
                counts.deleted += 1;
                view_counts.deleted += 1;
                view_counts.drift += 1;
            }
            plan.changes.push(Change::Remove { view: self.view.clone(), key });
        }
        plan.counts.push(view_counts);
        (plan, counts)
    }
}

/// One pass over a view computed in full, piece by piece (see the module
/// docs): [`Published::mark`] each piece, then [`Published::unseen`] gives
/// the published keys that left.
#[derive(Debug)]
pub struct Sweep {
    view: Arc<str>,
    /// The view had published keys when the sweep began. Without, there
    /// is nothing to look up and nothing can have left the view: no keys
    /// are marked, and every entry is written (one that an earlier piece
    /// already had too, so the later row still wins).
    lookup: bool,
    /// Entries whose key an earlier piece already had (not counted in a
    /// sweep of a view without published keys, which marks nothing).
    pub repeated: usize,
}

impl Sweep {
    pub fn view(&self) -> &Arc<str> {
        &self.view
    }
}

const LOOKUP: &str = "SELECT hash FROM main._tailcache_published WHERE view = ?1 AND key = ?2";

fn hash_of(stmt: &mut rusqlite::CachedStatement<'_>, view: &str, key: &[u8]) -> rusqlite::Result<Option<[u8; 16]>> {
    // A malformed hash just compares unequal: the entry is rewritten.
    stmt.query_row((view, key), |r| r.get::<_, Vec<u8>>(0))
        .optional()
        .map(|h| h.map(|h| <[u8; 16]>::try_from(h.as_slice()).unwrap_or_default()))
}

/// The per-view key counts of `_tailcache_published` (the keys themselves
/// stay in the table).
#[derive(Debug, Clone, Default)]
pub struct Published {
    counts: HashMap<String, u64>,
}

impl Published {
    /// Creates the tables when missing and counts the keys of each view.
    pub fn load(book: &Connection) -> Result<Published> {
        ensure_tables(book)?;
        let ctx = |e| Error::sqlite("read _tailcache_published", e);
        let mut stmt = book.prepare("SELECT view, count(*) FROM _tailcache_published GROUP BY view").map_err(ctx)?;
        let counts = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(ctx)?
            .collect::<rusqlite::Result<HashMap<_, _>>>()
            .map_err(ctx)?;
        Ok(Published { counts })
    }

    /// Number of keys published for `view`.
    pub fn keys(&self, view: &str) -> u64 {
        self.counts.get(view).copied().unwrap_or(0)
    }

    /// The views with published keys.
    pub fn view_names(&self) -> Vec<String> {
        self.counts.keys().cloned().collect()
    }

    /// Number of published keys over all views.
    pub fn len(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Views with published keys that `viewset` no longer has.
    pub fn orphan_views(&self, viewset: &ViewSet) -> Vec<String> {
        let mut v: Vec<String> = self
            .counts
            .iter()
            .filter(|(name, n)| {
                **n > 0 && !viewset.views().iter().any(|c| c.name() == name.as_str()) && !viewset.keeps_keys_of(name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        v.sort();
        v
    }

    /// The hash recorded for `key` of `view`.
    pub fn hash(book: &Connection, view: &str, key: &[u8]) -> Result<Option<[u8; 16]>> {
        let ctx = |e| Error::sqlite("read _tailcache_published", e);
        let mut stmt = book.prepare_cached(LOOKUP).map_err(ctx)?;
        hash_of(&mut stmt, view, key).map_err(ctx)
    }

    /// Published keys of `view` after `after` (all when empty), in order,
    /// at most `limit`.
    pub fn keys_after(book: &Connection, view: &str, after: &[u8], limit: usize) -> Result<Vec<Vec<u8>>> {
        let ctx = |e| Error::sqlite("read _tailcache_published", e);
        let mut stmt = book
            .prepare_cached(
                "SELECT key FROM main._tailcache_published WHERE view = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
            )
            .map_err(ctx)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        stmt.query_map((view, after, limit), |r| r.get(0)).map_err(ctx)?.collect::<rusqlite::Result<_>>().map_err(ctx)
    }

    /// Starts a [`Sweep`] of `view` on `book`.
    pub fn begin(&self, book: &Connection, view: &str) -> Result<Sweep> {
        let lookup = self.keys(view) > 0;
        if lookup {
            let ctx = |e| Error::sqlite("start a sweep of published keys", e);
            book.execute_batch(SEEN_TABLE).map_err(ctx)?;
            book.prepare_cached("DELETE FROM temp._tailcache_seen").and_then(|mut s| s.execute([])).map_err(ctx)?;
        }
        Ok(Sweep { view: Arc::from(view), lookup, repeated: 0 })
    }

    /// Marks the keys of one piece of the sweep's view and returns, for
    /// each entry, what is recorded for its key.
    pub fn mark(book: &Connection, sweep: &mut Sweep, entries: &[Entry]) -> Result<Vec<Mark>> {
        if !sweep.lookup {
            // Nothing was published for the view: every entry is written
            // (a key repeated from an earlier piece too), and nothing can
            // have left it.
            return Ok(vec![Mark { published: None, repeated: false }; entries.len()]);
        }
        let ctx = |e| Error::sqlite("mark published keys", e);
        // One transaction for the piece, unless `book` is already in one
        // (the reader's, under a rollback journal).
        let tx = if book.is_autocommit() {
            Some(Transaction::new_unchecked(book, TransactionBehavior::Deferred).map_err(ctx)?)
        } else {
            None
        };
        let mut marks = Vec::with_capacity(entries.len());
        {
            let mut seen = book
                .prepare_cached("INSERT INTO temp._tailcache_seen (key) VALUES (?1) ON CONFLICT DO NOTHING")
                .map_err(ctx)?;
            let mut get = book.prepare_cached(LOOKUP).map_err(ctx)?;
            for e in entries {
                let key = e.key.as_bytes();
                let repeated = seen.execute([key]).map_err(ctx)? == 0;
                sweep.repeated += usize::from(repeated);
                let published = if sweep.lookup { hash_of(&mut get, &sweep.view, key).map_err(ctx)? } else { None };
                marks.push(Mark { published, repeated });
            }
        }
        tx.map(Transaction::commit).transpose().map_err(ctx)?;
        Ok(marks)
    }

    /// Published keys of the sweep's view that no piece marked, after
    /// `after` (all when empty), in order, at most `limit`.
    pub fn unseen(book: &Connection, sweep: &Sweep, after: &[u8], limit: usize) -> Result<Vec<Vec<u8>>> {
        if !sweep.lookup {
            return Ok(Vec::new());
        }
        let ctx = |e| Error::sqlite("read _tailcache_published", e);
        let mut stmt = book
            .prepare_cached(
                "SELECT p.key FROM main._tailcache_published p
                 WHERE p.view = ?1 AND p.key > ?2
                   AND NOT EXISTS (SELECT 1 FROM temp._tailcache_seen s WHERE s.key = p.key)
                 ORDER BY p.key LIMIT ?3",
            )
            .map_err(ctx)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        stmt.query_map((&*sweep.view, after, limit), |r| r.get(0))
            .map_err(ctx)?
            .collect::<rusqlite::Result<_>>()
            .map_err(ctx)
    }

    /// Ends a sweep, forgetting its marks.
    pub fn end(book: &Connection, sweep: Sweep) -> Result<()> {
        if !sweep.lookup {
            return Ok(());
        }
        book.prepare_cached("DELETE FROM temp._tailcache_seen")
            .and_then(|mut s| s.execute([]))
            .map(drop)
            .map_err(|e| Error::sqlite("end a sweep of published keys", e))
    }

    /// The ops turning what was published into `computed`, whose views are
    /// small: incremental results (published keys of their scope that are
    /// not entries left the view) and single-entry `map`/`list` views (all
    /// their published keys are read). A view computed in full in pieces
    /// goes through a [`Sweep`] instead. Views not in `computed` are left
    /// alone.
    pub fn diff(&self, book: &Connection, computed: Vec<ComputedView>, viewset: &ViewSet) -> Result<Plan> {
        let ctx = |e| Error::sqlite("read _tailcache_published", e);
        let mut plan = Plan::default();
        let (exptime, codec) = (viewset.exptime(), viewset.codec());
        let mut get = book.prepare_cached(LOOKUP).map_err(ctx)?;
        for c in computed {
            let mut counts = ViewCounts { view: c.view.clone(), ..Default::default() };
            let name: Arc<str> = Arc::from(c.view.as_str());
            let mut gone: Vec<Vec<u8>> = {
                let present: HashSet<&[u8]> = c.entries.iter().map(|e| e.key.as_bytes()).collect();
                match &c.scope {
                    // Incremental: only the keys in scope can have left.
                    Some(scope) => {
                        let mut gone = Vec::new();
                        for k in scope.iter().map(String::as_bytes).filter(|k| !present.contains(k)) {
                            if hash_of(&mut get, &c.view, k).map_err(ctx)?.is_some() {
                                gone.push(k.to_vec());
                            }
                        }
                        gone
                    }
                    None => Self::keys_after(book, &c.view, &[], usize::MAX)?
                        .into_iter()
                        .filter(|k| !present.contains(k.as_slice()))
                        .collect(),
                }
            };
            gone.sort();
            for e in c.entries {
                if hash_of(&mut get, &c.view, e.key.as_bytes()).map_err(ctx)? != Some(e.hash) {
                    let key = e.key.into_bytes();
                    let vhash = value_hash(codec, &e.value, e.flags);
                    plan.changes.push(Change::Put { view: name.clone(), key: key.clone(), hash: e.hash, vhash });
                    plan.ops.push(Op::Set { key, value: e.value, flags: e.flags, exptime });
                    counts.set += 1;
                }
            }
            for k in gone {
                plan.ops.push(Op::Delete { key: k.clone() });
                plan.changes.push(Change::Remove { view: name.clone(), key: k });
                counts.deleted += 1;
            }
            plan.counts.push(counts);
        }
        Ok(plan)
    }

    /// Records each `(view, key)` as [`DOUBT`] (a key not
    /// recorded before is added), in one write transaction on `book`: the
    /// next computation of the view rewrites or deletes it, whatever was
    /// recorded.
    pub fn doubt(&mut self, book: &Connection, keys: &[(String, Vec<u8>)]) -> Result<()> {
        let ctx = |e| Error::sqlite("record keys in doubt", e);
        let tx = Transaction::new_unchecked(book, TransactionBehavior::Immediate).map_err(ctx)?;
        let mut delta: BTreeMap<&str, i64> = BTreeMap::new();
        {
            let mut insert = tx
                .prepare_cached("INSERT OR IGNORE INTO _tailcache_published (view, key, hash) VALUES (?1, ?2, ?3)")
                .map_err(ctx)?;
            let mut update = tx
                .prepare_cached("UPDATE _tailcache_published SET hash = ?3 WHERE view = ?1 AND key = ?2")
                .map_err(ctx)?;
            for (view, key) in keys {
                let args = (view.as_str(), key, &DOUBT[..]);
                if insert.execute(args).map_err(ctx)? == 1 {
                    *delta.entry(view).or_default() += 1;
                } else {
                    update.execute(args).map_err(ctx)?;
                }
            }
        }
        tx.commit().map_err(ctx)?;
        for (view, d) in delta {
            *self.counts.entry(view.to_owned()).or_default() += d as u64;
        }
        Ok(())
    }

    /// Stores `changes` (and the sentinel token after a full republish) in
    /// one write transaction on `book`, and keeps the key counts.
    pub fn record(&mut self, book: &Connection, changes: &[Change], epoch: Option<&[u8]>) -> Result<()> {
        if changes.is_empty() && epoch.is_none() {
            return Ok(());
        }
        let ctx = |e| Error::sqlite("record published keys", e);
        let tx = Transaction::new_unchecked(book, TransactionBehavior::Immediate).map_err(ctx)?;
        // Counted as the rows change, so a key put twice counts once. A new
        // key (every key, in a first publish) costs one statement.
        let mut delta: BTreeMap<&str, i64> = BTreeMap::new();
        {
            let mut update = tx
                .prepare_cached("UPDATE _tailcache_published SET hash = ?3, vhash = ?4 WHERE view = ?1 AND key = ?2")
                .map_err(ctx)?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO _tailcache_published (view, key, hash, vhash) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(ctx)?;
            let mut remove =
                tx.prepare_cached("DELETE FROM _tailcache_published WHERE view = ?1 AND key = ?2").map_err(ctx)?;
            for c in changes {
                match c {
                    Change::Put { view, key, hash, vhash } => {
                        let args = (&**view, key, &hash[..], &vhash[..]);
                        if insert.execute(args).map_err(ctx)? == 1 {
                            *delta.entry(view).or_default() += 1;
                        } else {
                            update.execute(args).map_err(ctx)?;
                        }
                    }
                    Change::Remove { view, key } => {
                        let n = remove.execute((&**view, key)).map_err(ctx)?;
                        *delta.entry(view).or_default() -= n as i64;
                    }
                }
            }
            if let Some(token) = epoch {
                tx.execute(
                    "INSERT INTO _tailcache_epoch (id, token) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET token = excluded.token",
                    [token],
                )
                .map_err(ctx)?;
            }
        }
        tx.commit().map_err(ctx)?;
        for (view, d) in delta {
            let n = self.counts.entry(view.to_owned()).or_default();
            *n = n.saturating_add_signed(d);
            if *n == 0 {
                self.counts.remove(view);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::encode::{dogpile_metadata, mp};

    fn entry(key: &str, value: &[u8], hash: u8) -> Entry {
        Entry { key: key.into(), value: value.to_vec(), flags: 0, hash: [hash; 16] }
    }

    #[test]
    fn an_old_state_file_gains_the_value_hash_column() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE _tailcache_published (view TEXT NOT NULL, key BLOB NOT NULL, hash BLOB NOT NULL,
             PRIMARY KEY (view, key)) WITHOUT ROWID;
             INSERT INTO _tailcache_published VALUES ('v', x'6b', x'00');",
        )
        .unwrap();
        let mut p = Published::load(&c).unwrap();
        ensure_tables(&c).unwrap(); // twice is fine
        let old: Option<Vec<u8>> = c.query_row("SELECT vhash FROM _tailcache_published", [], |r| r.get(0)).unwrap();
        assert_eq!(old, None, "existing rows have no value hash");
        let v: Arc<str> = "v".into();
        p.record(&c, &[Change::Put { view: v, key: b"k".to_vec(), hash: [1; 16], vhash: [2; 16] }], None).unwrap();
        let new: Vec<u8> = c.query_row("SELECT vhash FROM _tailcache_published", [], |r| r.get(0)).unwrap();
        assert_eq!(new, vec![2; 16]);
    }

    /// A dogpile value: `[payload, {"ct": ct, "v": 2}]`.
    fn dogpile_value(payload: &[u8], ct: f64) -> Vec<u8> {
        let mut b = Vec::new();
        mp::array_len(&mut b, 2);
        b.extend_from_slice(payload);
        dogpile_metadata(&mut b, ct);
        b
    }

    #[test]
    fn value_hashes_cover_bytes_and_flags_but_not_dogpiles_creation_time() {
        let wrap = dogpile_value;
        let (a, b) = (wrap(b"\xa3abc", 1.0), wrap(b"\xa3abc", 2.5));
        assert_eq!(value_hash(Codec::Dogpile, &a, 0), value_hash(Codec::Dogpile, &b, 0));
        assert_ne!(value_hash(Codec::Msgpack, &a, 0), value_hash(Codec::Msgpack, &b, 0));
        assert_ne!(value_hash(Codec::Dogpile, &a, 0), value_hash(Codec::Dogpile, &wrap(b"\xa3abd", 1.0), 0));
        assert_ne!(value_hash(Codec::Dogpile, &a, 0), value_hash(Codec::Dogpile, &a, 1), "flags count");
        assert_ne!(value_hash(Codec::Json, b"{}", 2), value_hash(Codec::Json, b"[]", 2));
        assert_eq!(value_hash(Codec::Json, b"{}", 2), value_hash(Codec::Json, b"{}", 2));
    }

    #[test]
    fn dogpile_values_compare_without_their_creation_time() {
        let wrap = dogpile_value;
        let (a, b) = (wrap(b"\xa3abc", 1.0), wrap(b"\xa3abc", 2.5));
        assert_ne!(a, b);
        assert!(same_value(Codec::Dogpile, &a, 0, &b, 0));
        assert!(!same_value(Codec::Msgpack, &a, 0, &b, 0));
        assert!(!same_value(Codec::Dogpile, &a, 0, &wrap(b"\xa3abd", 1.0), 0));
        assert!(!same_value(Codec::Dogpile, &a, 0, &b, 1), "flags differ");
        assert!(!same_value(Codec::Dogpile, &a, 0, &a[..a.len() - 1], 0));
        assert!(same_value(Codec::Json, b"{}", 0, b"{}", 0));
    }

    #[test]
    fn resync_plan_counts_and_ops() {
        // k1 and k2 recorded with their hashes, k3 not; two stale keys.
        let r = Resync {
            view: "v".into(),
            entries: vec![(entry("k1", b"a", 1), true), (entry("k2", b"b", 2), true), (entry("k3", b"c", 3), false)],
            stale: vec![b"gone".to_vec(), b"gone2".to_vec()],
            codec: Codec::Msgpack,
            exptime: 0,
        };
        assert_eq!(r.keys(), vec![&b"k1"[..], b"k2", b"k3", b"gone", b"gone2"]);
        assert!(r.same(0, b"a", 0) && !r.same(0, b"x", 0));
        assert!(!r.same(4, b"whatever", 9), "a stale key found is never as it should be");
        // k1 identical, k2 differs, k3 missing, gone present (on some
        // server), gone2 absent (everywhere)
        let (mut plan, counts) = r.plan(&[Held::Same, Held::Differs, Held::Missing, Held::Differs, Held::Missing]);
        assert_eq!(
            counts,
            ResyncCounts { checked: 3, missing: 1, differed: 1, deleted: 1, unchanged: 1, ..Default::default() }
        );
        assert_eq!(
            plan.ops.iter().map(|o| (o.key().to_vec(), matches!(o, Op::Set { .. }))).collect::<Vec<_>>(),
            vec![(b"k2".to_vec(), true), (b"k3".to_vec(), true), (b"gone".to_vec(), false)]
        );
        // k1 is recorded with its hash already: no change; k2 rewritten
        assert_eq!(plan.changes.len(), 4, "{:?}", plan.changes);
        assert_eq!(plan.counts[0].drift, 3);
        // memcached refuses k3: it is unrecorded and returned for deletion
        let refused = plan.reject(&[Rejection {
            server: "s".into(),
            verb: "set",
            key: b"k3".to_vec(),
            reason: "SERVER_ERROR object too large for cache".into(),
        }]);
        assert_eq!(refused, vec![("v".to_owned(), b"k3".to_vec())]);
        assert!(plan.changes.contains(&Change::Remove { view: "v".into(), key: b"k3".to_vec() }));
        assert_eq!(plan.counts[0].set, 1);
    }

    #[test]
    fn a_sweep_marks_pieces_and_finds_the_keys_that_left() {
        let c = Connection::open_in_memory().unwrap();
        let mut p = Published::load(&c).unwrap();
        let (v, w): (Arc<str>, Arc<str>) = ("v".into(), "w".into());
        let put = |view: &Arc<str>, k: &str, h: u8| Change::Put {
            view: view.clone(),
            key: k.into(),
            hash: [h; 16],
            vhash: [h; 16],
        };
        let changes: Vec<Change> = (1..=5).map(|i| put(&v, &format!("k{i}"), i)).chain([put(&w, "k1", 7)]).collect();
        p.record(&c, &changes, None).unwrap();
        assert_eq!((p.keys("v"), p.keys("w"), p.len()), (5, 1, 6));

        let mut sweep = p.begin(&c, "v").unwrap();
        let marks = Published::mark(&c, &mut sweep, &[entry("k1", b"a", 1), entry("k2", b"b", 9)]).unwrap();
        assert_eq!(marks[0], Mark { published: Some([1; 16]), repeated: false });
        assert!(marks[0].current(&[1; 16]) && !marks[1].current(&[9; 16]));
        // A later piece with k1 again: written again whatever is recorded.
        let marks = Published::mark(&c, &mut sweep, &[entry("k1", b"a", 1), entry("k6", b"f", 6)]).unwrap();
        assert!(marks[0].repeated && !marks[0].current(&[1; 16]));
        assert_eq!(marks[1], Mark { published: None, repeated: false });
        assert_eq!(sweep.repeated, 1);
        // Unmarked keys of v only (w's k1 is another view), in pages.
        let first = Published::unseen(&c, &sweep, &[], 2).unwrap();
        assert_eq!(first, vec![b"k3".to_vec(), b"k4".to_vec()]);
        assert_eq!(Published::unseen(&c, &sweep, b"k4", 2).unwrap(), vec![b"k5".to_vec()]);
        let plan =
            Plan::sets(&v, vec![entry("k2", b"b", 9), entry("k1", b"a", 1)], &[marks[1], marks[0]], 0, Codec::Msgpack);
        assert_eq!(plan.ops.len(), 2, "k2 not recorded with 9, k1 repeated");
        Published::end(&c, sweep).unwrap();
        let sweep = p.begin(&c, "v").unwrap();
        assert_eq!(Published::unseen(&c, &sweep, &[], 10).unwrap().len(), 5, "marks are forgotten");
        Published::end(&c, sweep).unwrap();
        // A view without keys marks nothing: every entry is written, one
        // an earlier piece recorded too, and nothing is unseen at the end.
        let mut sweep = p.begin(&c, "new").unwrap();
        let first = Published::mark(&c, &mut sweep, &[entry("n1", b"a", 1)]).unwrap();
        p.record(&c, &[put(&"new".into(), "n1", 1)], None).unwrap();
        let again = Published::mark(&c, &mut sweep, &[entry("n1", b"a", 1)]).unwrap();
        assert!(!first[0].current(&[1; 16]) && !again[0].current(&[1; 16]));
        assert!(Published::unseen(&c, &sweep, &[], 10).unwrap().is_empty());
        Published::end(&c, sweep).unwrap();
        p.record(&c, &[Change::Remove { view: "new".into(), key: b"n1".to_vec() }], None).unwrap();

        // Counts follow the rows: a re-put is no new key, a missing key
        // removed changes nothing.
        let remove = |k: &str| Change::Remove { view: v.clone(), key: k.into() };
        p.record(&c, &[put(&v, "k1", 2), remove("k3"), remove("nope"), put(&v, "k6", 6)], Some(b"tok")).unwrap();
        assert_eq!(p.keys("v"), 5);
        assert_eq!(Published::hash(&c, "v", b"k1").unwrap(), Some([2; 16]));
        assert_eq!(Published::hash(&c, "v", b"k3").unwrap(), None);
        assert_eq!(read_epoch(&c).unwrap(), Some(b"tok".to_vec()));
        assert_eq!(Published::load(&c).unwrap().keys("v"), 5, "counted again from the table");
        let removes: Vec<Change> = ["k1", "k2", "k4", "k5", "k6"].iter().map(|k| remove(k)).collect();
        p.record(&c, &removes, None).unwrap();
        assert_eq!((p.keys("v"), p.len()), (0, 1));
    }
}
