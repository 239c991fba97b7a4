//! A tenant's ids in memory, kept by the worker that merges the tenant to tell the ids a merge
//! brings that are new from those the tenant holds.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

/// A set of ids, compact: every id lives in one byte arena as `[varint length][bytes]`, and the
/// hash table holds only the `u32` offset of each entry. A 16-byte id costs 17 bytes of arena
/// and 4 to 9 bytes of table (its slot and control byte, at hashbrown's load of 7/16 to 7/8),
/// with no allocation of its own.
///
/// A batch is inserted in the order of the buckets its ids hash to: in a table of millions of
/// ids an insert at a random place costs a cache miss or two, while walking the table in order
/// lets the processor fetch ahead.
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

    /// Inserts `ids` and returns those the set lacked (each once), in the order inserted.
    pub(crate) fn insert_new<'a, S: AsRef<[u8]> + ?Sized>(&mut self, ids: &[&'a S]) -> Result<Vec<&'a [u8]>, SetFull> {
        self.reserve(ids.len());
        // How hashbrown places an id: at its hash modulo the number of buckets, which is the
        // next power of two above 8/7 of the capacity. Were this wrong, only the speed would be.
        let mask = (self.table.capacity() * 8 / 7).max(1).next_power_of_two() as u64 - 1;
        let hasher = &self.hasher;
        let mut hashed: Vec<(u64, &'a [u8])> = ids
            .iter()
            .map(|id| {
                let id = (*id).as_ref();
                (hasher.hash_one(id), id)
            })
            .collect();
        hashed.sort_unstable_by_key(|&(hash, _)| hash & mask);
        let mut new = Vec::new();
        for (hash, id) in hashed {
            let arena = &self.arena;
            if self.table.find(hash, |&at| entry(arena, at) == id).is_some() {
                continue;
            }
            let at = u32::try_from(self.arena.len()).map_err(|_| SetFull)?;
            if self.arena.len() + id.len() + 5 > MAX_ARENA_BYTES {
                return Err(SetFull);
            }
            put_varint(&mut self.arena, id.len());
            self.arena.extend_from_slice(id);
            let arena = &self.arena;
            self.table.insert_unique(hash, at, |&at| hasher.hash_one(entry(arena, at)));
            new.push(id);
        }
        Ok(new)
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

    fn sorted(mut ids: Vec<&[u8]>) -> Vec<&[u8]> {
        ids.sort_unstable();
        ids
    }

    #[test]
    fn insert_new_reports_each_new_id_once() {
        let mut set = IdSet::default();
        let first: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        let refs: Vec<&String> = first.iter().collect();
        let new = set.insert_new(&refs).unwrap();
        let expected: Vec<&[u8]> = first.iter().map(|s| s.as_bytes()).collect();
        assert_eq!(sorted(new), sorted(expected.clone()));
        assert_eq!(set.len(), 1000);
        let long = "an id longer than 127 bytes, so that its length takes two bytes of varint: ".repeat(3);
        let again = ["5", "5000", "5000", "999", long.as_str()];
        let new = set.insert_new(&again).unwrap();
        assert_eq!(sorted(new), sorted(vec![b"5000".as_slice(), long.as_bytes()]));
        assert_eq!(set.len(), 1002);
        let all: Vec<&[u8]> = set.iter().collect();
        assert_eq!(all.len(), 1002);
        assert_eq!(sorted(all), sorted(expected.into_iter().chain([b"5000".as_slice(), long.as_bytes()]).collect()));
    }

    #[test]
    fn a_sixteen_byte_id_costs_under_thirty_bytes() {
        let mut set = IdSet::default();
        let ids: Vec<String> = (0..300_000u64).map(|i| format!("{i:016x}")).collect();
        for chunk in ids.chunks(10_000) {
            let refs: Vec<&String> = chunk.iter().collect();
            set.insert_new(&refs).unwrap();
        }
        let per_id = set.heap_bytes() as f64 / ids.len() as f64;
        assert!(per_id < 30.0, "{per_id} bytes per id");
    }
}
