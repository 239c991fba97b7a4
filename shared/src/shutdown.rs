//! The one signal that stops a worker: `POST /shutdown`, SIGTERM and SIGINT all trigger it, and
//! every task that must stop watches it.

use std::sync::Arc;

use tokio::sync::watch;

/// A shutdown signal shared by every task of the worker; cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { tx: Arc::new(watch::Sender::new(false)) }
    }
}

impl Shutdown {
    /// Asks every watcher to stop; later calls do nothing more.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether shutdown has been asked for.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once shutdown has been asked for (at once if it already was).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

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
