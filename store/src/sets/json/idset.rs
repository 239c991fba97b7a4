//! A tenant's ids in memory, kept by the worker that merges the tenant to tell the ids a merge
//! brings that are new from those the tenant holds.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

/// A set of ids, compact: every id lives in one byte arena as `[varint length][bytes]`, and the
/// hash table holds only the `u32` offset of each entry. A 16-byte id costs 17 bytes of arena
/// and 5.7 to 11.4 bytes of table (its slot and control byte, at hashbrown's load of 7/16 to
/// 7/8), with no allocation of its own.
#[derive(Default)]
pub(crate) struct IdSet {
    arena: Vec<u8>,
    table: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

/// The arena is addressed by `u32` offsets: a set holds at most this many bytes of ids (over
/// 200 million ids of 16 bytes).
pub(crate) const MAX_ARENA_BYTES: usize = u32::MAX as usize;

/// Why an id could not be added.
#[derive(Debug, thiserror::Error)]
#[error("a tenant holds at most {MAX_ARENA_BYTES} bytes of ids in memory")]
pub(crate) struct SetFull;

impl IdSet {
    /// The number of ids.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    /// Makes room for `additional` more ids.
    pub(crate) fn reserve(&mut self, additional: usize) {
        let (arena, hasher) = (&self.arena, &self.hasher);
        self.table.reserve(additional, |&at| hasher.hash_one(entry(arena, at)));
    }

    /// Inserts `ids`, handing each id the set lacked to `new` (once, in the order inserted);
    /// returns how many there were. Ids are taken in chunks of [`CHUNK`], so that the work
    /// memory stays small however many ids a merge brings.
    pub(crate) fn insert_new<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a [u8]>,
        mut new: impl FnMut(&'a [u8]),
    ) -> Result<u64, SetFull> {
        let mut ids = ids.into_iter().peekable();
        let mut hashed: Vec<(u64, &'a [u8])> = Vec::new();
        let mut sorted: Vec<(u64, &'a [u8])> = Vec::new();
        let mut added = 0;
        while ids.peek().is_some() {
            hashed.clear();
            let mut bytes = 0;
            for id in ids.by_ref().take(CHUNK) {
                hashed.push((self.hasher.hash_one(id), id));
                bytes += id.len() + 2;
            }
            self.reserve(hashed.len());
            if self.arena.len() + bytes > MAX_ARENA_BYTES {
                return Err(SetFull);
            }
            self.arena.reserve(bytes);
            let batch = in_table_order(&hashed, &mut sorted, self.table.capacity());
            for &(hash, id) in batch {
                let arena = &self.arena;
                if self.table.find(hash, |&at| entry(arena, at) == id).is_some() {
                    continue;
                }
                let at = self.arena.len() as u32;
                put_varint(&mut self.arena, id.len());
                self.arena.extend_from_slice(id);
                let (arena, hasher) = (&self.arena, &self.hasher);
                self.table.insert_unique(hash, at, |&at| hasher.hash_one(entry(arena, at)));
                new(id);
                added += 1;
            }
        }
        Ok(added)
    }

    /// Whether the set holds `id`.
    pub(crate) fn contains(&self, id: &[u8]) -> bool {
        let arena = &self.arena;
        self.table.find(self.hasher.hash_one(id), |&at| entry(arena, at) == id).is_some()
    }

    /// Every id, in the order inserted.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.arena[..];
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let (len, skip) = get_varint(rest);
            let id = &rest[skip..skip + len];
            rest = &rest[skip + len..];
            Some(id)
        })
    }

    /// Resident bytes the set holds, about: its arena and its table.
    pub(crate) fn heap_bytes(&self) -> usize {
        let buckets = if self.table.capacity() == 0 { 0 } else { (self.table.capacity() * 8 / 7).next_power_of_two() };
        self.arena.len() + buckets * (size_of::<u32>() + 1)
    }
}

/// Ids inserted per chunk: their hashes and places take 48 bytes each of work memory.
const CHUNK: usize = 1 << 16;
/// Regions of the table a chunk is sorted into, at most: few enough that the counts stay in the
/// processor's cache, many enough that a region of a large table does too.
const REGION_BITS: u32 = 12;

/// `hashed` in the order of the table regions its ids hash to, for a table of `capacity`: in a
/// table of millions of ids an insert at a random place costs a cache miss or two, while
/// walking the table in order lets the processor fetch ahead. A counting sort, in linear time.
/// How hashbrown places an id: at its hash modulo the number of buckets, the next power of two
/// above 8/7 of the capacity. Were this wrong, only the speed would be.
fn in_table_order<'s, 'a>(
    hashed: &'s [(u64, &'a [u8])],
    sorted: &'s mut Vec<(u64, &'a [u8])>,
    capacity: usize,
) -> &'s [(u64, &'a [u8])] {
    let bits = (capacity * 8 / 7).max(1).next_power_of_two().trailing_zeros();
    if bits <= REGION_BITS || hashed.len() < 1024 {
        // The whole table fits in the cache, or the chunk is too small to gain from an order.
        return hashed;
    }
    let shift = bits - REGION_BITS;
    let region = |hash: u64| ((hash & ((1u64 << bits) - 1)) >> shift) as usize;
    let mut starts = vec![0u32; (1 << REGION_BITS) + 1];
    for &(hash, _) in hashed {
        starts[region(hash) + 1] += 1;
    }
    for i in 1..starts.len() {
        starts[i] += starts[i - 1];
    }
    sorted.clear();
    sorted.resize(hashed.len(), (0, &[]));
    for &(hash, id) in hashed {
        let slot = &mut starts[region(hash)];
        sorted[*slot as usize] = (hash, id);
        *slot += 1;
    }
    sorted
}

/// The id stored at offset `at` of the arena.
fn entry(arena: &[u8], at: u32) -> &[u8] {
    let rest = &arena[at as usize..];
    let (len, skip) = get_varint(rest);
    &rest[skip..skip + len]
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// A varint written by [`put_varint`] at the start of `bytes`: its value and its length.
fn get_varint(bytes: &[u8]) -> (usize, usize) {
    let (mut value, mut shift, mut i) = (0usize, 0, 0);
    loop {
        let byte = bytes[i];
        value |= usize::from(byte & 0x7f) << shift;
        i += 1;
        if byte & 0x80 == 0 {
            return (value, i);
        }
        shift += 7;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert<'a>(set: &mut IdSet, ids: impl IntoIterator<Item = &'a str>) -> Vec<&'a [u8]> {
        let mut new = Vec::new();
        let added = set.insert_new(ids.into_iter().map(str::as_bytes), |id| new.push(id)).unwrap();
        assert_eq!(added, new.len() as u64);
        new.sort_unstable();
        new
    }

    #[test]
    fn insert_new_reports_each_new_id_once() {
        let mut set = IdSet::default();
        let first: Vec<String> = (0..100_000).map(|i| i.to_string()).collect();
        let new = insert(&mut set, first.iter().map(String::as_str));
        let mut expected: Vec<&[u8]> = first.iter().map(|s| s.as_bytes()).collect();
        expected.sort_unstable();
        assert_eq!(new, expected);
        assert_eq!(set.len(), 100_000);
        let long = "an id longer than 127 bytes, so that its length takes two bytes of varint: ".repeat(3);
        let new = insert(&mut set, ["5", "100000", "100000", "999", long.as_str()]);
        assert_eq!(new, [b"100000".as_slice(), long.as_bytes()]);
        assert_eq!(set.len(), 100_002);
        let mut all: Vec<&[u8]> = set.iter().collect();
        all.sort_unstable();
        expected.extend([b"100000".as_slice(), long.as_bytes()]);
        expected.sort_unstable();
        assert_eq!(all, expected);
    }

    #[test]
    fn a_sixteen_byte_id_costs_under_thirty_bytes() {
        let mut set = IdSet::default();
        let ids: Vec<String> = (0..300_000u64).map(|i| format!("{i:016x}")).collect();
        insert(&mut set, ids.iter().map(String::as_str));
        let per_id = set.heap_bytes() as f64 / ids.len() as f64;
        assert!(per_id < 30.0, "{per_id} bytes per id");
    }
}
