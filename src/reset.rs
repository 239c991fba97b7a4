//! `coordinator --reset`: the database and the workers' log files removed, for a fresh start
//! (`make reset`), and refused while any part of the cluster runs.
//!
//! A cluster runs while something holds the coordinator's address or a local worker's, or while
//! a worker holds the lock of its write-ahead log: removing files under a running worker would
//! lose what it acknowledged, and the port and lock are what the kernel says, not what a file
//! left by a crashed process says.

use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use countapp_shared::config::Config;

/// The file every CountApp database holds, by which `--reset` knows that a directory is one.
const STORE_FILE: &str = "STORE.json";
/// The coordinator's token file, kept among the worker logs while its workers run.
const TOKEN_FILE: &str = "coordinator.token";

/// What a reset removed, for the operator to read.
#[derive(Debug, Default)]
pub struct Removed {
    /// The paths removed, directories as a whole.
    pub paths: Vec<PathBuf>,
    /// The bytes they held.
    pub bytes: u64,
}

/// Removes `config`'s database and the worker log files under its `worker_logs`, once no part
/// of the cluster runs. `config_path` is never removed, nor a directory that holds it.
pub fn reset(config: &Config, config_path: &Path) -> anyhow::Result<Removed> {
    refuse_while_running(config)?;
    let mut removed = Removed::default();
    let database: &Path = &config.database;
    if database.exists() {
        refuse_unless_database(database, config_path)?;
        removed.bytes += size_of(database);
        fs::remove_dir_all(database).with_context(|| format!("removing {}", database.display()))?;
        removed.paths.push(database.to_path_buf());
    }
    let logs: &Path = &config.worker_logs;
    let entries = match fs::read_dir(logs) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(error) => return Err(error).with_context(|| format!("listing {}", logs.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", logs.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_worker_log(&name) || name == TOKEN_FILE {
            let path = entry.path();
            removed.bytes += entry.metadata().map_or(0, |meta| meta.len());
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.paths.push(path);
        }
    }
    // Only if nothing else is in it: the directory may be shared, as /var/log is.
    if fs::remove_dir(logs).is_ok() {
        removed.paths.push(logs.to_path_buf());
    }
    Ok(removed)
}

/// An error naming what still runs, if anything of the cluster does.
fn refuse_while_running(config: &Config) -> anyhow::Result<()> {
    let stop_first = "stop the cluster first (Ctrl-C on make run, or kill -TERM <coordinator pid>), then reset";
    if in_use(config.listen.0) {
        bail!("the coordinator's address {} is in use, so the cluster may be running: {stop_first}", config.listen);
    }
    for worker in config.workers.iter().filter(|worker| worker.is_local()) {
        if let Some(addr) = worker.bind_addr().filter(|addr| in_use(*addr)) {
            bail!("worker {worker}'s address {addr} is in use, so that worker may be running: {stop_first}");
        }
    }
    // A worker on a port the config no longer lists still holds its log's lock.
    let Ok(logs) = fs::read_dir(config.database.join("wal")) else { return Ok(()) };
    for dir in logs.flatten() {
        let lock = dir.path().join("LOCK");
        let Ok(file) = File::open(&lock) else { continue };
        if matches!(file.try_lock(), Err(fs::TryLockError::WouldBlock)) {
            bail!("a running worker holds {}: {stop_first}", lock.display());
        }
    }
    Ok(())
}

/// Whether something listens on `addr` (binding it fails for want of it).
fn in_use(addr: SocketAddr) -> bool {
    matches!(TcpListener::bind(addr), Err(error) if error.kind() == io::ErrorKind::AddrInUse)
}

/// An error unless `dir` is a CountApp database (it holds the store's file, or nothing) that
/// does not hold the config file: a `database` pointing at the wrong directory must not cost
/// its contents.
fn refuse_unless_database(dir: &Path, config_path: &Path) -> anyhow::Result<()> {
    let config = config_path.canonicalize().unwrap_or_else(|_| config_path.to_path_buf());
    let canonical = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
    if config.starts_with(&canonical) {
        bail!("database {} holds the config file {}: not removing it", dir.display(), config_path.display());
    }
    let empty = fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?.next().is_none();
    if !empty && !dir.join(STORE_FILE).is_file() {
        bail!("{} has no {STORE_FILE}, so it is no CountApp database: not removing it", dir.display());
    }
    Ok(())
}

/// Whether `name` is a worker's log file: `<port>.log`, or a rotated `<port>.log.<n>`.
fn is_worker_log(name: &str) -> bool {
    let Some((port, rest)) = name.split_once(".log") else { return false };
    let numbered = rest.is_empty() || rest.strip_prefix('.').is_some_and(|n| n.parse::<u32>().is_ok());
    port.parse::<u16>().is_ok() && numbered
}

/// Bytes of the files under `dir`, as far as they can be read.
fn size_of(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => size_of(&entry.path()),
            _ => entry.metadata().map_or(0, |meta| meta.len()),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::is_worker_log;

    #[test]
    fn worker_logs_are_told_from_other_files() {
        for name in ["5001.log", "5001.log.1", "5001.log.12"] {
            assert!(is_worker_log(name), "{name}");
        }
        for name in ["coordinator.log", "5001.log.x", "5001.logs", "x5001.log", "70000.log", "notes.txt"] {
            assert!(!is_worker_log(name), "{name}");
        }
    }
}
