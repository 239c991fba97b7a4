//! How tenants are spread: each tenant belongs to one shard, by a hash of its name
//! ([`shard_of`]), and each shard is merged by one live worker at a time, chosen by rendezvous
//! hashing over the live workers ([`owner_of`]): when a worker joins or leaves, only the shards
//! it wins or held move.
//!
//! A leaf of the store: the log groups a batch's items by shard when it encodes them, and the
//! JSON sets keep one directory per shard, both by these functions.

/// Shards of a new database: enough that four to a few dozen workers each get many, few enough
/// that a merge round touches a bounded number of directories.
pub const DEFAULT_SHARDS: u16 = 256;

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
