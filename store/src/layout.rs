//! Where things live in a database directory, and which worker merges which tenant.
//!
//! ```text
//! STORE.json                             the format and the number of shards, fixed at creation
//! wal/<worker>/LOCK                      held by the running worker: a worker is live while it holds it
//! wal/<worker>/<seq>.open                the log file being appended to (or a dead worker's last)
//! wal/<worker>/<seq>.log                 closed log files, immutable, deleted once merged
//! shards/<shard>/LOCK                    held while a worker merges into the shard
//! shards/<shard>/SHARD.json              which log files the shard has merged
//! shards/<shard>/<name>.<hash>.json      a tenant: its count, and its ids or its segments
//! shards/<shard>/<name>.<hash>/          a large tenant's segments, immutable JSON arrays of ids
//! ```
//!
//! Which shard a tenant belongs to, and which worker merges it, is `partition`'s.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::disk;

/// The on-disk format this version writes and reads.
pub(crate) const FORMAT: u32 = 2;

const STORE_FILE: &str = "STORE.json";

/// `STORE.json`: what every process must agree on to read the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    format: u32,
    shards: u16,
}

/// Reads the shard count of the database at `root`, creating the database with `shards` shards
/// if it is new. A database of another format is refused, never rewritten.
pub(crate) fn open_or_create(root: &Path, shards: u16) -> Result<u16, StoreError> {
    match read_shards(root) {
        Err(StoreError::Io { error, .. }) if error.kind() == io::ErrorKind::NotFound => {
            if root.join("tenants").is_dir() {
                return Err(StoreError::corrupt(
                    &root.join("tenants"),
                    "a database of format 1, which this version does not read",
                ));
            }
            create(root, shards)?;
            read_shards(root)
        }
        other => other,
    }
}

/// Creates `STORE.json` unless another process just did: the file is written whole under a name
/// of this process's, then linked into place, which fails if the name exists. Whichever process
/// wins, all of them then read the same file.
fn create(root: &Path, shards: u16) -> Result<(), StoreError> {
    disk::create_dir_durably(root)?;
    let path = root.join(STORE_FILE);
    let mine = root.join(format!("{STORE_FILE}.{}.{:08x}.tmp", std::process::id(), rand::random::<u32>()));
    let file = StoreFile { format: FORMAT, shards };
    let written =
        disk::write_new(&mine, |out| serde_json::to_writer(out, &file).map_err(io::Error::from)).and_then(|()| {
            match disk::link_new(&mine, &path) {
                Err(e) if e.source.kind() != io::ErrorKind::AlreadyExists => Err(e),
                _ => disk::sync_dir(root),
            }
        });
    let _ = disk::remove(&mine);
    Ok(written?)
}

/// The shard count of the existing database at `root`.
pub(crate) fn read_shards(root: &Path) -> Result<u16, StoreError> {
    let path = root.join(STORE_FILE);
    let bytes = disk::read(&path)?;
    let file: StoreFile = serde_json::from_slice(&bytes).map_err(|e| StoreError::corrupt(&path, e))?;
    if file.format != FORMAT {
        let detail = format!("format {} is not the format {FORMAT} this version reads", file.format);
        return Err(StoreError::corrupt(&path, detail));
    }
    if file.shards == 0 {
        return Err(StoreError::corrupt(&path, "a database has at least one shard"));
    }
    Ok(file.shards)
}

/// The directory of `shard`.
pub(crate) fn shard_dir(root: &Path, shard: u16) -> PathBuf {
    root.join("shards").join(format!("{shard:03}"))
}
