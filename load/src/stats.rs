//! What a run measured: a latency histogram over the whole run and one per second (for p99 over
//! time), requests, items and errors, counted per connection without sharing and merged at the
//! end, plus a few live counters for the progress bar.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in microseconds, from 1 µs to a minute; longer ones (a request
/// timeout is shorter) are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Why a request did not count as acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The server answered with a status other than 200.
    Status(u16),
    /// No connection could be made.
    Connect,
    /// No complete answer within the request timeout.
    Timeout,
    /// The connection broke mid-request.
    Connection,
    /// An answer that made no sense (a count that is not `{"count": N}`, a Redis error reply).
    BadReply,
    /// A well-formed answer that breaks the API's promise: in the mixed workload, a strong count
    /// below the ids acknowledged before it was sent, or a membership check that misses one of
    /// them (or finds an id never sent).
    Wrong,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(code) => write!(f, "HTTP {code}"),
            Failure::Connect => f.write_str("connect"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::Connection => f.write_str("connection"),
            Failure::BadReply => f.write_str("bad reply"),
            Failure::Wrong => f.write_str("wrong answer"),
        }
    }
}

/// Counters the progress bar reads while the run goes on.
#[derive(Debug, Default)]
pub struct Live {
    /// Items acknowledged (or, for counts, requests answered).
    pub items: AtomicU64,
    /// Failed requests.
    pub errors: AtomicU64,
}

/// One second of a run.
#[derive(Debug, Clone)]
pub struct Second {
    /// Latencies of the acknowledged requests, in µs, to two significant figures: a plot needs
    /// no more, and a long run keeps one of these per second.
    pub latency: Histogram<u64>,
    pub requests: u64,
    pub items: u64,
    pub errors: u64,
}

impl Second {
    fn new() -> Self {
        Second {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid histogram bounds"),
            requests: 0,
            items: 0,
            errors: 0,
        }
    }

    fn add(&mut self, other: &Second) {
        self.latency.add(&other.latency).expect("histograms of the same bounds add up");
        self.requests += other.requests;
        self.items += other.items;
        self.errors += other.errors;
    }

    fn clear(&mut self) {
        self.latency.reset();
        self.requests = 0;
        self.items = 0;
        self.errors = 0;
    }
}

/// The per-second series of a run, shared by its connections: each adds its second once the
/// second is over, so the lock is taken once a second per connection.
pub type Series = Arc<Mutex<Vec<Second>>>;

/// One connection's measurements.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    latency: Histogram<u64>,
    requests: u64,
    items: u64,
    errors: BTreeMap<Failure, u64>,
    last_ack: Option<Instant>,
    second_index: usize,
    second: Second,
    series: Series,
    live: Arc<Live>,
}

impl Recorder {
    /// A recorder for a run that started at `start`, adding its seconds to `series`.
    pub fn new(start: Instant, series: Series, live: Arc<Live>) -> Self {
        Recorder {
            start,
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds"),
            requests: 0,
            items: 0,
            errors: BTreeMap::new(),
            last_ack: None,
            second_index: 0,
            second: Second::new(),
            series,
            live,
        }
    }

    /// Records a request that ended at `end` after `latency`, with the items it got acknowledged.
    pub fn acknowledged(&mut self, end: Instant, latency: Duration, items: u64) {
        self.roll_to(end);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        self.latency.saturating_record(us);
        self.second.latency.saturating_record(us);
        self.requests += 1;
        self.second.requests += 1;
        self.items += items;
        self.second.items += items;
        self.last_ack = self.last_ack.max(Some(end));
        self.live.items.fetch_add(items, Ordering::Relaxed);
    }

    /// Records a request that ended at `end` without an acknowledgement.
    pub fn failed(&mut self, end: Instant, failure: Failure) {
        self.roll_to(end);
        self.requests += 1;
        self.second.requests += 1;
        *self.errors.entry(failure).or_default() += 1;
        self.second.errors += 1;
        self.live.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Hands the current second to the series when `now` is in a later one.
    fn roll_to(&mut self, now: Instant) {
        let index = now.duration_since(self.start).as_secs() as usize;
        if index != self.second_index {
            self.flush_second();
            self.second_index = index;
        }
    }

    fn flush_second(&mut self) {
        if self.second.requests == 0 {
            return;
        }
        let mut series = self.series.lock().expect("no recorder panics holding the series");
        if series.len() <= self.second_index {
            series.resize_with(self.second_index + 1, Second::new);
        }
        series[self.second_index].add(&self.second);
        self.second.clear();
    }

    /// Ends the recording: the last second goes to the series, the rest is returned.
    pub fn finish(mut self) -> Totals {
        self.flush_second();
        Totals {
            latency: self.latency,
            requests: self.requests,
            items: self.items,
            errors: self.errors,
            last_ack: self.last_ack,
        }
    }
}

/// Totals over a run, or over one connection of it.
#[derive(Debug, Clone)]
pub struct Totals {
    /// Latencies of acknowledged requests, in µs.
    pub latency: Histogram<u64>,
    /// Requests sent, failed ones included.
    pub requests: u64,
    /// Items acknowledged.
    pub items: u64,
    /// Failed requests by reason.
    pub errors: BTreeMap<Failure, u64>,
    /// When the last acknowledgement came: the end of the load, for the convergence wait.
    pub last_ack: Option<Instant>,
}

impl Totals {
    /// Adds another connection's totals.
    pub fn add(&mut self, other: &Totals) {
        self.latency.add(&other.latency).expect("histograms of the same bounds add up");
        self.requests += other.requests;
        self.items += other.items;
        for (&failure, &n) in &other.errors {
            *self.errors.entry(failure).or_default() += n;
        }
        self.last_ack = self.last_ack.max(other.last_ack);
    }

    /// Failed requests, whatever the reason.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Everything a run measured.
#[derive(Debug)]
pub struct RunStats {
    /// When the run started, by the monotonic clock and by the wall clock.
    pub start: Instant,
    pub started_at: SystemTime,
    /// From the first request to the last answer.
    pub elapsed: Duration,
    pub totals: Totals,
    /// Second by second; a second without any answer is empty.
    pub seconds: Vec<Second>,
    /// With several kinds of request (the mixed workload), each kind's own figures, by name.
    pub operations: Vec<(&'static str, RunStats)>,
}

impl RunStats {
    /// Merges the connections' totals and takes the series of a run that started at `start`
    /// (`started_at` by the wall clock).
    pub fn merge(
        start: Instant,
        started_at: SystemTime,
        elapsed: Duration,
        connections: Vec<Totals>,
        series: &Series,
    ) -> Self {
        let mut connections = connections.into_iter();
        let mut totals = connections.next().expect("a run has at least one connection");
        for other in connections {
            totals.add(&other);
        }
        let seconds = std::mem::take(&mut *series.lock().expect("no recorder panics holding the series"));
        RunStats { start, started_at, elapsed, totals, seconds, operations: Vec::new() }
    }

    /// The wall-clock time of the last acknowledgement, in milliseconds since the Unix epoch:
    /// for comparing the end of the load with what the server did (file times, logs).
    pub fn last_ack_unix_ms(&self) -> Option<u64> {
        let at = self.started_at + self.totals.last_ack?.saturating_duration_since(self.start);
        Some(at.duration_since(UNIX_EPOCH).ok()?.as_millis() as u64)
    }

    /// Requests per second over the run.
    pub fn requests_per_s(&self) -> f64 {
        self.totals.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// Items acknowledged per second over the run.
    pub fn items_per_s(&self) -> f64 {
        self.totals.items as f64 / self.elapsed.as_secs_f64()
    }

    /// The latency at quantile `q` (0 to 1), in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.totals.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// The highest latency, in milliseconds.
    pub fn max_latency_ms(&self) -> f64 {
        self.totals.latency.max() as f64 / 1000.0
    }

    /// The run second by second. Answers that came after the last full second (those in flight
    /// when the run stopped: the slowest, by selection) are folded into that second rather than
    /// shown as a short, noisy second of their own.
    pub fn per_second(&self) -> Vec<Interval> {
        let run = self.elapsed.as_secs_f64();
        let mut intervals: Vec<(f64, f64, Second)> = self
            .seconds
            .iter()
            .enumerate()
            .map(|(i, second)| (i as f64, (run - i as f64).clamp(0.001, 1.0), second.clone()))
            .collect();
        if intervals.len() >= 2 && intervals.last().is_some_and(|&(_, length, _)| length < 0.5) {
            let (_, length, tail) = intervals.pop().expect("checked above");
            let last = intervals.last_mut().expect("checked above");
            last.1 += length;
            last.2.add(&tail);
        }
        intervals
            .into_iter()
            .map(|(start, length, second)| Interval {
                start,
                seconds: length,
                items_per_s: second.items as f64 / length,
                p99_ms: second.latency.value_at_quantile(0.99) as f64 / 1000.0,
                errors: second.errors,
            })
            .collect()
    }
}

/// One interval (mostly a second) of a run's series.
#[derive(Debug, Clone, Serialize)]
pub struct Interval {
    /// When it starts, in seconds from the start of the run.
    pub start: f64,
    /// How long it lasts.
    pub seconds: f64,
    /// Items acknowledged per second within it.
    pub items_per_s: f64,
    /// p99 latency of the requests answered within it.
    pub p99_ms: f64,
    /// Failed requests within it.
    pub errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_totals_add_up_across_connections() {
        let start = Instant::now();
        let series = Series::default();
        let live = Arc::new(Live::default());
        let mut one = Recorder::new(start, series.clone(), live.clone());
        let mut two = Recorder::new(start, series.clone(), live.clone());
        one.acknowledged(start + Duration::from_millis(100), Duration::from_millis(2), 100);
        two.acknowledged(start + Duration::from_millis(900), Duration::from_millis(4), 100);
        one.failed(start + Duration::from_millis(1500), Failure::Status(503));
        two.acknowledged(start + Duration::from_millis(2500), Duration::from_millis(8), 50);
        let started_at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let stats =
            RunStats::merge(start, started_at, Duration::from_millis(2500), vec![one.finish(), two.finish()], &series);

        assert_eq!((stats.totals.requests, stats.totals.items, stats.totals.error_count()), (4, 250, 1));
        assert_eq!(live.items.load(Ordering::Relaxed), 250);
        assert_eq!(live.errors.load(Ordering::Relaxed), 1);
        let items: Vec<u64> = stats.seconds.iter().map(|s| s.items).collect();
        assert_eq!(items, [200, 0, 50]);
        assert_eq!(stats.seconds[1].errors, 1);
        let per_second = stats.per_second();
        // The last half second acknowledged 50 items: 100 items/s.
        assert_eq!(per_second.len(), 3);
        assert!((per_second[2].items_per_s - 100.0).abs() < 1e-9);

        assert!((stats.items_per_s() - 100.0).abs() < 1e-9);
        assert!((stats.latency_ms(1.0) - 8.0).abs() < 0.01);
        // The failure at 1.5 s is no acknowledgement; the answer at 2.5 s is the last one.
        assert_eq!(stats.totals.last_ack, Some(start + Duration::from_millis(2500)));
        assert_eq!(stats.last_ack_unix_ms(), Some(1_700_000_002_500));
    }

    #[test]
    fn answers_after_the_last_full_second_join_it() {
        let start = Instant::now();
        let series = Series::default();
        let mut recorder = Recorder::new(start, series.clone(), Arc::default());
        for ms in [500, 1500, 2050] {
            recorder.acknowledged(start + Duration::from_millis(ms), Duration::from_millis(1), 10);
        }
        let stats =
            RunStats::merge(start, SystemTime::now(), Duration::from_millis(2100), vec![recorder.finish()], &series);
        let per_second = stats.per_second();
        assert_eq!(per_second.len(), 2);
        assert!((per_second[1].seconds - 1.1).abs() < 1e-9);
        assert!((per_second[1].items_per_s - 20.0 / 1.1).abs() < 1e-9);
    }
}
