//! The orphan sweep of a full resync: keys nobody remembers.
//!
//! A resync's read-back only reads keys that a view produces or that the
//! bookkeeping names. A key written by a deployment whose state file was
//! lost, by a crash before the in-doubt marks existed, or by another
//! writer, is in neither: only memcached knows it. So a full resync, once
//! its own writes are recorded, lists what each server holds under
//! `memcached.key_prefix` ([`crate::sink::enumerate`]) and deletes, on the
//! server where it was found, every key that one of the configured views'
//! key templates could have rendered but that the bookkeeping does not hold
//! (for any view: a renamed or broken view's keys are kept). Keys under the
//! prefix that match no template are never touched — another application
//! may share the prefix — but counted as `foreign`.
//!
//! The listing is streamed (memory follows a batch of keys, plus the
//! orphans found, which are deleted once the listing of their server has
//! ended: the crawler must be read promptly, see the enumerator's docs). A
//! server that refuses to be listed (`-o no_lru_crawler`, `-X`) is reported
//! once and skipped; a listing that fails midway deletes nothing of what it
//! found (it is incomplete, not wrong) and the round goes on.

use std::collections::{BTreeMap, HashSet};

use rusqlite::{Connection, OptionalExtension};

use super::ViewSet;
use crate::config::MemcachedConfig;
use crate::error::{Error, Result};
use crate::sink::Sink;
use crate::sink::enumerate::{KeyEnumerator, Options};

/// What a sweep found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// Orphans deleted, per view whose template matched first.
    pub orphans: BTreeMap<String, u64>,
    /// Keys under the prefix no template matches.
    pub foreign: u64,
    /// Servers whose listing could not be had or was cut short.
    pub incomplete: Vec<String>,
}

impl Found {
    pub fn orphans(&self) -> u64 {
        self.orphans.values().sum()
    }
}

/// Whether the bookkeeping holds `key` under `view`.
fn recorded(book: &Connection, view: &str, key: &[u8]) -> Result<bool> {
    book.prepare_cached("SELECT 1 FROM main._tailcache_published WHERE view = ?1 AND key = ?2")
        .and_then(|mut s| s.query_row((view, key), |_| Ok(())).optional())
        .map(|r| r.is_some())
        .map_err(|e| Error::sqlite("read _tailcache_published", e))
}

/// Lists every server of `sink` and deletes the orphans found there (see
/// the module docs). `views` are the names the bookkeeping holds keys of;
/// `refused` remembers servers already reported as refusing to be listed.
pub async fn sweep(
    sink: &Sink,
    mc: &MemcachedConfig,
    viewset: &ViewSet,
    book: &Connection,
    views: &[String],
    refused: &mut HashSet<String>,
) -> Result<Found> {
    let mut found = Found::default();
    let prefix = mc.key_prefix.as_str();
    let opts = Options::for_config(mc);
    for (i, server) in sink.servers().iter().enumerate() {
        let mut orphans: Vec<(String, Vec<u8>)> = Vec::new();
        let mut complete = true;
        match KeyEnumerator::start(server, prefix.as_bytes(), &opts).await {
            Ok(mut e) => loop {
                match e.next_batch().await {
                    Ok(Some(batch)) => {
                        for key in batch {
                            if key == sink.epoch_key() {
                                continue;
                            }
                            let mut matching = viewset.views_matching(prefix, &key).peekable();
                            let Some(first) = matching.peek().map(|v| v.to_string()) else {
                                found.foreign += 1;
                                continue;
                            };
                            // The matching views first (one lookup, as a
                            // rule), then every other view with keys.
                            let mut known = false;
                            for v in matching.chain(views.iter().map(String::as_str)) {
                                if recorded(book, v, &key)? {
                                    known = true;
                                    break;
                                }
                            }
                            if !known {
                                orphans.push((first, key));
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(err) => {
                        complete = false;
                        report(&mut found, refused, server, &err);
                        break;
                    }
                }
            },
            Err(err) => {
                complete = false;
                report(&mut found, refused, server, &err);
            }
        }
        if !complete || orphans.is_empty() {
            continue;
        }
        let mut per_view: BTreeMap<String, u64> = BTreeMap::new();
        let keys: Vec<Vec<u8>> = orphans
            .into_iter()
            .map(|(view, key)| {
                *per_view.entry(view).or_default() += 1;
                key
            })
            .collect();
        let n = keys.len();
        let sample: Vec<String> = keys.iter().take(3).map(|k| String::from_utf8_lossy(k).into_owned()).collect();
        match sink.delete_on(i, keys).await {
            Ok(()) => {
                tracing::warn!(server = %server, orphans = n, ?sample, "deleted keys under the prefix that match a view's key template but that no view produces");
                for (v, k) in per_view {
                    *found.orphans.entry(v).or_default() += k;
                }
            }
            Err(e) => {
                tracing::warn!(server = %server, orphans = n, error = %e, "could not delete orphan keys; the next resync tries again");
                found.incomplete.push(server.clone());
            }
        }
    }
    Ok(found)
}

fn report(
    found: &mut Found,
    refused: &mut HashSet<String>,
    server: &str,
    err: &crate::sink::enumerate::EnumerateError,
) {
    found.incomplete.push(server.to_owned());
    if err.is_refused() {
        if refused.insert(server.to_owned()) {
            tracing::warn!(server = %server, error = %err, "memcached refuses to list its keys (lru_crawler disabled?): keys nobody remembers cannot be found there; enable the LRU crawler to have them deleted");
        }
    } else {
        tracing::warn!(server = %server, error = %err, "listing memcached's keys failed; orphans found there are left for the next resync");
    }
}
