//! The consistency inspector: a low-rate check, always on, that memcached
//! holds what tailcache published (Meta's Polaris idea, for our cache).
//!
//! It runs in the publisher's thread, between rounds (never during one):
//! when the publisher is idle, at most every [`TICK`], and after a round
//! when the last inspection is more than two ticks old (a publisher that is
//! never idle is still inspected). Each inspection reads
//! `inspect.keys_per_second × elapsed` rows of `_tailcache_published` from
//! a cursor that walks the table in key order (from a random place at
//! start, wrapping around), so every published key is looked at once per
//! `keys / keys_per_second` seconds. Their values are read from memcached
//! in pipelined `mg` batches, on every server each key is placed on, and
//! their [`value_hash`] compared with the `vhash` recorded when the key was
//! written. A key without a `vhash` (recorded before it existed) or in
//! doubt ([`DOUBT`], being rewritten) is skipped, not counted.
//!
//! A key that differs (or is missing) is a *suspect*. It is looked at
//! again at the next inspection, once the publisher has caught up (idle, or
//! just after a round): if its record changed meanwhile (a round rewrote or
//! deleted it) or memcached now holds the recorded value, it was
//! `in_flight`; if it still differs, it is `inconsistent`: logged (warn,
//! with view, key, expected and found hashes; at most [`LOG_BURST`] lines a
//! minute, the rest counted in the next line), counted, and repaired: the
//! key is recorded in doubt and the publisher's next round computes its
//! view in full, which writes it again (or deletes it).
//!
//! The results are counted in `tailcache_inspected_keys_total{result}` and
//! in a [`Tally`] in the shared status (`/status` `inspect`, `tailcache
//! status`): over the last hour (per-minute buckets) and since start, as a
//! percentage of keys that were not inconsistent, with its nines.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;
use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use super::published::{DOUBT, Published, value_hash};
use crate::config::Codec;
use crate::error::{Error, Result};
use crate::metrics;
use crate::sink::{Held, Sink};
use crate::status::{Status, unix_now};

/// How often an idle publisher inspects.
pub const TICK: Duration = Duration::from_secs(1);
/// Suspects kept for a second look at most (the rest wait for the cursor's
/// next pass).
const MAX_SUSPECTS: usize = 10_000;
/// The value size assumed per key when batching reads.
const EXPECTED_LEN: usize = 512;
/// At most this many inconsistency log lines per [`LOG_WINDOW`] (an
/// evicting memcached would otherwise log every key it lost); the rest are
/// counted, and their number is given in the next line.
pub const LOG_BURST: u32 = 10;
pub const LOG_WINDOW: Duration = Duration::from_secs(60);
/// Minutes in the window of [`Tally::last_hour`].
const WINDOW_MINUTES: u64 = 60;

/// Inspected keys by result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub consistent: u64,
    pub inconsistent: u64,
    pub in_flight: u64,
}

impl Counts {
    pub fn keys(&self) -> u64 {
        self.consistent + self.inconsistent + self.in_flight
    }

    pub fn add(&mut self, o: &Counts) {
        self.consistent += o.consistent;
        self.inconsistent += o.inconsistent;
        self.in_flight += o.in_flight;
    }

    /// The share of inspected keys that were not inconsistent, in percent.
    pub fn percent(&self) -> Option<f64> {
        let keys = self.keys();
        (keys > 0).then(|| 100.0 * (keys - self.inconsistent) as f64 / keys as f64)
    }

    /// `-log10` of the share of inconsistent keys (99.9 % is 3 nines);
    /// `None` without keys or without an inconsistent one.
    pub fn nines(&self) -> Option<f64> {
        let keys = self.keys();
        // + 0.0: all inconsistent is 0 nines, not -0.
        (keys > 0 && self.inconsistent > 0).then(|| -(self.inconsistent as f64 / keys as f64).log10() + 0.0)
    }

    /// For people: "99.9993 % (5.2 nines) over 180,000 keys". The
    /// percentage is truncated, never rounded up to 100, and shows as many
    /// decimals as its nines need.
    pub fn describe(&self) -> String {
        let keys = self.keys();
        if keys == 0 {
            return "no keys inspected".to_owned();
        }
        let over = format!("over {} key{}", thousands(keys), if keys == 1 { "" } else { "s" });
        let Some(nines) = self.nines() else {
            return format!("100 % (none inconsistent) {over}");
        };
        let decimals = (nines.floor() as i32 - 1).clamp(2, 12);
        let scale = 10f64.powi(decimals);
        let good = (keys - self.inconsistent) as f64;
        // Truncated in integers, so 99.99996 never shows as 100.0000.
        let scaled = (good * 100.0 * scale / keys as f64).floor();
        format!("{:.*} % ({nines:.1} nines) {over}", decimals as usize, scaled / scale)
    }
}

/// `n` with a comma every three digits.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The inspector's results since start and per minute over the last hour;
/// in the shared status, served as `inspect` in `/status`.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub keys_per_second: u32,
    pub since_start: Counts,
    /// (unix minute, counts), oldest first, within the last hour.
    minutes: VecDeque<(u64, Counts)>,
}

impl Tally {
    pub fn new(keys_per_second: u32) -> Tally {
        Tally { keys_per_second, ..Default::default() }
    }

    /// Adds results found at `now_unix` (seconds).
    pub fn add(&mut self, now_unix: f64, c: &Counts) {
        self.since_start.add(c);
        let minute = (now_unix.max(0.0) as u64) / 60;
        match self.minutes.back_mut() {
            Some((m, counts)) if *m == minute => counts.add(c),
            _ => self.minutes.push_back((minute, *c)),
        }
        while self.minutes.front().is_some_and(|(m, _)| m + WINDOW_MINUTES <= minute) {
            self.minutes.pop_front();
        }
    }

    /// The results of the last hour (the current minute and the 59 before).
    pub fn last_hour(&self, now_unix: f64) -> Counts {
        let minute = (now_unix.max(0.0) as u64) / 60;
        let mut sum = Counts::default();
        for (m, c) in &self.minutes {
            if m + WINDOW_MINUTES > minute && *m <= minute {
                sum.add(c);
            }
        }
        sum
    }
}

#[derive(Serialize)]
struct Summary {
    #[serde(flatten)]
    counts: Counts,
    keys: u64,
    /// Keys not inconsistent, in percent (`null` without keys).
    percent: Option<f64>,
    /// `null` without an inconsistent key.
    nines: Option<f64>,
    /// For people, e.g. "99.9993 % (5.2 nines) over 180,000 keys".
    summary: String,
}

impl Summary {
    fn of(counts: Counts) -> Summary {
        Summary {
            counts,
            keys: counts.keys(),
            percent: counts.percent(),
            nines: counts.nines(),
            summary: counts.describe(),
        }
    }
}

impl Serialize for Tally {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Tally", 3)?;
        st.serialize_field("keys_per_second", &self.keys_per_second)?;
        st.serialize_field("last_hour", &Summary::of(self.last_hour(unix_now())))?;
        st.serialize_field("since_start", &Summary::of(self.since_start))?;
        st.end()
    }
}

/// A published key as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sample {
    view: String,
    key: Vec<u8>,
    hash: [u8; 16],
    vhash: [u8; 16],
}

/// A key found differing, waiting for its second look.
#[derive(Debug)]
struct Suspect {
    sample: Sample,
}

/// The inspector's state, owned by the publisher; see the module docs.
pub struct Inspector {
    rate: u32,
    codec: Codec,
    /// When the last inspection ran.
    last: Option<Instant>,
    /// The last row inspected; `None` at the start of the table.
    cursor: Option<(String, Vec<u8>)>,
    /// The cursor was put at a random place (once, at the first inspection).
    placed: bool,
    suspects: Vec<Suspect>,
    /// Start of the current log window, lines logged and suppressed in it.
    log_window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// `(view, key, hash, vhash)` as read from the table.
type Row = (String, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);

fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn blob16(v: Option<Vec<u8>>) -> Option<[u8; 16]> {
    v.and_then(|v| <[u8; 16]>::try_from(v.as_slice()).ok())
}

impl Inspector {
    /// An inspector of `keys_per_second` (0: disabled) keys of values
    /// encoded with `codec`; shows itself in `status` when enabled.
    pub fn new(keys_per_second: u32, codec: Codec, status: &Status) -> Inspector {
        if keys_per_second > 0 {
            status.update(|s| s.inspect = Some(Tally::new(keys_per_second)));
            for r in metrics::INSPECT_RESULTS {
                metrics::keys_inspected(r, 0);
            }
        }
        Inspector {
            rate: keys_per_second,
            codec,
            last: None,
            cursor: None,
            placed: false,
            suspects: Vec::new(),
            log_window: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// When the next inspection is due; `None` when disabled.
    pub fn due_at(&self) -> Option<Instant> {
        (self.rate > 0).then(|| self.last.map_or_else(Instant::now, |t| t + TICK))
    }

    /// Whether an idle publisher should inspect now.
    pub fn due(&self) -> bool {
        self.due_at().is_some_and(|t| t <= Instant::now())
    }

    /// Whether a busy publisher should inspect after its round: the last
    /// inspection is more than two ticks old.
    pub fn overdue(&self) -> bool {
        self.rate > 0 && self.last.is_some_and(|t| t.elapsed() >= 2 * TICK)
    }

    /// Skips an inspection that is due (nothing is concluded while keys
    /// are in doubt).
    pub fn skip(&mut self) {
        self.last = Some(Instant::now());
    }

    /// One inspection (see the module docs): looks again at the suspects
    /// of the last one, then at the next keys of the cursor. Returns the
    /// views of the keys found inconsistent, which are recorded in doubt:
    /// the caller recomputes them in full.
    pub async fn inspect(
        &mut self,
        sink: &Sink,
        book: &Connection,
        published: &mut Published,
        status: &Status,
    ) -> Result<Vec<String>> {
        let now = Instant::now();
        let elapsed = self.last.map_or(TICK, |t| now.duration_since(t)).min(2 * TICK);
        self.last = Some(now);
        let mut counts = Counts::default();
        let mut repair: Vec<(String, Vec<u8>)> = Vec::new();

        let suspects = std::mem::take(&mut self.suspects);
        let mut again = Vec::with_capacity(suspects.len());
        for s in suspects {
            match record_of(book, &s.sample.view, &s.sample.key)? {
                Some((hash, Some(vhash))) if hash == s.sample.hash && vhash == s.sample.vhash => again.push(s),
                // Rewritten, deleted or put in doubt by a round since.
                _ => counts.in_flight += 1,
            }
        }
        if !again.is_empty() {
            let samples: Vec<&Sample> = again.iter().map(|s| &s.sample).collect();
            match self.read(sink, &samples).await {
                Some(found) => {
                    for (s, (held, got)) in again.into_iter().zip(found) {
                        if held == Held::Same {
                            counts.in_flight += 1;
                            continue;
                        }
                        counts.inconsistent += 1;
                        let found = match (held, got) {
                            (Held::Missing, _) => "missing".to_owned(),
                            (_, Some(h)) => hex(&h),
                            (_, None) => "unreadable".to_owned(),
                        };
                        let Some(suppressed) = self.may_log(now) else {
                            repair.push((s.sample.view, s.sample.key));
                            continue;
                        };
                        tracing::warn!(
                            suppressed,
                            view = %s.sample.view,
                            key = %String::from_utf8_lossy(&s.sample.key),
                            expected = %hex(&s.sample.vhash),
                            found = %found,
                            "memcached does not hold what was published (still so once publishing caught up); the key is written again"
                        );
                        repair.push((s.sample.view, s.sample.key));
                    }
                }
                // A server did not answer: looked at again next time.
                None => self.suspects = again,
            }
        }

        let total = published.len();
        let n = ((f64::from(self.rate) * elapsed.as_secs_f64()).round() as u64).clamp(1, total.max(1));
        let samples = if total == 0 { Vec::new() } else { self.sample(book, n as usize, total)? };
        if !samples.is_empty() {
            let refs: Vec<&Sample> = samples.iter().collect();
            if let Some(found) = self.read(sink, &refs).await {
                for (sample, (held, _)) in samples.into_iter().zip(found) {
                    if held == Held::Same {
                        counts.consistent += 1;
                    } else if self.suspects.len() < MAX_SUSPECTS
                        && !self.suspects.iter().any(|s| s.sample.key == sample.key && s.sample.view == sample.view)
                    {
                        self.suspects.push(Suspect { sample });
                    }
                }
            }
        }

        if counts.keys() > 0 {
            metrics::keys_inspected("consistent", counts.consistent);
            metrics::keys_inspected("inconsistent", counts.inconsistent);
            metrics::keys_inspected("in_flight", counts.in_flight);
            let at = unix_now();
            status.update(|s| s.inspect.get_or_insert_with(|| Tally::new(self.rate)).add(at, &counts));
        }
        if repair.is_empty() {
            return Ok(Vec::new());
        }
        published.doubt(book, &repair)?;
        let mut views: Vec<String> = repair.into_iter().map(|(v, _)| v).collect();
        views.sort();
        views.dedup();
        Ok(views)
    }

    /// `Some(lines suppressed since the last one)` when a line may be
    /// logged (see [`LOG_BURST`]).
    fn may_log(&mut self, now: Instant) -> Option<u64> {
        if self.log_window.is_none_or(|w| now.duration_since(w) >= LOG_WINDOW) {
            self.log_window = Some(now);
            self.logged = 0;
        }
        if self.logged < LOG_BURST {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// What memcached holds for each sample: [`Held`] on the servers the
    /// key is placed on, and the [`value_hash`] found where it differs.
    /// `None` when a server failed (nothing is concluded then).
    async fn read(&self, sink: &Sink, samples: &[&Sample]) -> Option<Vec<(Held, Option<[u8; 16]>)>> {
        let keys: Vec<&[u8]> = samples.iter().map(|s| s.key.as_slice()).collect();
        let lens = vec![EXPECTED_LEN; keys.len()];
        let found: RefCell<Vec<Option<[u8; 16]>>> = RefCell::new(vec![None; keys.len()]);
        let codec = self.codec;
        let same = |i: usize, value: &[u8], flags: u32| {
            let h = value_hash(codec, value, flags);
            let ok = samples.get(i).is_some_and(|s| s.vhash == h);
            if !ok && let Some(f) = found.borrow_mut().get_mut(i) {
                *f = Some(h);
            }
            ok
        };
        let (held, failed) = sink.read_back_partial(&keys, &lens, None, same, &[]).await;
        if let Some(e) = failed.first() {
            tracing::debug!(error = %e, "inspection skipped: memcached did not answer");
            return None;
        }
        Some(held.into_iter().zip(found.into_inner()).collect())
    }

    /// The next `n` (at most `total`, the published keys) rows after the
    /// cursor, wrapping around, without those not to inspect (no `vhash`,
    /// in doubt).
    fn sample(&mut self, book: &Connection, n: usize, total: u64) -> Result<Vec<Sample>> {
        let ctx = |e| Error::sqlite("read _tailcache_published (inspector)", e);
        if !self.placed {
            self.placed = true;
            let offset = rand::rng().random_range(0..total) as i64;
            self.cursor = book
                .query_row(
                    "SELECT view, key FROM main._tailcache_published ORDER BY view, key LIMIT 1 OFFSET ?1",
                    [offset],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(ctx)?;
        }
        let mut rows: Vec<Row> = Vec::with_capacity(n);
        let map = |r: &rusqlite::Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?));
        if let Some((view, key)) = &self.cursor {
            let mut stmt = book
                .prepare_cached(
                    "SELECT view, key, hash, vhash FROM main._tailcache_published
                     WHERE (view, key) > (?1, ?2) ORDER BY view, key LIMIT ?3",
                )
                .map_err(ctx)?;
            for r in stmt.query_map((view, key, n as i64), map).map_err(ctx)? {
                rows.push(r.map_err(ctx)?);
            }
        }
        if rows.len() < n {
            // Wrapped: from the start. `n <= total`, so this stops before
            // the rows just read.
            let mut stmt = book
                .prepare_cached(
                    "SELECT view, key, hash, vhash FROM main._tailcache_published ORDER BY view, key LIMIT ?1",
                )
                .map_err(ctx)?;
            let first = rows.len();
            for r in stmt.query_map([(n - first) as i64], map).map_err(ctx)? {
                let r = r.map_err(ctx)?;
                if rows[..first].iter().any(|o| o.0 == r.0 && o.1 == r.1) {
                    break;
                }
                rows.push(r);
            }
        }
        if let Some((view, key, _, _)) = rows.last() {
            self.cursor = Some((view.clone(), key.clone()));
        }
        Ok(rows
            .into_iter()
            .filter_map(|(view, key, hash, vhash)| {
                let (hash, vhash) = (blob16(hash)?, blob16(vhash)?);
                (hash != DOUBT).then_some(Sample { view, key, hash, vhash })
            })
            .collect())
    }
}

/// `(hash, vhash)` as recorded.
type Record = ([u8; 16], Option<[u8; 16]>);

/// The `(hash, vhash)` recorded for `key` of `view`.
fn record_of(book: &Connection, view: &str, key: &[u8]) -> Result<Option<Record>> {
    let ctx = |e| Error::sqlite("read _tailcache_published (inspector)", e);
    let row: Option<(Vec<u8>, Option<Vec<u8>>)> = book
        .prepare_cached("SELECT hash, vhash FROM main._tailcache_published WHERE view = ?1 AND key = ?2")
        .map_err(ctx)?
        .query_row((view, key), |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(ctx)?;
    Ok(row.and_then(|(h, v)| Some((blob16(Some(h))?, blob16(v)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(consistent: u64, inconsistent: u64, in_flight: u64) -> Counts {
        Counts { consistent, inconsistent, in_flight }
    }

    #[test]
    fn consistency_is_shown_with_its_nines() {
        assert_eq!(counts(179_998, 1, 1).describe(), "99.9994 % (5.3 nines) over 180,000 keys");
        assert_eq!(counts(999, 1, 0).describe(), "99.90 % (3.0 nines) over 1,000 keys");
        assert_eq!(counts(1, 1, 0).describe(), "50.00 % (0.3 nines) over 2 keys");
        assert_eq!(counts(0, 3, 0).describe(), "0.00 % (0.0 nines) over 3 keys");
        assert_eq!(counts(1_234_567, 0, 8).describe(), "100 % (none inconsistent) over 1,234,575 keys");
        assert_eq!(counts(1, 0, 0).describe(), "100 % (none inconsistent) over 1 key");
        assert_eq!(counts(0, 0, 0).describe(), "no keys inspected");
        // Never rounded up to 100: 1 in 30 million is 99.9999966 %.
        assert_eq!(counts(29_999_999, 1, 0).describe(), "99.999996 % (7.5 nines) over 30,000,000 keys");
        assert_eq!(counts(99, 1, 0).nines(), Some(2.0));
        assert_eq!(counts(5, 0, 0).nines(), None);
        assert_eq!(counts(3, 1, 0).percent(), Some(75.0));
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
    }

    #[test]
    fn the_cursor_walks_every_key_once_per_pass_and_skips_what_it_cannot_check() {
        use super::super::published::Change;
        use std::sync::Arc;
        let c = Connection::open_in_memory().unwrap();
        let mut p = Published::load(&c).unwrap();
        let (v, w): (Arc<str>, Arc<str>) = ("v".into(), "w".into());
        let put =
            |view: &Arc<str>, k: &str| Change::Put { view: view.clone(), key: k.into(), hash: [1; 16], vhash: [2; 16] };
        let changes = vec![put(&v, "a"), put(&v, "b"), put(&v, "c"), put(&w, "a"), put(&w, "b")];
        p.record(&c, &changes, None).unwrap();
        let status = Status::new();
        let mut i = Inspector::new(10, Codec::Msgpack, &status);
        assert!(status.snapshot().inspect.is_some());
        i.placed = true; // from the start, not a random place
        let keys = |s: Vec<Sample>| {
            s.into_iter().map(|s| format!("{}/{}", s.view, String::from_utf8(s.key).unwrap())).collect::<Vec<_>>()
        };
        assert_eq!(keys(i.sample(&c, 3, 5).unwrap()), ["v/a", "v/b", "v/c"]);
        assert_eq!(keys(i.sample(&c, 3, 5).unwrap()), ["w/a", "w/b", "v/a"], "wraps around");
        assert_eq!(keys(i.sample(&c, 5, 5).unwrap()), ["v/b", "v/c", "w/a", "w/b", "v/a"], "each key once");
        // In doubt, or recorded before vhash existed: not inspected.
        p.doubt(&c, &[("v".to_owned(), b"b".to_vec())]).unwrap();
        c.execute("UPDATE _tailcache_published SET vhash = NULL WHERE view = 'w' AND key = x'61'", []).unwrap();
        assert_eq!(keys(i.sample(&c, 5, 5).unwrap()), ["v/c", "w/b", "v/a"]);
        assert_eq!(record_of(&c, "w", b"b").unwrap(), Some(([1; 16], Some([2; 16]))));
        assert_eq!(record_of(&c, "w", b"a").unwrap(), Some(([1; 16], None)));
        assert_eq!(record_of(&c, "w", b"zz").unwrap(), None);
        let off = Inspector::new(0, Codec::Msgpack, &Status::new());
        assert!(off.due_at().is_none() && !off.due() && !off.overdue());
        // Inconsistency lines are rate-limited, the suppressed ones counted.
        let t0 = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(i.may_log(t0), Some(0));
        }
        assert_eq!(i.may_log(t0), None);
        assert_eq!(i.may_log(t0 + Duration::from_secs(1)), None);
        assert_eq!(i.may_log(t0 + LOG_WINDOW), Some(2));
    }

    #[test]
    fn the_hour_window_keeps_sixty_minutes() {
        let mut t = Tally::new(50);
        let t0 = 1_000_020.0 * 60.0; // the start of a minute
        t.add(t0, &counts(10, 1, 0));
        t.add(t0 + 30.0, &counts(5, 0, 2));
        assert_eq!(t.last_hour(t0 + 59.0), counts(15, 1, 2), "one minute, one bucket");
        t.add(t0 + 600.0, &counts(100, 0, 0));
        // 59 minutes later the first bucket still counts; at 60 it is out.
        assert_eq!(t.last_hour(t0 + 59.0 * 60.0 + 59.0), counts(115, 1, 2));
        assert_eq!(t.last_hour(t0 + 3600.0), counts(100, 0, 0));
        assert_eq!(t.last_hour(t0 + 600.0 + 3600.0), Counts::default());
        assert_eq!(t.since_start, counts(115, 1, 2), "since start keeps everything");
        // Adding an hour later drops the old buckets.
        t.add(t0 + 7200.0, &counts(1, 0, 0));
        assert_eq!(t.minutes.len(), 1);
        assert_eq!(t.last_hour(t0 + 7200.0), counts(1, 0, 0));
        assert_eq!(t.since_start.keys(), 119);
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["keys_per_second"], 50);
        assert_eq!(json["since_start"]["inconsistent"], 1);
        assert_eq!(json["since_start"]["keys"], 119);
        assert!(json["since_start"]["summary"].as_str().unwrap().ends_with("over 119 keys"), "{json}");
    }
}
