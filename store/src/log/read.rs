//! Reading a final log file: its intact records' runs, and the damage found on the way, told
//! and kept aside the one way every backend shares.

use std::path::Path;

use memmap2::Mmap;

use super::Damage;
use super::record::{Entry, Records, Run};
use crate::disk;

/// A final log file's contents: mapped, so that the owners of its shards share the page cache
/// rather than each copy it. Only final log files are mapped, and nothing ever changes or
/// truncates one: a closed file is immutable, and a dead worker's file stays as it died.
pub(crate) struct Contents(Option<Mmap>);

impl Contents {
    /// The contents of the final log file at `path`; `None` if it is gone (merged and deleted
    /// by another worker, or renamed by its restarted worker).
    pub(crate) fn read(path: &Path) -> disk::Result<Option<Contents>> {
        // SAFETY: a final log file is never written or truncated again (see above), so the
        // mapped bytes cannot change under the reader.
        match unsafe { disk::map(path) } {
            Ok(map) => Ok(Some(Contents(map))),
            Err(e) if e.not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }

    /// The file's length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// The number of the file its worker wrote before it, as its header says (none in a file of
    /// an earlier release).
    pub(crate) fn prev(&self) -> Option<u64> {
        Records::new(self.bytes()).header().map(|header| header.prev)
    }

    /// The runs of the file's intact records, in file order.
    pub(crate) fn runs(&self) -> impl Iterator<Item = Run<'_>> {
        Records::new(self.bytes())
            .filter_map(|entry| if let Entry::Record(payload) = entry { Some(payload) } else { None })
            .flat_map(|payload| payload.runs())
    }

    /// Walks the whole file once, handing each run of an intact record to `each_run`, and
    /// accounts for the damage found: a torn tail (a crash mid-append, never acknowledged) is
    /// dropped; damage before intact records is logged, and the file kept aside under the
    /// database's `damaged/` (see [`Damage::keep_aside`]). `path` is the file's, `database` the
    /// database's root.
    pub(crate) fn scan<'a>(&'a self, database: &Path, path: &Path, mut each_run: impl FnMut(Run<'a>)) -> Damage {
        let mut damage = Damage::default();
        let mut records = Records::new(self.bytes()).peekable();
        while let Some(entry) = records.next() {
            match entry {
                Entry::Record(payload) => payload.runs().for_each(&mut each_run),
                Entry::Damaged { offset, len } => damage.note(path, offset, len, records.peek().is_none()),
            }
        }
        damage.keep_aside(database, path);
        damage
    }
}

/// The items in the log file at `path`, intact records only; `None` if it is gone.
pub(crate) fn items_in(path: &Path) -> disk::Result<Option<u64>> {
    Ok(Contents::read(path)?.map(|contents| contents.runs().map(|run| run.count_ids()).sum()))
}
