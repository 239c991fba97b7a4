//! The contract between the coordinator and its workers, and what the coordinator shows of it:
//! a worker's `/ready` and `/stats` replies, the config push (`PUT /config`) and its reply, the
//! coordinator's own `/stats`, `/ready` and `/dashboard.json`, and the hop's timeouts that the
//! worker's own deadlines must stay under.
//!
//! The worker serializes these types and the coordinator deserializes them, so that neither
//! reads the other's JSON by key. A reply from a worker is untrusted input, and may come from a
//! worker of another version during a rolling upgrade: unknown fields are ignored, and a missing
//! field takes its default (the conservative one where it matters, such as not pipelining).
//! Nothing here depends on actix: the load tool and the tests may read these types too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};

/// How long the coordinator gives a worker to answer a `GET` or a small `POST` before it tries
/// another: a worker answers one in microseconds to milliseconds, and a client waits seconds.
pub const HOP_TIMEOUT: Duration = Duration::from_millis(500);

/// What each MiB of a `POST` body adds to [`HOP_TIMEOUT`]: a body of `max_body_bytes` (16 MiB
/// by default) may take a good part of a second to parse and log, more with `fsync: always`.
pub const HOP_TIMEOUT_PER_MIB: Duration = Duration::from_millis(250);

/// How long a worker's count from Redis may take, connecting included, before the worker
/// answers that Redis is unreachable: half of [`HOP_TIMEOUT`], so that the worker's 503 with
/// the reason reaches the coordinator before the coordinator takes the worker for hung (and
/// stops routing ingest to it, which goes on into the logs while Redis is away).
pub const REDIS_COUNT_TIMEOUT: Duration = Duration::from_millis(HOP_TIMEOUT.as_millis() as u64 / 2);

/// How long a worker gives a barrier (a strong read's, or a batch's `wait=counted`) to pass
/// before it answers 503: every worker closes its log, then the owners of the shards asked for
/// merge them, which under load may wait for a merge round in progress.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(4);

/// How long the coordinator gives a worker to answer a request that waits on a barrier: past
/// [`BARRIER_TIMEOUT`], so that the worker's 503 with the reason comes first.
pub const BARRIER_HOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The internal route by which a barrier's leader has a worker close its log.
pub const BARRIER_CLOSE_ROUTE: &str = "/barrier/close";

/// The internal route by which a barrier's leader has a worker merge and say what it vouches
/// for, with a [`SettleRequest`] body and a [`Settled`] reply.
pub const BARRIER_SETTLE_ROUTE: &str = "/barrier/settle";

/// The internal route by which a barrier's leader, once the barrier covered its shards, has a
/// worker forget the counts it keeps from earlier reads (where its store keeps any), so that
/// none read before the barrier passed answers after it.
pub const BARRIER_PASSED_ROUTE: &str = "/barrier/passed";

/// The body of a `POST` to [`BARRIER_SETTLE_ROUTE`]: the shards the barrier is for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    /// The shards, each below the database's shard count.
    pub shards: Vec<u16>,
    /// Tenants of those shards to delete (see `Store::settle`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<String>,
}

/// A worker's `200` reply to a barrier's step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settled {
    /// The worker's id.
    pub worker: String,
    /// After a settle, the shards asked for that it vouches for; empty after another step.
    pub shards: Vec<u16>,
}

/// `at` in milliseconds since the unix epoch: the unit of every `*_unix_ms` field here.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Which requests a worker answers at once, on its own HTTP thread, without waiting on the disk:
/// only those may share a pipelined connection, each behind requests of its own kind alone. An
/// eventual read always may: from the JSON files it is answered at once, and from Redis within
/// a round trip (most counts from those a worker keeps for a moment), which delays only the
/// reads queued behind it, never a batch. A batch may unless it waits for an fsync. The worker
/// knows its `fsync`; the coordinator learns it here rather than from a config the worker may
/// not share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AnswersAtOnce {
    /// `POST /items`: yes unless every batch waits for an fsync (`fsync: always`).
    pub batches: bool,
}

/// A worker's `200` reply to `GET /ready`: its log is recovered and it takes ingest. A worker
/// not ready answers `503` with an [`crate::api::ErrorBody`] saying why (recovering its log, its
/// disk failing, shutting down).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ready {
    /// Always `true` in a `200`.
    pub ready: bool,
    /// The version of the config it runs ([`Config::version`]).
    pub config_version: Option<String>,
    /// Which requests it answers at once.
    pub answers_at_once: AnswersAtOnce,
    /// Items it acknowledged that are not merged yet: its backlog, for the coordinator's
    /// metrics between dashboard refreshes.
    pub pending_items: Option<u64>,
    /// How far behind its merging is, in seconds.
    pub merge_lag_s: Option<f64>,
}

/// What the latest merge round that did something did, in a worker's `/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MergeRound {
    /// When it finished, in unix milliseconds.
    pub at_unix_ms: u64,
    /// What it took, in milliseconds.
    pub took_ms: f64,
    /// Log files read, of any worker.
    pub log_files: u64,
    /// Items taken from them, repeats included.
    pub items: u64,
    /// Tenants merged into.
    pub tenants: u64,
    /// Ids that were new to their tenant.
    pub new_ids: u64,
    /// Log files deleted, every shard having merged them.
    pub deleted_files: u64,
}

/// A tenant in quarantine, a file of its unreadable: shown so that an operator repairs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Quarantined {
    /// The tenant.
    pub tenant: String,
    /// The file that cannot be read.
    pub file: String,
    /// Why.
    pub reason: String,
    /// Ids that arrived for it since, kept until it is repaired.
    pub kept_ids: u64,
}

/// A worker's reply to `GET /stats`: what it has done and how far behind it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerStats {
    /// The id its log is kept under, `<ip>-<port>`.
    pub worker: String,
    /// Its process id.
    pub pid: u32,
    /// Whether its log is recovered.
    pub ready: bool,
    /// The version of the config it runs.
    pub config_version: Option<String>,
    /// HTTP requests it answered.
    pub requests: u64,
    /// Items it acknowledged as durable.
    pub items_accepted: u64,
    /// Items it acknowledged that are still in its log files.
    pub pending_items: u64,
    /// How far behind its merging is, in seconds: since the oldest final log file it has yet to
    /// merge was last written (with Redis, at least how long merging what waits will take).
    pub merge_lag_s: f64,
    /// How long the oldest item it acknowledged and the tenants' sets have not taken yet has
    /// waited, in seconds: about what a client waits, at most, to see it counted.
    pub oldest_pending_s: f64,
    /// Ids it holds in memory for the shards it merges.
    pub ids_in_memory: u64,
    /// Their bytes, about.
    pub ids_in_memory_bytes: u64,
    /// Bytes appended to its log since it started.
    pub log_bytes_appended: u64,
    /// The latest merge round that did something.
    pub last_merge: Option<MergeRound>,
    /// The tenants in quarantine in the shards it merges.
    pub quarantined: Vec<Quarantined>,
    /// Which requests it answers at once.
    pub answers_at_once: AnswersAtOnce,
}

/// The body of a config push, `PUT /config` from a coordinator to its worker: the config in
/// force, every path absolute, as [`Config::to_json`] writes it; the same text a spawned
/// worker is handed at start.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigPush(pub Config);

impl ConfigPush {
    /// The body to send.
    pub fn to_body(&self) -> String {
        self.0.to_json()
    }

    /// The config in a pushed body, validated like a config file.
    pub fn from_body(body: &str) -> Result<ConfigPush, ConfigError> {
        Config::from_json(body).map(ConfigPush)
    }
}

/// A worker's `200` reply to a config push: the version it now runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigApplied {
    /// The version of the config it runs now.
    pub config_version: String,
}

/// How a worker is doing, as its coordinator sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Spawned (or found) and recovering; not routed to yet.
    #[default]
    Starting,
    /// Answers `/ready`: routed to.
    Ready,
    /// Failed a health check or a request; not routed to until a check passes again.
    Unhealthy,
    /// Its process exited; about to be respawned.
    Exited,
    /// Removed from the config or the coordinator is stopping: draining and flushing.
    Stopping,
    /// Its port is held by another program, or by a worker not proven this coordinator's: not
    /// spawned until the port is free, and that program never signalled.
    Blocked,
}

impl WorkerState {
    /// Every state, so that a gauge by state shows each one, 0 when no worker is in it.
    pub const ALL: [WorkerState; 6] = [
        WorkerState::Starting,
        WorkerState::Ready,
        WorkerState::Unhealthy,
        WorkerState::Exited,
        WorkerState::Stopping,
        WorkerState::Blocked,
    ];

    /// The state as the JSON and the metrics spell it.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Unhealthy => "unhealthy",
            WorkerState::Exited => "exited",
            WorkerState::Stopping => "stopping",
            WorkerState::Blocked => "blocked",
        }
    }
}

/// One worker in the coordinator's `/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerEntry {
    /// Its URL in the config.
    pub url: String,
    /// Spawned and supervised by this coordinator, or run by someone else and only routed to.
    pub local: bool,
    /// Its process id, when known.
    pub pid: Option<u32>,
    /// Its state.
    pub state: WorkerState,
    /// Found already running when this coordinator started, rather than spawned by it.
    pub adopted: bool,
    /// Requests this coordinator routed to it and it answered.
    pub requests: u64,
    /// Items it acknowledged through this coordinator.
    pub items_accepted: u64,
    /// Times it was respawned after its process exited.
    pub restarts: u64,
    /// The latest thing that went wrong with it.
    pub last_error: Option<String>,
    /// When that was, in unix milliseconds.
    pub last_error_at_unix_ms: Option<u64>,
    /// Whether the worker has been ready since: the error is history, not its state now.
    pub last_error_past: bool,
    /// Why it is not ready, as it said last (recovering its log, its disk failing), while it
    /// answers but is not ready.
    pub not_ready: Option<String>,
    /// When it was last respawned, in unix milliseconds.
    pub restarted_at_unix_ms: Option<u64>,
    /// The version of the config it runs, as it last reported or was handed it.
    pub config_version: Option<String>,
}

/// The cluster's totals in the coordinator's `/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterTotals {
    /// Requests the coordinator answered.
    pub requests: u64,
    /// Requests it forwarded that a worker answered.
    pub requests_forwarded: u64,
    /// Items the workers acknowledged through it.
    pub items_accepted: u64,
    /// Workers routed to now.
    pub live_workers: usize,
    /// Workers in the config, or still stopping.
    pub workers: usize,
}

/// Whether the config file in force is the one on disk, in the coordinator's `/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigState {
    /// The file.
    pub path: String,
    /// When the config in force was loaded, in unix milliseconds.
    pub loaded_at_unix_ms: u64,
    /// Its version.
    pub version: String,
    /// Whether the file on disk is in force.
    pub valid: bool,
    /// Why it is not, if it is not: invalid, or changing a key fixed while the cluster runs.
    pub error: Option<String>,
}

/// The coordinator's reply to `GET /stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorStats {
    /// Every worker, in URL order.
    pub workers: Vec<WorkerEntry>,
    /// The totals.
    pub cluster: ClusterTotals,
    /// The config status.
    pub config: ConfigState,
}

/// The coordinator's reply to `GET /ready`: `200` while some worker takes requests, else `503`
/// with `error` saying why, so that a load balancer sends clients only where they are served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorReady {
    /// Whether some worker is ready.
    pub ready: bool,
    /// Workers routed to now.
    pub live_workers: usize,
    /// Why it is not ready, if it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Something that happened in the cluster, recorded when it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Its number, one more than the event before: a reader skips those it has.
    pub seq: u64,
    /// When, in unix milliseconds.
    pub at_unix_ms: u64,
    /// The worker's URL, or `None` for the coordinator's config.
    pub worker: Option<String>,
    /// What happened, for a human to read.
    pub message: String,
}

/// One worker in `/dashboard.json`: its `/stats` entry and what the dashboard adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashboardWorker {
    /// Its entry in the coordinator's `/stats`.
    #[serde(flatten)]
    pub entry: WorkerEntry,
    /// Requests routed to it per second, since the previous snapshot.
    pub requests_per_s: Option<f64>,
    /// Items it acknowledged per second, since the previous snapshot.
    pub items_per_s: Option<f64>,
    /// From its `/stats`: items acknowledged, not yet merged.
    pub pending_items: Option<u64>,
    /// From its `/stats`: how long the oldest of those has waited, in seconds.
    pub merge_lag_s: Option<f64>,
    /// From its `/stats`: its tenants in quarantine.
    pub quarantined: Vec<Quarantined>,
    /// Why its `/stats` could not be read this time, if so.
    pub stats_error: Option<String>,
}

/// The cluster's totals in `/dashboard.json`: `/stats`' and the rates and backlog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DashboardCluster {
    /// The coordinator's `/stats` totals.
    #[serde(flatten)]
    pub totals: ClusterTotals,
    /// Requests per second over every worker.
    pub requests_per_s: Option<f64>,
    /// Items per second over every worker.
    pub items_per_s: Option<f64>,
    /// Items acknowledged, not yet merged, over every worker that said.
    pub pending_items: Option<u64>,
    /// The longest any of them has waited, in seconds.
    pub oldest_pending_s: Option<f64>,
}

/// One worker at one refresh, for the charts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSample {
    /// Items per second.
    pub items_per_s: Option<f64>,
    /// Items not yet merged.
    pub pending_items: Option<u64>,
    /// How long the oldest of those has waited.
    pub merge_lag_s: Option<f64>,
}

/// The cluster at one refresh, for the charts. A figure nobody could read is `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When, in unix milliseconds.
    pub t_unix_ms: u64,
    /// Items per second.
    pub items_per_s: Option<f64>,
    /// Requests per second.
    pub requests_per_s: Option<f64>,
    /// Items not yet merged.
    pub pending_items: Option<u64>,
    /// How long the oldest of those has waited.
    pub oldest_pending_s: Option<f64>,
    /// Each worker, by URL.
    pub workers: std::collections::BTreeMap<String, WorkerSample>,
}

/// The coordinator's reply to `GET /dashboard.json`: what the dashboard shows (see README.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dashboard {
    /// When this snapshot was taken, in unix milliseconds.
    pub taken_at_unix_ms: u64,
    /// How often it is refreshed while watched, in seconds.
    pub refresh_s: f64,
    /// Every worker.
    pub workers: Vec<DashboardWorker>,
    /// The totals.
    pub cluster: DashboardCluster,
    /// The config status.
    pub config: ConfigState,
    /// The samples taken after the reader's `since`.
    pub history: Vec<Sample>,
    /// The events recorded after the reader's `since`, oldest first.
    pub events: Vec<Event>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_from_another_version_is_read_with_defaults_and_unknown_fields_ignored() {
        let ready: Ready = serde_json::from_str(r#"{"ready":true,"config_version":"abc","shiny":1}"#).unwrap();
        assert_eq!(ready.config_version.as_deref(), Some("abc"));
        // A worker that does not say that it answers batches at once gets none pipelined.
        assert_eq!(ready.answers_at_once, AnswersAtOnce { batches: false });
        let stats: WorkerStats = serde_json::from_str(r#"{"pending_items":3,"last_merge":null,"new":[]}"#).unwrap();
        assert_eq!((stats.pending_items, stats.merge_lag_s, stats.last_merge), (3, 0.0, None));
        assert!(serde_json::from_str::<WorkerStats>(r#"{"pending_items":"many"}"#).is_err());
    }

    #[test]
    fn states_are_spelled_as_their_names() {
        for state in WorkerState::ALL {
            assert_eq!(serde_json::to_value(state).unwrap(), state.name());
        }
    }

    #[test]
    fn the_redis_count_timeout_stays_under_the_hop_timeout() {
        assert!(REDIS_COUNT_TIMEOUT < HOP_TIMEOUT);
        assert_eq!(REDIS_COUNT_TIMEOUT, Duration::from_millis(250));
    }
}
