//! The store a worker drives: it never loses an acknowledged item.
//!
//! - [`Store::append`] writes a batch to this worker's write-ahead log and returns once it is as
//!   durable as the `fsync` policy promises (under `always`, concurrent appends share one fsync).
//! - [`Store::flush`] closes the active log file and runs a merge round: the tenants' id sets
//!   (`sets`: JSON files or Redis, behind one trait) take the closed log files' items, and log
//!   files they have durably taken are deleted. [`Store::merge`] runs a round only if log files
//!   were closed or workers came or went since the last one, or the sets ask for one.
//! - [`Store::count`] reads a tenant's count as of the latest merge by any worker: from a file
//!   held open, or (Redis) over a multiplexed connection, without leaving the event loop.
//! - [`Store::open`] locks this worker's log and closes what a previous run left in it; the
//!   merges take it from there, as they take the files of dead workers: nothing acknowledged
//!   is ever stranded, and opening costs no replay.
//!
//! The files under the database directory are described in `layout`; errors are `error`'s,
//! and what a round did and the store's counters `report`'s.

mod backoff;
mod damaged;
pub mod disk;
mod error;
mod item;
mod layout;
mod log;
mod partition;
mod report;
mod sets;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use countapp_shared::config::{Config, FsyncPolicy, RedisHandoff, StoreKind};
use parking_lot::Mutex;

pub use error::StoreError;
pub use item::Item;
use log::LogDir;
use log::record;
use log::writer::{Ticket, Writer};
pub use partition::{DEFAULT_SHARDS, owner_of, shard_of};
pub use report::{MergeReport, QuarantinedTenant, StoreStats};
pub use sets::{Answer, Count, TenantPage};
use sets::{Scope, TenantSets};

/// How a store is opened: which backend keeps the tenants' id sets, and where; the rest is
/// [`Settings`], which a running store can change.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Which backend keeps the tenants' id sets: the config's `store` key.
    pub store: StoreKind,
    /// With `store: redis`, the server, or one node of a cluster: `redis_url`.
    pub redis_url: Option<String>,
    /// With `store: redis`, whether `redis_url` is a node of a Redis Cluster: `redis_cluster`.
    pub redis_cluster: bool,
    /// With a `rediss://` URL, the certificates of the TLS connection.
    pub redis_tls: RedisTls,
    /// How long [`Store::open`] waits for a process that holds this worker's log, such as the
    /// previous run of this worker still stopping.
    pub lock_wait: Duration,
    /// The shards of the database, if this open creates it; an existing database keeps its own.
    pub shards: u16,
    /// How long a dead worker's log directory must stay without a log file before it is
    /// removed (see [`Store::merge`]): long enough that every live worker has long forgotten
    /// its files.
    pub forget_gone_after: Duration,
    /// What a running store can change ([`Store::apply`]).
    pub settings: Settings,
}

impl StoreOptions {
    /// The options a worker running `config` opens its store with.
    pub fn from_config(config: &Config) -> StoreOptions {
        StoreOptions {
            store: config.store,
            redis_url: config.redis_url.as_ref().map(|url| url.as_str().to_owned()),
            redis_cluster: config.redis_cluster,
            redis_tls: RedisTls {
                ca_file: config.redis_tls_ca.as_ref().map(|file| file.to_path_buf()),
                cert_file: config.redis_tls_cert.as_ref().map(|file| file.to_path_buf()),
                key_file: config.redis_tls_key.as_ref().map(|file| file.to_path_buf()),
            },
            settings: Settings::from_config(config),
            ..StoreOptions::default()
        }
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            store: StoreKind::Json,
            redis_url: None,
            redis_cluster: false,
            redis_tls: RedisTls::default(),
            lock_wait: Duration::from_secs(10),
            shards: DEFAULT_SHARDS,
            forget_gone_after: Duration::from_secs(60),
            settings: Settings::default(),
        }
    }
}

/// The certificates of a TLS connection to Redis (`rediss://`), as PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// The certificate authority that signed the server's certificate; the system's roots
    /// when not given.
    pub ca_file: Option<PathBuf>,
    /// The client's certificate, where the server asks for one (mutual TLS); with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    pub key_file: Option<PathBuf>,
}

/// The store's settings that a running cluster can change with an edit of the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// When appends are fsynced: before the ack, once a second, or never. Merges are made
    /// durable before log files are deleted, except under `never`.
    pub fsync: FsyncPolicy,
    /// With Redis, what a log file's deletion waits for.
    pub redis_handoff: RedisHandoff,
    /// With Redis, how many connections a merge spreads its pipelines over.
    pub redis_merge_connections: usize,
    /// Bytes of damaged files kept under `damaged/` at most.
    pub damaged_max_bytes: u64,
}

impl Settings {
    /// The settings of `config`.
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            fsync: config.fsync,
            redis_handoff: config.redis_handoff(),
            redis_merge_connections: config.redis_merge_connections(),
            damaged_max_bytes: config.damaged_max_bytes(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            fsync: FsyncPolicy::EverySec,
            redis_handoff: RedisHandoff::default(),
            redis_merge_connections: 1,
            damaged_max_bytes: 1 << 30,
        }
    }
}

/// A worker's durable store; see the module documentation.
///
/// Dropping a store without [`Store::close`] is like a crash: what was appended stays in the log
/// and is merged all the same, by this worker's next run or by the other workers.
pub struct Store {
    worker_id: String,
    root: PathBuf,
    shards: u16,
    /// Where the tenants' id sets live.
    sets: Box<dyn TenantSets>,
    writer: Writer,
    /// This worker's log directory, locked while the store lives. Declared after `writer`, so
    /// that the lock is released only once the writer has finished.
    log: LogDir,
    /// One round at a time.
    rounds: Mutex<RoundState>,
    /// This worker's closed log files not yet taken by the sets, each with its items and when
    /// the first of them was written: what is pending, and since when.
    closed: Mutex<BTreeMap<u64, Pending>>,
    /// When the latest round that did something finished, what it took, and what it did.
    last_merge: Mutex<Option<(SystemTime, Duration, MergeReport)>>,
    /// The most bytes `damaged/` keeps, and when this worker last kept house (see `housekeep`).
    damaged: Mutex<(u64, Option<Instant>)>,
    /// Dead workers' log directories found without a log file, with when each was first found
    /// so; and how long one must stay so before it is removed.
    empty_logs: Mutex<(HashMap<String, Instant>, Duration)>,
}

/// A closed log file of this worker's that the sets have not taken yet.
struct Pending {
    /// Its items.
    items: u64,
    /// When the first of them was written.
    since: SystemTime,
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
        let sets = sets::open(database, shards, worker_id, writer_tag, &options)?;
        let log_path = database.join("wal").join(worker_id);
        let log =
            LogDir::lock(&log_path, options.lock_wait)?.ok_or_else(|| StoreError::LogInUse(worker_id.to_owned()))?;
        let present = log.close_leftovers()?;
        let highest = present.max(sets.highest_merged(worker_id));
        // A number is never used twice: a reader that knew an earlier file by it would take the
        // new file for the old one.
        let start = (highest + 1).max(log::reserved(log.path())?);
        let reserved = log::reserve(log.path(), start)?;
        let mut closed = BTreeMap::new();
        for file in log::files(log.path())? {
            match log::items_in(&file.path)? {
                // Merged and deleted by another worker meanwhile: pending no more.
                None => {}
                // Nothing acknowledged in it, and its number is below those reserved now.
                Some(0) => disk::remove(&file.path)?,
                Some(items) => {
                    // Its first item was written at the latest when the file was last written.
                    closed.insert(file.seq, Pending { items, since: file.modified });
                }
            }
        }
        let writer = Writer::start(&log, start, present, reserved, options.settings.fsync)?;
        Ok(Store {
            worker_id: worker_id.to_owned(),
            root: database.to_path_buf(),
            shards,
            sets,
            writer,
            log,
            rounds: Mutex::new(RoundState::default()),
            closed: Mutex::new(closed),
            last_merge: Mutex::new(None),
            damaged: Mutex::new((options.settings.damaged_max_bytes, None)),
            empty_logs: Mutex::new((HashMap::new(), options.forget_gone_after)),
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
    pub fn flush(&self) -> Result<MergeReport, StoreError> {
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

    /// Puts an edit of the live settings in force: appends are fsynced by the new policy from
    /// now on, and the rest applies from the next round on.
    pub fn apply(&self, settings: &Settings) {
        self.writer.set_policy(settings.fsync);
        self.sets.apply(settings);
        *self.damaged.lock() = (settings.damaged_max_bytes, None);
    }

    /// Closes the active log file, if it holds anything: every item acknowledged so far is then
    /// in a closed file, for the owners of its shards to merge.
    pub fn close_log(&self) -> Result<(), StoreError> {
        if let Some((seq, items, since)) = self.writer.rotate()? {
            self.closed.lock().insert(seq, Pending { items, since });
        }
        Ok(())
    }

    /// A merge round, if anything changed since the last one: a log file was closed or
    /// deleted, or a worker came or went. Cheap when nothing did: one listing of the logs.
    pub fn merge(&self) -> Result<MergeReport, StoreError> {
        let mut rounds = self.rounds.lock();
        self.round(&mut rounds, false)
    }

    fn round(&self, state: &mut RoundState, always: bool) -> Result<MergeReport, StoreError> {
        let wal_root = self.root.join("wal");
        self.round_over(state, &wal_root, &log::scan(&wal_root)?, always, Scope::All)
    }

    /// A merge round over `logs`, as just listed from `wal_root`, of what `scope` asks (see
    /// [`Store::merge`]).
    fn round_over(
        &self,
        state: &mut RoundState,
        wal_root: &Path,
        logs: &[log::WorkerLog],
        always: bool,
        scope: Scope<'_>,
    ) -> Result<MergeReport, StoreError> {
        let started = Instant::now();
        let seen: Vec<(String, bool, Vec<u64>)> =
            logs.iter().map(|l| (l.worker.clone(), l.live, l.inputs.iter().map(|f| f.seq).collect())).collect();
        // A round runs, changed or not, when the sets ask for one: a quarantined tenant whose
        // files changed (repaired, say), consumed Redis log files to settle.
        if !always && !self.sets.round_due() && state.seen.as_ref() == Some(&seen) {
            return Ok(MergeReport::default());
        }
        state.seen = None;
        let mut report = MergeReport::default();
        self.sets.merge(logs, scope, &mut report)?;
        // A shard left busy is retried at the next poll, changed or not; so is everything a
        // round of some shards alone left.
        let complete = report.busy_shards == 0 && report.failed_shards == 0 && scope == Scope::All;
        state.seen = complete.then_some(seen);
        self.forget_deleted();
        self.forget_gone_workers(wal_root, logs);
        self.housekeep(wal_root);
        if report.log_files > 0 {
            release_free_memory();
        }
        if report != MergeReport::default() {
            *self.last_merge.lock() = Some((SystemTime::now(), started.elapsed(), report.clone()));
        }
        Ok(report)
    }

    /// This worker's part of a barrier, once every worker closed its log: a merge round of
    /// `shards` alone (where merging goes by shard) if anything changed since the last round,
    /// then which of `shards` this worker vouches for (see [`Store::covered`]). Costs one
    /// listing of the logs when there is nothing to merge.
    ///
    /// With `deletes`, tenants in `shards` that a barrier has settled already: the round also
    /// deletes them where this worker is to, and a shard holding one is vouched for only once it
    /// is deleted. Every id acknowledged before the barrier is then gone for good; those
    /// acknowledged since count afresh, or were acknowledged concurrently with the deletion.
    pub fn settle(&self, shards: &[u16], deletes: &[String]) -> Result<Vec<u16>, StoreError> {
        let asked = Instant::now();
        let mut rounds = self.rounds.lock();
        // What a strong read under load waits for: the merger's round in progress, then this one.
        let waited = asked.elapsed();
        self.sets.delete_in_round(deletes);
        let wal_root = self.root.join("wal");
        let logs = log::scan(&wal_root)?;
        let report = self.round_over(&mut rounds, &wal_root, &logs, !deletes.is_empty(), Scope::Shards(shards))?;
        tracing::debug!(
            shards = shards.len(),
            waited_ms = waited.as_secs_f64() * 1e3,
            round_ms = (asked.elapsed() - waited).as_secs_f64() * 1e3,
            log_files = report.log_files,
            "a barrier's settle round"
        );
        let mut vouched = self.sets.settled(&logs, shards);
        if !deletes.is_empty() {
            let deleted = self.sets.deleted(deletes)?;
            let pending =
                |shard: &u16| deletes.iter().any(|t| shard_of(t, self.shards) == *shard && !deleted.contains(t));
            vouched.retain(|shard| !pending(shard));
        }
        Ok(vouched)
    }

    /// Whether this worker answers counts from reads kept for a moment (see
    /// [`Store::forget_reads`]).
    pub fn keeps_reads(&self) -> bool {
        self.sets.keeps_reads()
    }

    /// The last step of a barrier, once it covered its shards: forgets the counts kept from
    /// earlier reads, so that no count read before the barrier passed answers after it.
    pub fn forget_reads(&self) {
        self.sets.forget_reads();
    }

    /// Whether `shards` are settled, from what each worker answered to [`Store::settle`]: every
    /// item in the final log files of every worker, as they were when the workers settled, is
    /// then in the tenants' sets, visible to counts. With shards merged by their owner, one
    /// worker's word for a shard is enough; with each worker merging its own log, every one's.
    pub fn covered(&self, shards: &[u16], vouched: &[Vec<u16>]) -> bool {
        if self.sets.vouches_for_every_writer() {
            shards.iter().all(|shard| vouched.iter().any(|v| v.contains(shard)))
        } else {
            shards.iter().all(|shard| vouched.iter().all(|v| v.contains(shard)))
        }
    }

    /// The workers whose word settles `shards` (see [`Store::covered`]) where each shard is
    /// merged by its owner: the owners, among `live` (the ids of the live workers as this worker
    /// sees them). `None` where every worker's word is needed.
    pub fn owners_of(&self, shards: &[u16], live: &[String]) -> Option<BTreeSet<String>> {
        self.sets.vouches_for_every_writer().then(|| {
            shards
                .iter()
                .filter_map(|&shard| owner_of(shard, live.iter().map(String::as_str)))
                .map(str::to_owned)
                .collect()
        })
    }

    /// The ids of the workers running on this database now (holding their log's lock), this
    /// one included.
    pub fn live_workers(&self) -> Result<Vec<String>, StoreError> {
        let logs = log::scan(&self.root.join("wal"))?;
        Ok(logs.into_iter().filter(|l| l.live).map(|l| l.worker).collect())
    }

    /// Removes the log directories of dead workers gone for good: without a log file for
    /// `forget_gone_after` and recorded nowhere (see [`log::forget`]). A removed worker's
    /// directory would otherwise stay forever.
    fn forget_gone_workers(&self, wal_root: &Path, logs: &[log::WorkerLog]) {
        let mut empty = self.empty_logs.lock();
        let (since, after) = &mut *empty;
        let gone = logs.iter().filter(|l| !l.live && l.inputs.is_empty() && l.worker != self.worker_id);
        since.retain(|worker, _| logs.iter().any(|l| l.worker == *worker && !l.live && l.inputs.is_empty()));
        for log in gone {
            let found = *since.entry(log.worker.clone()).or_insert_with(Instant::now);
            if found.elapsed() < *after {
                continue;
            }
            // Still recorded (a shard not rewritten since): looked at again after as long.
            if self.sets.highest_merged(&log.worker) > 0 {
                since.insert(log.worker.clone(), Instant::now());
                continue;
            }
            match log::forget(wal_root, log) {
                Ok(true) => {
                    tracing::info!(worker = log.worker, "a gone worker's empty log directory removed");
                    since.remove(&log.worker);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(worker = log.worker, error = %e, "cannot remove a gone worker's log directory")
                }
            }
        }
    }

    /// At most once a minute: keeps `damaged/` within its bytes, and removes what a crash (or a
    /// failed removal) left of a forgotten worker's log directory, rare enough that a round
    /// need not list for it.
    fn housekeep(&self, wal_root: &Path) {
        let mut damaged = self.damaged.lock();
        if damaged.1.is_some_and(|last| last.elapsed() < HOUSEKEEP_EVERY) {
            return;
        }
        damaged.1 = Some(Instant::now());
        if let Err(e) = damaged::prune(&self.root, damaged.0) {
            tracing::warn!(error = %e, "cannot prune the damaged files kept aside");
        }
        if let Err(e) = log::remove_forgotten(wal_root) {
            tracing::warn!(error = %e, "cannot remove what is left of a gone worker's log directory");
        }
    }

    /// Drops this worker's log files that are gone, or consumed, from the pending count.
    fn forget_deleted(&self) {
        let Ok(present) = log::files(self.log.path()) else { return };
        let present: Vec<u64> = present.iter().filter(|f| !f.consumed).map(|f| f.seq).collect();
        self.closed.lock().retain(|seq, _| present.binary_search(seq).is_ok());
    }

    /// The tenant's distinct count as of the latest merge by any worker sharing the store: from a
    /// file held open ([`Count::Now`]), or from a server within a deadline ([`Count::Later`],
    /// awaited in a tokio runtime).
    pub fn count(&self, tenant: &str) -> Count<'_> {
        self.sets.count(tenant)
    }

    /// The counts of `tenants`, in their order, as [`Store::count`] reads each.
    pub fn counts<'a>(&'a self, tenants: &'a [String]) -> Answer<'a, Vec<u64>> {
        self.sets.counts(tenants)
    }

    /// Whether each of `ids` is in `tenant`'s set, in their order, as of the latest merge by
    /// any worker.
    pub fn contains<'a>(&'a self, tenant: &'a str, ids: &'a [String]) -> Answer<'a, Vec<bool>> {
        self.sets.contains(tenant, ids)
    }

    /// Up to `limit` tenants whose names start with `prefix` and come after `after`, in byte
    /// order of their names, each with its count as of the latest merge by any worker.
    pub fn list<'a>(&'a self, prefix: &'a str, after: &'a str, limit: usize) -> Answer<'a, TenantPage> {
        self.sets.list(prefix, after, limit)
    }

    /// Whether reads are answered on the calling thread, from files (`store: json`): a caller on
    /// an event loop hands a large one (a membership check, many counts, a listing) to a thread
    /// that may block. Otherwise their answers come over the network, to be awaited.
    pub fn reads_files(&self) -> bool {
        self.sets.reads_files()
    }

    /// [`Store::count`] for callers outside an async runtime.
    pub fn count_blocking(&self, tenant: &str) -> Result<u64, StoreError> {
        self.sets.count_blocking(tenant)
    }

    /// How far behind this worker's merging is: how long the oldest item it is to merge has
    /// waited since its log file was last written. Zero when it keeps up.
    pub fn merge_lag(&self) -> Duration {
        self.sets.merge_lag()
    }

    /// How far behind merging is, if past `bound`: ingest is then to be pushed back, so that
    /// counts converge within about `worker_persist` and `bound` of the last acknowledgement.
    /// Where the backend sets the pace (Redis), the active log file's merge counts too: it is
    /// what is left to merge once its load stops. `None` while merging keeps up, and while the
    /// backend cannot be reached (the log then takes the ingest, up to the worker's
    /// `max_pending_items`).
    pub fn outrun(&self, bound: Duration) -> Option<Duration> {
        if self.sets.failing() {
            return None;
        }
        Some(self.sets.merge_lag() + self.active_merge_time().unwrap_or_default()).filter(|lag| *lag > bound)
    }

    /// Whether the active log file holds more than the backend merges in `bound` at its pace
    /// (Redis): closed at once rather than at the next `worker_persist`, it is merged in pieces
    /// of at most that, and a load that stops leaves at most that in its active file.
    pub fn log_outgrows(&self, bound: Duration) -> bool {
        !self.sets.failing() && self.active_merge_time().is_some_and(|time| time > bound)
    }

    /// How long merging the active log file takes at the backend's pace, where it sets one.
    fn active_merge_time(&self) -> Option<Duration> {
        self.sets.merge_time(self.writer.active_bytes())
    }

    /// Items this worker acknowledged that are still in its log files, not yet taken by the
    /// tenants' store (consumed log files waiting out Redis's grace period are not pending).
    pub fn pending_items(&self) -> u64 {
        self.writer.active_items() + self.closed.lock().values().map(|pending| pending.items).sum::<u64>()
    }

    /// How long the oldest item this worker acknowledged that the sets have not taken yet has
    /// waited: whether in a closed log file or still in the active one. Zero when none waits.
    pub fn oldest_pending(&self) -> Duration {
        let closed = self.closed.lock().values().map(|pending| pending.since).min();
        let oldest = closed.into_iter().chain(self.writer.active_since()).min();
        oldest.map_or(Duration::ZERO, |since| since.elapsed().unwrap_or_default())
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
            ids_in_memory: self.sets.ids_in_memory(),
            merge_lag: self.merge_lag(),
            oldest_pending: self.oldest_pending(),
            last_merge: self.last_merge.lock().clone(),
            quarantined: self.sets.quarantined(),
        }
    }

    /// Flushes, then goes on merging until every log file of this worker is merged by the
    /// owners of its shards, or until `wait` has passed. When the whole cluster stops, the last
    /// worker to go owns every shard: it merges what is left, so that the tenant files then
    /// hold every acknowledged item. With Redis, consumed log files still in their grace
    /// period stay behind: the worker's next run (or whoever takes its log) merges them again.
    pub fn drain(&self, wait: Duration) -> Result<MergeReport, StoreError> {
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
    pub fn close(self, wait: Duration) -> Result<MergeReport, StoreError> {
        let report = self.drain(wait)?;
        self.finish()?;
        Ok(report)
    }
}

/// How often a worker looks whether `damaged/` holds more than it may, and for what is left of
/// forgotten workers' log directories.
const HOUSEKEEP_EVERY: Duration = Duration::from_secs(60);

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
    sets::count_in(database, shards, tenant)
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
