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
//! A tenant belongs to one shard, by a hash of its name ([`shard_of`]), and each shard is merged
//! by one live worker at a time, chosen by rendezvous hashing over the live workers
//! ([`owner_of`]): when a worker joins or leaves, only the shards it wins or held move.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::disk;

/// The on-disk format this version writes and reads.
pub(crate) const FORMAT: u32 = 2;
/// Shards of a new database: enough that four to a few dozen workers each get many, few enough
/// that a merge round touches a bounded number of directories.
pub const DEFAULT_SHARDS: u16 = 256;

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

/// The shard of `tenant` in a database of `shards` shards. Part of the on-disk format: every
/// process, of every version, must place a tenant in the same shard.
pub fn shard_of(tenant: &str, shards: u16) -> u16 {
    (mix(fnv1a(tenant.as_bytes(), FNV_OFFSET)) % u64::from(shards)) as u16
}

/// The live worker that merges `shard`: the one whose id scores highest with it (rendezvous
/// hashing), so that every process that sees the same live workers picks the same owner, and a
/// worker joining or leaving moves only the shards it wins or held. `None` with no live worker.
pub fn owner_of<'a>(shard: u16, live: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    live.into_iter()
        .max_by_key(|worker| (mix(fnv1a(&shard.to_le_bytes(), fnv1a(worker.as_bytes(), FNV_OFFSET))), *worker))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(bytes: &[u8], mut hash: u64) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// SplitMix64's finalizer: spreads FNV's weak low bits over the whole word.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The directory of `shard`.
pub(crate) fn shard_dir(root: &Path, shard: u16) -> PathBuf {
    root.join("shards").join(format!("{shard:03}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_of_a_tenant_is_stable() {
        // Part of the format: a different answer would hide every tenant's files.
        assert_eq!(shard_of("t1", 256), 77);
        assert_eq!(shard_of("", 256), 155);
        assert_eq!(shard_of("t1", 1), 0);
    }

    #[test]
    fn shards_spread_evenly() {
        let mut per_shard = [0u32; 256];
        for t in 0..256_000 {
            per_shard[shard_of(&format!("tenant-{t}"), 256) as usize] += 1;
        }
        let (min, max) = (per_shard.iter().min().unwrap(), per_shard.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "{min}..{max} tenants per shard, 1000 expected");
    }

    #[test]
    fn a_worker_leaving_moves_only_its_shards() {
        let four = ["127.0.0.1-5001", "127.0.0.1-5002", "127.0.0.1-5003", "127.0.0.1-5004"];
        let owners: Vec<&str> = (0..256).map(|s| owner_of(s, four).unwrap()).collect();
        for worker in four {
            let owned = owners.iter().filter(|o| **o == worker).count();
            assert!((40..=90).contains(&owned), "{worker} owns {owned} of 256 shards");
        }
        let three = &four[..3];
        for (shard, owner) in owners.iter().enumerate() {
            let now = owner_of(shard as u16, three.iter().copied()).unwrap();
            if *owner != four[3] {
                assert_eq!(now, *owner, "shard {shard} moved though its owner stayed");
            }
        }
        assert_eq!(owner_of(0, []), None);
    }
}
