//! Each shard's index of its tenants' counts, `COUNTS` in its directory: a listing page reads
//! the counts of its thousand tenants from the indexes of their shards, where it would otherwise
//! open, read and close a thousand tenant files.
//!
//! One JSON value per line. First `{"index":N}`, a random number drawn each time the index is
//! written whole: a file written anew can have the inode and the length of the one it replaced,
//! and only this tells a reader that what it read before is gone. Then `["tenant",count]`, a
//! tenant's count as of a commit (`0`: gone), and after each batch of those `{"generation":N}`,
//! the generation of the shard's record that the batch brings the index up to.
//!
//! The shard's owner appends a batch once its round's commit is in place, record included, so
//! every complete batch describes committed files. The index is current only while it ends with
//! the generation of the shard's record: where it does not (a crash between a commit and its
//! append, a write that failed, a shard of an earlier release, which had no index), readers count
//! from the tenant files, and the owner writes the index anew, from those files, at its next
//! round. That write, like the compaction of an index grown to twice what it holds, is a new file
//! renamed into place.
//!
//! The index is derived data, never made durable on its own: one that a crash left behind its
//! record, or ahead of it, is not read, and is written anew.

use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::tenant::read_all;
use crate::{StoreError, disk};

/// The name of the index in a shard's directory.
pub(crate) const COUNTS_FILE: &str = "COUNTS";
/// The size under which an index is never compacted: rewriting it would save little.
const LEAST_COMPACTED_BYTES: u64 = 64 << 10;

/// Tenants and their counts, sorted by name, without repeats or zeros.
pub(crate) type Counts = Vec<(String, u64)>;

/// The line that closes a batch.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Marker {
    generation: u64,
}

/// The first line, which tells one index written whole from the next.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    index: u64,
}

/// The complete batches at the start of an index's bytes.
struct Batches {
    /// The number its first line holds, once complete.
    header: Option<u64>,
    /// Each batch's changes, in the order written, with the generation it ends at.
    batches: Vec<(Vec<(String, u64)>, u64)>,
    /// How many bytes they take: what follows is a batch not finished yet (or never).
    len: usize,
}

/// Reads the complete batches of `bytes`, read from `from` on in the index (its header first,
/// from 0); `None` if a complete line is not what it should be (damage: no index is read past it).
fn batches(bytes: &[u8], from: u64) -> Option<Batches> {
    let mut parsed = Batches { header: None, batches: Vec::new(), len: 0 };
    let mut pending = Vec::new();
    let mut at = 0;
    while let Some(end) = bytes[at..].iter().position(|&b| b == b'\n').map(|end| at + end) {
        let line = &bytes[at..end];
        at = end + 1;
        if from == 0 && parsed.header.is_none() {
            parsed.header = Some(serde_json::from_slice::<Header>(line).ok()?.index);
            parsed.len = at;
        } else if line.first() == Some(&b'[') {
            pending.push(serde_json::from_slice::<(String, u64)>(line).ok()?);
        } else {
            let marker: Marker = serde_json::from_slice(line).ok()?;
            parsed.batches.push((std::mem::take(&mut pending), marker.generation));
            parsed.len = at;
        }
    }
    Some(parsed)
}

/// `counts` (sorted, without repeats or zeros) with `changes` applied, the last change to a
/// tenant winning: one pass over both, where inserting each new name would shift the rest.
fn apply(counts: Counts, mut changes: Vec<(String, u64)>) -> Counts {
    if changes.is_empty() {
        return counts;
    }
    // A stable sort keeps a tenant's changes in their order: the last of each is kept.
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut latest: Vec<(String, u64)> = Vec::with_capacity(changes.len());
    for change in changes {
        match latest.last_mut() {
            Some(last) if last.0 == change.0 => *last = change,
            _ => latest.push(change),
        }
    }
    let mut merged = Vec::with_capacity(counts.len() + latest.len());
    let mut counts = counts.into_iter().peekable();
    for change in latest {
        while let Some(kept) = counts.next_if(|(name, _)| *name < change.0) {
            merged.push(kept);
        }
        counts.next_if(|(name, _)| *name == change.0);
        if change.1 > 0 {
            merged.push(change);
        }
    }
    merged.extend(counts);
    merged
}

/// An index of `counts` at `generation`, written whole, and the number its header holds.
fn encode_whole(counts: &[(String, u64)], generation: u64) -> (Vec<u8>, u64) {
    let header = rand::random();
    let mut bytes = serde_json::to_vec(&Header { index: header }).expect("a header serializes");
    bytes.push(b'\n');
    bytes.extend(encode(counts, generation));
    (bytes, header)
}

/// The lines of a batch of `changes` that ends at `generation`.
fn encode(changes: &[(String, u64)], generation: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(changes.len() * 24 + 24);
    for change in changes {
        serde_json::to_writer(&mut bytes, change).expect("a count serializes");
        bytes.push(b'\n');
    }
    serde_json::to_writer(&mut bytes, &Marker { generation }).expect("a marker serializes");
    bytes.push(b'\n');
    bytes
}

/// An index whole in its bytes (undamaged, nothing after its last batch): its header, its
/// counts and the generation they are at.
fn read_whole(bytes: &[u8]) -> Option<(u64, Counts, u64)> {
    let parsed = batches(bytes, 0)?;
    let generation = parsed.batches.last()?.1;
    if parsed.len != bytes.len() {
        return None;
    }
    let counts = parsed.batches.into_iter().fold(Counts::new(), |counts, (changes, _)| apply(counts, changes));
    Some((parsed.header?, counts, generation))
}

/// The number in the header of the index `file` (at `path`, `len` bytes long), if it has one.
fn header_of(file: &File, path: &Path, len: u64) -> Result<Option<u64>, StoreError> {
    let mut line = [0u8; 64];
    let line = &mut line[..usize::try_from(len).unwrap_or(usize::MAX).min(64)];
    disk::read_at(file, path, line, 0)?;
    let end = line.iter().position(|&b| b == b'\n');
    Ok(end.and_then(|end| serde_json::from_slice::<Header>(&line[..end]).ok()).map(|header| header.index))
}

/// Opens the index at `path`, with its metadata; `None` if there is none.
fn open(open: impl FnOnce() -> disk::Result<File>, path: &Path) -> Result<Option<(File, Metadata)>, StoreError> {
    let file = match open() {
        Ok(file) => file,
        Err(e) if e.not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let metadata = disk::metadata_of(&file, path)?;
    Ok(Some((file, metadata)))
}

/// Where an owner's index of a shard stands, as this process last wrote or read it: appended to
/// at once while the file is still this one, without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEnd {
    /// The number in its header.
    header: u64,
    ino: u64,
    len: u64,
    generation: u64,
    /// How long the index was when written whole: past twice that, it is compacted.
    compacted_len: u64,
}

/// What an owner does to bring a shard's index up to a commit.
pub(crate) struct Update<'a> {
    /// The shard's directory.
    pub(crate) dir: &'a Path,
    /// The record's generation before the commit, and the commit's.
    pub(crate) before: u64,
    pub(crate) after: u64,
    /// The counts the commit changed, `0` for a tenant gone.
    pub(crate) changes: Vec<(String, u64)>,
}

impl Update<'_> {
    /// Brings the index in `self.dir` up to the commit: appends the commit's batch where the
    /// index is whole at `before` (compacting it once it has doubled), and otherwise writes it
    /// anew from `recount`, the counts of every tenant of the shard as its files now hold them
    /// (given the commit's changes, which it need not read again). `end` is where this process
    /// left the index, `None` if it does not know.
    pub(crate) fn apply(
        self,
        end: &mut Option<IndexEnd>,
        recount: impl FnOnce(&[(String, u64)]) -> Result<Counts, StoreError>,
    ) -> Result<(), StoreError> {
        let path = self.dir.join(COUNTS_FILE);
        let known = end.take().filter(|end| end.generation == self.before);
        let (current, mut whole) = match known {
            Some(known) if Self::still(&path, known)? => (known, None),
            _ => match self.read(&path)? {
                Some((end, counts)) => (end, Some(counts)),
                None => {
                    *end = Some(write_whole(&path, &recount(&self.changes)?, self.after)?);
                    return Ok(());
                }
            },
        };
        let batch = encode(&self.changes, self.after);
        if current.len + batch.len() as u64 > 2 * current.compacted_len.max(LEAST_COMPACTED_BYTES) {
            let counts = match whole.take() {
                Some(counts) => counts,
                None => match self.read(&path)? {
                    Some((_, counts)) => counts,
                    None => recount(&self.changes)?,
                },
            };
            *end = Some(write_whole(&path, &apply(counts, self.changes), self.after)?);
            return Ok(());
        }
        let file = disk::open_with(OpenOptions::new().append(true), &path)?;
        disk::write_all(&file, &path, &batch)?;
        *end = Some(IndexEnd { len: current.len + batch.len() as u64, generation: self.after, ..current });
        Ok(())
    }

    /// Whether the index at `path` is still the file, and as long as, `known` says.
    fn still(path: &Path, known: IndexEnd) -> Result<bool, StoreError> {
        let Some((file, metadata)) = open(|| disk::open(path), path)? else { return Ok(false) };
        Ok(metadata.ino() == known.ino
            && metadata.len() == known.len
            && header_of(&file, path, metadata.len())? == Some(known.header))
    }

    /// The index at `path` and what it holds, if it is whole at `self.before`.
    fn read(&self, path: &Path) -> Result<Option<(IndexEnd, Counts)>, StoreError> {
        let Some((mut file, _)) = open(|| disk::open(path), path)? else { return Ok(None) };
        let (bytes, metadata) = read_all(&mut file, path)?;
        let whole = read_whole(&bytes).filter(|(_, _, generation)| *generation == self.before);
        Ok(whole.map(|(header, counts, generation)| {
            let compacted_len = counts.iter().map(|(name, _)| name.len() as u64 + 24).sum();
            let end = IndexEnd { header, ino: metadata.ino(), len: bytes.len() as u64, generation, compacted_len };
            (end, counts)
        }))
    }
}

/// Writes `counts` at `generation` as the whole index at `path`: a new file renamed into place.
fn write_whole(path: &Path, counts: &Counts, generation: u64) -> Result<IndexEnd, StoreError> {
    let (bytes, header) = encode_whole(counts, generation);
    let tmp = temporary(path);
    disk::write(&tmp, &bytes)?;
    disk::rename(&tmp, path)?;
    let ino = disk::metadata(path)?.ino();
    let len = bytes.len() as u64;
    Ok(IndexEnd { header, ino, len, generation, compacted_len: len })
}

/// The temporary an index is written whole into: a name a shard's owner alone writes, and one
/// that the next owner removes with an unfinished merge's temporaries.
fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Whether the index in the shard directory `dir` ends with the batch of `generation`, as a
/// whole index at it does: its last line only is read, for each shard a worker takes on.
pub(crate) fn ends_at(dir: &Path, generation: u64) -> bool {
    let path = dir.join(COUNTS_FILE);
    let Ok(Some((file, metadata))) = open(|| disk::open(&path), &path) else { return false };
    let mut tail = [0u8; 64];
    let tail = &mut tail[..usize::try_from(metadata.len()).unwrap_or(usize::MAX).min(64)];
    if disk::read_at(&file, &path, tail, metadata.len() - tail.len() as u64).is_err() {
        return false;
    }
    let Some(line) = tail.strip_suffix(b"\n") else { return false };
    let line = line.rsplit(|&b| b == b'\n').next().unwrap_or_default();
    serde_json::from_slice::<Marker>(line).is_ok_and(|marker| marker.generation == generation)
}

/// Removes the index in the shard directory `dir`: for a shard whose record was rebuilt, whose
/// generations start again.
pub(crate) fn remove(dir: &Path) -> Result<(), StoreError> {
    disk::remove_if_present(&dir.join(COUNTS_FILE))?;
    Ok(())
}

/// The shards' indexes as this process last read them, each read on from where it stopped.
pub(crate) struct Indexes(Box<[Mutex<Option<ReadIndex>>]>);

/// One shard's index, as read so far.
struct ReadIndex {
    /// The number in its header, once read.
    header: Option<u64>,
    ino: u64,
    /// The bytes read, up to the end of the last complete batch.
    len: u64,
    /// The generation the last complete batch ends at; `None` before the first.
    generation: Option<u64>,
    /// Whether a line did not parse: nothing is read past it.
    damaged: bool,
    counts: Arc<Counts>,
}

impl Indexes {
    /// No index read yet, of `shards` shards.
    pub(crate) fn new(shards: u16) -> Indexes {
        Indexes((0..shards).map(|_| Mutex::new(None)).collect())
    }

    /// `shard`'s tenants and their counts, from its index in `dir` (its directory, held open,
    /// whose path is `path`), if the index is whole at `generation`, its record's.
    pub(crate) fn whole_at(
        &self,
        shard: u16,
        dir: &File,
        path: &Path,
        generation: u64,
    ) -> Result<Option<Arc<Counts>>, StoreError> {
        let path = path.join(COUNTS_FILE);
        let mut read = self.0[usize::from(shard)].lock();
        let Some((mut file, metadata)) = open(|| disk::open_in(dir, &path), &path)? else { return Ok(None) };
        let index = match read.take() {
            Some(index)
                if !index.damaged
                    && index.ino == metadata.ino()
                    && index.len <= metadata.len()
                    && index.header.is_some()
                    && header_of(&file, &path, metadata.len())? == index.header =>
            {
                let mut bytes = vec![0; usize::try_from(metadata.len() - index.len).unwrap_or(0)];
                disk::read_at(&file, &path, &mut bytes, index.len)?;
                index.read_on(&bytes)
            }
            _ => {
                let (bytes, metadata) = read_all(&mut file, &path)?;
                ReadIndex::new(metadata.ino()).read_on(&bytes)
            }
        };
        let whole = (!index.damaged && index.generation == Some(generation)).then(|| index.counts.clone());
        *read = Some(index);
        Ok(whole)
    }
}

impl ReadIndex {
    /// The index of the file `ino`, nothing of it read yet.
    fn new(ino: u64) -> ReadIndex {
        ReadIndex { header: None, ino, len: 0, generation: None, damaged: false, counts: Arc::default() }
    }

    /// The index with `bytes`, read from where it stopped, taken in.
    fn read_on(mut self, bytes: &[u8]) -> ReadIndex {
        let Some(parsed) = batches(bytes, self.len) else {
            tracing::warn!(
                len = self.len,
                "a shard's index of counts is damaged: listings count from its tenant files until it is written anew"
            );
            self.damaged = true;
            return self;
        };
        self.header = self.header.or(parsed.header);
        for (changes, generation) in parsed.batches {
            self.counts = Arc::new(apply(Arc::unwrap_or_clone(self.counts), changes));
            self.generation = Some(generation);
        }
        self.len += parsed.len as u64;
        self
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> Counts {
        pairs.iter().map(|(name, count)| ((*name).to_owned(), *count)).collect()
    }

    #[test]
    fn changes_apply_in_order_and_zero_removes() {
        let before = counts(&[("a", 1), ("c", 3), ("e", 5)]);
        let after = apply(before, counts(&[("d", 4), ("a", 0), ("c", 7), ("f", 1), ("d", 9), ("zz", 0)]));
        assert_eq!(after, counts(&[("c", 7), ("d", 9), ("e", 5), ("f", 1)]));
    }

    /// An index cut at every byte offset reads as its last complete batch, never as part of the
    /// next one; and read on from where it stopped, as the whole.
    #[test]
    fn an_index_cut_anywhere_reads_as_its_last_complete_batch() {
        let first = counts(&[("a", 1), ("b\n\"q\"", 2)]);
        let second = counts(&[("a", 5), ("b\n\"q\"", 0), ("é", 3)]);
        let (mut bytes, header) = encode_whole(&first, 1);
        let header_len = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
        let first_len = bytes.len();
        bytes.extend(encode(&second, 2));
        for cut in 0..=bytes.len() {
            let parsed = batches(&bytes[..cut], 0).expect("no damage");
            let expected = match cut {
                n if n < header_len => (None, None, 0),
                n if n < first_len => (Some(header), None, header_len),
                n if n < bytes.len() => (Some(header), Some(1), first_len),
                _ => (Some(header), Some(2), bytes.len()),
            };
            assert_eq!((parsed.header, parsed.batches.last().map(|b| b.1), parsed.len), expected, "cut at {cut}");
            let whole = read_whole(&bytes[..cut]).map(|(_, _, generation)| generation);
            assert_eq!(whole, if cut == first_len || cut == bytes.len() { expected.1 } else { None }, "cut at {cut}");
            let partly = ReadIndex::new(1).read_on(&bytes[..cut]);
            let rest = usize::try_from(partly.len).unwrap();
            let read = partly.read_on(&bytes[rest..]);
            assert_eq!((read.header, read.generation), (Some(header), Some(2)), "cut at {cut}");
            assert_eq!(*read.counts, counts(&[("a", 5), ("é", 3)]), "cut at {cut}");
        }
    }

    #[test]
    fn a_damaged_line_makes_no_index() {
        let (mut bytes, _) = encode_whole(&counts(&[("a", 1)]), 1);
        bytes.extend_from_slice(b"junk\n");
        bytes.extend(encode(&counts(&[("b", 1)]), 2));
        assert!(batches(&bytes, 0).is_none());
        assert!(read_whole(&bytes).is_none());
        assert!(ReadIndex::new(1).read_on(&bytes).damaged);
        let headless = encode(&counts(&[("a", 1)]), 1);
        assert!(read_whole(&headless).is_none(), "an index starts with its header");
    }

    /// An owner appends while the index is whole at the record's generation, and writes it anew
    /// otherwise; a reader reads on from where it stopped, and reads a file written anew whole,
    /// even one with the inode and the length of the file it read before.
    #[test]
    fn owners_append_or_write_anew_and_readers_follow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(COUNTS_FILE);
        let opened = File::open(dir.path()).unwrap();
        let indexes = Indexes::new(1);
        let read = |generation| indexes.whole_at(0, &opened, dir.path(), generation).unwrap().map(|c| (*c).clone());
        let update = |before, changes: &[(&str, u64)]| Update {
            dir: dir.path(),
            before,
            after: before + 1,
            changes: counts(changes),
        };
        let mut end = None;
        let recounted = std::cell::Cell::new(0);
        let recount = |found: &[(&str, u64)]| {
            let found = counts(found);
            let recounted = &recounted;
            move |_: &[(String, u64)]| {
                recounted.set(recounted.get() + 1);
                Ok(found)
            }
        };

        assert_eq!(read(0), None, "no index yet");
        update(0, &[("a", 1)]).apply(&mut end, recount(&[("a", 1), ("z", 9)])).unwrap();
        assert_eq!((recounted.get(), read(1)), (1, Some(counts(&[("a", 1), ("z", 9)]))));
        update(1, &[("b", 2), ("z", 0)]).apply(&mut end, recount(&[])).unwrap();
        assert_eq!((recounted.get(), read(2)), (1, Some(counts(&[("a", 1), ("b", 2)]))), "appended");
        assert_eq!(read(1), None, "behind the record");
        assert!(ends_at(dir.path(), 2) && !ends_at(dir.path(), 1));

        // Another owner, which does not know where the index ends, appends all the same.
        let mut other = None;
        update(2, &[("a", 3)]).apply(&mut other, recount(&[])).unwrap();
        assert_eq!((recounted.get(), read(3)), (1, Some(counts(&[("a", 3), ("b", 2)]))));
        // An index behind the record (a commit whose batch never came) is written anew.
        update(4, &[("c", 1)]).apply(&mut other, recount(&[("a", 3), ("c", 1)])).unwrap();
        assert_eq!((recounted.get(), read(5)), (2, Some(counts(&[("a", 3), ("c", 1)]))));
        assert_eq!(end, Some(end.unwrap()), "the first owner's end is stale now");
        update(3, &[("d", 1)]).apply(&mut end, recount(&[("a", 3), ("c", 1), ("d", 1)])).unwrap();
        assert_eq!(recounted.get(), 3, "the first owner saw that the index is not where it left it");

        // Written anew in place: the same inode, the same length, other counts.
        let before = fs::read(&path).unwrap();
        let (header, ..) = read_whole(&before).unwrap();
        // Another number of as many digits.
        let mut bytes = format!("{{\"index\":{}}}\n", header ^ 1).into_bytes();
        bytes.extend(encode(&counts(&[("a", 3), ("c", 1), ("e", 1)]), 4));
        assert_eq!(bytes.len(), before.len());
        assert_eq!(read(4), Some(counts(&[("a", 3), ("c", 1), ("d", 1)])));
        fs::write(&path, &bytes).unwrap();
        assert_eq!(read(4), Some(counts(&[("a", 3), ("c", 1), ("e", 1)])));
    }

    /// An index that has doubled is written anew, compacted: what it holds is unchanged.
    #[test]
    fn an_index_twice_its_size_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(COUNTS_FILE);
        let mut end = None;
        let none = |_: &[(String, u64)]| -> Result<Counts, StoreError> { panic!("nothing to recount") };
        let first: Counts = (0..1000).map(|i| (format!("tenant-{i:04}"), 1)).collect();
        let update = |before, changes| Update { dir: dir.path(), before, after: before + 1, changes };
        update(0, Vec::new()).apply(&mut end, |_| Ok(first.clone())).unwrap();
        let mut generation = 1;
        let mut largest = 0;
        for round in 2..200 {
            let changes: Vec<(String, u64)> = (0..1000).map(|i| (format!("tenant-{i:04}"), round)).collect();
            update(generation, changes).apply(&mut end, none).unwrap();
            generation += 1;
            largest = largest.max(fs::metadata(&path).unwrap().len());
        }
        let (_, counts, at) = read_whole(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(at, generation);
        assert_eq!(counts, (0..1000).map(|i| (format!("tenant-{i:04}"), 199)).collect::<Counts>());
        assert!(largest < 4 * LEAST_COMPACTED_BYTES, "the index grew to {largest} bytes");
    }
}
