//! The files a merge round changes, made durable together.
//!
//! A round writes every file it changes as a temporary beside its target, then:
//!
//! 1. one `syncfs`: every temporary's contents are durable;
//! 2. the claims of shards taken over from another worker are renamed into place, so that the
//!    previous owner, should it come back, sees that its cached sets are stale before any
//!    tenant file changes;
//! 3. the tenant files and segments are renamed into place, then one `syncfs`;
//! 4. the shards' records of which log files they merged are renamed into place, then one
//!    `syncfs`; only then may the merged log files be deleted;
//! 5. files made obsolete (segments merged into a larger one) are removed.
//!
//! A fixed number of sync points per round, however many tenants it touched; and a crash at any
//! instant leaves either the old file or the new one, with a shard's record never ahead of its
//! tenants' files, so the worst a crash costs is merging a log file again, which changes
//! nothing. Under `fsync: never` the syncs are left to the OS.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

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
    obsolete: Vec<PathBuf>,
    written_bytes: u64,
}

impl Commit {
    /// An empty commit; `sync` says whether to make it durable or leave that to the OS.
    pub(crate) fn new(sync: bool) -> Commit {
        Commit { sync, staged: Vec::new(), obsolete: Vec::new(), written_bytes: 0 }
    }

    /// Writes the future contents of `path` into its temporary, to be renamed at `step`.
    pub(crate) fn write(
        &mut self,
        step: Step,
        path: &Path,
        fill: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>,
    ) -> io::Result<()> {
        let tmp = temporary(path, step);
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        let mut out = BufWriter::with_capacity(1 << 16, &file);
        fill(&mut out)?;
        out.flush()?;
        drop(out);
        self.written_bytes += file.metadata()?.len();
        self.staged.push((step, tmp, path.to_path_buf()));
        Ok(())
    }

    /// Removes `path` once the commit is durable.
    pub(crate) fn remove_after(&mut self, path: PathBuf) {
        self.obsolete.push(path);
    }

    /// Whether anything was staged.
    pub(crate) fn is_empty(&self) -> bool {
        self.staged.is_empty() && self.obsolete.is_empty()
    }

    /// Bytes written into temporaries.
    pub(crate) fn written_bytes(&self) -> u64 {
        self.written_bytes
    }

    /// Puts every staged file in place durably, in the order the module documentation gives;
    /// `fs_of` is any path on the database's file system.
    pub(crate) fn finish(self, fs_of: &Path) -> io::Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let root = File::open(fs_of)?;
        self.sync_fs(&root)?;
        for step in [Step::Claim, Step::Data, Step::Progress] {
            for (_, tmp, path) in self.staged.iter().filter(|(s, _, _)| *s == step) {
                fs::rename(tmp, path)?;
            }
            if step != Step::Claim {
                self.sync_fs(&root)?;
            }
        }
        for path in &self.obsolete {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn sync_fs(&self, root: &File) -> io::Result<()> {
        if !self.sync {
            return Ok(());
        }
        // SAFETY: syncfs only reads the descriptor, which `root` keeps open for the call.
        if unsafe { libc::syncfs(root.as_raw_fd()) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

/// The temporary a file is written to before it is renamed into place: fixed per target and
/// step, so only the holder of the shard's lock writes it, and a leftover is simply overwritten.
fn temporary(path: &Path, step: Step) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(if step == Step::Claim { ".claim.tmp" } else { ".tmp" });
    path.with_file_name(name)
}

/// Whether `name` is a temporary of [`Commit::write`], which only an unfinished commit leaves.
pub(crate) fn is_temporary(name: &str) -> bool {
    name.ends_with(".tmp")
}
