//! The `worker` binary: `worker <port> [--config PATH] [--host IP]`, normally started by the
//! coordinator. It reads the config, then hands over to [`countapp_worker::startup`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use countapp_shared::config::Config;
use countapp_worker::startup::{Worker, WorkerSettings};

/// The environment variable through which the coordinator hands a worker its shutdown token;
/// unlike an argument, it is not visible to other users in the process list.
const TOKEN_VAR: &str = "COUNTAPP_SHUTDOWN_TOKEN";

/// A CountApp worker: durable ingest and shared counts over HTTP.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The port to listen on.
    port: u16,
    /// The cluster's config file.
    #[arg(long, default_value = "config.yaml")]
    config: PathBuf,
    /// The address to bind. Defaults to the host of this port's URL in the config, else
    /// 127.0.0.1: a worker never listens on every interface unless told to.
    #[arg(long)]
    host: Option<IpAddr>,
    /// Threads serving HTTP; the cluster's parallelism comes from its worker processes.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    countapp::init_logging();
    let cli = Cli::parse();
    let config = Config::load(&cli.config).with_context(|| format!("loading {}", cli.config.display()))?;
    let host = cli.host.unwrap_or_else(|| {
        config
            .workers
            .iter()
            .filter(|url| url.port() == cli.port)
            .find_map(|url| url.bind_addr())
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |addr| addr.ip())
    });
    let token = std::env::var(TOKEN_VAR).ok();
    let mut settings = WorkerSettings::from_config(&config, SocketAddr::new(host, cli.port), token);
    settings.http_threads = cli.threads.max(1);
    let worker = Worker::build(settings).context("starting the worker")?;
    worker.run_until_stopped().await.context("running the worker")
}
