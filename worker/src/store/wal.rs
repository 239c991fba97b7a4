//! The write-ahead log: the format of its records and the directory of files that holds them.
//!
//! A worker appends every accepted batch to its own log before acknowledging it; a flush later
//! moves the log's items into the tenant files and deletes the log files it consumed. Each worker
//! holds an exclusive OS lock on its log directory while it runs, so a log directory whose lock
//! anyone can take belongs to a dead worker and may be adopted by a live one.
//!
//! A record is `[payload length: u32 LE][CRC-32 of payload: u32 LE][payload]`, and the payload is
//! the batch's items, each as `[varint tenant length][tenant][varint id length][id]`. A crash
//! in the middle of an append leaves a torn record at the tail of the last file; its length or
//! checksum gives it away, and since it was never acknowledged it is dropped.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use countapp_shared::items::Item;

/// Bytes of a record's header: the payload length and its checksum.
pub(crate) const HEADER_LEN: usize = 8;

/// The name of the lock file in every log directory.
const LOCK_FILE: &str = "LOCK";

/// Encodes `items` as one log record, ready to be appended.
pub(crate) fn encode_record(items: &[Item<'_>]) -> Vec<u8> {
    let payload_len: usize = items
        .iter()
        .map(|item| varint_len(item.tenant.len()) + item.tenant.len() + varint_len(item.id.len()) + item.id.len())
        .sum();
    let mut record = Vec::with_capacity(HEADER_LEN + payload_len);
    record.extend_from_slice(&[0; HEADER_LEN]);
    for item in items {
        put_str(&mut record, &item.tenant);
        put_str(&mut record, &item.id);
    }
    let len = u32::try_from(payload_len).expect("a batch is bounded by max_body_bytes, far below 4 GiB");
    let crc = crc32fast::hash(&record[HEADER_LEN..]);
    record[..4].copy_from_slice(&len.to_le_bytes());
    record[4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    record
}

/// The records of a log file's contents, in order. Iteration stops at the end, or at the first
/// record that is torn or corrupt; [`Records::valid_len`] then tells where the good part ends.
pub(crate) struct Records<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Records<'a> {
    /// Reads the records of `data`, the whole contents of one log file.
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Records { data, pos: 0 }
    }

    /// The length of the prefix of the file made of whole, valid records read so far.
    pub(crate) fn valid_len(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for Records<'a> {
    /// The items of one record, as `(tenant, id)` pairs.
    type Item = Vec<(&'a str, &'a str)>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.data[self.pos..];
        let header = rest.get(..HEADER_LEN)?;
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
        let payload = rest.get(HEADER_LEN..HEADER_LEN.checked_add(len)?)?;
        if crc32fast::hash(payload) != crc {
            return None;
        }
        let items = decode_payload(payload)?;
        self.pos += HEADER_LEN + len;
        Some(items)
    }
}

fn decode_payload(mut payload: &[u8]) -> Option<Vec<(&str, &str)>> {
    let mut items = Vec::new();
    while !payload.is_empty() {
        let tenant = take_str(&mut payload)?;
        let id = take_str(&mut payload)?;
        items.push((tenant, id));
    }
    Some(items)
}

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len();
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(s.as_bytes());
}

fn take_str<'a>(input: &mut &'a [u8]) -> Option<&'a str> {
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
    let (s, rest) = input.split_at(len);
    *input = rest;
    std::str::from_utf8(s).ok()
}

/// One worker's log directory, locked by this process for as long as the value lives.
///
/// Files are named by a sequence number, `<seq>.log`; only the newest is ever appended to, and a
/// flush consumes and deletes whole older files.
pub(crate) struct LogDir {
    path: PathBuf,
    /// Holds the exclusive lock; the OS releases it when the file is closed or the process dies.
    _lock: File,
}

impl LogDir {
    /// Locks the log directory at `path` (creating it), waiting up to `wait` for a process that
    /// holds it: a worker adopting this log releases it as soon as the log is consumed.
    pub(crate) fn lock(path: &Path, wait: Duration) -> io::Result<Option<LogDir>> {
        super::fsutil::create_dir_durably(path)?;
        let deadline = Instant::now() + wait;
        loop {
            if let Some(dir) = Self::try_lock(path)? {
                return Ok(Some(dir));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Locks the existing log directory at `path` if no live process holds it.
    pub(crate) fn try_lock(path: &Path) -> io::Result<Option<LogDir>> {
        let lock = OpenOptions::new().write(true).create(true).truncate(false).open(path.join(LOCK_FILE))?;
        match lock.try_lock() {
            Ok(()) => Ok(Some(LogDir { path: path.to_path_buf(), _lock: lock })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The log files in the directory, oldest first, as `(seq, path)`.
    pub(crate) fn files(&self) -> io::Result<Vec<(u64, PathBuf)>> {
        log_files(&self.path)
    }
}

/// The path of the log file with sequence number `seq` in the log directory `dir`.
pub(crate) fn log_file_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.log"))
}

/// The log files in `dir`, oldest first, as `(seq, path)`; read without holding the lock, so
/// only as a hint of whether a directory holds anything.
pub(crate) fn log_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(seq) = name.to_str().and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse().ok()) else {
            continue;
        };
        files.push((seq, entry.path()));
    }
    files.sort_unstable();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(pairs: &[(&'static str, &'static str)]) -> Vec<Item<'static>> {
        pairs.iter().map(|&(t, i)| Item::new(t, i)).collect()
    }

    #[test]
    fn records_round_trip() {
        let long = "x".repeat(300);
        let a = encode_record(&items(&[("t1", "1"), ("t2", "2")]));
        let b = encode_record(&[Item::new("é ../", &long)]);
        let data = [a.clone(), b.clone()].concat();
        let mut records = Records::new(&data);
        assert_eq!(records.next().unwrap(), vec![("t1", "1"), ("t2", "2")]);
        assert_eq!(records.next().unwrap(), vec![("é ../", long.as_str())]);
        assert!(records.next().is_none());
        assert_eq!(records.valid_len(), data.len());
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_the_records() {
        let a = encode_record(&items(&[("t", "a")]));
        let b = encode_record(&items(&[("t", "b"), ("u", "c")]));
        let whole = [a.clone(), b.clone()].concat();
        for cut in a.len()..whole.len() {
            let mut records = Records::new(&whole[..cut]);
            assert_eq!(records.next().unwrap(), vec![("t", "a")], "cut at {cut}");
            assert!(records.next().is_none(), "cut at {cut}");
            assert_eq!(records.valid_len(), a.len());
        }
        for flip in a.len()..whole.len() {
            let mut bad = whole.clone();
            bad[flip] ^= 0x40;
            let mut records = Records::new(&bad);
            assert!(records.next().is_some());
            assert!(records.next().is_none(), "flipped byte {flip}");
        }
    }
}
