//! The worker's background merging, on a thread of its own.
//!
//! Every `worker_persist` it closes the worker's log file, at the multiples of `worker_persist`
//! since the Unix epoch: every worker closes its file at the same instants, so that the owner of
//! a shard takes every worker's new file in one merge round, [`SETTLE`] later, and rewrites each
//! of its tenants once per `worker_persist`, not once per worker. In between it looks every
//! [`POLL`] for log files that other workers closed, and for workers that came or went
//! ([`Store::merge`], which costs one listing when nothing changed), so that a dead worker's
//! files are merged at once too. An item is counted about `worker_persist` after its
//! acknowledgement, at most. Where the tenants' store sets the pace of merging (Redis), a log
//! file that holds more than [`MOST_MERGE_PER_FILE`] of merging is closed at once: merged in such
//! pieces, a load leaves that much at most to merge when it stops. An edit of `worker_persist`
//! takes effect at the next look.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::live_config::LiveConfig;
use crate::metrics::Metrics;
use countapp_store::{MergeReport, Store};

/// How often the merger looks for new log files between closings.
const POLL: Duration = Duration::from_millis(100);
/// How long after the instant every worker closes its log file a merge round starts: long
/// enough for every worker to have closed it.
const SETTLE: Duration = Duration::from_millis(50);
/// The most merging an active log file may hold at the backend's pace (Redis) before it is
/// closed, ahead of the next `worker_persist`: what a load that stops leaves to merge once its
/// last file closes, well within the 2 s that counts may take past `worker_persist`.
const MOST_MERGE_PER_FILE: Duration = Duration::from_millis(750);
/// After failed rounds, the next waits longer, doubling up to this: a tenant store that is down
/// (Redis) is retried without being hammered, and the log keeps everything meanwhile.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The running merger; [`Merger::stop`] ends it.
pub(crate) struct Merger {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Merger {
    /// Starts merging `store`, closing its log every `worker_persist` of `config`.
    pub(crate) fn start(store: Arc<Store>, config: Arc<LiveConfig>, metrics: Arc<Metrics>) -> std::io::Result<Merger> {
        let (stop, stopped) = mpsc::channel();
        let span = tracing::Span::current();
        let thread = thread::Builder::new().name("merger".into()).spawn(move || {
            let _entered = span.enter();
            // SAFETY: nice() only changes this thread's scheduling priority (on Linux the nice
            // value is per thread). Merging is background work that must not delay the
            // requests answered meanwhile; failing to lower the priority is harmless.
            unsafe { libc::nice(5) };
            run(&store, &config, &metrics, &stopped);
        })?;
        Ok(Merger { stop, thread })
    }

    /// Stops the merger, waiting for a round in progress to finish.
    pub(crate) fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

fn run(store: &Store, config: &LiveConfig, metrics: &Metrics, stopped: &mpsc::Receiver<()>) {
    let mut every = config.get().worker_persist();
    let mut next_close = close_instant(every);
    let mut next_merge = Instant::now() + POLL;
    let mut backoff = every;
    let mut failing_since: Option<Instant> = None;
    loop {
        let until = next_close.min(next_merge).saturating_duration_since(Instant::now());
        match stopped.recv_timeout(until) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let now_every = config.get().worker_persist();
        if now_every != every {
            every = now_every;
            next_close = close_instant(every);
        }
        if Instant::now() >= next_close {
            if let Err(e) = store.close_log() {
                tracing::error!(error = %e, "cannot close the log file");
            }
            next_close = close_instant(every);
            next_merge = Instant::now() + SETTLE;
            continue;
        }
        if store.log_outgrows(MOST_MERGE_PER_FILE) {
            match store.close_log() {
                Ok(()) => next_merge = next_merge.min(Instant::now()),
                Err(e) => tracing::error!(error = %e, "cannot close the log file"),
            }
        }
        if Instant::now() < next_merge {
            continue;
        }
        let started = Instant::now();
        match store.merge() {
            Ok(report) => {
                if let Some(since) = failing_since.take() {
                    tracing::info!(failing_for_s = since.elapsed().as_secs(), "merging again");
                }
                backoff = every;
                next_merge = Instant::now() + POLL;
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
                next_merge = Instant::now() + backoff;
            }
        }
    }
}

/// When to close the log next, on the monotonic clock: at the next multiple of `every` since
/// the Unix epoch. Only the wait is read from the wall clock, and it is never longer than
/// `every`, so that a step of the wall clock shifts the instants but never stops the closings.
fn close_instant(every: Duration) -> Instant {
    Instant::now() + until_next_multiple(SystemTime::now(), every)
}

/// How long from `now` to the first multiple of `every` since the Unix epoch after it.
fn until_next_multiple(now: SystemTime, every: Duration) -> Duration {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    let every = every.as_nanos().max(1);
    let until = every - since_epoch % every;
    Duration::from_nanos(u64::try_from(until).unwrap_or(u64::MAX))
}

/// Logs and counts a round that did something.
fn record(report: &MergeReport, took: Duration, metrics: &Metrics) {
    if *report == MergeReport::default() {
        return;
    }
    metrics.merged(took.as_secs_f64(), report);
    if report.items > 0 {
        tracing::info!(
            files = report.log_files,
            tenants = report.tenants,
            items = report.items,
            new_ids = report.new_ids,
            written_bytes = report.written_bytes,
            ms = took.as_millis() as u64,
            "merged"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_closes_its_log_at_the_same_instants() {
        let every = Duration::from_millis(200);
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        let ms = Duration::from_millis;
        assert_eq!(until_next_multiple(at(1_000_000_050), every), ms(150));
        assert_eq!(until_next_multiple(at(1_000_000_199), every), ms(1));
        assert_eq!(until_next_multiple(at(1_000_000_200), every), ms(200));
        assert_eq!(until_next_multiple(at(7), Duration::from_secs(5)), ms(4_993));
        // A wall clock before the epoch (stepped far back) still closes every `every`.
        assert_eq!(until_next_multiple(UNIX_EPOCH - ms(3), every), every);
    }
}
