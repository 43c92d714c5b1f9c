//! The memcached writer.
//!
//! [`Sink::apply`] writes a list of [`Op`]s (set / delete) with the meta
//! protocol, pipelined: the ops of each server go out in batches of at most
//! [`MAX_BATCH_OPS`] ops or [`MAX_BATCH_BYTES`] bytes per round trip, every
//! server is written concurrently, and each exchange is bounded by
//! `memcached.timeout_ms`. Which servers hold a key is a [`Placement`];
//! today every key goes to every server ([`AllServers`]).
//!
//! Connections are made lazily (a server that is down at start-up is an
//! error on the first write, not at construction) and pooled by
//! `memcache::exp::AsyncMetaClient`, one client per configured server.
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

pub mod router;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use memcache::exp::{AsyncMetaClient, Delete, Get, MutationStatus, Op as McOp, OpResult, Set, Ttl};
use tokio::sync::OnceCell;

use crate::config::MemcachedConfig;
pub use router::{AllServers, Placement};

/// At most this many ops per round trip to one server.
pub const MAX_BATCH_OPS: usize = 500;
/// At most about this many key+value bytes per round trip to one server (a
/// single larger op still goes alone).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// The sentinel key, after `key_prefix`.
pub const EPOCH_KEY_SUFFIX: &str = "_tailcache:epoch";

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

/// What failed, on which server.
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
    #[error("memcached {server}: {verb} of key {key:?} was not applied ({status:?})")]
    NotApplied { server: String, verb: &'static str, key: String, status: MutationStatus },
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
            | SinkError::NotApplied { server, .. }
            | SinkError::Batch { server, .. }
            | SinkError::Unexpected { server, .. } => server,
        }
    }
}

struct Server {
    addr: String,
    client: OnceCell<AsyncMetaClient>,
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
    /// A sink writing every key to every server of `mc.servers`. Connects
    /// lazily.
    pub fn connect(mc: &MemcachedConfig) -> Sink {
        Sink::with_placement(mc, Box::new(AllServers))
    }

    pub fn with_placement(mc: &MemcachedConfig, placement: Box<dyn Placement>) -> Sink {
        let timeout = Duration::from_millis(mc.timeout_ms.max(1));
        Sink {
            servers: mc.servers.iter().map(|a| Server { addr: a.clone(), client: OnceCell::new() }).collect(),
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

    async fn client(&self, i: usize) -> Result<&AsyncMetaClient, SinkError> {
        let s = &self.servers[i];
        s.client
            .get_or_try_init(|| async {
                AsyncMetaClient::builder()
                    .io_timeout(Some(self.timeout))
                    .connect_timeout(Some(self.timeout))
                    .max_idle(4)
                    .connect_multiple_async([s.addr.as_str()])
                    .await
            })
            .await
            .map_err(|source| SinkError::Resolve { server: s.addr.clone(), source })
    }

    /// Applies `ops` on the servers that hold each key (all of them for
    /// now). Every server is attempted even when another fails; the first
    /// error is returned (the others are logged). A delete of a missing key
    /// is success. Ops on one server are sent in order, so a set and a
    /// later delete of the same key in one call end deleted.
    pub async fn apply(&self, ops: &[Op]) -> Result<(), SinkError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut per_server: Vec<Vec<&Op>> = vec![Vec::new(); self.servers.len()];
        let mut placed = Vec::with_capacity(self.servers.len());
        for op in ops {
            placed.clear();
            self.placement.place(op.key(), &self.addrs, &mut placed);
            for &i in &placed {
                if let Some(list) = per_server.get_mut(i) {
                    list.push(op);
                }
            }
        }
        let results = join_all(per_server.iter().enumerate().map(|(i, list)| self.apply_on(i, list))).await;
        let mut first = None;
        for r in results {
            if let Err(e) = r {
                crate::metrics::memcached_error(e.server());
                if first.is_none() {
                    first = Some(e);
                } else {
                    tracing::warn!(error = %e, "memcached write failed");
                }
            }
        }
        match first {
            Some(e) => {
                self.lost.store(true, Ordering::SeqCst);
                Err(e)
            }
            None => Ok(()),
        }
    }

    async fn apply_on(&self, i: usize, ops: &[&Op]) -> Result<(), SinkError> {
        if ops.is_empty() {
            return Ok(());
        }
        let client = self.client(i).await?;
        let server = &self.servers[i].addr;
        let mut start = 0;
        let mut batch: Vec<McOp> = Vec::with_capacity(ops.len().min(MAX_BATCH_OPS));
        while start < ops.len() {
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
            let results = client.run_batch(batch.drain(..)).await.map_err(|source| SinkError::Batch {
                server: server.clone(),
                ops: chunk.len(),
                source,
            })?;
            for (op, r) in chunk.iter().zip(results) {
                check_result(server, op, r)?;
            }
            start = end;
        }
        Ok(())
    }

    /// The value and client flags of `key` on the first server.
    pub async fn get(&self, key: &[u8]) -> Result<Option<(Vec<u8>, u32)>, SinkError> {
        self.get_on(0, key).await
    }

    async fn get_on(&self, i: usize, key: &[u8]) -> Result<Option<(Vec<u8>, u32)>, SinkError> {
        let Some(s) = self.servers.get(i) else {
            return Ok(None);
        };
        let client = self.client(i).await?;
        let r = client.run(Get::new(key)).await.map_err(|source| SinkError::Op {
            server: s.addr.clone(),
            verb: "get",
            key: lossy(key),
            source,
        })?;
        Ok(if r.hit() { r.value.map(|v| (v, r.client_flags.unwrap_or(0))) } else { None })
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
    /// expects it from now on; clears the lost flag. Call it *before* a
    /// full republish, so a restart during the republish is still noticed.
    pub async fn mark_epoch(&self) -> Result<Vec<u8>, SinkError> {
        let token: [u8; 16] = rand::random();
        let token: Vec<u8> = token.iter().flat_map(|b| format!("{b:02x}").into_bytes()).collect();
        let op = Op::Set { key: self.epoch_key.clone(), value: token.clone(), flags: 0, exptime: 0 };
        // Clear first: a failure inside apply sets it again.
        self.lost.store(false, Ordering::SeqCst);
        self.apply(std::slice::from_ref(&op)).await?;
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

fn check_result(server: &str, op: &Op, r: Result<OpResult, memcache::exp::Error>) -> Result<(), SinkError> {
    let verb = op.verb();
    let r = r.map_err(|source| SinkError::Op { server: server.to_owned(), verb, key: lossy(op.key()), source })?;
    let Some(m) = r.as_mutation() else {
        return Err(SinkError::Unexpected { server: server.to_owned(), verb, key: lossy(op.key()) });
    };
    match (op, m.status) {
        (_, MutationStatus::Applied) | (Op::Delete { .. }, MutationStatus::NotFound) => Ok(()),
        (_, status) => Err(SinkError::NotApplied { server: server.to_owned(), verb, key: lossy(op.key()), status }),
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
        }
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
