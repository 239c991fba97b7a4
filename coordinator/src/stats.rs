//! The coordinator's `/stats`: every worker's state and counts, the cluster's totals and the
//! config status, built from the pool. Both `GET /stats` and the dashboard's snapshot take it
//! from here, so that neither depends on the other.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use countapp_server::http::RequestCounter;
use countapp_shared::wire::{ClusterTotals, ConfigState, CoordinatorStats, WorkerEntry, unix_ms};

use crate::pool::{Member, Pool};

/// Whether the config file in force is the one on disk.
#[derive(Debug, Clone)]
pub(crate) struct ConfigStatus {
    pub(crate) path: PathBuf,
    /// When the config in force was loaded.
    pub(crate) loaded_at: SystemTime,
    /// The version of the config in force, as each process reports it.
    pub(crate) version: String,
    /// Why the file on disk is not in force, if it is not: invalid, or changing a fixed key.
    pub(crate) error: Option<String>,
}

impl ConfigStatus {
    /// As `/stats` shows it.
    fn state(&self) -> ConfigState {
        ConfigState {
            path: self.path.display().to_string(),
            loaded_at_unix_ms: unix_ms(self.loaded_at),
            version: self.version.clone(),
            valid: self.error.is_none(),
            error: self.error.clone(),
        }
    }
}

/// The `/stats` body of a coordinator whose workers are `pool`, which answered `requests`.
pub(crate) fn coordinator_stats(pool: &Pool, config: &ConfigStatus, requests: &RequestCounter) -> CoordinatorStats {
    let workers: Vec<WorkerEntry> = pool.members().iter().map(|member| entry(member)).collect();
    let cluster = ClusterTotals {
        requests: requests.served(),
        requests_forwarded: workers.iter().map(|w| w.requests).sum(),
        items_accepted: workers.iter().map(|w| w.items_accepted).sum(),
        live_workers: pool.live_count(),
        workers: workers.len(),
    };
    CoordinatorStats { workers, cluster, config: config.state() }
}

/// A member's entry.
fn entry(member: &Member) -> WorkerEntry {
    let status = member.status();
    let (last_error_at_unix_ms, last_error) = status.last_error.map(|(at, why)| (unix_ms(at), why)).unzip();
    WorkerEntry {
        url: member.url.as_str().to_owned(),
        local: member.local,
        pid: status.pid,
        state: status.state,
        adopted: status.adopted,
        requests: member.requests.load(Ordering::Relaxed),
        items_accepted: member.items.load(Ordering::Relaxed),
        restarts: status.restarts,
        last_error,
        last_error_at_unix_ms,
        last_error_past: last_error_at_unix_ms.is_some() && status.last_error_past,
        not_ready: status.not_ready,
        restarted_at_unix_ms: status.restarted_at.map(unix_ms),
        config_version: status.config_version,
    }
}
