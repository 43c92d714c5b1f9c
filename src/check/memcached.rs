//! memcached: each server answers (`version`), its item size limit
//! (`stats settings`, `item_size_max`) is at least `memcached.max_item_size`,
//! it lets a resync list its keys (`lru_crawler`, `dump_enabled`), and
//! `memcached.exptime` is a value the protocol accepts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::Report;
use crate::config::MemcachedConfig;

/// What one server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub version: String,
    /// `item_size_max` from `stats settings`, when reported.
    pub item_size_max: Option<u64>,
    /// Why `lru_crawler metadump` would be refused (`lru_crawler no`,
    /// `dump_enabled no`), when `stats settings` says so.
    pub unlistable: Option<String>,
}

/// Asks `addr` for `version` and `stats settings` on one connection.
pub async fn server_facts(addr: &str, timeout: Duration) -> Result<ServerFacts, String> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("cannot connect: {e}"))?;
        let mut stream = BufReader::new(stream);
        stream.get_mut().write_all(b"version\r\nstats settings\r\n").await.map_err(|e| format!("cannot send: {e}"))?;
        let mut line = String::new();
        let mut read = async |line: &mut String| -> Result<(), String> {
            line.clear();
            match stream.read_line(line).await {
                Ok(0) => Err("the server closed the connection".to_owned()),
                Ok(_) => Ok(()),
                Err(e) => Err(format!("cannot read: {e}")),
            }
        };
        read(&mut line).await?;
        let version = match line.trim_end().strip_prefix("VERSION ") {
            Some(v) => v.to_owned(),
            None => return Err(format!("unexpected answer to `version`: {:?}", line.trim_end())),
        };
        let mut item_size_max = None;
        let mut unlistable = None;
        loop {
            read(&mut line).await?;
            let l = line.trim_end();
            if l == "END" {
                break;
            }
            if let Some(v) = l.strip_prefix("STAT item_size_max ") {
                item_size_max = v.trim().parse().ok();
            } else if l == "STAT lru_crawler no" {
                unlistable = Some("lru_crawler no (started with -o no_lru_crawler)".to_owned());
            } else if l == "STAT dump_enabled no" {
                unlistable = Some("dump_enabled no (started with -X)".to_owned());
            } else if !l.starts_with("STAT ") {
                // e.g. a proxy that does not know `stats settings`
                break;
            }
        }
        Ok(ServerFacts { version, item_size_max, unlistable })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{}m", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes % (1 << 10) == 0 {
        format!("{}k", bytes >> 10)
    } else {
        bytes.to_string()
    }
}

/// One line per server (reachable, version, item size limit) and one for
/// a valid `memcached.exptime` (an invalid one is a `config` problem).
pub async fn check(mc: &MemcachedConfig, r: &mut Report) {
    let timeout = Duration::from_millis(mc.timeout_ms.clamp(1000, 30_000));
    let facts = futures_util::future::join_all(mc.servers.iter().map(|s| server_facts(s, timeout))).await;
    for (addr, f) in mc.servers.iter().zip(facts) {
        let name = format!("memcached {addr}");
        if let Ok(ServerFacts { unlistable: Some(why), .. }) = &f {
            r.warn(
                format!("memcached {addr} key listing"),
                format!(
                    "{why}: a resync cannot list this server's keys, so keys nobody remembers (orphans) stay there"
                ),
                format!("start memcached on {addr} without -o no_lru_crawler and without -X"),
            );
        }
        match f {
            Err(e) => r.problem(
                name,
                e,
                "a memcached answering `version`",
                format!("start memcached on {addr} or fix memcached.servers"),
            ),
            Ok(ServerFacts { version, item_size_max: Some(max), .. }) if (max as usize) < mc.max_item_size => r.problem(
                name,
                format!("memcached {version} with item_size_max = {max} (-I {})", human(max)),
                format!("item_size_max >= memcached.max_item_size = {}", mc.max_item_size),
                format!(
                    "set memcached.max_item_size = {max} in the config file, or start memcached with -I {} (or more); \
                     otherwise entries between the two sizes are refused by the server",
                    human(mc.max_item_size as u64)
                ),
            ),
            Ok(ServerFacts { version, item_size_max: Some(max), .. }) => r.ok_line(
                name,
                format!(
                    "memcached {version}, item_size_max = {max} (>= memcached.max_item_size = {})",
                    mc.max_item_size
                ),
            ),
            Ok(ServerFacts { version, item_size_max: None, .. }) => r.warn(
                name,
                format!("memcached {version} does not report item_size_max in `stats settings`"),
                format!(
                    "make sure the server accepts items of memcached.max_item_size = {} bytes (memcached -I)",
                    mc.max_item_size
                ),
            ),
        }
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    match crate::sink::exptime_problem(mc.exptime, now) {
        // Reported once, by the config check (`config memcached.exptime`).
        Some(_) => {}
        None if mc.exptime == 0 => r.ok_line("memcached.exptime", "0 (entries never expire)"),
        None if mc.exptime <= crate::sink::MAX_RELATIVE_EXPTIME => {
            r.ok_line("memcached.exptime", format!("{} s after each write", mc.exptime))
        }
        None => r.ok_line(
            "memcached.exptime",
            format!("{} s after each write (above 30 days: sent as the absolute unix time)", mc.exptime),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(1 << 20), "1m");
        assert_eq!(human(2 << 20), "2m");
        assert_eq!(human(512 << 10), "512k");
        assert_eq!(human(1000), "1000");
    }
}
