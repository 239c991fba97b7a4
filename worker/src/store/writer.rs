//! Group commit: one thread owns the active log file and appends for everybody.
//!
//! Appenders hand it an encoded record and wait for its answer. It takes every record that queued
//! up while it was busy, writes them with one `write`, fsyncs once if the policy says `always`, and
//! only then answers them all: concurrent requests share one write and one fsync. Under `everysec`
//! a second thread fsyncs the file once a second, off the request path, as Redis does.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use countapp_shared::config::FsyncPolicy;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::StoreError;
use super::wal::{LogDir, log_file_path};

/// Records gathered into one write at most; bounds the latency a large queue adds.
const MAX_GROUP_BYTES: usize = 8 << 20;

/// What the writer thread is asked to do.
enum Command {
    /// Append `record`, holding `items` items, and answer once it is durable per the policy.
    Append { record: Vec<u8>, items: u64, done: oneshot::Sender<Result<(), StoreError>> },
    /// Close the active file if it holds anything and continue in a new one; answers with the
    /// sequence number of the file now active: every older file is closed for good.
    Rotate { done: oneshot::Sender<Result<u64, StoreError>> },
}

/// Counters the writer keeps for the worker's stats.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    /// Items appended (and acknowledged) since the store opened.
    pub(crate) items: AtomicU64,
    /// Bytes appended since the store opened.
    pub(crate) bytes: AtomicU64,
}

/// The handle appenders use; dropping it lets the thread finish the queue, sync and exit.
pub(crate) struct Writer {
    tx: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    syncer: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    pub(crate) stats: Arc<WriterStats>,
}

impl Writer {
    /// Starts appending to a new file, sequence number `seq`, in `log`'s directory.
    pub(crate) fn start(log: &LogDir, seq: u64, policy: FsyncPolicy) -> io::Result<Writer> {
        let active = Active::create(log.path(), seq)?;
        let current = Arc::new(Mutex::new(active.file.clone()));
        let dirty = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(WriterStats::default());
        let (tx, rx) = mpsc::channel();
        let thread = {
            let mut state = State {
                dir: log.path().to_path_buf(),
                active,
                policy,
                current: current.clone(),
                dirty: dirty.clone(),
                stats: stats.clone(),
                poisoned: None,
            };
            thread::Builder::new().name("wal-writer".into()).spawn(move || state.run(rx))?
        };
        let syncer = match policy {
            FsyncPolicy::EverySec => {
                let (stop, ticks) = mpsc::channel::<()>();
                let handle = thread::Builder::new()
                    .name("wal-syncer".into())
                    .spawn(move || sync_every_second(ticks, current, dirty))?;
                Some((stop, handle))
            }
            FsyncPolicy::Always | FsyncPolicy::Never => None,
        };
        Ok(Writer { tx: Some(tx), thread: Some(thread), syncer, stats })
    }

    /// Queues `record` and returns the receiver of its answer.
    pub(crate) fn append(&self, record: Vec<u8>, items: u64) -> oneshot::Receiver<Result<(), StoreError>> {
        let (done, answer) = oneshot::channel();
        self.send(Command::Append { record, items, done });
        answer
    }

    /// Closes the active file (if it holds anything) and returns the new active file's sequence
    /// number. Every record acknowledged before this call is in an older file.
    pub(crate) fn rotate(&self) -> Result<u64, StoreError> {
        let (done, answer) = oneshot::channel();
        self.send(Command::Rotate { done });
        answer.blocking_recv().unwrap_or(Err(StoreError::Closed))
    }

    fn send(&self, command: Command) {
        // The thread only exits once every sender is gone, so a failed send cannot happen while
        // `self` lives; were it to, dropping the command drops its answer channel, which the
        // waiting caller sees as `StoreError::Closed`.
        if let Some(tx) = &self.tx {
            let _ = tx.send(command);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some((stop, handle)) = self.syncer.take() {
            drop(stop);
            let _ = handle.join();
        }
    }
}

/// The file being appended to.
struct Active {
    seq: u64,
    file: Arc<File>,
    /// Bytes of whole records in the file: after a failed write the file is cut back to this.
    len: u64,
}

impl Active {
    fn create(dir: &Path, seq: u64) -> io::Result<Active> {
        let file = OpenOptions::new().create_new(true).append(true).open(log_file_path(dir, seq))?;
        super::fsutil::sync_dir(dir)?;
        Ok(Active { seq, file: Arc::new(file), len: 0 })
    }
}

/// The writer thread's state.
struct State {
    dir: PathBuf,
    active: Active,
    policy: FsyncPolicy,
    /// The file the syncer thread fsyncs.
    current: Arc<Mutex<Arc<File>>>,
    /// Set when bytes were written that the syncer has not fsynced yet.
    dirty: Arc<AtomicBool>,
    stats: Arc<WriterStats>,
    /// Set once the log can no longer be trusted (a failed fsync, or a failed write that could
    /// not be cut back): every later append fails rather than be acknowledged after a hole.
    poisoned: Option<String>,
}

impl State {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(1 << 20);
        let mut waiters = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Append { record, items, done } => {
                        group.extend_from_slice(&record);
                        waiters.push((items, done));
                    }
                    Command::Rotate { done } => {
                        self.commit(&mut group, &mut waiters);
                        let _ = done.send(self.rotate());
                    }
                }
                if group.len() < MAX_GROUP_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(&mut group, &mut waiters);
        }
        if self.policy != FsyncPolicy::Never && self.poisoned.is_none() {
            let _ = self.active.file.sync_data();
        }
    }

    /// Writes the group, fsyncs it if the policy asks, and answers its appenders.
    fn commit(&mut self, group: &mut Vec<u8>, waiters: &mut Vec<(u64, oneshot::Sender<Result<(), StoreError>>)>) {
        if waiters.is_empty() {
            return;
        }
        let result = self.write(group);
        if result.is_ok() {
            let items: u64 = waiters.iter().map(|(items, _)| items).sum();
            self.stats.items.fetch_add(items, Ordering::Relaxed);
            self.stats.bytes.fetch_add(group.len() as u64, Ordering::Relaxed);
        }
        for (_, done) in waiters.drain(..) {
            let _ = done.send(result.clone().map_err(StoreError::Log));
        }
        group.clear();
    }

    fn write(&mut self, group: &[u8]) -> Result<(), String> {
        if let Some(why) = &self.poisoned {
            return Err(why.clone());
        }
        if let Err(e) = (&*self.active.file).write_all(group) {
            // Cut the partial write back off, so that later records do not follow a torn one.
            if let Err(cut) = self.active.file.set_len(self.active.len) {
                self.poisoned = Some(format!("log write failed ({e}) and could not be cut back ({cut})"));
            }
            return Err(format!("log write failed: {e}"));
        }
        self.active.len += group.len() as u64;
        match self.policy {
            FsyncPolicy::Always => {
                if let Err(e) = self.active.file.sync_data() {
                    // After a failed fsync the kernel may have dropped the dirty pages: nothing
                    // written since the last good fsync can be trusted any more.
                    let why = format!("log fsync failed: {e}");
                    self.poisoned = Some(why.clone());
                    return Err(why);
                }
            }
            FsyncPolicy::EverySec => self.dirty.store(true, Ordering::Release),
            FsyncPolicy::Never => {}
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<u64, StoreError> {
        if self.active.len == 0 {
            return Ok(self.active.seq);
        }
        if let Some(why) = &self.poisoned {
            return Err(StoreError::Log(why.clone()));
        }
        let next =
            Active::create(&self.dir, self.active.seq + 1).map_err(|e| StoreError::io("creating a log file", e))?;
        let old = std::mem::replace(&mut self.active, next);
        *self.current.lock() = self.active.file.clone();
        if self.policy != FsyncPolicy::Never {
            old.file.sync_data().map_err(|e| StoreError::io("syncing a closed log file", e))?;
        }
        Ok(self.active.seq)
    }
}

/// The `everysec` syncer: fsyncs the active file once a second when anything was written since.
fn sync_every_second(stop: mpsc::Receiver<()>, current: Arc<Mutex<Arc<File>>>, dirty: Arc<AtomicBool>) {
    loop {
        match stop.recv_timeout(Duration::from_secs(1)) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        if dirty.swap(false, Ordering::AcqRel) {
            let file = current.lock().clone();
            if let Err(e) = file.sync_data() {
                tracing::error!(error = %e, "fsync of the write-ahead log failed");
                dirty.store(true, Ordering::Release);
            }
        }
    }
}
