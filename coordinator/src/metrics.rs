//! The coordinator's counters, served as Prometheus text at `/metrics`.

use countapp_server::client_errors;
use countapp_server::http::RequestCounter;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::pool::Pool;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// The coordinator's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    /// Requests sent again to another worker after a failure.
    pub(crate) retries: Counter,
    /// Requests answered 503 because no worker was live.
    pub(crate) unavailable: Counter,
    /// What the hop to the workers does, shared with every server thread's connections.
    pub(crate) hop: HopCounters,
    workers: Family<StateLabels, Gauge>,
    restarts: Gauge,
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
        let retries = Counter::default();
        registry.register("retries", "Requests retried on another worker after a failure", retries.clone());
        let unavailable = Counter::default();
        registry.register("unavailable", "Requests answered 503 because no worker was live", unavailable.clone());
        let hop = HopCounters::default();
        registry.register("worker_connections", "Connections opened to workers", hop.connections.clone());
        registry.register(
            "worker_writes",
            "Writes of requests to workers; fewer than the requests when several share a write",
            hop.writes.clone(),
        );
        let workers = Family::<StateLabels, Gauge>::default();
        registry.register("workers", "Workers by state", workers.clone());
        let restarts = Gauge::default();
        registry.register("worker_restarts", "Worker respawns after an exit, over all workers", restarts.clone());
        (Metrics { registry, retries, unavailable, hop, workers, restarts }, requests)
    }

    /// The metrics as Prometheus (OpenMetrics) text, with the workers' gauges read now.
    pub(crate) fn render(&self, pool: &Pool) -> String {
        self.workers.clear();
        let mut restarts = 0;
        for member in pool.members() {
            let status = member.status();
            let state = serde_json::to_value(status.state).ok().and_then(|v| v.as_str().map(str::to_owned));
            self.workers.get_or_create(&StateLabels { state: state.unwrap_or_default() }).inc();
            restarts += status.restarts;
        }
        self.restarts.set(i64::try_from(restarts).unwrap_or(i64::MAX));
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
