//! Facts about the server that `tailcache check` and the snapshot (and the
//! stream) share: the account and the GRANTs it needs, which statement
//! each server version spells how, and the binlog readers (replicas)
//! connected to it. A leaf module: it imports neither `check` nor
//! `snapshot`, which both import it.

use std::collections::BTreeSet;
use std::fmt;

use mysql_async::Conn;
use mysql_async::prelude::*;

use crate::config::TableRef;
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

    /// See [`binlog_status_statement`].
    pub fn status_statement(&self) -> &'static str {
        binlog_status_statement(self)
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

/// `'user'@'host'` as GRANT wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account(String);

impl Account {
    /// From `SELECT CURRENT_USER()` (`user@host`).
    pub fn parse(current_user: &str) -> Account {
        let (user, host) = current_user.rsplit_once('@').unwrap_or((current_user, "%"));
        Account(format!("'{}'@'{}'", user.replace('\'', "''"), host.replace('\'', "''")))
    }

    /// The session's account, `'<user>'@'%'` when the server does not say.
    pub async fn current(conn: &mut Conn, fallback_user: &str) -> Account {
        match conn.query_first::<String, _>("SELECT CURRENT_USER()").await {
            Ok(Some(u)) => Account::parse(&u),
            _ => Account::parse(&format!("{fallback_user}@%")),
        }
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `SHOW BINARY LOG STATUS` on MySQL 8.2+ (SHOW MASTER STATUS is gone in
/// 8.4), `SHOW MASTER STATUS` on older MySQL and on MariaDB.
pub fn binlog_status_statement(info: &ServerInfo) -> &'static str {
    if info.flavor == Flavor::Mysql && info.version_tuple >= (8, 2, 0) {
        "SHOW BINARY LOG STATUS"
    } else {
        "SHOW MASTER STATUS"
    }
}

/// `SHOW REPLICAS` on MySQL 8.0.22+ (SHOW SLAVE HOSTS is gone in 8.4),
/// `SHOW SLAVE HOSTS` on older MySQL and on MariaDB.
pub fn replicas_statement(info: &ServerInfo) -> &'static str {
    if info.flavor == Flavor::Mysql && info.version_tuple >= (8, 0, 22) { "SHOW REPLICAS" } else { "SHOW SLAVE HOSTS" }
}

/// The privilege that allows SHOW BINARY LOGS and the binlog status.
pub fn binlog_monitor_privilege(info: &ServerInfo) -> &'static str {
    if info.flavor == Flavor::MariaDb && info.version_tuple >= (10, 5, 2) {
        "BINLOG MONITOR"
    } else {
        "REPLICATION CLIENT"
    }
}

/// The privilege [`replicas_statement`] needs.
pub fn replicas_privilege(info: &ServerInfo) -> &'static str {
    if info.flavor == Flavor::MariaDb && info.version_tuple >= (10, 5, 2) {
        "REPLICATION MASTER ADMIN"
    } else {
        "REPLICATION SLAVE"
    }
}

/// `LOCK TABLES a READ, b READ` over the watched tables.
pub fn lock_tables_statement(tables: &[TableRef]) -> String {
    let list = tables.iter().map(|t| format!("{} READ", t.mysql_quoted())).collect::<Vec<_>>().join(", ");
    format!("LOCK TABLES {list}")
}

/// The GRANT statements that give `account` LOCK TABLES on the watched schemas.
pub fn lock_tables_grants(tables: &[TableRef], account: &str) -> String {
    let schemas: BTreeSet<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    schemas
        .iter()
        .map(|s| format!("GRANT LOCK TABLES ON `{}`.* TO {account};", s.replace('`', "``")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One binlog reader registered with the server (a row of SHOW REPLICAS /
/// SHOW SLAVE HOSTS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub server_id: u32,
    /// The host it reported (`report_host`), often empty.
    pub host: String,
    pub port: u32,
}

impl fmt::Display for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.is_empty() {
            write!(f, "replica server_id {} (port {})", self.server_id, self.port)
        } else {
            write!(f, "replica server_id {} at {}:{}", self.server_id, self.host, self.port)
        }
    }
}

/// The binlog readers registered with the server.
pub async fn replicas(conn: &mut Conn, info: &ServerInfo) -> Result<Vec<Replica>> {
    let sql = replicas_statement(info);
    let rows: Vec<mysql_async::Row> = conn.query(sql).await.map_err(|e| Error::mysql(sql, e))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some(Replica {
                server_id: get(r, 0)?,
                host: get::<String>(r, 1).unwrap_or_default(),
                port: get(r, 2).unwrap_or(0),
            })
        })
        .collect())
}

/// A `Binlog Dump` / `Binlog Dump GTID` connection in the process list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpThread {
    pub id: u64,
    pub user: String,
    /// The client's address without the port.
    pub client: String,
    pub seconds: i64,
}

/// The client part of a process list `Host` (`10.0.0.5:53211` → `10.0.0.5`,
/// `[::1]:5000` → `::1`, `localhost` stays).
fn client_host(host: &str) -> String {
    let h = host.trim();
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_owned();
    }
    match h.rsplit_once(':') {
        Some((addr, port)) if !addr.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => addr.to_owned(),
        _ => h.to_owned(),
    }
}

/// One row of `SHOW PROCESSLIST`: id, user, client host (`addr:port`),
/// command, seconds in that state.
type Process = (u64, String, String, String, i64);

/// The connections this session may see (without the PROCESS privilege:
/// those of its own user). `SHOW PROCESSLIST`, not
/// `information_schema.PROCESSLIST`: MySQL fills the latter's statement
/// column converted to utf8mb3 and fails the whole query (error 3854) when
/// any visible session runs a statement whose text is not valid UTF-8, such
/// as a `_binary` literal with raw bytes.
async fn processlist(conn: &mut Conn, context: &str) -> Result<Vec<Process>> {
    let rows: Vec<mysql_async::Row> = conn.query("SHOW PROCESSLIST").await.map_err(|e| Error::mysql(context, e))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let text = |name: &str| {
                r.get_opt::<Option<Vec<u8>>, _>(name)
                    .and_then(Result::ok)
                    .flatten()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            };
            let number = |name: &str| r.get_opt::<Option<i64>, _>(name).and_then(Result::ok).flatten().unwrap_or(0);
            (number("Id") as u64, text("User"), text("Host"), text("Command"), number("Time"))
        })
        .collect())
}

/// This session's client address as the server sees it.
async fn own_client(conn: &mut Conn) -> Result<Option<String>> {
    let me = u64::from(conn.id());
    let list = processlist(conn, "read own process list entry").await?;
    Ok(list.into_iter().find(|p| p.0 == me).map(|p| client_host(&p.2)))
}

/// The binlog dump connections visible to this session other than itself
/// (without the PROCESS privilege: those of its own user).
pub async fn dump_threads(conn: &mut Conn) -> Result<Vec<DumpThread>> {
    let me = u64::from(conn.id());
    let list = processlist(conn, "list binlog dump connections").await?;
    Ok(list
        .into_iter()
        .filter(|(id, _, _, command, _)| *id != me && command.starts_with("Binlog Dump"))
        .map(|(id, user, host, _, seconds)| DumpThread { id, user, client: client_host(&host), seconds })
        .collect())
}

/// Who reads the binlog with `server_id`, as far as this session can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerIdUse {
    /// Nobody registered with that id.
    Free,
    /// Registered, and every binlog dump connection this session sees is of
    /// `user` from this client host: tailcache's own (a dump connection left
    /// behind by a crash, or a running tailcache with this same config).
    Own { threads: Vec<DumpThread> },
    /// Registered by someone else: the replicas, and the dump connections of
    /// our user from other hosts, if any.
    Other { replicas: Vec<Replica>, foreign: Vec<DumpThread> },
}

/// Classifies the readers registered with `server_id`.
///
/// The server does not say which connection registered which id, so a
/// dump connection is ours only when it is of `user` from our own client
/// host and there are no more of those than registrations with our id
/// (so none of them can belong to another id).
pub async fn server_id_use(conn: &mut Conn, info: &ServerInfo, server_id: u32, user: &str) -> Result<ServerIdUse> {
    // A reader of `user` that just died (`kill -9`) is still registered for
    // a moment after its dump connection ended (seen on MySQL 9.7): with no
    // dump connection of `user` left, wait for the registration to go
    // rather than call it a clash.
    let deadline = std::time::Instant::now() + LEFTOVER_REGISTRATION_WAIT;
    let (ours, mine, foreign) = loop {
        let all = replicas(conn, info).await?;
        let ours: Vec<Replica> = all.iter().filter(|r| r.server_id == server_id).cloned().collect();
        if ours.is_empty() {
            return Ok(ServerIdUse::Free);
        }
        let me = own_client(conn).await?.unwrap_or_default();
        let dumps = dump_threads(conn).await?;
        let (mine, foreign): (Vec<DumpThread>, Vec<DumpThread>) =
            dumps.into_iter().filter(|d| d.user == user).partition(|d| d.client == me);
        if !mine.is_empty() || !foreign.is_empty() || std::time::Instant::now() >= deadline {
            break (ours, mine, foreign);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    if !mine.is_empty() && foreign.is_empty() && mine.len() <= ours.len() {
        Ok(ServerIdUse::Own { threads: mine })
    } else {
        Ok(ServerIdUse::Other { replicas: ours, foreign })
    }
}

/// How long a registration with our id but no dump connection of our user
/// may linger before it counts as another reader's.
const LEFTOVER_REGISTRATION_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The smallest id from `from` upwards that no registered replica and not
/// the server itself uses.
pub fn free_server_id(used: &[u32], server_own: u32, from: u32) -> u32 {
    let mut id = from.max(1);
    while id == server_own || used.contains(&id) {
        id = id.checked_add(1).unwrap_or(1);
    }
    id
}

/// KILLs the binlog dump connections `user` left behind with `server_id`
/// (e.g. by a `kill -9` seconds ago, before the server noticed the dead
/// link) and returns how many. Connections that may belong to another
/// reader (another user, another host, another id) are never touched.
pub async fn kill_own_leftover_dumps(conn: &mut Conn, server_id: u32, user: &str) -> Result<u32> {
    let info = server_info(conn).await?;
    let threads = match server_id_use(conn, &info, server_id, user).await {
        Ok(ServerIdUse::Own { threads }) => threads,
        Ok(ServerIdUse::Free | ServerIdUse::Other { .. }) => return Ok(0),
        // Not allowed to list the replicas (MariaDB 10.5+ wants REPLICATION
        // MASTER ADMIN): nothing can be told apart, so nothing is touched;
        // the server still replaces a dump connection with our id when
        // ours starts.
        Err(Error::Mysql { source: mysql_async::Error::Server(e), .. })
            if matches!(e.code, codes::SPECIFIC_ACCESS_DENIED | codes::ACCESS_DENIED) =>
        {
            return Ok(0);
        }
        Err(e) => return Err(e),
    };
    let mut killed = 0;
    for t in threads {
        match conn.query_drop(format!("KILL {}", t.id)).await {
            Ok(()) => {
                tracing::info!(
                    connection = t.id,
                    server_id,
                    user = %t.user,
                    client = %t.client,
                    open_secs = t.seconds,
                    "killed a binlog dump connection left behind by an earlier tailcache with this server_id"
                );
                killed += 1;
            }
            // ER_NO_SUCH_THREAD: it ended by itself meanwhile.
            Err(mysql_async::Error::Server(e)) if e.code == codes::NO_SUCH_THREAD => {}
            Err(e) => return Err(Error::mysql(format!("KILL {}", t.id), e)),
        }
    }
    Ok(killed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(flavor: Flavor, v: (u16, u16, u16)) -> ServerInfo {
        ServerInfo { flavor, version: String::new(), version_tuple: v, server_id: 1, server_uuid: None }
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("10.11.6-MariaDB-0+deb12u1-log"), (10, 11, 6));
        assert_eq!(parse_version("8.4.3"), (8, 4, 3));
    }

    #[test]
    fn statements_by_version() {
        assert_eq!(binlog_status_statement(&info(Flavor::Mysql, (8, 4, 3))), "SHOW BINARY LOG STATUS");
        assert_eq!(binlog_status_statement(&info(Flavor::Mysql, (8, 2, 0))), "SHOW BINARY LOG STATUS");
        assert_eq!(binlog_status_statement(&info(Flavor::Mysql, (8, 0, 40))), "SHOW MASTER STATUS");
        assert_eq!(binlog_status_statement(&info(Flavor::MariaDb, (11, 4, 2))), "SHOW MASTER STATUS");
        assert_eq!(replicas_statement(&info(Flavor::Mysql, (8, 0, 22))), "SHOW REPLICAS");
        assert_eq!(replicas_statement(&info(Flavor::Mysql, (8, 0, 21))), "SHOW SLAVE HOSTS");
        assert_eq!(replicas_statement(&info(Flavor::Mysql, (5, 7, 44))), "SHOW SLAVE HOSTS");
        assert_eq!(replicas_statement(&info(Flavor::MariaDb, (10, 11, 6))), "SHOW SLAVE HOSTS");
    }

    #[test]
    fn client_hosts() {
        assert_eq!(client_host("10.0.0.5:53211"), "10.0.0.5");
        assert_eq!(client_host("[::1]:5000"), "::1");
        assert_eq!(client_host("localhost"), "localhost");
        assert_eq!(client_host("::1"), "::1");
    }

    #[test]
    fn free_ids() {
        assert_eq!(free_server_id(&[4001, 4002], 1, 4001), 4003);
        assert_eq!(free_server_id(&[], 4001, 4001), 4002);
        assert_eq!(free_server_id(&[7], 1, 5), 5);
    }

    #[test]
    fn account_quoting() {
        assert_eq!(Account::parse("tailcache@%").to_string(), "'tailcache'@'%'");
        assert_eq!(Account::parse("o'k@10.0.0.%").to_string(), "'o''k'@'10.0.0.%'");
    }
}
