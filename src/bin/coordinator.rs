//! The `coordinator` binary: `coordinator [--config PATH]`. It reads the config, then hands over
//! to [`countapp_coordinator::startup`], which spawns the workers from the `worker` binary
//! beside this one. `coordinator --check [PATH]` only validates the config, as `nginx -t` and
//! `haproxy -c` do; `coordinator --reset` removes the database and the worker logs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use countapp::Process;
use countapp_coordinator::startup::Coordinator;
use countapp_shared::config::Config;

/// The CountApp coordinator: supervises the workers of a live config.yaml and routes to them.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Exit status: 0 on a clean stop (or a valid config with --check, a done --reset); 1 on an \
                  error, printed with its causes."
)]
struct Cli {
    /// The cluster's config file; edits take effect while running.
    #[arg(long, default_value = "config.yaml")]
    config: PathBuf,
    /// Only check the config file (this one, else --config's): print an OK line and exit 0 if
    /// it is valid, else the error and exit 1. Nothing is started.
    #[arg(long, value_name = "CONFIG", num_args = 0..=1)]
    check: Option<Option<PathBuf>>,
    /// Remove the config's database and its workers' log files, for a fresh start; refused
    /// while the coordinator or any of its workers runs.
    #[arg(long, conflicts_with = "check")]
    reset: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    countapp::exit_status(run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(path) = cli.check {
        return check(&path.unwrap_or(cli.config));
    }
    let config = load(&cli.config)?;
    if cli.reset {
        let removed = countapp::reset::reset(&config, &cli.config).context("resetting the cluster's files")?;
        for path in &removed.paths {
            println!("removed {}", path.display());
        }
        println!("reset: {} paths, {} MiB freed", removed.paths.len(), removed.bytes.div_ceil(1 << 20));
        return Ok(());
    }
    countapp::init_logging(config.log_format, Process::Coordinator, None);
    let worker_bin =
        std::env::current_exe().context("finding the coordinator's own executable")?.with_file_name("worker");
    anyhow::ensure!(worker_bin.is_file(), "the worker binary is missing: expected it at {}", worker_bin.display());
    actix_web::rt::System::new().block_on(async move {
        let coordinator = Coordinator::build(&cli.config, config, worker_bin).context("starting the coordinator")?;
        coordinator.run_until_stopped().await.context("running the coordinator")
    })
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).with_context(|| format!("loading {}", path.display()))
}

/// `--check`: the config loaded as at start-up, and one line saying what it holds.
fn check(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    let local = config.workers.iter().filter(|worker| worker.is_local()).count();
    println!(
        "{}: OK ({} workers, {local} local; listen {}; database {}; config version {})",
        path.display(),
        config.workers.len(),
        config.listen,
        config.database.display(),
        config.version()
    );
    Ok(())
}
