//! `xtask`: the project's own tasks, as `make` runs them. `make bench` and `make bench-scale`
//! measure fresh clusters, started and stopped through the system tests' own launcher
//! (`countapp-testcluster`), so that a benchmark's cluster is set up exactly as a test's; `make
//! run` asks it where the dashboard of the coordinator it starts will be.

mod bench;
mod measure;
mod scale;
mod stand;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// The project's tasks; `make` runs them after a release build.
#[derive(Parser)]
#[command(name = "xtask")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The load tool against fresh clusters, with Redis and HAProxy measured in the same run
    /// (`make bench`).
    Bench(bench::Options),
    /// Memory per id, long loads and many tenants, each against a fresh cluster (`make
    /// bench-scale`).
    BenchScale(scale::Options),
    /// Prints where the dashboard of a coordinator started with `config` is, and a request to
    /// try (`make run`): the config's `listen`, as the coordinator reads it.
    Dashboard {
        /// The coordinator's config file.
        #[arg(long, default_value = "config.yaml")]
        config: PathBuf,
    },
}

/// Set by SIGINT (Ctrl-C) or SIGTERM: a benchmark stops at its next wait and returns, so that
/// what it started is stopped and its temporary directories removed, as they are when dropped.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Whether SIGINT or SIGTERM came.
pub fn is_interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn main() -> ExitCode {
    let action = SigAction::new(SigHandler::Handler(interrupted), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(error) = unsafe { sigaction(signal, &action) } {
            eprintln!("xtask: cannot handle {signal}: {error}");
            return ExitCode::from(2);
        }
    }
    let outcome = match Args::parse().task {
        Task::Bench(options) => bench::run(&options),
        Task::BenchScale(options) => scale::run(&options),
        Task::Dashboard { config } => dashboard(&config).map(|()| true),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Prints the dashboard's address and a first request, from `config`'s `listen`.
fn dashboard(config: &std::path::Path) -> anyhow::Result<()> {
    let config = countapp_shared::config::Config::load(config)?;
    let listen = config.listen;
    println!("Dashboard: http://{listen}/   (its data for scripts: http://{listen}/dashboard.json)");
    println!(
        "Try:       curl -s -X POST http://{listen}/items -d '[{{\"id\":\"1\",\"tenant\":\"demo\"}}]'   then look up \
         tenant demo on the dashboard"
    );
    Ok(())
}
