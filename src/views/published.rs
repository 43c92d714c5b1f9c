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

use std::collections::{HashMap, HashSet};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::{ComputedView, ViewSet};
use crate::error::{Error, Result};
use crate::sink::Op;

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

/// A change to the bookkeeping, applied once memcached acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put { view: String, key: Vec<u8>, hash: [u8; 16] },
    Remove { view: String, key: Vec<u8> },
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
    /// published key no longer produced, and deletes for every key of the
    /// views `viewset` no longer has. Views not in `computed` are left alone.
    pub fn diff(&self, computed: Vec<ComputedView>, viewset: &ViewSet, full: bool) -> Plan {
        let mut plan = Plan::default();
        let exptime = viewset.exptime();
        let empty = HashMap::new();
        for c in computed {
            let published = self.views.get(&c.view).unwrap_or(&empty);
            let mut counts = ViewCounts { view: c.view.clone(), ..Default::default() };
            let mut gone: Vec<&Vec<u8>> = {
                let present: HashSet<&[u8]> = c.entries.iter().map(|e| e.key.as_bytes()).collect();
                published.keys().filter(|k| !present.contains(k.as_slice())).collect()
            };
            gone.sort();
            for e in c.entries {
                let differs = published.get(e.key.as_bytes()) != Some(&e.hash);
                if full && differs {
                    counts.drift += 1;
                }
                if full || differs {
                    let key = e.key.into_bytes();
                    plan.changes.push(Change::Put { view: c.view.clone(), key: key.clone(), hash: e.hash });
                    plan.ops.push(Op::Set { key, value: e.value, flags: e.flags, exptime });
                    counts.set += 1;
                }
            }
            for k in gone {
                plan.ops.push(Op::Delete { key: k.clone() });
                plan.changes.push(Change::Remove { view: c.view.clone(), key: k.clone() });
                counts.deleted += 1;
                counts.drift += usize::from(full);
            }
            plan.counts.push(counts);
        }
        for view in self.orphan_views(viewset) {
            let mut counts = ViewCounts { view: view.clone(), ..Default::default() };
            if let Some(keys) = self.views.get(&view) {
                let mut keys: Vec<&Vec<u8>> = keys.keys().collect();
                keys.sort();
                for k in keys {
                    plan.ops.push(Op::Delete { key: k.clone() });
                    plan.changes.push(Change::Remove { view: view.clone(), key: k.clone() });
                    counts.deleted += 1;
                }
            }
            plan.counts.push(counts);
        }
        plan
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
                    Change::Put { view, key, hash } => put.execute((view, key, &hash[..])).map_err(ctx)?,
                    Change::Remove { view, key } => remove.execute((view, key)).map_err(ctx)?,
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
                    self.views.entry(view.clone()).or_default().insert(key.clone(), *hash);
                }
                Change::Remove { view, key } => {
                    if let Some(keys) = self.views.get_mut(view) {
                        keys.remove(key);
                        if keys.is_empty() {
                            self.views.remove(view);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
