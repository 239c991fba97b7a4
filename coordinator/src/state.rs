//! What every request handler of the coordinator shares.

use std::sync::Arc;

use countapp_server::edge::budget::BodyBudget;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::cluster_view::ClusterView;
use crate::metrics::Metrics;
use crate::stats::ConfigStatus;
use crate::supervisor::Context;

/// The coordinator's shared state, behind `web::Data`.
pub(crate) struct AppState {
    /// The workers, the config in force and the clients.
    pub(crate) ctx: Arc<Context>,
    /// Shared with the dashboard's view, which shows it.
    pub(crate) config_status: Arc<Mutex<ConfigStatus>>,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
    /// The dashboard's shared snapshot of the cluster, refreshed by its own task.
    pub(crate) cluster_view: Arc<ClusterView>,
    /// The bytes of request bodies held now, over every connection.
    pub(crate) bodies: BodyBudget,
}
