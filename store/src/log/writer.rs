//! Appending to the write-ahead log.
//!
//! The active log file sits behind a mutex. Under `everysec` and `never` an appender writes its
//! record itself, under that mutex: one `write` into the page cache, which no process crash can
//! lose, with no hand-off to another thread on the request path. Under `everysec` a syncer
//! thread fsyncs the file once a second, as Redis does.
//!
//! Under `always` every acknowledgement waits for an fsync, and group commit lets concurrent
//! appenders share it: a committer thread takes every record that queued up while it was busy,
//! writes them with one `write`, fsyncs once, and only then answers them all.
//!
//! A failed fsync is fail-stop, as in PostgreSQL and Redis: after one, the kernel may have
//! dropped the dirty pages, so nothing written since the last good fsync can be trusted. The log
//! refuses every later append and reports the failure ([`Writer::failure`]), and the worker
//! exits, to be restarted and replay what its log really holds.
//!
//! The policy can change while the writer runs (an edit of `fsync` in the config): both threads
//! always run, and each append looks at the policy in force. Records already queued for the
//! committer are still fsynced, and an fsync covers whatever was written before it, so no
//! switch weakens what an earlier acknowledgement promised.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime};

use countapp_shared::config::FsyncPolicy;
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

use super::record::{FILE_HEADER_LEN, FileHeader, stamp};
use super::{LogDir, file_path, reserve};
use crate::StoreError;
use crate::disk;

/// Records gathered into one write at most; bounds the latency a long queue adds.
const MAX_GROUP_BYTES: usize = 8 << 20;

/// Counters the writer keeps for the worker's stats.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    /// Bytes appended since the store opened.
    pub(crate) bytes: AtomicU64,
}

/// The outcome of an append: known at once, or once the committer has fsynced it.
pub(crate) enum Ticket {
    Done(Result<(), StoreError>),
    Waiting(oneshot::Receiver<Result<(), StoreError>>),
}

/// A record waiting for the committer (`always`).
struct Pending {
    record: Vec<u8>,
    items: u64,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The log writer; dropping it finishes the queue, syncs the file and stops its threads.
pub(crate) struct Writer {
    log: Arc<Log>,
    /// Held while the active file is replaced.
    rotating: Mutex<Rotation>,
    committer: Option<(mpsc::Sender<Pending>, JoinHandle<()>)>,
    syncer: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

/// An [`FsyncPolicy`] that can be read and changed from any thread.
struct Policy(AtomicU8);

impl Policy {
    const ORDER: [FsyncPolicy; 3] = [FsyncPolicy::Always, FsyncPolicy::EverySec, FsyncPolicy::Never];

    fn new(policy: FsyncPolicy) -> Policy {
        let policy_index = Policy::ORDER.iter().position(|p| *p == policy).expect("every policy is listed");
        Policy(AtomicU8::new(policy_index as u8))
    }

    fn get(&self) -> FsyncPolicy {
        Policy::ORDER[usize::from(self.0.load(Ordering::Acquire))]
    }

    fn set(&self, policy: FsyncPolicy) {
        self.0.store(Policy::new(policy).0.into_inner(), Ordering::Release);
    }
}

/// What the appenders, the committer and the syncer share.
struct Log {
    dir: PathBuf,
    policy: Policy,
    active: Mutex<Active>,
    /// Set when bytes were written that the syncer has not fsynced yet.
    dirty: AtomicBool,
    stats: WriterStats,
    /// Why the log can no longer be trusted, once it cannot.
    failure: watch::Sender<Option<String>>,
}

/// What replacing the active file needs to know.
struct Rotation {
    /// Closed files whose rename to `.log` failed: they stay `.open`, which no reader takes
    /// for final, and the rename is tried again at every rotation.
    unrenamed: Vec<u64>,
    /// The numbers below this are reserved in the log directory's `RESERVED`.
    reserved: u64,
}

/// The file being appended to.
struct Active {
    seq: u64,
    path: PathBuf,
    file: Arc<File>,
    /// The magic of its records.
    magic: u32,
    /// Bytes of its header and whole records: after a failed write the file is cut back to this.
    len: u64,
    /// Items in the file's records.
    items: u64,
    /// When its first item was written: how long the oldest item in it has waited.
    first_item: Option<SystemTime>,
    /// Set once the log can no longer be trusted (a failed fsync, or a failed write that could
    /// not be cut back): every later append fails rather than be acknowledged after a hole.
    poisoned: Option<String>,
}

impl Writer {
    /// Starts appending to a new file, sequence number `seq`, in `log`'s directory, where `prev`
    /// is the last file written before it (0 if none is left) and the numbers below `reserved`
    /// are reserved.
    pub(crate) fn start(
        log: &LogDir,
        seq: u64,
        prev: u64,
        reserved: u64,
        policy: FsyncPolicy,
    ) -> Result<Writer, StoreError> {
        let dir = log.path().to_path_buf();
        let active = Active::create(&dir, seq, prev)?;
        let log = Arc::new(Log {
            dir,
            policy: Policy::new(policy),
            active: Mutex::new(active),
            dirty: AtomicBool::new(false),
            stats: WriterStats::default(),
            failure: watch::Sender::new(None),
        });
        let committer = {
            let (tx, rx) = mpsc::channel();
            let log = log.clone();
            let thread = thread::Builder::new().name("wal-committer".into()).spawn(move || commit_groups(&log, rx));
            Some((tx, thread.map_err(|e| StoreError::io("starting the log's committer", e))?))
        };
        let syncer = {
            let (stop, ticks) = mpsc::channel();
            let log = log.clone();
            let thread = thread::Builder::new().name("wal-syncer".into()).spawn(move || sync_every_second(&log, ticks));
            Some((stop, thread.map_err(|e| StoreError::io("starting the log's syncer", e))?))
        };
        let rotating = Mutex::new(Rotation { unrenamed: Vec::new(), reserved });
        Ok(Writer { log, rotating, committer, syncer })
    }

    /// Resolves to why the log can no longer be trusted, once a fsync failed: the worker must
    /// then stop.
    pub(crate) fn failure(&self) -> watch::Receiver<Option<String>> {
        self.log.failure.subscribe()
    }

    /// Changes when appends are fsynced, from the next append on.
    pub(crate) fn set_policy(&self, policy: FsyncPolicy) {
        self.log.policy.set(policy);
    }

    /// Appends `record`, holding `items` items: written at once under `everysec` and `never`,
    /// queued for the next group fsync under `always`.
    pub(crate) fn append(&self, mut record: Vec<u8>, items: u64) -> Ticket {
        match &self.committer {
            Some((tx, _)) if self.log.policy.get() == FsyncPolicy::Always => {
                let (done, answer) = oneshot::channel();
                // The committer only stops when the writer is dropped; should it have died,
                // the dropped `done` answers `StoreError::Closed`.
                let _ = tx.send(Pending { record, items, done });
                Ticket::Waiting(answer)
            }
            _ => Ticket::Done(self.log.write(&mut record, items, false)),
        }
    }

    /// Closes the active file, if it holds anything, and continues in a new one: every record
    /// acknowledged before this call is then in a closed file. Returns the closed file's
    /// sequence number, its items, and when the first of them was written. A closed file whose
    /// rename fails stays `.open`, unmerged but kept, and the rename is tried again at the next
    /// rotation.
    pub(crate) fn rotate(&self) -> Result<Option<(u64, u64, SystemTime)>, StoreError> {
        let mut rotation = self.rotating.lock();
        self.retry_renames(&mut rotation);
        let (seq, items) = {
            let active = self.log.active.lock();
            if let Some(why) = &active.poisoned {
                return Err(StoreError::Log(why.clone()));
            }
            (active.seq, active.items)
        };
        if items == 0 {
            return Ok(None);
        }
        if seq + 1 >= rotation.reserved {
            rotation.reserved = reserve(&self.log.dir, seq + 1)?;
        }
        // The new file is made outside the lock, so appends go on meanwhile.
        let next = Active::create(&self.log.dir, seq + 1, seq)?;
        let old = std::mem::replace(&mut *self.log.active.lock(), next);
        if self.log.policy.get() != FsyncPolicy::Never
            && let Err(e) = disk::sync_log(&old.file, &old.path)
        {
            let why = format!("log fsync failed: {e}");
            self.log.fail_stop(&mut self.log.active.lock(), why.clone());
            return Err(StoreError::Log(why));
        }
        // Renamed only once complete and synced: readers take a `.log` file as final.
        if let Err(e) = disk::close_log(&old.path, &file_path(&self.log.dir, seq, true)) {
            tracing::warn!(error = %e, "a closed log file keeps its .open name for now: renamed at the next closing");
            rotation.unrenamed.push(seq);
        }
        Ok(Some((seq, old.items, old.first_item.unwrap_or_else(SystemTime::now))))
    }

    /// Renames the closed files whose rename failed, oldest first, as far as they go.
    fn retry_renames(&self, rotation: &mut Rotation) {
        while let Some(&seq) = rotation.unrenamed.first() {
            if let Err(e) = disk::close_log(&file_path(&self.log.dir, seq, false), &file_path(&self.log.dir, seq, true))
            {
                tracing::warn!(error = %e, "a closed log file still cannot take its .log name");
                return;
            }
            rotation.unrenamed.remove(0);
        }
    }

    /// Removes the active file if it holds nothing, as a worker that stops gracefully does
    /// once its log is merged: nothing is left behind, even by a worker never started again.
    /// Nothing may be appended after.
    pub(crate) fn remove_if_empty(&self) -> Result<(), StoreError> {
        let mut rotation = self.rotating.lock();
        self.retry_renames(&mut rotation);
        let active = self.log.active.lock();
        if active.items == 0 && active.poisoned.is_none() {
            disk::remove(&active.path)?;
            disk::sync_dir(&self.log.dir)?;
        }
        Ok(())
    }

    /// Bytes of the active file: its header and whole records.
    pub(crate) fn active_bytes(&self) -> u64 {
        self.log.active.lock().len
    }

    /// Items in the active file.
    pub(crate) fn active_items(&self) -> u64 {
        self.log.active.lock().items
    }

    /// When the first item of the active file was written, if it holds any.
    pub(crate) fn active_since(&self) -> Option<SystemTime> {
        self.log.active.lock().first_item
    }

    /// The writer's counters.
    pub(crate) fn stats(&self) -> &WriterStats {
        &self.log.stats
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some((tx, thread)) = self.committer.take() {
            drop(tx);
            let _ = thread.join();
        }
        if let Some((stop, thread)) = self.syncer.take() {
            drop(stop);
            let _ = thread.join();
        }
        let active = self.log.active.lock();
        if self.log.policy.get() != FsyncPolicy::Never && active.poisoned.is_none() {
            let _ = disk::sync_log(&active.file, &active.path);
        }
    }
}

impl Log {
    /// Writes `bytes` (whole records, `items` items) to the active file, stamped with its
    /// magic, and fsyncs it if `sync` (the committer's group); otherwise the file is left for
    /// the syncer.
    fn write(&self, bytes: &mut [u8], items: u64, sync: bool) -> Result<(), StoreError> {
        {
            let mut active = self.active.lock();
            stamp(bytes, active.magic);
            let written = active.write(bytes, items, sync);
            if let Some(why) = active.poisoned.clone() {
                self.fail_stop(&mut active, why);
            }
            written.map_err(StoreError::Log)?;
        }
        self.stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if !sync {
            self.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }
}

impl Active {
    /// Creates log file `seq`, written after file `prev`, with its header.
    fn create(dir: &Path, seq: u64, prev: u64) -> Result<Active, StoreError> {
        let path = file_path(dir, seq, false);
        let header = FileHeader::new(seq, prev);
        let file = disk::open_with(OpenOptions::new().create_new(true).append(true), &path)?;
        if let Err(e) = disk::write_all(&file, &path, &header.encode()).and_then(|()| disk::sync_dir(dir)) {
            // Its number is tried again at the next rotation.
            let _ = disk::remove(&path);
            return Err(e.into());
        }
        let (magic, len) = (header.magic, FILE_HEADER_LEN as u64);
        Ok(Active { seq, path, file: Arc::new(file), magic, len, items: 0, first_item: None, poisoned: None })
    }

    fn write(&mut self, bytes: &[u8], items: u64, sync: bool) -> Result<(), String> {
        if let Some(why) = &self.poisoned {
            return Err(why.clone());
        }
        if let Err(e) = disk::write_all(&self.file, &self.path, bytes) {
            // Cut the partial write back off, so that later records do not follow a torn one.
            if let Err(cut) = disk::set_len(&self.file, &self.path, self.len) {
                self.poisoned = Some(format!("log write failed ({e}) and could not be cut back ({cut})"));
            }
            return Err(format!("log write failed: {e}"));
        }
        self.len += bytes.len() as u64;
        self.items += items;
        self.first_item.get_or_insert_with(SystemTime::now);
        if sync && let Err(e) = disk::sync_log(&self.file, &self.path) {
            // After a failed fsync the kernel may have dropped the dirty pages: nothing written
            // since the last good fsync can be trusted any more.
            let why = format!("log fsync failed: {e}");
            self.poisoned = Some(why.clone());
            return Err(why);
        }
        Ok(())
    }
}

impl Log {
    /// Marks the log unusable after a failed fsync: `active` refuses every later append, and
    /// the failure is reported, once.
    fn fail_stop(&self, active: &mut Active, why: String) {
        active.poisoned.get_or_insert_with(|| why.clone());
        self.failure.send_if_modified(|failure| {
            if failure.is_some() {
                return false;
            }
            tracing::error!(error = why, "the write-ahead log can no longer be trusted: stopping");
            *failure = Some(why);
            true
        });
    }
}

/// The `always` committer: one write and one fsync for every record that queued up meanwhile.
fn commit_groups(log: &Log, rx: mpsc::Receiver<Pending>) {
    let mut group = Vec::with_capacity(1 << 20);
    let mut waiters = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut items = 0;
        let mut next = Some(first);
        while let Some(pending) = next.take() {
            group.extend_from_slice(&pending.record);
            items += pending.items;
            waiters.push(pending.done);
            if group.len() < MAX_GROUP_BYTES {
                next = rx.try_recv().ok();
            }
        }
        let result = log.write(&mut group, items, true).map_err(|e| e.to_string());
        for done in waiters.drain(..) {
            let _ = done.send(result.clone().map_err(StoreError::Log));
        }
        group.clear();
    }
}

/// The `everysec` syncer: fsyncs the active file once a second when anything was written since.
/// Under another policy it only keeps watch, for a switch to `everysec`.
fn sync_every_second(log: &Log, stop: mpsc::Receiver<()>) {
    loop {
        match stop.recv_timeout(Duration::from_secs(1)) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        if log.policy.get() == FsyncPolicy::EverySec && log.dirty.swap(false, Ordering::AcqRel) {
            let (file, path) = {
                let active = log.active.lock();
                (active.file.clone(), active.path.clone())
            };
            if let Err(e) = disk::sync_log(&file, &path) {
                log.fail_stop(&mut log.active.lock(), format!("log fsync failed: {e}"));
                return;
            }
        }
    }
}
