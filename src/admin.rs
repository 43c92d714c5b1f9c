//! The admin endpoint (`[admin] listen`, 127.0.0.1:9187 by default): health,
//! readiness, status, metrics and resync requests over plain HTTP, served on
//! the daemon's tokio runtime until its shutdown.
//!
//! | request | answer |
//! |---|---|
//! | `GET /healthz` | 200 `ok` while the replicator and publisher threads run, else 503 |
//! | `GET /readyz` | 200 `ready`, or 503 with the reasons, one per line |
//! | `GET /status` | JSON: [`StatusView`](crate::status::StatusView) plus `ready`, `not_ready`, `pid`, `entries_rejected` (view → reason → count since start, as `tailcache_entries_rejected_total`) |
//! | `GET /metrics` | Prometheus text format (see [`crate::metrics`]) |
//! | `POST /resync` | full resync; answers the [`ResyncReport`](crate::status::ResyncReport) JSON when it is done (`?wait=false`: 202 at once) |
//!
//! There is no authentication: it listens on loopback unless the operator
//! writes another address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::config::AdminConfig;
use crate::error::{Error, Result};
use crate::source::replicator::Control;
use crate::status::Status;

/// Whether the worker threads are alive; the daemon clears it when one of
/// them has finished.
#[derive(Debug)]
pub struct Health(AtomicBool);

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health(AtomicBool::new(true)))
    }
    pub fn set(&self, alive: bool) {
        self.0.store(alive, Ordering::Relaxed);
    }
    pub fn alive(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct AdminState {
    pub status: Arc<Status>,
    pub control: mpsc::UnboundedSender<Control>,
    pub health: Arc<Health>,
    /// False without `[memcached]`: no publisher, so no resync report ever.
    pub publishing: bool,
    pub shutdown: watch::Receiver<bool>,
}

/// Binds the configured address (before anything else starts, so a port
/// in use stops the daemon at once); `None` when disabled.
pub async fn bind(cfg: &AdminConfig) -> Result<Option<tokio::net::TcpListener>> {
    let addr = match cfg.addr() {
        Ok(Some(a)) => a,
        Ok(None) => return Ok(None),
        Err(p) => return Err(Error::Fatal(p.to_string())),
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::Fatal(format!(
            "admin.listen: cannot listen on {addr}: {e}; pick a free port, or set listen = \"\" under [admin] to disable the endpoint"
        ))
    })?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "admin endpoint listens beyond loopback and has no authentication; restrict access to it");
    }
    Ok(Some(listener))
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/resync", post(resync))
        .with_state(state)
}

/// Serves until the daemon's shutdown.
pub fn spawn(listener: tokio::net::TcpListener, state: AdminState) -> tokio::task::JoinHandle<()> {
    let mut shutdown = state.shutdown.clone();
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tokio::spawn(async move {
        if let Some(a) = addr {
            tracing::info!(addr = %a, "admin endpoint listening");
        }
        let stop = async move {
            while !*shutdown.borrow_and_update() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(listener, router(state)).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "admin endpoint stopped");
        }
    })
}

fn text(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

fn json(code: StatusCode, v: &impl serde::Serialize) -> Response {
    match serde_json::to_string_pretty(v) {
        Ok(body) => (code, [(header::CONTENT_TYPE, "application/json")], body + "\n").into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode: {e}\n")),
    }
}

async fn healthz(State(st): State<AdminState>) -> Response {
    if st.health.alive() && !*st.shutdown.borrow() {
        text(StatusCode::OK, "ok\n".into())
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "a worker thread has stopped\n".into())
    }
}

/// Why the process is not ready (empty: ready), as `/readyz` says it.
fn not_ready(st: &AdminState, view: &crate::status::StatusView) -> Vec<String> {
    let mut reasons = view.not_ready(st.publishing);
    if !st.health.alive() {
        reasons.insert(0, "a worker thread has stopped".into());
    }
    reasons
}

async fn readyz(State(st): State<AdminState>) -> Response {
    let reasons = not_ready(&st, &st.status.snapshot());
    if reasons.is_empty() {
        text(StatusCode::OK, "ready\n".into())
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, reasons.join("\n") + "\n")
    }
}

async fn status(State(st): State<AdminState>) -> Response {
    let view = st.status.snapshot();
    let not_ready = not_ready(&st, &view);
    let mut v = match serde_json::to_value(&view) {
        Ok(v) => v,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode: {e}\n")),
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("ready".into(), serde_json::Value::Bool(not_ready.is_empty()));
        o.insert("not_ready".into(), serde_json::json!(not_ready));
        o.insert("pid".into(), serde_json::json!(std::process::id()));
        o.insert("entries_rejected".into(), serde_json::json!(crate::metrics::entries_rejected()));
    }
    json(StatusCode::OK, &v)
}

async fn metrics(State(st): State<AdminState>) -> Response {
    let view = st.status.snapshot();
    crate::metrics::observe_status(&view);
    crate::metrics::observe_ready(not_ready(&st, &view).is_empty());
    (StatusCode::OK, [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], crate::metrics::render()).into_response()
}

#[derive(Debug, Deserialize)]
struct ResyncQuery {
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

async fn resync(State(st): State<AdminState>, Query(q): Query<ResyncQuery>) -> Response {
    let mut done = st.status.resync_done();
    let before = *done.borrow_and_update();
    if st.control.send(Control::Resync { reason: "admin".into() }).is_err() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "the replicator is not running\n".into());
    }
    tracing::info!("admin: full resync requested");
    if !q.wait || !st.publishing {
        return json(StatusCode::ACCEPTED, &serde_json::json!({ "accepted": true }));
    }
    let mut shutdown = st.shutdown.clone();
    loop {
        if *done.borrow_and_update() > before {
            break;
        }
        tokio::select! {
            r = done.changed() => if r.is_err() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
            },
            _ = shutdown.changed() => {
                return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down before the resync finished\n".into());
            }
        }
    }
    match st.status.snapshot().last_resync {
        Some(r) => json(StatusCode::OK, &r),
        None => text(StatusCode::INTERNAL_SERVER_ERROR, "resync finished without a report\n".into()),
    }
}

/// A minimal HTTP/1.1 client for the CLI: one request on a fresh
/// connection, `Connection: close`. Returns the status code and the body.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\nAccept: */*\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    parse_response(&raw).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response"))
}

fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let code: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let mut body = &raw[split + 4..];
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let eol = body.windows(2).position(|w| w == b"\r\n")?;
            let size_text = std::str::from_utf8(&body[..eol]).ok()?;
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            body = &body[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(body.get(..size)?);
            body = body.get(size + 2..)?;
        }
        out
    } else {
        body.to_vec()
    };
    Some((code, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
        assert_eq!(parse_response(plain), Some((200, "ok\n".into())));
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((503, "abcde".into())));
        assert_eq!(parse_response(b"garbage"), None);
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let status = Arc::new(Status::new());
        let (control, mut control_rx) = mpsc::unbounded_channel();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let health = Health::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = spawn(
            listener,
            AdminState { status: status.clone(), control, health: health.clone(), publishing: true, shutdown },
        );
        assert_eq!(request(addr, "GET", "/healthz").await.unwrap().0, 200);
        let (code, body) = request(addr, "GET", "/readyz").await.unwrap();
        assert_eq!((code, body.as_str()), (503, "replica not consistent with the server yet\n"));
        status.update(|s| s.consistent = true);
        // With a publisher, ready needs the consistent replica published.
        assert_eq!(
            request(addr, "GET", "/readyz").await.unwrap(),
            (503, "first publish of a consistent replica not done yet\n".into())
        );
        status.update(|s| s.published_consistent = true);
        assert_eq!(request(addr, "GET", "/readyz").await.unwrap(), (200, "ready\n".into()));
        let (code, body) = request(addr, "GET", "/status").await.unwrap();
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["consistent"], true);
        assert_eq!(v["ready"], true);
        let (code, body) = request(addr, "GET", "/metrics").await.unwrap();
        assert_eq!(code, 200);
        assert!(body.contains("# TYPE tailcache_source_connected gauge"), "{body}");
        assert_eq!(request(addr, "POST", "/resync?wait=false").await.unwrap().0, 202);
        assert!(matches!(control_rx.try_recv(), Ok(Control::Resync { reason }) if reason == "admin"));
        // Waiting: answered with the report once the publisher files one.
        let waiting = tokio::spawn(request(addr, "POST", "/resync"));
        while control_rx.try_recv().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        status.resync_finished(crate::status::ResyncReport {
            seq: 0,
            trigger: "admin".into(),
            total: Default::default(),
            views: Default::default(),
            duration_ms: 5,
            finished_at_unix: 0.0,
        });
        let (code, body) = waiting.await.unwrap().unwrap();
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((v["seq"].as_u64(), v["trigger"].as_str()), (Some(1), Some("admin")));
        health.set(false);
        assert_eq!(request(addr, "GET", "/healthz").await.unwrap().0, 503);
        assert_eq!(request(addr, "GET", "/nope").await.unwrap().0, 404);
        shutdown_tx.send(true).unwrap();
        task.await.unwrap();
    }
}
