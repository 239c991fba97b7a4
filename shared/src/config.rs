//! `config.yaml`: the settings of a CountApp cluster, read and validated in one place.
//!
//! The file is parsed into a generic YAML value first and each key is then checked by hand, so
//! that every error can name the key it is about (`workers[2]: ...`, `max_key_bytes: ...`).
//! A file is either wholly valid or rejected: the coordinator keeps its last good [`Config`]
//! when an edit breaks the file, so a half-applied file must never exist.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

/// Default directory of the embedded store, relative to the config file.
pub const DEFAULT_DATABASE: &str = "db/";
/// Default directory of the per-worker log files, relative to the config file.
pub const DEFAULT_WORKER_LOGS: &str = "logs/";
/// Default interval between flushes of pending items into the per-tenant files.
pub const DEFAULT_WORKER_PERSIST: Duration = Duration::from_secs(5);
/// Default interval between health checks (and re-reads, if watching the file fails).
pub const DEFAULT_CONFIG_CHECK: Duration = Duration::from_secs(5);
/// Default address of the coordinator: loopback only, so nothing is exposed unless asked for.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5000);
/// Default largest request body: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Default longest id or tenant, in bytes.
pub const DEFAULT_MAX_KEY_BYTES: usize = 256;
/// Default cap on items a worker's log holds unflushed (while its store is unreachable) before
/// ingest answers 503: about a gigabyte of log.
pub const DEFAULT_MAX_PENDING_ITEMS: u64 = 50_000_000;

/// Every key the file may hold, in the order the README documents them; anything else is
/// rejected so that a typo (`worker_persit`) is reported instead of silently ignored.
const KEYS: [&str; 13] = [
    "workers",
    "database",
    "worker_logs",
    "worker_persist",
    "config_check",
    "listen",
    "fsync",
    "max_body_bytes",
    "max_key_bytes",
    "store",
    "redis_url",
    "redis_cluster",
    "max_pending_items",
];

/// The validated contents of `config.yaml`.
///
/// Everything here has been checked at load time, so users of a `Config` never re-validate:
/// paths are already resolved against the config file's directory, durations are positive and
/// worker URLs are well-formed and distinct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The workers, in file order. Local ones are spawned by the coordinator, the others are
    /// only health-checked and routed to.
    pub workers: Vec<WorkerUrl>,
    /// Directory of the embedded store.
    pub database: PathBuf,
    /// Directory of the per-worker log files.
    pub worker_logs: PathBuf,
    /// Interval between flushes of pending items into the per-tenant files.
    pub worker_persist: Duration,
    /// Interval between health checks, and between re-reads of the file if watching it fails.
    pub config_check: Duration,
    /// The coordinator's listening address.
    pub listen: SocketAddr,
    /// When the write-ahead log is fsynced.
    pub fsync: FsyncPolicy,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Longest id or tenant accepted, in bytes.
    pub max_key_bytes: usize,
    /// Where the workers keep the tenants' id sets.
    pub store: StoreBackend,
    /// Items a worker's log may hold unflushed before ingest answers 503.
    pub max_pending_items: u64,
}

/// Where the workers keep the tenants' id sets; the write-ahead log is local either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// Per-tenant JSON files under `database`, shared by the workers of one machine.
    Json,
    /// One Redis set per tenant, shared by workers on any machine.
    Redis {
        /// `redis://host:port`: the server, or one node of a cluster.
        url: String,
        /// Whether `url` is a node of a Redis Cluster.
        cluster: bool,
    },
}

impl Config {
    /// Reads and validates the config file at `path`.
    ///
    /// Relative paths in the file resolve against the file's own directory, so the cluster
    /// finds the same store whatever directory it is started from.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_path_buf(), error })?;
        let base_dir = path.parent().unwrap_or(Path::new(""));
        Config::from_yaml_str(&text, base_dir)
    }

    /// Parses and validates config text, resolving relative paths against `base_dir`.
    ///
    /// This is [`Config::load`] without the file system, for tests and for callers that
    /// already hold the text.
    pub fn from_yaml_str(text: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let entries = match serde_yaml::from_str::<Value>(text)? {
            // An empty file is an empty mapping; it then fails for want of `workers`.
            Value::Null => serde_yaml::Mapping::new(),
            Value::Mapping(entries) => entries,
            other => {
                return Err(ConfigError::NotAMapping { found: describe(&other) });
            }
        };

        let mut config = Config {
            workers: Vec::new(),
            database: base_dir.join(DEFAULT_DATABASE),
            worker_logs: base_dir.join(DEFAULT_WORKER_LOGS),
            worker_persist: DEFAULT_WORKER_PERSIST,
            config_check: DEFAULT_CONFIG_CHECK,
            listen: DEFAULT_LISTEN,
            fsync: FsyncPolicy::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            store: StoreBackend::Json,
            max_pending_items: DEFAULT_MAX_PENDING_ITEMS,
        };
        let mut saw_workers = false;
        let (mut store, mut redis_url, mut redis_cluster) = (None, None, false);
        // The YAML parser already rejects a key given twice, so each arm runs at most once.
        for (key, value) in &entries {
            let Some(key) = key.as_str() else {
                return Err(invalid(describe(key), unknown_key_message()));
            };
            match key {
                "workers" => {
                    config.workers = parse_workers(value)?;
                    saw_workers = true;
                }
                "database" => config.database = parse_dir(key, value, base_dir)?,
                "worker_logs" => config.worker_logs = parse_dir(key, value, base_dir)?,
                "worker_persist" => config.worker_persist = parse_seconds(key, value)?,
                "config_check" => config.config_check = parse_seconds(key, value)?,
                "listen" => config.listen = parse_listen(value)?,
                "fsync" => config.fsync = parse_fsync(value)?,
                "max_body_bytes" => config.max_body_bytes = parse_byte_count(key, value)?,
                "max_key_bytes" => config.max_key_bytes = parse_byte_count(key, value)?,
                "store" => store = Some(parse_store(value)?),
                "redis_url" => redis_url = Some(parse_redis_url(value)?),
                "redis_cluster" => {
                    redis_cluster = value
                        .as_bool()
                        .ok_or_else(|| invalid(key, format!("must be true or false, got {}", describe(value))))?
                }
                "max_pending_items" => {
                    config.max_pending_items = value.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                        invalid(key, format!("must be a positive whole number of items, got {}", describe(value)))
                    })?
                }
                other => return Err(invalid(other, unknown_key_message())),
            }
        }
        config.store = match (store, redis_url) {
            (Some("redis"), Some(url)) => StoreBackend::Redis { url, cluster: redis_cluster },
            (Some("redis"), None) => return Err(invalid("redis_url", "is required with store: redis")),
            (_, Some(_)) => return Err(invalid("redis_url", "is only used with store: redis")),
            _ if redis_cluster => return Err(invalid("redis_cluster", "is only used with store: redis")),
            _ => StoreBackend::Json,
        };
        if !saw_workers {
            return Err(invalid("workers", "is missing; it lists the worker URLs, like http://localhost:5001"));
        }
        // A local worker on the coordinator's own address could never bind it.
        let clash = config.workers.iter().position(|w| w.is_local() && w.bind_addr() == Some(config.listen));
        if let Some(index) = clash {
            let message = format!("{} is the coordinator's own listen address", config.workers[index]);
            return Err(invalid(format!("workers[{index}]"), message));
        }
        Ok(config)
    }
}

/// Why a config file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read: it is missing, unreadable, or not UTF-8.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The path that was tried.
        path: PathBuf,
        /// What the OS said.
        error: io::Error,
    },
    /// The text is not YAML at all (or gives a key twice).
    #[error("config is not valid YAML: {0}")]
    Yaml(serde_yaml::Error),
    /// The YAML document is not a mapping of keys to values.
    #[error("config must be a mapping of keys to values (like `workers: [...]`), got {found}")]
    NotAMapping {
        /// What the document was instead.
        found: String,
    },
    /// One key is unknown, missing or has a bad value; the first one found is reported.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, with an index for list entries: `workers[2]`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

// By hand rather than `#[from]`, which would also make the YAML error the `source()`: its text
// is already in the message, and error reports would print it twice.
impl From<serde_yaml::Error> for ConfigError {
    fn from(error: serde_yaml::Error) -> Self {
        ConfigError::Yaml(error)
    }
}

/// When a worker fsyncs its write-ahead log (see "Durability" in the README).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Fsync before every acknowledgement; concurrent requests share one fsync.
    Always,
    /// Write before the acknowledgement, fsync at least once a second: survives any process
    /// crash and loses at most about a second to a power cut.
    #[default]
    EverySec,
    /// Write before the acknowledgement and leave fsync to the OS.
    Never,
}

/// A worker's URL, such as `http://localhost:5001`: the worker's identity in the cluster.
///
/// Only `http://HOST:PORT` is accepted (an optional trailing `/` aside), so that two spellings
/// of one worker compare equal and the coordinator can diff worker sets on reload. It orders by
/// its normalized text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerUrl {
    /// `http://HOST:PORT`, the host as the `url` crate normalizes it (lower case, IPv6 in
    /// brackets). Kept first so that the derived order is the order of the text.
    normalized: String,
    host: url::Host<String>,
    port: u16,
}

impl WorkerUrl {
    /// The host as written in a URL: a lower-case domain, an IPv4 address, or an IPv6 address
    /// in brackets (`[::1]`), following [`url::Url::host_str`].
    pub fn host(&self) -> &str {
        // `normalized` is "http://" + host + ":" + port.
        let authority = &self.normalized["http://".len()..];
        &authority[..authority.rfind(':').expect("a normalized worker URL has a port")]
    }

    /// The worker's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the coordinator spawns and supervises this worker: its host is `127.0.0.1`,
    /// `localhost` or `::1`. Any other host is run by its owner and only health-checked and
    /// routed to, even another loopback address such as 127.0.0.2, which is how a second
    /// machine is stood in for on one host.
    pub fn is_local(&self) -> bool {
        match &self.host {
            url::Host::Domain(domain) => domain == "localhost",
            url::Host::Ipv4(ip) => *ip == Ipv4Addr::LOCALHOST,
            url::Host::Ipv6(ip) => ip.is_loopback(),
        }
    }

    /// The address the worker should listen on: the host of its URL, never all interfaces.
    ///
    /// `localhost` maps to 127.0.0.1. `None` for any other domain name, which only a DNS
    /// lookup can turn into an address.
    pub fn bind_addr(&self) -> Option<SocketAddr> {
        let ip = match &self.host {
            url::Host::Domain(domain) if domain == "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            url::Host::Domain(_) => return None,
            url::Host::Ipv4(ip) => IpAddr::V4(*ip),
            url::Host::Ipv6(ip) => IpAddr::V6(*ip),
        };
        Some(SocketAddr::new(ip, self.port))
    }

    /// The normalized URL, `http://HOST:PORT` without a trailing slash, ready to have a path
    /// such as `/items` appended.
    pub fn as_str(&self) -> &str {
        &self.normalized
    }
}

impl fmt::Display for WorkerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.normalized)
    }
}

impl FromStr for WorkerUrl {
    type Err = WorkerUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let url = url::Url::parse(text)?;
        if url.scheme() != "http" {
            return Err(WorkerUrlError::Scheme(url.scheme().to_owned()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(WorkerUrlError::UserInfo);
        }
        if url.path() != "/" {
            return Err(WorkerUrlError::Path(url.path().to_owned()));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(WorkerUrlError::QueryOrFragment);
        }
        // The url crate refuses an http URL without a host, so these cannot fail.
        let host = url.host().expect("http URLs have a host").to_owned();
        let host_str = url.host_str().expect("http URLs have a host");
        let unspecified = match &host {
            url::Host::Ipv4(ip) => ip.is_unspecified(),
            url::Host::Ipv6(ip) => ip.is_unspecified(),
            url::Host::Domain(_) => false,
        };
        if unspecified {
            return Err(WorkerUrlError::UnspecifiedHost);
        }
        // The url crate drops a port equal to the scheme's default, so `:80` must be looked
        // for in the text itself.
        let port = match url.port() {
            Some(port) => port,
            None if has_explicit_port(text) => 80,
            None => return Err(WorkerUrlError::MissingPort),
        };
        if port == 0 {
            return Err(WorkerUrlError::PortZero);
        }
        Ok(WorkerUrl { normalized: format!("http://{host_str}:{port}"), host, port })
    }
}

/// Whether the authority of an `http://` URL text ends in `:PORT`; IPv6 hosts contain colons
/// of their own, so only a colon after the closing bracket counts.
fn has_explicit_port(text: &str) -> bool {
    let rest = text.trim().split_once("://").map_or("", |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let after_host = authority.rfind(']').map_or(authority, |end| &authority[end..]);
    after_host.contains(':')
}

/// Why a string is not a usable worker URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerUrlError {
    /// Not a URL at all.
    #[error("not a valid URL ({0}); write it like http://localhost:5001")]
    Parse(#[from] url::ParseError),
    /// Workers speak plain HTTP only.
    #[error("scheme must be http, got {0}")]
    Scheme(String),
    /// A worker is addressed by host and port; credentials have no place in its URL.
    #[error("must not contain a user name or password")]
    UserInfo,
    /// The coordinator appends its own paths (`/items`, `/health`), so the URL must not have one.
    #[error("must not have a path, got {0}")]
    Path(String),
    /// As with a path, the coordinator builds its own requests.
    #[error("must not have a query or fragment")]
    QueryOrFragment,
    /// 0.0.0.0 and :: are listening addresses, not addresses a worker can be reached at.
    #[error("host must be an address the worker can be reached at, not 0.0.0.0 or ::")]
    UnspecifiedHost,
    /// Worker ports are part of the worker's identity, so they are never left implicit.
    #[error("must give an explicit port, like http://localhost:5001")]
    MissingPort,
    /// Port 0 means "any port" to a listener, which the coordinator could not route to.
    #[error("port must not be 0")]
    PortZero,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

fn unknown_key_message() -> String {
    format!("unknown key (the known keys are {})", KEYS.join(", "))
}

/// A short description of a YAML value for error messages: scalars as written, strings quoted,
/// collections by kind only (they can be long).
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(tagged) => format!("a value tagged {}", tagged.tag),
    }
}

fn parse_workers(value: &Value) -> Result<Vec<WorkerUrl>, ConfigError> {
    let Value::Sequence(entries) = value else {
        return Err(invalid("workers", format!("must be a list of worker URLs, got {}", describe(value))));
    };
    if entries.is_empty() {
        return Err(invalid("workers", "must list at least one worker URL"));
    }
    let mut workers: Vec<WorkerUrl> = Vec::with_capacity(entries.len());
    // Two local spellings of one address (localhost and 127.0.0.1) would make two spawned
    // workers fight over one port, so local workers are also compared by bind address.
    let mut local_addrs: HashMap<SocketAddr, usize> = HashMap::new();
    for (index, entry) in entries.iter().enumerate() {
        let key = format!("workers[{index}]");
        let Value::String(text) = entry else {
            return Err(invalid(key, format!("must be a URL string, got {}", describe(entry))));
        };
        let worker: WorkerUrl = text.parse().map_err(|err| invalid(&key, format!("{text:?}: {err}")))?;
        if let Some(first) = workers.iter().position(|seen| *seen == worker) {
            return Err(invalid(key, format!("{worker} is listed twice (also workers[{first}])")));
        }
        if let Some(addr) = worker.bind_addr().filter(|_| worker.is_local())
            && let Some(first) = local_addrs.insert(addr, index)
        {
            return Err(invalid(
                key,
                format!("{worker} is the same local address as workers[{first}] ({})", workers[first]),
            ));
        }
        workers.push(worker);
    }
    Ok(workers)
}

fn parse_dir(key: &str, value: &Value, base_dir: &Path) -> Result<PathBuf, ConfigError> {
    match value {
        Value::String(dir) if !dir.is_empty() => Ok(base_dir.join(dir)),
        _ => Err(invalid(key, format!("must be a directory path, got {}", describe(value)))),
    }
}

fn parse_seconds(key: &str, value: &Value) -> Result<Duration, ConfigError> {
    let bad = || invalid(key, format!("must be a positive number of seconds, got {}", describe(value)));
    let Value::Number(n) = value else {
        return Err(bad());
    };
    let seconds = n.as_f64().ok_or_else(bad)?;
    // Sub-nanosecond values round to zero, and zero would make the timers spin.
    match Duration::try_from_secs_f64(seconds) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(bad()),
    }
}

fn parse_listen(value: &Value) -> Result<SocketAddr, ConfigError> {
    let bad = || invalid("listen", format!("must be an address like 127.0.0.1:5000, got {}", describe(value)));
    let Value::String(text) = value else {
        return Err(bad());
    };
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    // Worker URLs accept `localhost`, so the coordinator's address does too.
    let port = text.strip_prefix("localhost:").ok_or_else(bad)?.parse::<u16>().map_err(|_| bad())?;
    Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
}

fn parse_fsync(value: &Value) -> Result<FsyncPolicy, ConfigError> {
    FsyncPolicy::deserialize(value)
        .map_err(|_| invalid("fsync", format!("must be one of always, everysec, never, got {}", describe(value))))
}

fn parse_store(value: &Value) -> Result<&'static str, ConfigError> {
    match value.as_str() {
        Some("json") => Ok("json"),
        Some("redis") => Ok("redis"),
        _ => Err(invalid("store", format!("must be json or redis, got {}", describe(value)))),
    }
}

fn parse_redis_url(value: &Value) -> Result<String, ConfigError> {
    match value.as_str() {
        Some(url) if url.starts_with("redis://") && url.len() > "redis://".len() => Ok(url.to_owned()),
        _ => Err(invalid("redis_url", format!("must be a URL like redis://127.0.0.1:6379, got {}", describe(value)))),
    }
}

fn parse_byte_count(key: &str, value: &Value) -> Result<usize, ConfigError> {
    value
        .as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| invalid(key, format!("must be a positive whole number of bytes, got {}", describe(value))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &str = "\
workers:
  - http://localhost:5001
  - http://localhost:5002
  - http://localhost:5003
  - http://localhost:5004
database: db/
worker_logs: logs/
worker_persist: 5
config_check: 5
";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_str(text, Path::new("/srv/countapp"))
    }

    /// The key and message of an `Invalid` error, failing the test on anything else.
    fn invalid_key(text: &str) -> (String, String) {
        match parse(text) {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("expected an Invalid error for {text:?}, got {other:?}"),
        }
    }

    fn url(text: &str) -> WorkerUrl {
        text.parse().unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    #[test]
    fn original_go_file_loads_unchanged() {
        let config = parse(ORIGINAL).unwrap();
        let urls: Vec<&str> = config.workers.iter().map(WorkerUrl::as_str).collect();
        assert_eq!(
            urls,
            ["http://localhost:5001", "http://localhost:5002", "http://localhost:5003", "http://localhost:5004"]
        );
        assert!(config.workers.iter().all(WorkerUrl::is_local));
        assert_eq!(config.database, Path::new("/srv/countapp/db"));
        assert_eq!(config.worker_logs, Path::new("/srv/countapp/logs"));
        assert_eq!(config.worker_persist, Duration::from_secs(5));
        assert_eq!(config.config_check, Duration::from_secs(5));
    }

    #[test]
    fn defaults_fill_every_optional_key() {
        let config = parse("workers: [http://localhost:5001]").unwrap();
        assert_eq!(config.database, Path::new("/srv/countapp/db/"));
        assert_eq!(config.worker_logs, Path::new("/srv/countapp/logs/"));
        assert_eq!(config.worker_persist, Duration::from_secs(5));
        assert_eq!(config.config_check, Duration::from_secs(5));
        assert_eq!(config.listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(config.fsync, FsyncPolicy::EverySec);
        assert_eq!(config.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(config.max_key_bytes, 256);
    }

    #[test]
    fn every_key_can_be_set() {
        let config = parse(
            "workers: [http://localhost:5001]\n\
             database: /var/lib/countapp\n\
             worker_logs: /var/log/countapp\n\
             worker_persist: 0.5\n\
             config_check: 2\n\
             listen: 0.0.0.0:8080\n\
             fsync: always\n\
             max_body_bytes: 1048576\n\
             max_key_bytes: 64\n",
        )
        .unwrap();
        assert_eq!(config.database, Path::new("/var/lib/countapp"));
        assert_eq!(config.worker_logs, Path::new("/var/log/countapp"));
        assert_eq!(config.worker_persist, Duration::from_millis(500));
        assert_eq!(config.config_check, Duration::from_secs(2));
        assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.fsync, FsyncPolicy::Always);
        assert_eq!(config.max_body_bytes, 1 << 20);
        assert_eq!(config.max_key_bytes, 64);
    }

    #[test]
    fn fsync_policies_and_listen_localhost() {
        for (text, policy) in
            [("always", FsyncPolicy::Always), ("everysec", FsyncPolicy::EverySec), ("never", FsyncPolicy::Never)]
        {
            let config = parse(&format!("workers: [http://localhost:5001]\nfsync: {text}")).unwrap();
            assert_eq!(config.fsync, policy);
        }
        let config = parse("workers: [http://localhost:5001]\nlisten: localhost:6000").unwrap();
        assert_eq!(config.listen, "127.0.0.1:6000".parse().unwrap());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let config = parse("workers: [http://localhost:5001]\ndatabase: data/store\nworker_logs: ../logs").unwrap();
        assert_eq!(config.database, Path::new("/srv/countapp/data/store"));
        assert_eq!(config.worker_logs, Path::new("/srv/countapp/../logs"));
    }

    #[test]
    fn load_reads_the_file_and_resolves_paths_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, ORIGINAL).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.database, dir.path().join("db/"));
        assert_eq!(config.worker_logs, dir.path().join("logs/"));
        assert_eq!(config.workers.len(), 4);
    }

    #[test]
    fn the_repository_config_yaml_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.yaml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.workers.len(), 4);
        assert!(config.workers.iter().all(WorkerUrl::is_local));
    }

    #[test]
    fn load_of_a_missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.yaml");
        let err = Config::load(&path).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Read { path: p, error } if *p == path && error.kind() == io::ErrorKind::NotFound)
        );
        assert!(err.to_string().contains("nope.yaml"), "{err}");
    }

    #[test]
    fn workers_is_required() {
        for text in ["", "database: db/", "workers: []", "workers: http://localhost:5001", "workers:"] {
            let (key, _) = invalid_key(text);
            assert_eq!(key, "workers", "{text:?}");
        }
        assert!(parse("database: db/").unwrap_err().to_string().starts_with("workers: is missing"));
    }

    #[test]
    fn bad_durations_name_their_key() {
        for key in ["worker_persist", "config_check"] {
            for bad in ["-1", "0", "0.0", "abc", "\"5\"", ".inf", ".nan", "[5]", "1e-12", "true", ""] {
                let (got, message) = invalid_key(&format!("workers: [http://localhost:5001]\n{key}: {bad}"));
                assert_eq!(got, key, "{bad}");
                assert!(message.starts_with("must be a positive number of seconds"), "{message}");
            }
        }
        let err = parse("workers: [http://localhost:5001]\nworker_persist: -1").unwrap_err();
        assert_eq!(err.to_string(), "worker_persist: must be a positive number of seconds, got -1");
    }

    #[test]
    fn bad_scalars_name_their_key() {
        let cases = [
            ("database: ''", "database"),
            ("database: [a]", "database"),
            ("worker_logs: 5", "worker_logs"),
            ("listen: 5000", "listen"),
            ("listen: example.com:5000", "listen"),
            ("listen: 127.0.0.1", "listen"),
            ("fsync: sometimes", "fsync"),
            ("fsync: Always", "fsync"),
            ("fsync: 1", "fsync"),
            ("max_body_bytes: 0", "max_body_bytes"),
            ("max_body_bytes: -5", "max_body_bytes"),
            ("max_body_bytes: 1.5", "max_body_bytes"),
            ("max_body_bytes: 16 MiB", "max_body_bytes"),
            ("max_key_bytes: 0", "max_key_bytes"),
            ("max_key_bytes: '256'", "max_key_bytes"),
        ];
        for (line, key) in cases {
            let (got, _) = invalid_key(&format!("workers: [http://localhost:5001]\n{line}"));
            assert_eq!(got, key, "{line}");
        }
        let err = parse("workers: [http://localhost:5001]\nfsync: sometimes").unwrap_err();
        assert_eq!(err.to_string(), "fsync: must be one of always, everysec, never, got \"sometimes\"");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let (key, message) = invalid_key("workers: [http://localhost:5001]\nworker_persit: 5");
        assert_eq!(key, "worker_persit");
        assert!(message.contains("worker_persist"), "{message}");
        let (key, _) = invalid_key("workers: [http://localhost:5001]\n7: x");
        assert_eq!(key, "7");
    }

    #[test]
    fn not_yaml_or_not_a_mapping() {
        assert!(matches!(parse("workers: [unclosed"), Err(ConfigError::Yaml(_))));
        assert!(matches!(parse("- a\n- b"), Err(ConfigError::NotAMapping { .. })));
        // A key given twice is caught by the YAML parser.
        assert!(matches!(
            parse("workers: [http://localhost:5001]\nfsync: never\nfsync: always"),
            Err(ConfigError::Yaml(_))
        ));
    }

    #[test]
    fn bad_worker_urls_name_their_index() {
        let bad = [
            "ftp://localhost:5001",
            "https://localhost:5001",
            "localhost:5001",
            "http://localhost",
            "http://localhost:0",
            "http://localhost:5001/api",
            "http://localhost:5001/?x=1",
            "http://localhost:5001#top",
            "http://user:pw@localhost:5001",
            "http://0.0.0.0:5001",
            "http://[::]:5001",
            "http://:5001",
            "not a url",
        ];
        for text in bad {
            let yaml = format!("workers:\n  - http://localhost:5001\n  - http://localhost:5002\n  - {text:?}");
            let (key, message) = invalid_key(&yaml);
            assert_eq!(key, "workers[2]", "{text}");
            assert!(message.starts_with(&format!("{text:?}: ")), "{message}");
        }
        let (key, message) = invalid_key("workers: [http://localhost:5001, 5002]");
        assert_eq!((key.as_str(), message.as_str()), ("workers[1]", "must be a URL string, got 5002"));
    }

    #[test]
    fn duplicate_workers_are_rejected() {
        let (key, message) =
            invalid_key("workers: [http://localhost:5001, http://localhost:5002, http://LOCALHOST:5001/]");
        assert_eq!(key, "workers[2]");
        assert_eq!(message, "http://localhost:5001 is listed twice (also workers[0])");
        // Two spellings of one local address would fight over one port.
        let (key, message) = invalid_key("workers: [http://localhost:5001, http://127.0.0.1:5001]");
        assert_eq!(key, "workers[1]");
        assert!(message.contains("same local address as workers[0]"), "{message}");
        // Remote workers are distinct by URL alone.
        assert!(parse("workers: [http://10.1.2.3:5001, http://worker-b.example:5001]").is_ok());
    }

    #[test]
    fn worker_url_accessors() {
        let w = url("http://localhost:5001/");
        assert_eq!((w.host(), w.port(), w.as_str()), ("localhost", 5001, "http://localhost:5001"));
        assert_eq!(w.to_string(), "http://localhost:5001");
        assert_eq!(w.bind_addr(), Some("127.0.0.1:5001".parse().unwrap()));

        let w = url("http://[::1]:5002");
        assert_eq!((w.host(), w.port(), w.as_str()), ("[::1]", 5002, "http://[::1]:5002"));
        assert_eq!(w.bind_addr(), Some("[::1]:5002".parse().unwrap()));

        let w = url("http://Worker-B.Example:5003");
        assert_eq!((w.host(), w.as_str()), ("worker-b.example", "http://worker-b.example:5003"));
        assert_eq!(w.bind_addr(), None);

        let w = url("http://10.1.2.3:80");
        assert_eq!((w.port(), w.as_str()), (80, "http://10.1.2.3:80"));
        assert_eq!(w.bind_addr(), Some("10.1.2.3:80".parse().unwrap()));
        assert_eq!(url("http://[::1]:80").port(), 80);
        assert_eq!("http://[::1]".parse::<WorkerUrl>(), Err(WorkerUrlError::MissingPort));
    }

    #[test]
    fn the_store_is_json_unless_redis_is_asked_for_with_its_url() {
        let base = "workers: [http://localhost:5001]\n";
        let load = |extra: &str| Config::from_yaml_str(&format!("{base}{extra}"), Path::new(""));
        assert_eq!(load("").unwrap().store, StoreBackend::Json);
        let redis = load("store: redis\nredis_url: redis://127.0.0.1:6379\nredis_cluster: true\n").unwrap();
        assert_eq!(redis.store, StoreBackend::Redis { url: "redis://127.0.0.1:6379".into(), cluster: true });
        for (extra, key) in [
            ("store: redis\n", "redis_url"),
            ("redis_url: redis://x:1\n", "redis_url"),
            ("store: mongo\n", "store"),
            ("store: redis\nredis_url: http://x:1\n", "redis_url"),
            ("redis_cluster: true\n", "redis_cluster"),
            ("max_pending_items: 0\n", "max_pending_items"),
        ] {
            let err = load(extra).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{key}: ")), "{extra:?}: {err}");
        }
    }

    #[test]
    fn a_local_worker_on_the_listen_address_is_refused() {
        let text = "workers: [http://localhost:5001, http://127.0.0.1:5000]\nlisten: 127.0.0.1:5000\n";
        let err = Config::from_yaml_str(text, Path::new("")).unwrap_err().to_string();
        assert!(err.starts_with("workers[1]: "), "{err}");
    }

    #[test]
    fn locality() {
        for local in ["http://localhost:5001", "http://127.0.0.1:5001", "http://[::1]:5001"] {
            assert!(url(local).is_local(), "{local}");
        }
        let remotes = [
            "http://127.0.0.2:5001",
            "http://10.1.2.3:5001",
            "http://worker-b.example:5001",
            "http://192.168.0.7:5001",
        ];
        for remote in remotes {
            assert!(!url(remote).is_local(), "{remote}");
        }
    }

    #[test]
    fn worker_urls_order_and_compare_by_normalized_text() {
        assert_eq!(url("http://LocalHost:5001/"), url("http://localhost:5001"));
        let mut urls = [url("http://localhost:5002"), url("http://10.0.0.1:5001"), url("http://localhost:5001")];
        urls.sort();
        let sorted: Vec<&str> = urls.iter().map(WorkerUrl::as_str).collect();
        assert_eq!(sorted, ["http://10.0.0.1:5001", "http://localhost:5001", "http://localhost:5002"]);
    }
}
