//! The loss check, after Jepsen's set checker: once the load stops, the counts must come to
//! include every acknowledged item (else items were lost) and nothing that was never sent (else
//! items were invented).
//!
//! Repeats only ever reuse acknowledged ids, so per tenant the distinct ids acknowledged and the
//! distinct ids sent are plain numbers: the checker needs no set of ids, however long the run.
//!
//! Counts alone only bound a tenant's count, between the ids acknowledged and the ids sent: a
//! batch whose answer never came may or may not have been applied, so one acknowledged batch
//! that was lost can hide behind one unacknowledged batch that was applied. With markers
//! (`--exact`), each batch also carries one item in a tenant of its own; batches are
//! all-or-nothing, so the marker's count, 1 or 0, says whether the server applied the batch.
//! Then an acknowledged batch whose marker counts 0 is lost, and named, and each tenant must
//! count exactly its acknowledged ids plus the fresh ids of the unacknowledged batches applied.

use std::ops::AddAssign;
use std::time::Duration;

use serde::Serialize;
// Tokio's clock, so that the tests can run the wait on paused time.
use tokio::time::Instant;

/// What the load knows about one tenant's distinct ids. With deletes (`--mix`), only those of
/// the tenant's life since its last delete are owed, and those acknowledged before its last
/// acknowledged delete are no longer allowed.
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

/// A batch, named as its marker tenant is: by its connection and its number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchId {
    pub connection: u32,
    pub seq: u64,
}

/// A batch never acknowledged, with the fresh ids it carried per tenant (index, ids): they
/// count only if the server applied it all the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unacked {
    pub batch: BatchId,
    pub fresh: Vec<(usize, u64)>,
}

/// A batch's marker tenant: which batch, and, for one never acknowledged, its index in
/// [`Ledger::unacked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    pub batch: BatchId,
    pub unacked: Option<usize>,
}

/// What the load sent, as the check needs it.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Per tenant, its distinct ids acknowledged and sent.
    pub tallies: Vec<Tally>,
    /// Batches sent, acknowledged or not.
    pub batches: u64,
    /// The batches never acknowledged.
    pub unacked: Vec<Unacked>,
    /// With markers, every batch's marker; empty without. The counts are read by subject: the
    /// tenants' first, then marker `i`'s as subject `tallies.len() + i`.
    pub markers: Vec<Marker>,
}

impl Ledger {
    /// Per tenant, the fresh ids of the unacknowledged batches that `applied` says were applied.
    fn applied_ids(&self, applied: &[bool]) -> Vec<u64> {
        let mut ids = vec![0; self.tallies.len()];
        for (batch, _) in self.unacked.iter().zip(applied).filter(|(_, applied)| **applied) {
            for &(tenant, n) in &batch.fresh {
                ids[tenant] += n;
            }
        }
        ids
    }
}

/// One tenant's count, before the load and now, against what the load did.
#[derive(Debug, Clone, Copy)]
struct Reading {
    baseline: u64,
    tally: Tally,
    /// With markers: the fresh ids of the unacknowledged batches that were applied.
    applied: Option<u64>,
    count: u64,
}

impl Reading {
    /// The ids this run added to the count. A count below its baseline went down, which the
    /// contract forbids; it shows up as lost items.
    fn added(&self) -> u64 {
        self.count.saturating_sub(self.baseline)
    }

    /// The fewest ids the run may have added: every acknowledged one, and with markers those
    /// of the unacknowledged batches applied.
    fn at_least(&self) -> u64 {
        self.tally.acked + self.applied.unwrap_or(0)
    }

    /// The most: with markers, exactly [`Reading::at_least`]; without, every id sent.
    fn at_most(&self) -> u64 {
        if self.applied.is_some() { self.at_least() } else { self.tally.sent }
    }

    fn lost(&self) -> u64 {
        self.at_least().saturating_sub(self.added())
    }

    fn unexpected(&self) -> u64 {
        self.added().saturating_sub(self.at_most())
    }
}

/// How many lost batches, and tenants whose count is off, the verdict lists: the figures count
/// them all.
pub const LISTED: usize = 100;

/// A tenant whose count is off, and the bounds it should be within (equal with markers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TenantFigures {
    /// The tenant's index: its name is the tenant prefix followed by it.
    pub tenant: usize,
    pub count: u64,
    pub at_least: u64,
    pub at_most: u64,
}

/// The check's findings over all tenants (and, with markers, all batches).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Distinct ids acknowledged over all tenants.
    pub acked: u64,
    /// Distinct ids sent over all tenants, acknowledged or not.
    pub sent: u64,
    /// With markers: distinct ids the counts must have gained, those acknowledged and those of
    /// the unacknowledged batches applied.
    pub expected: Option<u64>,
    /// Distinct ids the counts gained over the run.
    pub counted: u64,
    /// Acknowledged (or, with markers, applied) but not counted.
    pub lost: u64,
    /// Counted but never sent (or, with markers, sent in a batch that was not applied).
    pub unexpected: u64,
    /// Tenants with at least one lost item.
    pub tenants_short: usize,
    /// Tenants with at least one unexpected item.
    pub tenants_over: usize,
    /// The first [`LISTED`] tenants short or over, with their figures.
    pub tenants_off: Vec<TenantFigures>,
    /// Whether every batch's fate is known, which makes the figures exact: with markers, or
    /// when every batch was acknowledged.
    pub exact: bool,
    /// Batches sent.
    pub batches: u64,
    /// Batches never acknowledged.
    pub batches_unacked: u64,
    /// With markers: unacknowledged batches that the server applied all the same.
    pub batches_unacked_applied: Option<u64>,
    /// With markers: acknowledged batches whose marker counts 0, lost whole.
    pub batches_lost: Option<u64>,
    /// With markers: batches whose marker counts more than its one id.
    pub batches_over: Option<u64>,
    /// The first [`LISTED`] acknowledged batches lost.
    pub lost_batches: Vec<BatchId>,
}

impl Verdict {
    /// Judges the counts of every subject of `ledger` (its tenants, then its markers), with the
    /// tenants' `baselines`.
    pub fn judge(baselines: &[u64], ledger: &Ledger, counts: &[u64]) -> Verdict {
        let tenants = ledger.tallies.len();
        let markers = !ledger.markers.is_empty();
        let mut verdict =
            Verdict { batches: ledger.batches, batches_unacked: ledger.unacked.len() as u64, ..Verdict::default() };
        let mut applied_ids = None;
        if markers {
            let mut applied = vec![false; ledger.unacked.len()];
            let (mut lost, mut over) = (0, 0);
            for (marker, &count) in ledger.markers.iter().zip(&counts[tenants..]) {
                over += u64::from(count > 1);
                match marker.unacked {
                    Some(u) => applied[u] = count > 0,
                    None if count == 0 => {
                        lost += 1;
                        if verdict.lost_batches.len() < LISTED {
                            verdict.lost_batches.push(marker.batch);
                        }
                    }
                    None => {}
                }
            }
            verdict.batches_unacked_applied = Some(applied.iter().filter(|&&a| a).count() as u64);
            verdict.batches_lost = Some(lost);
            verdict.batches_over = Some(over);
            verdict.expected = Some(0);
            applied_ids = Some(ledger.applied_ids(&applied));
        }
        for (tenant, (&tally, &count)) in ledger.tallies.iter().zip(counts).enumerate() {
            let applied = applied_ids.as_ref().map(|ids| ids[tenant]);
            let reading = Reading { baseline: baselines[tenant], tally, applied, count };
            verdict.acked += tally.acked;
            verdict.sent += tally.sent;
            verdict.expected = verdict.expected.map(|n| n + reading.at_least());
            verdict.counted += reading.added();
            verdict.lost += reading.lost();
            verdict.unexpected += reading.unexpected();
            verdict.tenants_short += usize::from(reading.lost() > 0);
            verdict.tenants_over += usize::from(reading.unexpected() > 0);
            if (reading.lost() > 0 || reading.unexpected() > 0) && verdict.tenants_off.len() < LISTED {
                verdict.tenants_off.push(TenantFigures {
                    tenant,
                    count,
                    at_least: reading.baseline + reading.at_least(),
                    at_most: reading.baseline + reading.at_most(),
                });
            }
        }
        verdict.exact = markers || ledger.unacked.is_empty();
        verdict
    }

    /// True when nothing was lost and nothing invented.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.unexpected == 0
            && self.batches_lost.unwrap_or(0) == 0
            && self.batches_over.unwrap_or(0) == 0
    }
}

/// One count read while checking: the subject (a tenant, or a marker after the tenants), its
/// count, and when the answer came.
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
#[derive(Debug, Clone, Serialize)]
pub struct Convergence {
    /// The verdict on the final read of every count, after the wait.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// True when every tenant (and, with markers, every acknowledged batch's marker) was seen
    /// converged before the timeout.
    pub converged: bool,
    /// From the end of the load (its last acknowledgement) to the read that first saw the last
    /// tenant (or marker) converged; or, if some never did, to the timeout.
    #[serde(serialize_with = "seconds")]
    pub waited: Duration,
    /// How long the first sweep over every tenant (and marker) not yet seen converged took: the
    /// granularity of `waited`, since a count is seen converged only when it is read.
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
    /// Markers of acknowledged batches never seen at 1 (0 when `converged`).
    pub unconverged_markers: usize,
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
/// `read` reads the counts of the subjects it is given: tenants (indexes into `baselines` and
/// the ledger's tallies), then, with markers, the batches' markers after them. Each sweep reads
/// only the subjects not yet seen converged: a tenant whose count gained its acknowledged ids
/// (with markers: exactly the ids of the batches applied), an acknowledged batch's marker at 1.
/// A tenant with nothing to wait for is not read. With markers, every sweep also reads the
/// markers of the unacknowledged batches: one found applied changes what its tenants must
/// count, and they are read again. Sweeps follow each other `poll` apart until every subject was
/// seen converged or `timeout` has passed since the wait began. A subject converged when it was
/// first seen so, and the wait is measured from `load_end`. Then one final read of every count
/// feeds the verdict, so that a count that went down, or over, after it was seen converged is
/// still caught. A count that could not be read is read again; only if some subject's count was
/// never read is that an error.
pub async fn await_convergence<F>(
    baselines: &[u64],
    ledger: &Ledger,
    load_end: Instant,
    timeout: Duration,
    poll: Duration,
    sample: Option<usize>,
    mut read: F,
) -> anyhow::Result<Convergence>
where
    F: AsyncFnMut(&[usize]) -> Sweep,
{
    let tenants = ledger.tallies.len();
    anyhow::ensure!(baselines.len() == tenants, "{} baselines for {tenants} tenants", baselines.len());
    let subjects = tenants + ledger.markers.len();
    let markers = !ledger.markers.is_empty();
    // With markers, the unacknowledged batches last seen applied, and their ids per tenant.
    let mut applied = vec![false; ledger.unacked.len()];
    let mut applied_ids = vec![0; tenants];
    let converges = |subject: usize, count: u64, applied_ids: &[u64]| {
        if subject >= tenants {
            return count >= 1;
        }
        let applied = markers.then(|| applied_ids[subject]);
        let reading = Reading { baseline: baselines[subject], tally: ledger.tallies[subject], applied, count };
        reading.lost() == 0 && (!markers || reading.unexpected() == 0)
    };
    let start = Instant::now();
    // The last count read of every subject, and whether it was seen converged.
    let mut last: Vec<Option<u64>> = vec![None; subjects];
    let mut seen = vec![false; subjects];
    // What to wait for: tenants that must gain ids (with markers, any that might), and the
    // markers of the acknowledged batches; the others' markers are read beside them.
    let tenants_waiting: Vec<usize> = (0..tenants)
        .filter(|&t| if markers { ledger.tallies[t].sent > 0 } else { ledger.tallies[t].acked > 0 })
        .collect();
    let marker_subjects = ledger.markers.iter().enumerate().map(|(i, marker)| (tenants + i, marker));
    let acked_markers = marker_subjects.clone().filter(|(_, marker)| marker.unacked.is_none()).map(|(s, _)| s);
    let watched: Vec<usize> = marker_subjects.filter(|(_, marker)| marker.unacked.is_some()).map(|(s, _)| s).collect();
    let waiting: Vec<usize> = tenants_waiting.iter().copied().chain(acked_markers).collect();
    let mut awaited = vec![false; subjects];
    for &subject in &waiting {
        awaited[subject] = true;
    }
    // With a sample, only it is read at first: a light load on a system still merging. Evenly
    // spaced over the tenants, so that it spans their shards.
    let mut sampled = None;
    let sample: Vec<usize> = match sample {
        Some(n) if n < tenants_waiting.len() => {
            tenants_waiting.iter().copied().step_by(tenants_waiting.len().div_ceil(n.max(1))).collect()
        }
        _ => Vec::new(),
    };
    let mut full = sample.is_empty();
    let mut last_converged: Option<Instant> = None;
    let since_load_end = |at: Option<Instant>| at.map_or(Duration::ZERO, |at| at.saturating_duration_since(load_end));
    let (mut sweeps, mut first_sweep) = (0, None);
    let mut last_error = None;
    let waited = loop {
        let phase = if full { &waiting } else { &sample };
        let mut asked: Vec<usize> = phase.iter().copied().filter(|&s| !seen[s]).collect();
        if asked.is_empty() && !full {
            sampled = Some(since_load_end(last_converged));
            full = true;
            continue;
        }
        if asked.is_empty() {
            break since_load_end(last_converged);
        }
        asked.extend(&watched);
        let began = Instant::now();
        let sweep = read(&asked).await;
        if full && first_sweep.is_none() {
            first_sweep = Some(began.elapsed());
        }
        sweeps += 1;
        // The unacknowledged batches' markers first: they set what the tenants must count.
        let mut changed = false;
        for read in &sweep.reads {
            last[read.tenant] = Some(read.count);
            let Some(u) = read.tenant.checked_sub(tenants).and_then(|m| ledger.markers[m].unacked) else { continue };
            if applied[u] != (read.count > 0) {
                applied[u] = read.count > 0;
                changed = true;
                // Its tenants were seen converged against other figures: they are judged again.
                for &(tenant, _) in &ledger.unacked[u].fresh {
                    seen[tenant] = false;
                }
            }
        }
        if changed {
            applied_ids = ledger.applied_ids(&applied);
        }
        for &Read { tenant: subject, count, at } in &sweep.reads {
            if awaited[subject] && !seen[subject] && converges(subject, count, &applied_ids) {
                seen[subject] = true;
                last_converged = last_converged.max(Some(at));
            }
        }
        last_error = sweep.error.or(last_error);
        let phase = if full { &waiting } else { &sample };
        let remaining = phase.iter().any(|&s| !seen[s]);
        if remaining && start.elapsed() >= timeout {
            break Instant::now().saturating_duration_since(load_end);
        }
        if remaining {
            tokio::time::sleep(poll).await;
        }
    };

    let mut fresh: Vec<Option<u64>> = vec![None; subjects];
    let mut unread: Vec<usize> = (0..subjects).collect();
    for pass in 0..FINAL_READ_PASSES {
        if pass > 0 {
            tokio::time::sleep(poll).await;
        }
        let sweep = read(&unread).await;
        for Read { tenant, count, .. } in sweep.reads {
            fresh[tenant] = Some(count);
        }
        last_error = sweep.error.or(last_error);
        unread.retain(|&s| fresh[s].is_none());
        if unread.is_empty() {
            break;
        }
    }
    let counts: Vec<Option<u64>> = fresh.iter().zip(&last).map(|(fresh, last)| fresh.or(*last)).collect();
    let never_read = counts.iter().filter(|count| count.is_none()).count();
    if never_read > 0 {
        let error = last_error.unwrap_or_else(|| anyhow::anyhow!("no answer"));
        let what = if markers { "tenants and batch markers" } else { "tenants" };
        return Err(error.context(format!("the counts of {never_read} of {subjects} {what} could not be read")));
    }
    let counts: Vec<u64> = counts.into_iter().flatten().collect();
    let never_seen = |subjects: &[usize]| subjects.iter().filter(|&&s| !seen[s]).count();
    Ok(Convergence {
        verdict: Verdict::judge(baselines, ledger, &counts),
        converged: waiting.iter().all(|&s| seen[s]),
        waited,
        sweep: first_sweep.unwrap_or_default(),
        sampled,
        sweeps,
        unconverged: never_seen(&tenants_waiting),
        unconverged_markers: never_seen(&waiting[tenants_waiting.len()..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger without markers: per tenant, its (acknowledged, sent) distinct ids.
    fn counts_only(tallies: &[(u64, u64)]) -> Ledger {
        let tallies = tallies.iter().map(|&(acked, sent)| Tally { acked, sent }).collect();
        Ledger { tallies, ..Ledger::default() }
    }

    /// The verdict on tenants without markers, each (baseline, acknowledged, sent, count).
    fn judge(rows: &[(u64, u64, u64, u64)]) -> Verdict {
        let ledger = counts_only(&rows.iter().map(|&(_, acked, sent, _)| (acked, sent)).collect::<Vec<_>>());
        let baselines: Vec<u64> = rows.iter().map(|row| row.0).collect();
        let counts: Vec<u64> = rows.iter().map(|row| row.3).collect();
        Verdict::judge(&baselines, &ledger, &counts)
    }

    #[test]
    fn exact_counts_pass() {
        let verdict = judge(&[(0, 10, 10, 10), (0, 5, 5, 5)]);
        assert_eq!((verdict.acked, verdict.sent, verdict.counted), (15, 15, 15));
        assert!(verdict.passed());
        // Every batch was acknowledged: counts alone are exact.
        assert!(verdict.exact);
    }

    #[test]
    fn unacknowledged_batches_may_or_may_not_count() {
        // 4 ids were in failed batches: counting none, some or all of them is fine.
        for count in 10..=14 {
            assert!(judge(&[(0, 10, 14, count)]).passed(), "count {count}");
        }
    }

    #[test]
    fn short_counts_are_lost_items_per_tenant() {
        // Repeats add nothing to either tally, so 100 items of which 30 repeated are 70 distinct.
        let verdict = judge(&[(0, 70, 70, 63), (0, 70, 80, 75), (0, 70, 70, 61)]);
        assert_eq!(verdict.lost, 7 + 9);
        assert_eq!(verdict.tenants_short, 2);
        assert_eq!(verdict.unexpected, 0);
        let off = TenantFigures { tenant: 2, count: 61, at_least: 70, at_most: 70 };
        assert_eq!(verdict.tenants_off[1], off);
        assert!(!verdict.passed());
    }

    #[test]
    fn counts_beyond_what_was_sent_are_unexpected() {
        let verdict = judge(&[(0, 10, 12, 15), (0, 10, 10, 10)]);
        assert_eq!((verdict.lost, verdict.unexpected, verdict.tenants_over), (0, 3, 1));
        assert!(!verdict.passed());
    }

    #[test]
    fn baselines_are_subtracted_and_a_count_that_went_down_loses() {
        assert!(judge(&[(1000, 10, 10, 1010)]).passed());
        let verdict = judge(&[(1000, 10, 10, 990)]);
        assert_eq!((verdict.counted, verdict.lost), (0, 10));
    }

    /// Three batches of 5 fresh ids in each of two tenants, on connection 0: the first two
    /// acknowledged, the third not; with markers or without.
    fn three_batches(markers: bool) -> Ledger {
        let batch = |seq| BatchId { connection: 0, seq };
        let mut ledger = counts_only(&[(10, 15), (10, 15)]);
        ledger.batches = 3;
        ledger.unacked = vec![Unacked { batch: batch(2), fresh: vec![(0, 5), (1, 5)] }];
        if markers {
            let unacked = [None, None, Some(0)];
            ledger.markers = (0..3).map(|seq| Marker { batch: batch(seq), unacked: unacked[seq as usize] }).collect();
        }
        ledger
    }

    #[test]
    fn a_lost_batch_hides_behind_an_applied_one_from_counts_alone_but_not_from_markers() {
        // The server lost acknowledged batch 1 and applied unacknowledged batch 2, of the same
        // size: each tenant counts 10, what was acknowledged.
        let counts_alone = Verdict::judge(&[0, 0], &three_batches(false), &[10, 10]);
        assert!(counts_alone.passed(), "{counts_alone:?}");
        assert!(!counts_alone.exact);
        // The markers of batches 0, 1 and 2 count 1, 0 and 1.
        let verdict = Verdict::judge(&[0, 0], &three_batches(true), &[10, 10, 1, 0, 1]);
        assert!(!verdict.passed());
        assert!(verdict.exact);
        assert_eq!(verdict.lost_batches, [BatchId { connection: 0, seq: 1 }]);
        assert_eq!((verdict.batches_lost, verdict.batches_unacked_applied), (Some(1), Some(1)));
        assert_eq!((verdict.expected, verdict.lost, verdict.tenants_short), (Some(30), 10, 2));
        assert_eq!(verdict.tenants_off[0], TenantFigures { tenant: 0, count: 10, at_least: 15, at_most: 15 });
    }

    #[test]
    fn with_markers_each_batch_applied_counts_exactly() {
        // Batch 2 was not applied: the tenants count exactly the acknowledged ids.
        assert!(Verdict::judge(&[0, 0], &three_batches(true), &[10, 10, 1, 1, 0]).passed());
        // It was applied: they count its ids too, no fewer, no more.
        assert!(Verdict::judge(&[0, 0], &three_batches(true), &[15, 15, 1, 1, 1]).passed());
        let short = Verdict::judge(&[0, 0], &three_batches(true), &[15, 14, 1, 1, 1]);
        assert_eq!((short.lost, short.batches_lost), (1, Some(0)));
        // Its ids counted while its marker says it was not applied: it was not all-or-nothing.
        let over = Verdict::judge(&[0, 0], &three_batches(true), &[15, 15, 1, 1, 0]);
        assert_eq!((over.unexpected, over.tenants_over), (10, 2));
        // A marker counting more than its one id.
        assert_eq!(Verdict::judge(&[0, 0], &three_batches(true), &[10, 10, 2, 1, 0]).batches_over, Some(1));
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
            ledger: &Ledger,
            load_end: Instant,
            timeout: Duration,
        ) -> anyhow::Result<Convergence> {
            self.wait_sampled(baselines, ledger, load_end, timeout, None).await
        }

        /// [`Script::wait`], reading only `sample` tenants until they converge.
        async fn wait_sampled(
            &mut self,
            baselines: &[u64],
            ledger: &Ledger,
            load_end: Instant,
            timeout: Duration,
            sample: Option<usize>,
        ) -> anyhow::Result<Convergence> {
            let poll = Duration::from_secs(1);
            await_convergence(baselines, ledger, load_end, timeout, poll, sample, async |tenants: &[usize]| {
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
        let ledger = counts_only(&[(10, 10), (5, 6)]);
        let convergence = script.wait(&[0, 0], &ledger, Instant::now(), Duration::from_secs(30)).await.unwrap();
        assert!(convergence.converged);
        assert!(convergence.verdict.passed());
        assert_eq!(convergence.waited, Duration::from_secs(3));
        assert_eq!((convergence.sweeps, convergence.unconverged), (4, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_timeout_and_reports_the_loss() {
        let mut script = Script::new(vec![all(&[8])]);
        let ledger = counts_only(&[(10, 10)]);
        let convergence = script.wait(&[0], &ledger, Instant::now(), Duration::from_secs(5)).await.unwrap();
        assert!(!convergence.converged);
        assert_eq!(convergence.verdict.lost, 2);
        assert_eq!(convergence.waited, Duration::from_secs(5));
        assert_eq!(convergence.unconverged, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn never_reading_a_count_is_an_error() {
        let mut script = Script::new(vec![vec![None]]);
        let result = script.wait(&[0], &counts_only(&[(1, 1)]), Instant::now(), Duration::from_secs(2)).await;
        let error = format!("{:#}", result.unwrap_err());
        assert!(error.contains("1 of 1 tenants could not be read") && error.contains("HTTP 503"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn only_tenants_not_yet_converged_are_read_again() {
        // Tenant 3 had nothing acknowledged: nothing to wait for. The others converge one by one.
        let mut script = Script::new(vec![all(&[1, 0, 0, 0]), all(&[1, 1, 0, 0]), all(&[1, 1, 1, 0])]);
        script.per_read = Duration::from_millis(10);
        let ledger = counts_only(&[(1, 1), (1, 1), (1, 1), (0, 1)]);
        // The wait starts 2 s after the last acknowledgement.
        let load_end = Instant::now() - Duration::from_secs(2);
        let convergence = script.wait(&[0; 4], &ledger, load_end, Duration::from_secs(30)).await.unwrap();
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
        let ledger = counts_only(&[(5, 5); 2]);
        let convergence = script.wait(&[0, 0], &ledger, Instant::now(), Duration::from_secs(30)).await.unwrap();
        assert_eq!(script.asked, [vec![0, 1], vec![1], vec![1], vec![0, 1], vec![1]]);
        assert!(convergence.converged && convergence.verdict.passed());
        assert_eq!(convergence.waited, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sample_is_read_until_it_converges_then_every_tenant() {
        // Tenants 0 and 2 make the sample of 2 out of 4; all converge at the second sweep.
        let mut script = Script::new(vec![all(&[0, 0, 0, 0]), all(&[1, 1, 1, 1])]);
        let ledger = counts_only(&[(1, 1); 4]);
        let convergence =
            script.wait_sampled(&[0; 4], &ledger, Instant::now(), Duration::from_secs(30), Some(2)).await.unwrap();
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
        let ledger = counts_only(&[(5, 5), (10, 11)]);
        let convergence = script.wait(&[100, 0], &ledger, Instant::now(), Duration::from_secs(30)).await.unwrap();
        assert!(convergence.converged);
        assert_eq!(convergence.sweeps, 1);
        let v = convergence.verdict;
        assert_eq!((v.lost, v.tenants_short, v.unexpected, v.tenants_over), (5, 1, 1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn with_markers_a_batch_found_applied_has_its_tenants_read_again() {
        // One tenant; batches 0 and 1 acknowledged, 5 ids each; batch 2 not, 5 more ids.
        // Subjects: the tenant, then the markers of batches 0, 1 and 2. The first sweep sees the
        // tenant at its acknowledged ids and batch 2 not applied; the second finds batch 2
        // applied after all, so the tenant, seen converged, is read again and must count it.
        let batch = |seq| BatchId { connection: 0, seq };
        let ledger = Ledger {
            tallies: vec![Tally { acked: 10, sent: 15 }],
            batches: 3,
            unacked: vec![Unacked { batch: batch(2), fresh: vec![(0, 5)] }],
            markers: vec![
                Marker { batch: batch(0), unacked: None },
                Marker { batch: batch(1), unacked: None },
                Marker { batch: batch(2), unacked: Some(0) },
            ],
        };
        let mut script = Script::new(vec![all(&[10, 1, 0, 0]), all(&[15, 1, 1, 1])]);
        let convergence = script.wait(&[0], &ledger, Instant::now(), Duration::from_secs(30)).await.unwrap();
        assert_eq!(script.asked, [vec![0, 1, 2, 3], vec![2, 3], vec![0, 3], vec![0, 1, 2, 3]]);
        assert!(convergence.converged);
        assert_eq!(convergence.waited, Duration::from_secs(2));
        let v = &convergence.verdict;
        assert!(v.passed() && v.exact, "{v:?}");
        assert_eq!((v.expected, v.batches_unacked_applied), (Some(15), Some(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn with_markers_a_lost_batch_is_waited_for_then_named() {
        // Batch 1 never shows; its tenant is short by its 5 ids.
        let batch = |seq| BatchId { connection: 3, seq };
        let ledger = Ledger {
            tallies: vec![Tally { acked: 10, sent: 10 }],
            batches: 2,
            unacked: Vec::new(),
            markers: (0..2).map(|seq| Marker { batch: batch(seq), unacked: None }).collect(),
        };
        let mut script = Script::new(vec![all(&[5, 1, 0])]);
        let convergence = script.wait(&[0], &ledger, Instant::now(), Duration::from_secs(5)).await.unwrap();
        assert!(!convergence.converged);
        assert_eq!((convergence.unconverged, convergence.unconverged_markers), (1, 1));
        let v = &convergence.verdict;
        assert_eq!((v.lost, v.batches_lost, v.lost_batches.as_slice()), (5, Some(1), &[batch(1)][..]));
    }
}
