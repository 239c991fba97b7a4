//! Stopping gracefully: the signals that ask for it, and the time limits of a worker's stop.
//!
//! Within a process, the one signal every task watches is a tokio-util `CancellationToken`.

use std::time::Duration;

/// How long a stopping worker lets the requests in flight finish.
pub const WORKER_DRAIN: Duration = Duration::from_secs(10);
/// How long a stopping worker then waits for the other workers to merge its last log file.
pub const WORKER_MERGE_WAIT: Duration = Duration::from_secs(5);
/// How long a coordinator waits for a worker it asked to stop before it kills it: longer than
/// everything a worker's stop may take, so that a worker that is only slow is never killed.
pub const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(25);

const _: () = assert!(WORKER_DRAIN.as_secs() + WORKER_MERGE_WAIT.as_secs() + 5 <= WORKER_STOP_TIMEOUT.as_secs());

/// Resolves on SIGTERM or SIGINT. Both ask for the graceful stop: an operator's Ctrl-C should
/// never cost the flush.
pub async fn terminate_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
