//! Connecting to MySQL/MariaDB and asking it who it is and where it stands.

use std::fmt;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, OptsBuilder};

use crate::config::MysqlConfig;
use crate::error::{Error, Result, codes};
use crate::position::BinlogPosition;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    MariaDb,
    Mysql,
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::MariaDb => "MariaDB",
            Flavor::Mysql => "MySQL",
        })
    }
}

#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub flavor: Flavor,
    /// `SELECT VERSION()`, e.g. `10.11.6-MariaDB-0+deb12u1-log`.
    pub version: String,
    pub version_tuple: (u16, u16, u16),
    pub server_id: u32,
    /// MySQL's `@@server_uuid`; MariaDB has none.
    pub server_uuid: Option<String>,
}

impl ServerInfo {
    /// Identifies the server a checkpoint belongs to: a position is
    /// meaningless on another server even if the file names match.
    pub fn identity(&self) -> String {
        match (&self.server_uuid, self.flavor) {
            (Some(uuid), _) => format!("mysql:{uuid}"),
            (None, flavor) => format!("{}:{}", flavor.to_string().to_lowercase(), self.server_id),
        }
    }

    /// MySQL 8.2 renamed SHOW MASTER STATUS (removed in 8.4).
    pub fn status_statement(&self) -> &'static str {
        if self.flavor == Flavor::Mysql && self.version_tuple >= (8, 2, 0) {
            "SHOW BINARY LOG STATUS"
        } else {
            "SHOW MASTER STATUS"
        }
    }
}

pub fn opts(cfg: &MysqlConfig) -> Result<OptsBuilder> {
    let url = cfg.parse_url().map_err(|p| Error::Fatal(p.to_string()))?;
    let password = cfg.password().map_err(|e| Error::Fatal(e.to_string()))?;
    Ok(OptsBuilder::default()
        .ip_or_hostname(url.host)
        .tcp_port(url.port)
        .user(Some(url.user))
        .pass(password)
        .db_name(Some(url.database))
        .prefer_socket(false)
        .stmt_cache_size(32)
        // Snapshot and stream must agree on TIMESTAMP rendering: UTC.
        .init(vec!["SET time_zone = '+00:00'", "SET NAMES utf8mb4"]))
}

/// Connects with a deadline and turns the common failures into one line
/// that names the setting to fix. The password never appears.
pub async fn connect(cfg: &MysqlConfig) -> Result<Conn> {
    let opts = opts(cfg)?;
    let url = cfg.parse_url().map_err(|p| Error::Fatal(p.to_string()))?;
    let timeout = Duration::from_secs_f64(cfg.connect_timeout_secs);
    let where_ = format!("{}:{}", url.host, url.port);
    match tokio::time::timeout(timeout, Conn::new(opts)).await {
        Err(_) => Err(Error::Transient(format!(
            "mysql.url: no answer from {where_} within {timeout:?}; check the host/port and that the server is running"
        ))),
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(mysql_async::Error::Server(e))) if e.code == codes::ACCESS_DENIED => Err(Error::Fatal(format!(
            "mysql.url: access denied for user {:?} at {where_} (server says: {}); check the password in mysql.password_file, ${} or the URL",
            url.user,
            e.message,
            crate::config::PASSWORD_ENV
        ))),
        Ok(Err(mysql_async::Error::Server(e))) if e.code == codes::BAD_DB || e.code == codes::DBACCESS_DENIED => {
            Err(Error::Fatal(format!(
                "mysql.url: cannot use database {:?} at {where_}: {}; check the database name in the URL and the user's grants",
                url.database, e.message
            )))
        }
        Ok(Err(e)) => Err(Error::Mysql { context: format!("connect to {where_}"), position: None, source: e }),
    }
}

fn parse_version(v: &str) -> (u16, u16, u16) {
    let mut it = v.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0), it.next().unwrap_or(0))
}

pub async fn server_info(conn: &mut Conn) -> Result<ServerInfo> {
    let row: mysql_async::Row = conn
        .query_first("SELECT VERSION(), @@server_id")
        .await
        .map_err(|e| Error::mysql("read server version", e))?
        .ok_or_else(|| Error::Transient("SELECT VERSION() returned no row".into()))?;
    let version: String = get(&row, 0).ok_or_else(|| Error::Transient("unreadable VERSION()".into()))?;
    let server_id: u32 = get(&row, 1).ok_or_else(|| Error::Transient("unreadable @@server_id".into()))?;
    let flavor = if version.to_ascii_lowercase().contains("mariadb") { Flavor::MariaDb } else { Flavor::Mysql };
    let server_uuid = if flavor == Flavor::Mysql {
        let row: Option<mysql_async::Row> =
            conn.query_first("SELECT @@server_uuid").await.map_err(|e| Error::mysql("read server_uuid", e))?;
        row.and_then(|r| get(&r, 0))
    } else {
        None
    };
    Ok(ServerInfo { version_tuple: parse_version(&version), flavor, version, server_id, server_uuid })
}

/// A column of a server answer, `None` when absent or not convertible
/// (never a panic on an unexpected reply).
pub fn get<T: mysql_async::prelude::FromValue>(row: &mysql_async::Row, i: usize) -> Option<T> {
    row.get_opt::<T, _>(i).and_then(|r| r.ok())
}

/// The server's current end of binlog.
pub async fn master_status(conn: &mut Conn, info: &ServerInfo) -> Result<BinlogPosition> {
    let row: Option<mysql_async::Row> =
        conn.query_first(info.status_statement()).await.map_err(|e| Error::mysql(info.status_statement(), e))?;
    let row = row.ok_or_else(|| {
        Error::Fatal(format!(
            "{} returned nothing: binary logging is off; add log_bin=mysql-bin to my.cnf and restart",
            info.status_statement()
        ))
    })?;
    let file: String = get(&row, 0).ok_or_else(|| Error::Transient("binlog status without a file".into()))?;
    let pos: u64 = get(&row, 1).ok_or_else(|| Error::Transient("binlog status without a position".into()))?;
    Ok(BinlogPosition::new(file, pos))
}

/// `SHOW BINARY LOGS`: (file, size) in order.
pub async fn binary_logs(conn: &mut Conn) -> Result<Vec<(String, u64)>> {
    let rows: Vec<mysql_async::Row> =
        conn.query("SHOW BINARY LOGS").await.map_err(|e| Error::mysql("SHOW BINARY LOGS", e))?;
    Ok(rows.into_iter().filter_map(|r| Some((get::<String>(&r, 0)?, get::<u64>(&r, 1)?))).collect())
}

/// A server variable as text (`None` when the server does not know it).
pub async fn variable(conn: &mut Conn, name: &str) -> Result<Option<String>> {
    let row: Option<mysql_async::Row> = conn
        .exec_first("SHOW GLOBAL VARIABLES WHERE Variable_name = ?", (name,))
        .await
        .map_err(|e| Error::mysql(format!("read variable {name}"), e))?;
    Ok(row.and_then(|r| get(&r, 1)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions() {
        assert_eq!(super::parse_version("10.11.6-MariaDB-0+deb12u1-log"), (10, 11, 6));
        assert_eq!(super::parse_version("8.4.3"), (8, 4, 3));
    }
}
