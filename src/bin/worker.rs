//! The `worker` binary: `worker <port> [--config PATH] [--host IP]`, normally started by the
//! coordinator. It reads the config, then hands over to [`countapp_worker::startup`].
//!
//! A coordinator hands its worker the config in force (in the environment), so that a worker
//! respawned while the file is being edited starts on the last good config; a worker run by
//! hand reads and then follows the file.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use countapp::Process;
use countapp_shared::config::Config;
use countapp_shared::spawn::{CONFIG_ENV, TOKEN_ENV};
use countapp_worker::live_config::ConfigSource;
use countapp_worker::startup::{Worker, WorkerSettings};

/// A CountApp worker: durable ingest and shared counts over HTTP.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The port to listen on.
    port: u16,
    /// The cluster's config file, read and then followed when the worker is run by hand (a
    /// coordinator hands its workers the config in force instead).
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    countapp::exit_status(run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Fail points named in FAILPOINTS, in the builds made for the fault-injection tests.
    #[cfg(feature = "failpoints")]
    let _fail_points = fail::FailScenario::setup();
    let (config, config_source) = match std::env::var(CONFIG_ENV) {
        Ok(json) => (
            Config::from_json(&json).context("reading the config the coordinator handed over")?,
            ConfigSource::Coordinator,
        ),
        Err(_) => {
            let config = Config::load(&cli.config).with_context(|| format!("loading {}", cli.config.display()))?;
            (config, ConfigSource::File(cli.config.clone()))
        }
    };
    let host = cli.host.unwrap_or_else(|| {
        config
            .workers
            .iter()
            .filter(|url| url.port() == cli.port)
            .find_map(|url| url.bind_addr())
            .map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |addr| addr.ip())
    });
    // The config says how to log, so logging starts once it is read; an error before then is
    // the process's exit report.
    let rotation = (config.worker_log_max_bytes(), config.worker_log_files());
    countapp::init_logging(config.log_format, Process::Worker(cli.port), Some(rotation));
    let token = std::env::var(TOKEN_ENV).ok();
    let settings = WorkerSettings {
        listen: SocketAddr::new(host, cli.port),
        config,
        config_source,
        shutdown_token: token,
        http_threads: cli.threads.max(1),
    };
    actix_web::rt::System::new().block_on(async move {
        let worker = Worker::build(settings).context("starting the worker")?;
        worker.run_until_stopped().await.context("running the worker")
    })
}
