//! The store a worker drives: it never loses an acknowledged item.
//!
//! - [`Store::append`] writes a batch to this worker's write-ahead log and returns once it is as
//!   durable as the `fsync` policy promises (under `always`, concurrent appends share one fsync).
//! - [`Store::flush`] merges the log's items into the tenants' id sets shared by every worker
//!   (the JSON files below, or Redis sets: see `backend`), then deletes the log files it consumed.
//! - [`Store::count`] reads a tenant's count as of the latest flush by any worker.
//! - [`Store::open`] replays this worker's log, and adopts the log of any worker that is not
//!   running, so that nothing acknowledged is ever stranded.
//!
//! On disk, under the database directory (the `tenants/` part only with the JSON backend):
//!
//! ```text
//! wal/<worker id>/LOCK                  held by the running worker
//! wal/<worker id>/<seq>.log             write-ahead log files, the newest one active
//! tenants/<name>.<hash>/LOCK            held while a process changes the tenant's files
//! tenants/<name>.<hash>/manifest.json   the tenant's name, count and segments
//! tenants/<name>.<hash>/<first>-<last>.json   a segment: a JSON array of ids
//! ```

mod backend;
mod fsutil;
mod idset;
mod naming;
mod redis_sets;
mod tenants;
mod wal;
mod writer;

use std::fs;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use countapp_shared::config::{FsyncPolicy, StoreBackend};
use countapp_shared::items::Item;
use hashbrown::HashMap;
use parking_lot::Mutex;
use thiserror::Error;

use backend::TenantStore;
use redis_sets::RedisTenants;
use tenants::Tenants;
use wal::{LogDir, Records};
use writer::{Ticket, Writer};

/// Threads a flush merges tenants with, at most.
const MAX_MERGE_THREADS: usize = 4;

/// What can go wrong in the store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{context}: {error}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The operating system's error.
        error: io::Error,
    },
    /// The write-ahead log could not take the batch; it was not acknowledged.
    #[error("write-ahead log: {0}")]
    Log(String),
    /// A file of the store does not parse; it was not written by a complete, atomic write.
    #[error("corrupt file {path}: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Two tenant names hash to the same directory; the store refuses rather than mix their ids.
    #[error("tenant {tenant:?} maps to the directory of tenant {owner:?}")]
    TenantCollision {
        /// The tenant asked for.
        tenant: String,
        /// The tenant that owns the directory.
        owner: String,
    },
    /// Another live process holds this worker's log: two workers were started with one id.
    #[error("the log of worker {0:?} is held by another running process")]
    LogInUse(String),
    /// A worker id must be usable as a directory name.
    #[error("invalid worker id {0:?}: use 1 to 64 of the characters a-z A-Z 0-9 . _ -, not only dots")]
    InvalidWorkerId(String),
    /// The store's log writer has stopped.
    #[error("the store is closed")]
    Closed,
    /// The tenants' store (Redis) cannot be reached or refused the request; the log keeps
    /// whatever could not be merged, and a later flush retries.
    #[error("the tenant store is unavailable: {0}")]
    Backend(String),
}

impl StoreError {
    fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io { context: context.into(), error: source }
    }

    fn corrupt(path: &Path, detail: impl ToString) -> StoreError {
        StoreError::Corrupt { path: path.to_path_buf(), detail: detail.to_string() }
    }
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// When appends are fsynced: before the ack, once a second, or never.
    pub fsync: FsyncPolicy,
    /// How long [`Store::open`] waits for a process that holds this worker's log, such as a
    /// worker that adopted it while this one was down.
    pub lock_wait: Duration,
    /// Where the tenants' id sets live.
    pub backend: StoreBackend,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { fsync: FsyncPolicy::EverySec, lock_wait: Duration::from_secs(10), backend: StoreBackend::Json }
    }
}

/// What a flush did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Log files consumed, this worker's and adopted ones.
    pub log_files: u64,
    /// Log files of dead workers among them.
    pub adopted_files: u64,
    /// Items read from the logs, repeats included.
    pub items: u64,
    /// Tenants touched.
    pub tenants: u64,
    /// Ids that were new to their tenant.
    pub new_ids: u64,
    /// Bytes of torn or corrupt records dropped from the ends of log files.
    pub dropped_bytes: u64,
}

/// A snapshot of the store's counters, for `/stats` and `/metrics`.
#[derive(Debug, Clone)]
pub struct StoreStats {
    /// Bytes appended to the log since the store opened.
    pub log_bytes_appended: u64,
    /// Items acknowledged but not yet flushed into the tenant files.
    pub pending_items: u64,
    /// When the latest flush finished, and what it did.
    pub last_flush: Option<(SystemTime, Duration, FlushReport)>,
}

/// A worker's durable store; see the module documentation.
///
/// Dropping a store without [`Store::close`] is like a crash: what was appended stays in the log
/// and the next [`Store::open`] of the same worker id, or an adopting worker, flushes it.
pub struct Store {
    worker_id: String,
    wal_root: PathBuf,
    tenants: Box<dyn TenantStore>,
    writer: Writer,
    /// This worker's log directory, locked while the store lives. Declared after `writer`, so
    /// that the lock is released only once the writer has finished.
    log: LogDir,
    /// One flush at a time: a flush consumes whole log files.
    flushing: Mutex<()>,
    /// The first log file of this run: older ones were recovered at open.
    first_seq: u64,
    /// Items of this run's log files consumed by flushes, for the pending count.
    consumed: AtomicU64,
    last_flush: Mutex<Option<(SystemTime, Duration, FlushReport)>>,
}

impl Store {
    /// Opens the store under `database` as worker `worker_id`: locks this worker's log, flushes
    /// whatever it and the logs of dead workers hold, and starts a new log file.
    pub fn open(database: &Path, worker_id: &str, options: StoreOptions) -> Result<Store, StoreError> {
        validate_worker_id(worker_id)?;
        let wal_root = database.join("wal");
        let tenants: Box<dyn TenantStore> = match &options.backend {
            StoreBackend::Json => Box::new(Tenants::open(database.join("tenants"))?),
            StoreBackend::Redis { url, cluster } => Box::new(RedisTenants::new(url, *cluster)?),
        };
        let log_path = wal_root.join(worker_id);
        let log = LogDir::lock(&log_path, options.lock_wait)
            .map_err(|e| StoreError::io(format!("locking {}", log_path.display()), e))?
            .ok_or_else(|| StoreError::LogInUse(worker_id.to_owned()))?;
        let files = log.files().map_err(|e| StoreError::io("listing the log", e))?;
        let next_seq = files.last().map_or(1, |(seq, _)| seq + 1);
        let writer =
            Writer::start(&log, next_seq, options.fsync).map_err(|e| StoreError::io("starting the log writer", e))?;
        let store = Store {
            worker_id: worker_id.to_owned(),
            wal_root,
            tenants,
            writer,
            log,
            flushing: Mutex::new(()),
            first_seq: next_seq,
            consumed: AtomicU64::new(0),
            last_flush: Mutex::new(None),
        };
        match store.flush() {
            Ok(recovered) if recovered.log_files > 0 => tracing::info!(
                worker = worker_id,
                files = recovered.log_files,
                adopted = recovered.adopted_files,
                items = recovered.items,
                new_ids = recovered.new_ids,
                "recovered logs"
            ),
            Ok(_) => {}
            // The logs stay until the tenant store is back; the periodic flush retries.
            Err(StoreError::Backend(e)) => {
                tracing::warn!(worker = worker_id, error = e, "recovery waits for the store")
            }
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    /// Appends `items` to the log. The future resolves once they are durable per the `fsync`
    /// policy; only then may the caller acknowledge them. The items are encoded before this
    /// returns, so the future borrows nothing.
    pub fn append(&self, items: &[Item<'_>]) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let ticket = self.submit(items);
        async move {
            match ticket {
                Ticket::Done(result) => result,
                Ticket::Waiting(answer) => answer.await.unwrap_or(Err(StoreError::Closed)),
            }
        }
    }

    /// [`Store::append`] for callers outside an async runtime: blocks until durable.
    pub fn append_blocking(&self, items: &[Item<'_>]) -> Result<(), StoreError> {
        match self.submit(items) {
            Ticket::Done(result) => result,
            Ticket::Waiting(answer) => answer.blocking_recv().unwrap_or(Err(StoreError::Closed)),
        }
    }

    /// Hands the encoded batch to the log writer; an empty batch needs no write.
    fn submit(&self, items: &[Item<'_>]) -> Ticket {
        if items.is_empty() {
            return Ticket::Done(Ok(()));
        }
        self.writer.append(wal::encode_record(items), items.len() as u64)
    }

    /// Merges every item logged so far into the tenant files, then deletes the consumed log
    /// files; also adopts and consumes the logs of workers that are not running.
    pub fn flush(&self) -> Result<FlushReport, StoreError> {
        let _one_at_a_time = self.flushing.lock();
        let started = Instant::now();
        let active = self.writer.rotate()?;
        let mut report = FlushReport::default();
        let own = self.log.files().map_err(|e| StoreError::io("listing the log", e))?;
        for (seq, path) in own.iter().filter(|(seq, _)| *seq < active) {
            let items = self.consume(path, &mut report)?;
            if *seq >= self.first_seq {
                self.consumed.fetch_add(items, Ordering::Relaxed);
            }
        }
        if report.log_files > 0 {
            fsutil::sync_dir(self.log.path()).map_err(|e| StoreError::io("syncing the log directory", e))?;
        }
        self.adopt_orphans(&mut report)?;
        *self.last_flush.lock() = Some((SystemTime::now(), started.elapsed(), report.clone()));
        Ok(report)
    }

    /// The tenant's distinct count as of the latest flush by any worker sharing the database.
    pub fn count(&self, tenant: &str) -> Result<u64, StoreError> {
        self.tenants.count(tenant)
    }

    /// Whether [`Store::count`] may wait on the network, so that an event loop should call it on
    /// a blocking thread.
    pub fn counts_block(&self) -> bool {
        self.tenants.counts_block()
    }

    /// Items acknowledged but not yet flushed into the tenants' store.
    pub fn pending_items(&self) -> u64 {
        let appended = self.writer.stats().items.load(Ordering::Relaxed);
        appended.saturating_sub(self.consumed.load(Ordering::Relaxed))
    }

    /// The store's counters.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            log_bytes_appended: self.writer.stats().bytes.load(Ordering::Relaxed),
            pending_items: self.pending_items(),
            last_flush: self.last_flush.lock().clone(),
        }
    }

    /// Flushes everything and closes the store, releasing its log.
    pub fn close(self) -> Result<FlushReport, StoreError> {
        self.flush()
    }

    /// Merges one log file into the tenant files and deletes it; returns its item count.
    fn consume(&self, path: &Path, report: &mut FlushReport) -> Result<u64, StoreError> {
        let data = fs::read(path).map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        let mut records = Records::new(&data);
        let mut by_tenant: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut items = 0;
        for record in records.by_ref() {
            items += record.len() as u64;
            for (tenant, id) in record {
                by_tenant.entry(tenant).or_default().push(id);
            }
        }
        let dropped = (data.len() - records.valid_len()) as u64;
        if dropped > 0 {
            // Only the tail of the newest file of a crashed worker can be torn; it was never
            // acknowledged. Anything else would be damage to the disk, worth a loud line.
            tracing::warn!(file = %path.display(), offset = records.valid_len(), bytes = dropped, "dropped a torn log tail");
        }
        let tenants: Vec<(&str, Vec<&str>)> = by_tenant.into_iter().collect();
        report.new_ids += self.merge_all(&tenants)?;
        fs::remove_file(path).map_err(|e| StoreError::io(format!("removing {}", path.display()), e))?;
        report.log_files += 1;
        report.items += items;
        report.tenants += tenants.len() as u64;

        report.dropped_bytes += dropped;
        Ok(items)
    }

    /// Merges each tenant's ids into its files, several tenants at once: a merge spends its time
    /// in hashing and fsyncs, both of which overlap well across threads. Returns the new ids.
    fn merge_all(&self, tenants: &[(&str, Vec<&str>)]) -> Result<u64, StoreError> {
        let threads =
            thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_MERGE_THREADS).min(tenants.len());
        let next = AtomicUsize::new(0);
        let work = || -> Result<u64, StoreError> {
            let mut new_ids = 0;
            while let Some((tenant, ids)) = tenants.get(next.fetch_add(1, Ordering::Relaxed)) {
                new_ids += self.tenants.merge(tenant, ids)?;
            }
            Ok(new_ids)
        };
        thread::scope(|s| {
            let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
            let mut total = work();
            for helper in helpers {
                let theirs = helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                total = match (total, theirs) {
                    (Ok(a), Ok(b)) => Ok(a + b),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
            }
            total
        })
    }

    /// Consumes the log of every worker that is not running: its lock is free.
    fn adopt_orphans(&self, report: &mut FlushReport) -> Result<(), StoreError> {
        let entries = match fs::read_dir(&self.wal_root) {
            Ok(entries) => entries,
            Err(e) => return Err(StoreError::io("listing the log directories", e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("listing the log directories", e))?;
            if entry.file_name() == self.worker_id.as_str() || !entry.path().is_dir() {
                continue;
            }
            let path = entry.path();
            // A cheap look before taking the lock: most directories of live workers are skipped
            // by the lock anyway, and those of stopped workers are usually empty.
            if wal::log_files(&path).map_or(true, |files| files.is_empty()) {
                continue;
            }
            let Some(orphan) = LogDir::try_lock(&path).map_err(|e| StoreError::io("locking a log", e))? else {
                continue;
            };
            let files = orphan.files().map_err(|e| StoreError::io("listing an adopted log", e))?;
            for (_, file) in &files {
                self.consume(file, report)?;
                report.adopted_files += 1;
            }
            fsutil::sync_dir(orphan.path()).map_err(|e| StoreError::io("syncing an adopted log", e))?;
            tracing::info!(worker = self.worker_id, adopted = %path.display(), files = files.len(), "adopted the log of a stopped worker");
        }
        Ok(())
    }
}

fn validate_worker_id(id: &str) -> Result<(), StoreError> {
    let valid = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !id.bytes().all(|b| b == b'.');
    if valid { Ok(()) } else { Err(StoreError::InvalidWorkerId(id.to_owned())) }
}
