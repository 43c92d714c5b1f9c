//! systemd service notifications (`sd_notify(3)`), for `Type=notify` units
//! with `WatchdogSec=`.
//!
//! The free functions send one notification each; all of them do nothing
//! when `NOTIFY_SOCKET` is not set (not started by systemd), and none of
//! them panics: a failed send is logged once (at warn) and otherwise
//! ignored, because a service manager that went away must not stop the
//! replication.
//!
//! [`Notifier`] is what `tailcache run` drives from its main loop (every
//! 100 ms, with whether both worker threads are still running):
//!
//! * `READY=1`, once, when [`StatusView::replica_ready`] first holds
//!   (the condition `/readyz` checks first): the replica is consistent and
//!   caught up with the server, and memcached holds it (the first publish
//!   of it is done), or, with no `[memcached]` section, once the replica is
//!   consistent and caught up. `systemctl start` returns
//!   then, so a unit ordered `After=tailcache.service` finds memcached
//!   populated.
//! * `STATUS=` whenever the one-line description of the state changes
//!   (snapshotting, streaming at a position with its lag, reconnecting,
//!   memcached down), at most once a second unless the phase changes.
//! * `WATCHDOG=1` every half `WATCHDOG_USEC`, only while both worker threads
//!   run and the replicator is not stuck: it is copying a snapshot, waiting
//!   to reconnect after an error, or it read a binlog event or heartbeat (or
//!   changed state) recently — within `3 × mysql.heartbeat_secs + 1 s` (its
//!   own dead-link timeout) or `mysql.connect_timeout_secs`, whichever is
//!   longer, plus 30 s of slack. A stuck replicator therefore stops the
//!   pings and systemd kills and restarts the service (`Restart=on-failure`)
//!   `WatchdogSec` later. Before `READY=1` the same check also sends
//!   `EXTEND_TIMEOUT_USEC`, so a long first snapshot that is making progress
//!   is not cut off by `TimeoutStartSec`, while a stuck start still is.
//! * `STOPPING=1` when shutdown begins; no pings after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::config::Config;
use crate::status::{Status, StatusView};

/// Slack added to the replicator's own timeouts before it counts as stuck.
const STALL_SLACK: Duration = Duration::from_secs(30);
/// Same-phase `STATUS=` updates (a moving position, the lag) at most this often.
const STATUS_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// While starting: how long each `EXTEND_TIMEOUT_USEC` extends the start
/// timeout, and how often it is sent (when there is no watchdog).
const START_EXTENSION: Duration = Duration::from_secs(60);
const START_EXTENSION_EVERY: Duration = Duration::from_secs(10);
/// Longest `STATUS=` text sent (systemd shows one line).
const STATUS_MAX_CHARS: usize = 400;

/// True when started by a service manager that listens for notifications.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty())
}

fn send(state: &[NotifyState<'_>]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !enabled() {
        return;
    }
    if let Err(e) = sd_notify::notify(state)
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        let socket = std::env::var_os("NOTIFY_SOCKET").unwrap_or_default();
        tracing::warn!(error = %e, socket = %socket.to_string_lossy(), "cannot notify systemd (NOTIFY_SOCKET); carrying on without it");
    }
}

/// `READY=1`: start-up finished.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// `STATUS=<text>`, made one line and at most a few hundred characters.
pub fn status(text: &str) {
    send(&[NotifyState::Status(&one_line(text))]);
}

/// `WATCHDOG=1`: still alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// `STOPPING=1`: shutdown began.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// `EXTEND_TIMEOUT_USEC=`: the current start/stop timeout is at least `by`
/// from now.
pub fn extend_timeout(by: Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// The watchdog timeout systemd expects pings within (`WATCHDOG_USEC`),
/// when it is meant for this process (`WATCHDOG_PID` unset or ours);
/// `None` without `NOTIFY_SOCKET` or without a watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    if !enabled() {
        return None;
    }
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

fn one_line(text: &str) -> String {
    let mut s: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.chars().count() > STATUS_MAX_CHARS {
        s = s.chars().take(STATUS_MAX_CHARS - 1).collect();
        s.push('…');
    }
    s
}

/// What the process is doing, coarsely: a `STATUS=` change of phase is sent
/// at once, a change within a phase at most once a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Reconnecting,
    Snapshotting,
    CatchingUp,
    Streaming,
}

/// The `STATUS=` line for a state, and its phase.
fn describe(v: &StatusView, has_memcached: bool) -> (Phase, String) {
    let (phase, mut line) = if let Some(s) = &v.snapshot {
        let rows = match (s.rows_copied, s.estimated_rows) {
            (0, _) => String::new(),
            (n, Some(of)) => format!(" ({n} of ~{of} rows)"),
            (n, None) => format!(" ({n} rows)"),
        };
        (Phase::Snapshotting, format!("snapshotting {}{rows}", s.table))
    } else if !v.source_connected {
        match (&v.source_error, &v.position) {
            (Some(e), _) => (Phase::Reconnecting, format!("MySQL link down, reconnecting: {e}")),
            (None, Some(p)) => (Phase::Connecting, format!("connecting to MySQL, resuming at {p}")),
            (None, None) => (Phase::Connecting, "connecting to MySQL".to_owned()),
        }
    } else {
        let at = v.position.as_deref().unwrap_or("?");
        let lag = v.lag_seconds.map(|l| format!(", lag {l:.0}s")).unwrap_or_default();
        if v.consistent {
            (Phase::Streaming, format!("streaming at {at}{lag}"))
        } else {
            (Phase::CatchingUp, format!("catching up at {at}{lag} (replica not consistent yet)"))
        }
    };
    if has_memcached {
        let down: Vec<&str> = v.memcached.iter().filter(|(_, up)| !**up).map(|(s, _)| s.as_str()).collect();
        if let Some(e) = &v.publish_error {
            line.push_str(&format!("; memcached down: {e}"));
        } else if !down.is_empty() {
            line.push_str(&format!("; memcached down: {}", down.join(", ")));
        } else if v.consistent && !v.consistent_published() {
            line.push_str("; first publish pending");
        }
    }
    (phase, line)
}

/// Whether the process has become ready (see the module docs).
fn is_ready(v: &StatusView, has_memcached: bool) -> bool {
    v.replica_ready(has_memcached)
}

/// What counts as replicator progress: any change of these.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Fingerprint {
    beats: u64,
    position: Option<String>,
    connected: bool,
    error: Option<String>,
    snapshot: Option<(String, u64)>,
}

impl Fingerprint {
    fn of(v: &StatusView, beats: u64) -> Self {
        Fingerprint {
            beats,
            position: v.position.clone(),
            connected: v.source_connected,
            error: v.source_error.clone(),
            snapshot: v.snapshot.as_ref().map(|s| (s.table.clone(), s.rows_copied)),
        }
    }
}

/// Decides whether the watchdog may be pinged.
#[derive(Debug)]
struct Liveness {
    stall: Duration,
    last: Fingerprint,
    since: Instant,
    /// Why the last check failed (logged once per episode).
    unhealthy: Option<String>,
}

impl Liveness {
    fn new(stall: Duration, now: Instant) -> Self {
        Liveness { stall, last: Fingerprint::default(), since: now, unhealthy: None }
    }

    /// Records the current state; `Err(why)` when the watchdog must not be
    /// pinged.
    fn check(&mut self, v: &StatusView, beats: u64, workers_alive: bool, now: Instant) -> Result<(), String> {
        let fp = Fingerprint::of(v, beats);
        if fp != self.last {
            self.last = fp;
            self.since = now;
        }
        if !workers_alive {
            return Err("a worker thread has stopped".to_owned());
        }
        if v.snapshot.is_some() {
            return Ok(()); // copying rows: bounded by MySQL, retried on lock waits
        }
        if !v.source_connected && v.source_error.is_some() {
            return Ok(()); // waiting to reconnect (capped backoff)
        }
        let idle = now.saturating_duration_since(self.since);
        if idle < self.stall {
            return Ok(());
        }
        Err(format!(
            "the replicator read no binlog event or heartbeat and changed no state for {}s ({})",
            idle.as_secs(),
            if v.source_connected { "connected" } else { "not connected" }
        ))
    }
}

/// Drives READY / STATUS / WATCHDOG / STOPPING from the shared [`Status`];
/// see the module docs. Does nothing without `NOTIFY_SOCKET`.
pub struct Notifier {
    status: Arc<Status>,
    enabled: bool,
    has_memcached: bool,
    watchdog: Option<Duration>,
    liveness: Liveness,
    ready: bool,
    stopping: bool,
    last_status: Option<(Phase, String, Instant)>,
    last_ping: Option<Instant>,
}

impl Notifier {
    pub fn new(status: Arc<Status>, cfg: &Config) -> Notifier {
        let enabled = enabled();
        let watchdog = watchdog_interval();
        let dead_link = Duration::from_secs_f64(cfg.mysql.heartbeat_secs * 3.0 + 1.0);
        let connect = Duration::from_secs_f64(cfg.mysql.connect_timeout_secs.max(0.0));
        let stall = dead_link.max(connect) + STALL_SLACK;
        if enabled {
            tracing::info!(
                watchdog_ms = watchdog.map(|d| d.as_millis() as u64),
                stall_ms = stall.as_millis() as u64,
                "notifying systemd (NOTIFY_SOCKET)"
            );
        }
        Notifier {
            status,
            enabled,
            has_memcached: cfg.memcached.is_some(),
            watchdog,
            liveness: Liveness::new(stall, Instant::now()),
            ready: false,
            stopping: false,
            last_status: None,
            last_ping: None,
        }
    }

    /// Called periodically (every 100 ms) with whether the replicator and
    /// the publisher threads are all still running.
    pub fn tick(&mut self, workers_alive: bool) {
        if !self.enabled || self.stopping {
            return;
        }
        let now = Instant::now();
        let v = self.status.snapshot();
        let (phase, line) = describe(&v, self.has_memcached);
        let became_ready = !self.ready && workers_alive && is_ready(&v, self.has_memcached);
        let changed = self
            .last_status
            .as_ref()
            .is_none_or(|(p, l, at)| *l != line && (*p != phase || now.duration_since(*at) >= STATUS_MIN_INTERVAL));
        if changed || became_ready {
            status(&line);
            self.last_status = Some((phase, line, now));
        }
        if became_ready {
            self.ready = true;
            tracing::info!("ready: notified systemd");
            ready();
        }
        let beat_every = match (self.watchdog, self.ready) {
            (Some(w), _) => Some(w / 2),
            (None, false) => Some(START_EXTENSION_EVERY),
            (None, true) => None,
        };
        let Some(every) = beat_every else { return };
        if self.last_ping.is_some_and(|t| now.duration_since(t) < every) {
            // Still record progress between pings.
            let _ = self.liveness.check(&v, self.status.beats(), workers_alive, now);
            return;
        }
        match self.liveness.check(&v, self.status.beats(), workers_alive, now) {
            Ok(()) => {
                if self.liveness.unhealthy.take().is_some() {
                    tracing::info!("replicator progressing again; pinging the systemd watchdog");
                }
                if self.watchdog.is_some() {
                    watchdog();
                }
                if !self.ready {
                    extend_timeout(START_EXTENSION.max(self.watchdog.unwrap_or_default()));
                }
                self.last_ping = Some(now);
            }
            Err(why) => {
                if self.liveness.unhealthy.as_deref() != Some(why.as_str()) {
                    tracing::error!(reason = %why, "not pinging the systemd watchdog: systemd will restart tailcache");
                    self.liveness.unhealthy = Some(why);
                }
            }
        }
    }

    /// `STOPPING=1` (once); no more pings.
    pub fn stopping(&mut self) {
        if self.enabled && !self.stopping {
            stopping();
            status("stopping");
        }
        self.stopping = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::SnapshotProgress;

    fn streaming() -> StatusView {
        StatusView {
            position: Some("mysql-bin.000003:1234".into()),
            consistent: true,
            source_connected: true,
            lag_seconds: Some(0.4),
            ..Default::default()
        }
    }

    #[test]
    fn status_lines() {
        let mut v = StatusView {
            snapshot: Some(SnapshotProgress { table: "application,feature".into(), ..Default::default() }),
            ..Default::default()
        };
        assert_eq!(describe(&v, false), (Phase::Snapshotting, "snapshotting application,feature".into()));
        v.snapshot = None;
        assert_eq!(describe(&v, false), (Phase::Connecting, "connecting to MySQL".into()));
        v.source_error = Some("connection refused".into());
        assert_eq!(describe(&v, false).1, "MySQL link down, reconnecting: connection refused");
        let mut v = streaming();
        assert_eq!(describe(&v, false), (Phase::Streaming, "streaming at mysql-bin.000003:1234, lag 0s".into()));
        assert_eq!(describe(&v, true).1, "streaming at mysql-bin.000003:1234, lag 0s; first publish pending");
        v.published_consistent = true;
        assert_eq!(describe(&v, true).1, "streaming at mysql-bin.000003:1234, lag 0s");
        v.publish_error = Some("memcached 127.0.0.1:11211: connection refused".into());
        assert_eq!(
            describe(&v, true).1,
            "streaming at mysql-bin.000003:1234, lag 0s; memcached down: memcached 127.0.0.1:11211: connection refused"
        );
        v.consistent = false;
        assert_eq!(describe(&v, false).0, Phase::CatchingUp);
    }

    #[test]
    fn one_line_status() {
        assert_eq!(one_line("a\nb\tc"), "a b c");
        let long = "x".repeat(1000);
        assert_eq!(one_line(&long).chars().count(), STATUS_MAX_CHARS);
    }

    #[test]
    fn ready_after_first_consistent_publish() {
        let mut v = streaming();
        assert!(!is_ready(&v, true));
        assert!(is_ready(&v, false));
        v.published_consistent = true;
        assert!(is_ready(&v, true));
        v.consistent = false;
        assert!(!is_ready(&v, false));
    }

    #[test]
    fn watchdog_liveness() {
        let t0 = Instant::now();
        let stall = Duration::from_secs(10);
        let mut l = Liveness::new(stall, t0);
        let v = streaming();
        assert!(l.check(&v, 1, true, t0).is_ok());
        // A finished worker thread: never.
        assert!(l.check(&v, 2, false, t0).is_err());
        // Connected and beating: fine however long it runs.
        assert!(l.check(&v, 3, true, t0 + Duration::from_secs(9)).is_ok());
        assert!(l.check(&v, 4, true, t0 + Duration::from_secs(18)).is_ok());
        // Connected but no event or heartbeat for longer than the stall limit: stuck.
        assert!(l.check(&v, 4, true, t0 + Duration::from_secs(27)).is_ok());
        assert!(l.check(&v, 4, true, t0 + Duration::from_secs(29)).is_err());
        // Progress again.
        assert!(l.check(&v, 5, true, t0 + Duration::from_secs(30)).is_ok());
        // A snapshot and a reconnect backoff are exempt.
        let mut snap = v.clone();
        snap.snapshot = Some(SnapshotProgress { table: "t".into(), ..Default::default() });
        assert!(l.check(&snap, 5, true, t0 + Duration::from_secs(100)).is_ok());
        assert!(l.check(&snap, 5, true, t0 + Duration::from_secs(1000)).is_ok());
        let mut down = v.clone();
        down.source_connected = false;
        down.source_error = Some("refused".into());
        assert!(l.check(&down, 5, true, t0 + Duration::from_secs(1100)).is_ok());
        assert!(l.check(&down, 5, true, t0 + Duration::from_secs(2000)).is_ok());
        // Not connected without an error (connecting) for too long: stuck.
        let mut connecting = v;
        connecting.source_connected = false;
        assert!(l.check(&connecting, 5, true, t0 + Duration::from_secs(2001)).is_ok());
        assert!(l.check(&connecting, 5, true, t0 + Duration::from_secs(2012)).is_err());
    }

    #[test]
    fn no_socket_no_op() {
        // The test process is not started by systemd: every call is a no-op.
        if !enabled() {
            ready();
            status("x");
            watchdog();
            stopping();
            extend_timeout(Duration::from_secs(1));
            assert_eq!(watchdog_interval(), None);
        }
    }
}
