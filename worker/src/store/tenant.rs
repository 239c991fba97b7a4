//! A tenant's files, and its ids in the memory of the worker that merges it.
//!
//! Every tenant has one file, `<name>.<hash>.json` in its shard's directory, readable with `jq`:
//!
//! ```text
//! {"tenant":"t1","count":2,"ids":["1","4"]}                            a small tenant
//! {"tenant":"big","count":1200345,"next_seq":9,"segments":[{"first":1,"last":8,"ids":1200345}]}
//! ```
//!
//! A small tenant keeps its ids in its file, rewritten whole when they change: one file, one
//! block of disk. Past [`SMALL_MAX_IDS`] ids a tenant keeps them in immutable segments instead,
//! JSON arrays in the directory `<name>.<hash>/`, each holding ids new when it was written, so
//! that a merge writes only its new ids. The newest segments are merged while the newest is at
//! least as large as the one before, like the carries of a binary counter: a tenant keeps
//! O(log n) segments, and each id is rewritten O(log n) times over the tenant's life.

use std::borrow::Cow;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use hashbrown::HashSet;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::StoreError;
use super::commit::{Commit, Step, is_temporary};
use super::idset::IdSet;

/// Ids a tenant keeps in its own file, at most; past this it keeps them in segments.
pub(crate) const SMALL_MAX_IDS: usize = 1024;
/// Ids a segment is loaded in, so that each batch is inserted in table order.
const LOAD_CHUNK: usize = 1 << 16;

/// One segment file: the ids written by the merges numbered `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Segment {
    first: u64,
    last: u64,
    ids: u64,
}

impl Segment {
    fn file_name(&self) -> String {
        format!("{:012}-{:012}.json", self.first, self.last)
    }
}

/// A tenant's file as read: its head, and either its ids or its segments.
#[derive(Deserialize)]
struct TenantFile<'a> {
    #[serde(borrow)]
    tenant: Cow<'a, str>,
    count: u64,
    #[serde(default, borrow)]
    ids: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    next_seq: Option<u64>,
    #[serde(default)]
    segments: Option<Vec<Segment>>,
}

/// The part of a tenant's file a count needs.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    tenant: Cow<'a, str>,
    count: u64,
}

/// The count in the tenant file `bytes` of `path`, checked to be `tenant`'s.
pub(crate) fn read_count(path: &Path, bytes: &[u8], tenant: &str) -> Result<u64, StoreError> {
    let head: Head = serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt(path, e))?;
    check_owner(&head.tenant, tenant)?;
    Ok(head.count)
}

fn check_owner(owner: &str, tenant: &str) -> Result<(), StoreError> {
    if owner == tenant {
        Ok(())
    } else {
        Err(StoreError::TenantCollision { tenant: tenant.to_owned(), owner: owner.to_owned() })
    }
}

/// Where a tenant keeps its ids.
enum Layout {
    /// In its file.
    Small,
    /// In segments, oldest first; `next_seq` numbers the next one.
    Segments { next_seq: u64, segments: Vec<Segment> },
}

/// A tenant loaded by the worker that merges it: its ids, exactly those of its files.
pub(crate) struct Tenant {
    /// The tenant file.
    path: PathBuf,
    /// The directory of its segments.
    segments_dir: PathBuf,
    ids: IdSet,
    layout: Layout,
}

impl Tenant {
    /// Loads `tenant` from its file `path` (and segments), or starts it empty if it has none.
    /// Holds the shard's lock: removes what an unfinished merge left among its segments.
    pub(crate) fn load(path: PathBuf, tenant: &str) -> Result<Tenant, StoreError> {
        let segments_dir = path.with_extension("");
        let mut loaded = Tenant { path, segments_dir, ids: IdSet::default(), layout: Layout::Small };
        let bytes = match fs::read(&loaded.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(loaded),
            Err(e) => return Err(StoreError::io(format!("reading {}", loaded.path.display()), e)),
        };
        let file: TenantFile = serde_json::from_slice(&bytes).map_err(|e| StoreError::corrupt(&loaded.path, e))?;
        check_owner(&file.tenant, tenant)?;
        match (file.ids, file.next_seq, file.segments) {
            (Some(ids), None, None) => {
                let refs: Vec<&str> = ids.iter().map(|id| &**id).collect();
                loaded.ids.insert_new(&refs).map_err(|e| StoreError::corrupt(&loaded.path, e))?;
            }
            (None, Some(next_seq), Some(segments)) => {
                loaded.load_segments(&segments, file.count)?;
                loaded.layout = Layout::Segments { next_seq, segments };
            }
            _ => return Err(StoreError::corrupt(&loaded.path, "holds neither ids nor segments")),
        }
        if loaded.ids.len() as u64 != file.count {
            let detail = format!("counts {} but holds {} distinct ids", file.count, loaded.ids.len());
            return Err(StoreError::corrupt(&loaded.path, detail));
        }
        Ok(loaded)
    }

    fn load_segments(&mut self, segments: &[Segment], count: u64) -> Result<(), StoreError> {
        remove_strays(&self.segments_dir, segments)?;
        self.ids.reserve(usize::try_from(count).unwrap_or(0));
        for segment in segments {
            let path = self.segments_dir.join(segment.file_name());
            let bytes = fs::read(&path).map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
            let mut chunk: Vec<Cow<str>> = Vec::with_capacity(LOAD_CHUNK);
            let mut full = None;
            let ids = &mut self.ids;
            parse_segment(&path, &bytes, |id| {
                chunk.push(id);
                if chunk.len() == LOAD_CHUNK {
                    let refs: Vec<&str> = chunk.iter().map(|id| &**id).collect();
                    full = full.take().or(ids.insert_new(&refs).err());
                    chunk.clear();
                }
            })?;
            let refs: Vec<&str> = chunk.iter().map(|id| &**id).collect();
            if let Some(e) = full.or(self.ids.insert_new(&refs).err()) {
                return Err(StoreError::corrupt(&path, e));
            }
        }
        Ok(())
    }

    /// The tenant's distinct ids.
    pub(crate) fn count(&self) -> u64 {
        self.ids.len() as u64
    }

    /// Resident bytes of the tenant's ids, about.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.ids.heap_bytes()
    }

    /// Adds `ids`, staging the tenant's changed files in `commit`; returns how many were new.
    /// `seq` numbers the merge, for segment names: it grows with every merge of the shard.
    pub(crate) fn merge(&mut self, name: &str, ids: &[&[u8]], commit: &mut Commit) -> Result<u64, StoreError> {
        let new = self.ids.insert_new(ids).map_err(|e| StoreError::corrupt(&self.path, e))?;
        if new.is_empty() {
            return Ok(0);
        }
        let new_count = new.len() as u64;
        let count = self.count();
        let io_error = |path: &Path, e| StoreError::io(format!("writing {}", path.display()), e);
        match &mut self.layout {
            Layout::Small if self.ids.len() <= SMALL_MAX_IDS => {
                let ids = &self.ids;
                commit
                    .write(Step::Data, &self.path, |out| write_small(out, name, count, ids.iter()))
                    .map_err(|e| io_error(&self.path, e))?;
            }
            Layout::Small => {
                // Grown past a small file: every id goes into the first segment.
                fs::create_dir_all(&self.segments_dir).map_err(|e| io_error(&self.segments_dir, e))?;
                let segment = Segment { first: 1, last: 1, ids: count };
                let path = self.segments_dir.join(segment.file_name());
                let ids = &self.ids;
                commit.write(Step::Data, &path, |out| write_ids(out, ids.iter())).map_err(|e| io_error(&path, e))?;
                let segments = vec![segment];
                commit
                    .write(Step::Data, &self.path, |out| write_manifest(out, name, count, 2, &segments))
                    .map_err(|e| io_error(&self.path, e))?;
                self.layout = Layout::Segments { next_seq: 2, segments };
            }
            Layout::Segments { next_seq, segments } => {
                let seq = *next_seq;
                // The new segment absorbs the newest ones while they are no larger than it.
                let mut absorbed = Vec::new();
                let mut merged = Segment { first: seq, last: seq, ids: new_count };
                while let Some(last) = segments.last().copied().filter(|last| last.ids <= merged.ids) {
                    segments.pop();
                    merged = Segment { first: last.first, last: seq, ids: last.ids + merged.ids };
                    absorbed.push(last);
                }
                let mut bodies = Vec::with_capacity(absorbed.len());
                for old in &absorbed {
                    let path = self.segments_dir.join(old.file_name());
                    let bytes =
                        fs::read(&path).map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
                    let body = array_body(&bytes).ok_or_else(|| StoreError::corrupt(&path, "not a JSON array"))?;
                    bodies.push(body.to_vec());
                    commit.remove_after(path);
                }
                let path = self.segments_dir.join(merged.file_name());
                commit
                    .write(Step::Data, &path, |out| {
                        out.write_all(b"[")?;
                        for body in bodies.iter().filter(|body| !body.is_empty()) {
                            out.write_all(body)?;
                            out.write_all(b",")?;
                        }
                        write_ids_unbracketed(out, new.iter().copied())?;
                        out.write_all(b"]\n")
                    })
                    .map_err(|e| io_error(&path, e))?;
                segments.push(merged);
                *next_seq = seq + 1;
                let (next_seq, segments) = (*next_seq, &*segments);
                commit
                    .write(Step::Data, &self.path, |out| write_manifest(out, name, count, next_seq, segments))
                    .map_err(|e| io_error(&self.path, e))?;
            }
        }
        Ok(new_count)
    }
}

fn write_small<'a>(
    out: &mut impl Write,
    tenant: &str,
    count: u64,
    ids: impl Iterator<Item = &'a [u8]>,
) -> io::Result<()> {
    out.write_all(b"{\"tenant\":")?;
    serde_json::to_writer(&mut *out, tenant)?;
    write!(out, ",\"count\":{count},\"ids\":")?;
    write_ids(out, ids)?;
    out.write_all(b"}\n")
}

fn write_manifest(
    out: &mut impl Write,
    tenant: &str,
    count: u64,
    next_seq: u64,
    segments: &[Segment],
) -> io::Result<()> {
    out.write_all(b"{\"tenant\":")?;
    serde_json::to_writer(&mut *out, tenant)?;
    write!(out, ",\"count\":{count},\"next_seq\":{next_seq},\"segments\":")?;
    serde_json::to_writer(&mut *out, segments)?;
    out.write_all(b"}\n")
}

fn write_ids<'a>(out: &mut impl Write, ids: impl Iterator<Item = &'a [u8]>) -> io::Result<()> {
    out.write_all(b"[")?;
    write_ids_unbracketed(out, ids)?;
    out.write_all(b"]")
}

/// Writes ids as JSON strings separated by commas. Ids were UTF-8 when they were posted.
fn write_ids_unbracketed<'a>(out: &mut impl Write, ids: impl Iterator<Item = &'a [u8]>) -> io::Result<()> {
    for (i, id) in ids.enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        let id = std::str::from_utf8(id).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        serde_json::to_writer(&mut *out, id)?;
    }
    Ok(())
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

/// Removes what an unfinished merge left among a tenant's segments: temporaries, segments
/// written before the tenant file that would list them, and segments merged away whose removal
/// did not happen.
fn remove_strays(dir: &Path, live: &[Segment]) -> Result<(), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io(format!("listing {}", dir.display()), e)),
    };
    let live: HashSet<String> = live.iter().map(Segment::file_name).collect();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_temporary(name) || (name.ends_with(".json") && !live.contains(name)) {
            fs::remove_file(entry.path()).map_err(|e| StoreError::io("removing a stray segment", e))?;
        }
    }
    Ok(())
}

/// Reads a whole file through an open handle.
pub(crate) fn read_all(file: &mut File, path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
    Ok(bytes)
}
