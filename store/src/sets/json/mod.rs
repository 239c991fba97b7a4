//! The tenants' JSON files, merged shard by shard, each shard by one worker at a time.
//!
//! A merge round of a worker:
//!
//! 1. finds the live workers (those holding their log's lock) and so the shards it owns;
//! 2. reads each final log file that may hold runs of its shards not merged yet: one it has
//!    never read (it then notes which shards the file holds runs of), or one that holds runs of
//!    an owned shard whose record (`SHARD.json`'s `merged`: per worker, the sequence number up
//!    to which that worker's files are merged) is behind the file;
//! 3. takes the OS locks of the owned shards that have runs to merge (a shard still locked by
//!    its previous owner waits for the next round) and takes their runs;
//! 4. merges each tenant's ids into its set, loaded from its file on first use, and stages the
//!    files that change, with each shard's new record;
//! 5. commits them together ([`Commit`]), appends each changed count to its shard's index of
//!    counts (see [`count_index`]: what listings read), then deletes the log files whose every
//!    shard has merged them.
//!
//! A round touches only the shards that receive items: on a file system without a journal, as
//! here, every file rewritten costs a fresh inode, and the allocator slows down with every
//! inode freed recently.
//!
//! Only the owner holds a shard's sets in memory, so an id is held, and inserted, once in the
//! cluster. Ownership is only an agreement for efficiency: exactness rests on the shard's lock
//! and on the record's `writer`, which every worker sets before it changes a shard it did not
//! change last. A worker whose record is still the shard's knows that nobody changed the shard
//! since, and may trust its sets; any other drops them and reloads. Merging is idempotent (ids
//! form sets), so a crash at any instant costs at most merging some log files again.

mod commit;
mod count_index;
mod idset;
mod names;
mod naming;
mod quarantine;
mod segment_cache;
mod tenant;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use countapp_shared::config::FsyncPolicy;

use hashbrown::{HashMap, HashSet};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{Answer, Count, Scope, TenantPage, TenantSets};
use crate::backoff::Backoff;
use crate::layout::shard_dir;
use crate::log::record::Run;
use crate::log::{self, Contents, LogFile, WorkerLog};
use crate::partition::{owner_of, shard_of};
use crate::{MergeReport, Settings, StoreError};
use crate::{damaged, disk};
use commit::{Commit, Step, is_temporary};
use count_index::{Counts, IndexEnd, Indexes};
use naming::tenant_file_stem;
use quarantine::Quarantine;
use segment_cache::SegmentCache;
use tenant::{Tenant, contains_in, read_all, read_count, stage_delete};

const SHARD_FILE: &str = "SHARD.json";
const LOCK_FILE: &str = "LOCK";
/// Bytes of log a round reads at most; the rest waits for the next round, so that a long
/// backlog (a worker down for hours) is merged in bounded memory.
const MAX_ROUND_INPUT_BYTES: u64 = 512 << 20;
/// Tenants whose files stay open for counts, at most, whatever the process may open: a
/// `POST /counts` of thousands of tenants over a cache smaller than that would open, read and
/// close every one of their files each time. Past it, the cache starts afresh.
const MOST_OPEN_TENANT_FILES: usize = 16_384;
/// The fewest shards, or tenants, worth a thread of their own when a listing reads them.
const FEWEST_PER_THREAD: usize = 64;

/// `SHARD.json`: which log files a shard has merged, and who changed it last.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardRecord {
    /// The process that last changed the shard: a worker id and a random tag of its run.
    writer: String,
    /// Per worker id, the sequence number up to which its log files are merged.
    merged: BTreeMap<String, u64>,
    /// The shard's tenants in quarantine (see [`super::quarantine`]), each with its quarantine
    /// file beside its tenant file, and how many ids it kept as of this record (unknown in a
    /// record of an earlier release, which listed only the names).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "names_or_kept")]
    quarantined: BTreeMap<String, Option<u64>>,
    /// How many commits changed the shard (0 in a record of an earlier release): its index of
    /// counts is current while it ends at this generation (see [`count_index`]).
    #[serde(default)]
    generation: u64,
    /// Rebuilt because the file did not parse (see [`Shards::read_record`]): its owner writes
    /// it again at its next round.
    #[serde(skip)]
    rebuilt: bool,
}

impl ShardRecord {
    fn merged(&self, worker: &str) -> u64 {
        self.merged.get(worker).copied().unwrap_or(0)
    }
}

/// A shard this worker merges into, while it owns it.
struct OwnedShard {
    /// The record as this process last read or wrote it: never ahead of the file.
    record: ShardRecord,
    /// The shard's lock file, open while the shard is this worker's.
    lock: Option<File>,
    /// The large tenants loaded, exactly as their files hold them while `record.writer` is
    /// ours. Small ones are dropped after each round: their file is read again when needed,
    /// which costs less than keeping a million of them.
    tenants: HashMap<String, Tenant>,
    /// The names of the tenant files in the shard's directory (see [`list_tenant_files`]),
    /// listed when the shard was locked first or changed hands, and kept up to date since: a
    /// new tenant needs no look for a file it does not have.
    files: Option<TenantFiles>,
    /// The tenants of `record.quarantined`, read from their quarantine files.
    quarantined: HashMap<String, Quarantine>,
    /// Whether the shard has no list of its tenants' names yet (one written by an earlier
    /// release): the next round writes it (see `names`).
    unnamed: bool,
    /// Whether the shard has tenants but no index of counts current at its record (one of an
    /// earlier release, or left behind by a crash): the next round writes it.
    unindexed: bool,
    /// Where this process left the shard's index of counts.
    index_end: Option<IndexEnd>,
}

/// The shards a log file holds runs of, one bit each.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShardSet(Vec<u64>);

impl ShardSet {
    fn new(shards: u16) -> ShardSet {
        ShardSet(vec![0; usize::from(shards).div_ceil(64)])
    }

    fn insert(&mut self, shard: u16) {
        if let Some(word) = self.0.get_mut(usize::from(shard / 64)) {
            *word |= 1 << (shard % 64);
        }
    }

    fn contains(&self, shard: u16) -> bool {
        self.0.get(usize::from(shard / 64)).is_some_and(|word| word & (1 << (shard % 64)) != 0)
    }

    fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().enumerate().flat_map(|(i, &word)| {
            (0..64u16).filter(move |bit| word & (1 << bit) != 0).map(move |bit| i as u16 * 64 + bit)
        })
    }
}

/// What merge rounds keep from one to the next; only rounds, one at a time, touch it.
#[derive(Default)]
struct MergeState {
    /// The shards this worker owns.
    owned: HashMap<u16, OwnedShard>,
    /// What this process read of each log file, by `(worker, seq)`.
    indexed: Index,
    /// Since when each listed log file has waited, on the monotonic clock: since this process
    /// first listed it, which a running process does within a poll of the file's closing (for
    /// the files there when it started, since their modification time). A step of the wall
    /// clock changes no file's age.
    written: HashMap<(String, u64), Instant>,
    /// Whether a round has listed the logs before.
    listed_before: bool,
    /// Owned shards that an I/O error kept out of a round (their lock, record or directory
    /// unusable), each with when to try again and the wait after that: every other shard
    /// merges on meanwhile.
    failing: HashMap<u16, Backoff>,
    /// Tenants to delete, as a barrier asked (see [`TenantSets::delete_in_round`]): each is
    /// dropped by the round that merges its shard completely.
    deleting: HashSet<String>,
    /// Those of `deleting` that a committed round dropped.
    dropped: HashSet<String>,
}

/// What a round merges from: every worker's log as listed, the files it read, and the shards
/// each file this process read holds runs of.
struct Sources<'a> {
    logs: &'a [WorkerLog],
    inputs: &'a [Input<'a>],
    indexed: &'a Index,
    /// The tenants to delete once their shard has merged every listed file.
    deleting: &'a HashSet<String>,
}

/// What a process read of a log file: the shards it holds runs of, and the file its worker
/// wrote before it, as its header says (none in a file of an earlier release).
struct FileIndex {
    shards: ShardSet,
    prev: Option<u64>,
}

/// What a round's commit changes in a shard, besides its files.
#[derive(Default)]
struct ShardChange {
    /// The tenants deleted.
    dropped: Vec<String>,
    /// The counts of the tenants whose files it writes, `0` for those deleted.
    counts: Vec<(String, u64)>,
}

/// The log files a process read, by `(worker, seq)`.
type Index = HashMap<(String, u64), FileIndex>;

/// The runs a round takes, by shard and tenant.
type ShardRuns<'a> = BTreeMap<u16, HashMap<&'a str, Vec<Run<'a>>>>;

/// A log file read by a round.
struct Input<'a> {
    worker: &'a str,
    file: &'a LogFile,
    data: Contents,
}

/// The shards of one database, as one worker merges and reads them.
pub(crate) struct Shards {
    root: PathBuf,
    shards: u16,
    /// This worker's id: its name among the live workers.
    worker: String,
    /// This run of this worker, as shard records name it.
    writer: String,
    /// Whether merges are made durable before log files are deleted (not under `fsync: never`).
    sync: AtomicBool,
    state: Mutex<MergeState>,
    /// When the oldest log file that holds runs this worker has yet to merge was last written,
    /// if there is one: how far behind this worker's merging is.
    behind_since: Mutex<Option<Instant>>,
    /// Counts read from tenant files, each with its file still open and its length and
    /// modification time then. A tenant file is only ever replaced whole, by a rename that
    /// unlinks the old file: while the open file still has a link and is unchanged (nobody
    /// wrote into it by hand), the count read from it is current, and a count costs one `fstat`.
    counts: Mutex<HashMap<String, (File, Unchanged, u64)>>,
    /// How many tenant files `counts` keeps open, at most (see [`open_tenant_files`]).
    open_tenant_files: usize,
    /// Each shard's names, sorted, as its list was when read; a shard without a list (written by
    /// an earlier release) has its names read every time.
    names: ByVersion<Arc<Vec<String>>>,
    /// Each shard's record as last read: its generation, and whether it lists any tenant in
    /// quarantine (a listing looks for quarantine files only in shards that have some).
    records: ByVersion<RecordSummary>,
    /// The shards' indexes of counts, as last read.
    indexes: Indexes,
    /// The segments membership checks read, kept.
    segments: SegmentCache,
    /// Each shard's directory, held open once it exists (shard directories are never removed),
    /// so that a count opens its tenant's file by name in it.
    dirs: Box<[OnceLock<File>]>,
}

impl Shards {
    /// The shards under `root`, merged as `worker` (whose run `writer` names).
    pub(crate) fn new(root: &Path, shards: u16, worker: &str, writer: String, settings: &Settings) -> Shards {
        Shards {
            root: root.to_path_buf(),
            shards,
            worker: worker.to_owned(),
            writer,
            sync: AtomicBool::new(settings.fsync != FsyncPolicy::Never),
            state: Mutex::new(MergeState::default()),
            behind_since: Mutex::new(None),
            counts: Mutex::new(HashMap::new()),
            open_tenant_files: open_tenant_files(),
            names: ByVersion::default(),
            records: ByVersion::default(),
            indexes: Indexes::new(shards),
            segments: SegmentCache::default(),
            dirs: (0..shards).map(|_| OnceLock::new()).collect(),
        }
    }

    /// `shard`'s directory, held open; `None` while it does not exist.
    fn opened_dir(&self, shard: u16) -> Result<Option<&File>, StoreError> {
        let cell = &self.dirs[usize::from(shard)];
        if cell.get().is_none() {
            match disk::open(&shard_dir(&self.root, shard)) {
                // Another thread may have opened it meanwhile: either handle will do.
                Ok(dir) => drop(cell.set(dir)),
                Err(e) if e.not_found() => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(cell.get())
    }

    /// The tenant's distinct count as of the latest merge by any worker, read from its file (or
    /// the file held open since).
    fn count_file(&self, tenant: &str) -> Result<u64, StoreError> {
        self.read_count_of(tenant, CountRead::Kept)
    }

    /// [`Shards::count_file`], read as `how` says.
    fn read_count_of(&self, tenant: &str, how: CountRead<'_>) -> Result<u64, StoreError> {
        if let Some((file, unchanged, count)) = self.counts.lock().get(tenant)
            && file.metadata().is_ok_and(|m| m.nlink() > 0 && Unchanged::of(&m) == *unchanged)
        {
            return Ok(*count);
        }
        let (shard, path) = self.tenant_path(tenant);
        let Some(dir) = self.opened_dir(shard)? else { return Ok(0) };
        let quarantine = match how {
            CountRead::Listed(quarantines) if !quarantines[usize::from(shard)] => false,
            _ => self.refuse_quarantined(tenant, shard, dir, &path)?,
        };
        let mut file = match disk::open_in(dir, &path) {
            Ok(file) => file,
            Err(e) if e.not_found() => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let (bytes, metadata) = read_all(&mut file, &path)?;
        let count = read_count(&path, &bytes, tenant)?;
        if quarantine || matches!(how, CountRead::Listed(_)) {
            return Ok(count);
        }
        let mut counts = self.counts.lock();
        if counts.len() >= self.open_tenant_files {
            counts.clear();
        }
        counts.insert(tenant.to_owned(), (file, Unchanged::of(&metadata), count));
        Ok(count)
    }

    /// The names of `shard`'s tenants, sorted: from its list, read again when it changed.
    fn shard_names(&self, shard: u16) -> Result<Arc<Vec<String>>, StoreError> {
        let Some(opened) = self.opened_dir(shard)? else { return Ok(Arc::default()) };
        let dir = shard_dir(&self.root, shard);
        self.names.get(shard, opened, &dir.join(names::NAMES_FILE), || {
            Ok(Arc::new(names::read(&dir)?.0.into_iter().collect()))
        })
    }

    /// What a listing needs of `shard`'s record: read again only when it changed.
    fn record_summary(&self, shard: u16) -> Result<RecordSummary, StoreError> {
        let Some(dir) = self.opened_dir(shard)? else { return Ok(RecordSummary::default()) };
        let path = shard_dir(&self.root, shard).join(SHARD_FILE);
        self.records.get(shard, dir, &path, || {
            let record = self.read_record(shard)?;
            Ok(RecordSummary { generation: record.generation, quarantines: !record.quarantined.is_empty() })
        })
    }

    /// `shard`'s tenants for a listing, and whether its record lists any in quarantine: from its
    /// index of counts where that is whole and nobody is in quarantine (a quarantined tenant lists
    /// its error, which only its files tell), by name otherwise. A record that cannot be read has
    /// every tenant look for a quarantine file of its own.
    fn shard_list(&self, shard: u16) -> Result<(ShardList, bool), StoreError> {
        let summary = self.record_summary(shard).unwrap_or(RecordSummary { generation: 0, quarantines: true });
        if !summary.quarantines
            && let Some(dir) = self.opened_dir(shard)?
        {
            match self.indexes.whole_at(shard, dir, &shard_dir(&self.root, shard), summary.generation) {
                Ok(Some(counts)) => return Ok((ShardList::Counted(counts), false)),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(shard, error = %e, "cannot read a shard's index of counts: its tenant files are read")
                }
            }
        }
        Ok((ShardList::Named(self.shard_names(shard)?), summary.quarantines))
    }

    /// A page of the tenants (see [`TenantSets::list`]): the shards' sorted lists merged, from
    /// the first name past `after` that `prefix` allows.
    fn list_names(&self, prefix: &str, after: &str, limit: usize) -> Result<TenantPage, StoreError> {
        // Each shard's list, and where the page starts in it (a binary search of thousands of
        // names, a cache miss at each step).
        let shards: Vec<u16> = (0..self.shards).collect();
        let read = in_parallel(&shards, FEWEST_PER_THREAD, |&shard| {
            let (list, quarantines) = self.shard_list(shard)?;
            let at = list.start(prefix, after);
            Ok::<_, StoreError>(((list, at), quarantines))
        });
        let (lists, quarantines): (Vec<_>, Vec<bool>) =
            read.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().unzip();
        let how = CountRead::Listed(&quarantines);
        let mut heap = BinaryHeap::new();
        for (list, (names, at)) in lists.iter().enumerate() {
            if let Some(name) = names.name(*at) {
                heap.push(Reverse((name, list, *at)));
            }
        }
        let lists: Vec<&ShardList> = lists.iter().map(|(list, _)| list).collect();
        let mut page = TenantPage::default();
        // Names are taken a page's worth at a time and counted together; a name that counts
        // nothing (deleted, or named by a round that failed) leaves room for more.
        while page.tenants.len() < limit {
            let mut names = Vec::with_capacity(limit - page.tenants.len());
            while names.len() < limit - page.tenants.len()
                && let Some(Reverse((name, list, at))) = heap.pop()
            {
                if !name.starts_with(prefix) {
                    heap.clear();
                    break;
                }
                if let Some(next) = lists[list].name(at + 1) {
                    heap.push(Reverse((next, list, at + 1)));
                }
                names.push((name, list, at));
            }
            if names.is_empty() {
                break;
            }
            // The names of shards without an index are counted from their files, in parallel:
            // a thousand files to open would be most of a page's time.
            let unindexed: Vec<&str> = names
                .iter()
                .filter(|(_, list, _)| matches!(lists[*list], ShardList::Named(_)))
                .map(|(name, ..)| *name)
                .collect();
            let mut read =
                in_parallel(&unindexed, FEWEST_PER_THREAD, |tenant| self.read_count_of(tenant, how)).into_iter();
            for (name, list, at) in names {
                let count = match lists[list].count(at) {
                    Some(count) => Ok(count),
                    None => read.next().expect("a count read for each name without an index"),
                };
                if !matches!(count, Ok(0)) {
                    page.tenants.push((name.to_owned(), count.map_err(|e| e.to_string())));
                }
            }
        }
        if heap.peek().is_some_and(|Reverse((name, ..))| name.starts_with(prefix)) {
            page.next = page.tenants.last().map(|(tenant, _)| tenant.clone());
        }
        Ok(page)
    }

    /// Whether each of `ids` is in `tenant`'s set as its files hold it; an error for a tenant in
    /// quarantine, as for its count.
    fn contains_in_files(&self, tenant: &str, ids: &[String]) -> Result<Vec<bool>, StoreError> {
        let (shard, path) = self.tenant_path(tenant);
        let Some(dir) = self.opened_dir(shard)? else { return Ok(vec![false; ids.len()]) };
        self.refuse_quarantined(tenant, shard, dir, &path)?;
        contains_in(&path, tenant, ids, &self.segments)
    }

    /// `tenant`'s shard, and its file there.
    fn tenant_path(&self, tenant: &str) -> (u16, PathBuf) {
        let shard = shard_of(tenant, self.shards);
        (shard, shard_dir(&self.root, shard).join(tenant_file_name(tenant)))
    }

    /// The error a read of a tenant in quarantine gets; whether a quarantine file lies beside
    /// the tenant's file at `path` all the same.
    ///
    /// A quarantine file counts only while the shard's record lists it: one left behind by a
    /// crash after a repair's commit is stale, and its tenant's file is whole again. Nor is a
    /// count cached while there is one, since the record lists a new quarantine only after its
    /// tenant's file was replaced to make the cached counts go stale.
    fn refuse_quarantined(&self, tenant: &str, shard: u16, dir: &File, path: &Path) -> Result<bool, StoreError> {
        let quarantine = Quarantine::read_head(tenant, dir, path)?;
        if let Some((file, reason)) = &quarantine
            && self.read_record(shard)?.quarantined.contains_key(tenant)
        {
            return Err(StoreError::Quarantined {
                tenant: tenant.to_owned(),
                file: file.clone(),
                reason: reason.clone(),
            });
        }
        Ok(quarantine.is_some())
    }

    /// Reads the final log files that may hold runs of owned shards not merged yet (see
    /// [`wanted`]), and indexes the files this process never read.
    fn read_inputs<'a>(
        &self,
        logs: &'a [WorkerLog],
        owned: &HashMap<u16, OwnedShard>,
        indexed: &mut Index,
        scope: Scope<'_>,
        report: &mut MergeReport,
    ) -> Result<Vec<Input<'a>>, StoreError> {
        let mut budget = MAX_ROUND_INPUT_BYTES;
        let mut inputs = Vec::new();
        'workers: for log in logs {
            for file in &log.inputs {
                if !wanted(&log.worker, file, owned, indexed, scope) {
                    continue;
                }
                let key = (log.worker.clone(), file.seq);
                if budget == 0 {
                    break 'workers;
                }
                // Gone: renamed by its restarted worker, or merged and deleted. Looked at again
                // next round.
                let Some(data) = Contents::read(&file.path)? else { continue 'workers };
                budget = budget.saturating_sub(data.len());
                if !indexed.contains_key(&key) {
                    indexed.insert(key, self.index(file, &data, report));
                }
                report.log_files += 1;
                inputs.push(Input { worker: &log.worker, file, data });
            }
        }
        Ok(inputs)
    }

    /// What the log file `file` holds: the shards it holds runs of, and the file before it;
    /// reports the damage found in it.
    fn index(&self, file: &LogFile, data: &Contents, report: &mut MergeReport) -> FileIndex {
        let mut shards = ShardSet::new(self.shards);
        report.add_damage(data.scan(&self.root, &file.path, |run| shards.insert(run.shard)));
        FileIndex { shards, prev: data.prev() }
    }

    /// Merges the runs of the shards `with_runs` in `inputs`, and commits. Each shard's change
    /// is staged on its own: a shard whose files fail is left out of the commit (and out of
    /// rounds for a while), and every other shard merges on.
    fn merge(
        &self,
        with_runs: &BTreeSet<u16>,
        sources: &Sources,
        owned: &mut HashMap<u16, OwnedShard>,
        failing: &mut HashMap<u16, Backoff>,
        report: &mut MergeReport,
    ) -> Result<Vec<String>, StoreError> {
        let mut runs = self.runs_of(with_runs, sources, owned, report);
        let mut commit = Commit::new(self.sync.load(Ordering::Relaxed));
        let mut merged = Vec::new();
        for &shard in with_runs {
            let state = owned.get_mut(&shard).expect("shards with runs are owned");
            let mut staged = commit.nested();
            let done = self.lock_shard(shard, state, &mut staged, report).and_then(|record| match record {
                Some(mut record) => {
                    let tenants = runs.remove(&shard).unwrap_or_default();
                    let change = self.merge_shard(shard, &mut record, state, &tenants, sources, &mut staged, report)?;
                    Ok(Some((record, change)))
                }
                None => Ok(None),
            });
            match done {
                Ok(Some((record, change))) => {
                    failing.remove(&shard);
                    commit.absorb(staged);
                    merged.push((shard, record, change));
                }
                Ok(None) => {}
                Err(e) => {
                    // Its sets may disagree with its files now: they are read again later.
                    staged.discard();
                    owned.remove(&shard);
                    shard_failed(shard, &e, failing, report);
                }
            }
        }
        report.written_bytes += commit.written_bytes();
        let committed = commit.finish(&self.root);
        let mut gone = Vec::new();
        for (shard, record, ShardChange { dropped, counts }) in merged {
            let state = owned.get_mut(&shard).expect("merged shards are owned");
            // Before the shard's lock goes: its index has one writer at a time, as its files do.
            if committed.is_ok() {
                self.update_index(shard, &record, state, counts);
            }
            if let Some(lock) = &state.lock {
                let _ = lock.unlock();
            }
            if committed.is_ok() {
                state.record = record;
                state.tenants.retain(|_, tenant| !tenant.is_small());
                for tenant in &dropped {
                    state.tenants.remove(tenant);
                    state.quarantined.remove(tenant);
                    if let Some(files) = &mut state.files {
                        files.remove(&tenant_file_name(tenant));
                    }
                }
                report.deleted_tenants += dropped.len() as u64;
                gone.extend(dropped);
            }
        }
        committed?;
        Ok(gone)
    }

    /// The runs of the shards `with_runs` in `inputs` that their records have not merged, by
    /// shard and tenant.
    fn runs_of<'a>(
        &self,
        with_runs: &BTreeSet<u16>,
        sources: &Sources<'a>,
        owned: &HashMap<u16, OwnedShard>,
        report: &mut MergeReport,
    ) -> ShardRuns<'a> {
        let mut runs: ShardRuns = BTreeMap::new();
        for input in sources.inputs {
            for run in input.data.runs().filter(|run| with_runs.contains(&run.shard)) {
                let record = &owned.get(&run.shard).expect("shards with runs are owned").record;
                if input.file.seq > record.merged(input.worker) {
                    report.items += run.count_ids();
                    runs.entry(run.shard).or_default().entry(run.tenant).or_default().push(run);
                }
            }
        }
        runs
    }

    /// Takes the lock of `shard` and reads its record, claiming the shard (in `commit`) if
    /// another process changed it last; `None` if another worker holds the lock.
    fn lock_shard(
        &self,
        shard: u16,
        state: &mut OwnedShard,
        commit: &mut Commit,
        report: &mut MergeReport,
    ) -> Result<Option<ShardRecord>, StoreError> {
        let dir = shard_dir(&self.root, shard);
        let first_time = state.lock.is_none();
        if first_time {
            state.lock = Some(open_lock(&dir)?);
        }
        if !disk::try_lock(state.lock.as_ref().expect("opened above"), &dir.join(LOCK_FILE))? {
            tracing::debug!(shard, "shard busy; left for the next round");
            report.busy_shards += 1;
            return Ok(None);
        }
        // The first time this worker holds the shard, it removes what an unfinished merge may
        // have left.
        if first_time {
            remove_temporaries(&dir)?;
        }
        let record = self.read_record(shard)?;
        if first_time {
            remove_stale_quarantines(&dir, &record)?;
        }
        if record.rebuilt {
            // Its generations start again: an index at one of them would pass for current.
            count_index::remove(&dir)?;
            damaged::keep_aside(
                &self.root,
                &dir.join(SHARD_FILE),
                &format!("shard-{shard:03}-{SHARD_FILE}-{}", unix_ms()),
            );
            report.rebuilt_records += 1;
        }
        if record.writer != self.writer {
            // Changed by another process since this one last wrote it, or never by this one:
            // claim it before changing anything, and reload its tenants.
            state.tenants.clear();
            state.files = None;
            state.quarantined.clear();
            state.index_end = None;
            let claim = ShardRecord { writer: self.writer.clone(), rebuilt: false, ..record.clone() };
            self.stage_record(commit, Step::Claim, shard, &claim)?;
        }
        Ok(Some(record))
    }

    /// Merges the runs `tenants` into the locked shard `shard`, whose record is `record`,
    /// staging its files and its record (one generation on) in `commit`.
    #[allow(clippy::too_many_arguments)]
    fn merge_shard(
        &self,
        shard: u16,
        record: &mut ShardRecord,
        state: &mut OwnedShard,
        tenants: &HashMap<&str, Vec<Run>>,
        sources: &Sources,
        commit: &mut Commit,
        report: &mut MergeReport,
    ) -> Result<ShardChange, StoreError> {
        let mut change = ShardChange::default();
        let dir = shard_dir(&self.root, shard);
        // The shard's list of names, where this round writes it whole: a shard that has none
        // yet, or one losing a tenant. Otherwise a new tenant's name is appended.
        let mut rewrite = if state.unnamed { Some(names::read(&dir)?.0) } else { None };
        // The lines of the tenants new to the shard, appended to its list in one write.
        let mut named = Vec::new();
        state.unnamed = false;
        state.unindexed = false;
        // A repaired tenant may have had no file before (quarantined at its first merge): it is
        // named with its file like a new one, a line too many for one that had (which readers
        // take once).
        let repaired = self.retry_quarantined(shard, record, state, tenants, commit, report)?;
        for (name, count) in &repaired {
            match &mut rewrite {
                Some(listed) => drop(listed.insert(name.clone())),
                None => named.extend_from_slice(&names::line(name)),
            }
            change.counts.push((name.clone(), *count));
        }
        for (name, runs) in tenants.iter().filter(|(name, _)| !repaired.iter().any(|(r, _)| r == *name)) {
            let file_name = tenant_file_name(name);
            let path = dir.join(&file_name);
            let ids = || runs.iter().flat_map(Run::ids);
            if let Some(quarantine) = state.quarantined.get_mut(*name) {
                quarantine.keep(ids(), commit)?;
                continue;
            }
            let mut staged = commit.nested();
            let files = match &mut state.files {
                Some(files) => Ok(files),
                files => list_tenant_files(&dir).map(|listed| files.insert(listed)),
            };
            let merged = files.and_then(|files| match state.tenants.entry_ref(*name) {
                hashbrown::hash_map::EntryRef::Occupied(entry) => Ok(entry.into_mut()),
                hashbrown::hash_map::EntryRef::Vacant(entry) if files.contains_key(&file_name) => {
                    Tenant::load(path.clone(), name).map(|tenant| entry.insert(tenant))
                }
                hashbrown::hash_map::EntryRef::Vacant(entry) => Ok(entry.insert(Tenant::new(path.clone()))),
            });
            match merged.and_then(|tenant| tenant.merge(name, ids(), &mut staged).map(|new| (new, tenant.count()))) {
                Ok((new, count)) => {
                    commit.absorb(staged);
                    change.counts.push(((*name).to_owned(), count));
                    report.new_ids += new;
                    report.tenants += 1;
                    if let Some(files) = &mut state.files
                        && files.insert(file_name, true) != Some(true)
                    {
                        // Its first file: named in the shard's list before the file is in place.
                        match &mut rewrite {
                            Some(listed) => drop(listed.insert((*name).to_owned())),
                            None => named.extend_from_slice(&names::line(name)),
                        }
                    }
                }
                Err(e) => {
                    // This tenant alone is set apart; its ids are kept, and the round goes on.
                    staged.discard();
                    state.tenants.remove(*name);
                    let mut quarantine = Quarantine::new(name, &path, &e);
                    tracing::error!(tenant = name, file = %quarantine.file().display(), error = %e, "tenant quarantined; its new ids are kept until it is repaired");
                    quarantine.keep(ids(), commit)?;
                    invalidate_cached_counts(&path, quarantine.file(), commit);
                    state.quarantined.insert((*name).to_owned(), quarantine);
                    record.quarantined.insert((*name).to_owned(), None);
                }
            }
        }
        if !named.is_empty() {
            commit.append(&dir.join(names::NAMES_FILE), &named)?;
        }
        for (name, kept) in record.quarantined.iter_mut() {
            *kept = state.quarantined.get(name).map(Quarantine::kept_count);
        }
        // The record moves past every file the shard has now merged: those read this round,
        // and those known to hold none of its runs. It stops at a file of a live worker that
        // is not final yet, and at a file whose predecessor exists but escaped the listing (a
        // listing may miss a file renamed while it runs).
        record.writer = self.writer.clone();
        record.rebuilt = false;
        for log in sources.logs {
            let from = record.merged(&log.worker);
            let mut upto = from;
            for file in log.inputs.iter().filter(|f| f.seq > from) {
                if log.unfinished.is_some_and(|unfinished| unfinished < file.seq) {
                    break;
                }
                let index = sources.indexed.get(&(log.worker.clone(), file.seq));
                let read = sources.inputs.iter().any(|i| i.worker == log.worker && i.file.seq == file.seq);
                let without = index.is_some_and(|index| !index.shards.contains(shard));
                let missed = index.and_then(|index| index.prev).is_some_and(|prev| prev > upto && log.has_file(prev));
                if !(read || without) || missed {
                    break;
                }
                upto = file.seq;
            }
            if upto > from {
                record.merged.insert(log.worker.clone(), upto);
            }
        }
        // A worker gone for good (dead, none of its files left, its numbers reserved past what
        // the record says) is forgotten: it would start above them, should it come back.
        record.merged.retain(|worker, merged| {
            let gone = sources.logs.iter().find(|log| log.worker == *worker).is_some_and(|log| {
                !log.live && log.inputs.is_empty() && log::reserved(&log.dir).is_ok_and(|reserved| reserved > *merged)
            });
            !gone
        });
        // A tenant to delete goes once every acknowledged item of it that a listed file holds
        // is merged: a file left for the next round would bring some of its ids back.
        let dropped = &mut change.dropped;
        if merged_every_listed(shard, record, sources.logs, sources.indexed) {
            for tenant in sources.deleting.iter().filter(|t| shard_of(t, self.shards) == shard) {
                let path = dir.join(tenant_file_name(tenant));
                stage_delete(commit, &path, tenant)?;
                if record.quarantined.remove(tenant).is_some() {
                    commit.remove_after(Quarantine::path_of(&path));
                }
                dropped.push(tenant.clone());
                change.counts.push((tenant.clone(), 0));
            }
        }
        if !dropped.is_empty() && rewrite.is_none() {
            rewrite = Some(names::read(&dir)?.0);
        }
        if let Some(mut listed) = rewrite {
            listed.retain(|name| !dropped.contains(name));
            names::stage(commit, &dir, &listed)?;
        }
        record.generation += 1;
        self.stage_record(commit, Step::Progress, shard, record)?;
        Ok(change)
    }

    /// Tries again each quarantined tenant of a locked shard that is due (see
    /// [`Quarantine::due`]): one that loads now takes the ids kept for it and its runs of this
    /// round, `tenants`, in one merge (a second merge in the same round would look for the
    /// segments the first only staged), and leaves quarantine. Returns those repaired, each
    /// with its count.
    fn retry_quarantined(
        &self,
        shard: u16,
        record: &mut ShardRecord,
        state: &mut OwnedShard,
        tenants: &HashMap<&str, Vec<Run>>,
        commit: &mut Commit,
        report: &mut MergeReport,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let dir = shard_dir(&self.root, shard);
        load_quarantined(&record.quarantined, &mut state.quarantined, &dir, &self.root)?;
        let mut repaired = Vec::new();
        for (name, quarantine) in state.quarantined.iter_mut().filter(|(_, q)| q.due()) {
            let path = dir.join(tenant_file_name(name));
            let mut staged = commit.nested();
            let runs = tenants.get(name.as_str()).into_iter().flatten().flat_map(Run::ids);
            let loaded = Tenant::load(path.clone(), name).and_then(|mut tenant| {
                tenant.merge(name, quarantine.kept().chain(runs), &mut staged).map(|new| (tenant, new))
            });
            match loaded {
                Ok((tenant, new)) => {
                    commit.absorb(staged);
                    tracing::info!(
                        tenant = name,
                        kept_ids = quarantine.kept_count(),
                        new_ids = new,
                        "tenant repaired: out of quarantine"
                    );
                    report.new_ids += new;
                    report.tenants += u64::from(tenants.contains_key(name.as_str()));
                    commit.remove_after(Quarantine::path_of(&path));
                    repaired.push((name.clone(), tenant.count()));
                    state.tenants.insert(name.clone(), tenant);
                    if let Some(files) = &mut state.files {
                        files.insert(tenant_file_name(name), true);
                    }
                }
                Err(e) => {
                    staged.discard();
                    tracing::warn!(tenant = name, error = %e, "quarantined tenant still cannot be read");
                    quarantine.failed(&e);
                    quarantine.keep([], commit)?;
                }
            }
        }
        for (name, _) in &repaired {
            record.quarantined.remove(name);
            state.quarantined.remove(name);
        }
        state.quarantined.retain(|name, _| record.quarantined.contains_key(name));
        Ok(repaired)
    }

    /// Deletes the listed log files that every shard they hold runs of has merged, and the
    /// files of dead workers that hold no runs (their numbers stay reserved, see
    /// [`log::retire`]). A file that cannot be deleted now is left for a later round. An owned
    /// shard whose record is found damaged is flagged for its rewrite at the next round.
    fn collect_garbage(
        &self,
        logs: &[WorkerLog],
        indexed: &Index,
        owned: &mut HashMap<u16, OwnedShard>,
        report: &mut MergeReport,
    ) -> Result<(), StoreError> {
        let mut records: HashMap<u16, ShardRecord> = HashMap::new();
        for log in logs {
            for file in &log.inputs {
                let Some(set) = indexed.get(&(log.worker.clone(), file.seq)).map(|index| &index.shards) else {
                    continue;
                };
                if set.iter().next().is_none() {
                    if !log.live {
                        match log::retire(&log.dir, file) {
                            Ok(true) => report.deleted_files += 1,
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(file = %file.path.display(), error = %e, "cannot delete an empty log file of a dead worker")
                            }
                        }
                    }
                    continue;
                }
                let mut merged_by_all = true;
                for shard in set.iter() {
                    if !records.contains_key(&shard) {
                        // A record that cannot be read holds on to every file: none is known
                        // to be merged into its shard.
                        let record = self.read_record(shard).unwrap_or_default();
                        if let Some(state) = owned.get_mut(&shard).filter(|_| record.rebuilt) {
                            state.record.rebuilt = true;
                        }
                        records.insert(shard, record);
                    }
                    merged_by_all &= records[&shard].merged(&log.worker) >= file.seq;
                }
                if !merged_by_all {
                    continue;
                }
                match log::delete_taken(file) {
                    Ok(removed) => report.deleted_files += u64::from(removed),
                    Err(e) => tracing::warn!(error = %e, "cannot delete a merged log file; tried again later"),
                }
            }
        }
        Ok(())
    }

    /// The shard's record; an empty one if the shard was never merged into.
    ///
    /// A record that does not parse is damage (records are only ever replaced whole), and it
    /// is rebuilt from what the shard's directory and the logs still hold: no log file counts
    /// as merged into the shard, so that every one still present is merged again (merging is
    /// idempotent), and the tenants in quarantine are those with a quarantine file.
    fn read_record(&self, shard: u16) -> Result<ShardRecord, StoreError> {
        let dir = shard_dir(&self.root, shard);
        let path = dir.join(SHARD_FILE);
        let bytes = match disk::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.not_found() => return Ok(ShardRecord::default()),
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice(&bytes) {
            Ok(record) => Ok(record),
            Err(e) => {
                tracing::error!(
                    shard,
                    file = %path.display(),
                    error = %e,
                    "shard record damaged: rebuilt; the shard's log files still present are merged again"
                );
                let quarantined = Quarantine::tenants_in(&dir)?.into_iter().map(|tenant| (tenant, None)).collect();
                Ok(ShardRecord { quarantined, rebuilt: true, ..ShardRecord::default() })
            }
        }
    }

    /// Brings `shard`'s index of counts up to its commit at `record`, the shard still locked, with
    /// the counts it changed (see [`count_index`]). An index that falls behind only sends
    /// listings to the tenant files until a later commit writes it anew: logged, not failed.
    fn update_index(&self, shard: u16, record: &ShardRecord, state: &mut OwnedShard, counts: Vec<(String, u64)>) {
        let dir = shard_dir(&self.root, shard);
        let update =
            count_index::Update { dir: &dir, before: record.generation - 1, after: record.generation, changes: counts };
        if let Err(e) = update.apply(&mut state.index_end, |changed| recount(&dir, record, changed)) {
            tracing::warn!(shard, error = %e, "cannot bring a shard's index of counts up to date: listings read its tenant files meanwhile");
        }
    }

    fn stage_record(
        &self,
        commit: &mut Commit,
        step: Step,
        shard: u16,
        record: &ShardRecord,
    ) -> Result<(), StoreError> {
        let path = shard_dir(&self.root, shard).join(SHARD_FILE);
        let bytes = serde_json::to_vec(record).expect("a shard record serializes");
        Ok(commit.write(step, &path, &bytes)?)
    }
}

/// The count of `tenant` in the JSON sets of the database at `root`, of `shards` shards, read
/// from its file without a worker: for tools and tests, which must not count as a live worker.
pub(crate) fn count_in(root: &Path, shards: u16, tenant: &str) -> Result<u64, StoreError> {
    Shards::new(root, shards, "reader", String::new(), &Settings::default()).count_file(tenant)
}

impl TenantSets for Shards {
    /// The highest sequence number any shard records as merged from `worker`'s log: a worker
    /// must number its new files above it, or they would count as merged already.
    fn highest_merged(&self, worker: &str) -> u64 {
        let mut highest = 0;
        for shard in 0..self.shards {
            match self.read_record(shard) {
                Ok(record) => highest = highest.max(record.merged(worker)),
                Err(e) => tracing::warn!(shard, error = %e, "cannot read a shard's record at start"),
            }
        }
        highest
    }

    /// Whether a round should run though no log file came or went: a quarantined tenant's
    /// files changed since it was last tried, a shard that failed is due for another try, or
    /// an owned shard's record was found damaged.
    fn round_due(&self) -> bool {
        let mut state = self.state.lock();
        let root = &self.root;
        state.failing.values().any(Backoff::due)
            || state.owned.values().any(|owned| owned.record.rebuilt)
            || state.owned.iter_mut().any(|(&shard, owned)| quarantine_due(shard, owned, root).unwrap_or(true))
    }

    /// One merge round over the logs `logs` (see the module documentation).
    fn merge(&self, logs: &[WorkerLog], scope: Scope<'_>, report: &mut MergeReport) -> Result<(), StoreError> {
        let live: Vec<&str> = logs.iter().filter(|l| l.live).map(|l| l.worker.as_str()).collect();
        let mut state = self.state.lock();
        let MergeState { owned, indexed, written, listed_before, failing, deleting, dropped } = &mut *state;
        owned.retain(|shard, _| owner_of(*shard, live.iter().copied()) == Some(&self.worker));
        failing.retain(|shard, _| owner_of(*shard, live.iter().copied()) == Some(&self.worker));
        for shard in (0..self.shards).filter(|&s| owner_of(s, live.iter().copied()) == Some(&self.worker)) {
            if !owned.contains_key(&shard) {
                if failing.get(&shard).is_some_and(|b| !b.due()) {
                    continue;
                }
                let record = match self.read_record(shard) {
                    Ok(record) => record,
                    Err(e) => {
                        shard_failed(shard, &e, failing, report);
                        continue;
                    }
                };
                let dir = shard_dir(&self.root, shard);
                let unnamed = names::missing(&dir);
                let unindexed = dir.join(names::NAMES_FILE).exists() && !count_index::ends_at(&dir, record.generation);
                owned.insert(
                    shard,
                    OwnedShard {
                        record,
                        lock: None,
                        tenants: HashMap::new(),
                        files: None,
                        quarantined: HashMap::new(),
                        unnamed,
                        unindexed,
                        index_end: None,
                    },
                );
            }
        }
        let listed = |(worker, seq): &(String, u64)| {
            logs.iter().any(|l| l.worker == *worker && l.inputs.iter().any(|f| f.seq == *seq))
        };
        indexed.retain(|key, _| listed(key));
        written.retain(|key, _| listed(key));
        for log in logs {
            for file in &log.inputs {
                written.entry((log.worker.clone(), file.seq)).or_insert_with(|| {
                    let age = match listed_before {
                        true => Duration::ZERO,
                        false => SystemTime::now().duration_since(file.modified).unwrap_or_default(),
                    };
                    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
                });
            }
        }
        *listed_before = true;

        *self.behind_since.lock() = oldest_wanted(logs, owned, indexed, written, failing);
        let inputs = self.read_inputs(logs, owned, indexed, scope, report)?;
        let mut with_runs = BTreeSet::new();
        for input in &inputs {
            for shard in indexed[&(input.worker.to_owned(), input.file.seq)].shards.iter() {
                if owned.get(&shard).is_some_and(|o| input.file.seq > o.record.merged(input.worker)) {
                    with_runs.insert(shard);
                }
            }
        }
        for (&shard, state) in owned.iter_mut() {
            if state.record.rebuilt || state.unnamed || state.unindexed || quarantine_due(shard, state, &self.root)? {
                with_runs.insert(shard);
            }
        }
        with_runs.extend(
            deleting.iter().map(|tenant| shard_of(tenant, self.shards)).filter(|shard| owned.contains_key(shard)),
        );
        with_runs.retain(|shard| scope.covers(*shard) && failing.get(shard).is_none_or(Backoff::due));
        if !with_runs.is_empty() {
            let sources = Sources { logs, inputs: &inputs, indexed, deleting };
            let result = self.merge(&with_runs, &sources, owned, failing, report).map(|gone| dropped.extend(gone));
            if result.is_err() {
                // Whatever failed, the sets may now disagree with the files: reload them next time.
                for shard in &with_runs {
                    owned.remove(shard);
                }
            }
            result?;
        }
        // What is left: runs of shards that were busy, or files past the round's budget.
        *self.behind_since.lock() = oldest_wanted(logs, owned, indexed, written, failing);
        self.collect_garbage(logs, indexed, owned, report)
    }

    fn count(&self, tenant: &str) -> Count<'_> {
        Count::Now(self.count_file(tenant))
    }

    fn count_blocking(&self, tenant: &str) -> Result<u64, StoreError> {
        self.count_file(tenant)
    }

    fn counts<'a>(&'a self, tenants: &'a [String]) -> Answer<'a, Vec<u64>> {
        Answer::Now(tenants.iter().map(|tenant| self.count_file(tenant)).collect())
    }

    fn contains<'a>(&'a self, tenant: &'a str, ids: &'a [String]) -> Answer<'a, Vec<bool>> {
        Answer::Now(self.contains_in_files(tenant, ids))
    }

    fn list<'a>(&'a self, prefix: &'a str, after: &'a str, limit: usize) -> Answer<'a, TenantPage> {
        Answer::Now(self.list_names(prefix, after, limit))
    }

    fn reads_files(&self) -> bool {
        true
    }

    /// The shards among `shards` that this worker owns and whose runs in every listed final
    /// file its record shows merged: a file this process has not read yet may hold some.
    fn settled(&self, logs: &[WorkerLog], shards: &[u16]) -> Vec<u16> {
        let state = self.state.lock();
        let settled = |&shard: &u16| {
            !state.failing.contains_key(&shard)
                && state
                    .owned
                    .get(&shard)
                    .is_some_and(|owned| merged_every_listed(shard, &owned.record, logs, &state.indexed))
        };
        shards.iter().copied().filter(settled).collect()
    }

    /// Asks the next round to delete `tenants` in the shards this worker owns.
    fn delete_in_round(&self, tenants: &[String]) {
        let mut state = self.state.lock();
        state.deleting = tenants.iter().cloned().collect();
        state.dropped.clear();
    }

    /// Those of `tenants` whose deletion this worker's round committed; the rest it does not
    /// own, or could not merge completely yet.
    fn deleted(&self, tenants: &[String]) -> Result<Vec<String>, StoreError> {
        let mut state = self.state.lock();
        let done = tenants.iter().filter(|t| state.dropped.contains(*t)).cloned().collect();
        state.deleting.clear();
        Ok(done)
    }

    /// The owner of a shard merges every worker's runs of it.
    fn vouches_for_every_writer(&self) -> bool {
        true
    }

    /// How long this worker's merging is behind: since the oldest log file with runs it has
    /// yet to merge was written.
    fn merge_lag(&self) -> Duration {
        self.behind_since.lock().map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// Ids this worker holds in memory, and their resident bytes, about.
    fn ids_in_memory(&self) -> (u64, u64) {
        let state = self.state.lock();
        let tenants = state.owned.values().flat_map(|s| s.tenants.values());
        tenants.fold((0, 0), |(ids, bytes), t| (ids + t.count(), bytes + t.heap_bytes() as u64))
    }

    /// The tenants in quarantine in the shards this worker owns.
    fn quarantined(&self) -> Vec<crate::QuarantinedTenant> {
        let state = self.state.lock();
        state.owned.values().flat_map(|s| s.quarantined.values().map(Quarantine::summary)).collect()
    }

    fn apply(&self, settings: &Settings) {
        // Under `fsync: never`, merges are not made durable before log files are deleted either.
        self.sync.store(settings.fsync != FsyncPolicy::Never, Ordering::Relaxed);
    }
}

/// Whether `record` shows every listed final file that holds runs of `shard` merged; a file this
/// process has not read yet may hold some.
fn merged_every_listed(shard: u16, record: &ShardRecord, logs: &[WorkerLog], indexed: &Index) -> bool {
    logs.iter().all(|log| {
        log.inputs.iter().all(|file| match indexed.get(&(log.worker.clone(), file.seq)) {
            Some(index) => !index.shards.contains(shard) || file.seq <= record.merged(&log.worker),
            None => false,
        })
    })
}

/// Whether the log file `file` of `worker` may hold runs of owned shards not merged yet: this
/// process never read it, or it holds runs of an owned shard whose record is behind it.
fn wanted(worker: &str, file: &LogFile, owned: &HashMap<u16, OwnedShard>, indexed: &Index, scope: Scope<'_>) -> bool {
    indexed.get(&(worker.to_owned(), file.seq)).is_none_or(|index| {
        index
            .shards
            .iter()
            .any(|s| scope.covers(s) && owned.get(&s).is_some_and(|o| file.seq > o.record.merged(worker)))
    })
}

/// When the oldest log file was last written that holds runs this worker has yet to merge:
/// runs of owned shards not merged yet, or of owned shards left out of rounds by a failure.
fn oldest_wanted(
    logs: &[WorkerLog],
    owned: &HashMap<u16, OwnedShard>,
    indexed: &Index,
    written: &HashMap<(String, u64), Instant>,
    failing: &HashMap<u16, Backoff>,
) -> Option<Instant> {
    let stuck = |worker: &str, file: &LogFile| {
        indexed
            .get(&(worker.to_owned(), file.seq))
            .is_some_and(|index| index.shards.iter().any(|s| failing.contains_key(&s)))
    };
    let wanted = logs.iter().flat_map(|l| {
        let worker = l.worker.as_str();
        l.inputs
            .iter()
            .filter(move |f| wanted(worker, f, owned, indexed, Scope::All) || stuck(worker, f))
            .map(move |f| (worker, f.seq))
    });
    wanted.filter_map(|(worker, seq)| written.get(&(worker.to_owned(), seq)).copied()).min()
}

/// The name of `tenant`'s file in its shard's directory.
fn tenant_file_name(tenant: &str) -> String {
    format!("{}.json", tenant_file_stem(tenant))
}

/// The tenant files of a shard by name, each with whether the file exists (`false`: only the
/// tenant's directory of segments does).
pub(super) type TenantFiles = HashMap<String, bool>;

/// The names of the tenant files in the shard directory `dir`, with those of tenants that have
/// a directory of segments but no file: its manifest is to be rebuilt (it was lost), or written
/// for the first time (the tenant's first merge failed after its first segment), and in either
/// case the tenant is named in the shard's list with it.
pub(super) fn list_tenant_files(dir: &Path) -> Result<TenantFiles, StoreError> {
    let mut files = TenantFiles::new();
    for entry in disk::entries(dir)? {
        let Ok(name) = entry.file_name().into_string() else { continue };
        if name.ends_with(".json") && name != SHARD_FILE {
            files.insert(name, true);
        } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
            files.entry(format!("{name}.json")).or_insert(false);
        }
    }
    Ok(files)
}

/// How many tenant files counts keep open, at most: a quarter of the descriptors the process
/// may open (the server takes up to half of them for connections, and the log, the shards and
/// the connections to other workers need the rest), up to [`MOST_OPEN_TENANT_FILES`].
fn open_tenant_files() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 1024, rlim_max: 1024 };
    // SAFETY: getrlimit writes only into the struct it is given; on failure, it stays as set.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    usize::try_from(limit.rlim_cur / 4).unwrap_or(usize::MAX).clamp(1, MOST_OPEN_TENANT_FILES)
}

/// `f` of each of `items`, in order, computed on as many threads as there are cores (each given
/// at least `fewest` items): a listing page reads hundreds of shards' lists and a thousand
/// files, and a client paging through waits for each page.
fn in_parallel<T: Sync, R: Send>(items: &[T], fewest: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut chunks = items.chunks(items.len().div_ceil(threads).max(fewest).max(1));
    let Some(first) = chunks.next() else { return Vec::new() };
    let f = &f;
    std::thread::scope(|scope| {
        let others: Vec<_> = chunks.map(|chunk| scope.spawn(move || chunk.iter().map(f).collect::<Vec<_>>())).collect();
        let mut all: Vec<R> = first.iter().map(f).collect();
        for other in others {
            all.extend(other.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        }
        all
    })
}

/// How [`Shards::read_count_of`] reads a count.
#[derive(Clone, Copy)]
enum CountRead<'a> {
    /// For counts: the tenant's file stays open for its next count.
    Kept,
    /// For a listing, which reads each count once and would only evict those read often:
    /// nothing stays open, and a quarantine file is looked for only in the shards whose record
    /// lists any, as this says by shard (every tenant would otherwise look for one in vain).
    Listed(&'a [bool]),
}

/// What a listing needs of a shard's record.
#[derive(Debug, Clone, Copy, Default)]
struct RecordSummary {
    /// The record's generation, at which the shard's index of counts is whole.
    generation: u64,
    /// Whether it lists any tenant in quarantine.
    quarantines: bool,
}

/// A shard's tenants, sorted by name, as a listing reads them.
enum ShardList {
    /// With their counts, from the shard's index.
    Counted(Arc<Counts>),
    /// By name alone, from its list of names: each counted from its file.
    Named(Arc<Vec<String>>),
}

impl ShardList {
    /// The name at `at`.
    fn name(&self, at: usize) -> Option<&str> {
        match self {
            ShardList::Counted(counts) => counts.get(at).map(|(name, _)| name.as_str()),
            ShardList::Named(names) => names.get(at).map(String::as_str),
        }
    }

    /// The count of the tenant at `at`, where the index tells it.
    fn count(&self, at: usize) -> Option<u64> {
        match self {
            ShardList::Counted(counts) => counts.get(at).map(|(_, count)| *count),
            ShardList::Named(_) => None,
        }
    }

    /// Where a page starts: at the first name past `after` that `prefix` allows.
    fn start(&self, prefix: &str, after: &str) -> usize {
        let before = |name: &str| name <= after || name < prefix;
        match self {
            ShardList::Counted(counts) => counts.partition_point(|(name, _)| before(name)),
            ShardList::Named(names) => names.partition_point(|name| before(name)),
        }
    }
}

/// A file's inode, length and modification time: a file replaced by a rename, or written, is
/// another version.
type FileVersion = (u64, Unchanged);

/// Per shard, what was read from one of its files, with the version of the file then: read
/// again once the file changed, and every time while there is no such file.
struct ByVersion<T>(Mutex<HashMap<u16, (Option<FileVersion>, T)>>);

impl<T> Default for ByVersion<T> {
    fn default() -> Self {
        ByVersion(Mutex::new(HashMap::new()))
    }
}

impl<T: Clone> ByVersion<T> {
    /// What `read` gives for `shard`, whose file at `path` is in its directory `dir`, held open:
    /// kept from an earlier read while the file's version is the same.
    fn get(
        &self,
        shard: u16,
        dir: &File,
        path: &Path,
        read: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let version = version_in(dir, path)?;
        if let Some((known, value)) = self.0.lock().get(&shard)
            && version.is_some()
            && *known == version
        {
            return Ok(value.clone());
        }
        let value = read()?;
        self.0.lock().insert(shard, (version, value.clone()));
        Ok(value)
    }
}

/// The version of the file at `path` in the directory `dir`, held open (only its name is looked
/// up); `None` if there is none.
fn version_in(dir: &File, path: &Path) -> Result<Option<FileVersion>, StoreError> {
    let name = path.file_name().unwrap_or_default();
    match nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::empty()) {
        Ok(stat) => Ok(Some((
            stat.st_ino,
            Unchanged(u64::try_from(stat.st_size).unwrap_or_default(), stat.st_mtime, stat.st_mtime_nsec),
        ))),
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(StoreError::io(format!("cannot look at {}", path.display()), e.into())),
    }
}

/// A file's length and modification time, which change if anything writes into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unchanged(u64, i64, i64);

impl Unchanged {
    fn of(metadata: &fs::Metadata) -> Unchanged {
        Unchanged(metadata.len(), metadata.mtime(), metadata.mtime_nsec())
    }
}

/// Reads into `loaded` the quarantine files of the tenants `names` (a shard record's, with the
/// ids each kept) in the shard directory `dir` that this process has not read.
fn load_quarantined(
    names: &BTreeMap<String, Option<u64>>,
    loaded: &mut HashMap<String, Quarantine>,
    dir: &Path,
    database: &Path,
) -> Result<(), StoreError> {
    for (name, kept) in names {
        if !loaded.contains_key(name) {
            let quarantine = Quarantine::load(name, &dir.join(tenant_file_name(name)), *kept, database)?;
            loaded.insert(name.clone(), quarantine);
        }
    }
    Ok(())
}

/// Whether a quarantined tenant of `shard` is due for another try.
fn quarantine_due(shard: u16, state: &mut OwnedShard, root: &Path) -> Result<bool, StoreError> {
    if state.record.quarantined.is_empty() {
        return Ok(false);
    }
    load_quarantined(&state.record.quarantined, &mut state.quarantined, &shard_dir(root, shard), root)?;
    Ok(state.quarantined.values().any(Quarantine::due))
}

/// The counts of the tenants of the shard in `dir` as their files hold them, but for those that
/// `record` lists in quarantine: what the shard's index of counts is written anew from. The
/// counts the commit just `changed` are taken as they are: a shard's first commit, which made
/// every one of its files, reads none of them again.
fn recount(dir: &Path, record: &ShardRecord, changed: &[(String, u64)]) -> Result<Counts, StoreError> {
    let changed: HashMap<&str, u64> = changed.iter().map(|(tenant, count)| (tenant.as_str(), *count)).collect();
    let mut counts = Counts::new();
    for tenant in names::read(dir)?.0 {
        if record.quarantined.contains_key(&tenant) {
            continue;
        }
        if let Some(&count) = changed.get(tenant.as_str()) {
            if count > 0 {
                counts.push((tenant, count));
            }
            continue;
        }
        let path = dir.join(tenant_file_name(&tenant));
        let bytes = match disk::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let count = read_count(&path, &bytes, &tenant)?;
        if count > 0 {
            counts.push((tenant, count));
        }
    }
    Ok(counts)
}

/// Makes every worker read a quarantined tenant's file again, so that its counts answer the
/// quarantine: counts are served from tenant files held open, and a file replaced (here with
/// its own bytes) is read again. A tenant file that is itself the bad one fails to parse anyway.
/// Best effort: a worker that keeps answering the count it read before is not wrong, only late.
fn invalidate_cached_counts(tenant_path: &Path, bad: &Path, commit: &mut Commit) {
    if bad == tenant_path {
        return;
    }
    let rewritten = match disk::read(tenant_path) {
        Ok(bytes) => commit.write(Step::Data, tenant_path, &bytes),
        Err(e) if e.not_found() => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = rewritten {
        tracing::warn!(file = %tenant_path.display(), error = %e, "cannot make the workers read a quarantined tenant's file again");
    }
}

/// Reads a shard record's `quarantined`: a map of tenants to the ids each kept, or (a record of
/// an earlier release) a list of tenants.
fn names_or_kept<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, Option<u64>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Quarantined {
        Kept(BTreeMap<String, Option<u64>>),
        Names(Vec<String>),
    }
    Ok(match Quarantined::deserialize(deserializer)? {
        Quarantined::Kept(kept) => kept,
        Quarantined::Names(names) => names.into_iter().map(|name| (name, None)).collect(),
    })
}

/// Keeps `shard` out of rounds for a while after `error`, logged.
fn shard_failed(shard: u16, error: &StoreError, failing: &mut HashMap<u16, Backoff>, report: &mut MergeReport) {
    let backoff = failing.get(&shard).map_or_else(Backoff::new, |b| b.again());
    tracing::error!(shard, error = %error, retry_in_s = backoff.wait().as_secs(), "shard left out of merging; every other shard merges on");
    failing.insert(shard, backoff);
    report.failed_shards += 1;
}

/// Milliseconds since the Unix epoch, to name a file kept aside.
fn unix_ms() -> u128 {
    SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
}

/// Opens the lock file of the shard directory `dir`, creating both if need be.
fn open_lock(dir: &Path) -> Result<File, StoreError> {
    disk::create_dir_all(dir)?;
    Ok(disk::open_with(OpenOptions::new().write(true).create(true).truncate(false), &dir.join(LOCK_FILE))?)
}

/// Removes the quarantine files in the shard directory `dir` of tenants that `record` does not
/// list in quarantine: left behind by a crash between a repair's commit and their removal.
fn remove_stale_quarantines(dir: &Path, record: &ShardRecord) -> Result<(), StoreError> {
    let listed: HashSet<PathBuf> =
        record.quarantined.keys().map(|tenant| Quarantine::path_of(&dir.join(tenant_file_name(tenant)))).collect();
    let entries = match disk::entries(dir) {
        Ok(entries) => entries,
        Err(e) if e.not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let path = entry.path();
        if Quarantine::is_quarantine_file(&path) && !listed.contains(&path) {
            tracing::info!(file = %path.display(), "removing a quarantine file its repair left behind");
            disk::remove_if_present(&path)?;
        }
    }
    Ok(())
}

/// Removes the temporaries an unfinished merge left in a shard's directory.
fn remove_temporaries(dir: &Path) -> Result<(), StoreError> {
    let entries = match disk::entries(dir) {
        Ok(entries) => entries,
        Err(e) if e.not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        if entry.file_name().to_str().is_some_and(is_temporary) {
            disk::remove_if_present(&entry.path())?;
        }
    }
    Ok(())
}
