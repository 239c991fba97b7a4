//! The segments that membership checks read, kept in memory by every worker: a segment never
//! changes once written, so a check asks the sets of those read before, and reads from disk
//! only the segments new since (a merge writes one per round, and now and then merges the
//! newest into a larger one). Without it, every check read and parsed all of a tenant's ids:
//! half a worker's time under a stream of checks of a tenant of a few thousand ids.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hashbrown::HashMap;
use parking_lot::Mutex;

use super::idset::IdSet;

/// Bytes of sets kept at most, per worker; the oldest kept make room for a new one.
const MAX_BYTES: usize = 128 << 20;
/// A segment larger than this share of [`MAX_BYTES`] is read for each check instead: it would
/// push out most of the others.
const MAX_SHARE: usize = 4;

/// Segments' sets, by file and checksum, oldest first out.
#[derive(Default)]
pub(crate) struct SegmentCache {
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    sets: HashMap<(PathBuf, u32), Arc<IdSet>>,
    /// The keys of `sets`, in the order kept.
    order: VecDeque<(PathBuf, u32)>,
    bytes: usize,
}

impl SegmentCache {
    /// The set of the segment at `path` whose bytes have the checksum `crc32`, if kept.
    ///
    /// The checksum tells apart two segments that had the same file name in turn: a tenant
    /// deleted and posted to again numbers its segments afresh.
    pub(crate) fn get(&self, path: &Path, crc32: u32) -> Option<Arc<IdSet>> {
        self.kept.lock().sets.get(&(path.to_path_buf(), crc32)).cloned()
    }

    /// Whether a segment of `ids` ids is worth keeping.
    pub(crate) fn keeps(ids: u64) -> bool {
        // About 30 bytes per id of 16 bytes, arena and table.
        usize::try_from(ids).is_ok_and(|ids| ids.saturating_mul(32) <= MAX_BYTES / MAX_SHARE)
    }

    /// Keeps `set`, read from the segment at `path` with the checksum `crc32`.
    pub(crate) fn insert(&self, path: &Path, crc32: u32, set: Arc<IdSet>) {
        let bytes = set.heap_bytes();
        let mut kept = self.kept.lock();
        let kept = &mut *kept;
        while kept.bytes + bytes > MAX_BYTES
            && let Some(oldest) = kept.order.pop_front()
        {
            kept.bytes -= kept.sets.remove(&oldest).map_or(0, |set| set.heap_bytes());
        }
        let key = (path.to_path_buf(), crc32);
        if kept.sets.insert(key.clone(), set).is_none() {
            kept.order.push_back(key);
            kept.bytes += bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(ids: &[&str]) -> Arc<IdSet> {
        let mut set = IdSet::default();
        set.insert_new(ids.iter().map(|id| id.as_bytes()), |_| {}).unwrap();
        Arc::new(set)
    }

    #[test]
    fn a_segment_is_found_by_its_file_and_checksum_and_the_oldest_make_room() {
        let cache = SegmentCache::default();
        let a = Path::new("db/shards/00/t.x/000000000001-000000000001.json");
        cache.insert(a, 1, set_of(&["1", "2"]));
        assert!(cache.get(a, 1).is_some_and(|set| set.contains(b"2") && !set.contains(b"3")));
        assert!(cache.get(a, 2).is_none(), "the same name with other bytes: another segment");

        let big = Arc::new({
            let mut set = IdSet::default();
            let ids: Vec<String> = (0..1_000_000).map(|i| format!("{i:016}")).collect();
            set.insert_new(ids.iter().map(|id| id.as_bytes()), |_| {}).unwrap();
            set
        });
        let fits = MAX_BYTES / big.heap_bytes();
        for n in 0..=fits {
            cache.insert(Path::new(&format!("big-{n}")), 0, big.clone());
        }
        assert!(cache.get(a, 1).is_none(), "the oldest made room");
        assert!(cache.get(Path::new(&format!("big-{fits}")), 0).is_some(), "the newest is kept");
        assert!(cache.kept.lock().bytes <= MAX_BYTES);
    }
}
