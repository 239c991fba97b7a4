//! The `coordinator` binary: `coordinator [--config PATH]`. It reads the config, then hands over
//! to [`countapp_coordinator::startup`], which spawns the workers from the `worker` binary
//! beside this one.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use countapp_coordinator::startup::Coordinator;
use countapp_shared::config::Config;

/// The CountApp coordinator: supervises the workers of a live config.yaml and routes to them.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The cluster's config file; edits take effect while running.
    #[arg(long, default_value = "config.yaml")]
    config: PathBuf,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    countapp::init_logging();
    let cli = Cli::parse();
    let config = Config::load(&cli.config).with_context(|| format!("loading {}", cli.config.display()))?;
    let worker_bin =
        std::env::current_exe().context("finding the coordinator's own executable")?.with_file_name("worker");
    anyhow::ensure!(worker_bin.is_file(), "the worker binary is missing: expected it at {}", worker_bin.display());
    let coordinator = Coordinator::build(&cli.config, config, worker_bin).context("starting the coordinator")?;
    coordinator.run_until_stopped().await.context("running the coordinator")
}
