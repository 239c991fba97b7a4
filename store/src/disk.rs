//! Every file operation of the store, in one place, and the helpers for durable writes.
//!
//! The store touches the disk only through these functions, so that each call is a point where
//! the fault-injection tests make it fail, the way SQLite's I/O-error tests fail each call in
//! turn: in builds with the `failpoints` feature, every call passes the fail point `store-io`
//! and the one of its kind, `store-io-<kind>` (see [`Op::fail_point`]); configured with
//! `return(ENOSPC)` (or `EIO`, `EMFILE`, ... by name, `EIO` by default) the call fails with
//! that error before it touches anything. `5*off->1*return(EIO)->off` fails the sixth call.
//!
//! Errors say what was done to which file ([`DiskError`]), so that the store's callers need no
//! context of their own.

use std::fs::{self, File, OpenOptions, ReadDir, TryLockError};
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

/// A kind of file operation: what a [`DiskError`] says was done, and the name of its fail point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Opening an existing file to read it.
    Open,
    /// Creating (or opening to write) a file.
    Create,
    /// Reading a file's bytes.
    Read,
    /// Mapping a file into memory.
    Map,
    /// Listing a directory.
    List,
    /// Writing a file's bytes.
    Write,
    /// Making a file's contents durable.
    Sync,
    /// Making the active write-ahead log file durable: the fsync an acknowledgement may wait for.
    LogSync,
    /// Making a directory's entries durable.
    SyncDir,
    /// Making a whole file system durable (`syncfs`).
    SyncFs,
    /// Renaming a file into place.
    Rename,
    /// Renaming a closed write-ahead log file from `.open` to `.log`, which makes it final.
    CloseLog,
    /// Removing a file.
    Remove,
    /// Linking a file under a second name.
    Link,
    /// Creating a directory.
    CreateDir,
    /// Cutting a file back to a length.
    Truncate,
    /// Taking a file lock.
    Lock,
}

impl Op {
    /// The name of this kind's own fail point.
    pub fn fail_point(self) -> &'static str {
        match self {
            Op::Open => "store-io-open",
            Op::Create => "store-io-create",
            Op::Read => "store-io-read",
            Op::Map => "store-io-map",
            Op::List => "store-io-list",
            Op::Write => "store-io-write",
            Op::Sync => "store-io-sync",
            Op::LogSync => "store-io-log-sync",
            Op::SyncDir => "store-io-sync-dir",
            Op::SyncFs => "store-io-syncfs",
            Op::Rename => "store-io-rename",
            Op::CloseLog => "store-io-close-log",
            Op::Remove => "store-io-remove",
            Op::Link => "store-io-link",
            Op::CreateDir => "store-io-create-dir",
            Op::Truncate => "store-io-truncate",
            Op::Lock => "store-io-lock",
        }
    }

    fn doing(self) -> &'static str {
        match self {
            Op::Open => "opening",
            Op::Create => "creating",
            Op::Read => "reading",
            Op::Map => "mapping",
            Op::List => "listing",
            Op::Write => "writing",
            Op::Sync => "syncing",
            Op::LogSync => "syncing the log file",
            Op::SyncDir => "syncing the directory",
            Op::SyncFs => "syncing the file system of",
            Op::Rename => "renaming",
            Op::CloseLog => "closing the log file",
            Op::Remove => "removing",
            Op::Link => "linking",
            Op::CreateDir => "creating the directory",
            Op::Truncate => "truncating",
            Op::Lock => "locking",
        }
    }
}

/// A file operation that failed: what was done, to which file, and the operating system's error.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", self.context())]
pub(crate) struct DiskError {
    pub(crate) op: Op,
    pub(crate) path: PathBuf,
    #[source]
    pub(crate) source: io::Error,
}

impl DiskError {
    pub(crate) fn new(op: Op, path: &Path, source: io::Error) -> DiskError {
        DiskError { op, path: path.to_path_buf(), source }
    }

    /// What was done to which file: "renaming db/shards/001/SHARD.json.tmp".
    pub(crate) fn context(&self) -> String {
        format!("{} {}", self.op.doing(), self.path.display())
    }

    /// Whether the file (or directory) was not there: often an answer rather than a failure.
    pub(crate) fn not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }
}

/// The outcome of a file operation.
pub(crate) type Result<T> = std::result::Result<T, DiskError>;

/// Runs `op` on `path` with `run`, unless a fail point makes it fail first.
fn run<T>(op: Op, path: &Path, run: impl FnOnce() -> io::Result<T>) -> Result<T> {
    inject(op, path).and_then(|()| run()).map_err(|e| DiskError::new(op, path, e))
}

#[cfg(not(feature = "failpoints"))]
fn inject(_: Op, _: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(feature = "failpoints")]
fn inject(op: Op, path: &Path) -> io::Result<()> {
    faults::inject(op, path)
}

/// What the fault-injection tests see of the fail points: the calls they made fail.
#[cfg(feature = "failpoints")]
pub mod faults {
    use std::io;
    use std::path::{Path, PathBuf};

    use parking_lot::Mutex;

    use super::Op;

    /// The calls made to fail since the last [`take_injected`], in order.
    static INJECTED: Mutex<Vec<(Op, PathBuf)>> = Mutex::new(Vec::new());

    pub(super) fn inject(op: Op, path: &Path) -> io::Result<()> {
        let fail = |arg: Option<String>| errno(arg.as_deref());
        let errno = (|| {
            fail::fail_point!("store-io", |arg| Some(fail(arg)));
            fail::fail_point!(op.fail_point(), |arg| Some(fail(arg)));
            None
        })();
        match errno {
            None => Ok(()),
            Some(errno) => {
                INJECTED.lock().push((op, path.to_path_buf()));
                Err(io::Error::from_raw_os_error(errno))
            }
        }
    }

    /// The errno a fail point's argument names; `EIO` when it names none.
    fn errno(arg: Option<&str>) -> i32 {
        match arg {
            Some("ENOSPC") => libc::ENOSPC,
            Some("EMFILE") => libc::EMFILE,
            Some("EACCES") => libc::EACCES,
            Some("EROFS") => libc::EROFS,
            Some("EDQUOT") => libc::EDQUOT,
            _ => libc::EIO,
        }
    }

    /// The calls made to fail since the last call, in order, and forgets them.
    pub fn take_injected() -> Vec<(Op, PathBuf)> {
        std::mem::take(&mut *INJECTED.lock())
    }
}

/// Opens an existing file to read it.
pub(crate) fn open(path: &Path) -> Result<File> {
    run(Op::Open, path, || File::open(path))
}

/// Opens the existing file at `path`, in the directory `dir` held open, to read it: only the
/// file's name is looked up, not its whole path (a listing opens a thousand files in the same
/// few directories, and walking each path from the root was a fifth of its time).
///
/// Without updating its access time where the process may say so (it owns the file): the first
/// read of a file written since would otherwise dirty its inode, a journal write per tenant
/// when a listing first reads the tenants a load just made.
pub(crate) fn open_in(dir: &File, path: &Path) -> Result<File> {
    use nix::fcntl::{OFlag, openat};
    run(Op::Open, path, || {
        let name = path.file_name().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let mode = nix::sys::stat::Mode::empty();
        let opened = match openat(dir, name, flags | OFlag::O_NOATIME, mode) {
            Err(nix::errno::Errno::EPERM) => openat(dir, name, flags, mode),
            opened => opened,
        };
        Ok(File::from(opened?))
    })
}

/// Opens a file with `options`, which create or write it.
pub(crate) fn open_with(options: &OpenOptions, path: &Path) -> Result<File> {
    run(Op::Create, path, || options.open(path))
}

/// The whole contents of the file at `path`.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    let mut file = open(path)?;
    let mut bytes = Vec::new();
    read_to_end(&mut file, path, &mut bytes)?;
    Ok(bytes)
}

/// Appends the rest of `file` (at `path`) to `out`; the file's metadata as it was before.
///
/// The buffer is sized from that length, plus the byte that finds the end at once, and grows if
/// the file does: one `fstat` and two reads for a file that does not change, where `File`'s own
/// `read_to_end` would ask for the length again and seek (a listing reads a thousand files).
pub(crate) fn read_to_end(file: &mut File, path: &Path, out: &mut Vec<u8>) -> Result<fs::Metadata> {
    run(Op::Read, path, || {
        let metadata = file.metadata()?;
        out.reserve(usize::try_from(metadata.len()).unwrap_or(0).saturating_add(1));
        (&*file).take(u64::MAX).read_to_end(out)?;
        Ok(metadata)
    })
}

/// The metadata of the file at `path`.
pub(crate) fn metadata(path: &Path) -> Result<fs::Metadata> {
    run(Op::Read, path, || fs::metadata(path))
}

/// The metadata of `file` (at `path`).
pub(crate) fn metadata_of(file: &File, path: &Path) -> Result<fs::Metadata> {
    run(Op::Read, path, || file.metadata())
}

/// Fills `buf` with the bytes of `file` (at `path`) from `offset` on.
pub(crate) fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    run(Op::Read, path, || std::os::unix::fs::FileExt::read_exact_at(file, buf, offset))
}

/// The file at `path` mapped into memory; `None` if it is empty, which cannot be mapped.
///
/// # Safety
/// The caller must make sure that nothing writes into or truncates the file while the map lives.
pub(crate) unsafe fn map(path: &Path) -> Result<Option<Mmap>> {
    let file = open(path)?;
    run(Op::Map, path, || {
        if file.metadata()?.len() == 0 {
            return Ok(None);
        }
        // SAFETY: the caller vouches that the file does not change while mapped.
        unsafe { Mmap::map(&file) }.map(Some)
    })
}

/// The entries of the directory `dir`.
pub(crate) fn list(dir: &Path) -> Result<ReadDir> {
    run(Op::List, dir, || fs::read_dir(dir))
}

/// Lists `dir` like [`list`], the entries read one by one: an entry that cannot be read fails
/// like the listing.
pub(crate) fn entries(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    list(dir)?.map(|entry| entry.map_err(|e| DiskError::new(Op::List, dir, e))).collect()
}

/// Writes `bytes` as the whole contents of `path`, created or truncated; not made durable.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let file = open_with(OpenOptions::new().write(true).create(true).truncate(true), path)?;
    write_all(&file, path, bytes)
}

/// Writes all of `bytes` to `file` (at `path`), at its position.
pub(crate) fn write_all(mut file: &File, path: &Path, bytes: &[u8]) -> Result<()> {
    run(Op::Write, path, || file.write_all(bytes))
}

/// Writes a new file at `path` (which must not exist) with what `fill` writes, and fsyncs it.
pub(crate) fn write_new(path: &Path, fill: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>) -> Result<()> {
    let file = open_with(OpenOptions::new().write(true).create_new(true), path)?;
    run(Op::Write, path, || {
        let mut out = BufWriter::new(&file);
        fill(&mut out)?;
        out.flush()
    })?;
    sync(&file, path)
}

/// Makes the contents of `file` (at `path`) durable.
pub(crate) fn sync(file: &File, path: &Path) -> Result<()> {
    run(Op::Sync, path, || file.sync_all())
}

/// Makes the contents of the file at `path` durable.
pub(crate) fn sync_path(path: &Path) -> Result<()> {
    sync(&open(path)?, path)
}

/// Makes the data of the active log file `file` (at `path`) durable: the fsync that an
/// acknowledgement under `fsync: always` waits for.
pub(crate) fn sync_log(file: &File, path: &Path) -> Result<()> {
    run(Op::LogSync, path, || file.sync_data())
}

/// Makes the entries of `dir` (created, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let handle = open(dir)?;
    run(Op::SyncDir, dir, || handle.sync_all())
}

/// Makes everything written to the file system that holds `path` durable, at once.
pub(crate) fn syncfs(path: &Path) -> Result<()> {
    let handle = open(path)?;
    run(Op::SyncFs, path, || {
        // SAFETY: syncfs only reads the descriptor, which `handle` keeps open for the call.
        if unsafe { libc::syncfs(handle.as_raw_fd()) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    })
}

/// Renames `from` to `to`, replacing `to` if it exists.
pub(crate) fn rename(from: &Path, to: &Path) -> Result<()> {
    run(Op::Rename, from, || fs::rename(from, to))
}

/// Renames the closed log file `from` (`.open`) to `to` (`.log`), making it final.
pub(crate) fn close_log(from: &Path, to: &Path) -> Result<()> {
    run(Op::CloseLog, from, || fs::rename(from, to))
}

/// Removes the file at `path`.
pub(crate) fn remove(path: &Path) -> Result<()> {
    run(Op::Remove, path, || fs::remove_file(path))
}

/// Removes the directory at `dir` and every file in it (it holds no directory).
pub(crate) fn remove_dir(dir: &Path) -> Result<()> {
    for entry in entries(dir)? {
        remove(&entry.path())?;
    }
    run(Op::Remove, dir, || fs::remove_dir(dir))
}

/// Removes the file at `path` if it is there; whether it was.
pub(crate) fn remove_if_present(path: &Path) -> Result<bool> {
    match remove(path) {
        Ok(()) => Ok(true),
        Err(e) if e.not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Links the file `from` under the name `to` as well; an existing `to` is left as it is.
pub(crate) fn hard_link(from: &Path, to: &Path) -> Result<()> {
    run(Op::Link, to, || match fs::hard_link(from, to) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        linked => linked,
    })
}

/// Links the file `from` under the name `to`, failing if `to` exists: how a file is put in
/// place only if no other process put one there first.
pub(crate) fn link_new(from: &Path, to: &Path) -> Result<()> {
    run(Op::Link, to, || fs::hard_link(from, to))
}

/// Creates the directory `dir` and its missing parents.
pub(crate) fn create_dir_all(dir: &Path) -> Result<()> {
    run(Op::CreateDir, dir, || fs::create_dir_all(dir))
}

/// Creates `dir` if it is missing, making its entry in the parent durable.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    create_dir_all(dir)?;
    sync_dir(parent_of(dir))
}

/// Cuts `file` (at `path`) back to `len` bytes.
pub(crate) fn set_len(file: &File, path: &Path, len: u64) -> Result<()> {
    run(Op::Truncate, path, || file.set_len(len))
}

/// Takes the exclusive lock of `file` (at `path`) if nobody holds a lock on it: false if
/// another process does.
pub(crate) fn try_lock(file: &File, path: &Path) -> Result<bool> {
    run(Op::Lock, path, || match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    })
}

/// Whether another process holds the exclusive lock of `file` (at `path`): tested with a shared
/// lock, released at once when it is taken.
pub(crate) fn is_locked(file: &File, path: &Path) -> Result<bool> {
    run(Op::Lock, path, || match file.try_lock_shared() {
        Ok(()) => file.unlock().map(|()| false),
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => Err(e),
    })
}

/// The directory holding `path`'s entry: `.` for a relative name of one component (`db/`, whose
/// parent is the empty path), none other than itself for `/`.
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
        Some(parent) => parent,
        None => path,
    }
}
