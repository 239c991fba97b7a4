//! What the `coordinator` and `worker` binaries share at their edge: log set-up.

/// Logs to stderr with `tracing`, at the level of `RUST_LOG` (default `info`).
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in the workers' log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
