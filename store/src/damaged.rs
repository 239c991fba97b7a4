//! `damaged/` beside the logs and shards: files found damaged, kept for an operator to look at.
//!
//! Whatever finds damage goes on without the damaged bytes (a log's intact records are merged,
//! a shard record is rebuilt, a tenant is quarantined) and keeps the file here as it was found:
//! a hard link, which costs no copy and outlives the file's replacement or deletion.

use std::path::Path;

use crate::disk;

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

/// Removes the oldest files kept under `database`'s `damaged/` until they hold at most
/// `max_bytes`; returns how many went. Several workers may prune at once: a file another one
/// removed first is simply gone.
pub(crate) fn prune(database: &Path, max_bytes: u64) -> disk::Result<u64> {
    let dir = database.join(DIR);
    let entries = match disk::entries(&dir) {
        Ok(entries) => entries,
        Err(e) if e.not_found() => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut kept: Vec<(std::time::SystemTime, u64, std::path::PathBuf)> = entries
        .iter()
        .filter_map(|entry| {
            let meta = entry.metadata().ok().filter(|meta| meta.is_file())?;
            Some((meta.modified().ok()?, meta.len(), entry.path()))
        })
        .collect();
    let mut total: u64 = kept.iter().map(|(_, len, _)| len).sum();
    kept.sort();
    let mut removed = 0;
    for (_, len, path) in kept {
        if total <= max_bytes {
            break;
        }
        if disk::remove_if_present(&path)? {
            tracing::info!(file = %path.display(), bytes = len, "removed a damaged file kept aside: damaged_max_bytes is reached");
            removed += 1;
        }
        total -= len;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn the_oldest_damaged_files_go_first_past_the_limit() {
        let database = tempfile::tempdir().unwrap();
        let dir = database.path().join(DIR);
        fs::create_dir_all(&dir).unwrap();
        let now = SystemTime::now();
        for (name, age_s) in [("new", 10), ("old", 300), ("middle", 100)] {
            fs::write(dir.join(name), [0u8; 600]).unwrap();
            File::options()
                .write(true)
                .open(dir.join(name))
                .unwrap()
                .set_modified(now - Duration::from_secs(age_s))
                .unwrap();
        }
        assert_eq!(prune(database.path(), 2000).unwrap(), 0, "1,800 bytes are within 2,000");
        assert_eq!(prune(database.path(), 1000).unwrap(), 2);
        let left: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["new"]);
        assert_eq!(prune(&database.path().join("nothing"), 0).unwrap(), 0, "no damaged/ yet");
    }
}
