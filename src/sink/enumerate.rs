//! Listing the keys one memcached server holds under a prefix, for a full
//! resync's search for orphans.
//!
//! [`KeyEnumerator`] opens its own plain TCP connection to a server of
//! `memcached.servers` (`HOST:PORT`, resolved like the [`Sink`](super::Sink)
//! resolves it; like the sink, no TLS and no unix socket), sends
//! `lru_crawler metadump hash` (a walk of the hash table; memcached 1.6.18
//! has it) or, where the server answers `BADCLASS` to that (an older one),
//! `lru_crawler metadump all` (a walk of the LRUs, memcached ≥ 1.4.31),
//! and streams the answer:
//! one line per item, `key=<key> exp=<..> la=<..> cas=<..> fetch=<..>
//! cls=<..> size=<..>` ended by `\n`, and `END\r\n` after the last one. The
//! key is URL-encoded by memcached (every byte but `A-Za-z0-9-._~` as
//! `%XX`); it is decoded here, and only keys starting with the prefix are
//! handed to the caller, in batches of at most [`Options::batch_size`]
//! ([`KeyEnumerator::next_batch`]). Memory stays bounded whatever the
//! server holds: one read buffer, one batch.
//!
//! # Refusals and errors
//!
//! A server whose LRU crawler is disabled (`-o no_lru_crawler`: `CLIENT_ERROR
//! lru crawler disabled`), whose dumping is disabled (`-X`/`--disable-dumping`:
//! `ERROR metadump not allowed`) or that does not know the command (older
//! than 1.4.31, or a proxy: `ERROR`) answers with one error line:
//! [`EnumerateError::Refused`]; the caller says so once and carries on. The
//! crawler runs one job at a time (another metadump, a `lru_crawler crawl`,
//! or memcached's own periodic expiry crawl): `BUSY currently processing
//! crawler request` is retried on the same connection with a doubling wait
//! until [`Options::busy_wait`] has passed ([`EnumerateError::Busy`]).
//! Everything else (connect, read or write failure, no bytes for
//! [`Options::idle_timeout`], a connection closed before `END`) is an error
//! naming the server; a listing that did not reach `END` is never
//! reported as complete.
//!
//! A line longer than [`Options::max_line`], a line that is not an entry,
//! and a key with a malformed `%` escape are skipped and counted
//! ([`Counts::skipped`]), never guessed at.
//!
//! # What metadump does not see
//!
//! The crawler is best effort, and the caller must treat its listing as
//! such (an orphan it misses now is found by a later resync):
//! - items already expired or flushed (`flush_all`) are left out; they are
//!   gone for readers too;
//! - the hash walk ([`Walk::Hash`]) lists every live item except one in
//!   the middle of being replaced or unlinked at that instant; items stored
//!   after its cursor passed their bucket are not listed (they are newer
//!   than the resync anyway). It blocks the hash table's growth while it
//!   runs;
//! - the LRU walk ([`Walk::Lru`], older servers) is much weaker: each LRU
//!   is walked from its tail for as many items as it held when the crawl
//!   started, an item is skipped when another thread holds its lock or a
//!   reference at that instant, and items that the LRU maintainer moves
//!   between the HOT/WARM/COLD queues during the crawl can be missed or
//!   listed twice. On memcached 1.6.18 holding 1.1 million keys with no
//!   other traffic, each LRU walk missed 150 to 500 of them (and up to 64
//!   of the 100,000 under the prefix), where the hash walk missed none
//!   (the example `enumerate_bench`); duplicates are possible (deleting
//!   twice is harmless);
//! - the crawler thread writes to the client itself and gives up a write
//!   that makes no progress for a second (its `poll` timeout), carrying on
//!   with its buffer still full, which memcached does not handle well. So
//!   ask for the next batch promptly: keep what matches a view's template
//!   (bounded by the keys tailcache owns) and send the deletes after the
//!   listing ended, not between batches;
//! - a key whose URL-encoded form exceeds memcached's 751-byte buffer (about
//!   250 bytes almost all of which need escaping) is dumped truncated by
//!   memcached itself.

use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::MemcachedConfig;

/// The command sent first: walk the hash table (memcached ≥ 1.6.?, present
/// in 1.6.18), which lists every live item.
pub const METADUMP_HASH: &[u8] = b"lru_crawler metadump hash\r\n";
/// The command sent when the server answers `BADCLASS` to
/// [`METADUMP_HASH`] (an older memcached): walk the LRUs.
pub const METADUMP_ALL: &[u8] = b"lru_crawler metadump all\r\n";
/// Longest line kept (memcached writes at most about 900 bytes: a 250-byte
/// key, URL-encoded, plus the metadata).
pub const DEFAULT_MAX_LINE: usize = 4096;
/// Keys per batch by default.
pub const DEFAULT_BATCH_SIZE: usize = 1000;
/// The read buffer.
const READ_BUF: usize = 64 * 1024;
/// First wait after `BUSY`; doubled each time up to [`MAX_BUSY_STEP`].
const FIRST_BUSY_STEP: Duration = Duration::from_millis(10);
const MAX_BUSY_STEP: Duration = Duration::from_millis(250);

/// How to enumerate.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait to connect.
    pub connect_timeout: Duration,
    /// Longest wait for any bytes once connected (also for the write). The
    /// crawler walks expired items without writing anything, so this is
    /// larger than an ordinary exchange's timeout.
    pub idle_timeout: Duration,
    /// How long to keep retrying while the crawler answers `BUSY`.
    pub busy_wait: Duration,
    /// At most this many keys per batch (at least 1).
    pub batch_size: usize,
    /// Lines longer than this are skipped.
    pub max_line: usize,
    /// The walk asked for first ([`Walk::Hash`], falling back to
    /// [`Walk::Lru`] where the server has no hash walk).
    pub walk: Walk,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            busy_wait: Duration::from_secs(5),
            batch_size: DEFAULT_BATCH_SIZE,
            max_line: DEFAULT_MAX_LINE,
            walk: Walk::Hash,
        }
    }
}

impl Options {
    /// The defaults, connecting within `memcached.timeout_ms` and waiting
    /// at least that long for bytes.
    pub fn for_config(mc: &MemcachedConfig) -> Options {
        let timeout = Duration::from_millis(mc.timeout_ms.max(1));
        let d = Options::default();
        Options { connect_timeout: timeout, idle_timeout: d.idle_timeout.max(timeout), ..d }
    }
}

/// What an enumeration has read so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Entries (keys) the server listed, under the prefix or not.
    pub seen: u64,
    /// Of which started with the prefix (handed to the caller).
    pub under_prefix: u64,
    /// Lines skipped: too long, not an entry, or a malformed key.
    pub skipped: u64,
    /// `BUSY` answers retried.
    pub busy_retries: u32,
    /// What the crawler walked.
    pub walk: Walk,
}

/// What the crawler walked (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Walk {
    /// The hash table (`metadump hash`): every live item.
    #[default]
    Hash,
    /// The LRUs (`metadump all`, a server without `hash`): best effort.
    Lru,
}

/// Why a server's keys could not be (completely) listed.
#[derive(Debug, thiserror::Error)]
pub enum EnumerateError {
    /// The server does not offer enumeration (crawler or dumping disabled,
    /// command unknown): its words.
    #[error("memcached {server}: cannot list its keys: it answered {reason:?} to `lru_crawler metadump all`")]
    Refused { server: String, reason: String },
    /// The crawler stayed busy with another job.
    #[error("memcached {server}: its LRU crawler stayed busy with another job for {waited:?}")]
    Busy { server: String, waited: Duration },
    #[error("memcached {server}: cannot connect to list its keys: {source}")]
    Connect {
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("memcached {server}: listing its keys failed: {source}")]
    Io {
        server: String,
        #[source]
        source: io::Error,
    },
    #[error("memcached {server}: no answer within {after:?} while listing its keys")]
    Timeout { server: String, after: Duration },
    /// EOF before `END`: the listing is incomplete.
    #[error("memcached {server}: the connection closed before the end of the key listing ({seen} keys read)")]
    Truncated { server: String, seen: u64 },
    /// `SERVER_ERROR ...` (e.g. out of memory).
    #[error("memcached {server}: listing its keys failed: {reason:?}")]
    Server { server: String, reason: String },
}

impl EnumerateError {
    /// The server the error is about.
    pub fn server(&self) -> &str {
        match self {
            EnumerateError::Refused { server, .. }
            | EnumerateError::Busy { server, .. }
            | EnumerateError::Connect { server, .. }
            | EnumerateError::Io { server, .. }
            | EnumerateError::Timeout { server, .. }
            | EnumerateError::Truncated { server, .. }
            | EnumerateError::Server { server, .. } => server,
        }
    }

    /// Whether the server does not offer enumeration at all (as opposed to
    /// a failure that a later attempt may not meet).
    pub fn is_refused(&self) -> bool {
        matches!(self, EnumerateError::Refused { .. })
    }
}

/// One line of memcached's answer (without its `\n` / `\r\n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// An entry's key, still URL-encoded.
    Key(&'a [u8]),
    /// `END`: the listing is complete.
    End,
    /// `BUSY ...`: the crawler runs another job.
    Busy,
    /// `NOTSTARTED ...`: nothing to crawl.
    NotStarted,
    /// `ERROR`, `ERROR ...`, `CLIENT_ERROR ...`, `BADCLASS ...`.
    Refused(&'a [u8]),
    /// `SERVER_ERROR ...`.
    ServerError(&'a [u8]),
    /// Anything else (a line without `key=`, an empty key).
    Other,
}

/// Classifies one line (a trailing `\r` is ignored).
pub fn parse_line(line: &[u8]) -> Line<'_> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if let Some(rest) = line.strip_prefix(b"key=") {
        let key = rest.split(|&b| b == b' ').next().unwrap_or_default();
        return if key.is_empty() { Line::Other } else { Line::Key(key) };
    }
    let word = line.split(|&b| b == b' ').next().unwrap_or_default();
    match word {
        b"END" if line.len() == 3 => Line::End,
        b"BUSY" => Line::Busy,
        b"NOTSTARTED" => Line::NotStarted,
        b"ERROR" | b"CLIENT_ERROR" | b"BADCLASS" => Line::Refused(line),
        b"SERVER_ERROR" => Line::ServerError(line),
        _ => Line::Other,
    }
}

/// Decodes memcached's URL encoding (`%XX`, hex digits in either case;
/// every other byte as is) into `out` (cleared first). `false` on a
/// malformed escape (`%` not followed by two hex digits).
pub fn url_decode(encoded: &[u8], out: &mut Vec<u8>) -> bool {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    out.clear();
    let mut i = 0;
    while i < encoded.len() {
        let b = encoded[i];
        if b == b'%' {
            let (Some(&h), Some(&l)) = (encoded.get(i + 1), encoded.get(i + 2)) else {
                return false;
            };
            let (Some(h), Some(l)) = (hex(h), hex(l)) else {
                return false;
            };
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    true
}

/// An enumeration of one server's keys under a prefix; see the module docs.
///
/// ```no_run
/// # async fn f() -> Result<(), tailcache::sink::enumerate::EnumerateError> {
/// use tailcache::sink::enumerate::{KeyEnumerator, Options};
/// let mut keys = KeyEnumerator::start("127.0.0.1:11211", b"app:", &Options::default()).await?;
/// while let Some(batch) = keys.next_batch().await? {
///     for key in &batch {
///         // `key` is the whole key, prefix included
///     }
/// }
/// println!("{:?}", keys.counts());
/// # Ok(()) }
/// ```
pub struct KeyEnumerator {
    server: String,
    stream: TcpStream,
    prefix: Vec<u8>,
    opts: Options,
    buf: Box<[u8]>,
    /// Unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Inside a line that was too long: drop bytes up to its `\n`.
    discarding: bool,
    /// A first entry or `END` was read: status lines are no longer expected.
    started: bool,
    done: bool,
    decoded: Vec<u8>,
    counts: Counts,
}

impl std::fmt::Debug for KeyEnumerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEnumerator")
            .field("server", &self.server)
            .field("done", &self.done)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl KeyEnumerator {
    /// Connects to `server` (`HOST:PORT`) and asks for the listing; keys are
    /// read by [`next_batch`](Self::next_batch), whose first call also
    /// tells whether the server refuses.
    pub async fn start(server: &str, prefix: &[u8], opts: &Options) -> Result<KeyEnumerator, EnumerateError> {
        let stream = match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(server)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(EnumerateError::Connect { server: server.to_owned(), source }),
            Err(_) => return Err(EnumerateError::Timeout { server: server.to_owned(), after: opts.connect_timeout }),
        };
        let _ = stream.set_nodelay(true);
        let max_line = opts.max_line.max(64);
        let mut e = KeyEnumerator {
            server: server.to_owned(),
            stream,
            prefix: prefix.to_vec(),
            opts: Options { batch_size: opts.batch_size.max(1), max_line, ..opts.clone() },
            buf: vec![0; READ_BUF.max(2 * max_line + 2)].into_boxed_slice(),
            start: 0,
            end: 0,
            discarding: false,
            started: false,
            done: false,
            decoded: Vec::with_capacity(256),
            counts: Counts { walk: opts.walk, ..Counts::default() },
        };
        e.send().await?;
        Ok(e)
    }

    /// The server, as given to [`start`](Self::start).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// What has been read so far (everything once `next_batch` returned
    /// `None`).
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The next keys under the prefix (1 to `batch_size` of them, whole keys
    /// with the prefix, decoded), or `None` once the server said `END`.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Vec<u8>>>, EnumerateError> {
        let mut batch = Vec::new();
        let mut busy_since: Option<Instant> = None;
        let mut busy_step = FIRST_BUSY_STEP;
        while !self.done && batch.len() < self.opts.batch_size {
            let Some((from, to)) = self.next_line().await? else {
                return Err(EnumerateError::Truncated { server: self.server.clone(), seen: self.counts.seen });
            };
            match parse_line(&self.buf[from..to]) {
                Line::Key(encoded) => {
                    self.started = true;
                    self.counts.seen += 1;
                    if !url_decode(encoded, &mut self.decoded) || self.decoded.is_empty() {
                        self.counts.skipped += 1;
                    } else if self.decoded.starts_with(&self.prefix) {
                        self.counts.under_prefix += 1;
                        batch.push(self.decoded.clone());
                    }
                }
                Line::End => self.done = true,
                _ if self.started => self.counts.skipped += 1,
                Line::NotStarted => self.done = true,
                Line::Busy => {
                    let since = *busy_since.get_or_insert_with(Instant::now);
                    let waited = since.elapsed();
                    if waited >= self.opts.busy_wait {
                        return Err(EnumerateError::Busy { server: self.server.clone(), waited });
                    }
                    self.counts.busy_retries += 1;
                    tokio::time::sleep(busy_step.min(self.opts.busy_wait - waited)).await;
                    busy_step = (busy_step * 2).min(MAX_BUSY_STEP);
                    self.send().await?;
                }
                Line::Refused(words) if words.starts_with(b"BADCLASS") && self.counts.walk == Walk::Hash => {
                    // No hash walk in this version: the LRUs, then.
                    self.counts.walk = Walk::Lru;
                    self.send().await?;
                }
                Line::Refused(words) => {
                    let reason = String::from_utf8_lossy(words).into_owned();
                    return Err(EnumerateError::Refused { server: self.server.clone(), reason });
                }
                Line::ServerError(words) => {
                    let reason = String::from_utf8_lossy(words).into_owned();
                    return Err(EnumerateError::Server { server: self.server.clone(), reason });
                }
                Line::Other => self.counts.skipped += 1,
            }
        }
        Ok(if batch.is_empty() { None } else { Some(batch) })
    }

    async fn send(&mut self) -> Result<(), EnumerateError> {
        let command = match self.counts.walk {
            Walk::Hash => METADUMP_HASH,
            Walk::Lru => METADUMP_ALL,
        };
        match tokio::time::timeout(self.opts.idle_timeout, self.stream.write_all(command)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(EnumerateError::Io { server: self.server.clone(), source }),
            Err(_) => Err(EnumerateError::Timeout { server: self.server.clone(), after: self.opts.idle_timeout }),
        }
    }

    /// The next line short enough to keep, as a range of `buf` without its
    /// `\n`; `None` at EOF.
    async fn next_line(&mut self) -> Result<Option<(usize, usize)>, EnumerateError> {
        loop {
            if let Some(at) = self.buf[self.start..self.end].iter().position(|&b| b == b'\n') {
                let (from, to) = (self.start, self.start + at);
                self.start = to + 1;
                if std::mem::take(&mut self.discarding) || to - from > self.opts.max_line {
                    self.counts.skipped += 1;
                    continue;
                }
                return Ok(Some((from, to)));
            }
            // No complete line: drop an overlong one, keep a partial one.
            if self.discarding || self.end - self.start > self.opts.max_line {
                self.discarding = true;
                self.start = 0;
                self.end = 0;
            } else if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let read = tokio::time::timeout(self.opts.idle_timeout, self.stream.read(&mut self.buf[self.end..]));
            match read.await {
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(n)) => self.end += n,
                Ok(Err(source)) => return Err(EnumerateError::Io { server: self.server.clone(), source }),
                Err(_) => {
                    return Err(EnumerateError::Timeout { server: self.server.clone(), after: self.opts.idle_timeout });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &[u8]) -> Option<Vec<u8>> {
        let mut out = vec![b'x'; 3];
        url_decode(s, &mut out).then_some(out)
    }

    #[test]
    fn url_decoding() {
        assert_eq!(decode(b"page%3Aa%20b"), Some(b"page:a b".to_vec()));
        assert_eq!(decode(b"100%25"), Some(b"100%".to_vec()));
        assert_eq!(decode(b"%25%32%30"), Some(b"%20".to_vec()), "decoded once, not twice");
        assert_eq!(decode(b"a-b.c_d~e+f"), Some(b"a-b.c_d~e+f".to_vec()), "`+` is not a space");
        assert_eq!(decode(b"%c3%A9%FF%00"), Some(vec![0xc3, 0xa9, 0xff, 0]));
        assert_eq!(decode(b""), Some(vec![]));
        for bad in [&b"%"[..], b"a%2", b"%G0", b"%0g", b"a%%20", b"%-1", b"% 1"] {
            assert_eq!(decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn line_classification() {
        let entry = b"key=p%3Ak exp=-1 la=1700000000 cas=2 fetch=no cls=1 size=68";
        assert_eq!(parse_line(entry), Line::Key(b"p%3Ak"));
        assert_eq!(parse_line(b"key=k\r"), Line::Key(b"k"));
        assert_eq!(parse_line(b"key= exp=-1"), Line::Other);
        assert_eq!(parse_line(b"key="), Line::Other);
        assert_eq!(parse_line(b"exp=-1 key=k"), Line::Other);
        assert_eq!(parse_line(b"kex=k exp=-1"), Line::Other);
        assert_eq!(parse_line(b""), Line::Other);
        assert_eq!(parse_line(b"END\r"), Line::End);
        assert_eq!(parse_line(b"END"), Line::End);
        assert_eq!(parse_line(b"ENDX"), Line::Other);
        assert_eq!(parse_line(b"END x"), Line::Other);
        assert_eq!(parse_line(b"BUSY currently processing crawler request\r"), Line::Busy);
        assert_eq!(parse_line(b"NOTSTARTED no items to crawl\r"), Line::NotStarted);
        assert_eq!(parse_line(b"ERROR\r"), Line::Refused(b"ERROR"));
        assert_eq!(parse_line(b"ERROR metadump not allowed"), Line::Refused(b"ERROR metadump not allowed"));
        assert_eq!(
            parse_line(b"CLIENT_ERROR lru crawler disabled\r"),
            Line::Refused(b"CLIENT_ERROR lru crawler disabled")
        );
        assert_eq!(parse_line(b"BADCLASS invalid class id"), Line::Refused(b"BADCLASS invalid class id"));
        assert_eq!(parse_line(b"SERVER_ERROR out of memory"), Line::ServerError(b"SERVER_ERROR out of memory"));
        assert_eq!(parse_line(b"ERRORS"), Line::Other);
        assert_eq!(parse_line(&[0xff, 0x00, b'\r']), Line::Other);
    }

    /// A fake server expecting each request of `script` in turn and
    /// answering it, for the stream handling; real memcached is in the
    /// integration tests.
    async fn fake_exchanges(script: Vec<(&'static [u8], Vec<u8>)>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for (want, answer) in script {
                let mut req = vec![0u8; want.len()];
                if s.read_exact(&mut req).await.is_err() {
                    return;
                }
                assert_eq!(String::from_utf8_lossy(&req), String::from_utf8_lossy(want));
                if s.write_all(&answer).await.is_err() {
                    return;
                }
            }
            // Keep the connection open until the client is done.
            let _ = s.read(&mut [0u8; 64]).await;
        });
        addr
    }

    /// `fake_exchanges` with `metadump hash` requests.
    async fn fake(answers: Vec<Vec<u8>>) -> String {
        fake_exchanges(answers.into_iter().map(|a| (METADUMP_HASH, a)).collect()).await
    }

    async fn collect(addr: &str, prefix: &[u8], opts: &Options) -> Result<(Vec<Vec<u8>>, Counts), EnumerateError> {
        let mut e = KeyEnumerator::start(addr, prefix, opts).await?;
        let mut keys = Vec::new();
        while let Some(batch) = e.next_batch().await? {
            assert!(!batch.is_empty() && batch.len() <= opts.batch_size.max(1));
            keys.extend(batch);
        }
        Ok((keys, e.counts()))
    }

    #[tokio::test]
    async fn streams_filters_and_skips_garbage() {
        let mut body = Vec::new();
        body.extend_from_slice(b"key=p%3Aa exp=-1 la=1 cas=1 fetch=no cls=1 size=60\n");
        body.extend_from_slice(b"key=other exp=-1 la=1 cas=2 fetch=no cls=1 size=60\n");
        body.extend_from_slice(format!("key=p%3A{} exp=-1\n", "x".repeat(5000)).as_bytes());
        body.extend_from_slice(b"garbage\n");
        body.extend_from_slice(b"key=p%3Ab%2 exp=-1\n");
        body.extend_from_slice(b"key=p%3Ac%20d%25 exp=-1 la=1 cas=3 fetch=yes cls=1 size=60\n");
        body.extend_from_slice(b"key=p%3A%FF exp=-1\n");
        body.extend_from_slice(b"END\r\n");
        let addr = fake(vec![body]).await;
        let opts = Options { batch_size: 2, ..Options::default() };
        let (keys, counts) = collect(&addr, b"p:", &opts).await.unwrap();
        assert_eq!(keys, vec![b"p:a".to_vec(), b"p:c d%".to_vec(), b"p:\xff".to_vec()]);
        assert_eq!(counts, Counts { seen: 5, under_prefix: 3, skipped: 3, busy_retries: 0, walk: Walk::Hash });
    }

    #[tokio::test]
    async fn a_server_without_the_hash_walk_is_walked_by_lru() {
        let addr = fake_exchanges(vec![
            (METADUMP_HASH, b"BADCLASS invalid class id\r\n".to_vec()),
            (METADUMP_ALL, b"BUSY currently processing crawler request\r\n".to_vec()),
            (METADUMP_ALL, b"key=k exp=-1\nEND\r\n".to_vec()),
        ])
        .await;
        let (keys, counts) = collect(&addr, b"", &Options::default()).await.unwrap();
        assert_eq!(keys, vec![b"k".to_vec()]);
        assert_eq!(counts, Counts { seen: 1, under_prefix: 1, skipped: 0, busy_retries: 1, walk: Walk::Lru });

        // BADCLASS to the LRU walk too: refused.
        let addr = fake_exchanges(vec![
            (METADUMP_HASH, b"BADCLASS invalid class id\r\n".to_vec()),
            (METADUMP_ALL, b"BADCLASS invalid class id\r\n".to_vec()),
        ])
        .await;
        let e = collect(&addr, b"", &Options::default()).await.unwrap_err();
        assert!(matches!(&e, EnumerateError::Refused { reason, .. } if reason == "BADCLASS invalid class id"), "{e}");
    }

    #[tokio::test]
    async fn busy_is_retried_then_refusals_and_truncation_are_errors() {
        let addr = fake(vec![
            b"BUSY currently processing crawler request\r\n".to_vec(),
            b"BUSY currently processing crawler request\r\n".to_vec(),
            b"key=k exp=-1\nEND\r\n".to_vec(),
        ])
        .await;
        let (keys, counts) = collect(&addr, b"", &Options::default()).await.unwrap();
        assert_eq!(keys, vec![b"k".to_vec()]);
        assert_eq!(counts.busy_retries, 2);

        let busy = vec![b"BUSY currently processing crawler request\r\n".to_vec(); 1000];
        let addr = fake(busy).await;
        let opts = Options { busy_wait: Duration::from_millis(50), ..Options::default() };
        let e = collect(&addr, b"", &opts).await.unwrap_err();
        assert!(matches!(&e, EnumerateError::Busy { server, .. } if *server == addr), "{e}");
        assert!(!e.is_refused());

        for answer in [&b"CLIENT_ERROR lru crawler disabled\r\n"[..], b"ERROR\r\n", b"ERROR metadump not allowed\r\n"] {
            let addr = fake(vec![answer.to_vec()]).await;
            let e = collect(&addr, b"", &Options::default()).await.unwrap_err();
            let want = String::from_utf8_lossy(&answer[..answer.len() - 2]).into_owned();
            assert!(
                matches!(&e, EnumerateError::Refused { server, reason } if *server == addr && *reason == want),
                "{e}"
            );
            assert!(e.is_refused() && e.to_string().contains(&addr), "{e}");
        }

        let addr = fake(vec![b"NOTSTARTED no items to crawl\r\n".to_vec()]).await;
        assert_eq!(collect(&addr, b"", &Options::default()).await.unwrap().0, Vec::<Vec<u8>>::new());

        // The server closes after two entries, without END.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = vec![0u8; METADUMP_HASH.len()];
            s.read_exact(&mut req).await.unwrap();
            s.write_all(b"key=a exp=-1\nkey=b exp=-1\nkey=c ex").await.unwrap();
        });
        let e = collect(&addr, b"", &Options::default()).await.unwrap_err();
        assert!(matches!(&e, EnumerateError::Truncated { seen: 2, .. }), "{e}");
    }

    #[tokio::test]
    async fn silence_is_a_timeout_and_no_server_a_connect_error() {
        let addr = fake(vec![b"key=a exp=-1\n".to_vec()]).await;
        let opts = Options { idle_timeout: Duration::from_millis(100), ..Options::default() };
        let e = collect(&addr, b"", &opts).await.unwrap_err();
        assert!(matches!(&e, EnumerateError::Timeout { server, .. } if *server == addr), "{e}");

        let closed = "127.0.0.1:1".to_string();
        let e = collect(&closed, b"", &Options::default()).await.unwrap_err();
        assert!(matches!(&e, EnumerateError::Connect { server, .. } if *server == closed), "{e}");
    }
}
