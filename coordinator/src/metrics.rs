//! The coordinator's metrics, served as Prometheus text at `/metrics`, and the log line of each
//! request it could not have a worker answer.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use countapp_server::client_errors;
use countapp_server::http::RequestCounter;
use countapp_server::process_metrics;
use countapp_shared::wire::WorkerState;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::pool::Pool;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The label of a series per worker: its URL.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WorkerLabels {
    worker: String,
}

/// Why the coordinator answered a request with a 5xx of its own, or passed a worker's on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Cause {
    /// No worker was live for the whole wait: 503.
    NoLiveWorker,
    /// Live workers were tried, and each was late or unreachable: 503.
    WorkersUnreachable,
    /// The workers tried pushed back (503 with `Retry-After`: merging behind, bodies in flight),
    /// passed on.
    PushBack,
    /// The workers tried failed otherwise (their tenant store down), their 5xx passed on.
    WorkerError,
    /// The workers' bytes were no reply: 502.
    BadReply,
}

impl Cause {
    const ALL: [Cause; 5] =
        [Cause::NoLiveWorker, Cause::WorkersUnreachable, Cause::PushBack, Cause::WorkerError, Cause::BadReply];

    /// The cause as the `cause` label and the log spell it.
    fn label(self) -> &'static str {
        match self {
            Cause::NoLiveWorker => "no_live_worker",
            Cause::WorkersUnreachable => "workers_unreachable",
            Cause::PushBack => "push_back",
            Cause::WorkerError => "worker_error",
            Cause::BadReply => "bad_reply",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

/// At most one log line per cause in this time, however many requests fail: a cluster with no
/// worker under load would otherwise write a line per request.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// The buckets of a hop's duration, in seconds: from a pipelined count to the hop's timeout.
const HOP_BUCKETS: [f64; 13] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

fn hop_histogram() -> Histogram {
    Histogram::new(HOP_BUCKETS)
}

/// The coordinator's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    /// Requests sent again to another worker after a failure.
    pub(crate) retries: Counter,
    /// Requests answered with a 5xx, by cause.
    failed: Family<CauseLabels, Counter>,
    /// When each cause was last logged, and how many failed since without a line.
    failed_logged: Mutex<HashMap<Cause, (Instant, u64)>>,
    /// What the hop to the workers does, shared with every server thread's connections.
    pub(crate) hop: HopCounters,
    /// How long each hop to a worker took, reply or not.
    hop_seconds: Family<WorkerLabels, Histogram, fn() -> Histogram>,
    workers: Family<StateLabels, Gauge>,
    restarts: Family<WorkerLabels, Counter>,
    /// The restarts already counted per worker URL: a member's own count starts again at 0
    /// when it is removed and added back, while the counter never goes down.
    restarts_counted: Mutex<HashMap<String, u64>>,
    pending_items: Family<WorkerLabels, Gauge>,
    merge_lag_seconds: Family<WorkerLabels, Gauge<f64, AtomicU64>>,
    reload_successful: Gauge,
    reload_success_time: Gauge<f64, AtomicU64>,
}

/// The hop's counters: with requests pipelined, fewer writes than requests forwarded, and few
/// connections.
#[derive(Clone, Default)]
pub(crate) struct HopCounters {
    /// Connections opened to workers.
    pub(crate) connections: Counter,
    /// Writes of requests to workers, each carrying one request or several.
    pub(crate) writes: Counter,
}

impl Metrics {
    /// The coordinator's metrics, with the request counter the HTTP middleware fills.
    pub(crate) fn new() -> (Metrics, RequestCounter) {
        let mut registry = Registry::with_prefix("countapp_coordinator");
        let requests = RequestCounter::registered(&mut registry);
        client_errors::register(&mut registry);
        process_metrics::register_build_info(&mut registry, env!("CARGO_PKG_VERSION"));
        let retries = Counter::default();
        registry.register("retries", "Requests retried on another worker after a failure", retries.clone());
        let failed = Family::<CauseLabels, Counter>::default();
        for cause in Cause::ALL {
            // Every cause from the start, at 0: an alert on a rate sees a series before its first 503.
            let _ = failed.get_or_create(&CauseLabels { cause: cause.label() });
        }
        registry.register(
            "unavailable",
            "Requests no worker answered well, by cause: no worker live, every one late or unreachable, \
             their push-back or error passed on, or no reply (502)",
            failed.clone(),
        );
        let hop = HopCounters::default();
        registry.register("worker_connections", "Connections opened to workers", hop.connections.clone());
        registry.register(
            "worker_writes",
            "Writes of requests to workers; fewer than the requests when several share a write",
            hop.writes.clone(),
        );
        let hop_seconds = Family::<WorkerLabels, Histogram, fn() -> Histogram>::new_with_constructor(hop_histogram);
        registry.register(
            "hop_duration_seconds",
            "Time from sending a request to a worker to its reply, or to the failure, per worker",
            hop_seconds.clone(),
        );
        let workers = Family::<StateLabels, Gauge>::default();
        registry.register("workers", "Workers by state", workers.clone());
        let restarts = Family::<WorkerLabels, Counter>::default();
        registry.register("worker_restarts", "Worker respawns after its process exited, per worker", restarts.clone());
        let pending_items = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "worker_pending_items",
            "Items a ready worker acknowledged and has not merged, as of its last health check",
            pending_items.clone(),
        );
        let merge_lag_seconds = Family::<WorkerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "worker_merge_lag_seconds",
            "How far behind a ready worker's merging is, as of its last health check",
            merge_lag_seconds.clone(),
        );
        let reload_successful = Gauge::default();
        registry.register(
            "config_last_reload_successful",
            "Whether the config file on disk is in force (1), or its last edit was refused (0)",
            reload_successful.clone(),
        );
        let reload_success_time = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the config in force was loaded, in seconds since the unix epoch",
            reload_success_time.clone(),
        );
        let metrics = Metrics {
            registry,
            retries,
            failed,
            failed_logged: Mutex::new(HashMap::new()),
            hop,
            hop_seconds,
            workers,
            restarts,
            restarts_counted: Mutex::new(HashMap::new()),
            pending_items,
            merge_lag_seconds,
            reload_successful,
            reload_success_time,
        };
        metrics.config_loaded(SystemTime::now());
        (metrics, requests)
    }

    /// Counts a request answered with a 5xx for `cause`, and logs it: at once for the first in
    /// a while, then at most once per [`LOG_EVERY`] and cause, with how many there were since.
    pub(crate) fn failed(&self, cause: Cause, status: u16, why: &str) {
        self.failed.get_or_create(&CauseLabels { cause: cause.label() }).inc();
        let mut logged = self.failed_logged.lock();
        let now = Instant::now();
        match logged.get_mut(&cause) {
            Some((at, unlogged)) if now.duration_since(*at) < LOG_EVERY => *unlogged += 1,
            entry => {
                let more = entry.map_or(0, |(_, unlogged)| *unlogged);
                tracing::warn!(
                    cause = cause.label(),
                    status,
                    error = why,
                    more_since_last_line = more,
                    "request not served by a worker"
                );
                logged.insert(cause, (now, 0));
            }
        }
    }

    /// Records a hop to the worker at `url` that took `took`.
    pub(crate) fn hop_took(&self, url: &str, took: Duration) {
        self.hop_seconds.get_or_create(&WorkerLabels { worker: url.to_owned() }).observe(took.as_secs_f64());
    }

    /// Records that a config loaded at `at` is in force and the file on disk is.
    pub(crate) fn config_loaded(&self, at: SystemTime) {
        self.reload_successful.set(1);
        self.reload_success_time.set(at.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
    }

    /// Records that the file on disk was refused.
    pub(crate) fn config_refused(&self) {
        self.reload_successful.set(0);
    }

    /// The metrics as Prometheus (OpenMetrics) text, with the workers' gauges read now.
    pub(crate) fn render(&self, pool: &Pool) -> String {
        let members = pool.members();
        let mut by_state: HashMap<WorkerState, i64> = HashMap::new();
        self.pending_items.clear();
        self.merge_lag_seconds.clear();
        {
            let mut counted = self.restarts_counted.lock();
            for member in &members {
                let status = member.status();
                *by_state.entry(status.state).or_default() += 1;
                let labels = WorkerLabels { worker: member.url.as_str().to_owned() };
                let before = counted.entry(labels.worker.clone()).or_default();
                let restarts = self.restarts.get_or_create(&labels);
                restarts.inc_by(status.restarts.saturating_sub(*before));
                *before = status.restarts;
                if status.state == WorkerState::Ready {
                    if let Some(pending) = status.pending_items {
                        self.pending_items.get_or_create(&labels).set(i64::try_from(pending).unwrap_or(i64::MAX));
                    }
                    if let Some(lag) = status.merge_lag_s {
                        self.merge_lag_seconds.get_or_create(&labels).set(lag);
                    }
                }
            }
        }
        for state in WorkerState::ALL {
            let count = by_state.get(&state).copied().unwrap_or(0);
            self.workers.get_or_create(&StateLabels { state: state.name() }).set(count);
        }
        process_metrics::encode(&self.registry)
    }
}
