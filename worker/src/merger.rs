//! The worker's background merging, on a thread of its own.
//!
//! Every `worker_persist` it closes the worker's log file and runs a merge round
//! ([`Store::flush`]). In between it looks every [`POLL`] for log files that other workers
//! closed, and for workers that came or went ([`Store::merge`], which costs one listing when
//! nothing changed), so that the owner of a shard merges a closed file within a poll of its
//! closing: an item is counted within about `worker_persist` of its acknowledgement.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::store::{FlushReport, Store};

/// How often the merger looks for new log files between flushes.
pub(crate) const POLL: Duration = Duration::from_millis(100);
/// After failed rounds, the next waits longer, doubling up to this: a tenant store that is down
/// (Redis) is retried without being hammered, and the log keeps everything meanwhile.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The running merger; [`Merger::stop`] ends it.
pub(crate) struct Merger {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Merger {
    /// Starts merging `store` with a flush every `every`.
    pub(crate) fn start(store: Arc<Store>, every: Duration, metrics: Arc<Metrics>) -> std::io::Result<Merger> {
        let (stop, stopped) = mpsc::channel();
        let span = tracing::Span::current();
        let thread = thread::Builder::new().name("merger".into()).spawn(move || {
            let _entered = span.enter();
            // SAFETY: nice() only changes this thread's scheduling priority (on Linux the nice
            // value is per thread). Merging is background work that must not delay the
            // requests answered meanwhile; failing to lower the priority is harmless.
            unsafe { libc::nice(5) };
            run(&store, every, &metrics, &stopped);
        })?;
        Ok(Merger { stop, thread })
    }

    /// Stops the merger, waiting for a round in progress to finish.
    pub(crate) fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

fn run(store: &Store, every: Duration, metrics: &Metrics, stopped: &mpsc::Receiver<()>) {
    let mut next_flush = Instant::now() + every;
    let mut backoff = every;
    let mut failing_since: Option<Instant> = None;
    loop {
        let wait = if failing_since.is_some() {
            backoff
        } else {
            POLL.min(next_flush.saturating_duration_since(Instant::now()))
        };
        match stopped.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let flush = Instant::now() >= next_flush || failing_since.is_some();
        let started = Instant::now();
        let outcome = if flush { store.flush() } else { store.merge() };
        if flush {
            next_flush = Instant::now() + every;
        }
        match outcome {
            Ok(report) => {
                if let Some(since) = failing_since.take() {
                    tracing::info!(failing_for_s = since.elapsed().as_secs(), "merging again");
                }
                backoff = every;
                record(&report, started.elapsed(), metrics);
            }
            Err(e) => {
                if failing_since.is_none() {
                    failing_since = Some(started);
                    tracing::error!(error = %e, "merge failed; the log keeps the items, retrying with backoff");
                } else {
                    tracing::debug!(error = %e, "merge failed again");
                }
                backoff = (backoff * 2).min(MAX_BACKOFF.max(every));
            }
        }
    }
}

/// Logs and counts a round that did something.
fn record(report: &FlushReport, took: Duration, metrics: &Metrics) {
    if report.log_files == 0 && report.deleted_files == 0 {
        return;
    }
    metrics.merged(took.as_secs_f64(), report);
    if report.items > 0 {
        tracing::info!(
            files = report.log_files,
            tenants = report.tenants,
            items = report.items,
            new_ids = report.new_ids,
            ms = took.as_millis() as u64,
            "merged"
        );
    }
}
