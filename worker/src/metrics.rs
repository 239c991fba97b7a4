//! The worker's counters, served as Prometheus text at `/metrics` and summed up at `/stats`.

use countapp_shared::http::RequestCounter;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::StoreStats;

/// The worker's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    items_accepted: Counter,
    flushes: Counter,
    flush_seconds: Histogram,
    pending_items: Gauge,
    log_bytes: Counter,
}

impl Metrics {
    /// The worker's metrics, with the request counter the HTTP middleware fills.
    pub(crate) fn new() -> (Metrics, RequestCounter) {
        let mut registry = Registry::with_prefix("countapp_worker");
        let requests = RequestCounter::registered(&mut registry);
        let items_accepted = Counter::default();
        registry.register("items_accepted", "Items acknowledged as durable", items_accepted.clone());
        let flushes = Counter::default();
        registry.register("flushes", "Flushes of the log into the tenant files", flushes.clone());
        let buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let flush_seconds = Histogram::new(buckets);
        registry.register("flush_duration_seconds", "Time a flush takes", flush_seconds.clone());
        let pending_items = Gauge::default();
        registry.register("pending_items", "Items acknowledged but not flushed yet", pending_items.clone());
        let log_bytes = Counter::default();
        registry.register("log_bytes", "Bytes appended to the write-ahead log", log_bytes.clone());
        let metrics = Metrics { registry, items_accepted, flushes, flush_seconds, pending_items, log_bytes };
        (metrics, requests)
    }

    /// Counts items acknowledged.
    pub(crate) fn accepted(&self, items: u64) {
        self.items_accepted.inc_by(items);
    }

    /// Records a finished flush.
    pub(crate) fn flushed(&self, seconds: f64) {
        self.flushes.inc();
        self.flush_seconds.observe(seconds);
    }

    /// Items acknowledged so far.
    pub(crate) fn items_accepted(&self) -> u64 {
        self.items_accepted.get()
    }

    /// The metrics as Prometheus (OpenMetrics) text, with the store's gauges read now.
    pub(crate) fn render(&self, store: Option<&StoreStats>) -> String {
        if let Some(stats) = store {
            self.pending_items.set(i64::try_from(stats.pending_items).unwrap_or(i64::MAX));
            let behind = stats.log_bytes_appended.saturating_sub(self.log_bytes.get());
            self.log_bytes.inc_by(behind);
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
