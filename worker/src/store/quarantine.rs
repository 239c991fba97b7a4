//! Tenants whose files cannot be read, set apart so that they never hold up any other tenant.
//!
//! When a tenant's file or one of its segments cannot be read (damaged on disk, overwritten by
//! hand), the worker merging its shard quarantines the tenant instead of failing the round: the
//! rest of the shard, and every other shard, merge on. The ids that arrive for the tenant are
//! kept, never dropped, in `<tenant file stem>.quarantine` beside its file: JSON naming the
//! tenant, the file that failed and why, and the ids kept. Every count of the tenant answers an
//! error naming that file, on every worker, until it is repaired.
//!
//! Repair is the operator's (README, "Repairing a tenant"): restore the bad file from a backup,
//! or remove it. A removed manifest is rebuilt from the tenant's segments; a removed segment or
//! small tenant file loses the ids only it held. Once the files change, the next round loads the
//! tenant again; if it loads, the kept ids are merged into it and the quarantine ends.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::commit::{Commit, Step};
use super::disk;

/// The extension of quarantine files.
const EXTENSION: &str = "quarantine";

/// A quarantined tenant, as its quarantine file holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Quarantine {
    /// The tenant.
    pub(crate) tenant: String,
    /// The file that could not be read.
    pub(crate) file: PathBuf,
    /// Why.
    pub(crate) reason: String,
    /// The ids that arrived for the tenant since, kept until it is repaired.
    pub(crate) ids: Vec<String>,
}

/// What a quarantined tenant's files looked like when last tried, so that it is tried again
/// only once they change: (inode, modification time, length) of its file and of the bad file.
pub(crate) type Signature = [Option<(u64, i64, u64)>; 2];

impl Quarantine {
    /// The quarantine file of the tenant whose file is `tenant_path`.
    pub(crate) fn path_of(tenant_path: &Path) -> PathBuf {
        tenant_path.with_extension(EXTENSION)
    }

    /// Reads the quarantine file of the tenant whose file is `tenant_path`, if it has one.
    pub(crate) fn read(tenant_path: &Path) -> Result<Option<Quarantine>, StoreError> {
        let path = Quarantine::path_of(tenant_path);
        match disk::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| StoreError::corrupt(&path, e)),
            Err(e) if e.not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The tenants with a quarantine file in the shard directory `dir`: those a rebuilt shard
    /// record lists in quarantine.
    pub(crate) fn tenants_in(dir: &Path) -> Result<BTreeSet<String>, StoreError> {
        let mut tenants = BTreeSet::new();
        for entry in disk::entries(dir)? {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == EXTENSION) {
                match Quarantine::read(&path.with_extension("json")) {
                    Ok(Some(quarantine)) => {
                        tenants.insert(quarantine.tenant);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(file = %path.display(), error = %e, "cannot read a quarantine file"),
                }
            }
        }
        Ok(tenants)
    }

    /// Stages this quarantine file, for the tenant whose file is `tenant_path`.
    pub(crate) fn stage(&self, tenant_path: &Path, commit: &mut Commit) -> Result<(), StoreError> {
        let path = Quarantine::path_of(tenant_path);
        let bytes = serde_json::to_vec(self).expect("a quarantine serializes");
        Ok(commit.write(Step::Data, &path, &bytes)?)
    }

    /// The state of the tenant's files now.
    pub(crate) fn signature(&self, tenant_path: &Path) -> Signature {
        let of = |path: &Path| {
            fs::metadata(path).ok().map(|m| (m.ino(), m.mtime_nsec() + m.mtime() * 1_000_000_000, m.len()))
        };
        [of(tenant_path), of(&self.file)]
    }

    /// The error every count of the tenant answers.
    pub(crate) fn error(&self) -> StoreError {
        StoreError::Quarantined { tenant: self.tenant.clone(), file: self.file.clone(), reason: self.reason.clone() }
    }
}

/// The file a failure to load or merge a tenant is about: the damaged one when known, else the
/// tenant's own.
pub(crate) fn failed_file(error: &StoreError, tenant_path: &Path) -> PathBuf {
    match error {
        StoreError::Corrupt { path, .. } => path.clone(),
        _ => tenant_path.to_path_buf(),
    }
}
