//! The files a merge round changes, made durable together.
//!
//! A round writes every file it changes as a temporary beside its target, then:
//!
//! 1. makes every temporary's contents durable, and the files appended to in place;
//! 2. renames the claims of shards taken over from another worker into place, so that the
//!    previous owner, should it come back, sees that its cached sets are stale before any
//!    tenant file changes;
//! 3. renames the tenant files and segments into place, and makes the renames durable;
//! 4. renames the shards' records of which log files they merged into place, and makes those
//!    durable; only then may the merged log files be deleted;
//! 5. removes the files made obsolete (segments merged into a larger one, a deleted tenant's
//!    files), in the order they were staged.
//!
//! A round of a few files fsyncs each of them, in parallel, and each directory it renamed into
//! once; a larger round (many small tenants) makes all of it durable with one `syncfs` per step,
//! which costs the same for ten thousand files as for ten, but also waits for whatever else the
//! file system holds unwritten. Either way a fixed number of sync points per round, however many
//! tenants it touched; and a crash at any instant leaves either the old file or the new one,
//! with a shard's record never ahead of its tenants' files, so the worst a crash costs is
//! merging a log file again, which changes nothing. Under `fsync: never` the syncs are left to
//! the OS.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use crate::disk::{self, parent_of};

/// Files (or directories) a step syncs one by one, at most; past this, one `syncfs`.
const MAX_FILE_SYNCS: usize = 64;
/// Threads that fsync files at once.
const SYNC_THREADS: usize = 8;

/// Which step of [`Commit::finish`] renames a file into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// A shard's claim by a new owner: before anything else changes.
    Claim,
    /// A tenant file or segment.
    Data,
    /// A shard's record of the log files it merged: after the data it describes.
    Progress,
}

/// Files written but not yet in place; dropping it unfinished leaves only temporaries, which
/// the next writer of the same file overwrites.
pub(crate) struct Commit {
    sync: bool,
    staged: Vec<(Step, PathBuf, PathBuf)>,
    /// Files appended to in place (quarantine files), made durable with the temporaries.
    appended: Vec<PathBuf>,
    /// What to remove once durable, in order: files, and directories of files (`true`).
    obsolete: Vec<(PathBuf, bool)>,
    written_bytes: u64,
}

impl Commit {
    /// An empty commit; `sync` says whether to make it durable or leave that to the OS.
    pub(crate) fn new(sync: bool) -> Commit {
        Commit { sync, staged: Vec::new(), appended: Vec::new(), obsolete: Vec::new(), written_bytes: 0 }
    }

    /// Writes `bytes`, the future contents of `path`, into its temporary, to be renamed at `step`.
    pub(crate) fn write(&mut self, step: Step, path: &Path, bytes: &[u8]) -> disk::Result<()> {
        let tmp = temporary(path, step);
        disk::write(&tmp, bytes)?;
        self.written_bytes += bytes.len() as u64;
        self.staged.push((step, tmp, path.to_path_buf()));
        Ok(())
    }

    /// Appends `lines` to the file `path` of whole lines (created if need be), in place: made
    /// durable with the temporaries, before any record moves. A crash before that leaves at
    /// most a last line cut short, which the next append cuts off.
    pub(crate) fn append(&mut self, path: &Path, lines: &[u8]) -> disk::Result<()> {
        let file = super::quarantine::open_for_append(path)?;
        disk::write_all(&file, path, lines)?;
        self.written_bytes += lines.len() as u64;
        if !self.appended.iter().any(|p| p == path) {
            self.appended.push(path.to_path_buf());
        }
        Ok(())
    }

    /// Removes `path` once the commit is durable.
    pub(crate) fn remove_after(&mut self, path: PathBuf) {
        self.obsolete.push((path, false));
    }

    /// Removes the directory `dir` and the files in it once the commit is durable, including
    /// those the commit itself renamed into it.
    pub(crate) fn remove_dir_after(&mut self, dir: PathBuf) {
        self.obsolete.push((dir, true));
    }

    /// An empty commit of the same kind, to stage one tenant's files in: [`Commit::absorb`]
    /// takes them into this one once the tenant merged whole, [`Commit::discard`] drops them
    /// if it failed part-way, so that a failure never leaves half a tenant's change (a segment
    /// removed, the manifest that lists it unchanged) in the round's commit.
    pub(crate) fn nested(&self) -> Commit {
        Commit::new(self.sync)
    }

    /// Takes in everything `other` staged.
    pub(crate) fn absorb(&mut self, other: Commit) {
        self.staged.extend(other.staged);
        self.appended.extend(other.appended);
        self.obsolete.extend(other.obsolete);
        self.written_bytes += other.written_bytes;
    }

    /// Drops everything staged, removing the temporaries written; one that cannot be removed
    /// now is overwritten by the next write of its file, or removed with the other leftovers
    /// when the shard next changes hands.
    pub(crate) fn discard(self) {
        for (_, tmp, _) in self.staged {
            let _ = disk::remove_if_present(&tmp);
        }
    }

    /// Bytes written into temporaries.
    pub(crate) fn written_bytes(&self) -> u64 {
        self.written_bytes
    }

    /// Puts every staged file in place durably, in the order the module documentation gives;
    /// `fs_of` is any path on the database's file system.
    pub(crate) fn finish(self, fs_of: &Path) -> disk::Result<()> {
        let written =
            self.staged.iter().map(|(_, tmp, _)| tmp.as_path()).chain(self.appended.iter().map(PathBuf::as_path));
        self.make_durable(&written.collect::<Vec<_>>(), fs_of)?;
        for steps in [&[Step::Claim, Step::Data][..], &[Step::Progress]] {
            let mut dirs = BTreeSet::new();
            if steps.contains(&Step::Data) {
                // An appended file may be new: its entry is made durable with the data's.
                dirs.extend(self.appended.iter().map(|path| parent_of(path)));
            }
            for (_, tmp, path) in self.staged.iter().filter(|(s, _, _)| steps.contains(s)) {
                disk::rename(tmp, path)?;
                dirs.insert(parent_of(path));
            }
            self.make_durable(&dirs.into_iter().collect::<Vec<_>>(), fs_of)?;
        }
        for (path, dir) in &self.obsolete {
            match dir {
                false => drop(disk::remove_if_present(path)?),
                true => match disk::remove_dir(path) {
                    Err(e) if e.not_found() => {}
                    done => done?,
                },
            }
        }
        Ok(())
    }

    /// Makes `paths` (files, or directories whose entries changed) durable: each one, or the
    /// whole file system at once if they are many.
    fn make_durable(&self, paths: &[&Path], fs_of: &Path) -> disk::Result<()> {
        if !self.sync || paths.is_empty() {
            return Ok(());
        }
        if paths.len() > MAX_FILE_SYNCS {
            return disk::syncfs(fs_of);
        }
        thread::scope(|scope| {
            let workers: Vec<_> = paths
                .chunks(paths.len().div_ceil(SYNC_THREADS))
                .map(|chunk| scope.spawn(move || chunk.iter().try_for_each(|path| disk::sync_path(path))))
                .collect();
            workers
                .into_iter()
                .try_for_each(|worker| worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        })
    }
}

/// The temporary a file is written to before it is renamed into place: a name of its own for
/// each write, so that a file staged twice in one commit (a tenant repaired, then merged into)
/// is renamed twice, the later content last, and a tenant's change dropped from a commit never
/// takes a temporary that another change staged. Leftovers of an unfinished commit are removed
/// by the next holder of the shard's lock (or of the tenant, for its segments).
fn temporary(path: &Path, step: Step) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    name.push(if step == Step::Claim { ".claim.tmp" } else { ".tmp" });
    path.with_file_name(name)
}

/// Whether `name` is a temporary of [`Commit::write`], which only an unfinished commit leaves.
pub(crate) fn is_temporary(name: &str) -> bool {
    name.ends_with(".tmp")
}
