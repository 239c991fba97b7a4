//! The store's two shapes of tenant, at sizes that run in seconds: many small tenants, each one
//! JSON file of a few hundred bytes, and one large tenant that grows past the small file into
//! segments, absorbs its newer segments and stops at the segment size cap, and is reloaded from
//! its segments by the next worker to merge into it. The full-size figures (1M small tenants,
//! 20M ids in one tenant) are `make bench-scale`'s.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use countapp_shared::config::FsyncPolicy;
use countapp_store::{Item, Settings, Store, StoreOptions, read_count};
use serde_json::Value;

fn open(db: &Path, worker: &str) -> Store {
    Store::open(
        db,
        worker,
        StoreOptions {
            settings: Settings { fsync: FsyncPolicy::EverySec, ..Settings::default() },
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

/// The tenant files under the database: every `.json` in a shard directory but the shard records.
fn tenant_files(db: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for shard in fs::read_dir(db.join("shards")).unwrap() {
        for entry in fs::read_dir(shard.unwrap().path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|x| x == "json") && !path.ends_with("SHARD.json") {
                files.push(path);
            }
        }
    }
    files
}

/// Appends `ids` to `tenant` in batches of 1000.
fn append(store: &Store, tenant: &str, ids: impl Iterator<Item = String>) {
    let ids: Vec<String> = ids.collect();
    for chunk in ids.chunks(1000) {
        let batch: Vec<Item> = chunk.iter().map(|id| Item::new(tenant, id)).collect();
        store.append_blocking(&batch).unwrap();
    }
}

#[test]
fn many_small_tenants_are_one_small_file_each() {
    const TENANTS: usize = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let store = open(&db, "w");
    let names: Vec<String> = (0..TENANTS).map(|t| format!("tenant {t}")).collect();
    for chunk in names.chunks(1000) {
        let batch: Vec<Item> = chunk.iter().map(|t| Item::new(t, "the id")).collect();
        store.append_blocking(&batch).unwrap();
    }
    let report = store.flush().unwrap();
    assert_eq!((report.tenants, report.new_ids), (TENANTS as u64, TENANTS as u64));
    for name in names.iter().step_by(97) {
        assert_eq!(store.count_blocking(name).unwrap(), 1, "{name}");
        assert_eq!(read_count(&db, name).unwrap(), 1, "{name}, read from its file");
    }
    store.close(Duration::ZERO).unwrap();

    let files = tenant_files(&db);
    assert_eq!(files.len(), TENANTS, "one file per tenant");
    let mut blocks = 0;
    for file in &files {
        let meta = fs::metadata(file).unwrap();
        blocks += meta.blocks() * 512;
        let parsed: Value = serde_json::from_slice(&fs::read(file).unwrap()).unwrap();
        assert_eq!(parsed["count"], 1, "{}: {parsed}", file.display());
        assert_eq!(parsed["ids"], serde_json::json!(["the id"]), "{}", file.display());
    }
    let per_tenant = blocks as f64 / TENANTS as f64;
    assert!(per_tenant <= 4.5 * 1024.0, "{per_tenant} bytes of disk per small tenant");
}

#[test]
fn a_large_tenant_grows_into_segments_and_is_reloaded_from_them() {
    const ROUNDS: u64 = 12;
    const PER_ROUND: u64 = 60_000;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let store = open(&db, "w1");
    // A few ids first, so that the tenant starts as a small file and grows out of it.
    append(&store, "big", (0..500).map(|i| format!("{i:016x}")));
    store.flush().unwrap();
    let file = tenant_files(&db).pop().unwrap();
    let parsed: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
    assert_eq!(parsed["ids"].as_array().map(Vec::len), Some(500), "a small tenant keeps its ids: {parsed}");

    let mut expected = 500;
    for round in 0..ROUNDS {
        // Half the ids are repeats of the round before, the other half new.
        let start = 500 + round * PER_ROUND / 2;
        append(&store, "big", (start..start + PER_ROUND).map(|i| format!("{i:016x}")));
        let report = store.flush().unwrap();
        let new = (start + PER_ROUND).saturating_sub(expected.max(start)).min(PER_ROUND);
        assert_eq!(report.new_ids, new, "round {round}");
        expected += new;
        assert_eq!(store.count_blocking("big").unwrap(), expected, "round {round}");
    }
    let manifest: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
    assert_eq!(manifest["count"], expected);
    let segments = manifest["segments"].as_array().unwrap();
    let listed: BTreeSet<String> = segments
        .iter()
        .map(|s| format!("{:012}-{:012}.json", s["first"].as_u64().unwrap(), s["last"].as_u64().unwrap()))
        .collect();
    assert!(segments.len() <= 8, "{} segments: the newer ones are absorbed", segments.len());
    assert!(segments.iter().all(|s| s["ids"].as_u64().unwrap() <= 1 << 18), "a segment past the cap: {manifest}");
    let on_disk: BTreeSet<String> =
        fs::read_dir(file.with_extension("")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(on_disk, listed, "the segment directory holds exactly the listed segments");
    let mut ids = BTreeSet::new();
    for name in &listed {
        let path = file.with_extension("").join(name);
        let segment: Vec<String> = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
        ids.extend(segment);
    }
    assert_eq!(ids.len() as u64, expected, "the segments hold every id once");

    // A crash, then another worker merges into the tenant: it loads the sets from the segments,
    // and tells the ids it holds from new ones.
    drop(store);
    let other = open(&db, "w2");
    let top = 500 + (ROUNDS - 1) * PER_ROUND / 2 + PER_ROUND;
    append(&other, "big", (top - 1000..top + 1000).map(|i| format!("{i:016x}")));
    let report = other.flush().unwrap();
    assert_eq!(report.new_ids, 1000, "{report:?}");
    assert_eq!(other.count_blocking("big").unwrap(), expected + 1000);
}
