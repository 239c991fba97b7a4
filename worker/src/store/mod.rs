//! The store a worker drives: it never loses an acknowledged item.
//!
//! - [`Store::append`] writes a batch to this worker's write-ahead log and returns once it is as
//!   durable as the `fsync` policy promises (under `always`, concurrent appends share one fsync).
//! - [`Store::flush`] closes the active log file and runs a merge round: the tenants' id sets
//!   take the closed log files' items (see `shards` for the JSON files, `redis_sets` for Redis),
//!   and log files merged everywhere are deleted. [`Store::merge`] runs a round only if log
//!   files were closed or workers came or went since the last one.
//! - [`Store::count`] reads a tenant's count as of the latest merge by any worker: from a file
//!   held open, or (Redis) over a multiplexed connection, without leaving the event loop.
//! - [`Store::open`] locks this worker's log and closes what a previous run left in it; the
//!   merges take it from there, as they take the files of dead workers: nothing acknowledged
//!   is ever stranded, and opening costs no replay.
//!
//! The files under the database directory are described in `layout`.

mod backoff;
mod commit;
mod damaged;
pub mod disk;
mod idset;
mod layout;
mod log;
mod naming;
mod quarantine;
mod redis_sets;
mod shards;
mod tenant;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use countapp_shared::config::{FsyncPolicy, RedisHandoff, StoreBackend};
use countapp_shared::items::Item;
use parking_lot::Mutex;
use thiserror::Error;

pub use layout::{DEFAULT_SHARDS, owner_of, shard_of};
use log::LogDir;
use log::record::{self, Entry, Records};
use log::writer::{Ticket, Writer};
use redis_sets::RedisTenants;
use shards::Shards;

/// What can go wrong in the store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{context}: {error}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The file it was done to, where one was.
        path: Option<PathBuf>,
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
    /// Two tenant names hash to the same file; the store refuses rather than mix their ids.
    #[error("tenant {tenant:?} maps to the file of tenant {owner:?}")]
    TenantCollision {
        /// The tenant asked for.
        tenant: String,
        /// The tenant that owns the file.
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
    /// The tenant is quarantined: one of its files cannot be read (see the README, "Repairing
    /// a tenant"); the ids that arrive for it are kept meanwhile.
    #[error("tenant {tenant:?} is quarantined: {} cannot be read ({reason}); its new ids are kept until it is repaired", file.display())]
    Quarantined {
        /// The tenant.
        tenant: String,
        /// The file that cannot be read.
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// The tenants' store (Redis) cannot be reached or refused the request; the log keeps
    /// whatever could not be merged, and a later flush retries.
    #[error("the tenant store is unavailable: {0}")]
    Backend(String),
}

impl From<disk::DiskError> for StoreError {
    fn from(e: disk::DiskError) -> StoreError {
        StoreError::Io { context: e.context(), path: Some(e.path), error: e.source }
    }
}

impl StoreError {
    fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io { context: context.into(), path: None, error: source }
    }

    fn corrupt(path: &Path, detail: impl ToString) -> StoreError {
        StoreError::Corrupt { path: path.to_path_buf(), detail: detail.to_string() }
    }
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// When appends are fsynced: before the ack, once a second, or never. Merges are made
    /// durable before log files are deleted, except under `never`.
    pub fsync: FsyncPolicy,
    /// How long [`Store::open`] waits for a process that holds this worker's log, such as the
    /// previous run of this worker still stopping.
    pub lock_wait: Duration,
    /// Where the tenants' id sets live.
    pub backend: StoreBackend,
    /// The shards of the database, if this open creates it; an existing database keeps its own.
    pub shards: u16,
    /// With Redis, what a log file's deletion waits for; [`Store::set_redis_handoff`] changes it.
    pub redis_handoff: RedisHandoff,
    /// Bytes of damaged files kept under `damaged/` at most; [`Store::set_damaged_max_bytes`]
    /// changes it.
    pub damaged_max_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            fsync: FsyncPolicy::EverySec,
            lock_wait: Duration::from_secs(10),
            backend: StoreBackend::Json,
            shards: DEFAULT_SHARDS,
            redis_handoff: RedisHandoff::default(),
            damaged_max_bytes: 1 << 30,
        }
    }
}

/// What a flush or a merge round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Log files read, of any worker.
    pub log_files: u64,
    /// Items taken from them into the shards this worker merges, repeats included.
    pub items: u64,
    /// Tenants merged into.
    pub tenants: u64,
    /// Ids that were new to their tenant.
    pub new_ids: u64,
    /// Bytes of torn tails dropped from log files: crashes mid-append, never acknowledged.
    pub torn_tail_bytes: u64,
    /// Bytes of damaged records skipped in the middle of log files, whose intact records after
    /// the damage were merged and which were kept aside under `damaged/`.
    pub damaged_bytes: u64,
    /// Log files deleted, every shard having merged them (with Redis: Redis having confirmed
    /// their ids, or their grace period being over).
    pub deleted_files: u64,
    /// Bytes of tenant files written.
    pub written_bytes: u64,
    /// Shards left for a later round, their lock held by another worker.
    pub busy_shards: u64,
    /// Shards left out of the round by an I/O error on their lock, record or directory, tried
    /// again after a backoff; every other shard merged on.
    pub failed_shards: u64,
    /// Shard records found damaged and rebuilt.
    pub rebuilt_records: u64,
}

impl FlushReport {
    /// Adds the damage found in one log file.
    pub(crate) fn add_damage(&mut self, damage: log::Damage) {
        self.torn_tail_bytes += damage.torn_tail_bytes;
        self.damaged_bytes += damage.damaged_bytes;
    }
}

/// A tenant set apart because one of its files cannot be read (see the README, "Repairing a
/// tenant").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuarantinedTenant {
    /// The tenant.
    pub tenant: String,
    /// The file that cannot be read.
    pub file: PathBuf,
    /// Why.
    pub reason: String,
    /// Ids that arrived for it since, kept until it is repaired.
    pub kept_ids: u64,
}

/// A snapshot of the store's counters, for `/stats` and `/metrics`.
#[derive(Debug, Clone)]
pub struct StoreStats {
    /// Bytes appended to the log since the store opened.
    pub log_bytes_appended: u64,
    /// Items this worker acknowledged that are still in its log files: not yet merged
    /// everywhere.
    pub pending_items: u64,
    /// Ids this worker holds in memory for the shards it merges, and their bytes, about.
    pub ids_in_memory: (u64, u64),
    /// How far behind this worker's merging is (see [`Store::merge_lag`]).
    pub merge_lag: Duration,
    /// When the latest round that did something finished, what it took, and what it did.
    pub last_flush: Option<(SystemTime, Duration, FlushReport)>,
    /// The tenants in quarantine in the shards this worker merges.
    pub quarantined: Vec<QuarantinedTenant>,
}

/// Where the tenants' id sets live, and how log files get there.
enum Engine {
    /// JSON files under the database, merged shard by shard by their owners.
    Json(Shards),
    /// Redis sets; each worker merges its own log.
    Redis(RedisTenants),
}

/// A worker's durable store; see the module documentation.
///
/// Dropping a store without [`Store::close`] is like a crash: what was appended stays in the log
/// and is merged all the same, by this worker's next run or by the other workers.
pub struct Store {
    worker_id: String,
    root: PathBuf,
    shards: u16,
    engine: Engine,
    writer: Writer,
    /// This worker's log directory, locked while the store lives. Declared after `writer`, so
    /// that the lock is released only once the writer has finished.
    log: LogDir,
    /// One round at a time.
    rounds: Mutex<RoundState>,
    /// This worker's closed log files not yet deleted, with their items: the pending count.
    closed: Mutex<BTreeMap<u64, u64>>,
    last_flush: Mutex<Option<(SystemTime, Duration, FlushReport)>>,
    /// The most bytes `damaged/` keeps, and when this worker last pruned it.
    damaged: Mutex<(u64, Option<Instant>)>,
}

/// What the last merge round saw, so that a poll with nothing new does nothing.
#[derive(Default)]
struct RoundState {
    /// The live workers and final log files of the last complete round.
    seen: Option<Vec<(String, bool, Vec<u64>)>>,
}

impl Store {
    /// Opens the store under `database` as worker `worker_id`: locks this worker's log, closes
    /// the files a previous run left in it, and starts a new log file. Merges nothing: the
    /// next round does, so the store serves at once, whatever its size.
    pub fn open(database: &Path, worker_id: &str, options: StoreOptions) -> Result<Store, StoreError> {
        validate_worker_id(worker_id)?;
        let shards = layout::open_or_create(database, options.shards)?;
        let writer_tag = format!("{worker_id}/{:016x}", rand::random::<u64>());
        let sync = options.fsync != FsyncPolicy::Never;
        let engine = match &options.backend {
            StoreBackend::Json => Engine::Json(Shards::new(database, shards, worker_id, writer_tag, sync)),
            StoreBackend::Redis { url, cluster } => {
                Engine::Redis(RedisTenants::new(url, *cluster, options.redis_handoff)?)
            }
        };
        let log_path = database.join("wal").join(worker_id);
        let log =
            LogDir::lock(&log_path, options.lock_wait)?.ok_or_else(|| StoreError::LogInUse(worker_id.to_owned()))?;
        let present = log.close_leftovers()?;
        let mut highest = present;
        if let Engine::Json(shards) = &engine {
            highest = highest.max(shards.highest_merged(worker_id));
        }
        // A number is never used twice: a reader that knew an earlier file by it would take the
        // new file for the old one.
        let start = (highest + 1).max(log::reserved(log.path())?);
        let reserved = log::reserve(log.path(), start)?;
        let mut closed = BTreeMap::new();
        for file in log::files(log.path())? {
            match items_in(&file.path)? {
                // Merged and deleted by another worker meanwhile: pending no more.
                None => {}
                // Nothing acknowledged in it, and its number is below those reserved now.
                Some(0) => disk::remove(&file.path)?,
                Some(items) => {
                    closed.insert(file.seq, items);
                }
            }
        }
        let writer = Writer::start(&log, start, present, reserved, options.fsync)?;
        Ok(Store {
            worker_id: worker_id.to_owned(),
            root: database.to_path_buf(),
            shards,
            engine,
            writer,
            log,
            rounds: Mutex::new(RoundState::default()),
            closed: Mutex::new(closed),
            last_flush: Mutex::new(None),
            damaged: Mutex::new((options.damaged_max_bytes, None)),
        })
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
        self.writer.append(record::encode(items, self.shards), items.len() as u64)
    }

    /// Closes the active log file, so that every item acknowledged so far is in a closed file,
    /// and runs a merge round. With the JSON files, the round merges the shards this worker
    /// owns, from every worker's closed files: once every live worker has flushed, every
    /// acknowledged item is counted; a worker alone owns every shard.
    pub fn flush(&self) -> Result<FlushReport, StoreError> {
        let mut rounds = self.rounds.lock();
        self.close_log()?;
        self.round(&mut rounds, true)
    }

    /// Set, once, to why the log can no longer be trusted (a failed fsync): the store then
    /// acknowledges nothing more, and its worker must stop and be restarted, to replay what the
    /// log really holds.
    pub fn failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.writer.failure()
    }

    /// Changes when appends are fsynced, and whether merges are made durable, from now on: an
    /// edit of `fsync` in a running cluster.
    pub fn set_fsync(&self, policy: FsyncPolicy) {
        self.writer.set_policy(policy);
        if let Engine::Json(shards) = &self.engine {
            shards.set_sync(policy != FsyncPolicy::Never);
        }
    }

    /// Changes what the deletion of a log file whose ids Redis took waits for, from the next
    /// round on: an edit of `redis_grace` or `redis_wait_replicas`. Nothing with the JSON files.
    pub fn set_redis_handoff(&self, handoff: RedisHandoff) {
        if let Engine::Redis(redis) = &self.engine {
            redis.set_handoff(handoff);
        }
    }

    /// Changes how many bytes of damaged files `damaged/` keeps, from the next pruning on: an
    /// edit of `damaged_max_bytes`.
    pub fn set_damaged_max_bytes(&self, max_bytes: u64) {
        *self.damaged.lock() = (max_bytes, None);
    }

    /// Closes the active log file, if it holds anything: every item acknowledged so far is then
    /// in a closed file, for the owners of its shards to merge.
    pub fn close_log(&self) -> Result<(), StoreError> {
        if let Some((seq, items)) = self.writer.rotate()? {
            self.closed.lock().insert(seq, items);
        }
        Ok(())
    }

    /// A merge round, if anything changed since the last one: a log file was closed or
    /// deleted, or a worker came or went. Cheap when nothing did: one listing of the logs.
    pub fn merge(&self) -> Result<FlushReport, StoreError> {
        let mut rounds = self.rounds.lock();
        self.round(&mut rounds, false)
    }

    fn round(&self, state: &mut RoundState, always: bool) -> Result<FlushReport, StoreError> {
        let started = Instant::now();
        let wal_root = self.root.join("wal");
        let logs = log::scan(&wal_root)?;
        let seen: Vec<(String, bool, Vec<u64>)> =
            logs.iter().map(|l| (l.worker.clone(), l.live, l.inputs.iter().map(|f| f.seq).collect())).collect();
        // A round runs, changed or not, for a quarantined tenant whose files changed (repaired,
        // say), and for consumed Redis log files to settle (see `redis_sets`).
        let retry = match &self.engine {
            Engine::Json(shards) => shards.retry_due(),
            Engine::Redis(redis) => redis.settle_due(),
        };
        if !always && !retry && state.seen.as_ref() == Some(&seen) {
            return Ok(FlushReport::default());
        }
        state.seen = None;
        let mut report = FlushReport::default();
        match &self.engine {
            Engine::Json(shards) => shards.round(&logs, &mut report)?,
            Engine::Redis(redis) => redis.round(&wal_root, &self.worker_id, &logs, &mut report)?,
        }
        // A shard left busy is retried at the next poll, changed or not.
        state.seen = (report.busy_shards == 0 && report.failed_shards == 0).then_some(seen);
        self.forget_deleted();
        self.prune_damaged();
        if report.log_files > 0 {
            release_free_memory();
        }
        if report != FlushReport::default() {
            *self.last_flush.lock() = Some((SystemTime::now(), started.elapsed(), report.clone()));
        }
        Ok(report)
    }

    /// Keeps `damaged/` within its bytes, looking at most once a minute.
    fn prune_damaged(&self) {
        let mut damaged = self.damaged.lock();
        if damaged.1.is_some_and(|last| last.elapsed() < DAMAGED_PRUNE_EVERY) {
            return;
        }
        damaged.1 = Some(Instant::now());
        if let Err(e) = damaged::prune(&self.root, damaged.0) {
            tracing::warn!(error = %e, "cannot prune the damaged files kept aside");
        }
    }

    /// Drops this worker's log files that are gone, or consumed, from the pending count.
    fn forget_deleted(&self) {
        let Ok(present) = log::files(self.log.path()) else { return };
        let present: Vec<u64> = present.iter().filter(|f| !f.consumed).map(|f| f.seq).collect();
        self.closed.lock().retain(|seq, _| present.binary_search(seq).is_ok());
    }

    /// The tenant's distinct count as of the latest merge by any worker sharing the store. The
    /// JSON files answer from a file held open; Redis over one multiplexed connection shared by
    /// every count, within a second or with [`StoreError::Backend`]. Runs in a tokio runtime.
    pub async fn count(&self, tenant: &str) -> Result<u64, StoreError> {
        match &self.engine {
            Engine::Json(shards) => shards.count(tenant),
            Engine::Redis(redis) => redis.count(tenant).await,
        }
    }

    /// [`Store::count`] for callers outside an async runtime: Redis is asked on a connection
    /// of the merges'.
    pub fn count_blocking(&self, tenant: &str) -> Result<u64, StoreError> {
        match &self.engine {
            Engine::Json(shards) => shards.count(tenant),
            Engine::Redis(redis) => redis.count_blocking(tenant),
        }
    }

    /// How far behind this worker's merging is: how long ago the oldest log file was written
    /// that holds runs this worker has yet to merge. Zero when it keeps up, and with Redis,
    /// where each worker merges only its own log.
    pub fn merge_lag(&self) -> Duration {
        match &self.engine {
            Engine::Json(shards) => shards.behind(),
            Engine::Redis(_) => Duration::ZERO,
        }
    }

    /// Items this worker acknowledged that are still in its log files, not yet taken by the
    /// tenants' store (consumed log files waiting out Redis's grace period are not pending).
    pub fn pending_items(&self) -> u64 {
        self.writer.active_items() + self.closed.lock().values().sum::<u64>()
    }

    /// The number of shards of the database.
    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// This worker's id, its name among the live workers.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The store's counters.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            log_bytes_appended: self.writer.stats().bytes.load(Ordering::Relaxed),
            pending_items: self.pending_items(),
            ids_in_memory: match &self.engine {
                Engine::Json(shards) => shards.memory(),
                Engine::Redis(_) => (0, 0),
            },
            merge_lag: self.merge_lag(),
            last_flush: self.last_flush.lock().clone(),
            quarantined: match &self.engine {
                Engine::Json(shards) => shards.quarantined(),
                Engine::Redis(_) => Vec::new(),
            },
        }
    }

    /// Flushes, then goes on merging until every log file of this worker is merged by the
    /// owners of its shards, or until `wait` has passed. When the whole cluster stops, the last
    /// worker to go owns every shard: it merges what is left, so that the tenant files then
    /// hold every acknowledged item. With Redis, consumed log files still in their grace
    /// period stay behind: the worker's next run (or whoever takes its log) merges them again.
    pub fn drain(&self, wait: Duration) -> Result<FlushReport, StoreError> {
        let mut report = self.flush()?;
        let deadline = Instant::now() + wait;
        while !self.closed.lock().is_empty() && Instant::now() < deadline {
            std::thread::sleep(DRAIN_POLL);
            let more = self.merge()?;
            report.items += more.items;
            report.new_ids += more.new_ids;
            report.deleted_files += more.deleted_files;
        }
        Ok(report)
    }

    /// Ends the log once the store is drained: its active file goes if it holds nothing, so
    /// that a worker that stops gracefully leaves nothing behind. Nothing may be appended after.
    pub fn finish(&self) -> Result<(), StoreError> {
        self.writer.remove_if_empty()
    }

    /// [`Store::drain`] and [`Store::finish`], then closes the store, releasing its log.
    pub fn close(self, wait: Duration) -> Result<FlushReport, StoreError> {
        let report = self.drain(wait)?;
        self.finish()?;
        Ok(report)
    }
}

/// How often a worker looks whether `damaged/` holds more than it may.
const DAMAGED_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How often [`Store::drain`] looks whether its log files are merged.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// The count of `tenant` in the JSON store at `database` (0 if there is no database yet), read
/// from its file without opening a store: a store opened to read would count as a live worker
/// and own shards.
pub fn read_count(database: &Path, tenant: &str) -> Result<u64, StoreError> {
    let shards = match layout::read_shards(database) {
        Err(StoreError::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
        other => other?,
    };
    Shards::new(database, shards, "reader", String::new(), false).count(tenant)
}

/// The items in the log file at `path`, intact records only; `None` if it is gone.
fn items_in(path: &Path) -> Result<Option<u64>, StoreError> {
    let data = match disk::read(path) {
        Ok(data) => data,
        Err(e) if e.not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let records =
        Records::new(&data).filter_map(|entry| if let Entry::Record(payload) = entry { Some(payload) } else { None });
    Ok(Some(records.flat_map(|payload| payload.runs()).map(|run| run.count_ids()).sum()))
}

/// Hands the memory a round freed back to the OS. A round's buffers (the log files it read, the
/// ids it sorted) come and go by the hundred megabytes; glibc's allocator keeps freed memory of
/// that size resident unless asked, which would double a worker's resident memory per stored id.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator's arenas to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn validate_worker_id(id: &str) -> Result<(), StoreError> {
    let valid = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !id.bytes().all(|b| b == b'.');
    if valid { Ok(()) } else { Err(StoreError::InvalidWorkerId(id.to_owned())) }
}
