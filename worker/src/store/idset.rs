//! A tenant's ids in memory, kept to tell the ids a flush brings that are new from those the
//! tenant holds.

use std::hash::BuildHasher;

use compact_str::CompactString;
use hashbrown::{DefaultHashBuilder, HashTable};

/// A set of ids.
///
/// Ids of up to 24 bytes live inline in their `CompactString`, with no allocation of their own,
/// which keeps the memory per id low. A batch is inserted in the order of the buckets its ids
/// hash to: in a table of millions of ids an insert at a random place costs a cache miss or two,
/// while walking the table in order lets the processor fetch ahead.
#[derive(Default)]
pub(crate) struct IdSet {
    table: HashTable<CompactString>,
    hasher: DefaultHashBuilder,
}

impl IdSet {
    /// Makes room for `additional` more ids.
    pub(crate) fn reserve(&mut self, additional: usize) {
        let hasher = &self.hasher;
        self.table.reserve(additional, |id| hasher.hash_one(id.as_str()));
    }

    /// Inserts `ids` and returns those the set lacked (each once), in the order inserted.
    pub(crate) fn insert_new<'a, S: AsRef<str>>(&mut self, ids: &'a [S]) -> Vec<&'a str> {
        self.reserve(ids.len());
        // How hashbrown places an id: at its hash modulo the number of buckets, which is the
        // next power of two above 8/7 of the capacity. Were this wrong, only the speed would be.
        let mask = (self.table.capacity() * 8 / 7).max(1).next_power_of_two() as u64 - 1;
        let hasher = &self.hasher;
        let mut hashed: Vec<(u64, &str)> = ids.iter().map(|id| (hasher.hash_one(id.as_ref()), id.as_ref())).collect();
        hashed.sort_unstable_by_key(|&(hash, _)| hash & mask);
        let mut new = Vec::new();
        for (hash, id) in hashed {
            if self.table.find(hash, |known| known == id).is_none() {
                self.table.insert_unique(hash, CompactString::from(id), |known| hasher.hash_one(known.as_str()));
                new.push(id);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_new_reports_each_new_id_once() {
        let mut set = IdSet::default();
        let first: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        let mut new = set.insert_new(&first);
        new.sort_unstable();
        let mut expected: Vec<&str> = first.iter().map(String::as_str).collect();
        expected.sort_unstable();
        assert_eq!(new, expected);
        let again = ["5", "5000", "5000", "999", "a long id that does not fit inline, not at all"];
        let mut new = set.insert_new(&again);
        new.sort_unstable();
        assert_eq!(new, ["5000", "a long id that does not fit inline, not at all"]);
    }
}
