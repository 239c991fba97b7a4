//! The format of a log file, and the reader that finds every intact record in one.
//!
//! A log file starts with a header of [`FILE_HEADER_LEN`] bytes:
//!
//! ```text
//! ["CAL2"][version: u32 LE][seq: u64 LE][prev: u64 LE][record magic: u32 LE][CRC-32 of the 28 bytes before: u32 LE]
//! ```
//!
//! `seq` is the file's number, `prev` the number of the file its worker wrote before it (0 for
//! none): readers check that no file between them escaped their listing. The record magic is
//! drawn at random for each file. Then come the records, each one acknowledged batch:
//!
//! ```text
//! [record magic: u32 LE][length: u32 LE][CRC-32 of length and payload: u32 LE][payload: length bytes]
//! ```
//!
//! and a payload is the batch's items grouped into runs, one per tenant, sorted by shard and
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
//! tail a crash mid-append leaves; it was never acknowledged. The magic is the file's own and
//! never leaves the disk, so that ids, which are the clients' bytes, cannot hold a record that
//! the search would take for one: a forged record would have to guess it.
//!
//! Files written before the header existed hold records with the fixed magic "CAR1"; they are
//! read as they are.

use crate::Item;

use crate::partition::shard_of;

/// The first four bytes of a log file with a header.
const FILE_MAGIC: [u8; 4] = *b"CAL2";
/// The version of the file format in the header.
const FILE_VERSION: u32 = 2;
/// Bytes of a file's header.
pub(crate) const FILE_HEADER_LEN: usize = 32;
/// The magic of every record of a file without a header, "CAR1" read as little-endian bytes.
const LEGACY_MAGIC: u32 = u32::from_le_bytes(*b"CAR1");
/// Bytes of a record's header: magic, length and checksum.
pub(crate) const HEADER_LEN: usize = 12;
/// Bytes of a run's header: shard and length.
const RUN_HEADER_LEN: usize = 6;

/// What a log file's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileHeader {
    /// The file's number.
    pub(crate) seq: u64,
    /// The number of the file its worker wrote before it; 0 if none.
    pub(crate) prev: u64,
    /// The magic of the file's records.
    pub(crate) magic: u32,
}

impl FileHeader {
    /// A header for file `seq`, written after file `prev`, with a random record magic.
    pub(crate) fn new(seq: u64, prev: u64) -> FileHeader {
        let magic = std::iter::repeat_with(rand::random::<u32>).find(|m| *m != LEGACY_MAGIC).expect("endless");
        FileHeader { seq, prev, magic }
    }

    /// The header's bytes.
    pub(crate) fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut bytes = [0; FILE_HEADER_LEN];
        bytes[..4].copy_from_slice(&FILE_MAGIC);
        bytes[4..8].copy_from_slice(&FILE_VERSION.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.seq.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.prev.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.magic.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..28]);
        bytes[28..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// The header at the start of `data`, if it is one and intact.
    fn decode(data: &[u8]) -> Option<FileHeader> {
        let bytes = data.get(..FILE_HEADER_LEN)?;
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let long = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        (bytes[..4] == FILE_MAGIC && word(4) == FILE_VERSION && crc32fast::hash(&bytes[..28]) == word(28))
            .then(|| FileHeader { seq: long(8), prev: long(16), magic: word(24) })
    }
}

/// Encodes `items` as one record, ready to be appended once [`stamp`]ed with its file's magic,
/// for a database of `shards` shards.
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
    record[4..8].copy_from_slice(&len.to_le_bytes());
    let crc = record_crc(&record[4..8], &record[HEADER_LEN..]);
    record[8..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    record
}

/// Writes `magic` into every record of `records` (whole records from [`encode`], one after
/// the other): the magic of the file they are about to be appended to.
pub(crate) fn stamp(records: &mut [u8], magic: u32) {
    let mut at = 0;
    while let Some(header) = records.get_mut(at..at + HEADER_LEN) {
        header[..4].copy_from_slice(&magic.to_le_bytes());
        at += HEADER_LEN + u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
    }
}

/// Writes the length of the run that starts at `start` into its header.
fn end_run(record: &mut [u8], start: usize) {
    let len = u32::try_from(record.len() - start - RUN_HEADER_LEN).expect("a run is shorter than its batch");
    record[start + 2..start + RUN_HEADER_LEN].copy_from_slice(&len.to_le_bytes());
}

/// The checksum of a record's length field and payload.
fn record_crc(len: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(crc32fast::hash(len));
    hasher.update(payload);
    hasher.finalize()
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
/// between and after them (a damaged file header included).
pub(crate) struct Records<'a> {
    data: &'a [u8],
    pos: usize,
    /// The magic of the file's records; `None` while it is not known (the header is damaged
    /// and no intact record has been found yet).
    magic: Option<u32>,
    header: Option<FileHeader>,
}

impl<'a> Records<'a> {
    /// Reads the records of `data`, the whole contents of one log file.
    pub(crate) fn new(data: &'a [u8]) -> Self {
        if let Some(header) = FileHeader::decode(data) {
            return Records { data, pos: FILE_HEADER_LEN, magic: Some(header.magic), header: Some(header) };
        }
        if data.is_empty() || data.starts_with(&LEGACY_MAGIC.to_le_bytes()) {
            return Records { data, pos: 0, magic: Some(LEGACY_MAGIC), header: None };
        }
        // A damaged header (or a file of records without one, its first damaged) is damage like
        // any: the records after it are found as after any damage, their magic learnt from the
        // first.
        Records { data, pos: 0, magic: None, header: None }
    }

    /// The file's header, if it has an intact one.
    pub(crate) fn header(&self) -> Option<FileHeader> {
        self.header
    }

    /// The payload of an intact record starting at `at`, and its end: its magic is the file's
    /// (any, while that is not known), its checksum holds and its runs parse.
    fn record_at(&self, at: usize) -> Option<(Payload<'a>, usize)> {
        let header = self.data.get(at..at.checked_add(HEADER_LEN)?)?;
        let magic = u32::from_le_bytes(header[..4].try_into().unwrap());
        if self.magic.is_some_and(|m| m != magic) {
            return None;
        }
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(header[8..12].try_into().unwrap());
        let end = (at + HEADER_LEN).checked_add(len)?;
        let payload = Payload(self.data.get(at + HEADER_LEN..end)?);
        (record_crc(&header[4..8], payload.0) == crc && payload.is_well_formed()).then_some((payload, end))
    }

    /// The intact record at `pos`, if there is one, learning the file's magic from it.
    fn take_record(&mut self) -> Option<Payload<'a>> {
        let (payload, end) = self.record_at(self.pos)?;
        self.magic.get_or_insert_with(|| u32::from_le_bytes(self.data[self.pos..self.pos + 4].try_into().unwrap()));
        self.pos = end;
        Some(payload)
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Entry<'a>;

    fn next(&mut self) -> Option<Entry<'a>> {
        if self.pos >= self.data.len() {
            return None;
        }
        // Without a magic, the start of the file is damage: the header, or a first record
        // whose magic is what is damaged.
        if (self.magic.is_some() || self.pos > 0)
            && let Some(payload) = self.take_record()
        {
            return Some(Entry::Record(payload));
        }
        // Damage: the next intact record, if any, starts at a later magic.
        let offset = self.pos;
        let next = (offset + 1..self.data.len().saturating_sub(HEADER_LEN - 1))
            .filter(|&at| self.magic.is_none_or(|magic| self.data[at..at + 4] == magic.to_le_bytes()))
            .find(|&at| self.record_at(at).is_some());
        self.pos = next.unwrap_or(self.data.len());
        Some(Entry::Damaged { offset, len: self.pos - offset })
    }
}

/// The payload of an intact record: its runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Payload<'a>(&'a [u8]);

impl<'a> Payload<'a> {
    /// Whether the runs parse, with UTF-8 tenants and whole ids: a record that does not is
    /// damage, whatever its checksum says.
    fn is_well_formed(self) -> bool {
        let mut rest = self.0;
        while !rest.is_empty() {
            let Some((_, len)) = run_header(rest) else { return false };
            let Some(mut body) = rest.get(RUN_HEADER_LEN..RUN_HEADER_LEN + len) else { return false };
            rest = &rest[RUN_HEADER_LEN + len..];
            if take_bytes(&mut body).is_none_or(|tenant| std::str::from_utf8(tenant).is_err()) {
                return false;
            }
            while !body.is_empty() {
                if take_bytes(&mut body).is_none() {
                    return false;
                }
            }
        }
        true
    }

    /// The runs of the record, in order.
    pub(crate) fn runs(self) -> impl Iterator<Item = Run<'a>> {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            let (shard, len) = run_header(rest)?;
            let mut body = &rest[RUN_HEADER_LEN..RUN_HEADER_LEN + len];
            rest = &rest[RUN_HEADER_LEN + len..];
            let tenant = std::str::from_utf8(take_bytes(&mut body)?).ok()?;
            Some(Run { shard, tenant, ids: body })
        })
    }

    /// Every item of the record as `(tenant, id)`.
    #[cfg(test)]
    pub(crate) fn items(self) -> Vec<(&'a str, &'a str)> {
        self.runs().flat_map(|run| run.ids().map(move |id| (run.tenant, std::str::from_utf8(id).unwrap()))).collect()
    }
}

/// The shard and length of the run at the start of `rest`.
fn run_header(rest: &[u8]) -> Option<(u16, usize)> {
    let header = rest.get(..RUN_HEADER_LEN)?;
    Some((
        u16::from_le_bytes(header[..2].try_into().unwrap()),
        u32::from_le_bytes(header[2..].try_into().unwrap()) as usize,
    ))
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
    /// The run's ids.
    pub(crate) fn ids(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        let mut rest = self.ids;
        std::iter::from_fn(move || take_bytes(&mut rest))
    }

    /// The number of ids in the run.
    pub(crate) fn count_ids(&self) -> u64 {
        self.ids().count() as u64
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

/// The bytes at the front of `input`, prefixed with their varint length; `None` if they are
/// not all there.
fn take_bytes<'a>(input: &mut &'a [u8]) -> Option<&'a [u8]> {
    let mut len: usize = 0;
    let mut shift = 0;
    loop {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        if shift > 28 {
            return None;
        }
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if len > input.len() {
        return None;
    }
    let (bytes, rest) = input.split_at(len);
    *input = rest;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(pairs: &[(&'static str, &'static str)]) -> Vec<Item<'static>> {
        pairs.iter().map(|&(t, i)| Item::new(t, i)).collect()
    }

    /// A log file of the current format holding `records`, with the offset of each.
    fn file(records: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let header = FileHeader::new(7, 6);
        let mut data = header.encode().to_vec();
        let mut starts = Vec::new();
        for record in records {
            starts.push(data.len());
            let mut record = record.clone();
            stamp(&mut record, header.magic);
            data.extend_from_slice(&record);
        }
        (data, starts)
    }

    fn entries(data: &[u8]) -> Vec<Entry<'_>> {
        Records::new(data).collect()
    }

    /// The first id of each intact record.
    fn intact(data: &[u8]) -> Vec<String> {
        entries(data)
            .iter()
            .filter_map(|e| match e {
                Entry::Record(p) => Some(p.items()[0].1.to_owned()),
                Entry::Damaged { .. } => None,
            })
            .collect()
    }

    fn sorted<'a>(mut items: Vec<(&'a str, &'a str)>) -> Vec<(&'a str, &'a str)> {
        items.sort_unstable();
        items
    }

    #[test]
    fn a_header_reads_back() {
        let header = FileHeader::new(42, 41);
        assert_eq!(FileHeader::decode(&header.encode()), Some(header));
        assert_ne!(FileHeader::new(1, 0).magic, FileHeader::new(1, 0).magic, "each file draws its own magic");
        let mut bytes = header.encode();
        bytes[10] ^= 1;
        assert_eq!(FileHeader::decode(&bytes), None);
    }

    #[test]
    fn records_round_trip_grouped_by_shard_and_tenant() {
        let long = "x".repeat(300);
        let a = encode(&items(&[("t1", "1"), ("t2", "2"), ("t1", "3"), ("t1", "1")]), 256);
        let b = encode(&[Item::new("é ../", &long)], 256);
        let (data, _) = file(&[a, b]);
        let reader = Records::new(&data);
        assert_eq!(reader.header().map(|h| (h.seq, h.prev)), Some((7, 6)));
        let entries: Vec<Entry> = reader.collect();
        let [Entry::Record(first), Entry::Record(second)] = entries[..] else { panic!("{entries:?}") };
        assert_eq!(sorted(first.items()), vec![("t1", "1"), ("t1", "1"), ("t1", "3"), ("t2", "2")]);
        assert_eq!(second.items(), vec![("é ../", long.as_str())]);
        let runs: Vec<Run> = first.runs().collect();
        assert_eq!(runs.len(), 2, "one run per tenant");
        for run in &runs {
            assert_eq!(run.shard, shard_of(run.tenant, 256));
        }
        assert_eq!(runs.iter().map(Run::count_ids).sum::<u64>(), 4);
        assert!(runs.windows(2).all(|w| (w[0].shard, w[0].tenant) < (w[1].shard, w[1].tenant)));
    }

    #[test]
    fn a_torn_tail_at_every_cut_leaves_the_whole_records_before_it() {
        let (whole, starts) = file(&[encode(&items(&[("t", "a")]), 8), encode(&items(&[("t", "b"), ("u", "c")]), 8)]);
        for cut in starts[1] + 1..whole.len() {
            let entries = entries(&whole[..cut]);
            assert_eq!(entries.len(), 2, "cut at {cut}");
            assert!(matches!(entries[0], Entry::Record(_)));
            assert_eq!(entries[1], Entry::Damaged { offset: starts[1], len: cut - starts[1] }, "cut at {cut}");
        }
        for cut in 0..FILE_HEADER_LEN {
            assert!(intact(&whole[..cut]).is_empty(), "a header cut at {cut} holds no record");
        }
    }

    #[test]
    fn damage_anywhere_keeps_every_intact_record_after_it() {
        let batches: Vec<Vec<u8>> = (0..4).map(|n| encode(&[Item::new("t", &n.to_string())], 8)).collect();
        let (whole, starts) = file(&batches);
        for flip in 0..whole.len() {
            let mut bad = whole.clone();
            bad[flip] ^= 0x40;
            let hit = starts.iter().rposition(|&s| s <= flip);
            let expected: Vec<String> = (0..4).filter(|&n| Some(n) != hit).map(|n| n.to_string()).collect();
            assert_eq!(intact(&bad), expected, "flipped byte {flip}");
            let damage = match hit {
                Some(hit) => Entry::Damaged { offset: starts[hit], len: batches[hit].len() },
                None => Entry::Damaged { offset: 0, len: FILE_HEADER_LEN },
            };
            assert!(entries(&bad).contains(&damage), "flipped byte {flip}: {:?}", entries(&bad));
        }
    }

    #[test]
    fn zero_bytes_are_damage_not_empty_records() {
        let (data, _) = file(&[encode(&items(&[("t", "a")]), 8)]);
        let data = [&data[..FILE_HEADER_LEN], &[0; 64], &data[FILE_HEADER_LEN..], &[0; 16]].concat();
        let entries = entries(&data);
        assert_eq!(entries[0], Entry::Damaged { offset: FILE_HEADER_LEN, len: 64 });
        assert!(matches!(entries[1], Entry::Record(_)));
        assert!(matches!(entries[2], Entry::Damaged { len: 16, .. }));
    }

    #[test]
    fn files_written_before_the_header_read_as_they_are() {
        let mut records = [encode(&items(&[("t", "a")]), 8), encode(&items(&[("t", "b")]), 8)];
        records.iter_mut().for_each(|record| stamp(record, LEGACY_MAGIC));
        let data = records.concat();
        assert_eq!(Records::new(&data).header(), None);
        assert_eq!(intact(&data), ["a", "b"]);
        let mut bad = data.clone();
        bad[1] ^= 0x40;
        assert_eq!(intact(&bad), ["b"], "a first record damaged, the next found");
    }

    /// A record of one run, `tenant` with the one id `id`, which may be any bytes.
    fn record_with_id(tenant: &str, id: &[u8]) -> Vec<u8> {
        let mut record = vec![0; HEADER_LEN];
        record.extend_from_slice(&shard_of(tenant, 8).to_le_bytes());
        record.extend_from_slice(&[0; 4]);
        put_bytes(&mut record, tenant.as_bytes());
        put_bytes(&mut record, id);
        end_run(&mut record, HEADER_LEN);
        let len = (record.len() - HEADER_LEN) as u32;
        record[4..8].copy_from_slice(&len.to_le_bytes());
        let crc = record_crc(&record[4..8], &record[HEADER_LEN..]);
        record[8..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        record
    }

    /// An id is the client's bytes: one that holds a whole record, for another tenant, must not
    /// be taken for a record when the search after damage runs over it. With the magic every
    /// file shared before, it was.
    #[test]
    fn a_record_forged_inside_an_id_is_never_taken_for_one() {
        let tenants_found = |data: &[u8]| -> Vec<String> {
            entries(data)
                .iter()
                .filter_map(|e| if let Entry::Record(p) = e { Some(p.items()[0].0.to_owned()) } else { None })
                .collect()
        };
        let mut forged = encode(&items(&[("victim", "forged")]), 8);
        stamp(&mut forged, LEGACY_MAGIC);
        let carrier = record_with_id("attacker", &forged);
        let after = encode(&items(&[("t", "after")]), 8);

        let (mut data, starts) = file(&[carrier.clone(), after.clone()]);
        data[starts[0] + 8] ^= 0x40;
        assert_eq!(tenants_found(&data), ["t"]);

        let mut old = [carrier, after];
        old.iter_mut().for_each(|record| stamp(record, LEGACY_MAGIC));
        let mut old = old.concat();
        old[8] ^= 0x40;
        assert_eq!(tenants_found(&old), ["victim", "t"], "the old format takes the forged record");
    }
}
