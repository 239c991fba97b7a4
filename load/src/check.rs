//! The loss check, after Jepsen's set checker: once the load stops, the counts must come to
//! include every acknowledged item (else items were lost) and nothing that was never sent (else
//! items were invented).
//!
//! Repeats only ever reuse acknowledged ids, so per tenant the distinct ids acknowledged and the
//! distinct ids sent are plain numbers: the checker needs no set of ids, however long the run.

use std::ops::AddAssign;
use std::time::Duration;

use serde::Serialize;
// Tokio's clock, so that the tests can run the wait on paused time.
use tokio::time::Instant;

/// What the load knows about one tenant's distinct ids.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Distinct ids in batches the server acknowledged (200): the count must reach this.
    pub acked: u64,
    /// Distinct ids in every batch sent, acknowledged or not: the count may not exceed this,
    /// since a batch that failed may still have been applied.
    pub sent: u64,
}

impl AddAssign for Tally {
    fn add_assign(&mut self, other: Tally) {
        self.acked += other.acked;
        self.sent += other.sent;
    }
}

/// Per tenant, what the count said before the load (so that a tenant prefix used by an earlier
/// run still checks out), what the load did, and what the count says now.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub baseline: u64,
    pub tally: Tally,
    pub count: u64,
}

impl Reading {
    /// The ids this run added to the count. A count below its baseline went down, which the
    /// contract forbids; it shows up as lost items.
    fn added(&self) -> u64 {
        self.count.saturating_sub(self.baseline)
    }

    fn lost(&self) -> u64 {
        self.tally.acked.saturating_sub(self.added())
    }

    fn unexpected(&self) -> u64 {
        self.added().saturating_sub(self.tally.sent)
    }
}

/// The check's findings over all tenants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Distinct ids acknowledged over all tenants.
    pub acked: u64,
    /// Distinct ids sent over all tenants, acknowledged or not.
    pub sent: u64,
    /// Distinct ids the counts gained over the run.
    pub counted: u64,
    /// Acknowledged but not counted.
    pub lost: u64,
    /// Counted but never sent.
    pub unexpected: u64,
    /// Tenants with at least one lost item.
    pub tenants_short: usize,
    /// Tenants with at least one unexpected item.
    pub tenants_over: usize,
}

impl Verdict {
    /// Judges the readings of every tenant.
    pub fn judge(readings: &[Reading]) -> Verdict {
        let mut verdict = Verdict::default();
        for reading in readings {
            verdict.acked += reading.tally.acked;
            verdict.sent += reading.tally.sent;
            verdict.counted += reading.added();
            verdict.lost += reading.lost();
            verdict.unexpected += reading.unexpected();
            verdict.tenants_short += usize::from(reading.lost() > 0);
            verdict.tenants_over += usize::from(reading.unexpected() > 0);
        }
        verdict
    }

    /// True when nothing was lost and nothing invented.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.unexpected == 0
    }
}

/// One count read while checking: the tenant, its count, and when the answer came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub tenant: usize,
    pub count: u64,
    pub at: Instant,
}

/// What one pass over some tenants' counts gave.
#[derive(Debug, Default)]
pub struct Sweep {
    /// The counts read, in no particular order.
    pub reads: Vec<Read>,
    /// Tenants of the pass whose count was not read.
    pub unread: usize,
    /// Why, when some were not: the first failure.
    pub error: Option<anyhow::Error>,
}

/// The outcome of waiting for the counts to converge.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Convergence {
    /// The verdict on the final read of every count, after the wait.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// True when every tenant was seen with its acknowledged ids before the timeout.
    pub converged: bool,
    /// From the end of the load (its last acknowledgement) to the read that first saw the last
    /// tenant converged; or, if some never did, to the timeout.
    #[serde(serialize_with = "seconds")]
    pub waited: Duration,
    /// How long the first sweep over every tenant not yet seen converged took: the granularity
    /// of `waited`, since a tenant is seen converged only when it is read.
    #[serde(rename = "sweep_s", serialize_with = "seconds")]
    pub sweep: Duration,
    /// With `--check-sample`: from the end of the load to the read that saw the last tenant of
    /// the sample converged, before every tenant was read.
    #[serde(rename = "sample_s", serialize_with = "optional_seconds")]
    pub sampled: Option<Duration>,
    /// Sweeps made while waiting, each over the tenants not yet seen converged.
    pub sweeps: u32,
    /// Tenants never seen converged (0 when `converged`).
    pub unconverged: usize,
}

fn seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

fn optional_seconds<S: serde::Serializer>(duration: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => seconds(duration, serializer),
        None => serializer.serialize_none(),
    }
}

/// Passes of the final read over the tenants whose count could not be read yet, before the
/// verdict falls back on their last count read while waiting.
const FINAL_READ_PASSES: u32 = 3;

/// Waits for the counts to include every acknowledged item, then judges them.
///
/// `read` reads the counts of the tenants it is given (indexes into `baselines` and `tallies`).
/// Each sweep reads only the tenants not yet seen converged (count - baseline >= acknowledged
/// ids); a tenant with no acknowledged ids has nothing to wait for. Sweeps follow each other
/// `poll` apart until every tenant was seen converged or `timeout` has passed since the wait
/// began. A tenant converged when it was first seen so, and the wait is measured from
/// `load_end`. Then one final read of every count feeds the verdict, so that a count that went
/// down, or over what was sent, after it was seen converged is still caught. A count that could
/// not be read is read again; only if some tenant's count was never read is that an error.
pub async fn await_convergence<F>(
    baselines: &[u64],
    tallies: &[Tally],
    load_end: Instant,
    timeout: Duration,
    poll: Duration,
    sample: Option<usize>,
    mut read: F,
) -> anyhow::Result<Convergence>
where
    F: AsyncFnMut(&[usize]) -> Sweep,
{
    let tenants = tallies.len();
    anyhow::ensure!(baselines.len() == tenants, "{} baselines for {tenants} tenants", baselines.len());
    let converges =
        |tenant: usize, count: u64| Reading { baseline: baselines[tenant], tally: tallies[tenant], count }.lost() == 0;
    let start = Instant::now();
    // The last count read of every tenant, and whether it was seen converged.
    let mut last: Vec<Option<u64>> = vec![None; tenants];
    let mut seen = vec![false; tenants];
    let waiting: Vec<usize> = (0..tenants).filter(|&t| tallies[t].acked > 0).collect();
    // With a sample, only it is read at first: a light load on a system still merging. Evenly
    // spaced, so that it spans the tenants' shards.
    let mut sampled = None;
    let mut pending: Vec<usize> = match sample {
        Some(n) if n < waiting.len() => waiting.iter().copied().step_by(waiting.len().div_ceil(n.max(1))).collect(),
        _ => waiting.clone(),
    };
    let mut full = pending.len() == waiting.len();
    let mut last_converged: Option<Instant> = None;
    let (mut sweeps, mut first_sweep) = (0, None);
    let mut last_error = None;
    let waited = loop {
        if pending.is_empty() && !full {
            sampled = Some(last_converged.map_or(Duration::ZERO, |at| at.saturating_duration_since(load_end)));
            pending = waiting.iter().copied().filter(|&t| !seen[t]).collect();
            full = true;
        }
        if pending.is_empty() {
            break last_converged.map_or(Duration::ZERO, |at| at.saturating_duration_since(load_end));
        }
        let began = Instant::now();
        let sweep = read(&pending).await;
        if full && first_sweep.is_none() {
            first_sweep = Some(began.elapsed());
        }
        sweeps += 1;
        for Read { tenant, count, at } in sweep.reads {
            last[tenant] = Some(count);
            if !seen[tenant] && converges(tenant, count) {
                seen[tenant] = true;
                last_converged = last_converged.max(Some(at));
            }
        }
        last_error = sweep.error.or(last_error);
        pending.retain(|&t| !seen[t]);
        if !pending.is_empty() && start.elapsed() >= timeout {
            break Instant::now().saturating_duration_since(load_end);
        }
        if !pending.is_empty() {
            tokio::time::sleep(poll).await;
        }
    };

    let mut fresh: Vec<Option<u64>> = vec![None; tenants];
    let mut unread: Vec<usize> = (0..tenants).collect();
    for pass in 0..FINAL_READ_PASSES {
        if pass > 0 {
            tokio::time::sleep(poll).await;
        }
        let sweep = read(&unread).await;
        for Read { tenant, count, .. } in sweep.reads {
            fresh[tenant] = Some(count);
        }
        last_error = sweep.error.or(last_error);
        unread.retain(|&t| fresh[t].is_none());
        if unread.is_empty() {
            break;
        }
    }
    let mut readings = Vec::with_capacity(tenants);
    let mut never_read = 0;
    for tenant in 0..tenants {
        match fresh[tenant].or(last[tenant]) {
            Some(count) => readings.push(Reading { baseline: baselines[tenant], tally: tallies[tenant], count }),
            None => never_read += 1,
        }
    }
    if never_read > 0 {
        let error = last_error.unwrap_or_else(|| anyhow::anyhow!("no answer"));
        return Err(error.context(format!("the counts of {never_read} of {tenants} tenants could not be read")));
    }
    Ok(Convergence {
        verdict: Verdict::judge(&readings),
        converged: pending.is_empty(),
        waited,
        sweep: first_sweep.unwrap_or_default(),
        sampled,
        sweeps,
        unconverged: pending.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(baseline: u64, acked: u64, sent: u64, count: u64) -> Reading {
        Reading { baseline, tally: Tally { acked, sent }, count }
    }

    #[test]
    fn exact_counts_pass() {
        let verdict = Verdict::judge(&[reading(0, 10, 10, 10), reading(0, 5, 5, 5)]);
        assert_eq!((verdict.acked, verdict.sent, verdict.counted), (15, 15, 15));
        assert!(verdict.passed());
    }

    #[test]
    fn unacknowledged_batches_may_or_may_not_count() {
        // 4 ids were in failed batches: counting none, some or all of them is fine.
        for count in 10..=14 {
            assert!(Verdict::judge(&[reading(0, 10, 14, count)]).passed(), "count {count}");
        }
    }

    #[test]
    fn short_counts_are_lost_items_per_tenant() {
        // Repeats add nothing to either tally, so 100 items of which 30 repeated are 70 distinct.
        let verdict = Verdict::judge(&[reading(0, 70, 70, 63), reading(0, 70, 80, 75), reading(0, 70, 70, 61)]);
        assert_eq!(verdict.lost, 7 + 9);
        assert_eq!(verdict.tenants_short, 2);
        assert_eq!(verdict.unexpected, 0);
        assert!(!verdict.passed());
    }

    #[test]
    fn counts_beyond_what_was_sent_are_unexpected() {
        let verdict = Verdict::judge(&[reading(0, 10, 12, 15), reading(0, 10, 10, 10)]);
        assert_eq!((verdict.lost, verdict.unexpected, verdict.tenants_over), (0, 3, 1));
        assert!(!verdict.passed());
    }

    #[test]
    fn baselines_are_subtracted_and_a_count_that_went_down_loses() {
        assert!(Verdict::judge(&[reading(1000, 10, 10, 1010)]).passed());
        let verdict = Verdict::judge(&[reading(1000, 10, 10, 990)]);
        assert_eq!((verdict.counted, verdict.lost), (0, 10));
    }

    /// Scripted counts for the wait: sweep by sweep, every tenant's count, or None where its
    /// read fails; the last sweep repeats once the script is used up. It records which tenants
    /// each sweep asked for, and each read takes `per_read` of (paused) time.
    struct Script {
        sweeps: Vec<Vec<Option<u64>>>,
        asked: Vec<Vec<usize>>,
        per_read: Duration,
    }

    impl Script {
        fn new(sweeps: Vec<Vec<Option<u64>>>) -> Self {
            Script { sweeps, asked: Vec::new(), per_read: Duration::ZERO }
        }

        async fn read(&mut self, tenants: &[usize]) -> Sweep {
            self.asked.push(tenants.to_vec());
            let counts = if self.sweeps.len() > 1 { self.sweeps.remove(0) } else { self.sweeps[0].clone() };
            let began = Instant::now();
            let mut sweep = Sweep::default();
            for (i, &tenant) in tenants.iter().enumerate() {
                match counts[tenant] {
                    Some(count) => sweep.reads.push(Read { tenant, count, at: began + self.per_read * (i as u32 + 1) }),
                    None => {
                        sweep.unread += 1;
                        sweep.error = Some(anyhow::anyhow!("HTTP 503"));
                    }
                }
            }
            tokio::time::sleep(self.per_read * tenants.len() as u32).await;
            sweep
        }

        /// [`await_convergence`] over this script, polling every second.
        async fn wait(
            &mut self,
            baselines: &[u64],
            tallies: &[Tally],
            load_end: Instant,
            timeout: Duration,
        ) -> anyhow::Result<Convergence> {
            self.wait_sampled(baselines, tallies, load_end, timeout, None).await
        }

        /// [`Script::wait`], reading only `sample` tenants until they converge.
        async fn wait_sampled(
            &mut self,
            baselines: &[u64],
            tallies: &[Tally],
            load_end: Instant,
            timeout: Duration,
            sample: Option<usize>,
        ) -> anyhow::Result<Convergence> {
            let poll = Duration::from_secs(1);
            await_convergence(baselines, tallies, load_end, timeout, poll, sample, async |tenants: &[usize]| {
                self.read(tenants).await
            })
            .await
        }
    }

    fn all(counts: &[u64]) -> Vec<Option<u64>> {
        counts.iter().copied().map(Some).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn waits_until_the_counts_catch_up() {
        let mut script = Script::new(vec![all(&[3, 0]), vec![None, None], all(&[10, 4]), all(&[10, 5])]);
        let tallies = [Tally { acked: 10, sent: 10 }, Tally { acked: 5, sent: 6 }];
        let convergence = script.wait(&[0, 0], &tallies, Instant::now(), Duration::from_secs(30)).await.unwrap();
        assert!(convergence.converged);
        assert!(convergence.verdict.passed());
        assert_eq!(convergence.waited, Duration::from_secs(3));
        assert_eq!((convergence.sweeps, convergence.unconverged), (4, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_timeout_and_reports_the_loss() {
        let mut script = Script::new(vec![all(&[8])]);
        let tallies = [Tally { acked: 10, sent: 10 }];
        let convergence = script.wait(&[0], &tallies, Instant::now(), Duration::from_secs(5)).await.unwrap();
        assert!(!convergence.converged);
        assert_eq!(convergence.verdict.lost, 2);
        assert_eq!(convergence.waited, Duration::from_secs(5));
        assert_eq!(convergence.unconverged, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn never_reading_a_count_is_an_error() {
        let mut script = Script::new(vec![vec![None]]);
        let result = script.wait(&[0], &[Tally { acked: 1, sent: 1 }], Instant::now(), Duration::from_secs(2)).await;
        let error = format!("{:#}", result.unwrap_err());
        assert!(error.contains("1 of 1 tenants could not be read") && error.contains("HTTP 503"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn only_tenants_not_yet_converged_are_read_again() {
        // Tenant 3 had nothing acknowledged: nothing to wait for. The others converge one by one.
        let mut script = Script::new(vec![all(&[1, 0, 0, 0]), all(&[1, 1, 0, 0]), all(&[1, 1, 1, 0])]);
        script.per_read = Duration::from_millis(10);
        let tallies = [
            Tally { acked: 1, sent: 1 },
            Tally { acked: 1, sent: 1 },
            Tally { acked: 1, sent: 1 },
            Tally { acked: 0, sent: 1 },
        ];
        // The wait starts 2 s after the last acknowledgement.
        let load_end = Instant::now() - Duration::from_secs(2);
        let convergence = script.wait(&[0; 4], &tallies, load_end, Duration::from_secs(30)).await.unwrap();
        // Three sweeps, each over the tenants not yet seen converged; then one final read of all.
        assert_eq!(script.asked, [vec![0, 1, 2], vec![1, 2], vec![2], vec![0, 1, 2, 3]]);
        assert!(convergence.converged && convergence.verdict.passed());
        assert_eq!((convergence.sweeps, convergence.sweep), (3, Duration::from_millis(30)));
        // The first sweep took 30 ms, the second began 1 s later and took 20 ms, the third began
        // 1 s after that and saw tenant 2 converged with its first read, 10 ms in: 2.06 s into
        // the wait, 4.06 s after the load.
        assert_eq!(convergence.waited, Duration::from_millis(4060));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_converged_when_first_seen_so_and_failed_reads_are_read_again() {
        // Tenant 0 is read converged in the first sweep, tenant 1 fails, then is read short, then
        // converged; the final read fails for tenant 1 once, and is retried.
        let mut script = Script::new(vec![
            vec![Some(5), None],
            vec![Some(5), Some(4)],
            vec![Some(5), Some(5)],
            vec![Some(5), None],
            vec![Some(5), Some(5)],
        ]);
        let tallies = [Tally { acked: 5, sent: 5 }; 2];
        let convergence = script.wait(&[0, 0], &tallies, Instant::now(), Duration::from_secs(30)).await.unwrap();
        assert_eq!(script.asked, [vec![0, 1], vec![1], vec![1], vec![0, 1], vec![1]]);
        assert!(convergence.converged && convergence.verdict.passed());
        assert_eq!(convergence.waited, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sample_is_read_until_it_converges_then_every_tenant() {
        // Tenants 0 and 2 make the sample of 2 out of 4; all converge at the second sweep.
        let mut script = Script::new(vec![all(&[0, 0, 0, 0]), all(&[1, 1, 1, 1])]);
        let tallies = [Tally { acked: 1, sent: 1 }; 4];
        let convergence =
            script.wait_sampled(&[0; 4], &tallies, Instant::now(), Duration::from_secs(30), Some(2)).await.unwrap();
        assert_eq!(script.asked[..3], [vec![0, 2], vec![0, 2], vec![1, 3]]);
        assert!(convergence.converged && convergence.verdict.passed());
        assert_eq!(convergence.sampled, Some(Duration::from_secs(1)));
        assert_eq!(convergence.waited, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_verdict_is_on_the_final_read_after_convergence() {
        // Both converge in the first sweep; by the final read one count went below its baseline
        // and the other counts an id never sent.
        let mut script = Script::new(vec![all(&[105, 10]), all(&[99, 12])]);
        let tallies = [Tally { acked: 5, sent: 5 }, Tally { acked: 10, sent: 11 }];
        let convergence = script.wait(&[100, 0], &tallies, Instant::now(), Duration::from_secs(30)).await.unwrap();
        assert!(convergence.converged);
        assert_eq!(convergence.sweeps, 1);
        let v = convergence.verdict;
        assert_eq!((v.lost, v.tenants_short, v.unexpected, v.tenants_over), (5, 1, 1, 1));
    }
}
