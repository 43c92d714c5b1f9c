//! Configuration: TOML in, validated structs out.
//!
//! Parsing (`Config::from_toml`) and validation (`Config::validate`) are pure
//! and separate from building connections, so `tailcache check` and the tests
//! can report every problem at once without touching a server.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/tailcache/tailcache.toml";
pub const PASSWORD_ENV: &str = "TAILCACHE_MYSQL_PASSWORD";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub mysql: MysqlConfig,
    pub state: StateConfig,
    #[serde(default)]
    pub memcached: Option<MemcachedConfig>,
    #[serde(default)]
    pub views: Vec<ViewConfig>,
    #[serde(default)]
    pub resync: ResyncConfig,
    #[serde(default)]
    pub inspect: InspectConfig,
    #[serde(default)]
    pub admin: AdminConfig,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// `mysql://user[:password]@host[:port]/database`
    pub url: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    pub server_id: u32,
    pub tables: Vec<String>,
    /// Seconds between server heartbeats on an idle binlog stream; a link
    /// silent for 3 periods is considered dead and reconnected.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: f64,
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: f64,
    /// TLS to the server, as the mysql client's `--ssl-mode`.
    #[serde(default)]
    pub tls: TlsMode,
    /// PEM file with the CA certificate(s) the server's certificate must
    /// chain to (`verify_ca`, `verify_identity`).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for accounts created `REQUIRE X509`; with
    /// `tls_key_file`.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// How long a MySQL snapshot waits for open transactions on the watched
    /// tables before it backs off and tries again: seconds (`5`, `0.5`) or a
    /// duration (`"5s"`, `"500ms"`, `"1m"`).
    #[serde(default = "default_snapshot_lock_wait", deserialize_with = "seconds")]
    pub snapshot_lock_wait: f64,
}

/// `mysql.tls`: the mysql client's `--ssl-mode`, same names in lower case.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Plain TCP.
    Disabled,
    /// TLS when the server offers it (certificate not verified), else plain.
    #[default]
    Preferred,
    /// TLS or no connection; the certificate is not verified.
    Required,
    /// TLS, the certificate must chain to `tls_ca_file` (any host name).
    VerifyCa,
    /// Like `verify_ca`, and the certificate must name the host in `mysql.url`.
    VerifyIdentity,
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Disabled => "disabled",
            TlsMode::Preferred => "preferred",
            TlsMode::Required => "required",
            TlsMode::VerifyCa => "verify_ca",
            TlsMode::VerifyIdentity => "verify_identity",
        })
    }
}

/// Seconds as a number or a duration string: `5`, `0.5`, `"5s"`, `"500ms"`, `"1m"`.
fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Float(f64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(i) => Ok(i as f64),
        Raw::Float(f) => Ok(f),
        Raw::Text(t) => parse_duration_secs(&t).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{t:?} is not a duration; expected seconds (5, 0.5) or a number with a unit: \"500ms\", \"5s\", \"1m\""
            ))
        }),
    }
}

/// `"500ms"`, `"5s"`, `"1.5s"`, `"2m"`, `"5"` → seconds.
pub fn parse_duration_secs(t: &str) -> Option<f64> {
    let t = t.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        _ => return None,
    };
    Some(n * scale)
}

// The URL may carry a password: never let it reach a log line.
impl fmt::Debug for MysqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlConfig")
            .field("url", &redact_url(&self.url))
            .field("password_file", &self.password_file)
            .field("server_id", &self.server_id)
            .field("tables", &self.tables)
            .field("heartbeat_secs", &self.heartbeat_secs)
            .field("connect_timeout_secs", &self.connect_timeout_secs)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("snapshot_lock_wait", &self.snapshot_lock_wait)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// SQLite file holding the replica, the checkpoint and what was
    /// published; `:memory:` takes a fresh snapshot at every start.
    pub path: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    #[default]
    Msgpack,
    Dogpile,
    Json,
    /// A Python pickle (protocol 3, plain data only) with the "pickled"
    /// client flag, as Django's memcached backends, pymemcache and pylibmc
    /// read by default.
    Pickle,
}

impl Codec {
    /// The memcached client flags stored with each value: `pickle` uses
    /// the flag pymemcache, pylibmc and python-memcached use for pickled
    /// values (1), `json` the flag of pymemcache's documented JSON serde
    /// (2), the others 0 (plain bytes to every client).
    pub fn flags(self) -> u32 {
        match self {
            Codec::Msgpack | Codec::Dogpile => 0,
            Codec::Json => FLAG_JSON,
            Codec::Pickle => FLAG_PICKLE,
        }
    }
}

/// `FLAG_PICKLE` of pymemcache's serde, `PYLIBMC_FLAG_PICKLE`,
/// python-memcached's `_FLAG_PICKLE`.
pub const FLAG_PICKLE: u32 = 1;
/// The flag of the `JsonSerde` in pymemcache's documentation ("Serialization").
pub const FLAG_JSON: u32 = 2;

/// `memcached.distribution`: which server holds a key, computed as the
/// readers' client computes it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Distribution {
    /// Every key on every server (any client reads it).
    #[default]
    All,
    /// python-memcached's default: `cmemcache_hash` (CRC32 variant) modulo
    /// the weighted server list.
    Modula,
    /// libmemcached's ketama as pylibmc uses it with
    /// `behaviors={"ketama": True}` (one-at-a-time hash, 100 points per
    /// server).
    Ketama,
    /// libmemcached's weighted ketama, pylibmc's
    /// `behaviors={"ketama_weighted": True}` (MD5, 160 points shared by
    /// weight).
    KetamaWeighted,
    /// pymemcache `HashClient`'s default rendezvous hashing (murmur3), as
    /// Django's `PyMemcacheCache` with several LOCATIONs.
    Rendezvous,
    /// pylibmc's own default (no behaviors): libmemcached modula with the
    /// one-at-a-time hash.
    Pylibmc,
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distribution::All => "all",
            Distribution::Modula => "modula",
            Distribution::Ketama => "ketama",
            Distribution::KetamaWeighted => "ketama_weighted",
            Distribution::Rendezvous => "rendezvous",
            Distribution::Pylibmc => "pylibmc",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemcachedConfig {
    pub servers: Vec<String>,
    #[serde(default)]
    pub key_prefix: String,
    #[serde(default)]
    pub codec: Codec,
    /// Seconds; 0 = never expires.
    #[serde(default)]
    pub exptime: u32,
    /// Largest value written; memcached's `-I` (item size) limit, 1 MB by default.
    #[serde(default = "default_max_item_size")]
    pub max_item_size: usize,
    /// Upper bound on how long a burst of commits is coalesced before the
    /// views are recomputed. A lone edit is published at once.
    #[serde(default = "default_coalesce_ms")]
    pub coalesce_ms: u64,
    #[serde(default = "default_memcached_timeout_ms")]
    pub timeout_ms: u64,
    /// Which server holds a key (see [`Distribution`]); every key on every
    /// server by default.
    #[serde(default)]
    pub distribution: Distribution,
    /// Server weights, one per server in `servers` order (all 1 when
    /// empty); used by `modula` and `ketama_weighted`, as their clients do.
    #[serde(default)]
    pub weights: Vec<u32>,
}

impl MemcachedConfig {
    /// The weight of server `i` (1 when not configured).
    pub fn weight(&self, i: usize) -> u32 {
        self.weights.get(i).copied().unwrap_or(1)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    #[default]
    Row,
    List,
    Map,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    pub name: String,
    pub key: String,
    pub query: String,
    #[serde(default)]
    pub shape: Shape,
    #[serde(default)]
    pub map_key: Option<String>,
    #[serde(default)]
    pub value_column: Option<String>,
    #[serde(default)]
    pub json_columns: Vec<String>,
    /// What happens to the view's keys while it does not compile (a DDL
    /// dropped a column it reads, ...): `keep` leaves the last published
    /// values in memcached (readers see slightly old data, nothing
    /// disappears), `delete` removes them (readers fall back to their own
    /// source). Either way the view is reported and compiled again at the
    /// next schema change.
    #[serde(default)]
    pub on_error: OnError,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Keep,
    Delete,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncConfig {
    /// Seconds between full resyncs (fresh snapshot, recompute, repair
    /// memcached); 0 disables the periodic one.
    #[serde(default = "default_resync_interval")]
    pub interval_secs: u64,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        Self { interval_secs: default_resync_interval() }
    }
}

/// `[inspect]`: the consistency inspector (see [`crate::views::inspect`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectConfig {
    /// Published keys read back from memcached and compared with what was
    /// published, per second; 0 disables the inspector.
    #[serde(default = "default_inspect_rate")]
    pub keys_per_second: u32,
}

impl Default for InspectConfig {
    fn default() -> Self {
        Self { keys_per_second: default_inspect_rate() }
    }
}

/// The largest `inspect.keys_per_second`.
pub const MAX_INSPECT_RATE: u32 = 100_000;

/// `[admin]`: the HTTP endpoint for health, readiness, status, metrics and
/// resync requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:PORT` to listen on; `""` disables the endpoint. Loopback by
    /// default: the endpoint has no authentication, so listening on another
    /// address (even `0.0.0.0`) must be written out.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: default_admin_listen() }
    }
}

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9187";

fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_owned()
}

impl AdminConfig {
    /// The address to listen on; `None` when disabled. `localhost:PORT` is
    /// 127.0.0.1.
    pub fn addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigProblem> {
        let l = self.listen.trim();
        if l.is_empty() {
            return Ok(None);
        }
        let bad = |why: &str| {
            ConfigProblem {
            key: "admin.listen".into(),
            found: format!("{:?}{why}", self.listen),
            expected: "IP:PORT such as \"127.0.0.1:9187\" (the default) or \"[::1]:9187\", \"0.0.0.0:9187\" to listen on every interface, or \"\" to disable the endpoint".into(),
        }
        };
        let parsed = match l.strip_prefix("localhost:") {
            Some(port) => port.parse::<u16>().map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p))).ok(),
            None => l.parse::<std::net::SocketAddr>().ok(),
        };
        match parsed {
            None => Err(bad("")),
            Some(a) if a.port() == 0 => Err(bad(" (port 0)")),
            Some(a) => Ok(Some(a)),
        }
    }
}

fn default_heartbeat_secs() -> f64 {
    1.0
}
fn default_connect_timeout_secs() -> f64 {
    10.0
}
fn default_snapshot_lock_wait() -> f64 {
    5.0
}
fn default_max_item_size() -> usize {
    1024 * 1024
}
fn default_coalesce_ms() -> u64 {
    2
}
fn default_memcached_timeout_ms() -> u64 {
    1000
}
fn default_resync_interval() -> u64 {
    600
}
fn default_inspect_rate() -> u32 {
    50
}

/// One problem in the configuration: the key it is about, what was found and
/// what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub found: String,
    pub expected: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: found {}; expected {}", self.key, self.found, self.expected)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass --config FILE (default {DEFAULT_CONFIG_PATH})")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: PathBuf, problems: Vec<ConfigProblem> },
    #[error("{key}: cannot read password file {path}: {source}")]
    PasswordFile { key: String, path: PathBuf, source: std::io::Error },
}

/// A watched table: `schema.name` in MySQL, reachable in SQLite as `name`
/// (default schema) or `schema.name` (an attached database).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableRef {
    pub schema: String,
    pub name: String,
    /// False for tables of the URL's default schema.
    pub qualified: bool,
}

impl TableRef {
    /// The name view SQL uses for this table.
    pub fn sqlite_name(&self) -> String {
        if self.qualified { format!("{}.{}", self.schema, self.name) } else { self.name.clone() }
    }
    /// `schema`.`name`, quoted for MySQL.
    pub fn mysql_quoted(&self) -> String {
        format!("`{}`.`{}`", self.schema.replace('`', "``"), self.name.replace('`', "``"))
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// The parts of `mysql.url` we need, parsed without the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MysqlUrl {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub database: String,
}

pub fn redact_url(url: &str) -> String {
    // mysql://user:secret@host -> mysql://user:***@host
    if let Some(rest) = url.strip_prefix("mysql://")
        && let Some((userinfo, host)) = rest.rsplit_once('@')
    {
        let user = userinfo.split(':').next().unwrap_or("");
        let masked = if userinfo.contains(':') { format!("{user}:***") } else { user.to_owned() };
        return format!("mysql://{masked}@{host}");
    }
    url.to_owned()
}

impl MysqlConfig {
    pub fn parse_url(&self) -> Result<MysqlUrl, ConfigProblem> {
        let bad = |expected: &str| ConfigProblem {
            key: "mysql.url".into(),
            found: format!("{:?}", redact_url(&self.url)),
            expected: expected.into(),
        };
        let rest = self
            .url
            .strip_prefix("mysql://")
            .ok_or_else(|| bad("a URL starting with mysql://, e.g. mysql://tailcache:secret@127.0.0.1:3306/appdb"))?;
        let (userinfo, hostpart) = rest
            .rsplit_once('@')
            .ok_or_else(|| bad("a user name before '@': mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"))?;
        let user = userinfo.split(':').next().unwrap_or("");
        if user.is_empty() {
            return Err(bad("a user name before '@': mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"));
        }
        let (hostport, db) = hostpart
            .split_once('/')
            .ok_or_else(|| bad("a default database after the host: mysql://USER@HOST[:PORT]/DATABASE"))?;
        let db = db.split('?').next().unwrap_or("");
        if db.is_empty() {
            return Err(bad("a default database after the host: mysql://USER@HOST[:PORT]/DATABASE"));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("a numeric port, e.g. 127.0.0.1:3306"))?),
            None => (hostport, 3306),
        };
        if host.is_empty() {
            return Err(bad("a host name, e.g. 127.0.0.1"));
        }
        Ok(MysqlUrl { user: percent_decode(user), host: host.to_owned(), port, database: percent_decode(db) })
    }

    /// The password from `password_file`, else `TAILCACHE_MYSQL_PASSWORD`,
    /// else the URL (`None` when there is none anywhere).
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::PasswordFile {
                key: "mysql.password_file".into(),
                path: path.clone(),
                source,
            })?;
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
        }
        if let Ok(p) = std::env::var(PASSWORD_ENV) {
            return Ok(Some(p));
        }
        let rest = self.url.strip_prefix("mysql://").unwrap_or(&self.url);
        Ok(rest.rsplit_once('@').and_then(|(userinfo, _)| userinfo.split_once(':').map(|(_, p)| percent_decode(p))))
    }

    /// What is wrong with the TLS settings (`mysql.tls*`), reading the files
    /// named to make sure they hold what they should.
    pub fn tls_problems(&self) -> Vec<ConfigProblem> {
        let mut p = Vec::new();
        let mut push =
            |key: &str, found: String, expected: String| p.push(ConfigProblem { key: key.into(), found, expected });
        let mode = self.tls;
        match (mode, &self.tls_ca_file) {
            (TlsMode::VerifyCa, None) => push(
                "mysql.tls_ca_file",
                "nothing, with mysql.tls = \"verify_ca\"".into(),
                "the PEM file of the CA that signed the server's certificate (its ssl_ca), e.g. tls_ca_file = \"/etc/mysql/ca.pem\"".into(),
            ),
            (TlsMode::Disabled | TlsMode::Preferred | TlsMode::Required, Some(path)) => push(
                "mysql.tls_ca_file",
                format!("{} with mysql.tls = \"{mode}\", which does not verify the certificate", path.display()),
                "mysql.tls = \"verify_ca\" or \"verify_identity\" to use the CA file, or no tls_ca_file".into(),
            ),
            _ => {}
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => push(
                "mysql.tls_key_file",
                "nothing, with mysql.tls_cert_file set".into(),
                "both tls_cert_file and tls_key_file (the client certificate's private key), or neither".into(),
            ),
            (None, Some(_)) => push(
                "mysql.tls_cert_file",
                "nothing, with mysql.tls_key_file set".into(),
                "both tls_cert_file (the client certificate) and tls_key_file, or neither".into(),
            ),
            (Some(_), Some(_)) if mode == TlsMode::Disabled => push(
                "mysql.tls_cert_file",
                "a client certificate with mysql.tls = \"disabled\"".into(),
                "mysql.tls other than \"disabled\" to present it, or no tls_cert_file/tls_key_file".into(),
            ),
            _ => {}
        }
        let files = [
            (
                "mysql.tls_ca_file",
                &self.tls_ca_file,
                "-----BEGIN CERTIFICATE-----",
                "a PEM file with at least one CERTIFICATE",
            ),
            (
                "mysql.tls_cert_file",
                &self.tls_cert_file,
                "-----BEGIN CERTIFICATE-----",
                "a PEM file with the client CERTIFICATE",
            ),
            ("mysql.tls_key_file", &self.tls_key_file, "PRIVATE KEY-----", "a PEM file with the client's PRIVATE KEY"),
        ];
        for (key, path, marker, what) in files {
            let Some(path) = path else { continue };
            match std::fs::read(path) {
                Err(e) => {
                    push(key, format!("{} unreadable: {e}", path.display()), format!("{what}, readable by tailcache"))
                }
                Ok(bytes) if !String::from_utf8_lossy(&bytes).contains(marker) => {
                    push(key, format!("{} without {marker}", path.display()), what.into())
                }
                Ok(_) => {}
            }
        }
        p
    }

    /// Watched tables, resolved against the URL's default schema.
    pub fn table_refs(&self) -> Vec<TableRef> {
        let default_db = self.parse_url().map(|u| u.database).unwrap_or_default();
        self.tables
            .iter()
            .map(|t| match t.split_once('.') {
                Some((s, n)) if s != default_db => TableRef { schema: s.into(), name: n.into(), qualified: true },
                Some((_, n)) => TableRef { schema: default_db.clone(), name: n.into(), qualified: false },
                None => TableRef { schema: default_db.clone(), name: t.clone(), qualified: false },
            })
            .collect()
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// A parsed key template: literal text and `{column}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    Column(String),
}

/// Parses `app:{name}`; `{{` and `}}` are literal braces.
pub fn parse_key_template(t: &str) -> Result<Vec<TemplatePart>, String> {
    let mut parts = Vec::new();
    let mut lit = String::new();
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some('{') | None => {
                            return Err(format!("unclosed placeholder '{{{name}' (write {{{{ for a literal brace)"));
                        }
                        Some(c) => name.push(c),
                    }
                }
                if name.trim().is_empty() {
                    return Err("empty placeholder {}".into());
                }
                if !lit.is_empty() {
                    parts.push(TemplatePart::Literal(std::mem::take(&mut lit)));
                }
                parts.push(TemplatePart::Column(name));
            }
            '}' => return Err("unmatched '}' (write }} for a literal brace)".into()),
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        parts.push(TemplatePart::Literal(lit));
    }
    Ok(parts)
}

fn has_bad_key_chars(s: &str) -> bool {
    s.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let cfg = Self::from_toml(&text).map_err(|message| ConfigError::Parse { path: path.into(), message })?;
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid { path: path.into(), problems });
        }
        Ok(cfg)
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Every problem found, without touching any server.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut p = Vec::new();
        let mut push = |key: String, found: String, expected: &str| {
            p.push(ConfigProblem { key, found, expected: expected.into() })
        };
        let m = &self.mysql;
        let url = m.parse_url();
        if let Err(e) = &url {
            push(e.key.clone(), e.found.clone(), &e.expected);
        }
        if m.server_id == 0 {
            push("mysql.server_id".into(), "0".into(), "a non-zero id unique among the server's replicas, e.g. 4001");
        }
        if m.tables.is_empty() {
            push("mysql.tables".into(), "[]".into(), "at least one table to watch, e.g. [\"application\"]");
        }
        let refs = m.table_refs();
        for (i, t) in m.tables.iter().enumerate() {
            let ok = match t.split_once('.') {
                Some((s, n)) => is_identifier(s) && is_identifier(n),
                None => is_identifier(t),
            };
            if !ok {
                push(
                    format!("mysql.tables[{i}]"),
                    format!("{t:?}"),
                    "a table name like \"application\" or \"otherdb.table\" (letters, digits, _ and $)",
                );
            } else if refs[..i].contains(&refs[i]) {
                push(format!("mysql.tables[{i}]"), format!("{t:?} a second time"), "each table listed once");
            }
        }
        if !(m.heartbeat_secs > 0.0 && m.heartbeat_secs <= 3600.0) {
            push("mysql.heartbeat_secs".into(), m.heartbeat_secs.to_string(), "a number of seconds in (0, 3600]");
        }
        if !(m.connect_timeout_secs > 0.0 && m.connect_timeout_secs <= 3600.0) {
            push(
                "mysql.connect_timeout_secs".into(),
                m.connect_timeout_secs.to_string(),
                "a number of seconds in (0, 3600]",
            );
        }
        if !(m.snapshot_lock_wait > 0.0 && m.snapshot_lock_wait <= 3600.0) {
            push(
                "mysql.snapshot_lock_wait".into(),
                m.snapshot_lock_wait.to_string(),
                "a wait in (0, 3600] seconds, e.g. 5 or \"5s\" (the default)",
            );
        }
        for problem in m.tls_problems() {
            p.push(problem);
        }
        let mut push = |key: String, found: String, expected: &str| {
            p.push(ConfigProblem { key, found, expected: expected.into() })
        };
        if self.state.path.trim().is_empty() {
            push(
                "state.path".into(),
                "\"\"".into(),
                "a file path such as /var/lib/tailcache/state.db, or \":memory:\"",
            );
        }
        if let Some(mc) = &self.memcached {
            if mc.servers.is_empty() {
                push("memcached.servers".into(), "[]".into(), "at least one HOST:PORT, e.g. [\"127.0.0.1:11211\"]");
            }
            for (i, s) in mc.servers.iter().enumerate() {
                let ok = s
                    .rsplit_once(':')
                    .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok {
                    push(format!("memcached.servers[{i}]"), format!("{s:?}"), "HOST:PORT, e.g. \"127.0.0.1:11211\"");
                }
            }
            if has_bad_key_chars(&mc.key_prefix) || mc.key_prefix.len() > 200 {
                push(
                    "memcached.key_prefix".into(),
                    format!("{:?}", mc.key_prefix),
                    "at most 200 bytes without whitespace or control characters",
                );
            }
            if mc.max_item_size < 1024 {
                push(
                    "memcached.max_item_size".into(),
                    mc.max_item_size.to_string(),
                    "the server's item size limit in bytes (memcached -I), 1048576 by default",
                );
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            if let Some(why) = exptime_problem(mc.exptime, now) {
                push(
                    "memcached.exptime".into(),
                    why,
                    "seconds from each write: 0 (never expires) up to the time left until 2038-01-19",
                );
            }
            if mc.coalesce_ms > 1000 {
                push("memcached.coalesce_ms".into(), mc.coalesce_ms.to_string(), "a few milliseconds (0..=1000)");
            }
            if mc.timeout_ms == 0 {
                push("memcached.timeout_ms".into(), "0".into(), "a timeout in milliseconds, e.g. 1000");
            }
            if !mc.weights.is_empty() {
                use Distribution as D;
                if !matches!(mc.distribution, D::Modula | D::KetamaWeighted) {
                    push(
                        "memcached.weights".into(),
                        format!("{:?} with distribution = \"{}\"", mc.weights, mc.distribution),
                        "weights only with distribution = \"modula\" (python-memcached) or \"ketama_weighted\" (pylibmc), whose clients weigh servers; remove them otherwise",
                    );
                } else if mc.weights.len() != mc.servers.len() || mc.weights.contains(&0) {
                    push(
                        "memcached.weights".into(),
                        format!("{:?} for {} server(s)", mc.weights, mc.servers.len()),
                        "one weight of at least 1 per server, in the order of memcached.servers",
                    );
                } else if mc.weights.iter().map(|&w| u64::from(w)).sum::<u64>() > 1_000_000 {
                    push("memcached.weights".into(), format!("{:?}", mc.weights), "weights summing to at most 1000000");
                }
            }
        } else if !self.views.is_empty() {
            push(
                "memcached".into(),
                "no [memcached] section".into(),
                "a [memcached] section with servers = [\"HOST:PORT\"] to publish the views to",
            );
        }
        for (i, v) in self.views.iter().enumerate() {
            let key = |k: &str| format!("views[{i}].{k} (view {:?})", v.name);
            if v.name.trim().is_empty() || has_bad_key_chars(&v.name) {
                push(format!("views[{i}].name"), format!("{:?}", v.name), "a non-empty name without whitespace");
            } else if self.views[..i].iter().any(|o| o.name == v.name) {
                push(key("name"), format!("{:?} used twice", v.name), "unique view names");
            }
            if v.query.trim().is_empty() {
                push(key("query"), "an empty query".into(), "a SELECT over the watched tables");
            }
            match parse_key_template(&v.key) {
                Err(e) => push(key("key"), format!("{:?}: {e}", v.key), "a template like \"app:{name}\""),
                Ok(parts) => {
                    let placeholders = parts.iter().filter(|p| matches!(p, TemplatePart::Column(_))).count();
                    match v.shape {
                        Shape::Row if placeholders == 0 => push(
                            key("key"),
                            format!("{:?} without a placeholder", v.key),
                            "shape = \"row\" writes one entry per row, so the key needs a {column}, e.g. \"app:{name}\"; use shape = \"list\" or \"map\" for one entry",
                        ),
                        Shape::List | Shape::Map if placeholders > 0 => push(
                            key("key"),
                            format!("{:?} with a placeholder", v.key),
                            "a fixed key: shape = \"list\"/\"map\" writes a single entry",
                        ),
                        _ => {}
                    }
                    if v.key.is_empty() || has_bad_key_chars(&v.key) {
                        push(
                            key("key"),
                            format!("{:?}", v.key),
                            "a key template without whitespace or control characters",
                        );
                    }
                }
            }
            match (v.shape, &v.map_key) {
                (Shape::Map, None) => {
                    push(key("map_key"), "nothing".into(), "map_key = \"<column>\" with shape = \"map\"")
                }
                (Shape::Row | Shape::List, Some(_)) => push(
                    key("map_key"),
                    "map_key with a shape other than \"map\"".into(),
                    "map_key only with shape = \"map\"",
                ),
                _ => {}
            }
        }
        if let Err(problem) = self.admin.addr() {
            p.push(problem);
        }
        let mut push = |key: String, found: String, expected: &str| {
            p.push(ConfigProblem { key, found, expected: expected.into() })
        };
        if self.resync.interval_secs > 0 && self.resync.interval_secs < 10 {
            push(
                "resync.interval_secs".into(),
                self.resync.interval_secs.to_string(),
                "0 (disabled) or at least 10 seconds; 600 by default",
            );
        }
        if self.inspect.keys_per_second > MAX_INSPECT_RATE {
            push(
                "inspect.keys_per_second".into(),
                self.inspect.keys_per_second.to_string(),
                "0 (disabled) up to 100000 keys per second; 50 by default",
            );
        }
        p
    }
}

/// Relative exptimes above this many seconds (30 days) are read by
/// memcached as absolute unix times; the sink sends `now + exptime` then.
pub const MAX_RELATIVE_EXPTIME: u32 = 30 * 24 * 60 * 60;

/// Why `memcached.exptime` (seconds from the write, 0 = never expires)
/// cannot be sent, if it cannot: above 30 days the sink sends the absolute
/// time `now + exptime`, which memcached parses as a signed 32-bit unix
/// time, so it must not pass 2038-01-19 (`i32::MAX`). A value meant as an
/// absolute unix time (memcached's own convention) lands there too: it is
/// either beyond that limit or, read as an absolute time, in the past.
pub fn exptime_problem(exptime: u32, now_unix: u64) -> Option<String> {
    if exptime <= MAX_RELATIVE_EXPTIME {
        return None;
    }
    let at = now_unix.saturating_add(u64::from(exptime));
    if at <= i32::MAX as u64 {
        return None;
    }
    let hint = if u64::from(exptime) <= now_unix {
        format!(
            "; as an absolute unix time (memcached's convention above 30 days) it would be in the past, {} s ago",
            now_unix - u64::from(exptime)
        )
    } else {
        String::new()
    };
    Some(format!(
        "{exptime} s from now is unix time {at}, beyond {} (2038-01-19), the latest memcached accepts{hint}",
        i32::MAX
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[mysql]
url = "mysql://tailcache:secret@127.0.0.1:3306/appdb"
server_id = 4001
tables = ["application", "otherdb.t"]
[state]
path = ":memory:"
"#;

    #[test]
    fn minimal_config_is_valid() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        let refs = c.mysql.table_refs();
        assert_eq!(refs[0].sqlite_name(), "application");
        assert_eq!(refs[0].schema, "appdb");
        assert_eq!(refs[1].sqlite_name(), "otherdb.t");
        assert_eq!(c.resync.interval_secs, 600);
    }

    #[test]
    fn inspect_rate_defaults_and_bounds() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.inspect.keys_per_second, 50);
        let c = Config::from_toml(&format!("{MINIMAL}[inspect]\nkeys_per_second = 0\n")).unwrap();
        assert_eq!(c.inspect.keys_per_second, 0);
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        let p = Config::from_toml(&format!("{MINIMAL}[inspect]\nkeys_per_second = 1000000\n")).unwrap().validate();
        assert!(p.iter().any(|p| p.key == "inspect.keys_per_second" && p.found == "1000000"), "{p:?}");
        for bad in ["-1", "2.5", "\"fast\""] {
            let e = Config::from_toml(&format!("{MINIMAL}[inspect]\nkeys_per_second = {bad}\n")).unwrap_err();
            assert!(e.contains("keys_per_second"), "{bad}: {e}");
        }
        let e = Config::from_toml(&format!("{MINIMAL}[inspect]\nrate = 5\n")).unwrap_err();
        assert!(e.contains("rate"), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = Config::from_toml(&MINIMAL.replace("server_id", "serverid")).unwrap_err();
        assert!(e.contains("serverid"), "{e}");
    }

    #[test]
    fn bad_table_is_named_by_index() {
        let c = Config::from_toml(&MINIMAL.replace("\"otherdb.t\"", "\"bad name\"")).unwrap_err_or_problems();
        assert!(c.iter().any(|p| p.key == "mysql.tables[1]" && p.found.contains("bad name")), "{c:?}");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = Config::from_toml(MINIMAL).unwrap();
        let dbg = format!("{:?}", c);
        assert!(!dbg.contains("secret"), "{dbg}");
        assert_eq!(c.mysql.password().unwrap().as_deref(), Some("secret"));
    }

    #[test]
    fn url_parsing() {
        let mut c = Config::from_toml(MINIMAL).unwrap();
        let u = c.mysql.parse_url().unwrap();
        assert_eq!(
            (u.user.as_str(), u.host.as_str(), u.port, u.database.as_str()),
            ("tailcache", "127.0.0.1", 3306, "appdb")
        );
        c.mysql.url = "mysql://u@h/".into();
        assert_eq!(c.mysql.parse_url().unwrap_err().key, "mysql.url");
        c.mysql.url = "postgres://u@h/db".into();
        assert!(c.mysql.parse_url().is_err());
    }

    #[test]
    fn templates() {
        assert_eq!(
            parse_key_template("a:{x}:{{y}}").unwrap(),
            vec![
                TemplatePart::Literal("a:".into()),
                TemplatePart::Column("x".into()),
                TemplatePart::Literal(":{y}".into())
            ]
        );
        assert!(parse_key_template("a:{x").is_err());
        assert!(parse_key_template("a:}").is_err());
    }

    #[test]
    fn view_shape_rules() {
        let text = format!(
            "{MINIMAL}\n[memcached]\nservers=[\"127.0.0.1:11211\"]\n[[views]]\nname=\"a\"\nkey=\"apps\"\nquery=\"select 1\"\n[[views]]\nname=\"a\"\nkey=\"l:{{id}}\"\nshape=\"list\"\nquery=\"select 1 as id\"\n"
        );
        let p = Config::from_toml(&text).unwrap().validate();
        assert!(
            p.iter().any(|p| p.key.starts_with("views[0].key") && p.found.contains("without a placeholder")),
            "{p:?}"
        );
        assert!(p.iter().any(|p| p.key.starts_with("views[1].name")), "{p:?}");
        assert!(p.iter().any(|p| p.key.starts_with("views[1].key") && p.found.contains("with a placeholder")), "{p:?}");
    }

    #[test]
    fn tls_settings() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.mysql.tls, TlsMode::Preferred);
        assert_eq!(c.mysql.snapshot_lock_wait, 5.0);
        let with = |extra: &str| Config::from_toml(&MINIMAL.replace("[state]", &format!("{extra}\n[state]")));
        assert_eq!(with("tls = \"verify_identity\"").unwrap().mysql.tls, TlsMode::VerifyIdentity);
        assert!(with("tls = \"verify_identity\"").unwrap().validate().is_empty());
        assert!(with("tls = \"yes\"").unwrap_err().contains("tls"));
        let p = with("tls = \"verify_ca\"").unwrap().validate();
        assert!(p.iter().any(|p| p.key == "mysql.tls_ca_file" && p.found.contains("verify_ca")), "{p:?}");
        let p = with("tls = \"required\"\ntls_key_file = \"/k.pem\"").unwrap().validate();
        assert!(p.iter().any(|p| p.key == "mysql.tls_cert_file"), "{p:?}");
        assert!(p.iter().any(|p| p.key == "mysql.tls_key_file" && p.found.contains("/k.pem")), "{p:?}");
        assert_eq!(parse_duration_secs("250ms"), Some(0.25));
        assert_eq!(parse_duration_secs("2"), Some(2.0));
        assert_eq!(parse_duration_secs("2h"), None);
    }

    #[test]
    fn admin_listen() {
        let c = Config::from_toml(MINIMAL).unwrap();
        assert_eq!(c.admin.listen, DEFAULT_ADMIN_LISTEN);
        assert!(c.admin.addr().unwrap().unwrap().ip().is_loopback());
        let with = |l: &str| Config::from_toml(&format!("{MINIMAL}\n[admin]\nlisten = {l:?}\n")).unwrap();
        assert_eq!(with("").admin.addr().unwrap(), None);
        assert!(with("").validate().is_empty());
        assert_eq!(with("localhost:9300").admin.addr().unwrap().unwrap().to_string(), "127.0.0.1:9300");
        assert_eq!(with("[::1]:9300").admin.addr().unwrap().unwrap().to_string(), "[::1]:9300");
        // Written out explicitly: allowed.
        assert!(with("0.0.0.0:9187").validate().is_empty());
        for bad in ["9187", "127.0.0.1", "127.0.0.1:0", "example.com:9187", "127.0.0.1:99999"] {
            let p = with(bad).validate();
            assert!(p.iter().any(|p| p.key == "admin.listen" && p.found.contains(bad)), "{bad}: {p:?}");
        }
        let e = Config::from_toml(&format!("{MINIMAL}\n[admin]\nport = 1\n")).unwrap_err();
        assert!(e.contains("port"), "{e}");
    }

    trait UnwrapProblems {
        fn unwrap_err_or_problems(self) -> Vec<ConfigProblem>;
    }
    impl UnwrapProblems for Result<Config, String> {
        fn unwrap_err_or_problems(self) -> Vec<ConfigProblem> {
            self.unwrap().validate()
        }
    }
}
