//! The worker's counters, served as Prometheus text at `/metrics` and summed up at `/stats`.

use std::sync::atomic::AtomicU64;

use countapp_server::client_errors;
use countapp_server::http::RequestCounter;
use countapp_server::process_metrics;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use countapp_store::{MergeReport, StoreStats};

/// The worker's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    items_accepted: Counter,
    merges: Counter,
    merge_seconds: Histogram,
    merged_items: Counter,
    new_ids: Counter,
    damaged_log_bytes: Counter,
    torn_log_tail_bytes: Counter,
    pending_items: Gauge,
    merge_lag_seconds: Gauge<f64, AtomicU64>,
    ids_in_memory: Gauge,
    quarantined_tenants: Gauge,
    failed_shards: Counter,
    rebuilt_shard_records: Counter,
    log_bytes: Counter,
    barriers: Counter,
}

impl Metrics {
    /// The worker's metrics, with the request counter the HTTP middleware fills.
    pub(crate) fn new() -> (Metrics, RequestCounter) {
        let mut registry = Registry::with_prefix("countapp_worker");
        let requests = RequestCounter::registered(&mut registry);
        client_errors::register(&mut registry);
        process_metrics::register_build_info(&mut registry, env!("CARGO_PKG_VERSION"));
        let items_accepted = Counter::default();
        registry.register("items_accepted", "Items acknowledged as durable", items_accepted.clone());
        let merges = Counter::default();
        registry.register("merges", "Merge rounds that read or deleted log files", merges.clone());
        let buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let merge_seconds = Histogram::new(buckets);
        registry.register("merge_duration_seconds", "Time a merge round takes", merge_seconds.clone());
        let merged_items = Counter::default();
        registry.register("merged_items", "Items merged into the shards this worker owns", merged_items.clone());
        let new_ids = Counter::default();
        registry.register("new_ids", "Ids that were new to their tenant when merged", new_ids.clone());
        let damaged_log_bytes = Counter::default();
        registry.register(
            "damaged_log_bytes",
            "Bytes of damaged records skipped in the middle of log files, each such file kept aside under damaged/",
            damaged_log_bytes.clone(),
        );
        let torn_log_tail_bytes = Counter::default();
        registry.register(
            "torn_log_tail_bytes",
            "Bytes of torn log tails dropped: crashes mid-append, never acknowledged",
            torn_log_tail_bytes.clone(),
        );
        let pending_items = Gauge::default();
        registry.register(
            "pending_items",
            "Items this worker acknowledged still in its log files",
            pending_items.clone(),
        );
        let merge_lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "merge_lag_seconds",
            "How far behind this worker's merging is: the age of the oldest item it acknowledged and has not merged",
            merge_lag_seconds.clone(),
        );
        let ids_in_memory = Gauge::default();
        registry.register(
            "ids_in_memory",
            "Ids held in memory for the shards this worker merges",
            ids_in_memory.clone(),
        );
        let quarantined_tenants = Gauge::default();
        registry.register(
            "quarantined_tenants",
            "Tenants set apart in the shards this worker merges, a file of theirs unreadable",
            quarantined_tenants.clone(),
        );
        let failed_shards = Counter::default();
        registry.register(
            "failed_shards",
            "Shards left out of a merge round by an I/O error on their lock, record or directory, tried again later",
            failed_shards.clone(),
        );
        let rebuilt_shard_records = Counter::default();
        registry.register(
            "rebuilt_shard_records",
            "Shard records found damaged and rebuilt, the damaged file kept aside under damaged/",
            rebuilt_shard_records.clone(),
        );
        let log_bytes = Counter::default();
        registry.register("log_bytes", "Bytes appended to the write-ahead log", log_bytes.clone());
        let barriers = Counter::default();
        registry.register(
            "barriers",
            "Barriers this worker led: each closed every worker's log and settled the shards of the strong reads, waited batches and deletes that joined it",
            barriers.clone(),
        );
        let metrics = Metrics {
            registry,
            items_accepted,
            merges,
            merge_seconds,
            merged_items,
            new_ids,
            damaged_log_bytes,
            torn_log_tail_bytes,
            pending_items,
            merge_lag_seconds,
            ids_in_memory,
            quarantined_tenants,
            failed_shards,
            rebuilt_shard_records,
            log_bytes,
            barriers,
        };
        (metrics, requests)
    }

    /// Counts items acknowledged.
    pub(crate) fn accepted(&self, items: u64) {
        self.items_accepted.inc_by(items);
    }

    /// Records a merge round that did something; `seconds` is what it took.
    pub(crate) fn merged(&self, seconds: f64, report: &MergeReport) {
        if report.log_files > 0 || report.deleted_files > 0 {
            self.merges.inc();
            self.merge_seconds.observe(seconds);
        }
        self.merged_items.inc_by(report.items);
        self.new_ids.inc_by(report.new_ids);
        self.damaged_log_bytes.inc_by(report.damaged_bytes);
        self.torn_log_tail_bytes.inc_by(report.torn_tail_bytes);
        self.failed_shards.inc_by(report.failed_shards);
        self.rebuilt_shard_records.inc_by(report.rebuilt_records);
    }

    /// Counts a barrier this worker led, passed or not.
    pub(crate) fn led_barrier(&self) {
        self.barriers.inc();
    }

    /// Items acknowledged so far.
    pub(crate) fn items_accepted(&self) -> u64 {
        self.items_accepted.get()
    }

    /// The metrics as Prometheus (OpenMetrics) text, with the store's gauges read now.
    pub(crate) fn render(&self, store: Option<&StoreStats>) -> String {
        if let Some(stats) = store {
            self.pending_items.set(i64::try_from(stats.pending_items).unwrap_or(i64::MAX));
            self.merge_lag_seconds.set(stats.merge_lag.as_secs_f64());
            self.ids_in_memory.set(i64::try_from(stats.ids_in_memory.0).unwrap_or(i64::MAX));
            self.quarantined_tenants.set(stats.quarantined.len() as i64);
            let behind = stats.log_bytes_appended.saturating_sub(self.log_bytes.get());
            self.log_bytes.inc_by(behind);
        }
        process_metrics::encode(&self.registry)
    }
}
