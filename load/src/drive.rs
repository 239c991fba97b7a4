//! The run loop shared by every mode: one task per connection, each sending one request at a
//! time until the duration is over or the item budget spent, timing only the request itself.
//!
//! With a fixed rate (`--rate`), the requests follow a schedule instead, as wrk2's and oha's do:
//! the k-th request of the run is meant to start at `k / rate` seconds, a connection that is free
//! takes the next slot and waits for its time, and a request's latency runs from its intended
//! start, not from when it was sent. A server that stalls then shows its stall in the latency of
//! every request that was due meanwhile, rather than in the one request that was waiting for
//! it (the coordinated omission of a closed loop, which measures only what the server let it).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use crate::stats::{Failure, Live, Recorder, RunStats, Series, Totals};

/// What one connection sends, request after request.
pub trait Op: Send + 'static {
    /// The names of the kinds of request an op sends when it sends more than one (the mixed
    /// workload), so that the run is also measured kind by kind; empty for an op of one kind.
    const KINDS: &'static [&'static str] = &[];

    /// Builds the next request, of `units` items (or one count) that take the run's positions
    /// `start..start + units`: outside the timed part, so that making the body (or waiting for
    /// the tool's own turn at a tenant, in the mixed workload) never shows as server latency.
    /// Positions are handed out in order across all connections, so an op that maps position
    /// `p` to tenant `p % tenants` spreads the run evenly over every tenant.
    fn prepare(&mut self, start: u64, units: u64) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Sends the prepared request and waits for its answer: the timed part. Returns the items
    /// acknowledged, or why none were.
    fn send(&mut self) -> impl Future<Output = Result<u64, Failure>> + Send;

    /// The kind of the request last prepared: an index into [`Op::KINDS`].
    fn kind(&self) -> usize {
        0
    }
}

/// When a run stops, and how big its requests are.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Stop starting requests after this long.
    pub duration: Option<Duration>,
    /// Stop once this many units were sent, acknowledged or not.
    pub units: Option<u64>,
    /// Units per request: the batch size, or 1 for counts.
    pub per_request: u64,
    /// Requests per second to start, on a fixed schedule; as fast as the connections go if none.
    pub rate: Option<f64>,
}

impl Plan {
    /// The share of the run done, 0 to 1, by whichever limit is nearer.
    pub fn progress(&self, elapsed: Duration, units_sent: u64) -> f64 {
        let by_time = self.duration.map_or(0.0, |d| elapsed.as_secs_f64() / d.as_secs_f64());
        let by_units = self.units.map_or(0.0, |n| units_sent as f64 / n as f64);
        by_time.max(by_units).min(1.0)
    }
}

/// The state a run shares between its connections and its progress bar.
#[derive(Debug, Default)]
pub struct Shared {
    pub live: Arc<Live>,
    /// Units handed out to requests so far.
    pub claimed: AtomicU64,
    /// Slots of the fixed-rate schedule taken so far.
    pub slots: AtomicU64,
}

impl Shared {
    /// Takes up to `want` units from the budget: the position of the first and how many (0 when
    /// the budget is spent).
    fn claim(&self, want: u64, budget: Option<u64>) -> (u64, u64) {
        let Some(budget) = budget else {
            return (self.claimed.fetch_add(want, Ordering::Relaxed), want);
        };
        let before = self
            .claimed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |claimed| {
                Some(claimed.saturating_add(want).min(budget))
            })
            .expect("the update always succeeds");
        (before, want.min(budget.saturating_sub(before)))
    }
}

/// Runs one task per op until the plan is done; returns the ops (which hold what the stream
/// sent) and the measurements.
pub async fn drive<O: Op>(ops: Vec<O>, plan: Plan, shared: Arc<Shared>) -> anyhow::Result<(Vec<O>, RunStats)> {
    let start = Instant::now();
    let started_at = SystemTime::now();
    let series = Series::default();
    // Each kind of request has a series of its own; only the whole run's feeds the progress bar.
    let kind_series: Vec<Series> = O::KINDS.iter().map(|_| Series::default()).collect();
    let tasks: Vec<_> = ops
        .into_iter()
        .map(|op| {
            let recorder = Recorder::new(start, series.clone(), shared.live.clone());
            let by_kind =
                kind_series.iter().map(|series| Recorder::new(start, series.clone(), Arc::default())).collect();
            tokio::spawn(connection(op, recorder, by_kind, plan, start, shared.clone()))
        })
        .collect();
    let mut ops = Vec::with_capacity(tasks.len());
    let mut totals = Vec::with_capacity(tasks.len());
    let mut kind_totals: Vec<Vec<Totals>> = O::KINDS.iter().map(|_| Vec::new()).collect();
    for task in tasks {
        let (op, connection_totals, by_kind) = task.await.context("a connection task panicked")??;
        ops.push(op);
        totals.push(connection_totals);
        for (kind, totals) in kind_totals.iter_mut().zip(by_kind) {
            kind.push(totals);
        }
    }
    let elapsed = start.elapsed();
    let mut stats = RunStats::merge(start, started_at, elapsed, totals, &series);
    stats.operations = O::KINDS
        .iter()
        .zip(kind_totals)
        .zip(&kind_series)
        .map(|((&name, totals), series)| (name, RunStats::merge(start, started_at, elapsed, totals, series)))
        .collect();
    Ok((ops, stats))
}

async fn connection<O: Op>(
    mut op: O,
    mut recorder: Recorder,
    mut by_kind: Vec<Recorder>,
    plan: Plan,
    start: Instant,
    shared: Arc<Shared>,
) -> anyhow::Result<(O, Totals, Vec<Totals>)> {
    let deadline = plan.duration.map(|d| start + d);
    loop {
        // The request's intended start: its slot's time on a schedule, else now.
        let intended = match plan.rate {
            Some(rate) => start + slot_time(shared.slots.fetch_add(1, Ordering::Relaxed), rate),
            None => Instant::now(),
        };
        if deadline.is_some_and(|deadline| intended >= deadline) {
            break;
        }
        let (first, units) = shared.claim(plan.per_request, plan.units);
        if units == 0 {
            break;
        }
        op.prepare(first, units).await?;
        // A closed loop sends at once: even a sleep until now would wait for the timer's next
        // tick, a millisecond, and cap every connection near a thousand requests a second.
        let sent = match plan.rate {
            Some(_) => {
                tokio::time::sleep_until(intended.into()).await;
                intended
            }
            None => Instant::now(),
        };
        let outcome = op.send().await;
        let answered = Instant::now();
        // The whole run's recorder, then the kind's, if the op has kinds.
        for recorder in std::iter::once(&mut recorder).chain(by_kind.get_mut(op.kind())) {
            match outcome {
                Ok(items) => recorder.acknowledged(answered, answered - sent, items),
                Err(failure) => recorder.failed(answered, failure),
            }
        }
    }
    Ok((op, recorder.finish(), by_kind.into_iter().map(Recorder::finish).collect()))
}

/// When the `slot`-th request of a run at `rate` requests a second is due, from the start.
fn slot_time(slot: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(slot as f64 / rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_spread_evenly_at_the_rate() {
        assert_eq!(slot_time(0, 100.0), Duration::ZERO);
        assert_eq!(slot_time(1, 100.0), Duration::from_millis(10));
        assert_eq!(slot_time(250, 100.0), Duration::from_millis(2500));
        assert_eq!(slot_time(3, 0.5), Duration::from_secs(6));
    }

    #[test]
    fn the_budget_is_never_overspent() {
        let shared = Shared::default();
        let claims: Vec<(u64, u64)> = (0..5).map(|_| shared.claim(100, Some(250))).collect();
        assert_eq!(claims, [(0, 100), (100, 100), (200, 50), (250, 0), (250, 0)]);
        let unbounded = Shared::default();
        assert_eq!(unbounded.claim(100, None), (0, 100));
        assert_eq!(unbounded.claim(100, None), (100, 100));
    }

    #[test]
    fn progress_follows_the_nearer_limit() {
        let plan = Plan { duration: Some(Duration::from_secs(10)), units: Some(1000), per_request: 100, rate: None };
        assert_eq!(plan.progress(Duration::from_secs(5), 100), 0.5);
        assert_eq!(plan.progress(Duration::from_secs(1), 800), 0.8);
        assert_eq!(plan.progress(Duration::from_secs(20), 0), 1.0);
    }
}
