//! What every request handler of a worker shares.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use countapp_server::edge::budget::BodyBudget;
use countapp_shared::token;

use crate::barrier::Barriers;
use crate::live_config::LiveConfig;
use crate::metrics::Metrics;
use countapp_store::Store;
use tokio_util::sync::CancellationToken;

/// The worker's shared state, behind `web::Data`.
pub(crate) struct AppState {
    /// The id the worker's log is kept under, `<ip>-<port>`.
    pub(crate) worker_id: String,
    /// The address it listens on.
    pub(crate) addr: SocketAddr,
    /// Set once the store is open and its log recovered: until then the worker is alive but
    /// not ready, and refuses ingest with a 503 that the coordinator retries elsewhere.
    store: OnceLock<Arc<Store>>,
    /// The config in force: the limits each request is held to.
    pub(crate) config: Arc<LiveConfig>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: CancellationToken,
    /// The token `POST /shutdown` must carry; without one, only a signal stops the worker.
    shutdown_token: Option<String>,
    /// The bytes of request bodies held now, over every connection.
    pub(crate) bodies: BodyBudget,
    /// The barriers that strong reads and `wait=counted` batches wait for.
    pub(crate) barriers: Barriers,
}

impl AppState {
    pub(crate) fn new(
        worker_id: String,
        addr: SocketAddr,
        config: Arc<LiveConfig>,
        shutdown: CancellationToken,
        shutdown_token: Option<String>,
        metrics: Arc<Metrics>,
    ) -> AppState {
        AppState {
            worker_id,
            addr,
            barriers: Barriers::default(),
            store: OnceLock::new(),
            config,
            metrics,
            shutdown,
            shutdown_token,
            bodies: BodyBudget::default(),
        }
    }

    /// The store, once recovered.
    pub(crate) fn store(&self) -> Option<&Arc<Store>> {
        self.store.get()
    }

    /// Makes the recovered store available to the handlers.
    pub(crate) fn set_store(&self, store: Arc<Store>) {
        // Only the start-up task sets it, once.
        let _ = self.store.set(store);
    }

    /// Whether `presented` is the shutdown token, compared in constant time so that response
    /// timing reveals nothing about the token.
    pub(crate) fn is_shutdown_token(&self, presented: &str) -> bool {
        self.shutdown_token.as_deref().is_some_and(|token| token::same(token, presented))
    }

    /// This process's proof that it holds its coordinator's token, for `challenge`; `None` for
    /// a worker started without one.
    pub(crate) fn identity(&self, challenge: &str) -> Option<token::Identity> {
        let pid = std::process::id();
        let proof = token::proof(self.shutdown_token.as_deref()?, challenge, self.addr.port(), pid);
        Some(token::Identity { pid, proof })
    }
}
