//! File system helpers for durable writes: a file, or a directory's entries, made durable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// Writes a new file at `path` (which must not exist) with what `fill` writes, and fsyncs it.
pub(crate) fn write_new(path: &Path, fill: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>) -> io::Result<()> {
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    let mut out = BufWriter::new(&file);
    fill(&mut out)?;
    out.flush()?;
    drop(out);
    file.sync_all()
}

/// Makes the entries of `dir` (created, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` if it is missing, making its entry in the parent durable.
pub(crate) fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    sync_dir(parent_of(dir))
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
