//! `config.yaml`: the settings of a CountApp cluster, read and validated in one place.
//!
//! The file deserializes straight into [`Config`]: each key's value type checks itself as it is
//! read ([`values`]), unknown keys are refused (so a typo such as `worker_persit` is reported,
//! not ignored), and errors carry the path of what was wrong (`workers[2]: ...`). Rules that
//! span keys are checked once, in [`Config::validate`]. A file is either wholly valid or
//! rejected: the coordinator keeps its last good config when an edit breaks the file, so a
//! half-applied file never exists.

mod values;
pub mod watch;
mod worker_url;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use values::{Bytes, Dir, FsyncPolicy, Listen, LogFormat, Positive, RedisUrl, Seconds, StoreKind};
pub use worker_url::{WorkerUrl, WorkerUrlError};

/// The validated contents of `config.yaml`.
///
/// Everything here has been checked at load time, so users of a `Config` never re-validate:
/// paths are resolved against the config file's directory, durations and sizes are within their
/// bounds, and worker URLs are well-formed and distinct.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of keys to values, like `workers: [...]`")]
pub struct Config {
    /// The workers, in file order. Local ones are spawned by the coordinator, the others are
    /// only health-checked and routed to.
    #[serde(default)]
    pub workers: Vec<WorkerUrl>,
    /// Directory of the embedded store.
    #[serde(default = "defaults::database")]
    pub database: Dir,
    /// Directory of the per-worker log files.
    #[serde(default = "defaults::worker_logs")]
    pub worker_logs: Dir,
    /// How often each worker closes its log file, for the merge round that follows to take its
    /// items: an item is counted about this long after it is acknowledged.
    #[serde(default = "defaults::worker_persist")]
    pub worker_persist: Seconds,
    /// Interval between health checks, and between re-reads of the file if watching it fails.
    #[serde(default = "defaults::config_check")]
    pub config_check: Seconds,
    /// The coordinator's listening address.
    #[serde(default = "defaults::listen")]
    pub listen: Listen,
    /// When the write-ahead log is fsynced.
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// Largest request body accepted.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: Bytes,
    /// Longest id or tenant accepted, in bytes.
    #[serde(default = "defaults::max_key_bytes")]
    pub max_key_bytes: Bytes,
    /// Which store keeps the tenants' id sets.
    #[serde(default)]
    pub store: StoreKind,
    /// The Redis server of `store: redis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<RedisUrl>,
    /// Whether `redis_url` is a node of a Redis Cluster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redis_cluster: bool,
    /// With a `rediss://` URL, the PEM file of the certificate authority that signed Redis's
    /// certificate; the system's roots when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_tls_ca: Option<Dir>,
    /// With a `rediss://` URL, the PEM file of the client's certificate, for a Redis that asks
    /// for one (`tls-auth-clients`); with `redis_tls_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_tls_cert: Option<Dir>,
    /// The PEM file of `redis_tls_cert`'s private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_tls_key: Option<Dir>,
    /// With `store: redis`, how long a log file whose ids Redis took is kept when Redis cannot
    /// confirm that it made them durable (no `WAITAOF`, or no AOF): at least Redis's `everysec`
    /// window, 1 s. [`defaults::redis_grace`] when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_grace: Option<Seconds>,
    /// With `store: redis`, how many replicas must have a log file's ids (`WAIT`, or `WAITAOF`
    /// where Redis has it) before the file is deleted.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redis_wait_replicas: u32,
    /// With `store: redis`, how many connections each worker's merge spreads its pipelines of
    /// `SADD`s over. [`defaults::redis_merge_connections`] when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_merge_connections: Option<Positive>,
    /// Items a worker's log may hold pending (acknowledged, not yet merged) before ingest
    /// answers 503.
    #[serde(default = "defaults::max_pending_items")]
    pub max_pending_items: Positive,
    /// Bytes of damaged files kept under the database's `damaged/` for an operator, at most;
    /// the oldest go first past it. [`defaults::damaged_max_bytes`] when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged_max_bytes: Option<Bytes>,
    /// How long a client has to send a whole request, head and body; a connection silent that
    /// long is closed. [`defaults::request_timeout`] when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Seconds>,
    /// Bytes of request bodies a server holds at once, over all its connections; past them a
    /// request is pushed back with a 503. [`Config::max_body_bytes_in_flight`] when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes_in_flight: Option<Bytes>,
    /// How both processes write their logs: text lines or JSON objects. Read when a process
    /// starts: the coordinator at its start, a worker at its next spawn.
    #[serde(default, skip_serializing_if = "LogFormat::is_text")]
    pub log_format: LogFormat,
    /// Size at which a worker's log file under `worker_logs` is rotated.
    /// [`defaults::worker_log_max_bytes`] when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_log_max_bytes: Option<Bytes>,
    /// Rotated log files kept per worker (`<port>.log.1` to `.N`), besides the one written.
    /// [`defaults::worker_log_files`] when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_log_files: Option<Positive>,
}

/// The defaults of the optional keys, as the README documents them.
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use super::{Bytes, Dir, Listen, Positive, Seconds};

    /// Directory of the embedded store, relative to the config file.
    pub fn database() -> Dir {
        Dir::new("db/")
    }
    /// Directory of the per-worker log files, relative to the config file.
    pub fn worker_logs() -> Dir {
        Dir::new("logs/")
    }
    /// How often each worker closes its log file.
    pub fn worker_persist() -> Seconds {
        Seconds::new(Duration::from_secs(5)).expect("within bounds")
    }
    /// Interval between health checks (and re-reads, if watching the file fails).
    pub fn config_check() -> Seconds {
        Seconds::new(Duration::from_secs(5)).expect("within bounds")
    }
    /// The coordinator's address: loopback only, so nothing is exposed unless asked for.
    pub fn listen() -> Listen {
        Listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5000))
    }
    /// Largest request body: 16 MiB.
    pub fn max_body_bytes() -> Bytes {
        Bytes::new(16 << 20).expect("positive")
    }
    /// Longest id or tenant, in bytes.
    pub fn max_key_bytes() -> Bytes {
        Bytes::new(256).expect("positive")
    }
    /// How long a log file that Redis took is kept when Redis cannot confirm its durability:
    /// twice Redis's `everysec` window.
    pub fn redis_grace() -> Seconds {
        Seconds::new(Duration::from_secs(2)).expect("within bounds")
    }
    /// Connections a worker's merge sends over: one.
    pub fn redis_merge_connections() -> Positive {
        Positive::new(1).expect("positive")
    }
    /// Items a worker's log holds pending (while its store is unreachable, say) before ingest
    /// answers 503: about a gigabyte of log.
    pub fn max_pending_items() -> Positive {
        Positive::new(50_000_000).expect("positive")
    }
    /// Bytes of damaged files kept for an operator: 1 GiB.
    pub fn damaged_max_bytes() -> Bytes {
        Bytes::new(1 << 30).expect("positive")
    }
    /// How long a client has to send a request: nginx's and HAProxy's usual order, and ample
    /// for a body of `max_body_bytes` on any network a cluster runs on.
    pub fn request_timeout() -> Seconds {
        Seconds::new(Duration::from_secs(10)).expect("within bounds")
    }
    /// Request bodies held at once: four bodies of the default `max_body_bytes` (and never
    /// less than one body of the configured `max_body_bytes`).
    pub fn max_body_bytes_in_flight() -> Bytes {
        Bytes::new(64 << 20).expect("positive")
    }
    /// Size at which a worker's log file is rotated: days of a busy worker's lines, and small
    /// enough to open in an editor.
    pub fn worker_log_max_bytes() -> Bytes {
        Bytes::new(16 << 20).expect("positive")
    }
    /// Rotated log files kept per worker: with the default size, at most 96 MiB a worker.
    pub fn worker_log_files() -> Positive {
        Positive::new(5).expect("positive")
    }
}

/// The shortest `redis_grace` accepted: Redis's `appendfsync everysec` writes its AOF to disk
/// once a second, so a shorter grace could delete a log file whose ids Redis may still lose.
pub const MIN_REDIS_GRACE: Duration = Duration::from_secs(1);
/// The most connections `redis_merge_connections` opens: past it, a typo.
pub const MAX_REDIS_MERGE_CONNECTIONS: u64 = 64;
/// The largest `max_body_bytes` accepted: a body is held in memory whole.
pub const MAX_BODY_BYTES_LIMIT: u64 = 1 << 30;
/// The largest `max_key_bytes` accepted.
pub const MAX_KEY_BYTES_LIMIT: u64 = 64 << 10;
/// The smallest `worker_log_max_bytes` accepted: a few lines, below which a file would be
/// rotated at every line.
pub const MIN_WORKER_LOG_BYTES: u64 = 1 << 10;
/// The most rotated files `worker_log_files` keeps: past it, a typo.
pub const MAX_WORKER_LOG_FILES: u64 = 1000;
/// The shortest `request_timeout` accepted: a request may wait that long for a worker (a hop
/// times out after half a second) without a byte on its connection.
pub const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// The keys whose values a running cluster cannot change: an edit of any of them is refused as
/// a whole, and the last good config stays in force.
pub const FIXED_KEYS: [&str; 8] =
    ["listen", "database", "store", "redis_url", "redis_cluster", "redis_tls_ca", "redis_tls_cert", "redis_tls_key"];

/// What a worker with `store: redis` waits for before it deletes a log file whose ids Redis took:
/// the live part of the Redis settings, applied at each merge round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisHandoff {
    /// How long the file is kept where Redis cannot confirm that the ids are on its disk.
    pub grace: Duration,
    /// How many replicas must have the ids first.
    pub wait_replicas: u32,
}

impl Default for RedisHandoff {
    fn default() -> Self {
        RedisHandoff { grace: defaults::redis_grace().get(), wait_replicas: 0 }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
        // Read straight from the parser's events, so that an error has both the key's path
        // (from serde_path_to_error) and its line and column (from the parser). An empty file
        // is an empty mapping, which then lacks `workers`.
        let mut path = None;
        let parsed = serde_saphyr::with_deserializer_from_str(text, |deserializer| {
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                path = Some(error.path().to_string());
                error.into_inner()
            })
        });
        let mut config: Config = parsed.map_err(|error| ConfigError::from_yaml(path, &error))?;
        config.database = config.database.resolve(base_dir);
        config.worker_logs = config.worker_logs.resolve(base_dir);
        for file in [&mut config.redis_tls_ca, &mut config.redis_tls_cert, &mut config.redis_tls_key] {
            *file = file.as_ref().map(|file| file.resolve(base_dir));
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads a config handed over as JSON (by [`Config::to_json`]), validating it again.
    pub fn from_json(json: &str) -> Result<Config, ConfigError> {
        let mut deserializer = serde_json::Deserializer::from_str(json);
        let config: Config = serde_path_to_error::deserialize(&mut deserializer).map_err(ConfigError::from_serde)?;
        config.validate()?;
        Ok(config)
    }

    /// The config as JSON, with every path absolute: what a coordinator hands its workers.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a config serializes")
    }

    /// A short digest of the whole config, equal on every process that runs the same settings,
    /// so that `/stats` can show which config each one runs.
    pub fn version(&self) -> String {
        let digest = Sha256::digest(self.to_json().as_bytes());
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The keys of [`FIXED_KEYS`] whose values differ between `self` and `new`.
    pub fn fixed_changes(&self, new: &Config) -> Vec<&'static str> {
        let changed = [
            self.listen != new.listen,
            self.database != new.database,
            self.store != new.store,
            self.redis_url != new.redis_url,
            self.redis_cluster != new.redis_cluster,
            self.redis_tls_ca != new.redis_tls_ca,
            self.redis_tls_cert != new.redis_tls_cert,
            self.redis_tls_key != new.redis_tls_key,
        ];
        FIXED_KEYS.iter().zip(changed).filter(|(_, changed)| *changed).map(|(key, _)| *key).collect()
    }

    /// What a worker waits for before deleting a log file whose ids Redis took.
    pub fn redis_handoff(&self) -> RedisHandoff {
        RedisHandoff {
            grace: self.redis_grace.unwrap_or_else(defaults::redis_grace).get(),
            wait_replicas: self.redis_wait_replicas,
        }
    }

    /// How many connections a worker's merge into Redis sends over.
    pub fn redis_merge_connections(&self) -> usize {
        self.redis_merge_connections.unwrap_or_else(defaults::redis_merge_connections).get() as usize
    }

    /// How long a client has to send a whole request.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout.unwrap_or_else(defaults::request_timeout).get()
    }

    /// Bytes of request bodies a server holds at once: as configured, else the default or one
    /// body of `max_body_bytes`, whichever is larger.
    pub fn max_body_bytes_in_flight(&self) -> usize {
        let set = self.max_body_bytes_in_flight.map(Bytes::as_usize);
        set.unwrap_or_else(|| defaults::max_body_bytes_in_flight().as_usize().max(self.max_body_bytes.as_usize()))
    }

    /// Bytes of damaged files kept under `damaged/` at most.
    pub fn damaged_max_bytes(&self) -> u64 {
        self.damaged_max_bytes.unwrap_or_else(defaults::damaged_max_bytes).get()
    }

    /// Size at which a worker's log file is rotated.
    pub fn worker_log_max_bytes(&self) -> u64 {
        self.worker_log_max_bytes.unwrap_or_else(defaults::worker_log_max_bytes).get()
    }

    /// Rotated log files kept per worker, besides the one written.
    pub fn worker_log_files(&self) -> u32 {
        let files = self.worker_log_files.unwrap_or_else(defaults::worker_log_files).get();
        u32::try_from(files).unwrap_or(u32::MAX)
    }

    /// How often each worker closes its log file.
    pub fn worker_persist(&self) -> Duration {
        self.worker_persist.get()
    }

    /// The interval between health checks.
    pub fn config_check(&self) -> Duration {
        self.config_check.get()
    }

    /// The rules that span keys, checked once after every key was read.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.workers.is_empty() {
            return Err(invalid(
                "workers",
                "is missing or empty; it lists the worker URLs, like http://localhost:5001",
            ));
        }
        // Two local spellings of one address (localhost and 127.0.0.1) would make two spawned
        // workers fight over one port, so local workers are also compared by bind address.
        let mut seen: HashMap<&WorkerUrl, usize> = HashMap::new();
        let mut local_addrs: HashMap<SocketAddr, usize> = HashMap::new();
        for (index, worker) in self.workers.iter().enumerate() {
            let key = format!("workers[{index}]");
            if let Some(first) = seen.insert(worker, index) {
                return Err(invalid(key, format!("{worker} is listed twice (also workers[{first}])")));
            }
            let Some(addr) = worker.bind_addr().filter(|_| worker.is_local()) else { continue };
            let listen = self.listen.0;
            if addr == listen {
                return Err(invalid(key, format!("{worker} is the coordinator's own listen address")));
            }
            // A coordinator on every address holds the port on each of them: the worker could
            // never bind it.
            if listen.ip().is_unspecified() && addr.port() == listen.port() {
                let message = format!("{worker} is on the port of listen: {listen}, which holds it on every address");
                return Err(invalid(key, message));
            }
            if let Some(first) = local_addrs.insert(addr, index) {
                let message =
                    format!("{worker} is the same local address as workers[{first}] ({})", self.workers[first]);
                return Err(invalid(key, message));
            }
        }
        let (body, key) = (self.max_body_bytes.get(), self.max_key_bytes.get());
        if body > MAX_BODY_BYTES_LIMIT {
            return Err(invalid("max_body_bytes", format!("must be at most {MAX_BODY_BYTES_LIMIT} bytes, got {body}")));
        }
        if key > MAX_KEY_BYTES_LIMIT {
            return Err(invalid("max_key_bytes", format!("must be at most {MAX_KEY_BYTES_LIMIT} bytes, got {key}")));
        }
        if let Some(in_flight) = self.max_body_bytes_in_flight
            && in_flight.get() < body
        {
            let message = format!("must be at least max_body_bytes ({body}), got {}", in_flight.get());
            return Err(invalid("max_body_bytes_in_flight", message));
        }
        if let Some(size) = self.worker_log_max_bytes
            && size.get() < MIN_WORKER_LOG_BYTES
        {
            let message = format!("must be at least {MIN_WORKER_LOG_BYTES} bytes (1KiB), got {}", size.get());
            return Err(invalid("worker_log_max_bytes", message));
        }
        if let Some(files) = self.worker_log_files
            && files.get() > MAX_WORKER_LOG_FILES
        {
            let message = format!("must be at most {MAX_WORKER_LOG_FILES}, got {}", files.get());
            return Err(invalid("worker_log_files", message));
        }
        if let Some(connections) = self.redis_merge_connections
            && connections.get() > MAX_REDIS_MERGE_CONNECTIONS
        {
            let message = format!("must be at most {MAX_REDIS_MERGE_CONNECTIONS}, got {}", connections.get());
            return Err(invalid("redis_merge_connections", message));
        }
        if let Some(timeout) = self.request_timeout
            && timeout.get() < MIN_REQUEST_TIMEOUT
        {
            let message =
                format!("must be at least {} s, got {}", MIN_REQUEST_TIMEOUT.as_secs(), timeout.get().as_secs_f64());
            return Err(invalid("request_timeout", message));
        }
        if let Some(grace) = self.redis_grace
            && grace.get() < MIN_REDIS_GRACE
        {
            let message = format!(
                "must be at least {} s, Redis's everysec window, got {}",
                MIN_REDIS_GRACE.as_secs(),
                grace.get().as_secs_f64()
            );
            return Err(invalid("redis_grace", message));
        }
        let tls = self.redis_url.as_ref().is_some_and(RedisUrl::is_tls);
        for (key, set) in [
            ("redis_tls_ca", self.redis_tls_ca.is_some()),
            ("redis_tls_cert", self.redis_tls_cert.is_some()),
            ("redis_tls_key", self.redis_tls_key.is_some()),
        ] {
            if set && !tls {
                return Err(invalid(key, "is only used with a rediss:// redis_url"));
            }
        }
        if self.redis_tls_cert.is_some() != self.redis_tls_key.is_some() {
            return Err(invalid("redis_tls_key", "and redis_tls_cert go together: a certificate and its key"));
        }
        match (self.store, &self.redis_url) {
            (StoreKind::Redis, None) => Err(invalid("redis_url", "is required with store: redis")),
            (StoreKind::Json, Some(_)) => Err(invalid("redis_url", "is only used with store: redis")),
            (StoreKind::Json, None) if self.redis_cluster => {
                Err(invalid("redis_cluster", "is only used with store: redis"))
            }
            (StoreKind::Json, None) if self.redis_grace.is_some() => {
                Err(invalid("redis_grace", "is only used with store: redis"))
            }
            (StoreKind::Json, None) if self.redis_wait_replicas > 0 => {
                Err(invalid("redis_wait_replicas", "is only used with store: redis"))
            }
            (StoreKind::Json, None) if self.redis_merge_connections.is_some() => {
                Err(invalid("redis_merge_connections", "is only used with store: redis"))
            }
            _ => Ok(()),
        }
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
    /// The text is not YAML at all (or gives a key twice); the message has the line.
    #[error("config is not valid YAML: {0}")]
    Yaml(String),
    /// One key is unknown, missing or has a bad value; the first one found is reported.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, with an index for list entries (`workers[2]`), or `.` for the whole file.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    /// An error from reading YAML, keyed by the path serde_path_to_error saw, if any. The
    /// message, without the parser's snippet of the file, ends with the line and column.
    fn from_yaml(path: Option<String>, error: &serde_saphyr::Error) -> ConfigError {
        let error = error.without_snippet();
        let message = error.to_string();
        // The parser's own errors (bad syntax, a key given twice) are about the text, wherever
        // the deserializer happened to be.
        let syntax = matches!(error, serde_saphyr::Error::ExternalMessage { .. }) || message.starts_with("duplicate");
        match path {
            Some(key) if !syntax && key != "?" => ConfigError::from_key(key, message),
            _ => ConfigError::Yaml(message),
        }
    }

    /// An error from deserializing, keyed by where it happened.
    fn from_serde<E: std::fmt::Display>(error: serde_path_to_error::Error<E>) -> ConfigError {
        let key = error.path().to_string();
        ConfigError::from_key(key, error.into_inner().to_string())
    }

    /// An error at `key`, with the deserializer's `message`.
    fn from_key(key: String, message: String) -> ConfigError {
        // An unknown key is reported at the mapping that holds it; the key itself is the one
        // to name.
        let unknown = message.strip_prefix("unknown field `").and_then(|rest| rest.split_once('`'));
        match unknown {
            Some((field, _)) if key == "." => invalid(field, message.clone()),
            _ => invalid(key, message),
        }
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
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

    /// What a bad duration's message says is expected.
    const DURATION_EXPECTED: &str = "a duration from 1ms to 24h, like 500ms, 5s or 2m (a plain number is seconds)";

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

    #[test]
    fn original_go_file_loads_unchanged() {
        let config = parse(ORIGINAL).unwrap();
        let urls: Vec<&str> = config.workers.iter().map(WorkerUrl::as_str).collect();
        assert_eq!(
            urls,
            ["http://localhost:5001", "http://localhost:5002", "http://localhost:5003", "http://localhost:5004"]
        );
        assert!(config.workers.iter().all(WorkerUrl::is_local));
        assert_eq!(&*config.database, Path::new("/srv/countapp/db"));
        assert_eq!(&*config.worker_logs, Path::new("/srv/countapp/logs"));
        assert_eq!(config.worker_persist(), Duration::from_secs(5));
        assert_eq!(config.config_check(), Duration::from_secs(5));
    }

    #[test]
    fn defaults_fill_every_optional_key() {
        let config = parse("workers: [http://localhost:5001]").unwrap();
        assert_eq!(&*config.database, Path::new("/srv/countapp/db/"));
        assert_eq!(&*config.worker_logs, Path::new("/srv/countapp/logs/"));
        assert_eq!(config.worker_persist(), Duration::from_secs(5));
        assert_eq!(config.config_check(), Duration::from_secs(5));
        assert_eq!(config.listen.0, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(config.fsync, FsyncPolicy::EverySec);
        assert_eq!(config.max_body_bytes.get(), 16 * 1024 * 1024);
        assert_eq!(config.max_key_bytes.get(), 256);
        assert_eq!(config.request_timeout(), Duration::from_secs(10));
        assert_eq!(config.max_body_bytes_in_flight(), 64 << 20);
        // A larger body than the budget's default raises the budget; unset, neither key changes
        // the config handed to workers, nor so its version.
        let big = parse("workers: [http://localhost:5001]\nmax_body_bytes: 104857600").unwrap();
        assert_eq!(big.max_body_bytes_in_flight(), 100 << 20);
        assert!(!config.to_json().contains("request_timeout") && !config.to_json().contains("in_flight"));
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
             max_key_bytes: 64\n\
             request_timeout: 2.5\n\
             max_body_bytes_in_flight: 4194304\n",
        )
        .unwrap();
        assert_eq!(&*config.database, Path::new("/var/lib/countapp"));
        assert_eq!(&*config.worker_logs, Path::new("/var/log/countapp"));
        assert_eq!(config.worker_persist(), Duration::from_millis(500));
        assert_eq!(config.config_check(), Duration::from_secs(2));
        assert_eq!(config.listen.0, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.fsync, FsyncPolicy::Always);
        assert_eq!(config.max_body_bytes.get(), 1 << 20);
        assert_eq!(config.max_key_bytes.get(), 64);
        assert_eq!(config.request_timeout(), Duration::from_millis(2500));
        assert_eq!(config.max_body_bytes_in_flight(), 4 << 20);
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
        assert_eq!(config.listen.0, "127.0.0.1:6000".parse().unwrap());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let config = parse("workers: [http://localhost:5001]\ndatabase: data/store\nworker_logs: ../logs").unwrap();
        assert_eq!(&*config.database, Path::new("/srv/countapp/data/store"));
        assert_eq!(&*config.worker_logs, Path::new("/srv/countapp/../logs"));
    }

    #[test]
    fn load_reads_the_file_and_resolves_paths_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, ORIGINAL).unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(&*config.database, dir.path().join("db/"));
        assert_eq!(&*config.worker_logs, dir.path().join("logs/"));
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
            // Past a day is a typo, and 1e19 seconds would overflow the clock arithmetic.
            for bad in ["-1", "0", "0.0", "abc", "\"5\"", ".inf", ".nan", "[5]", "1e-12", "true", "", "86401", "1e19"] {
                let (got, message) = invalid_key(&format!("workers: [http://localhost:5001]\n{key}: {bad}"));
                assert_eq!(got, key, "{bad}");
                // The parser refuses the non-finite floats itself, in words of its own.
                if ![".inf", ".nan"].contains(&bad) {
                    assert!(message.contains(DURATION_EXPECTED), "{bad}: {message}");
                }
            }
        }
        let err = parse("workers: [http://localhost:5001]\nworker_persist: -1").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("worker_persist: invalid value: integer `-1`, expected {DURATION_EXPECTED} at line 2, column 1")
        );
        let config = parse("workers: [http://localhost:5001]\nworker_persist: 86400\nconfig_check: 0.001").unwrap();
        assert_eq!(
            (config.worker_persist(), config.config_check()),
            (Duration::from_secs(86400), Duration::from_millis(1))
        );
    }

    #[test]
    fn bad_scalars_name_their_key() {
        let cases = [
            ("database: ''", "database"),
            ("database: [a]", "database"),
            ("worker_logs: [a]", "worker_logs"),
            ("listen: 5000", "listen"),
            ("listen: example.com:5000", "listen"),
            ("listen: 127.0.0.1", "listen"),
            ("fsync: sometimes", "fsync"),
            ("fsync: Always", "fsync"),
            ("fsync: 1", "fsync"),
            ("max_body_bytes: 0", "max_body_bytes"),
            ("max_body_bytes: -5", "max_body_bytes"),
            ("max_body_bytes: 1.5", "max_body_bytes"),
            ("max_body_bytes: 16MB", "max_body_bytes"),
            ("max_body_bytes: 0KiB", "max_body_bytes"),
            ("max_key_bytes: 0", "max_key_bytes"),
            ("max_key_bytes: '256'", "max_key_bytes"),
            ("worker_log_max_bytes: 1023", "worker_log_max_bytes"),
            ("worker_log_files: 0", "worker_log_files"),
            ("worker_log_files: 1001", "worker_log_files"),
            ("log_format: yaml", "log_format"),
        ];
        for (line, key) in cases {
            let (got, _) = invalid_key(&format!("workers: [http://localhost:5001]\n{line}"));
            assert_eq!(got, key, "{line}");
        }
        let err = parse("workers: [http://localhost:5001]\nfsync: sometimes").unwrap_err();
        assert_eq!(
            err.to_string(),
            "fsync: unknown variant `sometimes`, expected one of always, everysec, never at line 2, column 8"
        );
        let err = parse("workers: [http://localhost:5001]\nmax_key_bytes: 65537").unwrap_err();
        assert_eq!(err.to_string(), "max_key_bytes: must be at most 65536 bytes, got 65537");
        let err = parse("workers: [http://localhost:5001]\nrequest_timeout: 0.5").unwrap_err();
        assert_eq!(err.to_string(), "request_timeout: must be at least 1 s, got 0.5");
        let err = parse("workers: [http://localhost:5001]\nmax_body_bytes: 2000\nmax_body_bytes_in_flight: 1000")
            .unwrap_err();
        assert_eq!(err.to_string(), "max_body_bytes_in_flight: must be at least max_body_bytes (2000), got 1000");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let (key, message) = invalid_key("workers: [http://localhost:5001]\nworker_persit: 5");
        assert_eq!(key, "worker_persit");
        assert!(message.contains("worker_persist"), "{message}");
        let (_, message) = invalid_key("workers: [http://localhost:5001]\n7: x");
        assert!(message.contains("`7`"), "{message}");
    }

    #[test]
    fn not_yaml_or_not_a_mapping() {
        let err = parse("workers: [http://localhost:5001]\nfsync: \"never\n").unwrap_err();
        assert!(matches!(err, ConfigError::Yaml(_)), "{err:?}");
        assert!(err.to_string().contains("line 2"), "{err}");
        let (key, message) = invalid_key("- a\n- b");
        assert_eq!(key, ".");
        assert!(message.contains("expected mapping") && message.ends_with("at line 1, column 1"), "{message}");
        // A key given twice is caught by the YAML parser, at the second.
        let err = parse("workers: [http://localhost:5001]\nfsync: never\nfsync: always").unwrap_err();
        assert!(matches!(err, ConfigError::Yaml(_)), "{err:?}");
        assert!(
            err.to_string().contains("duplicate mapping key: fsync") && err.to_string().contains("line 3"),
            "{err}"
        );
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
        assert_eq!(key, "workers[1]");
        assert!(message.contains("write it like http://localhost:5001 at line 1, column 34"), "{message}");
        let (key, message) = invalid_key("workers: [http://localhost:5001, [5002]]");
        assert_eq!(key, "workers[1]");
        assert!(message.contains("expected string"), "{message}");
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
    fn the_store_is_json_unless_redis_is_asked_for_with_its_url() {
        let base = "workers: [http://localhost:5001]\n";
        let load = |extra: &str| Config::from_yaml_str(&format!("{base}{extra}"), Path::new(""));
        assert_eq!(load("").unwrap().store, StoreKind::Json);
        let redis = load("store: redis\nredis_url: redis://127.0.0.1:6379\nredis_cluster: true\n").unwrap();
        assert_eq!(redis.store, StoreKind::Redis);
        assert_eq!(redis.redis_url.as_ref().map(RedisUrl::as_str), Some("redis://127.0.0.1:6379"));
        assert!(redis.redis_cluster);
        let tls = "store: redis\nredis_url: rediss://redis.example:6380\nredis_tls_ca: ca.pem\n";
        let tls = Config::from_yaml_str(
            &format!("{base}{tls}redis_tls_cert: c.pem\nredis_tls_key: k.pem\n"),
            Path::new("/etc/countapp"),
        )
        .unwrap();
        assert_eq!(tls.redis_tls_ca.as_deref(), Some(Path::new("/etc/countapp/ca.pem")));
        assert_eq!(tls.redis_tls_key.as_deref(), Some(Path::new("/etc/countapp/k.pem")));
        for (extra, key) in [
            ("store: redis\n", "redis_url"),
            ("redis_url: redis://x:1\n", "redis_url"),
            ("store: mongo\n", "store"),
            ("store: redis\nredis_url: http://x:1\n", "redis_url"),
            ("redis_cluster: true\n", "redis_cluster"),
            ("store: redis\nredis_url: redis://x:1\nredis_tls_ca: ca.pem\n", "redis_tls_ca"),
            ("store: redis\nredis_url: rediss://x:1\nredis_tls_cert: c.pem\n", "redis_tls_key"),
            ("max_pending_items: 0\n", "max_pending_items"),
            ("redis_grace: 5\n", "redis_grace"),
            ("redis_wait_replicas: 1\n", "redis_wait_replicas"),
            ("store: redis\nredis_url: redis://x:1\nredis_grace: 0.5\n", "redis_grace"),
            ("store: redis\nredis_url: redis://x:1\nredis_grace: 0\n", "redis_grace"),
            ("store: redis\nredis_url: redis://x:1\nredis_wait_replicas: -1\n", "redis_wait_replicas"),
            ("store: redis\nredis_url: redis://x:1\nredis_wait_replicas: 1.5\n", "redis_wait_replicas"),
            ("redis_merge_connections: 2\n", "redis_merge_connections"),
            ("store: redis\nredis_url: redis://x:1\nredis_merge_connections: 0\n", "redis_merge_connections"),
            ("store: redis\nredis_url: redis://x:1\nredis_merge_connections: 65\n", "redis_merge_connections"),
        ] {
            let err = load(extra).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{key}: ")), "{extra:?}: {err}");
        }
    }

    #[test]
    fn the_redis_hand_off_defaults_to_a_two_second_grace_no_replicas_and_one_merge_connection() {
        let base = "workers: [http://localhost:5001]\nstore: redis\nredis_url: redis://127.0.0.1:6379\n";
        let load = |extra: &str| Config::from_yaml_str(&format!("{base}{extra}"), Path::new("")).unwrap();
        let handoff = load("").redis_handoff();
        assert_eq!(handoff, RedisHandoff { grace: Duration::from_secs(2), wait_replicas: 0 });
        assert_eq!(handoff, RedisHandoff::default());
        assert_eq!(load("").redis_merge_connections(), 1);
        assert_eq!(load("redis_merge_connections: 64\n").redis_merge_connections(), 64);
        let set = load("redis_grace: 1\nredis_wait_replicas: 2\n").redis_handoff();
        assert_eq!(set, RedisHandoff { grace: Duration::from_secs(1), wait_replicas: 2 });
        let err = Config::from_yaml_str(&format!("{base}redis_grace: 0.999\n"), Path::new("")).unwrap_err();
        assert_eq!(err.to_string(), "redis_grace: must be at least 1 s, Redis's everysec window, got 0.999");
        // Unset, they stay out of the config handed to workers, so that its version is unchanged.
        assert!(!load("").to_json().contains("redis_grace"));
        let json = load("redis_grace: 3\nredis_wait_replicas: 1\n").to_json();
        assert_eq!(Config::from_json(&json).unwrap().redis_handoff().grace, Duration::from_secs(3));
    }

    #[test]
    fn a_local_worker_on_the_listen_address_is_refused() {
        let text = "workers: [http://localhost:5001, http://127.0.0.1:5000]\nlisten: 127.0.0.1:5000\n";
        let err = Config::from_yaml_str(text, Path::new("")).unwrap_err().to_string();
        assert!(err.starts_with("workers[1]: "), "{err}");
    }

    #[test]
    fn a_local_worker_on_the_port_of_a_listen_on_every_address_is_refused() {
        for listen in ["0.0.0.0:5000", "\"[::]:5000\""] {
            for worker in ["http://127.0.0.1:5000", "http://localhost:5000", "http://[::1]:5000"] {
                let text = format!("workers: [http://localhost:5001, \"{worker}\"]\nlisten: {listen}\n");
                let err = Config::from_yaml_str(&text, Path::new("")).unwrap_err().to_string();
                assert!(err.starts_with("workers[1]: ") && err.contains("listen: "), "{listen} {worker}: {err}");
            }
            // Another port, or a worker on another machine, is fine.
            let text = format!("workers: [http://localhost:5001, http://10.0.0.2:5000]\nlisten: {listen}\n");
            assert!(Config::from_yaml_str(&text, Path::new("")).is_ok(), "{listen}");
        }
    }

    #[test]
    fn a_config_handed_over_as_json_reads_back_equal_with_the_same_version() {
        let text = "workers: [http://localhost:5001, http://10.0.0.2:5002]\nworker_persist: 0.25\nfsync: always\n\
                    store: redis\nredis_url: redis://127.0.0.1:6379\nmax_key_bytes: 64\n";
        let config = parse(text).unwrap();
        let back = Config::from_json(&config.to_json()).unwrap();
        assert_eq!(back, config);
        assert_eq!(back.version(), config.version());
        let other = parse(&text.replace("0.25", "0.5")).unwrap();
        assert_ne!(other.version(), config.version());
        // What a worker is handed is validated like a file.
        let err = Config::from_json(r#"{"workers":[]}"#).unwrap_err().to_string();
        assert!(err.starts_with("workers: "), "{err}");
    }

    #[test]
    fn fixed_keys_are_told_apart_from_live_ones() {
        let base = parse(ORIGINAL).unwrap();
        let live = parse(&format!(
            "{ORIGINAL}fsync: always\nmax_key_bytes: 10\nmax_body_bytes: 1000\nrequest_timeout: 3\n\
             max_body_bytes_in_flight: 5000\n"
        ))
        .unwrap();
        assert!(base.fixed_changes(&live).is_empty());
        let redis = format!("{ORIGINAL}store: redis\nredis_url: redis://x:1\n");
        let handoff = parse(&format!("{redis}redis_grace: 5\nredis_wait_replicas: 1\n")).unwrap();
        assert!(parse(&redis).unwrap().fixed_changes(&handoff).is_empty());
        let fixed =
            parse(&format!("{ORIGINAL}listen: 127.0.0.1:6000\nstore: redis\nredis_url: redis://x:1\n")).unwrap();
        assert_eq!(base.fixed_changes(&fixed), ["listen", "store", "redis_url"]);
    }

    #[test]
    fn durations_take_units_and_plain_numbers_keep_meaning_seconds() {
        let cases = [
            ("5", Duration::from_secs(5)),
            ("0.5", Duration::from_millis(500)),
            ("5s", Duration::from_secs(5)),
            ("500ms", Duration::from_millis(500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1m 30s", Duration::from_secs(90)),
            ("24h", Duration::from_secs(86400)),
            ("1ms", Duration::from_millis(1)),
        ];
        for (text, expected) in cases {
            let config = parse(&format!("workers: [http://localhost:5001]\nworker_persist: {text}")).unwrap();
            assert_eq!(config.worker_persist(), expected, "{text}");
        }
        for bad in ["5 parsecs", "25h", "0s", "1us", "'5'", "-5s", "s"] {
            let (key, message) = invalid_key(&format!("workers: [http://localhost:5001]\nrequest_timeout: {bad}"));
            assert_eq!(key, "request_timeout", "{bad}");
            assert!(message.contains(DURATION_EXPECTED), "{bad}: {message}");
        }
    }

    #[test]
    fn sizes_take_binary_units_and_plain_numbers_of_bytes() {
        let cases = [
            ("1048576", 1 << 20),
            ("16MiB", 16 << 20),
            ("16 MiB", 16 << 20),
            ("512KiB", 512 << 10),
            ("1GiB", 1 << 30),
            ("1.5KiB", 1536),
            ("300B", 300),
        ];
        for (text, expected) in cases {
            let config = parse(&format!("workers: [http://localhost:5001]\nmax_body_bytes: {text}")).unwrap();
            assert_eq!(config.max_body_bytes.get(), expected, "{text}");
        }
        for bad in ["16MB", "16mib", "1.1B", "MiB", "0MiB", "-1KiB", "16 MiB extra", "99999999TiB"] {
            let (key, message) = invalid_key(&format!("workers: [http://localhost:5001]\ndamaged_max_bytes: {bad}"));
            assert_eq!(key, "damaged_max_bytes", "{bad}");
            assert!(message.contains("a size like 512KiB, 16MiB or 1GiB"), "{bad}: {message}");
        }
        // Bounds are checked on the bytes, whatever the unit.
        let err = parse("workers: [http://localhost:5001]\nmax_body_bytes: 2GiB").unwrap_err();
        assert_eq!(err.to_string(), "max_body_bytes: must be at most 1073741824 bytes, got 2147483648");
    }

    #[test]
    fn every_fixture_loads_the_same_with_units_as_with_plain_numbers() {
        // The repository's config.yaml, the original's file, and every key in numbers, against
        // the same keys with units: equal configs, and so the same version a worker reports.
        let plain = "workers: [http://localhost:5001]\nworker_persist: 0.5\nconfig_check: 120\n\
                     request_timeout: 10\nmax_body_bytes: 16777216\nmax_key_bytes: 1024\n\
                     max_body_bytes_in_flight: 67108864\ndamaged_max_bytes: 1073741824\n\
                     worker_log_max_bytes: 524288\nworker_log_files: 3\n";
        let units = "workers: [http://localhost:5001]\nworker_persist: 500ms\nconfig_check: 2m\n\
                     request_timeout: 10s\nmax_body_bytes: 16MiB\nmax_key_bytes: 1KiB\n\
                     max_body_bytes_in_flight: 64MiB\ndamaged_max_bytes: 1GiB\n\
                     worker_log_max_bytes: 512KiB\nworker_log_files: 3\n";
        let (plain, units) = (parse(plain).unwrap(), parse(units).unwrap());
        assert_eq!(plain, units);
        assert_eq!(plain.version(), units.version());
        assert_eq!((plain.worker_log_max_bytes(), plain.worker_log_files()), (512 << 10, 3));
        // The config handed to workers keeps plain numbers, as before units existed.
        assert!(plain.to_json().contains("\"worker_persist\":0.5"), "{}", plain.to_json());
        let original = parse(ORIGINAL).unwrap();
        assert_eq!(original.log_format, LogFormat::Text);
        assert_eq!((original.worker_log_max_bytes(), original.worker_log_files()), (16 << 20, 5));
        // Unset, the new keys leave the handed-over config, and its version, as they were.
        let json = original.to_json();
        assert!(!json.contains("log_format") && !json.contains("worker_log_"), "{json}");
        let repo = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.yaml")).unwrap();
        assert_eq!(Config::from_json(&repo.to_json()).unwrap(), repo);
    }

    #[test]
    fn log_format_is_text_or_json() {
        let config = parse("workers: [http://localhost:5001]\nlog_format: json").unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(Config::from_json(&config.to_json()).unwrap().log_format, LogFormat::Json);
        let err = parse("workers: [http://localhost:5001]\nlog_format: yaml").unwrap_err().to_string();
        assert!(err.starts_with("log_format: unknown variant `yaml`"), "{err}");
    }
}
