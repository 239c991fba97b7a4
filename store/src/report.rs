//! What the store reports: what a merge round did, the tenants in quarantine, and a snapshot of
//! its counters for `/stats` and `/metrics`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::log::Damage;

/// What a merge round did (or a flush: a closing of the log, then a round).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
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
    /// Tenants deleted, as a barrier asked.
    pub deleted_tenants: u64,
    /// Shards left for a later round, their lock held by another worker.
    pub busy_shards: u64,
    /// Shards left out of the round by an I/O error on their lock, record or directory, tried
    /// again after a backoff; every other shard merged on.
    pub failed_shards: u64,
    /// Shard records found damaged and rebuilt.
    pub rebuilt_records: u64,
}

impl MergeReport {
    /// Adds the damage found in one log file.
    pub(crate) fn add_damage(&mut self, damage: Damage) {
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
    /// How long the oldest item this worker acknowledged and the sets have not taken yet has
    /// waited (see [`crate::Store::oldest_pending`]): what a client waits, at most, to see it
    /// counted.
    pub oldest_pending: Duration,
    /// When the latest round that did something finished, what it took, and what it did.
    pub last_merge: Option<(SystemTime, Duration, MergeReport)>,
    /// The tenants in quarantine in the shards this worker merges.
    pub quarantined: Vec<QuarantinedTenant>,
}
