//! The coordinator's token, kept in `worker_logs/coordinator.token` while its workers may run.
//!
//! A coordinator killed with SIGKILL leaves its workers running, holding the token it gave
//! them. The next coordinator on the same config takes that token over from the file: it can
//! then tell its predecessor's workers (which prove they hold it) from any other program on a
//! worker's port, and stop them or push them a config as its own. A graceful stop, after which
//! no worker holds the token, removes the file, so the next run starts with a fresh token.
//!
//! The file is the coordinator's secret: written with mode 0600, and taken over only if it is
//! still so (owned by this user, unreadable by others, a well-formed token); otherwise it is
//! replaced, and the workers that held the old token are not adopted.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use countapp_shared::token;

/// The file's name in `worker_logs`.
const FILE: &str = "coordinator.token";

/// The token file in `dir`.
pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The token recorded in `dir` by a previous coordinator, if it can be trusted; otherwise a
/// fresh one, recorded there.
pub(crate) fn take_over_or_create(dir: &Path) -> io::Result<String> {
    match recorded(dir) {
        Ok(Some(token)) => return Ok(token),
        Ok(None) => {}
        Err(why) => {
            tracing::warn!(file = %path(dir).display(), error = why, "not taking over the token file; replacing it")
        }
    }
    let token = token::fresh();
    record(dir, &token)?;
    Ok(token)
}

/// Records `token` in `dir`, replacing whatever is there: written whole under a temporary name
/// with mode 0600, then renamed into place.
pub(crate) fn record(dir: &Path, token: &str) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let temporary = dir.join(format!("{FILE}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&temporary);
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temporary)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    fs::rename(&temporary, path(dir))
}

/// Removes the token file from `dir`, if it is there.
pub(crate) fn remove(dir: &Path) {
    if let Err(e) = fs::remove_file(path(dir))
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(file = %path(dir).display(), error = %e, "cannot remove the token file");
    }
}

/// The token in `dir`'s file: `None` if there is none, and why not if it cannot be trusted.
fn recorded(dir: &Path) -> Result<Option<String>, String> {
    let path = path(dir);
    let metadata = match fs::symlink_metadata(&path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if !metadata.is_file() {
        return Err("it is not a regular file".to_owned());
    }
    if metadata.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!("it belongs to uid {}, not to this user", metadata.uid()));
    }
    if metadata.mode() & 0o077 != 0 {
        return Err(format!("others may read or write it (mode {:o})", metadata.mode() & 0o777));
    }
    let token = fs::read_to_string(&path).map_err(|e| e.to_string())?;
    if !token::is_hex(&token) {
        return Err("it holds no token".to_owned());
    }
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_token_is_taken_over_while_its_file_stays_private_and_replaced_once_it_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let first = take_over_or_create(&logs).unwrap();
        assert_eq!(fs::metadata(path(&logs)).unwrap().mode() & 0o777, 0o600);
        assert_eq!(take_over_or_create(&logs).unwrap(), first);

        fs::set_permissions(path(&logs), fs::Permissions::from_mode(0o644)).unwrap();
        let replaced = take_over_or_create(&logs).unwrap();
        assert_ne!(replaced, first);
        assert_eq!(fs::metadata(path(&logs)).unwrap().mode() & 0o777, 0o600);

        fs::write(path(&logs), "not a token").unwrap();
        fs::set_permissions(path(&logs), fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(take_over_or_create(&logs).unwrap(), "not a token");

        remove(&logs);
        assert!(!path(&logs).exists());
        assert_ne!(take_over_or_create(&logs).unwrap(), replaced);
    }
}
