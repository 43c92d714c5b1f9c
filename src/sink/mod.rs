//! The memcached writer.
//!
//! [`Sink::apply`] writes a list of [`Op`]s (set / delete) with the meta
//! protocol, pipelined: the ops of each server go out in batches of at most
//! [`MAX_BATCH_OPS`] ops or [`MAX_BATCH_BYTES`] bytes per round trip, every
//! server is written concurrently, and each exchange is bounded by
//! `memcached.timeout_ms`. Which servers hold a key is a [`Placement`]
//! (`memcached.distribution`; every server by default, [`AllServers`]).
//!
//! [`Sink::read_back`] is the other direction, for a full resync: pipelined
//! `mg <key> v f` batches (up to [`MAX_READ_OPS`] keys or about
//! [`MAX_BATCH_BYTES`] of expected values each, [`READ_CONCURRENCY`] in
//! flight per server, all servers at once) on every server a key is placed
//! on, compared by the caller and folded into one [`Held`] per key.
//!
//! # Errors
//!
//! Every failure is classified ([`ErrorClass`], see [`error`]): a
//! retriable one (connection, timeout, garbled answer) fails the exchange
//! with a [`SinkError`] and marks the state as possibly lost; a permanent
//! one is about a single entry (`SERVER_ERROR object too large for cache`,
//! ...): that op is listed in [`Applied::rejected`] and every other op is
//! still applied. memcached answers a refused meta command with a bare
//! error line, without the batch's opaque token, so the ops after it in
//! the same batch are sent again (sets and deletes are idempotent).
//! [`Sink::health`] tells whether each server answered its last exchange.
//!
//! Connections are made lazily (a server that is down at start-up is an
//! error on the first write, not at construction) and pooled by
//! `memcache::exp::AsyncMetaClient`, one client per configured server.
//!
//! # Placement and servers that are down
//!
//! Each key lives on the servers its [`Placement`] picks
//! (`memcached.distribution`, see [`router`]): with a client's distribution,
//! on exactly one. A server that fails keeps its keys: [`Sink::apply_partial`]
//! and [`Sink::read_back_partial`] apply and read on the others and return
//! the failed server's errors and keys, which the publisher retries on that
//! same server (with backoff) until it answers.
//!
//! # Detecting a restarted or flushed memcached
//!
//! A memcached that restarts comes back empty, and a `flush_all` empties it
//! in place; either way every key tailcache believes published is gone. The
//! sink keeps a sentinel key, `<key_prefix>_tailcache:epoch`, holding a
//! random token chosen by [`Sink::mark_epoch`] (called by the publisher just
//! before every full republish, and the token stored in the state file once
//! that republish is acknowledged). [`Sink::lost_state`] reports `true` when
//! the sentinel is missing or different on any server, when no token is
//! known yet (nothing proves the cache holds what the state file says), or
//! after any failed exchange since the last `mark_epoch` (the server may have
//! restarted, and ops may have been half applied). The publisher answers
//! `true` with a full republish.

pub mod enumerate;
pub mod error;
pub mod router;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use memcache::exp::{AsyncMetaClient, Delete, Get, MutationStatus, Op as McOp, OpResult, Set, Ttl};
use tokio::sync::OnceCell;

use crate::config::MemcachedConfig;
pub use error::{ErrorClass, classify};
pub use router::{AllServers, Placement};

/// At most this many ops per round trip to one server.
pub const MAX_BATCH_OPS: usize = 500;
/// At most this many reads (`mg`) per round trip to one server.
pub const MAX_READ_OPS: usize = 2000;
/// At most about this many key+value bytes per round trip to one server (a
/// single larger op still goes alone).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Read-back batches in flight at once on one server (each on its own
/// pooled connection).
pub const READ_CONCURRENCY: usize = 4;
/// The sentinel key, after `key_prefix`.
pub const EPOCH_KEY_SUFFIX: &str = "_tailcache:epoch";

pub use crate::config::{MAX_RELATIVE_EXPTIME, exptime_problem};

/// One change to the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Store `value` with client `flags`; `exptime` is memcached's: 0 never
    /// expires, up to 30 days relative seconds, above that it is sent as an
    /// absolute timestamp `now + exptime`.
    Set { key: Vec<u8>, value: Vec<u8>, flags: u32, exptime: u32 },
    /// Remove a key; a key that is already missing is success.
    Delete { key: Vec<u8> },
}

impl Op {
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Set { key, .. } | Op::Delete { key } => key,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Op::Set { key, value, .. } => key.len() + value.len(),
            Op::Delete { key } => key.len(),
        }
    }

    fn verb(&self) -> &'static str {
        match self {
            Op::Set { .. } => "set",
            Op::Delete { .. } => "delete",
        }
    }

    fn to_memcache(&self) -> McOp {
        match self {
            Op::Set { key, value, flags, exptime } => {
                let set = Set::new(key, value).client_flags(*flags);
                // `Ttl::secs(0)` is a usage error in memcache::exp: exptime 0
                // (never expires) is the protocol default, i.e. no T flag.
                let set = if *exptime == 0 { set } else { set.ttl(Ttl::secs(*exptime)) };
                set.into()
            }
            Op::Delete { key } => Delete::new(key).into(),
        }
    }
}

/// What failed, on which server. Per-entry refusals are not errors (see
/// [`Applied::rejected`]); every `SinkError` fails the exchange.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("memcached {server}: cannot resolve address: {source}")]
    Resolve {
        server: String,
        #[source]
        source: memcache::exp::Error,
    },
    #[error("memcached {server}: {verb} of key {key:?} failed: {source}")]
    Op {
        server: String,
        verb: &'static str,
        key: String,
        #[source]
        source: memcache::exp::Error,
    },
    #[error("memcached {server}: {verb} of key {key:?} was refused: {reason}")]
    Refused { server: String, verb: &'static str, key: String, reason: String },
    #[error("memcached {server}: batch of {ops} ops refused before sending: {source}")]
    Batch {
        server: String,
        ops: usize,
        #[source]
        source: memcache::exp::Error,
    },
    #[error("memcached {server}: unexpected answer to {verb} of key {key:?}")]
    Unexpected { server: String, verb: &'static str, key: String },
}

impl SinkError {
    /// The server the error is about.
    pub fn server(&self) -> &str {
        match self {
            SinkError::Resolve { server, .. }
            | SinkError::Op { server, .. }
            | SinkError::Refused { server, .. }
            | SinkError::Batch { server, .. }
            | SinkError::Unexpected { server, .. } => server,
        }
    }

    /// Whether retrying the exchange can help.
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::Resolve { .. } | SinkError::Unexpected { .. } => ErrorClass::Retriable,
            SinkError::Op { source, .. } | SinkError::Batch { source, .. } => classify(source),
            SinkError::Refused { .. } => ErrorClass::Permanent,
        }
    }
}

/// One entry a server refused for good (see [`ErrorClass::Permanent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub server: String,
    pub verb: &'static str,
    pub key: Vec<u8>,
    /// The server's words, e.g. `SERVER_ERROR object too large for cache`.
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "memcached {} refused the {} of key {:?}: {}", self.server, self.verb, lossy(&self.key), self.reason)
    }
}

/// The outcome of [`Sink::apply`] when no exchange failed.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Ops refused for good by some server; all the others were applied.
    pub rejected: Vec<Rejection>,
}

/// The outcome of [`Sink::apply_partial`].
#[derive(Debug, Default)]
pub struct Partial {
    /// What the servers that answered did.
    pub applied: Applied,
    /// One error per server that failed.
    pub failed: Vec<SinkError>,
    /// Keys with an op on a failed server: not (or not surely) applied there.
    pub unapplied: std::collections::HashSet<Vec<u8>>,
}

/// What the servers that should hold a key hold, compared with what they
/// should; see [`Sink::read_back`]. Ordered: the worst server wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Held {
    /// Every server holds the expected bytes and flags.
    Same,
    /// Some server does not hold the key (and none holds other bytes).
    Missing,
    /// Some server holds other bytes or flags.
    Differs,
}

struct Server {
    addr: String,
    client: OnceCell<AsyncMetaClient>,
    /// 0 unknown, 1 answered last time, 2 failed last time.
    health: AtomicU8,
}

/// The memcached writer; see the module docs.
pub struct Sink {
    servers: Vec<Server>,
    addrs: Vec<String>,
    placement: Box<dyn Placement>,
    timeout: Duration,
    epoch_key: Vec<u8>,
    /// The token the sentinel should hold; `None` until known.
    epoch: Mutex<Option<Vec<u8>>>,
    lost: AtomicBool,
}

fn lossy(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

impl Sink {
    /// A sink writing each key to the servers `mc.distribution` places it
    /// on (every server by default). Connects lazily.
    pub fn connect(mc: &MemcachedConfig) -> Sink {
        Sink::with_placement(mc, router::for_config(mc))
    }

    pub fn with_placement(mc: &MemcachedConfig, placement: Box<dyn Placement>) -> Sink {
        let timeout = Duration::from_millis(mc.timeout_ms.max(1));
        Sink {
            servers: mc
                .servers
                .iter()
                .map(|a| Server { addr: a.clone(), client: OnceCell::new(), health: AtomicU8::new(0) })
                .collect(),
            addrs: mc.servers.clone(),
            placement,
            timeout,
            epoch_key: format!("{}{EPOCH_KEY_SUFFIX}", mc.key_prefix).into_bytes(),
            epoch: Mutex::new(None),
            lost: AtomicBool::new(false),
        }
    }

    /// The sentinel key, `<key_prefix>_tailcache:epoch`.
    pub fn epoch_key(&self) -> &[u8] {
        &self.epoch_key
    }

    pub fn servers(&self) -> &[String] {
        &self.addrs
    }

    /// Each server that was talked to, and whether its last exchange
    /// succeeded (a refused entry is an answer: the server is up).
    pub fn health(&self) -> Vec<(String, bool)> {
        self.servers
            .iter()
            .filter_map(|s| match s.health.load(Ordering::Relaxed) {
                1 => Some((s.addr.clone(), true)),
                2 => Some((s.addr.clone(), false)),
                _ => None,
            })
            .collect()
    }

    fn mark<T>(&self, i: usize, r: &Result<T, SinkError>) {
        let up = match r {
            Ok(_) => true,
            Err(e) => e.class() == ErrorClass::Permanent,
        };
        if let Some(s) = self.servers.get(i) {
            s.health.store(if up { 1 } else { 2 }, Ordering::Relaxed);
        }
    }

    async fn client(&self, i: usize) -> Result<&AsyncMetaClient, SinkError> {
        let s = &self.servers[i];
        s.client
            .get_or_try_init(|| async {
                AsyncMetaClient::builder()
                    .io_timeout(Some(self.timeout))
                    .connect_timeout(Some(self.timeout))
                    .max_idle(READ_CONCURRENCY)
                    .connect_multiple_async([s.addr.as_str()])
                    .await
            })
            .await
            .map_err(|source| SinkError::Resolve { server: s.addr.clone(), source })
    }

    /// Each item in the lists of the servers its key is placed on.
    fn per_server<'a, T: Copy>(&self, items: impl Iterator<Item = (&'a [u8], T)>) -> Vec<Vec<T>> {
        let mut per_server: Vec<Vec<T>> = (0..self.servers.len()).map(|_| Vec::new()).collect();
        let mut placed = Vec::with_capacity(self.servers.len());
        for (key, item) in items {
            placed.clear();
            self.placement.place(key, &self.addrs, &mut placed);
            for &i in &placed {
                if let Some(list) = per_server.get_mut(i) {
                    list.push(item);
                }
            }
        }
        per_server
    }

    /// Applies `ops` on the servers that hold each key (all of them for
    /// now). Every server is attempted even when another fails; the first
    /// error is returned (the others are logged). A delete of a missing key
    /// is success. Ops on one server are sent in order, so a set and a
    /// later delete of the same key in one call end deleted.
    ///
    /// An op a server refuses for good ([`ErrorClass::Permanent`], e.g.
    /// `SERVER_ERROR object too large for cache`) does not stop the others:
    /// it is listed in [`Applied::rejected`] and the rest of its batch is
    /// sent again. Only a [`ErrorClass::Retriable`] failure is an error.
    pub async fn apply(&self, ops: &[Op]) -> Result<Applied, SinkError> {
        let p = self.apply_partial(ops, &[]).await;
        let mut failed = p.failed.into_iter();
        match failed.next() {
            Some(first) => {
                for e in failed {
                    tracing::warn!(error = %e, "memcached write failed");
                }
                Err(first)
            }
            None => Ok(p.applied),
        }
    }

    /// Like [`apply`](Self::apply), but a server that fails does not fail
    /// the others: every other server's ops are applied, and the failed
    /// servers' errors and the keys of their ops are returned. The keys
    /// stay placed where they are (never moved to another server), so a
    /// caller retries them on the same server.
    ///
    /// Servers in `skip` (addresses that already failed in the caller's
    /// round) are not contacted, so a server that times out costs one
    /// timeout per round rather than one per call: their ops are returned
    /// as unapplied, without an error.
    pub async fn apply_partial(&self, ops: &[Op], skip: &[String]) -> Partial {
        let mut out = Partial::default();
        if ops.is_empty() {
            return out;
        }
        let per_server: Vec<Vec<&Op>> = self.per_server(ops.iter().map(|op| (op.key(), op)));
        let results = join_all(per_server.iter().enumerate().map(|(i, list)| async move {
            if skip.contains(&self.addrs[i]) {
                return None;
            }
            let r = self.apply_on(i, list).await;
            if !list.is_empty() {
                self.mark(i, &r);
            }
            Some(r)
        }))
        .await;
        for (list, r) in per_server.iter().zip(results) {
            match r {
                None => out.unapplied.extend(list.iter().map(|op| op.key().to_vec())),
                Some(Ok(mut rejected)) => out.applied.rejected.append(&mut rejected),
                Some(Err(e)) => {
                    crate::metrics::memcached_error(e.server());
                    self.lost.store(true, Ordering::SeqCst);
                    out.unapplied.extend(list.iter().map(|op| op.key().to_vec()));
                    out.failed.push(e);
                }
            }
        }
        out
    }

    /// Deletes `keys` on server `i` only, wherever the placement would put
    /// them: for keys found there by an enumeration (orphans).
    pub async fn delete_on(&self, i: usize, keys: Vec<Vec<u8>>) -> Result<(), SinkError> {
        let ops: Vec<Op> = keys.into_iter().map(|key| Op::Delete { key }).collect();
        let refs: Vec<&Op> = ops.iter().collect();
        let r = self.apply_on(i, &refs).await;
        self.mark(i, &r);
        r.map(drop)
    }

    async fn apply_on(&self, i: usize, ops: &[&Op]) -> Result<Vec<Rejection>, SinkError> {
        let mut rejected = Vec::new();
        if ops.is_empty() {
            return Ok(rejected);
        }
        let client = self.client(i).await?;
        let server = &self.servers[i].addr;
        let mut start = 0;
        let mut batch: Vec<McOp> = Vec::with_capacity(ops.len().min(MAX_BATCH_OPS));
        'chunks: while start < ops.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < ops.len()
                && end - start < MAX_BATCH_OPS
                && (end == start || bytes + ops[end].bytes() <= MAX_BATCH_BYTES)
            {
                bytes += ops[end].bytes();
                end += 1;
            }
            let chunk = &ops[start..end];
            batch.clear();
            batch.extend(chunk.iter().map(|op| op.to_memcache()));
            let results = match client.run_batch(batch.drain(..)).await {
                Ok(r) => r,
                Err(source) if classify(&source) == ErrorClass::Permanent => {
                    // The client library refused one of the ops before
                    // sending anything: find it by sending them one by one.
                    for op in chunk {
                        let r = client.run(op.to_memcache()).await;
                        self.outcome(server, op, r, &mut rejected)?;
                    }
                    start = end;
                    continue;
                }
                Err(source) => return Err(SinkError::Batch { server: server.clone(), ops: chunk.len(), source }),
            };
            for (k, (op, r)) in chunk.iter().zip(results).enumerate() {
                let failed = r.is_err();
                self.outcome(server, op, r, &mut rejected)?;
                if failed {
                    // A refusal is an error line without the batch's opaque
                    // token: the client stops reading there, so the answers
                    // to the ops after it are unknown. Send those again
                    // (sets and deletes are idempotent, order is kept).
                    start += k + 1;
                    continue 'chunks;
                }
            }
            start = end;
        }
        Ok(rejected)
    }

    /// Sorts one op's result into success, a rejection (pushed) or an
    /// error.
    fn outcome(
        &self,
        server: &str,
        op: &Op,
        r: Result<OpResult, memcache::exp::Error>,
        rejected: &mut Vec<Rejection>,
    ) -> Result<(), SinkError> {
        let verb = op.verb();
        let reject = |reason: String, rejected: &mut Vec<Rejection>| {
            rejected.push(Rejection { server: server.to_owned(), verb, key: op.key().to_vec(), reason });
            Ok(())
        };
        match r {
            Err(source) => match classify(&source) {
                ErrorClass::Permanent => reject(error::reason(&source), rejected),
                ErrorClass::Retriable => {
                    Err(SinkError::Op { server: server.to_owned(), verb, key: lossy(op.key()), source })
                }
            },
            Ok(r) => {
                let Some(m) = r.as_mutation() else {
                    return Err(SinkError::Unexpected { server: server.to_owned(), verb, key: lossy(op.key()) });
                };
                match (op, m.status) {
                    (_, MutationStatus::Applied) | (Op::Delete { .. }, MutationStatus::NotFound) => Ok(()),
                    (_, status) => match error::classify_status(status) {
                        ErrorClass::Permanent => reject(format!("not applied ({status:?})"), rejected),
                        ErrorClass::Retriable => Err(SinkError::Refused {
                            server: server.to_owned(),
                            verb,
                            key: lossy(op.key()),
                            reason: format!("{status:?}"),
                        }),
                    },
                }
            }
        }
    }

    /// Reads back what the servers hold for each key (on every server the
    /// key is placed on) with pipelined `mg <key> v f` batches, and compares
    /// it through `same(index, value, flags)`. `expected_len[i]` bounds the
    /// bytes a batch may bring back. With `touch`, each hit's TTL is reset
    /// to that exptime in the same request (`T` flag), so an identical
    /// entry need not be rewritten to stay alive. Batches of up to
    /// [`MAX_READ_OPS`] keys, [`READ_CONCURRENCY`] in flight per server,
    /// all servers at once.
    pub async fn read_back<F>(
        &self,
        keys: &[&[u8]],
        expected_len: &[usize],
        touch: Option<u32>,
        same: F,
    ) -> Result<Vec<Held>, SinkError>
    where
        F: Fn(usize, &[u8], u32) -> bool,
    {
        let (held, failed) = self.read_back_partial(keys, expected_len, touch, same, &[]).await;
        match failed.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(held),
        }
    }

    /// Like [`read_back`](Self::read_back), but a server that fails does
    /// not fail the others: its keys are [`Held::Differs`] (to be written
    /// again, on that server) and its error is returned. Servers in `skip`
    /// are not contacted (see [`apply_partial`](Self::apply_partial)):
    /// their keys are [`Held::Differs`], without an error.
    pub async fn read_back_partial<F>(
        &self,
        keys: &[&[u8]],
        expected_len: &[usize],
        touch: Option<u32>,
        same: F,
        skip: &[String],
    ) -> (Vec<Held>, Vec<SinkError>)
    where
        F: Fn(usize, &[u8], u32) -> bool,
    {
        let mut held = vec![Held::Same; keys.len()];
        let mut failed = Vec::new();
        if keys.is_empty() {
            return (held, failed);
        }
        let per_server: Vec<Vec<usize>> = self.per_server(keys.iter().enumerate().map(|(i, k)| (*k, i)));
        let same = &same;
        let results = join_all(per_server.iter().enumerate().map(|(i, list)| async move {
            if skip.contains(&self.addrs[i]) {
                return None;
            }
            let r = self.read_on(i, list, keys, expected_len, touch, same).await;
            if !list.is_empty() {
                self.mark(i, &r);
            }
            Some(r)
        }))
        .await;
        for (list, r) in per_server.iter().zip(results) {
            let Some(r) = r else {
                for &i in list {
                    held[i] = Held::Differs;
                }
                continue;
            };
            match r {
                Ok(found) => {
                    for (i, h) in found {
                        held[i] = held[i].max(h);
                    }
                }
                Err(e) => {
                    crate::metrics::memcached_error(e.server());
                    self.lost.store(true, Ordering::SeqCst);
                    for &i in list {
                        held[i] = Held::Differs;
                    }
                    failed.push(e);
                }
            }
        }
        (held, failed)
    }

    async fn read_on<F>(
        &self,
        i: usize,
        list: &[usize],
        keys: &[&[u8]],
        expected_len: &[usize],
        touch: Option<u32>,
        same: &F,
    ) -> Result<Vec<(usize, Held)>, SinkError>
    where
        F: Fn(usize, &[u8], u32) -> bool,
    {
        if list.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client(i).await?;
        let server = &self.servers[i].addr;
        // Split into chunks up front, then run them READ_CONCURRENCY at a
        // time.
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < list.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < list.len() && end - start < MAX_READ_OPS {
                let b = keys[list[end]].len() + expected_len.get(list[end]).copied().unwrap_or(0);
                if end > start && bytes + b > MAX_BATCH_BYTES {
                    break;
                }
                bytes += b;
                end += 1;
            }
            chunks.push(&list[start..end]);
            start = end;
        }
        let get = |k: &[u8]| {
            let g = Get::new(k);
            match touch {
                Some(t) if t > 0 => g.touch(Ttl::secs(t)),
                _ => g,
            }
        };
        let mut out = Vec::with_capacity(list.len());
        for group in chunks.chunks(READ_CONCURRENCY) {
            let runs = join_all(group.iter().map(|chunk| async move {
                let mut found = Vec::with_capacity(chunk.len());
                let mut rest: &[usize] = chunk;
                while !rest.is_empty() {
                    let results = client
                        .run_many(rest.iter().map(|&k| get(keys[k])))
                        .await
                        .map_err(|source| SinkError::Batch { server: server.clone(), ops: rest.len(), source })?;
                    let mut next: &[usize] = &[];
                    for (n, (&k, r)) in rest.iter().zip(results).enumerate() {
                        match r {
                            Ok(g) => {
                                let h = match (g.hit(), g.value.as_deref()) {
                                    (true, Some(v)) if same(k, v, g.client_flags.unwrap_or(0)) => Held::Same,
                                    (true, _) => Held::Differs,
                                    (false, _) => Held::Missing,
                                };
                                found.push((k, h));
                            }
                            Err(source) if classify(&source) == ErrorClass::Permanent => {
                                // The server refused to read it: rewrite it,
                                // and read the rest of the batch again.
                                found.push((k, Held::Differs));
                                next = &rest[n + 1..];
                                break;
                            }
                            Err(source) => {
                                return Err(SinkError::Op {
                                    server: server.clone(),
                                    verb: "get",
                                    key: lossy(keys[k]),
                                    source,
                                });
                            }
                        }
                    }
                    rest = next;
                }
                Ok(found)
            }))
            .await;
            for r in runs {
                out.extend(r?);
            }
        }
        Ok(out)
    }

    /// The value and client flags of `key` on the first server.
    pub async fn get(&self, key: &[u8]) -> Result<Option<(Vec<u8>, u32)>, SinkError> {
        self.get_on(0, key).await
    }

    async fn get_on(&self, i: usize, key: &[u8]) -> Result<Option<(Vec<u8>, u32)>, SinkError> {
        let Some(s) = self.servers.get(i) else {
            return Ok(None);
        };
        let r = async {
            let client = self.client(i).await?;
            let r = client.run(Get::new(key)).await.map_err(|source| SinkError::Op {
                server: s.addr.clone(),
                verb: "get",
                key: lossy(key),
                source,
            })?;
            Ok(if r.hit() { r.value.map(|v| (v, r.client_flags.unwrap_or(0))) } else { None })
        }
        .await;
        self.mark(i, &r);
        r
    }

    /// Tells the sink which token the sentinel should hold (read from the
    /// state file at start-up); `None` forgets it.
    pub fn set_expected_epoch(&self, token: Option<Vec<u8>>) {
        if let Ok(mut e) = self.epoch.lock() {
            *e = token;
        }
    }

    /// The token the sentinel should hold, if known.
    pub fn expected_epoch(&self) -> Option<Vec<u8>> {
        self.epoch.lock().ok().and_then(|e| e.clone())
    }

    /// Writes a fresh random token to the sentinel on every server and
    /// expects it from now on; clears the lost flag (set again when a
    /// server failed to take it: an error only when every server failed).
    /// Call it *before* a full republish, so a restart during the
    /// republish is still noticed.
    pub async fn mark_epoch(&self) -> Result<Vec<u8>, SinkError> {
        let token: [u8; 16] = rand::random();
        let token: Vec<u8> = token.iter().flat_map(|b| format!("{b:02x}").into_bytes()).collect();
        let op = Op::Set { key: self.epoch_key.clone(), value: token.clone(), flags: 0, exptime: 0 };
        // Clear first: a failure inside apply sets it again.
        self.lost.store(false, Ordering::SeqCst);
        let mut p = self.apply_partial(std::slice::from_ref(&op), &[]).await;
        if p.failed.len() == self.servers.len() && !p.failed.is_empty() {
            // No server took it: nothing to republish to.
            return Err(p.failed.swap_remove(0));
        }
        for e in &p.failed {
            // The others go on; this one stays "lost" and is repopulated
            // once it answers (its sentinel is missing or old).
            tracing::warn!(server = %e.server(), error = %e, "memcached server down; its keys wait for it (never moved to another server)");
        }
        let applied = p.applied;
        if let Some(r) = applied.rejected.into_iter().next() {
            self.lost.store(true, Ordering::SeqCst);
            return Err(SinkError::Refused { server: r.server, verb: r.verb, key: lossy(&r.key), reason: r.reason });
        }
        self.set_expected_epoch(Some(token.clone()));
        Ok(token)
    }
    /// Whether memcached may no longer hold what was published: the
    /// sentinel is missing or different on some server, no token is known
    /// yet, or an exchange failed since the last [`mark_epoch`](Self::mark_epoch).
    /// One `mg` per server.
    pub async fn lost_state(&self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return true;
        }
        let Some(expected) = self.expected_epoch() else {
            return true;
        };
        let checks = join_all((0..self.servers.len()).map(|i| self.get_on(i, &self.epoch_key))).await;
        for (i, r) in checks.into_iter().enumerate() {
            let lost = match &r {
                Ok(Some((v, _))) => *v != expected,
                Ok(None) => true,
                Err(_) => true,
            };
            if lost {
                match r {
                    Err(e) => {
                        tracing::warn!(server = %self.servers[i].addr, error = %e, "memcached unreachable; will republish everything")
                    }
                    _ => {
                        tracing::warn!(server = %self.servers[i].addr, "memcached lost its epoch sentinel (restarted or flushed); will republish everything")
                    }
                }
                self.lost.store(true, Ordering::SeqCst);
                crate::metrics::LOST_STATE.inc();
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mc(servers: &[&str]) -> MemcachedConfig {
        MemcachedConfig {
            servers: servers.iter().map(|s| s.to_string()).collect(),
            key_prefix: "p:".into(),
            codec: Default::default(),
            exptime: 0,
            max_item_size: 1 << 20,
            coalesce_ms: 2,
            timeout_ms: 200,
            distribution: Default::default(),
            weights: Vec::new(),
        }
    }

    #[test]
    fn exptime_limits() {
        let now = 1_780_000_000;
        assert_eq!(exptime_problem(0, now), None);
        assert_eq!(exptime_problem(MAX_RELATIVE_EXPTIME, now), None);
        assert_eq!(exptime_problem(365 * 86400, now), None);
        let e = exptime_problem(4_000_000_000, now).unwrap();
        assert!(e.contains("2147483647") && !e.contains("past"), "{e}");
        let e = exptime_problem(1_700_000_000, now).unwrap();
        assert!(e.contains("in the past"), "{e}");
        assert!(exptime_problem(i32::MAX as u32 - now as u32 + 1, now).is_some());
        assert!(exptime_problem(i32::MAX as u32 - now as u32, now).is_none());
    }

    #[test]
    fn sentinel_key_uses_the_prefix() {
        let s = Sink::connect(&mc(&["127.0.0.1:1"]));
        assert_eq!(s.epoch_key(), b"p:_tailcache:epoch");
    }

    #[tokio::test]
    async fn unreachable_server_is_an_error_naming_it_and_marks_state_lost() {
        // Port 1 on localhost: nothing listens there.
        let s = Sink::connect(&mc(&["127.0.0.1:1"]));
        s.set_expected_epoch(Some(b"x".to_vec()));
        let e =
            s.apply(&[Op::Set { key: b"k".to_vec(), value: b"v".to_vec(), flags: 0, exptime: 0 }]).await.unwrap_err();
        assert_eq!(e.server(), "127.0.0.1:1");
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        assert!(s.lost_state().await);
    }

    #[tokio::test]
    async fn skipped_servers_are_not_contacted_and_their_keys_are_unapplied() {
        // A server that accepts connections (in the backlog) but would never
        // answer: contacting it would cost the whole timeout.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let s = Sink::connect(&mc(&[addr.as_str()]));
        let ops = [
            Op::Set { key: b"k".to_vec(), value: b"v".to_vec(), flags: 0, exptime: 0 },
            Op::Delete { key: b"gone".to_vec() },
        ];
        let skip = [addr.clone()];
        let p = s.apply_partial(&ops, &skip).await;
        assert!(p.failed.is_empty(), "a skipped server is no new error");
        assert_eq!(p.unapplied, std::collections::HashSet::from([b"k".to_vec(), b"gone".to_vec()]));
        let (held, failed) = s.read_back_partial(&[b"k"], &[1], None, |_, _, _| true, &skip).await;
        assert_eq!((held, failed.len()), (vec![Held::Differs], 0));
        let contacted = listener.accept();
        assert!(
            matches!(&contacted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the skipped server was contacted: {contacted:?}"
        );
    }

    #[tokio::test]
    async fn no_known_epoch_means_lost() {
        let s = Sink::connect(&mc(&["127.0.0.1:1"]));
        assert!(s.lost_state().await);
        assert!(s.apply(&[]).await.is_ok());
    }

    #[test]
    fn zero_exptime_sends_no_ttl() {
        let op = Op::Set { key: b"k".to_vec(), value: b"v".to_vec(), flags: 7, exptime: 0 }.to_memcache();
        match op {
            McOp::Set(s) => {
                assert_eq!(s.ttl, None);
                assert_eq!(s.client_flags, 7);
            }
            other => panic!("{other:?}"),
        }
        match (Op::Set { key: b"k".to_vec(), value: b"v".to_vec(), flags: 0, exptime: 60 }).to_memcache() {
            McOp::Set(s) => assert_eq!(s.ttl, Some(Ttl::secs(60))),
            other => panic!("{other:?}"),
        }
    }
}
