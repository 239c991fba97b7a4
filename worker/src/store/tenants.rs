//! The tenant files, shared by every worker of the cluster.
//!
//! Each tenant has a directory (named by [`tenant_dir_name`]) holding immutable JSON segments,
//! each a JSON array of ids that were new to the tenant when it was written, a small manifest with
//! the tenant's count and its list of segments, and a lock file. A merge takes the tenant's
//! in-process mutex and its OS file lock, reads only the segments other processes added since
//! this process last looked, writes the ids the tenant lacked as one new segment and then the
//! manifest, each atomically. Its cost follows the new ids, not the tenant's size. Readers of a
//! count need no lock: they read the manifest, which is only ever replaced whole.

use std::borrow::Cow;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hashbrown::{HashMap, HashSet};
use parking_lot::Mutex;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::StoreError;
use super::backend::TenantStore;
use super::fsutil::{create_dir_durably, sync_dir, write_atomically};
use super::idset::IdSet;
use super::naming::tenant_dir_name;

const MANIFEST: &str = "manifest.json";
/// Ids a segment is loaded in, so that each batch is inserted in table order.
const LOAD_CHUNK: usize = 1 << 16;
const LOCK_FILE: &str = "LOCK";

/// The tenant directories under one database, and what this process knows of each tenant.
pub(crate) struct Tenants {
    root: PathBuf,
    states: Mutex<HashMap<String, Arc<Mutex<TenantState>>>>,
    /// Counts read from manifests, each with its manifest still open. A manifest is only ever
    /// replaced whole, by a rename that unlinks the old file: while the open file still has a
    /// link, the count read from it is current. A count then costs one `fstat`, not a path
    /// walk, an open, a read and a close.
    counts: Mutex<HashMap<String, (File, u64)>>,
}

/// Tenants whose manifests stay open for counts, at most; the cache starts afresh past this.
const OPEN_MANIFESTS: usize = 256;

/// The ids of a tenant this process has read or written, kept to tell new ids from old ones.
#[derive(Default)]
struct TenantState {
    ids: IdSet,
    /// The sequence number up to which the tenant's segments are in `ids`; 0 before the first
    /// load, which then reads every segment.
    loaded_upto: u64,
}

/// The manifest of a tenant: what its directory holds. Replaced atomically on every change.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// The format of the manifest, for future readers.
    version: u32,
    /// The full tenant name: the directory name keeps only a prefix and a hash of it.
    tenant: String,
    /// The tenant's distinct ids, all segments together (segments never share an id).
    count: u64,
    /// The sequence number the next segment gets.
    next_seq: u64,
    /// The live segments, oldest first.
    segments: Vec<Segment>,
}

/// The part of the manifest a count needs.
#[derive(Deserialize)]
struct ManifestHead {
    tenant: String,
    count: u64,
}

/// One segment file: the ids written by the flushes numbered `first..=last`, merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Segment {
    first: u64,
    last: u64,
    ids: u64,
}

impl Segment {
    fn file_name(&self) -> String {
        format!("{:012}-{:012}.json", self.first, self.last)
    }
}

impl Tenants {
    /// The tenants under `root`, which is created if missing.
    pub(crate) fn open(root: PathBuf) -> Result<Tenants, StoreError> {
        create_dir_durably(&root).map_err(|e| StoreError::io(format!("creating {}", root.display()), e))?;
        Ok(Tenants { root, states: Mutex::new(HashMap::new()), counts: Mutex::new(HashMap::new()) })
    }
}

impl TenantStore for Tenants {
    /// The tenant's distinct count as of the latest merge by any process; 0 for a tenant never
    /// merged into.
    fn count(&self, tenant: &str) -> Result<u64, StoreError> {
        if let Some((manifest, count)) = self.counts.lock().get(tenant)
            && manifest.metadata().is_ok_and(|m| m.nlink() > 0)
        {
            return Ok(*count);
        }
        let path = self.root.join(tenant_dir_name(tenant)).join(MANIFEST);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StoreError::io(format!("opening {}", path.display()), e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        let head: ManifestHead = serde_json::from_slice(&bytes).map_err(|e| StoreError::corrupt(&path, e))?;
        check_owner(&head.tenant, tenant)?;
        let mut counts = self.counts.lock();
        if counts.len() >= OPEN_MANIFESTS {
            counts.clear();
        }
        counts.insert(tenant.to_owned(), (file, head.count));
        Ok(head.count)
    }

    /// Adds `ids` to `tenant`'s set; returns how many of them were new to it.
    fn merge(&self, tenant: &str, ids: &[&str]) -> Result<u64, StoreError> {
        let state = self.states.lock().entry_ref(tenant).or_default().clone();
        let mut state = state.lock();
        let dir = self.root.join(tenant_dir_name(tenant));
        let result = merge_locked(&dir, tenant, &mut state, ids);
        if result.is_err() {
            // Whatever failed, the in-memory set may now disagree with the files: forget it and
            // read the files afresh next time.
            *state = TenantState::default();
        }
        result
    }

    fn counts_block(&self) -> bool {
        // A manifest read from the page cache, or just an fstat: cheaper than a thread hop.
        false
    }
}

fn merge_locked(dir: &Path, tenant: &str, state: &mut TenantState, ids: &[&str]) -> Result<u64, StoreError> {
    create_dir_durably(dir).map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
    let _lock = lock_tenant(dir)?;
    let mut manifest = read_manifest(dir, tenant)?;
    if state.loaded_upto == 0 {
        remove_strays(dir, &manifest)?;
        state.ids.reserve(usize::try_from(manifest.count).unwrap_or(0));
    }
    for segment in manifest.segments.iter().filter(|s| s.last > state.loaded_upto) {
        let path = dir.join(segment.file_name());
        let bytes = fs::read(&path).map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        let mut chunk = Vec::with_capacity(LOAD_CHUNK);
        parse_segment(&path, &bytes, |id| {
            chunk.push(id);
            if chunk.len() == LOAD_CHUNK {
                state.ids.insert_new(&chunk);
                chunk.clear();
            }
        })?;
        state.ids.insert_new(&chunk);
    }
    state.loaded_upto = manifest.next_seq - 1;

    let new = state.ids.insert_new(ids);
    if new.is_empty() {
        return Ok(0);
    }
    let seq = manifest.next_seq;
    let segment = Segment { first: seq, last: seq, ids: new.len() as u64 };
    write_segment(dir, &segment, &new)?;
    manifest.segments.push(segment);
    manifest.count += segment.ids;
    manifest.next_seq += 1;
    write_manifest(dir, &manifest)?;
    state.loaded_upto = seq;
    if let Err(e) = compact(dir, &mut manifest) {
        // The new ids are durable already; a failed compaction only leaves more, smaller files.
        tracing::warn!(tenant, error = %e, "segment compaction failed");
    }
    Ok(segment.ids)
}

/// Merges the newest segments while the newest is at least as large as the one before it, like
/// the carries of a binary counter: a tenant keeps O(log n) segments and each id is rewritten
/// O(log n) times over the tenant's life.
fn compact(dir: &Path, manifest: &mut Manifest) -> Result<(), StoreError> {
    let mut merged_any = Vec::new();
    while let [.., older, newer] = manifest.segments[..] {
        if older.ids > newer.ids {
            break;
        }
        let merged = Segment { first: older.first, last: newer.last, ids: older.ids + newer.ids };
        concat_segments(dir, &[older, newer], &merged)?;
        manifest.segments.truncate(manifest.segments.len() - 2);
        manifest.segments.push(merged);
        merged_any.extend([older, newer]);
    }
    if merged_any.is_empty() {
        return Ok(());
    }
    write_manifest(dir, manifest)?;
    for old in merged_any {
        if let Err(e) = fs::remove_file(dir.join(old.file_name()))
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(StoreError::io("removing a merged segment", e));
        }
    }
    sync_dir(dir).map_err(|e| StoreError::io("syncing a tenant directory", e))
}

/// Takes the tenant's OS lock, which every process holds while it changes the tenant's files.
fn lock_tenant(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
    file.lock().map_err(|e| StoreError::io(format!("locking {}", path.display()), e))?;
    Ok(file)
}

fn check_owner(owner: &str, tenant: &str) -> Result<(), StoreError> {
    if owner == tenant {
        Ok(())
    } else {
        Err(StoreError::TenantCollision { tenant: tenant.to_owned(), owner: owner.to_owned() })
    }
}

fn read_manifest(dir: &Path, tenant: &str) -> Result<Manifest, StoreError> {
    let path = dir.join(MANIFEST);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Manifest { version: 1, tenant: tenant.to_owned(), count: 0, next_seq: 1, segments: Vec::new() });
        }
        Err(e) => return Err(StoreError::io(format!("reading {}", path.display()), e)),
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| StoreError::corrupt(&path, e))?;
    check_owner(&manifest.tenant, tenant)?;
    Ok(manifest)
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), StoreError> {
    let path = dir.join(MANIFEST);
    write_atomically(&path, |out| serde_json::to_writer(out, manifest).map_err(io::Error::from))
        .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))
}

fn write_segment<T: Serialize>(dir: &Path, segment: &Segment, ids: &[T]) -> Result<(), StoreError> {
    let path = dir.join(segment.file_name());
    write_atomically(&path, |out| {
        serde_json::to_writer(&mut *out, ids)?;
        out.write_all(b"\n")
    })
    .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))
}

/// Writes `merged` as the concatenation of the segments `parts`. Segments never share an id, so
/// their arrays are joined as text, without parsing a single id: compaction costs little more
/// than copying the bytes.
fn concat_segments(dir: &Path, parts: &[Segment], merged: &Segment) -> Result<(), StoreError> {
    let mut bodies = Vec::with_capacity(parts.len());
    for part in parts {
        let path = dir.join(part.file_name());
        let bytes = fs::read(&path).map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        let body = array_body(&bytes).ok_or_else(|| StoreError::corrupt(&path, "not a JSON array"))?.to_vec();
        bodies.push(body);
    }
    let path = dir.join(merged.file_name());
    write_atomically(&path, |out| {
        out.write_all(b"[")?;
        let mut first = true;
        for body in bodies.iter().filter(|body| !body.is_empty()) {
            if !first {
                out.write_all(b",")?;
            }
            out.write_all(body)?;
            first = false;
        }
        out.write_all(b"]\n")
    })
    .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))
}

/// What lies between the brackets of a JSON array, trimmed; `None` if `bytes` is no array.
fn array_body(bytes: &[u8]) -> Option<&[u8]> {
    let inner = bytes.trim_ascii().strip_prefix(b"[")?.strip_suffix(b"]")?;
    Some(inner.trim_ascii())
}

/// Parses a segment's JSON array without building it: each id goes straight to `each`, borrowed
/// from `bytes` unless it holds JSON escapes.
fn parse_segment<'b>(path: &Path, bytes: &'b [u8], each: impl FnMut(Cow<'b, str>)) -> Result<(), StoreError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    EachId(each)
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end())
        .map_err(|e| StoreError::corrupt(path, e))
}

/// A visitor of a JSON array of strings that hands each string to a closure.
struct EachId<F>(F);

impl<'de, F: FnMut(Cow<'de, str>)> DeserializeSeed<'de> for EachId<F> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(Cow<'de, str>)> Visitor<'de> for EachId<F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array of ids")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while let Some(id) = seq.next_element::<BorrowedId<'de>>()? {
            (self.0)(id.0);
        }
        Ok(())
    }
}

/// A string borrowed from the input where it has no escapes.
struct BorrowedId<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for BorrowedId<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BorrowedId<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an id string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedId(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(BorrowedId(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// Removes what a crash may have left in a tenant directory: temporary files, segments written
/// before their manifest was, and segments merged away whose removal did not happen.
fn remove_strays(dir: &Path, manifest: &Manifest) -> Result<(), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io(format!("listing {}", dir.display()), e)),
    };
    let live: HashSet<String> = manifest.segments.iter().map(Segment::file_name).collect();
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("listing a tenant directory", e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stray = name.ends_with(".tmp") || (name.ends_with(".json") && name != MANIFEST && !live.contains(name));
        if stray {
            fs::remove_file(entry.path()).map_err(|e| StoreError::io("removing a stray file", e))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir).map_err(|e| StoreError::io("syncing a tenant directory", e))?;
    }
    Ok(())
}
