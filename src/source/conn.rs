//! Connecting to MySQL/MariaDB and asking it who it is and where it stands.

use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{ClientIdentity, Conn, OptsBuilder, SslOpts};

use crate::config::{MysqlConfig, TlsMode};
use crate::error::{Error, Result, codes};

// Server facts live in `server`; re-exported here for the callers that
// reach them through `conn`.
pub use crate::source::server::{
    Flavor, ServerInfo, binary_logs, get, kill_own_leftover_dumps, master_status, server_info, variable,
};

/// The one place the connection options are built: every connection
/// tailcache opens (binlog, snapshot, check, KILL) goes through it.
pub fn opts(cfg: &MysqlConfig) -> Result<OptsBuilder> {
    opts_with_tls(cfg, ssl_opts(cfg, cfg.tls))
}

fn opts_with_tls(cfg: &MysqlConfig, ssl: Option<SslOpts>) -> Result<OptsBuilder> {
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
        .ssl_opts(ssl)
        // Known up front, so connecting does not ask the server (one round
        // trip per connection saved): the largest packet MySQL and MariaDB
        // can send (1 GiB; a binlog event is at most that), and the
        // server's default idle timeout (only mysql_async's pool uses it).
        .max_allowed_packet(Some(1 << 30))
        .wait_timeout(Some(28_800))
        // Snapshot and stream must agree on TIMESTAMP rendering: UTC. One
        // statement, one round trip.
        .init(vec!["SET NAMES utf8mb4, time_zone = '+00:00'"]))
}

/// The TLS options for `mode` (`None`: plain TCP), as the mysql client's
/// `--ssl-mode`: `preferred`/`required` encrypt without verifying the
/// certificate, `verify_ca` checks the chain against `tls_ca_file`,
/// `verify_identity` also the host name.
fn ssl_opts(cfg: &MysqlConfig, mode: TlsMode) -> Option<SslOpts> {
    let mut ssl = SslOpts::default();
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        ssl = ssl.with_client_identity(Some(ClientIdentity::new(cert.clone().into(), key.clone().into())));
    }
    let ca = || cfg.tls_ca_file.iter().map(|p| p.clone().into()).collect::<Vec<_>>();
    Some(match mode {
        TlsMode::Disabled => return None,
        // `preferred`: a server whose handshake offers no TLS gets a plain
        // connection, decided in that same handshake (one connection, not a
        // refused TLS attempt and a second plain one).
        TlsMode::Preferred => ssl.with_danger_accept_invalid_certs(true).with_tls_optional(true),
        TlsMode::Required => ssl.with_danger_accept_invalid_certs(true),
        TlsMode::VerifyCa => {
            ssl.with_root_certs(ca()).with_disable_built_in_roots(true).with_danger_skip_domain_validation(true)
        }
        // Without tls_ca_file: the built-in (Mozilla) roots, for servers
        // with a publicly signed certificate.
        TlsMode::VerifyIdentity => ssl.with_root_certs(ca()).with_disable_built_in_roots(cfg.tls_ca_file.is_some()),
    })
}

/// True for the failures of a TLS handshake (certificate, protocol).
fn is_tls_failure(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Io(mysql_async::IoError::Tls(_))) || {
        let text = e.to_string().to_ascii_lowercase();
        text.contains("certificate") || text.contains("tls") || text.contains("handshake")
    }
}

/// Server and TLS settings that have connected in this process.
static CONNECTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn settings_key(cfg: &MysqlConfig, where_: &str) -> String {
    format!("{where_}|{:?}|{:?}|{:?}|{:?}", cfg.tls, cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file)
}

fn connected_before(key: &str) -> bool {
    CONNECTED.lock().map(|v| v.iter().any(|k| k == key)).unwrap_or(false)
}

/// The link broke (the server or a proxy went away, even in the middle of
/// a TLS handshake): a transient failure to retry, never a TLS setup
/// problem that would stop the daemon.
fn link_broke(e: &mysql_async::Error) -> bool {
    use std::io::ErrorKind as K;
    let io_kind = match e {
        mysql_async::Error::Io(mysql_async::IoError::Io(io)) => Some(io.kind()),
        _ => None,
    };
    let text = e.to_string().to_ascii_lowercase();
    matches!(
        io_kind,
        Some(K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::ConnectionRefused)
    ) || text.contains("close_notify")
        || text.contains("unexpected eof")
        || text.contains("connection reset")
        || text.contains("broken pipe")
}

fn no_tls_offered(e: &mysql_async::Error) -> bool {
    matches!(e, mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer))
}

/// Connects with a deadline and turns the common failures into one line
/// that names the setting to fix. The password never appears.
pub async fn connect(cfg: &MysqlConfig) -> Result<Conn> {
    let url = cfg.parse_url().map_err(|p| Error::Fatal(p.to_string()))?;
    let timeout = Duration::from_secs_f64(cfg.connect_timeout_secs);
    let where_ = format!("{}:{}", url.host, url.port);
    let attempt = |ssl: Option<SslOpts>| async move {
        let opts = opts_with_tls(cfg, ssl)?;
        Ok::<_, Error>(tokio::time::timeout(timeout, Conn::new(opts)).await)
    };
    let res = attempt(ssl_opts(cfg, cfg.tls)).await?;
    let tls = cfg.tls;
    match res {
        Err(_) => Err(Error::Transient(format!(
            "mysql.url: no answer from {where_} within {timeout:?}; check the host/port and that the server is running"
        ))),
        Ok(Ok(conn)) => {
            let key = settings_key(cfg, &where_);
            if let Ok(mut v) = CONNECTED.lock()
                && !v.contains(&key)
            {
                v.push(key);
            }
            Ok(conn)
        }
        Ok(Err(mysql_async::Error::Server(e))) if e.code == codes::SECURE_TRANSPORT_REQUIRED => {
            Err(Error::Fatal(format!(
                "mysql.tls = \"{tls}\": the server at {where_} requires TLS (require_secure_transport = ON; server says: {}); \
                 set mysql.tls = \"required\" (or \"verify_ca\"/\"verify_identity\" with mysql.tls_ca_file)",
                e.message
            )))
        }
        Ok(Err(mysql_async::Error::Server(e))) if e.code == codes::ACCESS_DENIED && tls == TlsMode::Disabled => {
            // A plain login refused: with the same password over TLS?
            // (accounts created REQUIRE SSL/X509 refuse plain logins with
            // the same error as a wrong password).
            let probe = attempt(ssl_opts(cfg, TlsMode::Required)).await;
            if let Ok(Ok(Ok(c))) = probe {
                let _ = c.disconnect().await;
                Err(Error::Fatal(format!(
                    "mysql.tls = \"disabled\": {where_} requires TLS for user {:?}: the same login succeeds over TLS but is refused without \
                     (server says: {}; the account was created REQUIRE SSL, or the server has require_secure_transport = ON); \
                     set mysql.tls = \"required\" (or \"verify_ca\"/\"verify_identity\" with mysql.tls_ca_file)",
                    url.user, e.message
                )))
            } else {
                Err(Error::Fatal(format!(
                    "mysql.url: access denied for user {:?} at {where_} (server says: {}); the account may require TLS \
                     (REQUIRE SSL/X509, then set mysql.tls = \"required\"); otherwise check the password in mysql.password_file, ${} or the URL",
                    url.user,
                    e.message,
                    crate::config::PASSWORD_ENV
                )))
            }
        }
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
        Ok(Err(e)) if no_tls_offered(&e) => Err(Error::Fatal(format!(
            "mysql.tls = \"{tls}\": the server at {where_} does not offer TLS (have_ssl is not YES); \
             give the server ssl_cert/ssl_key, or set mysql.tls = \"preferred\" to connect without TLS"
        ))),
        // The same settings worked before in this process: a handshake cut
        // short (a server restarting, a proxy going away) is not a setup
        // problem; retry it like any lost link.
        Ok(Err(e)) if link_broke(&e) || (is_tls_failure(&e) && connected_before(&settings_key(cfg, &where_))) => {
            Err(Error::Mysql {
                context: format!("connect to {where_} (the connection broke)"),
                position: None,
                source: e,
            })
        }
        Ok(Err(e)) if tls != TlsMode::Disabled && is_tls_failure(&e) => {
            let hint = match tls {
                TlsMode::VerifyCa => "the server's certificate must be signed by the CA in mysql.tls_ca_file",
                TlsMode::VerifyIdentity => {
                    "the server's certificate must be signed by the CA in mysql.tls_ca_file and name the host in mysql.url"
                }
                _ => "check the server's TLS setup (ssl_cert, ssl_key, tls_version)",
            };
            Err(Error::Fatal(format!(
                "mysql.tls = \"{tls}\": TLS handshake with {where_} failed: {e}; {hint}{}",
                cfg.tls_ca_file.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default()
            )))
        }
        Ok(Err(e)) => Err(Error::Mysql { context: format!("connect to {where_}"), position: None, source: e }),
    }
}

/// Whether the session is encrypted: `Some((version, cipher))` from
/// `SHOW SESSION STATUS LIKE 'Ssl_%'`, `None` on a plain connection.
pub async fn tls_status(conn: &mut Conn) -> Result<Option<(String, String)>> {
    let rows: Vec<(String, String)> = conn
        .query("SHOW SESSION STATUS WHERE Variable_name IN ('Ssl_version', 'Ssl_cipher')")
        .await
        .map_err(|e| Error::mysql("SHOW STATUS LIKE 'Ssl_version'", e))?;
    let find = |n: &str| rows.iter().find(|r| r.0.eq_ignore_ascii_case(n)).map(|r| r.1.clone()).unwrap_or_default();
    let (version, cipher) = (find("Ssl_version"), find("Ssl_cipher"));
    Ok(if version.is_empty() && cipher.is_empty() { None } else { Some((version, cipher)) })
}

#[cfg(test)]
mod tests {
    /// The vendored driver parses the handshake's server version by hand
    /// (vendor/mysql_async/PATCHED.md, sixth patch); it must read what
    /// mysql_common's regex-based parsers read.
    #[test]
    fn server_version_parsing_matches_mysql_common() {
        for v in [
            "5.5.5-10.11.19-MariaDB-0+deb12u1-log",
            "10.11.19-MariaDB",
            "5.5.5-MariaDB",
            "11.4.2-MariaDB-ubu2404",
            "9.7.4",
            "8.0.36-0ubuntu0.22.04.1",
            "5.7.44-log",
            "8.0.1234",
            "10.6.999-MariaDB",
            "garbage",
            "",
            "5.5.5-10.11",
        ] {
            let h = mysql_common::packets::HandshakePacket::new(
                10u8,
                v.as_bytes().to_vec(),
                1u32,
                [0u8; 8],
                None::<Vec<u8>>,
                mysql_common::constants::CapabilityFlags::empty(),
                0u8,
                mysql_common::constants::StatusFlags::empty(),
                None::<Vec<u8>>,
            );
            let expected = match h.maria_db_server_version_parsed() {
                Some(t) => (t, true),
                None => (h.server_version_parsed().unwrap_or((0, 0, 0)), false),
            };
            assert_eq!(mysql_async::parse_server_version(v.as_bytes()), expected, "{v}");
        }
    }
}
