//! How the replicator and the start-up preflight wait between attempts to
//! reach the database, and how they log them.
//!
//! The policy (README, "Reconnecting"):
//!
//! * The first retry after a [`Backoff::reset`] is immediate: a link lost
//!   after a session that streamed is retried at once (the server may be
//!   back already, or was never gone: a killed connection, a failover).
//! * While the server stays down, waits grow exponentially from
//!   [`BACKOFF_MIN`] with jitter (each wait is drawn from ½…1 of its step),
//!   capped by what the failure costs the server: [`LINK_CAP`] (1 s) when
//!   the connection failed or broke without the server answering (a refused
//!   TCP connect costs it nothing, and the first attempt after it comes back
//!   then succeeds within a second), [`SERVER_CAP`] (30 s) when the server
//!   answered with an error (too many connections, a lock wait, a failed
//!   snapshot, ...), whose retries cost it work.
//! * The backoff is reset once a session has connected and streamed
//!   (see the replicator's loop), never by time alone.
//!
//! [`RetryLog`] logs the first failure and every change of error at warn,
//! repeats of the same error at most every [`RetryLog::SUMMARY_EVERY`] with
//! how many attempts it summarises (each attempt is still logged at debug),
//! and the recovery with the number of attempts and how long it took.

use std::time::{Duration, Instant};

use crate::error::Error;

/// The first step of the exponential backoff.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between attempts that failed without the server
/// answering (refused, reset, timed out, closed).
pub const LINK_CAP: Duration = Duration::from_secs(1);
/// The longest wait after an error the server answered.
pub const SERVER_CAP: Duration = Duration::from_secs(30);

/// MySQL error codes a server sends while it shuts down or starts: as free
/// to retry as a refused connect (ER_SERVER_SHUTDOWN, ER_NORMAL_SHUTDOWN,
/// ER_SHUTDOWN_COMPLETE, ER_CONNECTION_KILLED, ER_SERVER_OFFLINE_MODE, and
/// MySQL's ER_SERVER_IS_STARTING / ER_SERVER_SHUTDOWN_IN_PROGRESS range).
const SHUTDOWN_CODES: &[u16] = &[1053, 1077, 1079, 1927, 3032, 4176];

/// Whether `e` is a failure of the link itself (the server did not answer
/// with an error of its own): retried with waits capped at [`LINK_CAP`].
pub fn is_link_failure(e: &Error) -> bool {
    match e {
        Error::Mysql { source, .. } => match source {
            mysql_async::Error::Server(s) => SHUTDOWN_CODES.contains(&s.code),
            mysql_async::Error::Io(_) | mysql_async::Error::Driver(_) => true,
            _ => false,
        },
        // Our own "the link is dead / the server closed the stream".
        Error::Transient(_) => true,
        _ => false,
    }
}

/// The cap for a failure: [`LINK_CAP`] or [`SERVER_CAP`].
pub fn cap_for(e: &Error) -> Duration {
    if is_link_failure(e) { LINK_CAP } else { SERVER_CAP }
}

/// Capped exponential backoff with jitter and a reset; the first wait after
/// a reset (or a new backoff) is zero.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    /// Failures since the last reset.
    failures: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Self::default()
    }

    /// Back to the start: the next failure is retried at once.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts a failure and returns how long to wait before the next
    /// attempt, at most `cap`.
    pub fn next(&mut self, cap: Duration) -> Duration {
        self.next_with(cap, rand::random_range(0.5..=1.0))
    }

    /// [`Backoff::next`] with the jitter factor given (in ½…1).
    pub fn next_with(&mut self, cap: Duration, jitter: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        step(self.failures, cap).mul_f64(jitter.clamp(0.5, 1.0))
    }
}

/// The wait before jitter after `failures` consecutive failures: 0, then
/// [`BACKOFF_MIN`] doubling each time, at most `cap`.
pub fn step(failures: u32, cap: Duration) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => BACKOFF_MIN.saturating_mul(1u32 << (n - 2).min(20)).min(cap),
    }
}

/// Logs a run of failed attempts without flooding the log (see the module
/// docs).
#[derive(Debug)]
pub struct RetryLog {
    /// The message of a failure ("binlog link lost; reconnecting", ...).
    what: &'static str,
    failures: u32,
    first_failure: Option<Instant>,
    last_error: Option<String>,
    last_warn: Option<Instant>,
    /// Failures logged at debug only since the last warn.
    quiet: u32,
}

impl RetryLog {
    /// An unchanged error is logged again at warn at most this often.
    pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

    pub fn new(what: &'static str) -> Self {
        RetryLog { what, failures: 0, first_failure: None, last_error: None, last_warn: None, quiet: 0 }
    }

    /// An attempt failed with `error`; the next one is in `retry_in`.
    pub fn failed(&mut self, error: &str, retry_in: Duration) {
        self.failed_at(error, retry_in, Instant::now());
    }

    /// Whether [`RetryLog::failed_at`] logs this failure at warn (false:
    /// at debug, counted into the next summary).
    fn should_warn(&self, error: &str, now: Instant) -> bool {
        self.last_error.as_deref() != Some(error)
            || self.last_warn.is_none_or(|t| now.saturating_duration_since(t) >= Self::SUMMARY_EVERY)
    }

    fn failed_at(&mut self, error: &str, retry_in: Duration, now: Instant) -> bool {
        self.failures += 1;
        let since = *self.first_failure.get_or_insert(now);
        let retry_in_ms = retry_in.as_millis() as u64;
        let warn = self.should_warn(error, now);
        if warn {
            let down_ms = now.saturating_duration_since(since).as_millis() as u64;
            if self.quiet == 0 {
                tracing::warn!(error, attempt = self.failures, retry_in_ms, "{}", self.what);
            } else {
                tracing::warn!(
                    error,
                    attempt = self.failures,
                    retry_in_ms,
                    same_error_attempts = self.quiet,
                    failing_for_ms = down_ms,
                    "{} (the same error again)",
                    self.what
                );
            }
            self.last_warn = Some(now);
            self.quiet = 0;
            if self.last_error.as_deref() != Some(error) {
                self.last_error = Some(error.to_owned());
            }
        } else {
            self.quiet += 1;
            tracing::debug!(error, attempt = self.failures, retry_in_ms, "{}", self.what);
        }
        warn
    }

    /// An attempt succeeded: logs the recovery when there were failures,
    /// and starts afresh.
    pub fn recovered(&mut self) {
        if let Some(since) = self.first_failure.take() {
            tracing::info!(
                attempts = self.failures,
                failing_for_ms = since.elapsed().as_millis() as u64,
                after = self.what,
                "reconnected"
            );
        }
        *self = RetryLog::new(self.what);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_retry_is_immediate_then_grows_to_the_cap() {
        let steps: Vec<Duration> = (1..=8).map(|n| step(n, LINK_CAP)).collect();
        assert_eq!(steps, [ms(0), ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000), ms(1000)]);
        assert_eq!(step(12, SERVER_CAP), SERVER_CAP);
        assert_eq!(step(10, SERVER_CAP), ms(25_600));
        assert_eq!(step(u32::MAX, SERVER_CAP), SERVER_CAP, "no overflow however long it fails");
    }

    #[test]
    fn jitter_stays_within_half_to_full_step() {
        let mut b = Backoff::new();
        assert_eq!(b.next(LINK_CAP), Duration::ZERO, "the first retry is immediate");
        for n in 2..=30 {
            let d = b.next(LINK_CAP);
            let s = step(n, LINK_CAP);
            assert!(d >= s / 2 && d <= s, "failure {n}: {d:?} outside {:?}..={s:?}", s / 2);
        }
        assert_eq!(b.failures(), 30);
        assert_eq!(Backoff::new().next_with(LINK_CAP, 0.0), Duration::ZERO);
        let mut b = Backoff::new();
        b.next_with(LINK_CAP, 1.0);
        assert_eq!(b.next_with(LINK_CAP, 0.1), ms(50), "jitter below ½ is clamped");
    }

    #[test]
    fn reset_makes_the_next_retry_immediate() {
        let mut b = Backoff::new();
        for _ in 0..9 {
            b.next_with(SERVER_CAP, 1.0);
        }
        assert_eq!(b.next_with(SERVER_CAP, 1.0), ms(25_600));
        b.reset();
        assert_eq!(b.next_with(SERVER_CAP, 1.0), Duration::ZERO);
        assert_eq!(b.next_with(SERVER_CAP, 1.0), ms(100));
    }

    #[test]
    fn five_restarts_each_wait_at_most_the_link_cap() {
        // A server down ~3 s five times, the backoff reset by each session
        // that streamed in between: no wait ever exceeds the link cap, and
        // the waits do not grow from one restart to the next.
        let mut b = Backoff::new();
        let mut worst = Vec::new();
        for _restart in 0..5 {
            let mut down = Duration::ZERO;
            let mut longest = Duration::ZERO;
            while down < Duration::from_secs(3) {
                let d = b.next_with(LINK_CAP, 1.0);
                longest = longest.max(d);
                down += d.max(ms(1));
            }
            worst.push(longest);
            b.reset(); // the session after it reached streaming
        }
        assert_eq!(worst, vec![LINK_CAP; 5]);
    }

    #[test]
    fn link_failures_and_server_answers() {
        let io = Error::mysql(
            "connect",
            mysql_async::Error::Io(mysql_async::IoError::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))),
        );
        assert_eq!(cap_for(&io), LINK_CAP);
        assert_eq!(cap_for(&Error::Transient("the server closed the binlog stream".into())), LINK_CAP);
        let server = |code: u16| {
            Error::mysql(
                "connect",
                mysql_async::Error::Server(mysql_async::ServerError {
                    code,
                    message: "x".into(),
                    state: "HY000".into(),
                }),
            )
        };
        assert_eq!(cap_for(&server(1040)), SERVER_CAP, "too many connections: the server answered");
        assert_eq!(cap_for(&server(1045)), SERVER_CAP, "access denied: the server answered");
        assert_eq!(cap_for(&server(1053)), LINK_CAP, "server shutdown in progress");
        assert_eq!(cap_for(&Error::Fatal("x".into())), SERVER_CAP);
    }

    #[test]
    fn repeated_failures_are_summarised() {
        let t0 = Instant::now();
        let mut log = RetryLog::new("binlog link lost; reconnecting");
        let refused = "connect: Connection refused (os error 111)";
        assert!(log.failed_at(refused, ms(0), t0), "the first failure is logged");
        // The same error again within the summary period: debug only.
        let quiet = (1..=20).filter(|i| log.failed_at(refused, ms(500), t0 + ms(400 * i))).count();
        assert_eq!(quiet, 0);
        assert_eq!(log.quiet, 20);
        // A different error: at once.
        assert!(log.failed_at("server shutdown in progress", ms(500), t0 + ms(8500)));
        assert!(!log.failed_at("server shutdown in progress", ms(500), t0 + ms(9000)));
        // The same error, a summary period after the last warn: logged with the count.
        assert!(log.failed_at("server shutdown in progress", ms(500), t0 + ms(18_500)));
        assert_eq!(log.quiet, 0);
        assert_eq!(log.failures, 24);
        log.recovered();
        assert_eq!(log.failures, 0);
        assert!(log.failed_at(refused, ms(0), t0 + ms(20_000)), "after a recovery the first failure is logged again");
    }
}
