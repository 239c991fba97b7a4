//! The config a running worker follows, and how an edit reaches it.
//!
//! A worker spawned by a coordinator is handed the coordinator's config at spawn (the last good
//! one, even while the file is being edited into something invalid) and every later version on
//! `PUT /config`, so that the coordinator and its workers never run different settings for
//! longer than an edit takes to apply. A worker run by hand (on another machine) follows its own
//! config file, with the watch the coordinator uses.
//!
//! Every key applies live: the size limits and `max_pending_items` on the next request,
//! `worker_persist` at the merger's next look (within 100 ms), `fsync` from the next append on,
//! `redis_grace`, `redis_wait_replicas` and `redis_merge_connections` from the next merge round,
//! `damaged_max_bytes` at the next pruning (within a minute).
//! The keys a running cluster cannot change ([`FIXED_KEYS`]) make an edit refused as a whole.

use std::path::PathBuf;
use std::sync::Arc;

use countapp_shared::config::{Config, ConfigError, FIXED_KEYS};
use parking_lot::RwLock;

use countapp_store::{Settings, Store};

/// The config in force on this worker, with its version.
pub(crate) struct LiveConfig {
    current: RwLock<(Arc<Config>, String)>,
}

/// Why an edit was not applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    /// The new config is invalid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The edit changes keys that only a restart can.
    #[error("{} cannot change while the worker runs (of {}); the edit is refused", .0.join(", "), FIXED_KEYS.join(", "))]
    Fixed(Vec<&'static str>),
}

/// Where a worker's config edits come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// Its coordinator, which handed it the config at spawn and pushes every edit.
    Coordinator,
    /// The config file at this path, which the worker watches itself.
    File(PathBuf),
}

impl LiveConfig {
    /// Follows `config` from start-up on.
    pub(crate) fn new(config: Config) -> LiveConfig {
        let version = config.version();
        LiveConfig { current: RwLock::new((Arc::new(config), version)) }
    }

    /// The config in force.
    pub(crate) fn get(&self) -> Arc<Config> {
        self.current.read().0.clone()
    }

    /// The version of the config in force.
    pub(crate) fn version(&self) -> String {
        self.current.read().1.clone()
    }

    /// Puts `new` in force, and the store's part of it (`fsync`, `redis_grace`,
    /// `redis_wait_replicas`, `redis_merge_connections`, `damaged_max_bytes`) if the store is
    /// open. Returns
    /// whether anything changed.
    pub(crate) fn apply(&self, new: Config, store: Option<&Store>) -> Result<bool, ApplyError> {
        let mut current = self.current.write();
        if *current.0 == new {
            return Ok(false);
        }
        let fixed = current.0.fixed_changes(&new);
        if !fixed.is_empty() {
            return Err(ApplyError::Fixed(fixed));
        }
        if let Some(store) = store {
            store.apply(&Settings::from_config(&new));
        }
        let version = new.version();
        tracing::info!(version, from = current.1, "config applied");
        *current = (Arc::new(new), version);
        Ok(true)
    }
}
