//! Lock-free snapshots of the watched tables into the replica.
//!
//! MariaDB reports the exact binlog position of a consistent snapshot
//! (`binlog_snapshot_file/position`), so streaming resumes exactly there and
//! the replica is consistent at once. MySQL does not: we note the position
//! before the snapshot (P0), stream from P0 applying idempotent upserts and
//! deletes, and call the replica consistent only once the stream has passed
//! a position read after the snapshot began (P1). P0 is read under a brief
//! `LOCK TABLES … READ` (see [`quiesced_position`]).

use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{Conn, Value as MyValue};
use rand::Rng;
use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, Value};
use tokio::sync::watch;

use crate::config::{MysqlConfig, TableRef};
use crate::error::{Error, Result, codes};
use crate::position::BinlogPosition;
use crate::replica::tables::recreate_table;
use crate::replica::value::{float_to_f64, format_date, format_datetime, format_time};
use crate::schema::{Affinity, ColumnDef, TableSchema};
use crate::source::catalog::load_table_schema;
use crate::source::conn::connect;
use crate::source::server::{Account, Flavor, ServerInfo, lock_tables_grants, lock_tables_statement, master_status};

#[derive(Debug, Clone)]
pub struct SnapshotOutcome {
    pub schemas: Vec<TableSchema>,
    /// Where the binlog stream must start.
    pub start: BinlogPosition,
    /// `Some(P1)`: not consistent until the stream has passed P1.
    pub consistent_after: Option<BinlogPosition>,
    pub rows: Vec<u64>,
}

/// Snapshot `tables` and write them into the replica through `sqlite`
/// (inside the caller's transaction, so the replica switches atomically).
///
/// On MySQL, while an open transaction keeps a watched table locked for
/// longer than `mysql.snapshot_lock_wait`, it logs that transaction and
/// tries again with capped, jittered backoff until it gets through; drop
/// the future (or use [`snapshot_until`]) to stop.
pub async fn snapshot(
    cfg: &MysqlConfig,
    info: &ServerInfo,
    tables: &[TableRef],
    sqlite: &Connection,
) -> Result<SnapshotOutcome> {
    let (_tx, never) = watch::channel(false);
    snapshot_until(cfg, info, tables, sqlite, &never).await
}

/// [`snapshot`], giving up with a `Transient` error as soon as `shutdown`
/// turns true while it waits to retry.
pub async fn snapshot_until(
    cfg: &MysqlConfig,
    info: &ServerInfo,
    tables: &[TableRef],
    sqlite: &Connection,
    shutdown: &watch::Receiver<bool>,
) -> Result<SnapshotOutcome> {
    let mut attempt: u32 = 0;
    loop {
        match snapshot_once(cfg, info, tables, sqlite).await {
            Err(Error::LockWaitTimeout { statement, waited, blockers }) => {
                attempt += 1;
                let delay = retry_delay(attempt);
                tracing::warn!(
                    attempt,
                    waited_secs = waited,
                    retry_in_ms = delay.as_millis() as u64,
                    blockers = %if blockers.is_empty() { "none visible in information_schema.innodb_trx (other users' transactions need the PROCESS privilege)".to_owned() } else { blockers.join("; ") },
                    statement = %statement,
                    "snapshot: an open transaction kept a watched table locked longer than mysql.snapshot_lock_wait; retrying"
                );
                let mut sd = shutdown.clone();
                if *sd.borrow() {
                    return Err(Error::Transient("snapshot abandoned: shutting down".into()));
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = sd.wait_for(|stop| *stop) => {
                        return Err(Error::Transient("snapshot abandoned: shutting down".into()));
                    }
                }
            }
            other => return other,
        }
    }
}

/// Capped exponential backoff with full jitter on the upper half:
/// 0.5–1 s, 1–2 s, 2–4 s, … up to 15–30 s.
fn retry_delay(attempt: u32) -> Duration {
    let cap_ms = 500u64.saturating_mul(1 << attempt.min(6)).min(30_000);
    Duration::from_millis(rand::rng().random_range(cap_ms / 2..=cap_ms))
}

async fn snapshot_once(
    cfg: &MysqlConfig,
    info: &ServerInfo,
    tables: &[TableRef],
    sqlite: &Connection,
) -> Result<SnapshotOutcome> {
    let started = Instant::now();
    let mut conn = connect(cfg).await?;
    // Bound every metadata-lock wait of this session, not only MySQL's
    // LOCK TABLES: the server default is a year, and a snapshot that queues
    // behind a concurrent ALTER (itself queued behind an open transaction)
    // would otherwise hang instead of being retried with backoff.
    let wait = lock_wait_whole_secs(cfg.snapshot_lock_wait);
    conn.query_drop(format!("SET SESSION lock_wait_timeout = {wait}"))
        .await
        .map_err(|e| Error::mysql("set lock_wait_timeout", e))?;
    let mut schemas = Vec::with_capacity(tables.len());
    for t in tables {
        let schema = load_table_schema(&mut conn, t).await?.ok_or_else(|| Error::NeedsResync {
            reason: format!("table {t} does not exist (create it or remove it from mysql.tables)"),
            table: Some(t.to_string()),
            position: None,
        })?;
        if schema.primary_key.is_empty() {
            return Err(Error::Fatal(format!(
                "mysql.tables: table {t} has no primary key; tailcache needs one to apply row changes (ALTER TABLE {} ADD PRIMARY KEY (...))",
                t.mysql_quoted()
            )));
        }
        schemas.push(schema);
    }
    let p0 = match info.flavor {
        Flavor::Mysql => match quiesced_position(&mut conn, info, tables, cfg.snapshot_lock_wait).await {
            Ok(p) => p,
            Err(e) => {
                let _ = conn.disconnect().await;
                return Err(e);
            }
        },
        Flavor::MariaDb => master_status(&mut conn, info).await?,
    };
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(|e| Error::mysql("set isolation level", e))?;
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        .await
        .map_err(|e| Error::mysql("start consistent snapshot", e))?;
    let (start, consistent_after) = match info.flavor {
        Flavor::MariaDb => {
            let rows: Vec<(String, String)> = conn
                .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
                .await
                .map_err(|e| Error::mysql("read binlog_snapshot_file/position", e))?;
            let file = rows.iter().find(|r| r.0.eq_ignore_ascii_case("binlog_snapshot_file")).map(|r| r.1.clone());
            let pos = rows
                .iter()
                .find(|r| r.0.eq_ignore_ascii_case("binlog_snapshot_position"))
                .and_then(|r| r.1.parse().ok());
            match (file, pos) {
                (Some(f), Some(p)) if !f.is_empty() => (BinlogPosition::new(f, p), None),
                _ => (p0.clone(), Some(master_status(&mut conn, info).await?)),
            }
        }
        Flavor::Mysql => {
            let p1 = master_status(&mut conn, info).await?;
            (p0.clone(), if p1 > p0 { Some(p1) } else { None })
        }
    };
    let mut counts = Vec::with_capacity(schemas.len());
    for schema in &schemas {
        match copy_table(&mut conn, schema, sqlite).await {
            Ok(n) => counts.push(n),
            Err(Error::Mysql { source: mysql_async::Error::Server(e), .. }) if e.code == codes::LOCK_WAIT_TIMEOUT => {
                let blockers = open_transactions(&mut conn, wait).await;
                let _ = conn.disconnect().await;
                return Err(Error::LockWaitTimeout {
                    statement: format!("SELECT … FROM {}", schema.table.mysql_quoted()),
                    waited: wait,
                    blockers,
                });
            }
            Err(e) => return Err(e),
        }
    }
    conn.query_drop("COMMIT").await.map_err(|e| Error::mysql("end snapshot", e))?;
    let _ = conn.disconnect().await;
    tracing::info!(
        tables = schemas.len(),
        rows = counts.iter().sum::<u64>(),
        start = %start,
        consistent_after = ?consistent_after.as_ref().map(|p| p.to_string()),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "snapshot taken"
    );
    Ok(SnapshotOutcome { schemas, start, consistent_after, rows: counts })
}

/// MySQL's replay start P0: a binlog position before which every
/// transaction on the watched tables is committed in InnoDB.
///
/// A plain `SHOW MASTER STATUS` is not enough: MySQL writes a transaction
/// to the binlog before InnoDB commits it, so a transaction just below P0
/// can still be invisible to a snapshot started right after, and replay
/// from P0 would never bring it. `LOCK TABLES … READ` is granted only once
/// every transaction writing those tables has ended (their metadata locks
/// last until after the commit), and keeps new ones out while P0 is read;
/// it is held for one round trip. It waits `lock_wait_secs` (the server's
/// `lock_wait_timeout`, whole seconds, rounded up) and then fails with
/// [`Error::LockWaitTimeout`] naming the open transactions. Without the
/// LOCK TABLES privilege we fall back to the unguarded position and say
/// what that risks.
pub async fn quiesced_position(
    conn: &mut Conn,
    info: &ServerInfo,
    tables: &[TableRef],
    lock_wait_secs: f64,
) -> Result<BinlogPosition> {
    let wait = lock_wait_whole_secs(lock_wait_secs);
    conn.query_drop(format!("SET SESSION lock_wait_timeout = {wait}"))
        .await
        .map_err(|e| Error::mysql("set lock_wait_timeout", e))?;
    let lock = lock_tables_statement(tables);
    match conn.query_drop(lock.as_str()).await {
        Ok(()) => {
            let p0 = master_status(conn, info).await;
            let unlocked = conn.query_drop("UNLOCK TABLES").await.map_err(|e| Error::mysql("UNLOCK TABLES", e));
            let p0 = p0?;
            unlocked?;
            Ok(p0)
        }
        Err(mysql_async::Error::Server(e))
            if matches!(e.code, codes::DBACCESS_DENIED | codes::TABLEACCESS_DENIED | codes::SPECIFIC_ACCESS_DENIED) =>
        {
            let account = Account::current(conn, "<tailcache user>").await;
            tracing::warn!(
                error = %e.message,
                fix = %lock_tables_grants(tables, &account.to_string()),
                "snapshot without LOCK TABLES: a transaction committing at this very moment may be missing from the replica until the next resync"
            );
            master_status(conn, info).await
        }
        Err(mysql_async::Error::Server(e)) if e.code == codes::LOCK_WAIT_TIMEOUT => {
            let blockers = open_transactions(conn, wait).await;
            Err(Error::LockWaitTimeout { statement: lock, waited: wait, blockers })
        }
        Err(e) => Err(Error::mysql(lock, e)),
    }
}

/// `lock_wait_timeout` takes whole seconds: round up, at least 1 s, at
/// most the server's maximum (a year).
fn lock_wait_whole_secs(secs: f64) -> u64 {
    secs.ceil().clamp(1.0, 31_536_000.0) as u64
}

/// The transactions open for at least about `min_secs` (those that can hold
/// a table lock that long), one line each: trx id, connection, user@host,
/// seconds open, the statement it runs. Empty when the server does not let
/// us see them (information_schema.innodb_trx needs the PROCESS privilege
/// for other users' transactions).
pub async fn open_transactions(conn: &mut Conn, min_secs: u64) -> Vec<String> {
    let sql = "SELECT CAST(t.trx_id AS CHAR), t.trx_mysql_thread_id, CAST(p.USER AS CHAR), CAST(p.HOST AS CHAR), \
               TIMESTAMPDIFF(SECOND, t.trx_started, NOW()), CAST(COALESCE(t.trx_query, p.INFO) AS CHAR) \
               FROM information_schema.INNODB_TRX t \
               LEFT JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id \
               WHERE t.trx_mysql_thread_id <> CONNECTION_ID() AND t.trx_started <= NOW() - INTERVAL ? SECOND \
               ORDER BY t.trx_started LIMIT 10";
    type Row = (String, u64, Option<String>, Option<String>, Option<i64>, Option<String>);
    match conn.exec::<Row, _, _>(sql, (min_secs.saturating_sub(1),)).await {
        Ok(rows) => rows
            .into_iter()
            .map(|(trx, thread, user, host, secs, query)| {
                format!(
                    "trx {trx} on connection {thread} ({}@{}), open {} s, {}",
                    user.unwrap_or_else(|| "?".into()),
                    host.unwrap_or_else(|| "?".into()),
                    secs.unwrap_or(0),
                    match query {
                        Some(q) if !q.trim().is_empty() => format!("running {:?}", truncate(&q, 200)),
                        _ => "idle in transaction (KILL it or make it COMMIT)".into(),
                    }
                )
            })
            .collect(),
        Err(e) => vec![format!("cannot list open transactions: {e}")],
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// How often a long table copy logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

async fn copy_table(conn: &mut Conn, schema: &TableSchema, sqlite: &Connection) -> Result<u64> {
    let started = Instant::now();
    recreate_table(sqlite, schema)?;
    let cols: Vec<String> = schema.columns.iter().map(|c| format!("`{}`", c.name.replace('`', "``"))).collect();
    let select = format!("SELECT {} FROM {}", cols.join(", "), schema.table.mysql_quoted());
    let insert = format!(
        "INSERT OR REPLACE INTO {} VALUES ({})",
        crate::replica::tables::qualified(schema),
        (1..=cols.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
    );
    // InnoDB's row estimate, for the progress lines of a long copy.
    let estimate: Option<u64> = conn
        .exec_first(
            "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (schema.table.schema.as_str(), schema.table.name.as_str()),
        )
        .await
        .ok()
        .flatten()
        .flatten();
    let mut result =
        conn.exec_iter(select.as_str(), ()).await.map_err(|e| Error::mysql(format!("snapshot {}", schema.table), e))?;
    let mut last_progress = Instant::now();
    let mut stmt = sqlite
        .prepare_cached(&insert)
        .map_err(|e| Error::sqlite(format!("prepare insert into {}", schema.table), e))?;
    let mut n = 0u64;
    let mut values: Vec<Value> = Vec::with_capacity(schema.columns.len());
    while let Some(row) = result.next().await.map_err(|e| Error::mysql(format!("snapshot {}", schema.table), e))? {
        values.clear();
        let raw = row.unwrap_raw();
        for (i, col) in schema.columns.iter().enumerate() {
            let v = raw.get(i).cloned().flatten().unwrap_or(MyValue::NULL);
            values.push(convert(col, v));
        }
        for (i, v) in values.iter().enumerate() {
            stmt.raw_bind_parameter(i + 1, ToSqlOutput::Borrowed(v.into()))
                .map_err(|e| Error::sqlite(format!("snapshot insert into {}", schema.table), e))?;
        }
        stmt.raw_execute().map_err(|e| Error::sqlite(format!("snapshot insert into {}", schema.table), e))?;
        n += 1;
        if n % 4096 == 0 {
            crate::failpoint!("snapshot.mid_table");
            // Rows parsed from an already-read buffer never make this
            // future wait, so the caller's select on shutdown would not run
            // until the table is copied (seen: 5.5 s after SIGTERM): give it
            // a turn.
            tokio::task::yield_now().await;
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                tracing::info!(table = %schema.table, rows_copied = n, estimated_rows = ?estimate, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot in progress");
            }
        }
    }
    tracing::info!(table = %schema.table, rows = n, elapsed_ms = started.elapsed().as_millis() as u64, "table copied");
    Ok(n)
}

/// The replica's contract: unsigned values above i64::MAX as decimal text.
fn unsigned_value(u: u64) -> Value {
    if u <= i64::MAX as u64 { Value::Integer(u as i64) } else { Value::Text(u.to_string()) }
}

/// Converts a value read over the binary protocol to the replica's
/// representation; must agree with what the binlog decoder produces.
pub fn convert(col: &ColumnDef, v: MyValue) -> Value {
    match v {
        MyValue::NULL => Value::Null,
        MyValue::Int(i) => match col.affinity() {
            Affinity::Real => Value::Real(i as f64),
            Affinity::Text => Value::Text(i.to_string()),
            _ => Value::Integer(i),
        },
        MyValue::UInt(u) => unsigned_value(u),
        MyValue::Float(f) => Value::Real(float_to_f64(f)),
        MyValue::Double(d) => Value::Real(d),
        MyValue::Bytes(b) if col.data_type == "bit" => {
            unsigned_value(b.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64))
        }
        MyValue::Bytes(b) => match col.affinity() {
            Affinity::Blob => Value::Blob(b),
            Affinity::Integer => {
                let s = String::from_utf8_lossy(&b);
                s.trim().parse::<i64>().map(Value::Integer).unwrap_or_else(|_| Value::Text(s.into_owned()))
            }
            Affinity::U64 => {
                let s = String::from_utf8_lossy(&b);
                match s.trim().parse::<u64>() {
                    Ok(u) => unsigned_value(u),
                    _ => Value::Text(s.trim().to_owned()),
                }
            }
            Affinity::Real => {
                let s = String::from_utf8_lossy(&b);
                s.trim().parse::<f64>().map(Value::Real).unwrap_or_else(|_| Value::Text(s.into_owned()))
            }
            Affinity::Text => Value::Text(match String::from_utf8(b) {
                Ok(s) => s,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            }),
        },
        MyValue::Date(y, mo, d, h, mi, s, us) => {
            let mut out = Vec::with_capacity(26);
            if col.data_type == "date" {
                format_date(&mut out, y.into(), mo.into(), d.into());
            } else {
                let fsp = col.datetime_precision.unwrap_or(0).min(6) as u8;
                format_datetime(&mut out, y.into(), mo.into(), d.into(), h.into(), mi.into(), s.into(), us.into(), fsp);
            }
            Value::Text(String::from_utf8_lossy(&out).into_owned())
        }
        MyValue::Time(neg, days, h, mi, s, us) => {
            let mut out = Vec::with_capacity(20);
            let fsp = col.datetime_precision.unwrap_or(0).min(6) as u8;
            format_time(&mut out, neg, days * 24 + u32::from(h), mi.into(), s.into(), us, fsp);
            Value::Text(String::from_utf8_lossy(&out).into_owned())
        }
    }
}
