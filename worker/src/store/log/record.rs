//! The format of a log record, and the reader that finds every intact record in a file.
//!
//! A record is one acknowledged batch:
//!
//! ```text
//! [magic: u32 LE][length: u32 LE][CRC-32 of length and payload: u32 LE][payload: length bytes]
//! ```
//!
//! and its payload is the batch's items grouped into runs, one per tenant, sorted by shard and
//! tenant, so that the worker merging a shard takes that shard's runs and skips the rest
//! without reading their ids:
//!
//! ```text
//! run: [shard: u16 LE][run length: u32 LE][varint tenant length][tenant]([varint id length][id])*
//! ```
//!
//! The magic frames records: after a damaged record (a bad checksum, a run of zero bytes) the
//! reader finds the next intact one by looking for the magic, so damage in the middle of a file
//! never hides the records after it. A damaged record at the very end of a file is the torn
//! tail a crash mid-append leaves; it was never acknowledged.

use countapp_shared::items::Item;

use crate::store::layout::shard_of;

/// The first four bytes of every record, "CAR1" read as little-endian bytes.
const MAGIC: u32 = u32::from_le_bytes(*b"CAR1");
/// Bytes of a record's header: magic, length and checksum.
pub(crate) const HEADER_LEN: usize = 12;
/// Bytes of a run's header: shard and length.
const RUN_HEADER_LEN: usize = 6;

/// Encodes `items` as one record, ready to be appended, for a database of `shards` shards.
pub(crate) fn encode(items: &[Item<'_>], shards: u16) -> Vec<u8> {
    let mut order: Vec<(u16, usize)> =
        items.iter().enumerate().map(|(i, item)| (shard_of(&item.tenant, shards), i)).collect();
    order.sort_unstable_by(|&(sa, a), &(sb, b)| (sa, &*items[a].tenant).cmp(&(sb, &*items[b].tenant)));
    let body: usize =
        items.iter().map(|item| varint_len(item.id.len()) + item.id.len() + varint_len(item.tenant.len())).sum();
    let mut record = Vec::with_capacity(HEADER_LEN + body + items.len() * (RUN_HEADER_LEN + 8));
    record.extend_from_slice(&[0; HEADER_LEN]);
    let mut run_start = None;
    let mut current: Option<(u16, &str)> = None;
    for (shard, i) in order {
        let item = &items[i];
        if current != Some((shard, &item.tenant)) {
            if let Some(start) = run_start {
                end_run(&mut record, start);
            }
            run_start = Some(record.len());
            record.extend_from_slice(&shard.to_le_bytes());
            record.extend_from_slice(&[0; 4]);
            put_bytes(&mut record, item.tenant.as_bytes());
            current = Some((shard, &item.tenant));
        }
        put_bytes(&mut record, item.id.as_bytes());
    }
    if let Some(start) = run_start {
        end_run(&mut record, start);
    }
    let len = u32::try_from(record.len() - HEADER_LEN).expect("a batch is bounded by max_body_bytes, far below 4 GiB");
    record[..4].copy_from_slice(&MAGIC.to_le_bytes());
    record[4..8].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&record[4..8]);
    let crc = crc32_continue(crc, &record[HEADER_LEN..]);
    record[8..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    record
}

/// Writes the length of the run that starts at `start` into its header.
fn end_run(record: &mut [u8], start: usize) {
    let len = u32::try_from(record.len() - start - RUN_HEADER_LEN).expect("a run is shorter than its batch");
    record[start + 2..start + RUN_HEADER_LEN].copy_from_slice(&len.to_le_bytes());
}

fn crc32_continue(crc: u32, bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(crc);
    hasher.update(bytes);
    hasher.finalize()
}

/// The checksum of a record's length field and payload.
fn record_crc(len: &[u8], payload: &[u8]) -> u32 {
    crc32_continue(crc32fast::hash(len), payload)
}

/// What the reader finds in a log file, in order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry<'a> {
    /// An intact record.
    Record(Payload<'a>),
    /// Bytes that hold no intact record, from `offset` on: damage if an intact record follows,
    /// else the torn tail of the file.
    Damaged { offset: usize, len: usize },
}

/// The entries of a log file's contents: every intact record, and every stretch of damage
/// between and after them.
pub(crate) struct Records<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Records<'a> {
    /// Reads the records of `data`, the whole contents of one log file.
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Records { data, pos: 0 }
    }

    /// The payload of an intact record starting at `at`, and its end.
    fn record_at(&self, at: usize) -> Option<(Payload<'a>, usize)> {
        let header = self.data.get(at..at.checked_add(HEADER_LEN)?)?;
        if u32::from_le_bytes(header[..4].try_into().unwrap()) != MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(header[8..12].try_into().unwrap());
        let end = (at + HEADER_LEN).checked_add(len)?;
        let payload = self.data.get(at + HEADER_LEN..end)?;
        (record_crc(&header[4..8], payload) == crc).then_some((Payload(payload), end))
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Entry<'a>> {
        if self.pos >= self.data.len() {
            return None;
        }
        if let Some((payload, end)) = self.record_at(self.pos) {
            self.pos = end;
            return Some(Entry::Record(payload));
        }
        // Damage: the next intact record, if any, starts at a later magic.
        let offset = self.pos;
        let magic = MAGIC.to_le_bytes();
        let next = (offset + 1..self.data.len().saturating_sub(HEADER_LEN - 1))
            .filter(|&at| self.data[at..at + 4] == magic)
            .find(|&at| self.record_at(at).is_some());
        self.pos = next.unwrap_or(self.data.len());
        Some(Entry::Damaged { offset, len: self.pos - offset })
    }
}

/// The payload of an intact record: its runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Payload<'a>(&'a [u8]);

/// A payload whose checksum held but whose structure does not parse: written by a bug, never by
/// a crash.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a log record with a valid checksum does not parse")]
pub(crate) struct Malformed;

impl<'a> Payload<'a> {
    /// The runs of the record, in order.
    pub(crate) fn runs(self) -> impl Iterator<Item = Result<Run<'a>, Malformed>> {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let run = (|| {
                let header = rest.get(..RUN_HEADER_LEN).ok_or(Malformed)?;
                let shard = u16::from_le_bytes(header[..2].try_into().unwrap());
                let len = u32::from_le_bytes(header[2..].try_into().unwrap()) as usize;
                let mut body = rest.get(RUN_HEADER_LEN..RUN_HEADER_LEN + len).ok_or(Malformed)?;
                rest = &rest[RUN_HEADER_LEN + len..];
                let tenant = std::str::from_utf8(take_bytes(&mut body)?).map_err(|_| Malformed)?;
                Ok(Run { shard, tenant, ids: body })
            })();
            if run.is_err() {
                rest = &[];
            }
            Some(run)
        })
    }

    /// Every item of the record as `(tenant, id)`, checked to be UTF-8.
    #[cfg(test)]
    pub(crate) fn items(self) -> Result<Vec<(&'a str, &'a str)>, Malformed> {
        let mut items = Vec::new();
        for run in self.runs() {
            let run = run?;
            run.count_ids()?;
            for id in run.ids() {
                items.push((run.tenant, std::str::from_utf8(id).map_err(|_| Malformed)?));
            }
        }
        Ok(items)
    }
}

/// One tenant's ids in one record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run<'a> {
    /// The tenant's shard, as the writer computed it.
    pub(crate) shard: u16,
    pub(crate) tenant: &'a str,
    /// The encoded ids.
    ids: &'a [u8],
}

impl<'a> Run<'a> {
    /// Appends the run's ids to `out`.
    /// The run's ids. They end early at an id that does not parse: [`Run::count_ids`] checks
    /// that none does.
    pub(crate) fn ids(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        let mut rest = self.ids;
        std::iter::from_fn(move || take_bytes(&mut rest).ok())
    }

    /// The number of ids in the run, checked to be well formed.
    pub(crate) fn count_ids(&self) -> Result<u64, Malformed> {
        let (mut rest, mut n) = (self.ids, 0);
        while !rest.is_empty() {
            take_bytes(&mut rest)?;
            n += 1;
        }
        Ok(n)
    }
}

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut n = bytes.len();
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(bytes);
}

fn take_bytes<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], Malformed> {
    let mut len: usize = 0;
    let mut shift = 0;
    loop {
        let (&byte, rest) = input.split_first().ok_or(Malformed)?;
        *input = rest;
        if shift > 28 {
            return Err(Malformed);
        }
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if len > input.len() {
        return Err(Malformed);
    }
    let (bytes, rest) = input.split_at(len);
    *input = rest;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(pairs: &[(&'static str, &'static str)]) -> Vec<Item<'static>> {
        pairs.iter().map(|&(t, i)| Item::new(t, i)).collect()
    }

    fn records(data: &[u8]) -> Vec<Entry<'_>> {
        Records::new(data).collect()
    }

    fn sorted<'a>(mut items: Vec<(&'a str, &'a str)>) -> Vec<(&'a str, &'a str)> {
        items.sort_unstable();
        items
    }

    #[test]
    fn records_round_trip_grouped_by_shard_and_tenant() {
        let long = "x".repeat(300);
        let a = encode(&items(&[("t1", "1"), ("t2", "2"), ("t1", "3"), ("t1", "1")]), 256);
        let b = encode(&[Item::new("é ../", &long)], 256);
        let data = [a.clone(), b.clone()].concat();
        let entries = records(&data);
        let [Entry::Record(first), Entry::Record(second)] = entries[..] else { panic!("{entries:?}") };
        assert_eq!(sorted(first.items().unwrap()), vec![("t1", "1"), ("t1", "1"), ("t1", "3"), ("t2", "2")]);
        assert_eq!(second.items().unwrap(), vec![("é ../", long.as_str())]);
        let runs: Vec<Run> = first.runs().collect::<Result<_, _>>().unwrap();
        assert_eq!(runs.len(), 2, "one run per tenant");
        for run in &runs {
            assert_eq!(run.shard, shard_of(run.tenant, 256));
        }
        assert!(runs.windows(2).all(|w| (w[0].shard, w[0].tenant) < (w[1].shard, w[1].tenant)));
    }

    #[test]
    fn a_torn_tail_at_every_cut_leaves_the_whole_records_before_it() {
        let a = encode(&items(&[("t", "a")]), 8);
        let b = encode(&items(&[("t", "b"), ("u", "c")]), 8);
        let whole = [a.clone(), b.clone()].concat();
        for cut in a.len() + 1..whole.len() {
            let entries = records(&whole[..cut]);
            assert_eq!(entries.len(), 2, "cut at {cut}");
            assert!(matches!(entries[0], Entry::Record(_)));
            assert_eq!(entries[1], Entry::Damaged { offset: a.len(), len: cut - a.len() }, "cut at {cut}");
        }
    }

    #[test]
    fn damage_anywhere_keeps_every_intact_record_after_it() {
        let batches: Vec<Vec<u8>> = (0..4).map(|n| encode(&[Item::new("t", &n.to_string())], 8)).collect();
        let whole = batches.concat();
        let starts: Vec<usize> = batches.iter().scan(0, |at, b| Some(std::mem::replace(at, *at + b.len()))).collect();
        for flip in 0..whole.len() {
            let mut bad = whole.clone();
            bad[flip] ^= 0x40;
            let hit = starts.iter().rposition(|&s| s <= flip).unwrap();
            let entries = records(&bad);
            let intact: Vec<String> = entries
                .iter()
                .filter_map(|e| match e {
                    Entry::Record(p) => Some(p.items().unwrap()[0].1.to_owned()),
                    Entry::Damaged { .. } => None,
                })
                .collect();
            let expected: Vec<String> = (0..4).filter(|&n| n != hit).map(|n| n.to_string()).collect();
            assert_eq!(intact, expected, "flipped byte {flip}");
            assert!(entries.contains(&Entry::Damaged { offset: starts[hit], len: batches[hit].len() }));
        }
    }

    #[test]
    fn zero_bytes_are_damage_not_empty_records() {
        let a = encode(&items(&[("t", "a")]), 8);
        let data = [vec![0; 64], a.clone(), vec![0; 16]].concat();
        let entries = records(&data);
        assert_eq!(entries[0], Entry::Damaged { offset: 0, len: 64 });
        assert!(matches!(entries[1], Entry::Record(_)));
        assert_eq!(entries[2], Entry::Damaged { offset: 64 + a.len(), len: 16 });
    }
}
