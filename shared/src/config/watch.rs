//! Notices edits of `config.yaml` within about a second.
//!
//! The file's directory is watched, not the file: editors and `mv` replace the file with a new
//! one, which would end a watch on the old file. Events are filtered on the file name. The file
//! is also re-read every `config_check`, which catches any edit if watching fails or the file
//! system sends no events (network mounts, a file behind a symbolic link into another
//! directory). And SIGHUP asks for a look at once, the reload signal of nginx, HAProxy and
//! Prometheus (a process that watches its config no longer stops on it). Either way the loop is
//! only told "look again": it reads, validates and compares the file itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

/// How long a noticed change is left to settle before it is reported: editors write a file in
/// several steps.
const SETTLE: Duration = Duration::from_millis(100);

/// A running watch; dropping it stops the watcher, the poller and the SIGHUP listener.
pub struct ConfigWatch {
    _watcher: Option<RecommendedWatcher>,
    poller: tokio::task::JoinHandle<()>,
    hangups: tokio::task::JoinHandle<()>,
    changes: mpsc::Receiver<()>,
}

impl ConfigWatch {
    /// Resolves once the file may have changed and the change has settled; `false` if the
    /// watch has ended.
    pub async fn changed(&mut self) -> bool {
        if self.changes.recv().await.is_none() {
            return false;
        }
        tokio::time::sleep(SETTLE).await;
        while self.changes.try_recv().is_ok() {}
        true
    }
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        self.poller.abort();
        self.hangups.abort();
    }
}

/// Watches `path`, which [`ConfigWatch::changed`] then reports (changes close together
/// coalesce into one). `every` is the polling period, and follows the config's `config_check`
/// as it changes.
pub fn watch(path: &Path, every: watch::Receiver<Duration>) -> ConfigWatch {
    // One slot: a pending hint already means "look again", so more add nothing.
    let (tx, rx) = mpsc::channel(1);
    let watcher = match file_watcher(path, tx.clone()) {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot watch the config; polling it instead");
            None
        }
    };
    let poller = tokio::spawn(poll(path.to_path_buf(), every, tx.clone()));
    let hangups = tokio::spawn(hangups(path.to_path_buf(), tx));
    ConfigWatch { _watcher: watcher, poller, hangups, changes: rx }
}

/// Hints at every SIGHUP.
async fn hangups(path: PathBuf, tx: mpsc::Sender<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP; edits are still seen");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        tracing::info!(path = %path.display(), "SIGHUP: reading the config again");
        let _ = tx.try_send(());
    }
}

fn file_watcher(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<RecommendedWatcher> {
    let name = path.file_name().map(ToOwned::to_owned);
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            // Reading the file is an event too: reacting to it would loop.
            if !event.kind.is_access() && event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
                let _ = tx.try_send(());
            }
        }
        Err(e) => tracing::warn!(error = %e, "config watch error"),
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Re-reads the file every period and hints when its bytes changed.
async fn poll(path: PathBuf, mut every: watch::Receiver<Duration>, tx: mpsc::Sender<()>) {
    let mut last = tokio::fs::read(&path).await.ok();
    loop {
        let period = *every.borrow_and_update();
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            changed = every.changed() => if changed.is_err() { return } else { continue },
        }
        let now = tokio::fs::read(&path).await.ok();
        if now != last {
            last = now;
            let _ = tx.try_send(());
        }
    }
}
