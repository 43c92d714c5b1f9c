//! WAL checkpoints off the commit → memcached path.
//!
//! SQLite checkpoints a WAL automatically in whichever connection commits
//! once the log holds 1000 frames: the applier's commit of a replicated
//! transaction or the publisher's bookkeeping commit then also copies the
//! log back into the database file and fsyncs it, which puts milliseconds
//! on that commit's way to memcached (a publish that wrote 100k–1M
//! `_tailcache_published` rows leaves a log of tens of MB). Instead, the
//! publisher's connection hands checkpoints to a thread of its own: its WAL
//! hook (which replaces the automatic checkpoint on that connection) wakes
//! the thread once the log holds [`THRESHOLD`] frames, and the thread runs
//! a `PASSIVE` checkpoint on its own connection, which blocks neither
//! readers nor writers. The log then stays well below the automatic
//! threshold, so the applier's commits (which keep SQLite's automatic
//! checkpoint as a safety net) do not checkpoint either.

use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use rusqlite::Connection;

use crate::config::TableRef;

/// WAL frames (pages) after which a checkpoint is requested: 512 KiB of
/// 4 KiB pages, an eighth of SQLite's automatic threshold.
pub const THRESHOLD: i32 = 128;

/// Installs the hook on `conn` and starts the checkpoint thread, when the
/// state file is in WAL mode (not with attached schemas, which use a
/// rollback journal). Without it, `conn` keeps SQLite's automatic
/// checkpoint. The thread ends when `conn` is dropped.
pub fn start(conn: &mut Connection, path: &Path, tables: &[TableRef]) {
    let wal = conn.query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0)).is_ok_and(|m| m == "wal");
    if !wal {
        return;
    }
    let own = match crate::replica::open_connection(path, tables) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a connection for WAL checkpoints; SQLite checkpoints in the committing connection");
            return;
        }
    };
    start_with(conn, own);
}

/// Like [`start`], for any database in WAL mode: `own` is a second
/// connection to it, which the thread checkpoints with.
pub fn start_with(conn: &mut Connection, own: Connection) {
    // One pending request is enough: the checkpoint copies whatever the
    // log holds when it runs.
    let (tx, rx) = mpsc::sync_channel::<()>(1);
    let spawned = std::thread::Builder::new().name("tailcache-ckpt".into()).spawn(move || {
        while rx.recv().is_ok() {
            let t0 = Instant::now();
            let r =
                own.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)));
            match r {
                Ok((frames, copied)) => {
                    tracing::debug!(frames, copied, took_us = t0.elapsed().as_micros() as u64, "wal checkpoint")
                }
                // Busy (another checkpoint is running) or an I/O error:
                // the next request tries again, and SQLite's own
                // threshold still applies in the applier.
                Err(e) => tracing::debug!(error = %e, "wal checkpoint did not run"),
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the WAL checkpoint thread; SQLite checkpoints in the committing connection");
        return;
    }
    let hook = move |_: &mut rusqlite::hooks::Wal, frames: i32| {
        if frames >= THRESHOLD {
            let _ = tx.try_send(());
        }
        Ok(())
    };
    if let Err(e) = conn.wal_hook(Some(hook)) {
        tracing::warn!(error = %e, "cannot install the WAL hook; SQLite checkpoints in the committing connection");
    }
}
