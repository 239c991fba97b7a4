//! Where the tenants' id sets live: one trait, [`TenantSets`], and one module per backend.
//!
//! - `json`: a JSON file per tenant under the database, merged shard by shard, each shard by one
//!   worker at a time; shared by the workers of one machine.
//! - `redis`: one Redis set per tenant; each worker merges its own log, and workers on any
//!   machine share the sets.
//!
//! The store drives every backend the same way: the log hands over its final files at each
//! merge round ([`TenantSets::merge`]), and the backend takes their items, reports what it did,
//! and deletes (through the log's rules, see `log`) the files it has durably taken. Counts,
//! lag and stats are asked of it. A new backend is a module here implementing the trait, a
//! variant of the config's `store` key, and one arm in [`open`].

mod json;
mod recent;
mod redis;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use countapp_shared::config::StoreKind;

use crate::log::WorkerLog;
use crate::{MergeReport, QuarantinedTenant, Settings, StoreError, StoreOptions};

pub(crate) use json::count_in;

/// The tenants' id sets of one backend, as one worker merges and reads them.
pub(crate) trait TenantSets: Send + Sync {
    /// The highest number of `worker`'s log files that this backend records as merged, so that a
    /// worker never numbers a new file at or below it (it would count as merged already); 0
    /// where the backend keeps no such record.
    fn highest_merged(&self, worker: &str) -> u64;

    /// Whether a round must run although no log file came or went: something failed and is due
    /// for another try, or something waits on time (a grace period, a recheck).
    fn round_due(&self) -> bool;

    /// One merge round: takes the items of the final log files in `logs` that this worker is to
    /// merge, as far as `scope` asks where merging goes by shard, deletes the files it has
    /// durably taken, and adds what it did to `report`.
    fn merge(&self, logs: &[WorkerLog], scope: Scope<'_>, report: &mut MergeReport) -> Result<(), StoreError>;

    /// The tenant's distinct count as of the latest merge by any worker.
    fn count(&self, tenant: &str) -> Count<'_>;

    /// [`TenantSets::count`] for callers outside an async runtime.
    fn count_blocking(&self, tenant: &str) -> Result<u64, StoreError>;

    /// The counts of `tenants`, in their order, as of the latest merge by any worker.
    fn counts<'a>(&'a self, tenants: &'a [String]) -> Answer<'a, Vec<u64>>;

    /// Whether each of `ids` is in `tenant`'s set, in their order, as of the latest merge by
    /// any worker.
    fn contains<'a>(&'a self, tenant: &'a str, ids: &'a [String]) -> Answer<'a, Vec<bool>>;

    /// Up to `limit` tenants whose names start with `prefix` and come after `after`, in byte
    /// order of their names, each with its count; tenants that count nothing are left out.
    fn list<'a>(&'a self, prefix: &'a str, after: &'a str, limit: usize) -> Answer<'a, TenantPage>;

    /// Whether reads are answered on the calling thread, from files, taking as long as their
    /// reading ([`Answer::Now`]); otherwise they come over the network, to be awaited.
    fn reads_files(&self) -> bool {
        false
    }

    /// Whether counts read from the backend answer the same tenants' counts for a moment (see
    /// `recent`): a barrier that passed then has every worker forget them
    /// ([`TenantSets::forget_reads`]) before its requests are answered.
    fn keeps_reads(&self) -> bool {
        false
    }

    /// Forgets the counts kept from earlier reads, and those on their way: every read from now
    /// on sees at least what the backend holds now.
    fn forget_reads(&self) {}

    /// Which of `shards` this worker vouches for after a round over `logs` (the listing the
    /// round merged): those whose runs in the listed final files, as far as this worker merges
    /// them, are all merged. See [`TenantSets::vouches_for_every_writer`] for what that covers.
    fn settled(&self, logs: &[WorkerLog], shards: &[u16]) -> Vec<u16>;

    /// Asks the next round to delete `tenants`, where deleting belongs in a round (the JSON
    /// shards, deleted by their owner under the shard's lock once merged completely); nothing
    /// where it does not.
    fn delete_in_round(&self, _tenants: &[String]) {}

    /// After the round that followed [`TenantSets::delete_in_round`]: deletes `tenants` where
    /// that is not a round's work (Redis), and returns those of them whose deletion this
    /// worker vouches for, durable as the backend makes writes.
    fn deleted(&self, tenants: &[String]) -> Result<Vec<String>, StoreError>;

    /// Whether a shard that one worker vouches for is merged from every worker's files (the
    /// JSON shards, merged by their owner), or only from that worker's own (Redis, where each
    /// worker merges its own log): then every worker must vouch for it.
    fn vouches_for_every_writer(&self) -> bool;

    /// How long the oldest item that this worker is to merge has waited since its log file was
    /// last written: zero when it keeps up.
    fn merge_lag(&self) -> Duration;

    /// How long merging `bytes` of log takes at the pace the backend sets, where it sets one
    /// (Redis takes ids slower than a log takes them); `None` where merging is not paced so, or
    /// no pace is known yet.
    fn merge_time(&self, _bytes: u64) -> Option<Duration> {
        None
    }

    /// Whether merging fails for a cause other than load (the backend unreachable, or unable to
    /// confirm its writes): the lag it causes is then no reason to push ingest back.
    fn failing(&self) -> bool {
        false
    }

    /// Ids this worker holds in memory for the sets it merges, and their bytes, about.
    fn ids_in_memory(&self) -> (u64, u64);

    /// The tenants in quarantine among those this worker merges.
    fn quarantined(&self) -> Vec<QuarantinedTenant>;

    /// Puts an edit of the live settings in force, from the next round on.
    fn apply(&self, settings: &Settings);
}

/// An answer read from the sets: at once (from files), or later (a round trip to a server). An
/// answer at once costs no allocation on the request path.
pub enum Answer<'a, T> {
    /// The answer is known.
    Now(Result<T, StoreError>),
    /// The answer is on its way.
    Later(Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>),
}

/// What a merge round merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope<'a> {
    /// Everything this worker is to merge: the merger's rounds.
    All,
    /// The runs of these shards, where merging goes by shard (the JSON files): a barrier's
    /// round, which a strong read of one tenant waits for, merges that tenant's shard alone.
    Shards(&'a [u16]),
}

impl Scope<'_> {
    /// Whether the round merges `shard`.
    pub(crate) fn covers(&self, shard: u16) -> bool {
        match self {
            Scope::All => true,
            Scope::Shards(shards) => shards.contains(&shard),
        }
    }
}

/// A page of tenants in the order of their names, as [`TenantSets::list`] answers it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantPage {
    /// Each tenant with its count, or why its count cannot be read (a tenant in quarantine).
    pub tenants: Vec<(String, Result<u64, String>)>,
    /// The page's last tenant, to ask for the next page after, while there may be more.
    pub next: Option<String>,
}

/// A tenant's count, as [`TenantSets::count`] answers it.
pub type Count<'a> = Answer<'a, u64>;

impl<T> Answer<'_, T> {
    /// The answer, however it comes.
    pub async fn get(self) -> Result<T, StoreError> {
        match self {
            Answer::Now(answer) => answer,
            Answer::Later(answer) => answer.await,
        }
    }
}

/// Opens the sets of the backend `options.store` names, for worker `worker` of the database at
/// `database` (of `shards` shards); `writer_tag` names this run of the worker.
pub(crate) fn open(
    database: &Path,
    shards: u16,
    worker: &str,
    writer_tag: String,
    options: &StoreOptions,
) -> Result<Box<dyn TenantSets>, StoreError> {
    Ok(match options.store {
        StoreKind::Json => Box::new(json::Shards::new(database, shards, worker, writer_tag, &options.settings)),
        StoreKind::Redis => {
            let url = options
                .redis_url
                .as_deref()
                .ok_or_else(|| StoreError::Backend("store: redis needs a redis_url, and none was given".to_owned()))?;
            Box::new(redis::RedisTenants::new(database, worker, url, options, &options.settings)?)
        }
    })
}
