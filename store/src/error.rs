//! What can go wrong in the store: one error type for every backend and every file.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::disk;

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
    /// A read met files changing under it more often than it retries; asking again succeeds.
    #[error("busy: {0}")]
    Busy(String),
    /// The tenants' store (Redis) cannot be reached or refused the request; the log keeps
    /// whatever could not be merged, and a later merge round retries.
    #[error("the tenant store is unavailable: {0}")]
    Backend(String),
}

impl From<disk::DiskError> for StoreError {
    fn from(e: disk::DiskError) -> StoreError {
        StoreError::Io { context: e.context(), path: Some(e.path), error: e.source }
    }
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        StoreError::Io { context: context.into(), path: None, error: source }
    }

    pub(crate) fn corrupt(path: &Path, detail: impl ToString) -> StoreError {
        StoreError::Corrupt { path: path.to_path_buf(), detail: detail.to_string() }
    }
}
