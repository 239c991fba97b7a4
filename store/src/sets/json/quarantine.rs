//! Tenants whose files cannot be read or written, set apart so that they never hold up any
//! other tenant.
//!
//! When a tenant's file or one of its segments cannot be read (damaged on disk, overwritten by
//! hand) or written (its directory unwritable), the worker merging its shard quarantines the
//! tenant instead of failing the round: the rest of the shard, and every other shard, merge on.
//! The ids that arrive for the tenant are kept, never dropped, in `<tenant file stem>.quarantine`
//! beside its file, and every count of the tenant answers an error naming the file that failed,
//! on every worker, until it is repaired.
//!
//! The quarantine file is JSON lines, readable with `jq`: a head `{"tenant","file","reason"}`,
//! then each kept id as a JSON string on a line of its own, appended as new ids arrive (each id
//! once), so that keeping an id costs its own bytes, not the file's. A later head replaces an
//! earlier one (the reason changed). A line that does not parse is damage: it is skipped, the
//! file is kept aside under `damaged/`, and the log says how many kept ids were lost, from the
//! number the shard's record holds. (A quarantine file of an earlier release, one JSON object
//! with its ids in it, reads as a head with ids.)
//!
//! A tenant quarantined by damage is tried again once its files change; by an I/O error, which
//! may pass (a full disk, a permission), also after a backoff. Repair is the operator's
//! (README, "Repairing a tenant"): restore the bad file from a backup, or remove it. A removed
//! manifest is rebuilt from the tenant's segments; a removed segment or small tenant file loses
//! the ids only it held. A tenant that loads again takes the kept ids, and the quarantine ends.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::commit::Commit;
use super::idset::IdSet;
use super::tenant::push_json_str;
use crate::backoff::Backoff;
use crate::{QuarantinedTenant, StoreError, damaged, disk};

/// The extension of quarantine files.
const EXTENSION: &str = "quarantine";
/// The longest head line a count reads.
const MAX_HEAD_BYTES: u64 = 64 << 10;

/// The head of a quarantine file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    tenant: String,
    file: PathBuf,
    reason: String,
    /// The kept ids, in a file of an earlier release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ids: Option<Vec<String>>,
}

/// What a tenant's files looked like when it was last tried, so that damage is tried again
/// only once they change: (inode, modification time, length) of its file and of the bad file.
type Signature = [Option<(u64, i64, u64)>; 2];

/// A quarantined tenant, as the worker merging its shard holds it.
pub(crate) struct Quarantine {
    tenant: String,
    /// The tenant's own file; the quarantine file is beside it.
    tenant_path: PathBuf,
    /// The file that failed.
    file: PathBuf,
    reason: String,
    /// The ids kept, each once.
    kept: IdSet,
    /// Whether the head in the file is the one above.
    head_written: bool,
    /// Set when an I/O error put the tenant here: it is tried again after a backoff, as well
    /// as when its files change.
    retry: Option<Backoff>,
    /// The state of its files when last tried; `None` before the first try by this process.
    tried: Option<Signature>,
}

impl Quarantine {
    /// The quarantine file of the tenant whose file is `tenant_path`.
    pub(crate) fn path_of(tenant_path: &Path) -> PathBuf {
        tenant_path.with_extension(EXTENSION)
    }

    /// Whether `path` names a quarantine file.
    pub(crate) fn is_quarantine_file(path: &Path) -> bool {
        path.extension().is_some_and(|e| e == EXTENSION)
    }

    /// A new quarantine of `tenant` (whose file is `tenant_path`) for `error`, tried now.
    pub(crate) fn new(tenant: &str, tenant_path: &Path, error: &StoreError) -> Quarantine {
        let mut quarantine = Quarantine {
            tenant: tenant.to_owned(),
            tenant_path: tenant_path.to_path_buf(),
            file: PathBuf::new(),
            reason: String::new(),
            kept: IdSet::default(),
            head_written: false,
            retry: None,
            tried: None,
        };
        quarantine.failed(error);
        quarantine
    }

    /// Notes that trying the tenant failed again, with `error`.
    pub(crate) fn failed(&mut self, error: &StoreError) {
        let file = match error {
            StoreError::Corrupt { path, .. } => path.clone(),
            StoreError::Io { path: Some(path), .. } => path.clone(),
            _ => self.tenant_path.clone(),
        };
        let reason = error.to_string();
        if (&file, &reason) != (&self.file, &self.reason) {
            (self.file, self.reason, self.head_written) = (file, reason, false);
        }
        self.retry = match (error, self.retry) {
            (StoreError::Io { .. }, Some(backoff)) => Some(backoff.again()),
            (StoreError::Io { .. }, None) => Some(Backoff::new()),
            _ => None,
        };
        self.tried = Some(self.signature());
    }

    /// Reads the quarantine of `tenant` (whose file is `tenant_path`) from its file: its head
    /// and every kept id on an intact line. `kept` is how many ids the shard's record says it
    /// kept, if it says; damage is logged with what was lost, and the file kept aside.
    pub(crate) fn load(
        tenant: &str,
        tenant_path: &Path,
        kept: Option<u64>,
        database: &Path,
    ) -> Result<Quarantine, StoreError> {
        let path = Quarantine::path_of(tenant_path);
        let mut quarantine = Quarantine::new(tenant, tenant_path, &StoreError::Closed);
        quarantine.tried = None;
        let bytes = match disk::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.not_found() => {
                tracing::error!(
                    tenant,
                    file = %path.display(),
                    lost_ids = kept,
                    "the quarantine file is missing: the ids it kept are lost; the tenant stays in quarantine"
                );
                quarantine.file = tenant_path.to_path_buf();
                quarantine.reason = format!("its quarantine file {} went missing; tried again", path.display());
                return Ok(quarantine);
            }
            Err(e) => return Err(e.into()),
        };
        let mut damaged_lines = 0;
        let mut damaged_bytes = 0;
        let mut lines = bytes.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            if line.is_empty() {
                continue;
            }
            if let Ok(id) = serde_json::from_slice::<String>(line) {
                quarantine.keep_loaded(&path, id.as_bytes())?;
            } else if let Ok(head) = serde_json::from_slice::<Head>(line)
                .map_err(drop)
                .and_then(|head| if head.tenant == tenant { Ok(head) } else { Err(()) })
            {
                for id in head.ids.iter().flatten() {
                    quarantine.keep_loaded(&path, id.as_bytes())?;
                }
                (quarantine.file, quarantine.reason, quarantine.head_written) = (head.file, head.reason, true);
            } else if lines.peek().is_some() {
                damaged_lines += 1;
                damaged_bytes += line.len() + 1;
            }
            // A last line cut short is the torn tail of an append that a crash interrupted:
            // its ids were never recorded as kept, and the log files still hold them.
        }
        if damaged_lines > 0 || !quarantine.head_written {
            let lost = kept.map(|kept| kept.saturating_sub(quarantine.kept.len() as u64));
            tracing::error!(
                tenant,
                file = %path.display(),
                damaged_lines,
                damaged_bytes,
                lost_ids = lost,
                "the quarantine file is damaged: its intact ids are kept, the rest are lost"
            );
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let shard = path.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
            damaged::keep_aside(database, &path, &format!("shard-{}-{name}", shard.unwrap_or_default()));
            if !quarantine.head_written {
                quarantine.file = tenant_path.to_path_buf();
                quarantine.reason = format!("its quarantine file {} was damaged; tried again", path.display());
            }
        }
        Ok(quarantine)
    }

    fn keep_loaded(&mut self, path: &Path, id: &[u8]) -> Result<(), StoreError> {
        self.kept.insert_new([id], |_| {}).map(drop).map_err(|e| StoreError::corrupt(path, e))
    }

    /// Whether `tenant` has a quarantine file beside its file `tenant_path`, and if so the file
    /// that failed and why, as its head says: what the tenant's counts answer while the shard's
    /// record lists it in quarantine.
    /// `dir` is the tenant's shard directory, held open.
    pub(crate) fn read_head(
        tenant: &str,
        dir: &File,
        tenant_path: &Path,
    ) -> Result<Option<(PathBuf, String)>, StoreError> {
        let path = Quarantine::path_of(tenant_path);
        Ok(head_of(disk::open_in(dir, &path), &path)?.map(|head| match head {
            Some(head) if head.tenant == tenant => (head.file, head.reason),
            _ => (path, "the head of its quarantine file is damaged".to_owned()),
        }))
    }

    /// The tenants with a quarantine file in the shard directory `dir`: those a rebuilt shard
    /// record lists in quarantine.
    pub(crate) fn tenants_in(dir: &Path) -> Result<BTreeSet<String>, StoreError> {
        let mut tenants = BTreeSet::new();
        for entry in disk::entries(dir)? {
            let path = entry.path();
            if Quarantine::is_quarantine_file(&path) {
                match head_of(disk::open(&path), &path)? {
                    Some(Some(head)) => {
                        tenants.insert(head.tenant);
                    }
                    Some(None) => tracing::error!(file = %path.display(), "a quarantine file without a readable head"),
                    None => {}
                }
            }
        }
        Ok(tenants)
    }

    /// Keeps `ids`, appending those not kept yet to the quarantine file (with the head first,
    /// if it changed) in `commit`, which makes them durable before the shard's record moves
    /// past the log files that held them.
    pub(crate) fn keep<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a [u8]>,
        commit: &mut Commit,
    ) -> Result<(), StoreError> {
        let mut lines = Vec::new();
        if !self.head_written {
            let head =
                Head { tenant: self.tenant.clone(), file: self.file.clone(), reason: self.reason.clone(), ids: None };
            serde_json::to_writer(&mut lines, &head).expect("a head serializes");
            lines.push(b'\n');
        }
        let path = Quarantine::path_of(&self.tenant_path);
        self.kept
            .insert_new(ids, |id| {
                push_json_str(&mut lines, id);
                lines.push(b'\n');
            })
            .map_err(|e| StoreError::corrupt(&path, e))?;
        if !lines.is_empty() {
            commit.append(&path, &lines)?;
            self.head_written = true;
        }
        Ok(())
    }

    /// The kept ids.
    pub(crate) fn kept(&self) -> impl Iterator<Item = &[u8]> {
        self.kept.iter()
    }

    /// How many ids are kept.
    pub(crate) fn kept_count(&self) -> u64 {
        self.kept.len() as u64
    }

    /// Whether the tenant should be tried again: never by this process, its files changed
    /// since, or its backoff after an I/O error is over.
    pub(crate) fn due(&self) -> bool {
        self.tried != Some(self.signature()) || self.retry.is_some_and(|b| b.due())
    }

    /// The state of the tenant's files now.
    fn signature(&self) -> Signature {
        let of = |path: &Path| {
            std::fs::metadata(path).ok().map(|m| (m.ino(), m.mtime_nsec() + m.mtime() * 1_000_000_000, m.len()))
        };
        [of(&self.tenant_path), of(&self.file)]
    }

    /// What `/stats` shows of it.
    pub(crate) fn summary(&self) -> QuarantinedTenant {
        QuarantinedTenant {
            tenant: self.tenant.clone(),
            file: self.file.clone(),
            reason: self.reason.clone(),
            kept_ids: self.kept_count(),
        }
    }

    /// The file that failed.
    pub(crate) fn file(&self) -> &Path {
        &self.file
    }
}

/// The head of the quarantine file `path`, `opened` to read it: `None` if there is no such file,
/// `Some(None)` if its first line is no head.
fn head_of(opened: disk::Result<File>, path: &Path) -> Result<Option<Option<Head>>, StoreError> {
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut line = Vec::new();
    let read = BufReader::new(file.take(MAX_HEAD_BYTES)).read_until(b'\n', &mut line);
    read.map_err(|e| disk::DiskError::new(disk::Op::Read, path, e))?;
    Ok(Some(serde_json::from_slice::<Head>(line.trim_ascii_end()).ok()))
}

/// Opens the quarantine file `path` to append to it, cutting off a last line that a crash left
/// unfinished, so that what is appended starts on a line of its own.
pub(crate) fn open_for_append(path: &Path) -> disk::Result<std::fs::File> {
    let file = disk::open_with(OpenOptions::new().read(true).append(true).create(true), path)?;
    let len = file.metadata().map_err(|e| disk::DiskError::new(disk::Op::Read, path, e))?.len();
    let mut end = len;
    let mut chunk = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        disk::read_at(&file, path, part, start)?;
        match part.iter().rposition(|&b| b == b'\n') {
            Some(at) => {
                end = start + at as u64 + 1;
                break;
            }
            None => end = start,
        }
    }
    if end < len {
        disk::set_len(&file, path, end)?;
    }
    Ok(file)
}
