//! Each shard's list of its tenants by name, `TENANTS` in its directory: tenant files are named
//! by a hash of the name, so this is what lists tenants in the order of their names.
//!
//! One JSON string per line. The owner appends a line, with the round's commit, when a tenant
//! gets its first file (appends are made durable before any file is renamed into place, so a
//! tenant file never exists without its line), and rewrites the file without a name when its
//! tenant is deleted. A line may name a tenant that has no file (a round that failed after
//! appending, a crash): readers skip tenants that count nothing. A shard written by an earlier
//! release has no list: its owner writes one from the heads of its tenant files the first time
//! it locks the shard, and a reader that finds none meanwhile reads those heads itself.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;

use super::commit::{Commit, Step};
use super::list_tenant_files;
use crate::{StoreError, disk};

/// The name of the list in a shard's directory.
pub(crate) const NAMES_FILE: &str = "TENANTS";

/// The line that lists `tenant`.
pub(crate) fn line(tenant: &str) -> Vec<u8> {
    let mut line = serde_json::to_vec(tenant).expect("a string serializes");
    line.push(b'\n');
    line
}

/// The names in a list's bytes, sorted and without repeats; a line cut short by a crash, or
/// damaged, names nobody.
pub(crate) fn parse(bytes: &[u8]) -> BTreeSet<String> {
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(&[][..], |at| &bytes[..at]);
    complete.split(|&b| b == b'\n').filter_map(|line| serde_json::from_slice::<String>(line).ok()).collect()
}

/// The names of the shard in `dir`: from its list, or, where it has none (a shard of an earlier
/// release), from the heads of its tenant files; and whether it has a list.
pub(crate) fn read(dir: &Path) -> Result<(BTreeSet<String>, bool), StoreError> {
    match disk::read(&dir.join(NAMES_FILE)) {
        Ok(bytes) => Ok((parse(&bytes), true)),
        Err(e) if e.not_found() => Ok((from_heads(dir)?, false)),
        Err(e) => Err(e.into()),
    }
}

/// Whether the shard in `dir` lacks a list that it needs: it has tenant files (written by an
/// earlier release), but no list. A shard without tenants needs none yet.
pub(crate) fn missing(dir: &Path) -> bool {
    !dir.join(NAMES_FILE).exists() && list_tenant_files(dir).is_ok_and(|files| !files.is_empty())
}

/// Stages the list of the shard in `dir` as `names`, whole.
pub(crate) fn stage(commit: &mut Commit, dir: &Path, names: &BTreeSet<String>) -> Result<(), StoreError> {
    let bytes: Vec<u8> = names.iter().flat_map(|name| line(name)).collect();
    Ok(commit.write(Step::Data, &dir.join(NAMES_FILE), &bytes)?)
}

/// The part of a tenant file that names its tenant.
#[derive(Deserialize)]
struct Head {
    tenant: String,
}

/// The names the heads of the tenant files in `dir` give; a file that does not parse names
/// nobody (its tenant is quarantined when merged into, and listed then).
fn from_heads(dir: &Path) -> Result<BTreeSet<String>, StoreError> {
    let files = match list_tenant_files(dir) {
        Ok(files) => files,
        Err(StoreError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e),
    };
    let mut names = BTreeSet::new();
    for file in files.into_keys() {
        match disk::read(&dir.join(&file)) {
            Ok(bytes) => names.extend(serde_json::from_slice::<Head>(&bytes).ok().map(|head| head.tenant)),
            Err(e) if e.not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_reads_back_its_names_but_a_line_cut_short() {
        let names = ["b", "a\nnewline", "é \"quoted\"", "a", "b"];
        let mut bytes: Vec<u8> = names.iter().flat_map(|name| line(name)).collect();
        bytes.extend_from_slice(b"\"cut sho");
        let read: Vec<String> = parse(&bytes).into_iter().collect();
        assert_eq!(read, ["a", "a\nnewline", "b", "é \"quoted\""]);
        assert!(parse(b"").is_empty());
        assert!(parse(b"\"no newline\"").is_empty());
    }
}
