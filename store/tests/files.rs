//! What the store leaves on disk, and what it reads: a worker stopped gracefully leaves no log
//! file, a worker gone for good is forgotten (its empty files deleted, its name dropped from the
//! shard records, its numbers still reserved), and databases written by earlier releases (before
//! log files had headers, before shards kept an index of counts) open, count and list every id.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use countapp_store::{Item, Store, StoreOptions};

const WORKER: &str = "w1";
const GONE: &str = "w2";

fn open(db: &Path, worker: &str) -> Store {
    Store::open(db, worker, StoreOptions { shards: 4, lock_wait: Duration::ZERO, ..StoreOptions::default() }).unwrap()
}

/// Appends ids `<tenant>-<from..to>` of `tenant` in one batch.
fn append(store: &Store, tenant: &str, from: u32, to: u32) {
    let ids: Vec<String> = (from..to).map(|i| format!("{tenant}-{i:06}")).collect();
    let batch: Vec<Item> = ids.iter().map(|id| Item::new(tenant, id)).collect();
    store.append_blocking(&batch).unwrap();
}

/// The numbers of the log files of `worker` under `db`, with their names.
fn log_files(db: &Path, worker: &str) -> BTreeMap<u64, String> {
    let entries = fs::read_dir(db.join("wal").join(worker)).unwrap().flatten();
    entries
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((name.split_once('.')?.0.parse().ok()?, name))
        })
        .collect()
}

/// A worker stopped gracefully, its log merged, leaves no log file: a worker removed from the
/// config for good leaves nothing behind.
#[test]
fn a_graceful_stop_leaves_no_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let store = open(&db, WORKER);
    append(&store, "t", 0, 3);
    store.close(Duration::from_secs(5)).unwrap();
    let left: Vec<String> = fs::read_dir(db.join("wal").join(WORKER))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".open") || name.ends_with(".log"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let store = open(&db, WORKER);
    assert_eq!(store.count_blocking("t").unwrap(), 3);
}

/// A worker that died, then is removed from the config for good: a live worker merges its log,
/// deletes its files (the one that holds no record too, which only its worker deleted before)
/// and drops its name from the shard records as it rewrites them; should it come back after
/// all, it numbers its files above every one it used.
#[test]
fn a_worker_gone_for_good_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let gone = open(&db, GONE);
    append(&gone, "t", 0, 10);
    drop(gone);
    drop(open(&db, GONE));
    let used: BTreeSet<u64> = log_files(&db, GONE).into_keys().collect();
    assert_eq!(used.len(), 2, "a file of ids, and an empty one: {:?}", log_files(&db, GONE));

    let store = open(&db, WORKER);
    store.flush().unwrap();
    assert_eq!(store.count_blocking("t").unwrap(), 10);
    assert!(log_files(&db, GONE).is_empty(), "{:?}", log_files(&db, GONE));
    for tenant in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        append(&store, tenant, 0, 1);
    }
    store.flush().unwrap();
    for shard in fs::read_dir(db.join("shards")).unwrap().flatten() {
        let record = fs::read_to_string(shard.path().join("SHARD.json")).unwrap();
        assert!(!record.contains(GONE), "{}: {record}", shard.path().display());
    }

    let back = open(&db, GONE);
    let now = *log_files(&db, GONE).keys().max().unwrap();
    assert!(now > *used.iter().max().unwrap(), "file {now} again: {used:?} were used");
    append(&back, "t", 10, 15);
    back.flush().unwrap();
    drop(back);
    store.flush().unwrap();
    assert_eq!(store.count_blocking("t").unwrap(), 15);
}

/// The database of the fixture `name` (a tarball of its `db/`), extracted into a new temporary
/// directory, with the count of every tenant it was written with.
fn fixture(name: &str) -> (tempfile::TempDir, PathBuf, BTreeMap<String, u64>) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(fixtures.join(format!("{name}.tar.gz")))
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let expected = serde_json::from_slice(&fs::read(fixtures.join(format!("{name}.expected.json"))).unwrap()).unwrap();
    let db = dir.path().join("db");
    (dir, db, expected)
}

/// Every tenant `store` lists, with its count, paged through `per_page` at a time.
fn listing(store: &Store, per_page: usize) -> Vec<(String, u64)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (mut listed, mut after) = (Vec::new(), String::new());
    loop {
        let page = runtime.block_on(store.list("", &after, per_page).get()).unwrap();
        listed.extend(page.tenants.into_iter().map(|(tenant, count)| (tenant, count.unwrap())));
        match page.next {
            Some(next) => after = next,
            None => return listed,
        }
    }
}

/// The tenants of `expected` that count any id, as a listing shows them.
fn listed(expected: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    expected.iter().filter(|(_, n)| **n > 0).map(|(t, n)| (t.clone(), *n)).collect()
}

/// The database of the fixture `name`, opened by `worker` of this release and merged (two rounds):
/// every tenant must count what the fixture was written with.
fn merged_fixture(name: &str, worker: &str) -> (tempfile::TempDir, PathBuf, Store, BTreeMap<String, u64>) {
    let (dir, db, expected) = fixture(name);
    let store = open(&db, worker);
    store.flush().unwrap();
    store.flush().unwrap();
    for (tenant, count) in &expected {
        assert_eq!(store.count_blocking(tenant).unwrap(), *count, "{tenant}");
    }
    (dir, db, store, expected)
}

/// The shard directories of `db` that hold a list of tenants.
fn shards_with_tenants(db: &Path) -> Vec<PathBuf> {
    let shards = fs::read_dir(db.join("shards")).unwrap().map(|shard| shard.unwrap().path());
    shards.filter(|shard| shard.join("TENANTS").exists()).collect()
}

/// A database written by the release before log files had headers (its merged tenants,
/// segments included, and the logs of two workers killed with SIGKILL before their files were
/// closed): opened and merged by this release, every tenant counts what was acknowledged.
#[test]
fn a_database_of_the_previous_release_opens_and_counts_every_id() {
    let (_dir, db, store, expected) = merged_fixture("db-before-log-v2", "127.0.0.1-7101");
    // Its tenants list in byte order, a page of 3 at a time: the shards' lists of names, which
    // that release did not keep, are written from its tenant files.
    assert_eq!(listing(&store, 3), listed(&expected));
    for shard in fs::read_dir(db.join("shards")).unwrap() {
        let shard = shard.unwrap().path();
        let names: Vec<String> =
            fs::read_dir(&shard).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        let has_tenants = names.iter().any(|name| name.ends_with(".json") && name != "SHARD.json");
        assert!(!has_tenants || names.contains(&"TENANTS".to_owned()), "{} has tenants, no list", shard.display());
    }
    append(&store, "big", 0, 10);
    store.flush().unwrap();
    assert_eq!(store.count_blocking("big").unwrap(), expected["big"] + 10);
}

/// A database written by the release before shards kept an index of counts (records without a
/// generation, no `COUNTS`; three workers killed with SIGKILL, with ids of eight shards in their
/// logs alone; two tenants deleted, one of them written again), opened by one worker of this
/// release: once merged, every tenant counts and lists what was acknowledged, and every shard
/// with tenants has an index that ends at its record's generation, as listings read it.
#[test]
fn a_database_written_before_indexes_of_counts_counts_and_lists_every_id() {
    let (_dir, db, store, mut expected) = merged_fixture("db-before-counts", "127.0.0.1-7601");
    assert_eq!(listing(&store, 4), listed(&expected));
    let shards = shards_with_tenants(&db);
    assert!(shards.len() >= 13, "{shards:?}");
    for shard in shards {
        let record: serde_json::Value = serde_json::from_slice(&fs::read(shard.join("SHARD.json")).unwrap()).unwrap();
        let index = fs::read_to_string(shard.join("COUNTS")).unwrap_or_default();
        let last: serde_json::Value = serde_json::from_str(index.lines().last().unwrap_or("null")).unwrap();
        assert!(record["generation"].as_u64().is_some_and(|g| g > 0), "{}: {record}", shard.display());
        assert_eq!(last["generation"], record["generation"], "{}: its index is behind its record", shard.display());
    }
    append(&store, "big", 0, 10);
    append(&store, "new", 0, 3);
    store.flush().unwrap();
    *expected.get_mut("big").unwrap() += 10;
    expected.insert("new".to_owned(), 3);
    assert_eq!(listing(&store, 1000), listed(&expected));
}
