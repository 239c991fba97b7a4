//! The item stream: fixed-width ids that never collide across connections or runs, spread
//! round-robin over the tenants, a chosen share of them repeating ids already acknowledged, and
//! the per-tenant tallies the loss check needs.
//!
//! The run hands out item positions 0, 1, 2... in order across all its connections, and the item
//! at position `p` goes to tenant `p % tenants`: every tenant gets its share, to within one item,
//! however many tenants and connections there are (a million tenants and a million items give
//! each tenant one id).
//!
//! An id is a random run tag followed by a number written in base 62, padded to `--id-bytes`.
//! The number of connection `c`'s `n`-th fresh id for a tenant is `n * connections + c`, so two
//! connections never make the same id, and a connection can recompute any id it made from `n`
//! alone: that is what lets repeats reuse acknowledged ids without keeping them.
//!
//! Each connection numbers its batches 0, 1, 2... and remembers which were never acknowledged,
//! with their fresh ids per tenant: with `--exact`, a batch also carries a marker item in a
//! tenant named after it (see [`Shape::marker_prefix`]), and the check reads from the markers
//! which of those the server applied all the same.
//!
//! In the mixed workload, tenants are also deleted (see [`Deletes`]). A connection then tells
//! its ids for a tenant apart by the tenant's life they were acknowledged in: those from before
//! the last acknowledged delete are gone for good, and repeats draw only on ids acknowledged
//! since the last delete, so that no id from a life before is ever posted again. The tallies
//! stay plain numbers.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::bail;
use rand::RngExt;
use rand::rngs::SmallRng;

use crate::check::{BatchId, Ledger, Marker, Tally, Unacked};

/// The digits of an id: alphanumerics only, so that an id needs no escaping in JSON, in a URL or
/// in a Redis command.
const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Characters of the run tag at the start of every id: 62^4, about 15 million, runs that share
/// a tenant prefix are told apart.
const TAG_BYTES: usize = 4;

/// The shortest `--id-bytes`: the tag plus six digits, 62^6 (about 57 billion) id numbers.
pub const MIN_ID_BYTES: usize = TAG_BYTES + 6;

/// The tenant names of a run: the prefix followed by 0, 1, 2...
pub fn tenant_names(prefix: &str, tenants: usize) -> Vec<String> {
    (0..tenants).map(|t| format!("{prefix}{t}")).collect()
}

/// What every connection's generator shares: the run tag, the id width and the stream's shape.
#[derive(Debug, Clone)]
pub struct Shape {
    tag: [u8; TAG_BYTES],
    id_bytes: usize,
    connections: u64,
    tenants: usize,
    repeat: f64,
}

impl Shape {
    /// The shape of a run of `connections` streams over `tenants` tenants with ids of `id_bytes`
    /// bytes (at least [`MIN_ID_BYTES`]), of which the share `repeat` (0 to 1) repeats an
    /// acknowledged id. The run tag is random.
    pub fn new(id_bytes: usize, connections: usize, tenants: usize, repeat: f64) -> Self {
        assert!(id_bytes >= MIN_ID_BYTES && connections > 0 && tenants > 0 && (0.0..=1.0).contains(&repeat));
        let mut rng: SmallRng = rand::make_rng();
        let tag = std::array::from_fn(|_| DIGITS[rng.random_range(0..DIGITS.len())]);
        Shape { tag, id_bytes, connections: connections as u64, tenants, repeat }
    }

    /// The start of every marker tenant's name in a run of tenant prefix `tenant_prefix`:
    /// `<tenant_prefix>~<tag>-`, followed by the connection and the batch number. A data
    /// tenant is the prefix and digits alone, so the `~` keeps the two apart, and the tag keeps
    /// apart the markers of runs that share a prefix.
    pub fn marker_prefix(&self, tenant_prefix: &str) -> String {
        format!("{tenant_prefix}~{}-", String::from_utf8_lossy(&self.tag))
    }

    /// How many fresh ids one connection can make for one tenant before the id numbers would
    /// no longer fit the width.
    fn fresh_ids_per_connection(&self) -> u64 {
        let digits = (self.id_bytes - TAG_BYTES) as u32;
        62u64.checked_pow(digits).map_or(u64::MAX, |space| space / self.connections)
    }
}

/// One batch: items in order, each a tenant index and an id of [`Shape::id_bytes`] bytes.
#[derive(Debug, Default)]
pub struct Batch {
    tenants: Vec<u32>,
    ids: Vec<u8>,
    id_bytes: usize,
    /// The tenants of this batch, each once, as (slot, sequence number of its first fresh id in
    /// the batch): what an acknowledgement credits.
    touched: Vec<(u32, u64)>,
}

impl Batch {
    /// The items, as (tenant index, id).
    pub fn items(&self) -> impl Iterator<Item = (usize, &[u8])> {
        self.tenants.iter().map(|&t| t as usize).zip(self.ids.chunks_exact(self.id_bytes))
    }

    /// The number of items, repeats included.
    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    /// The bytes of all ids together.
    pub fn id_bytes_total(&self) -> usize {
        self.ids.len()
    }
}

/// Per tenant, the deletes of a mixed run so far, shared by its connections. The mixed workload
/// changes them only while no batch to the tenant is in flight (see `mix.rs`), so a batch is
/// always wholly of one life of its tenant.
#[derive(Debug)]
pub struct Deletes {
    /// Delete requests that ended, acknowledged or not: each may have removed the ids
    /// acknowledged before it.
    ended: Vec<AtomicU64>,
    /// The value of `ended` just after the last acknowledged delete (0 before any): the ids
    /// acknowledged before that one are gone for good.
    acknowledged: Vec<AtomicU64>,
}

impl Deletes {
    /// No deletes yet, for `tenants` tenants.
    pub fn new(tenants: usize) -> Self {
        let zeros = || (0..tenants).map(|_| AtomicU64::new(0)).collect();
        Deletes { ended: zeros(), acknowledged: zeros() }
    }

    /// Records a delete of `tenant` that ended, acknowledged or not.
    pub fn ended(&self, tenant: usize, acknowledged: bool) {
        let ended = self.ended[tenant].fetch_add(1, Ordering::Relaxed) + 1;
        if acknowledged {
            self.acknowledged[tenant].store(ended, Ordering::Relaxed);
        }
    }

    /// Whether `tenant` was deleted at all (a delete request ended), and whether a delete of it
    /// was ever acknowledged.
    pub fn history(&self, tenant: usize) -> (bool, bool) {
        (self.ended[tenant].load(Ordering::Relaxed) > 0, self.acknowledged[tenant].load(Ordering::Relaxed) > 0)
    }
}

/// One tenant's fresh ids as seen by one connection.
#[derive(Debug, Clone)]
struct TenantIds {
    /// The tenant's index.
    tenant: u32,
    /// The sequence number of the next fresh id; also how many were sent.
    next: u64,
    /// The sequence numbers of acknowledged fresh ids, as ascending runs. A failed batch leaves
    /// a gap, so there are as many runs as failures plus one: few.
    acked: Vec<AckedRun>,
    /// The tenant's deletes ended when last looked at ([`Deletes`]).
    deletes_seen: u64,
    /// How many of the acknowledged ids (the first, by rank) are from before the tenant's last
    /// delete: neither repeated nor owed to its count any more.
    acked_before: u64,
    /// How many are from before its last acknowledged delete: gone for good, so that they may
    /// not count either.
    gone: u64,
}

/// A run of acknowledged sequence numbers, with how many acknowledged ones come before it (to
/// pick the r-th acknowledged id by binary search).
#[derive(Debug, Clone)]
struct AckedRun {
    seqs: Range<u64>,
    before: u64,
}

impl TenantIds {
    fn acked_count(&self) -> u64 {
        self.acked.last().map_or(0, |run| run.before + (run.seqs.end - run.seqs.start))
    }

    /// Records `seqs` as acknowledged, merging with the last run when they touch.
    fn acknowledge(&mut self, seqs: Range<u64>) {
        if seqs.is_empty() {
            return;
        }
        match self.acked.last_mut() {
            Some(last) if last.seqs.end == seqs.start => last.seqs.end = seqs.end,
            _ => {
                let before = self.acked_count();
                self.acked.push(AckedRun { seqs, before });
            }
        }
    }

    /// The sequence number of the `r`-th acknowledged id (`r` below [`Self::acked_count`]).
    fn acked_seq(&self, r: u64) -> u64 {
        let run = &self.acked[self.acked.partition_point(|run| run.before + (run.seqs.end - run.seqs.start) <= r)];
        run.seqs.start + (r - run.before)
    }

    /// Takes in the tenant's deletes since last looked at: the ids acknowledged so far are of
    /// an earlier life, and gone for good if one of the deletes was acknowledged.
    fn observe(&mut self, deletes: &Deletes) {
        let t = self.tenant as usize;
        let ended = deletes.ended[t].load(Ordering::Relaxed);
        if ended != self.deletes_seen {
            let acked = self.acked_count();
            self.acked_before = acked;
            if deletes.acknowledged[t].load(Ordering::Relaxed) > self.deletes_seen {
                self.gone = acked;
            }
            self.deletes_seen = ended;
        }
    }

    /// The distinct ids owed to the tenant's count (acknowledged since its last delete) and
    /// those it may hold (every id sent but those gone for good).
    fn tally(&self) -> Tally {
        Tally { acked: self.acked_count() - self.acked_before, sent: self.next - self.gone }
    }
}

/// Marks a tenant this connection has sent nothing to.
const NO_SLOT: u32 = u32::MAX;

/// The name of `batch`'s marker tenant, after the run's [`Shape::marker_prefix`].
pub fn marker_tenant(marker_prefix: &str, batch: BatchId) -> String {
    format!("{marker_prefix}{}-{}", batch.connection, batch.seq)
}

/// One connection's item stream, and its tally of what was sent and acknowledged.
///
/// A connection has one batch in flight at a time: [`Generator::next_batch`] makes it, and
/// [`Generator::acknowledged`] credits it once the server took it.
#[derive(Debug)]
pub struct Generator {
    shape: Shape,
    connection: u64,
    fresh_limit: u64,
    /// Per tenant, the index of its [`TenantIds`] in `touched`, or [`NO_SLOT`]: with many
    /// tenants a connection sends to only some of them, and an untouched tenant costs 4 bytes.
    slots: Vec<u32>,
    touched: Vec<TenantIds>,
    /// Error diffusion for the repeat share: exact over the run, with no randomness in whether
    /// an item repeats.
    repeat_credit: f64,
    batch: Batch,
    /// Batches made so far; the last one's number is one less.
    batches: u64,
    /// Whether the batch last made was acknowledged.
    last_acked: bool,
    /// In a mixed run that deletes tenants, its deletes so far.
    deletes: Option<Arc<Deletes>>,
    /// The batches made before the last one and never acknowledged, in order.
    unacked: Vec<Unacked>,
    rng: SmallRng,
}

impl Generator {
    /// The stream of connection `connection` (below the shape's connection count).
    pub fn new(shape: &Shape, connection: usize) -> Self {
        assert!((connection as u64) < shape.connections);
        Generator {
            fresh_limit: shape.fresh_ids_per_connection(),
            connection: connection as u64,
            slots: vec![NO_SLOT; shape.tenants],
            touched: Vec::new(),
            repeat_credit: 0.0,
            batch: Batch { id_bytes: shape.id_bytes, ..Batch::default() },
            batches: 0,
            last_acked: false,
            deletes: None,
            unacked: Vec::new(),
            rng: rand::make_rng(),
            shape: shape.clone(),
        }
    }

    /// The same stream, in a run whose tenants are deleted as `deletes` records.
    pub fn with_deletes(mut self, deletes: Arc<Deletes>) -> Self {
        self.deletes = Some(deletes);
        self
    }

    /// Makes the next batch: the `size` items at the run's positions `start..start + size`,
    /// the one at position `p` for tenant `p % tenants`. A repeat reuses an id this connection
    /// had acknowledged for that tenant before; while a tenant has none, it gets a fresh id
    /// instead.
    pub fn next_batch(&mut self, start: u64, size: usize) -> anyhow::Result<&Batch> {
        // One batch in flight at a time: one never acknowledged by now never will be.
        if self.batches > 0 && !self.last_acked {
            let unacked = self.last_batch_unacked();
            self.unacked.push(unacked);
        }
        self.batches += 1;
        self.last_acked = false;
        let tenants = self.slots.len();
        let batch = &mut self.batch;
        batch.tenants.clear();
        batch.ids.clear();
        batch.touched.clear();
        let mut t = (start % tenants as u64) as usize;
        for i in 0..size {
            if i > 0 {
                t = if t + 1 == tenants { 0 } else { t + 1 };
            }
            let slot = match self.slots[t] {
                NO_SLOT => {
                    self.slots[t] = self.touched.len() as u32;
                    self.touched.push(TenantIds {
                        tenant: t as u32,
                        next: 0,
                        acked: Vec::new(),
                        deletes_seen: 0,
                        acked_before: 0,
                        gone: 0,
                    });
                    self.touched.len() as u32 - 1
                }
                slot => slot,
            };
            let ids = &mut self.touched[slot as usize];
            // The batch's items are consecutive positions: the first `tenants` of them are each
            // a different tenant's first item in it.
            if i < tenants {
                batch.touched.push((slot, ids.next));
                if let Some(deletes) = &self.deletes {
                    ids.observe(deletes);
                }
            }
            self.repeat_credit += self.shape.repeat;
            // Only ids of the tenant's current life repeat: one from before a delete would
            // bring back an id that must stay gone.
            let (from, acked) = (ids.acked_before, ids.acked_count());
            let seq = if self.repeat_credit >= 1.0 && acked > from {
                self.repeat_credit -= 1.0;
                ids.acked_seq(self.rng.random_range(from..acked))
            } else {
                self.repeat_credit = self.repeat_credit.min(1.0);
                if ids.next == self.fresh_limit {
                    bail!("the id space of --id-bytes {} is used up; give more bytes", self.shape.id_bytes);
                }
                ids.next += 1;
                ids.next - 1
            };
            batch.tenants.push(t as u32);
            write_id(&self.shape, self.connection, seq, &mut batch.ids);
        }
        Ok(&self.batch)
    }

    /// Ids to ask `tenant` about, with the answer owed: `known` picked among the ids this
    /// connection had acknowledged in the tenant's current life (true), then `unknown` it never
    /// sent (false), the next fresh ones, which no other connection makes. Fewer when there are
    /// not as many. The caller sees to it that the tenant is not deleted meanwhile.
    pub fn probe(&mut self, tenant: usize, known: usize, unknown: usize) -> Vec<(Vec<u8>, bool)> {
        let mut seqs = Vec::with_capacity(known + unknown);
        let mut next = 0;
        if let Some(ids) = self.touched.get_mut(self.slots[tenant] as usize) {
            if let Some(deletes) = &self.deletes {
                ids.observe(deletes);
            }
            let (from, to) = (ids.acked_before, ids.acked_count());
            if to > from {
                seqs.extend((0..known).map(|_| (ids.acked_seq(self.rng.random_range(from..to)), true)));
            }
            next = ids.next;
        }
        seqs.extend((next..(next + unknown as u64).min(self.fresh_limit)).map(|seq| (seq, false)));
        seqs.into_iter().map(|(seq, owed)| (id_of(&self.shape, self.connection, seq), owed)).collect()
    }

    /// For the final check of a deleted tenant, up to `each` ids this connection had
    /// acknowledged on either side of its last delete: the last ones gone for good (before its
    /// last acknowledged delete), then the first ones owed to its count (since its last delete),
    /// as (ids gone, ids kept). Those nearest the delete are the likeliest to be on the wrong side
    /// of it.
    pub fn around_last_delete(&mut self, tenant: usize, each: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let Some(ids) = self.touched.get_mut(self.slots[tenant] as usize) else { return (Vec::new(), Vec::new()) };
        if let Some(deletes) = &self.deletes {
            ids.observe(deletes);
        }
        let id = |rank| id_of(&self.shape, self.connection, ids.acked_seq(rank));
        let gone = (ids.gone.saturating_sub(each)..ids.gone).map(id).collect();
        let kept = (ids.acked_before..ids.acked_count().min(ids.acked_before + each)).map(id).collect();
        (gone, kept)
    }

    /// The fresh ids of the batch last made, per tenant (index, ids).
    pub fn last_batch_fresh(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.batch.touched.iter().map(|&(slot, first)| {
            let ids = &self.touched[slot as usize];
            (ids.tenant as usize, ids.next - first)
        })
    }

    /// The batch last made, named as its marker is.
    pub fn batch_id(&self) -> BatchId {
        BatchId { connection: self.connection as u32, seq: self.batches.saturating_sub(1) }
    }

    /// Credits the batch last made as acknowledged: its fresh ids become candidates for repeats
    /// and count as acknowledged in the tally. A batch never acknowledged still counts as sent.
    pub fn acknowledged(&mut self) {
        self.last_acked = true;
        for &(slot, first) in &self.batch.touched {
            let ids = &mut self.touched[slot as usize];
            ids.acknowledge(first..ids.next);
        }
    }

    /// The batch last made, as never acknowledged: its fresh ids per tenant.
    fn last_batch_unacked(&self) -> Unacked {
        Unacked { batch: self.batch_id(), fresh: self.last_batch_fresh().filter(|&(_, n)| n > 0).collect() }
    }

    /// Adds what this connection sent to `ledger`: per tenant, the distinct fresh ids sent and
    /// acknowledged (with deletes, those owed to its count and those it may hold); the batches
    /// never acknowledged; and, with `markers`, every batch's marker.
    pub fn add_to(&self, ledger: &mut Ledger, markers: bool) {
        for ids in &self.touched {
            let tally = match &self.deletes {
                // Deletes since this connection last sent to the tenant count too.
                Some(deletes) => {
                    let mut ids = ids.clone();
                    ids.observe(deletes);
                    ids.tally()
                }
                None => ids.tally(),
            };
            ledger.tallies[ids.tenant as usize] += tally;
        }
        ledger.batches += self.batches;
        let first_unacked = ledger.unacked.len();
        ledger.unacked.extend(self.unacked.iter().cloned());
        if self.batches > 0 && !self.last_acked {
            ledger.unacked.push(self.last_batch_unacked());
        }
        if markers {
            // Both in batch order: walk the unacknowledged ones beside every batch.
            let mut unacked = (first_unacked..ledger.unacked.len()).peekable();
            for seq in 0..self.batches {
                let batch = BatchId { connection: self.connection as u32, seq };
                let index = unacked.next_if(|&u| ledger.unacked[u].batch == batch);
                ledger.markers.push(Marker { batch, unacked: index });
            }
        }
    }
}

/// Appends connection `connection`'s id of sequence number `seq` to `out`.
fn write_id(shape: &Shape, connection: u64, seq: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&shape.tag);
    out.resize(start + shape.id_bytes, 0);
    write_base62(seq * shape.connections + connection, &mut out[start + TAG_BYTES..]);
}

/// Connection `connection`'s id of sequence number `seq`.
fn id_of(shape: &Shape, connection: u64, seq: u64) -> Vec<u8> {
    let mut id = Vec::with_capacity(shape.id_bytes);
    write_id(shape, connection, seq, &mut id);
    id
}

/// Writes `n` in base 62 into all of `out`, most significant digit first, padded with zeros.
fn write_base62(mut n: u64, out: &mut [u8]) {
    for digit in out.iter_mut().rev() {
        *digit = DIGITS[(n % 62) as usize];
        n /= 62;
    }
    debug_assert_eq!(n, 0, "the id number must fit the width");
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    #[test]
    fn tallies_match_the_distinct_ids_sent_and_acknowledged() {
        let shape = Shape::new(12, 3, 4, 0.3);
        // Per tenant, every id sent and every id acknowledged, as sets.
        let mut sent: HashMap<usize, HashSet<Vec<u8>>> = HashMap::new();
        let mut acked: HashMap<usize, HashSet<Vec<u8>>> = HashMap::new();
        // Per failed batch, its connection, number and fresh ids per tenant.
        let mut failed: Vec<(u32, u64, HashMap<usize, u64>)> = Vec::new();
        let mut repeats = 0;
        let mut generators: Vec<Generator> = (0..3).map(|c| Generator::new(&shape, c)).collect();
        let mut position = 0;
        for b in 0..50 {
            for (c, generator) in generators.iter_mut().enumerate() {
                // Batches smaller and larger than the tenant count, at every offset.
                let size = 1 + (b * 7 + c) % 25;
                let batch = generator.next_batch(position, size).unwrap();
                position += size as u64;
                assert_eq!(batch.len(), size);
                // Every third batch of connection 1 fails, its last one (49) among them.
                let ok = !(c == 1 && b % 3 == 1);
                let mut fresh: HashMap<usize, u64> = HashMap::new();
                for (t, id) in batch.items() {
                    assert_eq!(id.len(), 12);
                    if acked.get(&t).is_some_and(|ids| ids.contains(id)) {
                        repeats += 1;
                    }
                    if sent.entry(t).or_default().insert(id.to_vec()) {
                        *fresh.entry(t).or_default() += 1;
                    }
                    if ok {
                        acked.entry(t).or_default().insert(id.to_vec());
                    }
                }
                assert_eq!(generator.batch_id(), BatchId { connection: c as u32, seq: b as u64 });
                if ok {
                    generator.acknowledged();
                } else {
                    failed.push((c as u32, b as u64, fresh));
                }
            }
        }
        let mut ledger = Ledger { tallies: vec![Tally::default(); shape.tenants], ..Ledger::default() };
        for generator in &generators {
            generator.add_to(&mut ledger, true);
        }
        for (t, tally) in ledger.tallies.iter().enumerate() {
            assert_eq!(tally.sent, sent[&t].len() as u64, "tenant {t}");
            assert_eq!(tally.acked, acked[&t].len() as u64, "tenant {t}");
        }
        assert!(repeats > 0);
        // The failed batches, with the fresh ids each would add; and a marker for every batch,
        // pointing at the failed ones.
        assert_eq!(ledger.unacked.len(), failed.len());
        for (unacked, (c, b, fresh)) in ledger.unacked.iter().zip(&failed) {
            assert_eq!(unacked.batch, BatchId { connection: *c, seq: *b });
            assert_eq!(&unacked.fresh.iter().copied().collect::<HashMap<usize, u64>>(), fresh);
        }
        assert_eq!((ledger.batches, ledger.markers.len()), (3 * 50, 3 * 50));
        for marker in &ledger.markers {
            let failed = marker.unacked.map(|u| ledger.unacked[u].batch);
            assert_eq!(failed.is_some(), marker.batch.connection == 1 && marker.batch.seq % 3 == 1, "{marker:?}");
            assert!(failed.is_none_or(|batch| batch == marker.batch));
        }
    }

    #[test]
    fn repeats_reuse_only_acknowledged_ids_at_the_requested_share() {
        let shape = Shape::new(16, 2, 5, 0.25);
        let mut generator = Generator::new(&shape, 1);
        let mut acked: HashSet<(usize, Vec<u8>)> = HashSet::new();
        let (mut items, mut repeats) = (0, 0);
        for b in 0..400 {
            let batch = generator.next_batch(b * 100, 100).unwrap();
            let mut seen_fresh = HashSet::new();
            for (t, id) in batch.items() {
                items += 1;
                let key = (t, id.to_vec());
                if acked.contains(&key) {
                    repeats += 1;
                } else {
                    // Anything not acknowledged before must be fresh: never sent before, and not
                    // twice in this batch.
                    assert!(seen_fresh.insert(key), "batch {b} repeats an unacknowledged id");
                }
            }
            if b % 2 == 0 {
                acked.extend(seen_fresh);
                generator.acknowledged();
            }
        }
        let share = repeats as f64 / items as f64;
        assert!((share - 0.25).abs() < 0.01, "repeat share {share}");
    }

    #[test]
    fn ids_differ_across_connections_and_runs() {
        let one = Shape::new(10, 4, 1, 0.0);
        let other = Shape::new(10, 4, 1, 0.0);
        let mut ids = HashSet::new();
        for shape in [&one, &other] {
            for c in 0..4 {
                let mut generator = Generator::new(shape, c);
                for (_, id) in generator.next_batch(c as u64 * 1000, 1000).unwrap().items() {
                    assert!(id.iter().all(u8::is_ascii_alphanumeric));
                    ids.insert(id.to_vec());
                }
            }
        }
        // Two runs may draw the same tag, one time in 15 million.
        assert!(one.tag == other.tag || ids.len() == 8000);
    }

    #[test]
    fn an_exhausted_id_space_is_an_error() {
        let shape = Shape::new(MIN_ID_BYTES, 1, 1, 0.0);
        let mut generator = Generator::new(&shape, 0);
        generator.fresh_limit = 3;
        assert!(generator.next_batch(0, 3).is_ok());
        assert!(generator.next_batch(3, 1).is_err());
    }

    #[test]
    fn positions_spread_the_items_evenly_over_many_tenants() {
        // 16 connections taking batches of 1000 positions in turn, over 100,000 tenants: each
        // tenant gets exactly one id per 100,000 items, whichever connection sent it.
        let tenants = 100_000;
        let shape = Shape::new(16, 16, tenants, 0.0);
        let mut generators: Vec<Generator> = (0..16).map(|c| Generator::new(&shape, c)).collect();
        let mut per_tenant = vec![0u32; tenants];
        for b in 0..200 {
            let generator = &mut generators[(b * 5) % 16];
            let batch = generator.next_batch(b as u64 * 1000, 1000).unwrap();
            for (t, _) in batch.items() {
                per_tenant[t] += 1;
            }
            generator.acknowledged();
        }
        assert!(per_tenant.iter().all(|&n| n == 2));
        let mut ledger = Ledger { tallies: vec![Tally::default(); tenants], ..Ledger::default() };
        for generator in &generators {
            generator.add_to(&mut ledger, false);
            // A connection keeps state only for the tenants it sent to.
            assert!(generator.touched.len() <= 13_000);
        }
        assert!(ledger.tallies.iter().all(|&tally| tally == Tally { acked: 2, sent: 2 }));
        assert!(ledger.unacked.is_empty() && ledger.markers.is_empty());
    }

    #[test]
    fn base62_is_fixed_width() {
        let mut out = [0u8; 6];
        write_base62(0, &mut out);
        assert_eq!(&out, b"000000");
        write_base62(62 * 62 + 61, &mut out);
        assert_eq!(&out, b"00010z");
    }
}
