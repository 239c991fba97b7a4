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
//! O(log n) segments, and each id is rewritten O(log n) times over the tenant's life, up to
//! segments of [`MAX_SEGMENT_IDS`], which are never rewritten.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hashbrown::HashSet;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::commit::{Commit, Step, is_temporary};
use super::idset::IdSet;
use super::segment_cache::SegmentCache;
use crate::StoreError;
use crate::disk;

/// Ids a tenant keeps in its own file, at most; past this it keeps them in segments.
pub(crate) const SMALL_MAX_IDS: usize = 1024;
/// Ids a segment grows to by absorbing older ones, at most (about 5 MB of 16-byte ids): past
/// this, segments are left as they are, so that no merge rewrites more than this, and an id is
/// rewritten a few times at most: a tenant of 10M ids keeps about 40 segments.
const MAX_SEGMENT_IDS: u64 = 1 << 18;

/// One segment file: the ids written by the merges numbered `first..=last`.
///
/// `crc32` is the checksum of the file's bytes: a segment is immutable, so any change to it is
/// damage, found when the tenant loads and when a merge copies the segment into a larger one
/// (which must never carry damage into a new file and delete the original). Manifests written
/// before segments had checksums lack it; loading such a tenant computes it from the bytes that
/// parse, and the next manifest written records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Segment {
    first: u64,
    last: u64,
    ids: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crc32: Option<u32>,
}

impl Segment {
    fn file_name(&self) -> String {
        format!("{:012}-{:012}.json", self.first, self.last)
    }

    /// Checks that `bytes`, read from the segment's file at `path`, are those it was written
    /// with; returns their checksum.
    fn check(&self, path: &Path, bytes: &[u8]) -> Result<u32, StoreError> {
        let crc = crc32fast::hash(bytes);
        match self.crc32 {
            Some(expected) if expected != crc => Err(StoreError::corrupt(
                path,
                format!("checksum {crc:08x} is not the {expected:08x} its manifest records: the segment was changed"),
            )),
            _ => Ok(crc),
        }
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

/// How many times [`contains_in`] reads a tenant's manifest afresh when a segment it lists is
/// gone: each time means that a merge replaced the tenant's segments meanwhile, which happens
/// at most once per round of its owner.
const CONTAINS_TRIES: usize = 4;

/// Whether each of `ids` is in `tenant`'s set, read from its file at `path` (and its segments,
/// from `cache` where it keeps them) without its shard's lock: the owner may be merging into
/// the tenant meanwhile, and never changes a file in place, so a segment that went missing
/// means a newer manifest, read again.
pub(crate) fn contains_in(
    path: &Path,
    tenant: &str,
    ids: &[String],
    cache: &SegmentCache,
) -> Result<Vec<bool>, StoreError> {
    let wanted: HashSet<&[u8]> = ids.iter().map(|id| id.as_bytes()).collect();
    let answer = |found: &HashSet<&[u8]>| ids.iter().map(|id| found.contains(id.as_bytes())).collect();
    'fresh: for _ in 0..CONTAINS_TRIES {
        let bytes = match disk::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.not_found() => return Ok(vec![false; ids.len()]),
            Err(e) => return Err(e.into()),
        };
        let file: TenantFile = serde_json::from_slice(&bytes).map_err(|e| StoreError::corrupt(path, e))?;
        check_owner(&file.tenant, tenant)?;
        if let Some(small) = &file.ids {
            return Ok(answer(&small.iter().filter_map(|id| wanted.get(id.as_bytes()).copied()).collect()));
        }
        let segments_dir = path.with_extension("");
        let mut found = HashSet::new();
        for segment in file.segments.as_deref().unwrap_or_default() {
            let segment_path = segments_dir.join(segment.file_name());
            let set = match segment.crc32.and_then(|crc32| cache.get(&segment_path, crc32)) {
                Some(set) => set,
                None => {
                    let bytes = match disk::read(&segment_path) {
                        Ok(bytes) => bytes,
                        Err(e) if e.not_found() => continue 'fresh,
                        Err(e) => return Err(e.into()),
                    };
                    let crc32 = segment.check(&segment_path, &bytes)?;
                    // A segment of a manifest that records no checksum (an earlier release's)
                    // is read each time: nothing would tell it from a later one of that name.
                    if segment.crc32.is_none() || !SegmentCache::keeps(segment.ids) {
                        parse_segment(&segment_path, &bytes, |id| {
                            if let Some(&asked) = wanted.get(id.as_bytes()) {
                                found.insert(asked);
                            }
                        })?;
                        continue;
                    }
                    let mut set = IdSet::default();
                    insert_segment(&mut set, &segment_path, &bytes, segment.ids)?;
                    let set = Arc::new(set);
                    cache.insert(&segment_path, crc32, set.clone());
                    set
                }
            };
            found.extend(wanted.iter().filter(|id| set.contains(id)));
        }
        return Ok(answer(&found));
    }
    Err(StoreError::Busy(format!("tenant {tenant:?}: its segments changed under {CONTAINS_TRIES} reads in a row")))
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
    /// Its manifest was rebuilt from its segments, and must be written even if no id is new.
    rebuilt: bool,
}

impl Tenant {
    /// A tenant that has no file yet.
    pub(crate) fn new(path: PathBuf) -> Tenant {
        let segments_dir = path.with_extension("");
        Tenant { path, segments_dir, ids: IdSet::default(), layout: Layout::Small, rebuilt: false }
    }

    /// Loads `tenant` from its file `path` (and segments), or starts it empty if it has none.
    /// A manifest that is missing or unreadable while segments are there is rebuilt from them.
    /// Holds the shard's lock: removes what an unfinished merge left among its segments.
    pub(crate) fn load(path: PathBuf, tenant: &str) -> Result<Tenant, StoreError> {
        let mut loaded = Tenant::new(path);
        let bytes = match disk::read(&loaded.path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.not_found() => None,
            Err(e) => return Err(e.into()),
        };
        let parsed = bytes.as_deref().map(serde_json::from_slice::<TenantFile>);
        let file = match parsed {
            Some(Ok(file)) => file,
            None | Some(Err(_)) if loaded.segments_dir.is_dir() => {
                loaded.rebuild(tenant)?;
                return Ok(loaded);
            }
            None => return Ok(loaded),
            Some(Err(e)) => return Err(StoreError::corrupt(&loaded.path, e)),
        };
        check_owner(&file.tenant, tenant)?;
        match (file.ids, file.next_seq, file.segments) {
            (Some(ids), None, None) => {
                loaded
                    .ids
                    .insert_new(ids.iter().map(|id| id.as_bytes()), |_| {})
                    .map_err(|e| StoreError::corrupt(&loaded.path, e))?;
            }
            (None, Some(next_seq), Some(mut segments)) => {
                loaded.load_segments(&mut segments, file.count)?;
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

    /// Rebuilds the tenant from the segments in its directory: the widest of those that
    /// overlap (an unfinished merge may have left both a segment and the ones it absorbed).
    fn rebuild(&mut self, tenant: &str) -> Result<(), StoreError> {
        let dir = &self.segments_dir;
        let mut found = Vec::new();
        for entry in disk::entries(dir)? {
            let name = entry.file_name();
            let range = name.to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.split_once('-'));
            if let Some((Ok(first), Ok(last))) = range.map(|(f, l)| (f.parse::<u64>(), l.parse::<u64>())) {
                found.push((first, last));
            }
        }
        found.sort_by_key(|&(first, last)| (first, std::cmp::Reverse(last)));
        let mut segments = Vec::new();
        for (first, last) in found {
            if segments.last().is_some_and(|s: &Segment| first <= s.last) {
                continue;
            }
            let path = dir.join(Segment { first, last, ids: 0, crc32: None }.file_name());
            let bytes = disk::read(&path)?;
            let held = insert_segment(&mut self.ids, &path, &bytes, 0)?;
            segments.push(Segment { first, last, ids: held, crc32: Some(crc32fast::hash(&bytes)) });
        }
        remove_strays(dir, &segments)?;
        let next_seq = segments.last().map_or(1, |s| s.last + 1);
        tracing::warn!(
            tenant,
            segments = segments.len(),
            ids = self.ids.len(),
            "tenant manifest missing or unreadable: rebuilt from its segments"
        );
        self.layout = Layout::Segments { next_seq, segments };
        self.rebuilt = true;
        Ok(())
    }

    /// Loads the ids of `segments`, checking each file against its checksum and recording
    /// the checksum of those that had none.
    fn load_segments(&mut self, segments: &mut [Segment], count: u64) -> Result<(), StoreError> {
        remove_strays(&self.segments_dir, segments)?;
        self.ids.reserve(usize::try_from(count).unwrap_or(0));
        for segment in segments {
            let path = self.segments_dir.join(segment.file_name());
            let bytes = disk::read(&path)?;
            segment.crc32 = Some(segment.check(&path, &bytes)?);
            insert_segment(&mut self.ids, &path, &bytes, segment.ids)?;
        }
        Ok(())
    }

    /// Whether the tenant keeps its ids in its own small file, cheap to read again.
    pub(crate) fn is_small(&self) -> bool {
        matches!(self.layout, Layout::Small)
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
    pub(crate) fn merge<'a>(
        &mut self,
        name: &str,
        ids: impl IntoIterator<Item = &'a [u8]>,
        commit: &mut Commit,
    ) -> Result<u64, StoreError> {
        // A tenant in segments writes its new ids as the start of a new segment, `[` and the
        // ids, comma-separated; a small one rewrites all of its ids.
        let segmented = !self.is_small();
        let mut body = vec![b'['];
        let new = self
            .ids
            .insert_new(ids, |id| {
                if segmented {
                    if body.len() > 1 {
                        body.push(b',');
                    }
                    push_json_str(&mut body, id);
                }
            })
            .map_err(|e| StoreError::corrupt(&self.path, e))?;
        let count = self.count();
        if new == 0 {
            if std::mem::take(&mut self.rebuilt)
                && let Layout::Segments { next_seq, segments } = &self.layout
            {
                stage(commit, &self.path, manifest(name, count, *next_seq, segments))?;
            }
            return Ok(0);
        }
        self.rebuilt = false;
        match &mut self.layout {
            Layout::Small if self.ids.len() <= SMALL_MAX_IDS => {
                let mut file = head(name, count);
                file.extend_from_slice(b",\"ids\":[");
                push_ids(&mut file, self.ids.iter());
                file.extend_from_slice(b"]}\n");
                stage(commit, &self.path, file)?;
            }
            Layout::Small => {
                // Grown past a small file: every id goes into the first segment.
                disk::create_dir_all(&self.segments_dir)?;
                push_ids(&mut body, self.ids.iter());
                body.extend_from_slice(b"]\n");
                let segment = Segment { first: 1, last: 1, ids: count, crc32: Some(crc32fast::hash(&body)) };
                stage(commit, &self.segments_dir.join(segment.file_name()), body)?;
                let segments = vec![segment];
                stage(commit, &self.path, manifest(name, count, 2, &segments))?;
                self.layout = Layout::Segments { next_seq: 2, segments };
            }
            Layout::Segments { next_seq, segments } => {
                let seq = *next_seq;
                // The new segment absorbs the newest ones while they are no larger than it, up
                // to the largest segment size.
                let mut merged = Segment { first: seq, last: seq, ids: new, crc32: None };
                while let Some(last) = segments
                    .last()
                    .copied()
                    .filter(|last| last.ids <= merged.ids && last.ids + merged.ids <= MAX_SEGMENT_IDS)
                {
                    segments.pop();
                    merged = Segment { first: last.first, last: seq, ids: last.ids + merged.ids, crc32: None };
                    let path = self.segments_dir.join(last.file_name());
                    append_array_body(&path, &last, &mut body)?;
                    commit.remove_after(path);
                }
                body.extend_from_slice(b"]\n");
                merged.crc32 = Some(crc32fast::hash(&body));
                stage(commit, &self.segments_dir.join(merged.file_name()), body)?;
                segments.push(merged);
                *next_seq = seq + 1;
                stage(commit, &self.path, manifest(name, count, *next_seq, segments))?;
            }
        }
        Ok(new)
    }
}

/// Stages the deletion of tenant `name`, whose file is `path`: an empty tenant file is made
/// durable first, then its segments and the file itself are removed. A crash at any point leaves
/// either the tenant whole (before the commit) or empty: a segment left behind is a stray, which
/// the next load removes, never a reason to rebuild the tenant from its segments.
pub(crate) fn stage_delete(commit: &mut Commit, path: &Path, name: &str) -> Result<(), StoreError> {
    let mut empty = head(name, 0);
    empty.extend_from_slice(b",\"ids\":[]}\n");
    stage(commit, path, empty)?;
    commit.remove_dir_after(path.with_extension(""));
    commit.remove_after(path.to_path_buf());
    Ok(())
}

/// Stages `bytes` as the new contents of `path`, checked to be UTF-8 first: ids were UTF-8 when
/// they were posted, and a file that is not could not be read back.
fn stage(commit: &mut Commit, path: &Path, bytes: Vec<u8>) -> Result<(), StoreError> {
    if let Err(e) = std::str::from_utf8(&bytes) {
        return Err(StoreError::corrupt(path, format!("would not be UTF-8: {e}")));
    }
    Ok(commit.write(Step::Data, path, &bytes)?)
}

/// `{"tenant":<name>,"count":<count>`: how every tenant file starts.
fn head(name: &str, count: u64) -> Vec<u8> {
    let mut file = b"{\"tenant\":".to_vec();
    push_json_str(&mut file, name.as_bytes());
    file.extend_from_slice(format!(",\"count\":{count}").as_bytes());
    file
}

fn manifest(name: &str, count: u64, next_seq: u64, segments: &[Segment]) -> Vec<u8> {
    let mut file = head(name, count);
    file.extend_from_slice(format!(",\"next_seq\":{next_seq},\"segments\":").as_bytes());
    serde_json::to_writer(&mut file, segments).expect("segments serialize");
    file.extend_from_slice(b"}\n");
    file
}

/// Appends ids as JSON strings separated by commas.
fn push_ids<'a>(out: &mut Vec<u8>, ids: impl Iterator<Item = &'a [u8]>) {
    for (i, id) in ids.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_str(out, id);
    }
}

/// Appends `s`, UTF-8, as a JSON string, escaped as serde_json escapes.
pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    if s.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.extend_from_slice(s);
    } else {
        for &b in s {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                0..0x20 => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
                _ => out.push(b),
            }
        }
    }
    out.push(b'"');
}

/// Appends the elements of the JSON array in the file `path`, the segment `segment`, to `body`,
/// a JSON array being written that holds at least one element: read straight into `body` and
/// checked against the segment's checksum, its `[` becomes a comma and its `]` is dropped, with
/// no copy and no parse of an id.
fn append_array_body(path: &Path, segment: &Segment, body: &mut Vec<u8>) -> Result<(), StoreError> {
    let start = body.len();
    disk::read_to_end(&mut disk::open(path)?, path, body)?;
    segment.check(path, &body[start..])?;
    let end = start + body[start..].trim_ascii_end().len();
    if body.get(start) != Some(&b'[') || end <= start + 1 || body[end - 1] != b']' {
        return Err(StoreError::corrupt(path, "not a JSON array"));
    }
    let empty = body[start + 1..end - 1].trim_ascii().is_empty();
    body.truncate(if empty { start } else { end - 1 });
    if !empty {
        body[start] = b',';
    }
    Ok(())
}

/// Parses a segment's JSON array without building it: each id goes straight to `each`, borrowed
/// from `bytes` unless it holds JSON escapes.
/// Inserts into `set` the ids of the segment `bytes`, read from `path`, which its manifest says
/// holds `expected` of them (0 if unknown); how many it holds.
fn insert_segment(set: &mut IdSet, path: &Path, bytes: &[u8], expected: u64) -> Result<u64, StoreError> {
    let expected = usize::try_from(expected).unwrap_or(0);
    set.reserve(expected);
    let mut ids = Vec::with_capacity(expected);
    parse_segment(path, bytes, |id| ids.push(id))?;
    set.insert_new(ids.iter().map(|id| id.as_bytes()), |_| {}).map_err(|e| StoreError::corrupt(path, e))?;
    Ok(ids.len() as u64)
}

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
    let entries = match disk::entries(dir) {
        Ok(entries) => entries,
        Err(e) if e.not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let live: HashSet<String> = live.iter().map(Segment::file_name).collect();
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_temporary(name) || (name.ends_with(".json") && !live.contains(name)) {
            disk::remove_if_present(&entry.path())?;
        }
    }
    Ok(())
}

/// Reads a whole file through an open handle; its metadata as it was before.
pub(crate) fn read_all(file: &mut File, path: &Path) -> Result<(Vec<u8>, std::fs::Metadata), StoreError> {
    let mut bytes = Vec::new();
    let metadata = disk::read_to_end(file, path, &mut bytes)?;
    Ok((bytes, metadata))
}
