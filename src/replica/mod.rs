//! The replica: an embedded SQLite copy of the watched tables, plus the
//! checkpoint and publication bookkeeping, all in one file so that a row
//! change and the binlog position it came from commit together.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::config::TableRef;
use crate::error::{Error, Result};
use crate::position::{BinlogPosition, Checkpoint};

/// Internal tables start with this prefix; view SQL may not read them.
pub const INTERNAL_PREFIX: &str = "_tailcache_";

/// The SQLite file holding tables of another MySQL schema: SQLite reaches
/// it as `schema.table` once attached under the schema's name.
pub fn attached_path(main: &Path, schema: &str) -> std::path::PathBuf {
    let mut name = main.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{schema}"));
    main.with_file_name(name)
}

/// Opens (creating if needed) the state database and attaches one database
/// per other schema. Every component (applier, publisher, CLI) opens it the
/// same way so `schema.table` resolves identically everywhere.
pub fn open_connection(path: &Path, tables: &[TableRef]) -> Result<Connection> {
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::sqlite(format!("open {}", path.display()), e))?;
    let mut schemas: Vec<&str> = tables.iter().filter(|t| t.qualified).map(|t| t.schema.as_str()).collect();
    schemas.sort();
    schemas.dedup();
    // WAL lets the publisher read a committed state while the applier
    // writes the next transaction. Attached databases only commit
    // atomically together under a rollback journal, so with other schemas
    // we trade WAL for atomicity.
    let journal = if schemas.is_empty() { "WAL" } else { "TRUNCATE" };
    // SQLite's default busy handler backs off up to 100 ms per retry; the
    // applier and the publisher hold the lock for microseconds, so retry
    // every millisecond instead (for up to 30 s).
    conn.busy_handler(Some(|attempt: i32| {
        std::thread::sleep(Duration::from_millis(1));
        attempt < 30_000
    }))
    .map_err(|e| Error::sqlite("set busy handler", e))?;
    set_journal_mode(&conn, None, journal)?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| Error::sqlite("set synchronous", e))?;
    // The incremental views' key tables are TEMP tables filled at every
    // publish: keep them in memory, never in a temporary file.
    conn.pragma_update(None, "temp_store", "MEMORY").map_err(|e| Error::sqlite("set temp_store", e))?;
    for s in schemas {
        let p = attached_path(path, s);
        conn.execute("ATTACH DATABASE ?1 AS ?2", (p.to_string_lossy(), s))
            .map_err(|e| Error::sqlite(format!("attach {} as {s}", p.display()), e))?;
        set_journal_mode(&conn, Some(s), journal)?;
    }
    // Opening must not write when the state exists: the applier and the
    // publisher open the file at the same moment.
    let exists: bool = conn
        .query_row("SELECT count(*) FROM sqlite_master WHERE name = '_tailcache_state'", [], |r| r.get::<_, i64>(0))
        .map(|n| n > 0)
        .map_err(|e| Error::sqlite("read schema", e))?;
    if exists {
        return Ok(conn);
    }
    // Table and row in one transaction: another connection opening the
    // file meanwhile sees neither or both (it once saw the table without
    // its row, and an UPDATE of the state then changed nothing).
    let tx = rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| Error::sqlite("create _tailcache_state", e))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS _tailcache_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            file TEXT, pos INTEGER, gtid TEXT,
            consistent INTEGER NOT NULL DEFAULT 0,
            consistent_after_file TEXT, consistent_after_pos INTEGER,
            server_identity TEXT,
            tables TEXT
        );
        INSERT OR IGNORE INTO _tailcache_state (id) VALUES (1);",
    )
    .map_err(|e| Error::sqlite("create _tailcache_state", e))?;
    tx.commit().map_err(|e| Error::sqlite("create _tailcache_state", e))?;
    Ok(conn)
}

/// Changing the journal mode needs an exclusive lock that `busy_timeout`
/// does not wait for, and the replicator and the publisher open the file
/// at the same moment: retry for a bounded time.
fn set_journal_mode(conn: &Connection, schema: Option<&str>, mode: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match conn.pragma_update(schema, "journal_mode", mode) {
            Ok(()) => return Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(Error::sqlite("set journal_mode", e)),
        }
    }
}

/// The stored checkpoint and whether the replica equals the database at it
/// (false while catching up after a snapshot).
pub fn read_checkpoint(conn: &Connection) -> Result<Option<(Checkpoint, bool)>> {
    // Read at every publish: a cached statement.
    let row = conn
        .prepare_cached("SELECT file, pos, gtid, consistent FROM _tailcache_state WHERE id = 1")
        .and_then(|mut st| {
            st.query_row([], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, bool>(3)?,
                ))
            })
        })
        .optional()
        .map_err(|e| Error::sqlite("read checkpoint", e))?;
    Ok(match row {
        Some((Some(file), Some(pos), gtid, consistent)) => Some((
            Checkpoint { position: BinlogPosition::new(file, pos as u64), gtid: gtid.and_then(|g| g.parse().ok()) },
            consistent,
        )),
        _ => None,
    })
}

pub mod action;
pub mod applier;
pub mod tables;
pub mod value;
