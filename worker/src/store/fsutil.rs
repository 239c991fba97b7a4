//! Crash-safe file replacement: a reader, or a process restarted after kill -9, sees either the
//! old file or the new one, never a torn mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

/// Writes `path` atomically: `fill` writes into a temporary file beside it, which is fsynced and
/// renamed over `path`, and then the directory is fsynced so that the rename itself is durable.
///
/// The temporary name is fixed per target, so callers must hold the lock that guards `path`;
/// a temporary left behind by a crash is simply overwritten by the next write.
pub(crate) fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("path has no parent directory"))?;
    let name = path.file_name().ok_or_else(|| io::Error::other("path has no file name"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    let mut out = BufWriter::with_capacity(1 << 16, &file);
    fill(&mut out)?;
    out.flush()?;
    drop(out);
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    sync_dir(dir)
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
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}
