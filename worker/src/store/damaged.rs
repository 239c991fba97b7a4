//! `damaged/` beside the logs and shards: files found damaged, kept for an operator to look at.
//!
//! Whatever finds damage goes on without the damaged bytes (a log's intact records are merged,
//! a shard record is rebuilt, a tenant is quarantined) and keeps the file here as it was found:
//! a hard link, which costs no copy and outlives the file's replacement or deletion.

use std::path::Path;

use super::disk;

/// The directory under the database where damaged files are kept.
pub(crate) const DIR: &str = "damaged";

/// Keeps the file at `path` aside as `damaged/<name>` under `database`. A name already kept is
/// left as it is. Failing to keep it is logged: whatever found the damage must go on.
pub(crate) fn keep_aside(database: &Path, path: &Path, name: &str) {
    let dir = database.join(DIR);
    let aside = dir.join(name);
    match disk::create_dir_all(&dir).and_then(|()| disk::hard_link(path, &aside)) {
        Ok(()) => tracing::warn!(file = %path.display(), aside = %aside.display(), "kept the damaged file aside"),
        Err(e) => tracing::error!(file = %path.display(), error = %e, "cannot keep the damaged file aside"),
    }
}
