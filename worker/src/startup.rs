//! Starting and stopping a worker: the one place that wires the store, the HTTP server, the
//! periodic flush and the shutdown signal together. The `worker` binary and the tests both use it.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use countapp_server::edge;
use countapp_server::edge::stalled::{self, Timeout};
use countapp_server::http::count_requests;
use countapp_server::site_guard::SiteGuard;
use countapp_shared::config::{self, Config};
use thiserror::Error;
use tracing::Instrument;

use crate::live_config::{ApplyError, ConfigSource, LiveConfig};
use crate::merger::Merger;
use crate::metrics::Metrics;
use crate::peers::worker_id;
use crate::routes;
use crate::state::AppState;
use countapp_shared::shutdown::{WORKER_DRAIN, WORKER_MERGE_WAIT, terminate_signal};
use countapp_store::{Settings, Store, StoreError, StoreOptions};
use tokio_util::sync::CancellationToken;

/// Everything a worker needs to run.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Where to listen: the host and port of the worker's URL. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The cluster's config at start-up.
    pub config: Config,
    /// Where later versions of the config come from.
    pub config_source: ConfigSource,
    /// The token `POST /shutdown` and `PUT /config` must carry, given by the coordinator at
    /// spawn.
    pub shutdown_token: Option<String>,
    /// Threads serving HTTP. One by default: a cluster's parallelism comes from its worker
    /// processes, and on a small machine more threads per worker only add context switches.
    pub http_threads: usize,
}

/// Why a worker could not start or stopped badly.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The store failed to open or to flush at shutdown.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The write-ahead log failed to fsync: the worker stopped at once (fail-stop), for a
    /// restart to replay what its log holds.
    #[error("stopped after a failed fsync of the write-ahead log: {0}")]
    FailStop(String),
    /// Anything else of the runtime: signal handlers, a panicked task.
    #[error("{0}")]
    Runtime(String),
}

/// A worker whose socket is bound; [`Worker::run_until_stopped`] serves until shutdown.
pub struct Worker {
    server: Server,
    addr: SocketAddr,
    state: web::Data<AppState>,
    settings: WorkerSettings,
}

impl Worker {
    /// Binds the worker's socket and prepares its server; nothing is served until
    /// [`Worker::run_until_stopped`].
    pub fn build(settings: WorkerSettings) -> Result<Worker, WorkerError> {
        let bind_error = |error| WorkerError::Bind { addr: settings.listen, error };
        let listener = TcpListener::bind(settings.listen).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let (metrics, requests) = Metrics::new();
        let metrics = Arc::new(metrics);
        let state = web::Data::new(AppState::new(
            worker_id(addr),
            addr,
            Arc::new(LiveConfig::new(settings.config.clone())),
            CancellationToken::new(),
            settings.shutdown_token.clone(),
            metrics,
        ));
        let requests = web::Data::new(requests);
        let data = state.clone();
        let open_files = edge::process::prepare();
        let config = state.config.clone();
        let timeout: Timeout = Arc::new(move || config.get().request_timeout());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(requests.clone())
                .wrap(SiteGuard::listening_on(addr))
                .wrap(from_fn(count_requests))
                .configure(routes::configure)
        })
        .on_connect(stalled::on_connect(timeout))
        .max_connections(edge::process::connections_per_thread(open_files, settings.http_threads))
        // Heads are timed out by the stalled-connection watch, with a JSON 408.
        .client_request_timeout(Duration::ZERO)
        .keep_alive(edge::KEEP_ALIVE)
        .listen(listener)
        .map_err(bind_error)?
        // Replies are written whole: Nagle's algorithm would only hold back one written while an
        // earlier one is unacknowledged, for a delayed ACK (40 ms), as under pipelining.
        .tcp_nodelay(true)
        // Signals are ours to handle: both SIGTERM and SIGINT mean a graceful stop with a flush.
        .workers(settings.http_threads)
        .disable_signals()
        .shutdown_timeout(WORKER_DRAIN.as_secs())
        .run();
        Ok(Worker { server, addr, state, settings })
    }

    /// Serves until shutdown is asked for (`POST /shutdown`, SIGTERM, SIGINT or
    /// [`Worker::shutdown`]): opens the store while already answering `/health`, then serves
    /// and merges in the background; at shutdown it stops taking requests, lets those in flight
    /// finish, flushes and returns.
    pub async fn run_until_stopped(self) -> Result<(), WorkerError> {
        let Worker { server, addr, state, settings } = self;
        let span = tracing::info_span!("worker", port = addr.port());
        async move {
            let handle = server.handle();
            let serving = tokio::spawn(server);
            tracing::info!(%addr, database = %settings.config.database.display(), "listening; opening the store");
            let store = match open_store(&state.config.get(), &state.worker_id).await {
                Ok(store) => store,
                Err(e) => {
                    handle.stop(false).await;
                    return Err(e);
                }
            };
            state.set_store(store.clone());
            // An edit applied while the store was opening found no store to set.
            let config = state.config.get();
            store.apply(&Settings::from_config(&config));
            let following = match &settings.config_source {
                ConfigSource::File(path) => Some(follow_file(path, state.clone().into_inner())),
                ConfigSource::Coordinator => None,
            };
            let merger = Merger::start(store.clone(), state.config.clone(), state.metrics.clone())
                .map_err(|e| WorkerError::Runtime(format!("cannot start the merger: {e}")))?;
            tracing::info!(shards = store.shards(), "ready");

            let shutdown = state.shutdown.clone();
            let mut failure = store.failure();
            tokio::select! {
                Ok(failure) = failure.wait_for(Option::is_some) => {
                    // Fail-stop: nothing more is acknowledged; exit without the final merge,
                    // which would need fsync too, and let the restart replay the log.
                    let why = failure.clone().unwrap_or_default();
                    shutdown.cancel();
                    handle.stop(false).await;
                    return Err(WorkerError::FailStop(why));
                }
                () = shutdown.cancelled() => {}
                signal = terminate_signal() => {
                    signal.map_err(|e| WorkerError::Runtime(format!("cannot watch signals: {e}")))?;
                    tracing::info!("termination signal");
                }
            }
            shutdown.cancel();
            if let Some(following) = following {
                following.abort();
            }
            stop(handle, serving).await;
            let report = tokio::task::spawn_blocking(move || {
                merger.stop();
                let report = store.drain(WORKER_MERGE_WAIT)?;
                store.finish().map(|()| report)
            })
            .await
            .map_err(|e| WorkerError::Runtime(format!("the final flush panicked: {e}")))??;
            tracing::info!(items = report.items, new_ids = report.new_ids, "flushed; stopped");
            Ok(())
        }
        .instrument(span)
        .await
    }
}

async fn open_store(config: &Config, worker_id: &str) -> Result<Arc<Store>, WorkerError> {
    let (database, id) = (config.database.to_path_buf(), worker_id.to_owned());
    let options = StoreOptions::from_config(config);
    let store = tokio::task::spawn_blocking(move || Store::open(&database, &id, options))
        .await
        .map_err(|e| WorkerError::Runtime(format!("opening the store panicked: {e}")))??;
    Ok(Arc::new(store))
}

/// Stops taking connections, and waits for the requests in flight to be answered.
async fn stop(handle: ServerHandle, serving: tokio::task::JoinHandle<std::io::Result<()>>) {
    handle.stop(true).await;
    match serving.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the HTTP server failed"),
        Err(e) => tracing::error!(error = %e, "the HTTP server task panicked"),
    }
}

/// Follows the config file at `path` for a worker run by hand: every valid edit is applied, an
/// invalid one or one of a fixed key is logged and the config in force kept. Aborting the
/// returned task stops following.
fn follow_file(path: &std::path::Path, state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    let config = state.config.get();
    let (check_every, every) = tokio::sync::watch::channel(config.config_check());
    let mut watch = config::watch::watch(path, every);
    let path = path.to_path_buf();
    tokio::spawn(async move {
        while watch.changed().await {
            let applied = Config::load(&path)
                .map_err(ApplyError::from)
                .and_then(|new| state.config.apply(new, state.store().map(|store| &**store)));
            match applied {
                Ok(_) => {
                    check_every.send_replace(state.config.get().config_check());
                }
                Err(e) => tracing::error!(path = %path.display(), error = %e, "config edit not applied"),
            }
        }
    })
}
