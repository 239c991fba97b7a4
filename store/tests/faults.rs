//! The store against a failing disk, the way SQLite's I/O-error tests prove SQLite: every file
//! operation of the store is a fail point (`store::disk`), and a test fails the Nth of them,
//! for every N, while a worker opens its store and runs a merge round that absorbs segments,
//! quarantines a tenant and takes a dead worker's log; then it heals (the disk works again,
//! the worker restarts) and every acknowledged id must count, exactly. Also: a log number is
//! never used twice, even when a worker dies between deleting its empty log file and creating
//! the next one.
//!
//! The fail points are process-wide: each test holds [`fail::FailScenario`], which runs them
//! one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use countapp_shared::config::FsyncPolicy;
use countapp_store::disk::{Op, faults};
use countapp_store::{Answer, Item};
use countapp_store::{Settings, Store, StoreError, StoreOptions};

const WORKER: &str = "w1";
const DEAD: &str = "w2";

/// Four shards, so that a round's calls are few enough to fail each in turn; merges and
/// closings fsync as under the default policy.
fn options() -> StoreOptions {
    StoreOptions {
        settings: Settings { fsync: FsyncPolicy::EverySec, ..Settings::default() },
        lock_wait: Duration::ZERO,
        shards: 4,
        ..StoreOptions::default()
    }
}

fn open(db: &Path, worker: &str) -> Result<Store, StoreError> {
    Store::open(db, worker, options())
}

/// Appends ids `<tenant>-<from..to>` of `tenant` in one batch, and notes them as acknowledged.
fn append(store: &Store, acked: &mut BTreeMap<String, BTreeSet<String>>, tenant: &str, from: u32, to: u32) {
    let ids: Vec<String> = (from..to).map(|i| format!("{tenant}-{i:06}")).collect();
    let batch: Vec<Item> = ids.iter().map(|id| Item::new(tenant, id)).collect();
    store.append_blocking(&batch).unwrap();
    acked.entry(tenant.to_owned()).or_default().extend(ids);
}

/// The tenant file of `tenant` under `db`, found by the readable prefix of its name.
fn tenant_file(db: &Path, tenant: &str) -> PathBuf {
    let shards = fs::read_dir(db.join("shards")).unwrap().flatten();
    let mut files = shards.flat_map(|shard| fs::read_dir(shard.path()).unwrap().flatten()).map(|e| e.path());
    files
        .find(|p| {
            p.file_name().unwrap().to_str().unwrap().starts_with(&format!("{tenant}."))
                && p.extension().unwrap() == "json"
        })
        .unwrap()
}

/// A database whose next merge round by [`WORKER`] does every kind of work: `big` holds a
/// segment of 2,300 ids and one of 100, and 2,300 new ids wait that absorb both; `small` and
/// `fresh` are small tenants, one new; `bad` has junk for a file, so that its new ids go to
/// quarantine; and [`DEAD`] died with ids in its log. Returns the ids each tenant must count
/// once the junk is removed (`bad`'s first ten were only in the junk).
fn prepare(db: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut acked = BTreeMap::new();
    let store = open(db, WORKER).unwrap();
    for (from, to) in [(0, 1100), (1100, 2300), (2300, 2400)] {
        append(&store, &mut acked, "big", from, to);
        store.flush().unwrap();
    }
    append(&store, &mut acked, "small", 0, 10);
    append(&store, &mut acked, "bad", 0, 10);
    store.flush().unwrap();
    store.close(Duration::ZERO).unwrap();
    fs::write(tenant_file(db, "bad"), "junk").unwrap();
    acked.remove("bad");

    let dead = open(db, DEAD).unwrap();
    append(&dead, &mut acked, "small", 5, 20);
    append(&dead, &mut acked, "from-dead", 0, 30);
    drop(dead);
    let store = open(db, WORKER).unwrap();
    append(&store, &mut acked, "big", 2400, 4700);
    append(&store, &mut acked, "small", 15, 25);
    append(&store, &mut acked, "fresh", 0, 5);
    append(&store, &mut acked, "bad", 10, 20);
    drop(store);
    acked
}

/// Copies the directory `from` to `to`, files and all.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// What the disk does wrong from the Nth call on.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The Nth call alone fails.
    Once(&'static str),
    /// Every call from the Nth on fails, until healed.
    From(&'static str),
}

impl Fault {
    fn actions(self, n: usize) -> String {
        match self {
            Fault::Once(errno) => format!("{n}*off->1*return({errno})->off"),
            Fault::From(errno) => format!("{n}*off->return({errno})"),
        }
    }
}

/// Opens the store and runs a round, with `fault` from call `n` on: the calls made to fail.
fn faulty_round(db: &Path, fault: Fault, n: usize) -> Vec<(Op, PathBuf)> {
    faults::take_injected();
    fail::cfg("store-io", &fault.actions(n)).unwrap();
    if let Ok(store) = open(db, WORKER) {
        let _ = store.flush();
        let _ = store.flush();
    }
    fail::remove("store-io");
    faults::take_injected()
}

/// Heals: the worker restarts on a working disk, the junk file of tenant `junk` (if any) is
/// removed, and rounds run; every tenant must then count, and list, exactly the ids acknowledged.
fn heal_and_check(db: &Path, acked: &BTreeMap<String, BTreeSet<String>>, junk: Option<&str>, case: &str) {
    let store = open(db, WORKER).unwrap_or_else(|e| panic!("{case}: reopening: {e}"));
    store.flush().unwrap_or_else(|e| panic!("{case}: the first round after healing: {e}"));
    if let Some(junk) = junk.map(|tenant| tenant_file(db, tenant))
        && fs::read(&junk).is_ok_and(|bytes| bytes == b"junk")
    {
        fs::remove_file(&junk).unwrap();
    }
    store.flush().unwrap_or_else(|e| panic!("{case}: the round after the repair: {e}"));
    for (tenant, ids) in acked {
        let count = store.count_blocking(tenant).unwrap_or_else(|e| panic!("{case}: {tenant}: {e}"));
        assert_eq!(count, ids.len() as u64, "{case}: {tenant}");
    }
    // A listing reads the shards' indexes of counts where they are current, which a failed
    // write may have left behind: it must list the same counts all the same.
    let Answer::Now(page) = store.list("", "", 1000) else { panic!("{case}: the JSON store lists at once") };
    let listed: Vec<(String, u64)> = page
        .unwrap_or_else(|e| panic!("{case}: listing: {e}"))
        .tenants
        .into_iter()
        .map(|(tenant, count)| (tenant, count.unwrap_or_else(|e| panic!("{case}: listing: {e}"))))
        .collect();
    let expected: Vec<(String, u64)> = acked.iter().map(|(tenant, ids)| (tenant.clone(), ids.len() as u64)).collect();
    assert_eq!(listed, expected, "{case}: listing");
    let stats = store.stats();
    assert!(stats.quarantined.is_empty(), "{case}: {:?}", stats.quarantined);
}

/// Every call of opening the store and of its merge round fails in turn, with EIO (the Nth call
/// alone) and with ENOSPC (every call from the Nth on, a full disk): afterwards, healed, every
/// acknowledged id counts exactly.
#[test]
fn a_failure_at_every_io_call_of_a_round_loses_nothing_once_healed() {
    let scenario = fail::FailScenario::setup();
    // Hundreds of rounds, each with its fsyncs: in memory where the machine has it (tmpfs), where
    // an fsync costs nothing and every call is made all the same.
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let prepared = dir.path().join("prepared");
    let acked = prepare(&prepared);
    let mut covered: BTreeMap<Op, usize> = BTreeMap::new();
    let (mut cases, started) = (0, std::time::Instant::now());
    for fault in [Fault::Once("EIO"), Fault::From("ENOSPC")] {
        for n in 0.. {
            let db = dir.path().join(format!("case-{cases}"));
            copy_dir(&prepared, &db);
            let injected = faulty_round(&db, fault, n);
            let Some((op, path)) = injected.first().cloned() else { break };
            cases += 1;
            *covered.entry(op).or_default() += 1;
            heal_and_check(&db, &acked, Some("bad"), &format!("{fault:?} at call {n} ({op:?} on {})", path.display()));
            fs::remove_dir_all(&db).unwrap();
        }
    }
    eprintln!(
        "{cases} cases in {:.1} s; the failed call of each, by kind: {covered:?}",
        started.elapsed().as_secs_f64()
    );
    for op in [
        Op::Open,
        Op::Create,
        Op::Read,
        Op::Map,
        Op::List,
        Op::Write,
        Op::Sync,
        Op::SyncDir,
        Op::Rename,
        Op::CloseLog,
        Op::Remove,
        Op::Lock,
    ] {
        assert!(covered.contains_key(&op), "no round made a {op:?} call fail: {covered:?}");
    }
    scenario.teardown();
}

/// A tenant whose first merge fails, at any call of the round (a failed listing of its shard
/// quarantines it before it has a file; a large one's first segment may be in place before the
/// round fails), counts and lists its ids once healed: it is named in its shard's list with its
/// new file.
#[test]
fn a_new_tenant_whose_first_merge_fails_at_any_call_counts_and_lists_once_healed() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    for n in 0.. {
        let db = dir.path().join(format!("case-{n}"));
        let mut acked = BTreeMap::new();
        let store = open(&db, WORKER).unwrap();
        append(&store, &mut acked, "fresh", 0, 5);
        append(&store, &mut acked, "large", 0, 1100);
        drop(store);
        let injected = faulty_round(&db, Fault::Once("EIO"), n);
        let Some((op, path)) = injected.first() else { break };
        let case = format!("EIO at call {n} ({op:?} on {})", path.display());
        heal_and_check(&db, &acked, None, &case);
        // Named in its shard's list, which listings read where the shard's index of counts is
        // not current.
        let shards = fs::read_dir(db.join("shards")).unwrap().flatten();
        let names: String =
            shards.map(|shard| fs::read_to_string(shard.path().join("TENANTS")).unwrap_or_default()).collect();
        for tenant in ["fresh", "large"] {
            let line = format!("{tenant:?}");
            assert!(names.lines().any(|named| named == line), "{case}: no line names {tenant}: {names:?}");
        }
    }
    scenario.teardown();
}

/// A worker that dies after its empty log file was deleted and before the next one existed
/// (here: creating files fails at that instant) must not use that number again on its next
/// start: readers may know the old file by it.
#[test]
fn a_log_number_is_never_used_twice() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let log_numbers = || -> BTreeSet<u64> {
        let entries = fs::read_dir(db.join("wal").join(WORKER)).unwrap().flatten();
        entries.filter_map(|e| e.file_name().to_str()?.split_once('.')?.0.parse().ok()).collect()
    };
    let mut used = BTreeSet::new();
    let store = open(&db, WORKER).unwrap();
    append(&store, &mut BTreeMap::new(), "t", 0, 3);
    used.extend(log_numbers());
    store.flush().unwrap();
    used.extend(log_numbers());
    drop(store);

    fail::cfg("store-io-create", "return(EIO)").unwrap();
    assert!(open(&db, WORKER).is_err(), "no file can be created");
    fail::remove("store-io-create");
    let store = open(&db, WORKER).unwrap();
    let active = *log_numbers().iter().max().unwrap();
    assert!(active > *used.iter().max().unwrap(), "file {active} again: {used:?} were used");
    drop(store);
    scenario.teardown();
}
