//! Errors named by the recovery they need.
//!
//! * `Transient`: the link broke or timed out; reconnect with backoff and
//!   resume from the stored position.
//! * `NeedsResync`: our copy can no longer be trusted to follow the binlog
//!   (position purged, server changed, DDL, a TABLE_MAP that no longer
//!   matches); take a fresh snapshot, no human needed.
//! * `Fatal`: configuration or server settings are wrong; refuse to start
//!   with one message naming the setting and the fix.

use crate::position::BinlogPosition;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    Transient,
    /// Re-snapshot the one table the error names; the rest of the replica
    /// is fine.
    ResnapshotTable,
    NeedsResync,
    Fatal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Mysql {
        context: String,
        position: Option<BinlogPosition>,
        #[source]
        source: mysql_async::Error,
    },
    #[error("replica database {context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot decode {table} at {position}: {message}")]
    Decode { table: String, position: BinlogPosition, message: String },
    #[error("resync needed{}: {reason}", table.as_ref().map(|t| format!(" for {t}")).unwrap_or_default())]
    NeedsResync { reason: String, table: Option<String>, position: Option<BinlogPosition> },
    #[error("{0}")]
    Fatal(String),
    #[error("{0}")]
    Transient(String),
    /// A MySQL snapshot could not lock the watched tables within
    /// `mysql.snapshot_lock_wait`: open transactions held them.
    #[error(
        "snapshot: a transaction kept a watched table locked for more than {waited} s ({statement}); \
         open transactions: {}; look for long-open transactions in SHOW PROCESSLIST",
        if blockers.is_empty() { "none visible".to_owned() } else { blockers.join("; ") }
    )]
    LockWaitTimeout { statement: String, waited: u64, blockers: Vec<String> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// MySQL error codes that decide recovery.
pub mod codes {
    /// ER_MASTER_FATAL_ERROR_READING_BINLOG: the requested position is gone.
    pub const FATAL_READING_BINLOG: u16 = 1236;
    pub const ACCESS_DENIED: u16 = 1045;
    pub const DBACCESS_DENIED: u16 = 1044;
    pub const SPECIFIC_ACCESS_DENIED: u16 = 1227;
    pub const TABLEACCESS_DENIED: u16 = 1142;
    pub const NO_SUCH_TABLE: u16 = 1146;
    pub const BAD_DB: u16 = 1049;
    pub const LOCK_WAIT_TIMEOUT: u16 = 1205;
    /// ER_NO_BINARY_LOGGING: SHOW BINARY LOGS on a server with log_bin off.
    pub const NO_BINARY_LOGGING: u16 = 1381;
    /// ER_NO_SUCH_THREAD: KILL of a connection that has ended.
    pub const NO_SUCH_THREAD: u16 = 1094;
    /// ER_SECURE_TRANSPORT_REQUIRED (MySQL 5.7+, MariaDB 10.5+): a plain
    /// connection to a server with require_secure_transport = ON.
    pub const SECURE_TRANSPORT_REQUIRED: u16 = 3159;
}

impl Error {
    pub fn recovery(&self) -> Recovery {
        match self {
            Error::Mysql { source, .. } => match source {
                mysql_async::Error::Server(e) => match e.code {
                    codes::FATAL_READING_BINLOG => Recovery::NeedsResync,
                    codes::ACCESS_DENIED
                    | codes::DBACCESS_DENIED
                    | codes::SPECIFIC_ACCESS_DENIED
                    | codes::TABLEACCESS_DENIED
                    | codes::BAD_DB
                    | codes::SECURE_TRANSPORT_REQUIRED => Recovery::Fatal,
                    // The table vanished between two steps: a DDL we will
                    // see in the stream; re-snapshotting settles it.
                    codes::NO_SUCH_TABLE => Recovery::NeedsResync,
                    _ => Recovery::Transient,
                },
                mysql_async::Error::Url(_) => Recovery::Fatal,
                _ => Recovery::Transient,
            },
            Error::Sqlite { source, .. } => sqlite_recovery(source),
            Error::Decode { table, .. } if table != "-" => Recovery::ResnapshotTable,
            Error::Decode { .. } | Error::NeedsResync { .. } => Recovery::NeedsResync,
            Error::Fatal(_) => Recovery::Fatal,
            Error::Transient(_) | Error::LockWaitTimeout { .. } => Recovery::Transient,
        }
    }

    /// The watched table a table-scoped error names.
    pub fn table(&self) -> Option<&str> {
        match self {
            Error::Decode { table, .. } if table != "-" => Some(table),
            Error::NeedsResync { table, .. } => table.as_deref(),
            _ => None,
        }
    }

    pub fn mysql(context: impl Into<String>, source: mysql_async::Error) -> Self {
        Error::Mysql { context: context.into(), position: None, source }
    }

    pub fn sqlite(context: impl Into<String>, source: rusqlite::Error) -> Self {
        Error::Sqlite { context: context.into(), source }
    }
}

/// SQLite errors by what fixes them: a busy or locked database clears up by
/// itself, a corrupt one is rebuilt by a full resync, and a full disk, an
/// I/O error or a read-only file need the operator.
fn sqlite_recovery(e: &rusqlite::Error) -> Recovery {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::DatabaseBusy | C::DatabaseLocked | C::OperationInterrupted) => Recovery::Transient,
        Some(C::DatabaseCorrupt | C::NotADatabase) => Recovery::NeedsResync,
        Some(C::SchemaChanged) => Recovery::Transient,
        _ => Recovery::Fatal,
    }
}
