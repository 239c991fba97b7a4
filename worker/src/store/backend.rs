//! The seam between the write-ahead log, which is always local, and the place the tenants' id
//! sets live: the shared JSON files under `database`, or Redis.

use super::StoreError;

/// Where flushed ids go, and where counts come from.
pub(crate) trait TenantStore: Send + Sync {
    /// Adds `ids` to `tenant`'s set; returns how many of them were new to it. Called by flushes
    /// only, on their own threads.
    fn merge(&self, tenant: &str, ids: &[&str]) -> Result<u64, StoreError>;

    /// The tenant's distinct count as of the latest merge by any worker; 0 for a tenant never
    /// merged into.
    fn count(&self, tenant: &str) -> Result<u64, StoreError>;

    /// Whether a count may wait on the network, so that callers on an event loop should make it
    /// on a blocking thread.
    fn counts_block(&self) -> bool;
}
