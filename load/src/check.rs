//! The loss check, after Jepsen's set checker: once the load stops, the counts must come to
//! include every acknowledged item (else items were lost) and nothing that was never sent (else
//! items were invented).
//!
//! Repeats only ever reuse acknowledged ids, so per tenant the distinct ids acknowledged and the
//! distinct ids sent are plain numbers: the checker needs no set of ids, however long the run.

use std::future::Future;
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

/// The outcome of waiting for the counts to converge.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Convergence {
    /// The verdict on the last counts read.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// True when every count reached its acknowledged ids before the timeout.
    pub converged: bool,
    /// From the start of the wait to the read that converged, or to the timeout.
    #[serde(serialize_with = "seconds")]
    pub waited: Duration,
}

fn seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// Reads the counts (with `read`, which returns one count per tenant in tenant order) every
/// `poll` until each tenant's count has gained at least its acknowledged ids, or until `timeout`
/// has passed; then judges the last counts read. A failed read is retried until the timeout;
/// only if no read ever succeeded is the error returned.
pub async fn await_convergence<F, Fut>(
    baselines: &[u64],
    tallies: &[Tally],
    timeout: Duration,
    poll: Duration,
    mut read: F,
) -> anyhow::Result<Convergence>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Vec<u64>>>,
{
    let start = Instant::now();
    let mut last: Option<Vec<Reading>> = None;
    let mut last_error = None;
    loop {
        match read().await {
            Ok(counts) => {
                anyhow::ensure!(
                    counts.len() == tallies.len(),
                    "read {} counts for {} tenants",
                    counts.len(),
                    tallies.len()
                );
                let readings: Vec<Reading> = baselines
                    .iter()
                    .zip(tallies)
                    .zip(counts)
                    .map(|((&baseline, &tally), count)| Reading { baseline, tally, count })
                    .collect();
                if readings.iter().all(|reading| reading.lost() == 0) {
                    return Ok(Convergence {
                        verdict: Verdict::judge(&readings),
                        converged: true,
                        waited: start.elapsed(),
                    });
                }
                last = Some(readings);
            }
            Err(error) => last_error = Some(error),
        }
        if start.elapsed() >= timeout {
            return match (last, last_error) {
                (Some(readings), _) => {
                    Ok(Convergence { verdict: Verdict::judge(&readings), converged: false, waited: start.elapsed() })
                }
                (None, Some(error)) => Err(error.context("no count could be read before --converge-timeout")),
                (None, None) => unreachable!("every pass either read counts or failed"),
            };
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

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

    #[tokio::test(start_paused = true)]
    async fn waits_until_the_counts_catch_up() {
        let reads = RefCell::new(vec![Ok(vec![3, 0]), Err(anyhow::anyhow!("503")), Ok(vec![10, 4]), Ok(vec![10, 5])]);
        let tallies = [Tally { acked: 10, sent: 10 }, Tally { acked: 5, sent: 6 }];
        let convergence = await_convergence(&[0, 0], &tallies, Duration::from_secs(30), Duration::from_secs(1), || {
            let next = reads.borrow_mut().remove(0);
            async move { next }
        })
        .await
        .unwrap();
        assert!(convergence.converged);
        assert!(convergence.verdict.passed());
        assert_eq!(convergence.waited, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_timeout_and_reports_the_loss() {
        let tallies = [Tally { acked: 10, sent: 10 }];
        let convergence =
            await_convergence(&[0], &tallies, Duration::from_secs(5), Duration::from_secs(1), || async { Ok(vec![8]) })
                .await
                .unwrap();
        assert!(!convergence.converged);
        assert_eq!(convergence.verdict.lost, 2);
        assert_eq!(convergence.waited, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn never_reading_a_count_is_an_error() {
        let result =
            await_convergence(&[0], &[Tally::default()], Duration::from_secs(2), Duration::from_secs(1), || async {
                Err(anyhow::anyhow!("connection refused"))
            })
            .await;
        assert!(result.is_err());
    }
}
