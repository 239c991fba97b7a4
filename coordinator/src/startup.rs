//! Starting and stopping the coordinator: the one place that wires the config watch, the
//! supervisor, the HTTP server and the shutdown signal together. The `coordinator` binary and
//! the tests both use it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};
use countapp_server::edge;
use countapp_server::edge::budget::BodyBudget;
use countapp_server::edge::stalled::{self, Timeout};
use countapp_server::http::count_requests;
use countapp_server::site_guard::SiteGuard;
use countapp_shared::config::{self, Config, FIXED_KEYS};
use countapp_shared::shutdown::terminate_signal;
use parking_lot::Mutex;
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster_view::{self, ClusterView};
use crate::control;
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::routes;
use crate::state::AppState;
use crate::stats::ConfigStatus;
use crate::supervisor::{Context, Supervisor};
use crate::token_file;
use crate::upstream::Upstream;

/// How long a graceful stop waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the coordinator could not start or stopped badly.
#[derive(Debug, Error)]
pub enum CoordinatorError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The token file could not be written.
    #[error("cannot keep the token in {}: {error}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// Anything else of the runtime: signal handlers, the HTTP server.
    #[error("{0}")]
    Runtime(String),
}

/// A coordinator whose socket is bound; [`Coordinator::run_until_stopped`] runs it.
pub struct Coordinator {
    server: actix_web::dev::Server,
    addr: SocketAddr,
    state: web::Data<AppState>,
    config: Config,
}

impl Coordinator {
    /// Binds `config.listen` (port 0 picks a free port) and prepares the server. Workers are
    /// spawned by [`Coordinator::run_until_stopped`] from `worker_bin`, with `config_path`.
    pub fn build(config_path: &Path, config: Config, worker_bin: PathBuf) -> Result<Coordinator, CoordinatorError> {
        let bind_error = |error| CoordinatorError::Bind { addr: config.listen.0, error };
        let listener = TcpListener::bind(config.listen.0).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let token = token_file::take_over_or_create(&config.worker_logs)
            .map_err(|error| CoordinatorError::TokenFile { path: token_file::path(&config.worker_logs), error })?;
        let ctx = Arc::new(Context {
            worker_bin,
            config_path: config_path.to_path_buf(),
            token,
            config: watch::Sender::new(Arc::new(config.clone())),
            http: control::client().map_err(|e| CoordinatorError::Runtime(format!("building the HTTP client: {e}")))?,
            pool: Arc::new(Pool::default()),
        });
        let (metrics, requests) = Metrics::new();
        let requests = web::Data::new(requests);
        let config_status = Arc::new(Mutex::new(ConfigStatus {
            path: config_path.to_path_buf(),
            loaded_at: SystemTime::now(),
            version: config.version(),
            error: None,
        }));
        let state = web::Data::new(AppState {
            cluster_view: Arc::new(ClusterView::new(ctx.clone(), config_status.clone(), requests.clone())),
            ctx,
            config_status,
            metrics,
            shutdown: CancellationToken::new(),
            bodies: BodyBudget::default(),
        });
        let data = state.clone();
        let threads = server_threads();
        let open_files = edge::process::prepare();
        let ctx = state.ctx.clone();
        let timeout: Timeout = Arc::new(move || ctx.config().request_timeout());
        let server = HttpServer::new(move || {
            App::new()
                // One client per server thread: its connections then live on that thread's
                // runtime, so a forwarded request never wakes another thread to do its I/O.
                .app_data(web::Data::new(Upstream::new(data.metrics.hop.clone())))
                .app_data(data.clone())
                .app_data(requests.clone())
                .wrap(SiteGuard::listening_on(addr))
                .wrap(from_fn(count_requests))
                .configure(routes::configure)
        })
        .on_connect(stalled::on_connect(timeout))
        .max_connections(edge::process::connections_per_thread(open_files, threads))
        // Heads are timed out by the stalled-connection watch, with a JSON 408.
        .client_request_timeout(Duration::ZERO)
        .keep_alive(edge::KEEP_ALIVE)
        .listen(listener)
        .map_err(bind_error)?
        // Replies are written whole: Nagle's algorithm would only hold back one written while an
        // earlier one is unacknowledged, for a delayed ACK (40 ms), as under pipelining.
        .tcp_nodelay(true)
        .workers(threads)
        .disable_signals()
        .shutdown_timeout(DRAIN_TIMEOUT.as_secs())
        .run();
        Ok(Coordinator { server, addr, state, config })
    }

    /// Runs until SIGTERM, SIGINT or [`Coordinator::shutdown`]: serves, supervises the workers
    /// and follows the config file (re-read at once on SIGHUP); then stops taking requests, lets
    /// those in flight finish, stops every worker gracefully and returns.
    pub async fn run_until_stopped(self) -> Result<(), CoordinatorError> {
        let Coordinator { server, addr, state, mut config } = self;
        let handle = server.handle();
        let serving = tokio::spawn(server);
        tracing::info!(%addr, workers = config.workers.len(), dashboard = %format!("http://{addr}/"), "coordinator listening");
        // Refreshes the dashboard's snapshot, only while someone is looking.
        let cluster_view = tokio::spawn(cluster_view::run(state.cluster_view.clone()));
        let mut supervisor = Supervisor::new(state.ctx.clone());
        supervisor.apply(&config);

        let config_path = state.ctx.config_path.clone();
        let (check_every, check_every_rx) = watch::channel(config.config_check());
        let mut watch = config::watch::watch(&config_path, check_every_rx);
        let signal = terminate_signal();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                true = watch.changed() => {
                    if let Some(new) = reload(&state, &config_path, &config) {
                        check_every.send_replace(new.config_check());
                        move_token_file(&state.ctx.token, &config.worker_logs, &new.worker_logs);
                        supervisor.apply(&new);
                        config = new;
                    }
                }
                () = state.shutdown.cancelled() => break,
                signal = &mut signal => {
                    signal.map_err(|e| CoordinatorError::Runtime(format!("cannot watch signals: {e}")))?;
                    tracing::info!("termination signal");
                    break;
                }
            }
        }
        state.shutdown.cancel();
        cluster_view.abort();
        tracing::info!("stopping: draining requests, then the workers");
        handle.stop(true).await;
        if let Ok(Err(e)) = serving.await {
            tracing::error!(error = %e, "the HTTP server failed");
        }
        supervisor.stop_all().await;
        // No worker holds the token any more: the next run makes its own.
        token_file::remove(&config.worker_logs);
        tracing::info!("stopped");
        Ok(())
    }
}

/// Keeps the token file beside the workers' logs when `worker_logs` moves, so that a coordinator
/// restarted on the edited config finds it.
fn move_token_file(token: &str, from: &Path, to: &Path) {
    if from == to {
        return;
    }
    match token_file::record(to, token) {
        Ok(()) => token_file::remove(from),
        Err(e) => tracing::error!(file = %token_file::path(to).display(), error = %e, "cannot move the token file"),
    }
}

/// Reads the config file again; returns it if it is valid, changes no fixed key, and differs
/// from `current`. An edit refused is logged and shown in `/stats`, and `current` stays in
/// force.
fn reload(state: &AppState, path: &Path, current: &Config) -> Option<Config> {
    let refused = match Config::load(path) {
        Ok(new) => {
            let fixed = current.fixed_changes(&new);
            if fixed.is_empty() {
                let mut status = state.config_status.lock();
                let was_refused = status.error.take().is_some();
                if &new == current {
                    if was_refused {
                        tracing::info!(path = %path.display(), "the config file is in force again");
                        state.ctx.pool.events.record(None, "config file valid again: the config in force is unchanged");
                        state.metrics.config_loaded(status.loaded_at);
                    }
                    return None;
                }
                status.loaded_at = SystemTime::now();
                status.version = new.version();
                tracing::info!(path = %path.display(), version = status.version, "config changed");
                state.ctx.pool.events.record(None, format!("config {} applied", status.version));
                state.metrics.config_loaded(status.loaded_at);
                return Some(new);
            }
            format!(
                "{} cannot change while the cluster runs (of {}); restart the coordinator to change them",
                fixed.join(", "),
                FIXED_KEYS.join(", ")
            )
        }
        Err(e) => e.to_string(),
    };
    let mut status = state.config_status.lock();
    state.metrics.config_refused();
    if status.error.as_ref() != Some(&refused) {
        tracing::error!(path = %path.display(), error = refused, "config edit refused; the last good config stays in force");
        let message = format!("config edit refused, the last good config stays in force: {refused}");
        state.ctx.pool.events.record(None, message);
        status.error = Some(refused);
    }
    None
}

/// The coordinator's server threads: half the cores, at least one. It shares the machine with
/// its workers, which need the other half; and a thread with more connections to serve sleeps
/// less often between requests: on 2 cores, one thread forwards at 20-30% less CPU per request
/// than two (measured with `perf stat` under `make bench`'s load).
fn server_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 2).max(1))
}
