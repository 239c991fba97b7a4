//! What every request handler of the coordinator shares.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use countapp_server::edge::budget::BodyBudget;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::cluster_view::ClusterView;
use crate::metrics::Metrics;
use crate::supervisor::Context;

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

/// The coordinator's shared state, behind `web::Data`.
pub(crate) struct AppState {
    /// The workers, the config in force and the clients.
    pub(crate) ctx: Arc<Context>,
    pub(crate) config_status: Mutex<ConfigStatus>,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
    /// The dashboard's shared snapshot of the cluster.
    pub(crate) cluster_view: ClusterView,
    /// The bytes of request bodies held now, over every connection.
    pub(crate) bodies: BodyBudget,
}
