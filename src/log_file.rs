//! A worker's log file under `worker_logs`, rotated by size: `<port>.log` is written, and at
//! `worker_log_max_bytes` it becomes `<port>.log.1`, the `.1` before it `.2`, and so on up to
//! `worker_log_files`, past which the oldest is deleted.
//!
//! The coordinator opens the file and makes it the worker's stdout and stderr, so that whatever
//! the worker prints (a panic, an error before logging starts) lands in it. The worker itself
//! rotates it: it writes its log lines to stderr, and at the size it renames the files and puts
//! the new file on its stdout and stderr (`dup2`). So a worker adopted by a restarted
//! coordinator goes on logging and rotating as before, which a pipe to the coordinator that
//! spawned it would not survive.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Stderr, as the log's writer: either plain, or the worker's log file, rotated by size.
pub struct RotatingStderr {
    rotation: Option<Mutex<Rotation>>,
}

/// Where a rotated log stands.
struct Rotation {
    path: PathBuf,
    /// Bytes in the file written now, as far as this process knows (its own writes, and the
    /// size the file had when the process started).
    written: u64,
    max_bytes: u64,
    keep: u32,
}

impl RotatingStderr {
    /// Plain stderr, never rotated: the coordinator's, or a worker run by hand.
    pub fn plain() -> RotatingStderr {
        RotatingStderr { rotation: None }
    }

    /// Stderr, which is the log file at `path`, rotated before a line would take it past
    /// `max_bytes`, `keep` rotated files kept.
    pub fn new(path: PathBuf, max_bytes: u64, keep: u32) -> RotatingStderr {
        let written = fs::metadata(&path).map_or(0, |meta| meta.len());
        RotatingStderr { rotation: Some(Mutex::new(Rotation { path, written, max_bytes, keep })) }
    }

    /// Whether this writes to stderr unrotated.
    pub fn is_plain(&self) -> bool {
        self.rotation.is_none()
    }
}

impl Write for &RotatingStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(rotation) = &self.rotation else { return io::stderr().write(buf) };
        let mut rotation = rotation.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if rotation.written > 0 && rotation.written + buf.len() as u64 > rotation.max_bytes {
            // A failed rotation leaves the line in the file it was going to: a log that grows
            // is better than a log line lost.
            if let Err(error) = rotation.rotate() {
                let _ = writeln!(io::stderr(), "cannot rotate {}: {error}", rotation.path.display());
            }
            rotation.written = 0;
        }
        let written = io::stderr().write(buf)?;
        rotation.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl Rotation {
    /// Shifts `.1` to `.2` and so on (the last is overwritten), renames the file to `.1`, and
    /// puts a new file at the path on stdout and stderr.
    fn rotate(&mut self) -> io::Result<()> {
        for n in (1..self.keep).rev() {
            match fs::rename(numbered(&self.path, n), numbered(&self.path, n + 1)) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
        }
        fs::rename(&self.path, numbered(&self.path, 1))?;
        let file = OpenOptions::new().create(true).append(true).mode(0o644).open(&self.path)?;
        for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
            // SAFETY: dup2 on two open descriptors; stdout and stderr stay open throughout,
            // pointing first at the old file, then atomically at the new one.
            if unsafe { libc::dup2(file.as_raw_fd(), fd) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// `<path>.<n>`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}
