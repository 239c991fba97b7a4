//! The write-ahead logs: one directory per worker under `wal/`, and the files in it.
//!
//! A worker appends every accepted batch to its active file, `<seq>.open`, before acknowledging
//! it. At each close it renames that file `<seq>.log`, and goes on in `<seq+1>.open`.
//! Closed files are immutable: the workers that merge shards read them, each taking its shards'
//! runs, and a closed file is deleted once every shard has merged it.
//!
//! Each worker holds an exclusive OS lock on its directory while it runs, which is how every
//! process tells live workers from dead ones: a dead worker's `.open` file is as final as a
//! closed one, and is merged like one.
//!
//! With `store: redis`, a closed file whose ids Redis took but cannot yet vouch for (see
//! `sets::redis`) is renamed `<seq>.done`: consumed, no longer pending nor merged again by its
//! live worker, and deleted after a grace period. A `.done` file outlives its worker's run only
//! if the worker stops or dies within that period: it is then replayed like any closed file, by
//! the worker's next run or by whoever takes a dead worker's log (`SADD` is idempotent).
//!
//! The log decides a file's fate, by one rule for every backend, from what the backend reports
//! of its items: durably taken, it goes ([`delete_taken`]); taken but not vouched for, it is
//! consumed for a grace period ([`consume`], [`settle_consumed`]); otherwise it stays. Reading a
//! final file, with its damage told and kept aside, is `read`'s.
//!
//! A damaged stretch at the very end of a file is the torn tail of a crash mid-append, never
//! acknowledged: it is dropped. Damage anywhere else is not: the intact records after it are
//! still merged, and the file is kept aside under `damaged/` for an operator ([`Damage`]).

mod read;
pub(crate) mod record;
pub(crate) mod writer;

pub(crate) use read::{Contents, items_in};

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crate::{damaged, disk};

/// The name of the lock file in every log directory.
const LOCK_FILE: &str = "LOCK";
/// The file of a log directory that holds the number below which its worker may have used
/// file numbers: a number is never used twice, even once every file is merged and deleted.
const RESERVED_FILE: &str = "RESERVED";
/// File numbers a worker reserves at a time: a run that closes its log every 5 s writes
/// `RESERVED` about once every four days.
const RESERVE: u64 = 1 << 16;
const OPEN_SUFFIX: &str = "open";
const CLOSED_SUFFIX: &str = "log";
const CONSUMED_SUFFIX: &str = "done";
/// What a forgotten worker's log directory is renamed to end with, before it is removed: `~` is
/// in no worker id, so that no listing takes it for a worker's.
const GONE_SUFFIX: &str = "~gone";

/// One worker's log directory, locked by this process for as long as the value lives.
pub(crate) struct LogDir {
    path: PathBuf,
    /// Holds the exclusive lock; the OS releases it when the file is closed or the process dies.
    _lock: File,
}

impl LogDir {
    /// Locks the log directory at `path` (creating it), waiting up to `wait` for another process
    /// that holds it, such as the previous run of this worker still stopping.
    pub(crate) fn lock(path: &Path, wait: Duration) -> disk::Result<Option<LogDir>> {
        disk::create_dir_durably(path)?;
        let deadline = Instant::now() + wait;
        let lock_path = path.join(LOCK_FILE);
        loop {
            let lock = disk::open_with(OpenOptions::new().write(true).create(true).truncate(false), &lock_path)?;
            if disk::try_lock(&lock, &lock_path)? {
                return Ok(Some(LogDir { path: path.to_path_buf(), _lock: lock }));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Closes every `.open` file a previous run of this worker left: nobody appends to them
    /// any more. Its consumed files become closed ones again, to be merged again: the previous
    /// run cannot have seen Redis vouch for them. Returns the highest sequence number in the
    /// directory.
    pub(crate) fn close_leftovers(&self) -> disk::Result<u64> {
        let mut highest = 0;
        for file in files(&self.path)? {
            highest = highest.max(file.seq);
            if !file.closed || file.consumed {
                disk::close_log(&file.path, &file_path(&self.path, file.seq, true))?;
            }
        }
        Ok(highest)
    }
}

/// The number below which the worker of the log directory `dir` may have used file numbers,
/// as its `RESERVED` says; 0 where it has none (written by an earlier release, or damaged,
/// which is logged).
pub(crate) fn reserved(dir: &Path) -> disk::Result<u64> {
    let path = dir.join(RESERVED_FILE);
    match disk::read(&path) {
        Ok(bytes) => Ok(std::str::from_utf8(&bytes).ok().and_then(|text| text.trim().parse().ok()).unwrap_or_else(|| {
            tracing::error!(file = %path.display(), "a damaged RESERVED: file numbers are taken above the files and records instead");
            0
        })),
        Err(e) if e.not_found() => Ok(0),
        Err(e) => Err(e),
    }
}

/// Reserves the file numbers from `from` on for the worker of the log directory `dir`, which
/// it must hold: `RESERVED` is replaced durably. Returns the number below which they are now
/// reserved.
pub(crate) fn reserve(dir: &Path, from: u64) -> disk::Result<u64> {
    let upto = from + RESERVE;
    let (path, tmp) = (dir.join(RESERVED_FILE), dir.join(format!("{RESERVED_FILE}.tmp")));
    disk::write(&tmp, format!("{upto}\n").as_bytes())?;
    disk::sync_path(&tmp)?;
    disk::rename(&tmp, &path)?;
    disk::sync_dir(dir)?;
    Ok(upto)
}

/// Deletes `file`, a final file of the dead worker whose log directory is `dir`, taking the
/// directory's lock meanwhile so that the worker cannot start: first its number is reserved, so
/// that the worker, should it come back, never uses it again. False if the worker holds its
/// lock again, or the file is gone.
pub(crate) fn retire(dir: &Path, file: &LogFile) -> disk::Result<bool> {
    let Some(_held) = LogDir::lock(dir, Duration::ZERO)? else { return Ok(false) };
    if reserved(dir)? <= file.seq {
        reserve(dir, file.seq + 1)?;
    }
    let removed = disk::remove_if_present(&file.path)?;
    disk::sync_dir(dir)?;
    Ok(removed)
}

/// Deletes the final log file `file`, whose every item the tenants' sets now hold durably (as
/// the backend reports it: merged by every shard, or confirmed by Redis): the one rule by which a
/// log file goes. True if this call deleted it; false if it was gone already.
pub(crate) fn delete_taken(file: &LogFile) -> disk::Result<bool> {
    disk::remove_if_present(&file.path)
}

/// Marks the final log file `file` of the log directory `dir` consumed: its items are taken, but
/// the backend cannot vouch yet that they are durable, so it is kept for a grace period (see the
/// module documentation), no longer pending. False if the file is gone (renamed back by its
/// restarted worker, which merges it again).
pub(crate) fn consume(dir: &Path, file: &LogFile) -> disk::Result<bool> {
    if file.consumed {
        return Ok(true);
    }
    match disk::rename(&file.path, &consumed_path(dir, file.seq)) {
        Ok(()) => Ok(true),
        Err(e) if e.not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Settles the consumed file `seq` of the log directory `dir` once its grace is over: deleted if
/// the backend still holds its items (`held`), else made a closed file again, to be merged again.
/// True if this call deleted it. A file gone was renamed back by its worker's next run.
pub(crate) fn settle_consumed(dir: &Path, seq: u64, held: bool) -> disk::Result<bool> {
    let path = consumed_path(dir, seq);
    if held {
        return disk::remove_if_present(&path);
    }
    match disk::rename(&path, &file_path(dir, seq, true)) {
        Err(e) if !e.not_found() => Err(e),
        _ => Ok(false),
    }
}

/// Removes the log directory of `log`'s worker, dead and gone for good: it holds no log file
/// (checked again under its lock), and nothing records any of its files (the caller checks), so
/// that its `RESERVED` numbers guard nothing any more; a worker that comes back under its id
/// starts afresh. Renamed away first under its lock, so that a worker starting meanwhile finds
/// no directory of the old one. True if removed.
pub(crate) fn forget(wal_root: &Path, log: &WorkerLog) -> disk::Result<bool> {
    let Some(held) = LogDir::lock(&log.dir, Duration::ZERO)? else { return Ok(false) };
    if !files(&log.dir)?.is_empty() {
        return Ok(false);
    }
    let gone = wal_root.join(format!("{}.{:08x}{GONE_SUFFIX}", log.worker, rand::random::<u32>()));
    disk::rename(&log.dir, &gone)?;
    disk::sync_dir(wal_root)?;
    drop(held);
    disk::remove_dir(&gone)?;
    Ok(true)
}

/// Removes what a crash left of a forgotten worker's log directory under `wal_root`.
pub(crate) fn remove_forgotten(wal_root: &Path) -> disk::Result<()> {
    let entries = match disk::entries(wal_root) {
        Ok(entries) => entries,
        Err(e) if e.not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        if entry.file_name().to_str().is_some_and(|name| name.ends_with(GONE_SUFFIX)) {
            disk::remove_dir(&entry.path())?;
        }
    }
    Ok(())
}

/// The path of the log file with sequence number `seq` in the log directory `dir`.
pub(crate) fn file_path(dir: &Path, seq: u64, closed: bool) -> PathBuf {
    dir.join(format!("{seq:016}.{}", if closed { CLOSED_SUFFIX } else { OPEN_SUFFIX }))
}

/// The path a log file takes once consumed (see the module documentation).
fn consumed_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.{CONSUMED_SUFFIX}"))
}

/// A log file found in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogFile {
    pub(crate) seq: u64,
    pub(crate) path: PathBuf,
    /// Renamed `.log` by its writer (or `.done` since): no record will ever be added.
    pub(crate) closed: bool,
    /// Renamed `.done`: its ids are in Redis, and it waits out the grace period.
    pub(crate) consumed: bool,
    /// When it was last written: for a final file, when its items were all in.
    pub(crate) modified: SystemTime,
    /// Its length in bytes, as listed.
    pub(crate) len: u64,
}

/// The log files in `dir`, oldest first.
pub(crate) fn files(dir: &Path) -> disk::Result<Vec<LogFile>> {
    let mut files = Vec::new();
    for entry in disk::entries(dir)? {
        let name = entry.file_name();
        let Some((seq, suffix)) = name.to_str().and_then(|n| n.split_once('.')) else { continue };
        let Ok(seq) = seq.parse() else { continue };
        let (closed, consumed) = match suffix {
            CLOSED_SUFFIX => (true, false),
            CONSUMED_SUFFIX => (true, true),
            OPEN_SUFFIX => (false, false),
            _ => continue,
        };
        let (modified, len) = match entry.metadata().and_then(|meta| Ok((meta.modified()?, meta.len()))) {
            Ok(listed) => listed,
            // Merged and deleted by another worker since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(disk::DiskError::new(disk::Op::List, &entry.path(), e)),
        };
        files.push(LogFile { seq, path: entry.path(), closed, consumed, modified, len });
    }
    files.sort_unstable_by_key(|f| f.seq);
    Ok(files)
}

/// One worker's log directory as another process sees it.
#[derive(Debug, Clone)]
pub(crate) struct WorkerLog {
    /// The worker's id: its directory's name.
    pub(crate) worker: String,
    /// The directory.
    pub(crate) dir: PathBuf,
    /// Whether a live process holds the directory's lock.
    pub(crate) live: bool,
    /// The lowest number of a file of a live worker not final yet: its active file, or a
    /// closed one it could not rename. No record moves past it.
    pub(crate) unfinished: Option<u64>,
    /// Its files that will never change and are still to merge: closed ones not consumed, and
    /// every file of a dead worker, consumed ones included (it may have died within their grace
    /// period).
    pub(crate) inputs: Vec<LogFile>,
}

/// Every worker's log under `wal_root`: who is live, and which files are final.
///
/// The files are listed before the lock is tested: a worker found dead wrote nothing after the
/// listing, so its listed `.open` files are final; one that restarts later renames them, and a
/// reader that then misses one stops at it until the next look.
pub(crate) fn scan(wal_root: &Path) -> disk::Result<Vec<WorkerLog>> {
    let entries = match disk::entries(wal_root) {
        Ok(entries) => entries,
        Err(e) if e.not_found() => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut logs = Vec::new();
    for entry in entries {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(worker) = entry.file_name().into_string() else { continue };
        if worker.ends_with(GONE_SUFFIX) {
            continue;
        }
        let dir = entry.path();
        let listed = match files(&dir) {
            Ok(listed) => listed,
            Err(e) if e.not_found() => continue,
            Err(e) => return Err(e),
        };
        let live = is_live(&dir)?;
        let unfinished = listed.iter().filter(|f| live && !f.closed).map(|f| f.seq).min();
        let inputs = listed.into_iter().filter(|f| (f.closed && !f.consumed) || !live).collect();
        logs.push(WorkerLog { worker, dir, live, unfinished, inputs });
    }
    logs.sort_unstable_by(|a, b| a.worker.cmp(&b.worker));
    Ok(logs)
}

impl WorkerLog {
    /// Whether the directory holds file `seq` now, under any of its names: looked up in the
    /// order a file is renamed (`.open`, then `.log`), so that a file renamed meanwhile is
    /// found under one name or the other.
    pub(crate) fn has_file(&self, seq: u64) -> bool {
        [file_path(&self.dir, seq, false), file_path(&self.dir, seq, true), consumed_path(&self.dir, seq)]
            .iter()
            .any(|path| path.symlink_metadata().is_ok())
    }
}

/// Whether a live process holds the lock of the log directory `dir`. Tested with a shared lock,
/// which fails while the owner holds its exclusive one and is released at once otherwise.
fn is_live(dir: &Path) -> disk::Result<bool> {
    let path = dir.join(LOCK_FILE);
    match disk::open(&path) {
        Ok(lock) => disk::is_locked(&lock, &path),
        // No lock file: nobody ever ran here, or a worker is starting and owns nothing yet.
        Err(e) if e.not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Damage found in one log file, by whoever reads it: how many bytes of torn tail were dropped,
/// and how many damaged bytes were skipped before intact records.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Damage {
    pub(crate) torn_tail_bytes: u64,
    pub(crate) damaged_bytes: u64,
}

impl Damage {
    /// Notes a damaged stretch of `len` bytes at `offset` in `path`, `at_end` if nothing intact
    /// follows it.
    pub(crate) fn note(&mut self, path: &Path, offset: usize, len: usize, at_end: bool) {
        if at_end {
            tracing::debug!(file = %path.display(), offset, bytes = len, "dropped a torn log tail, never acknowledged");
            self.torn_tail_bytes += len as u64;
        } else {
            tracing::error!(file = %path.display(), offset, bytes = len, "damaged log records skipped; the intact ones after them are merged");
            self.damaged_bytes += len as u64;
        }
    }

    /// If the file had damage in its middle, keeps it aside as `<database>/damaged/<worker>-
    /// <file name>` (see `damaged`): it outlives the file's deletion once merged.
    pub(crate) fn keep_aside(&self, database: &Path, path: &Path) {
        if self.damaged_bytes == 0 {
            return;
        }
        let worker = path.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let (Some(worker), Some(name)) = (worker, name) {
            damaged::keep_aside(database, path, &format!("{worker}-{name}"));
        }
    }
}
