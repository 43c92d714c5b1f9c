//! What memcached was last given, persisted in the state file.
//!
//! `_tailcache_published(view, key, hash)` holds, for every key a view has
//! written, the hash of the entry written. A computed view is diffed
//! against it: entries that are new or whose hash changed become sets,
//! published keys the view no longer produces become deletes. Once
//! memcached has acknowledged the ops, [`Published::record`] stores the new
//! hashes and forgets the deleted keys in one write transaction. A restart
//! thus neither rewrites unchanged keys nor forgets what to delete.
//!
//! Keys of a view that is no longer configured are deleted by the first
//! publish after start-up (every diff includes them until they are gone).
//!
//! `_tailcache_epoch` holds the token of the sink's sentinel key after the
//! last acknowledged full republish (see [`crate::sink`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::{ComputedView, Entry, ViewSet};
use crate::config::Codec;
use crate::error::{Error, Result};
use crate::sink::{Held, Op, Rejection};
use crate::status::ResyncCounts;

/// Creates the bookkeeping tables when missing.
pub fn ensure_tables(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS _tailcache_published (
            view TEXT NOT NULL,
            key BLOB NOT NULL,
            hash BLOB NOT NULL,
            PRIMARY KEY (view, key)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS _tailcache_epoch (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            token BLOB NOT NULL
        );",
    )
    .map_err(|e| Error::sqlite("create _tailcache_published", e))
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
    Put { view: Arc<str>, key: Vec<u8>, hash: [u8; 16] },
    Remove { view: Arc<str>, key: Vec<u8> },
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

/// Ops for memcached plus the bookkeeping they imply.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub changes: Vec<Change>,
    pub counts: Vec<ViewCounts>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
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

/// A full resync between computing the views and writing: every entry
/// produced and every key published before that no longer belongs, waiting
/// for what memcached holds ([`crate::sink::Sink::read_back`]).
#[derive(Debug)]
pub struct Resync {
    views: Vec<String>,
    /// (view index, entry, already recorded with this hash)
    entries: Vec<(usize, Entry, bool)>,
    stale: Vec<(usize, Vec<u8>)>,
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
    match codec {
        Codec::Msgpack | Codec::Json | Codec::Pickle => expected == found,
        Codec::Dogpile => {
            // [value, {"ct": <f64>, "v": 2}]: the metadata map is 16 bytes,
            // of which the f64 is bytes 5..13.
            let n = expected.len();
            if n < 17 {
                return expected == found;
            }
            let (float_start, float_end) = (n - 11, n - 3);
            expected[..float_start] == found[..float_start]
                && expected[float_end..] == found[float_end..]
                && expected[float_start - 1] == 0xcb
        }
    }
}

impl Resync {
    /// Keys to read back: the entries' keys, then the stale keys.
    pub fn keys(&self) -> Vec<&[u8]> {
        self.entries
            .iter()
            .map(|(_, e, _)| e.key.as_bytes())
            .chain(self.stale.iter().map(|(_, k)| k.as_slice()))
            .collect()
    }

    /// The value size each key of [`keys`](Self::keys) should hold.
    pub fn expected_len(&self) -> Vec<usize> {
        self.entries.iter().map(|(_, e, _)| e.value.len()).chain(self.stale.iter().map(|_| 0)).collect()
    }

    /// Whether `value`/`flags` read back for key `i` of
    /// [`keys`](Self::keys) is what it should be (a stale key is only
    /// checked for presence).
    pub fn same(&self, i: usize, value: &[u8], flags: u32) -> bool {
        match self.entries.get(i) {
            Some((_, e, _)) => same_value(self.codec, &e.value, e.flags, value, flags),
            None => true,
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
    /// included) and the removal of every stale key. Also returns the per-view counts of the report.
    pub fn plan(self, held: &[Held]) -> (Plan, BTreeMap<String, ResyncCounts>) {
        let mut plan = Plan::default();
        let mut counts: Vec<ResyncCounts> = vec![ResyncCounts::default(); self.views.len()];
        let mut view_counts: Vec<ViewCounts> =
            self.views.iter().map(|v| ViewCounts { view: v.clone(), ..Default::default() }).collect();
        let names: Vec<Arc<str>> = self.views.iter().map(|v| Arc::from(v.as_str())).collect();
        let n = self.entries.len();
        for (i, (v, e, recorded)) in self.entries.into_iter().enumerate() {
            let c = &mut counts[v];
            c.checked += 1;
            let h = held.get(i).copied().unwrap_or(Held::Missing);
            match h {
                Held::Same => c.unchanged += 1,
                Held::Missing => c.missing += 1,
                Held::Differs => c.differed += 1,
            }
            let key = e.key.into_bytes();
            if h != Held::Same {
                plan.ops.push(Op::Set { key: key.clone(), value: e.value, flags: e.flags, exptime: self.exptime });
                view_counts[v].set += 1;
                view_counts[v].drift += 1;
            }
            // Rewritten entries are recorded even when their hash is, so a
            // refusal of the rewrite (Plan::reject) can unrecord them.
            if !recorded || h != Held::Same {
                plan.changes.push(Change::Put { view: names[v].clone(), key, hash: e.hash });
            }
        }
        for (j, (v, key)) in self.stale.into_iter().enumerate() {
            if held.get(n + j).copied().unwrap_or(Held::Same) != Held::Missing {
                plan.ops.push(Op::Delete { key: key.clone() });
                counts[v].deleted += 1;
                view_counts[v].deleted += 1;
                view_counts[v].drift += 1;
            }
            plan.changes.push(Change::Remove { view: names[v].clone(), key });
        }
        plan.counts = view_counts;
        let report = self.views.into_iter().zip(counts).collect();
        (plan, report)
    }
}

/// In-memory mirror of `_tailcache_published`.
#[derive(Debug, Clone, Default)]
pub struct Published {
    views: HashMap<String, HashMap<Vec<u8>, [u8; 16]>>,
}

impl Published {
    /// Loads the table (creating it when missing).
    pub fn load(conn: &Connection) -> Result<Published> {
        ensure_tables(conn)?;
        let mut p = Published::default();
        let mut stmt = conn
            .prepare("SELECT view, key, hash FROM _tailcache_published")
            .map_err(|e| Error::sqlite("read _tailcache_published", e))?;
        let mut rows = stmt.query([]).map_err(|e| Error::sqlite("read _tailcache_published", e))?;
        while let Some(r) = rows.next().map_err(|e| Error::sqlite("read _tailcache_published", e))? {
            let view: String = r.get(0).map_err(|e| Error::sqlite("read _tailcache_published", e))?;
            let key: Vec<u8> = r.get(1).map_err(|e| Error::sqlite("read _tailcache_published", e))?;
            let hash: Vec<u8> = r.get(2).map_err(|e| Error::sqlite("read _tailcache_published", e))?;
            // A malformed hash just compares unequal: the entry is rewritten.
            let hash = <[u8; 16]>::try_from(hash.as_slice()).unwrap_or_default();
            p.views.entry(view).or_default().insert(key, hash);
        }
        Ok(p)
    }

    /// Keys published for `view`, with their hashes.
    pub fn keys(&self, view: &str) -> Option<&HashMap<Vec<u8>, [u8; 16]>> {
        self.views.get(view)
    }

    /// Number of published keys over all views.
    pub fn len(&self) -> usize {
        self.views.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Views with published keys that `viewset` no longer has.
    pub fn orphan_views(&self, viewset: &ViewSet) -> Vec<String> {
        let mut v: Vec<String> = self
            .views
            .iter()
            .filter(|(name, keys)| {
                !keys.is_empty()
                    && !viewset.views().iter().any(|c| c.name() == name.as_str())
                    && !viewset.keeps_keys_of(name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        v.sort();
        v
    }

    /// The ops turning what was published into `computed`: a set for each
    /// new or changed entry (every entry when `full`), a delete for each
    /// published key no longer produced (for an incremental result, among
    /// the keys of its scope only), and deletes for every key of the
    /// views `viewset` no longer has. Views not in `computed` are left alone.
    pub fn diff(&self, computed: Vec<ComputedView>, viewset: &ViewSet, full: bool) -> Plan {
        let mut plan = Plan::default();
        let exptime = viewset.exptime();
        let empty = HashMap::new();
        for c in computed {
            let published = self.views.get(&c.view).unwrap_or(&empty);
            let mut counts = ViewCounts { view: c.view.clone(), ..Default::default() };
            let name: Arc<str> = Arc::from(c.view.as_str());
            let mut gone: Vec<&Vec<u8>> = {
                let present: HashSet<&[u8]> = c.entries.iter().map(|e| e.key.as_bytes()).collect();
                match &c.scope {
                    // Incremental: only the keys in scope can have left.
                    Some(scope) => scope
                        .iter()
                        .filter(|k| !present.contains(k.as_bytes()))
                        .filter_map(|k| published.get_key_value(k.as_bytes()).map(|(k, _)| k))
                        .collect(),
                    None => published.keys().filter(|k| !present.contains(k.as_slice())).collect(),
                }
            };
            gone.sort();
            for e in c.entries {
                let differs = published.get(e.key.as_bytes()) != Some(&e.hash);
                if full && differs {
                    counts.drift += 1;
                }
                if full || differs {
                    let key = e.key.into_bytes();
                    plan.changes.push(Change::Put { view: name.clone(), key: key.clone(), hash: e.hash });
                    plan.ops.push(Op::Set { key, value: e.value, flags: e.flags, exptime });
                    counts.set += 1;
                }
            }
            for k in gone {
                plan.ops.push(Op::Delete { key: k.clone() });
                plan.changes.push(Change::Remove { view: name.clone(), key: k.clone() });
                counts.deleted += 1;
                counts.drift += usize::from(full);
            }
            plan.counts.push(counts);
        }
        for view in self.orphan_views(viewset) {
            let mut counts = ViewCounts { view: view.clone(), ..Default::default() };
            let name: Arc<str> = Arc::from(view.as_str());
            if let Some(keys) = self.views.get(&view) {
                let mut keys: Vec<&Vec<u8>> = keys.keys().collect();
                keys.sort();
                for k in keys {
                    plan.ops.push(Op::Delete { key: k.clone() });
                    plan.changes.push(Change::Remove { view: name.clone(), key: k.clone() });
                    counts.deleted += 1;
                }
            }
            plan.counts.push(counts);
        }
        plan
    }

    /// Prepares a full resync of `computed`: every entry is to be read
    /// back and compared, and every key published for these views (or for
    /// views no longer configured) that they no longer produce is stale.
    /// Views not in `computed` (failed) are left alone.
    pub fn resync(&self, computed: Vec<ComputedView>, viewset: &ViewSet) -> Resync {
        let mut r = Resync {
            views: Vec::new(),
            entries: Vec::new(),
            stale: Vec::new(),
            codec: viewset.codec(),
            exptime: viewset.exptime(),
        };
        let empty = HashMap::new();
        for c in computed {
            let v = r.views.len();
            r.views.push(c.view.clone());
            let published = self.views.get(&c.view).unwrap_or(&empty);
            let present: HashSet<&[u8]> = c.entries.iter().map(|e| e.key.as_bytes()).collect();
            let mut gone: Vec<&Vec<u8>> = published.keys().filter(|k| !present.contains(k.as_slice())).collect();
            gone.sort();
            r.stale.extend(gone.into_iter().map(|k| (v, k.clone())));
            r.entries.extend(c.entries.into_iter().map(|e| {
                let recorded = published.get(e.key.as_bytes()) == Some(&e.hash);
                (v, e, recorded)
            }));
        }
        for view in self.orphan_views(viewset) {
            let v = r.views.len();
            r.views.push(view.clone());
            if let Some(keys) = self.views.get(&view) {
                let mut keys: Vec<&Vec<u8>> = keys.keys().collect();
                keys.sort();
                r.stale.extend(keys.into_iter().map(|k| (v, k.clone())));
            }
        }
        r
    }

    /// Stores the plan's changes (and the sentinel token after a full
    /// republish) in one write transaction, then updates the mirror.
    pub fn record(&mut self, conn: &Connection, changes: &[Change], epoch: Option<&[u8]>) -> Result<()> {
        let ctx = |e| Error::sqlite("record published keys", e);
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(ctx)?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO _tailcache_published (view, key, hash) VALUES (?1, ?2, ?3)
                     ON CONFLICT (view, key) DO UPDATE SET hash = excluded.hash",
                )
                .map_err(ctx)?;
            let mut remove =
                tx.prepare_cached("DELETE FROM _tailcache_published WHERE view = ?1 AND key = ?2").map_err(ctx)?;
            for c in changes {
                match c {
                    Change::Put { view, key, hash } => put.execute((&**view, key, &hash[..])).map_err(ctx)?,
                    Change::Remove { view, key } => remove.execute((&**view, key)).map_err(ctx)?,
                };
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
        for c in changes {
            match c {
                Change::Put { view, key, hash } => {
                    // The view's name is allocated once, not per key.
                    match self.views.get_mut(&**view) {
                        Some(keys) => keys.insert(key.clone(), *hash),
                        None => self.views.entry(view.to_string()).or_default().insert(key.clone(), *hash),
                    };
                }
                Change::Remove { view, key } => {
                    if let Some(keys) = self.views.get_mut(&**view) {
                        keys.remove(key);
                        if keys.is_empty() {
                            self.views.remove(&**view);
                        }
                    }
                }
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
    fn dogpile_values_compare_without_their_creation_time() {
        let wrap = |payload: &[u8], ct: f64| {
            let mut b = Vec::new();
            mp::array_len(&mut b, 2);
            b.extend_from_slice(payload);
            dogpile_metadata(&mut b, ct);
            b
        };
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
        let mut p = Published::default();
        let put = |p: &mut Published, k: &str, h: u8| {
            p.views.entry("v".into()).or_default().insert(k.as_bytes().to_vec(), [h; 16]);
        };
        put(&mut p, "k1", 1);
        put(&mut p, "k2", 2);
        put(&mut p, "gone", 3);
        put(&mut p, "gone2", 4);
        let computed = ComputedView {
            view: "v".into(),
            entries: vec![entry("k1", b"a", 1), entry("k2", b"b", 2), entry("k3", b"c", 3)],
            ..Default::default()
        };
        let mut r = Resync { views: vec![], entries: vec![], stale: vec![], codec: Codec::Msgpack, exptime: 0 };
        // what Published::resync does, without a ViewSet
        r.views.push("v".into());
        for e in computed.entries {
            let recorded = p.keys("v").unwrap().get(e.key.as_bytes()) == Some(&e.hash);
            r.entries.push((0, e, recorded));
        }
        r.stale = vec![(0, b"gone".to_vec()), (0, b"gone2".to_vec())];
        assert_eq!(r.keys(), vec![&b"k1"[..], b"k2", b"k3", b"gone", b"gone2"]);
        assert!(r.same(0, b"a", 0) && !r.same(0, b"x", 0) && r.same(4, b"whatever", 9));
        // k1 identical, k2 differs, k3 missing, gone present, gone2 absent
        let (mut plan, counts) = r.plan(&[Held::Same, Held::Differs, Held::Missing, Held::Same, Held::Missing]);
        assert_eq!(counts["v"], ResyncCounts { checked: 3, missing: 1, differed: 1, deleted: 1, unchanged: 1 });
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
}
