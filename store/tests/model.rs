//! The store against a model: random sequences of appends, flushes, merges, crashes, workers
//! going down, graceful restarts, disk errors and damaged files by three workers sharing one
//! database of four shards, so that the shards change owners all the time; compared after every
//! step with a set per tenant. Batches of a few thousand ids make tenants grow into segments,
//! whose merges absorb older segments.
//!
//! The model: an item becomes final when its worker closes its log file (a flush) or dies (a
//! dead worker's active file is final too); a final item is counted once a merge round runs in
//! the worker that owns its tenant's shard among the live workers at that moment. Every store,
//! and a reader of the files, must then count exactly the model's counted ids.
//!
//! Faults: a flush whose Nth file operation fails (the `store-io` fail point, with the
//! `failpoints` feature), after which the worker restarts and flushes again, must count exactly
//! what a flush would have; a shard record overwritten with junk changes no count; a tenant's
//! file overwritten with junk costs only that tenant (an error, or its count as it was, while
//! the others count on), and once the file is restored every count is exact again.
//!
//! The fail points are process-wide: every test here holds [`fail::FailScenario`], so that the
//! faults one injects never reach another.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use countapp_shared::config::FsyncPolicy;
use countapp_store::{Answer, Item, Settings, Store, StoreOptions, owner_of, read_count, shard_of};
use proptest::prelude::*;

const TENANTS: [&str; 6] = ["a", "A", "../x", "t é", "b", "."];
const WORKERS: [&str; 3] = ["w1", "w2", "w3"];
const SHARDS: u16 = 4;
/// Ids are drawn below this: enough for a tenant to outgrow a small file (1,024 ids).
const ID_SPACE: u32 = 3000;

#[derive(Debug, Clone)]
enum Op {
    /// Worker `.0` appends `(tenant index, id)` pairs.
    Append(usize, Vec<(usize, u32)>),
    /// Worker `.0` appends ids `.2 .. .2 + .3` of tenant `.1` in one batch.
    AppendRange(usize, usize, u32, u32),
    /// Worker `.0` flushes: closes its log file and runs a merge round.
    Flush(usize),
    /// Worker `.0` runs a merge round if anything changed since its last.
    Merge(usize),
    /// Worker `.0` crashes: dropped without a flush, then opened again.
    Crash(usize),
    /// Worker `.0` crashes and stays down until it is next used.
    Down(usize),
    /// Worker `.0` closes gracefully (a flush) and opens again.
    Restart(usize),
    /// Worker `.0` flushes with its file operation number `.1` failing, then restarts and
    /// flushes again.
    FaultyFlush(usize, u32),
    /// The record of shard `.0` is overwritten with junk.
    DamageRecord(u16),
    /// The file of tenant `.0` is overwritten with junk while every live worker flushes, then
    /// restored.
    DamageTenant(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let worker = 0..WORKERS.len();
    let tenant = 0..TENANTS.len();
    prop_oneof![
        6 => (worker.clone(), prop::collection::vec((tenant.clone(), 0..ID_SPACE), 0..20)).prop_map(|(w, items)| Op::Append(w, items)),
        3 => (worker.clone(), tenant.clone(), 0..ID_SPACE, 1..1500u32).prop_map(|(w, t, from, len)| Op::AppendRange(w, t, from, len)),
        3 => worker.clone().prop_map(Op::Flush),
        2 => worker.clone().prop_map(Op::Merge),
        1 => worker.clone().prop_map(Op::Crash),
        1 => worker.clone().prop_map(Op::Down),
        1 => worker.clone().prop_map(Op::Restart),
        2 => (worker, 0..200u32).prop_map(|(w, n)| Op::FaultyFlush(w, n)),
        1 => (0..SHARDS).prop_map(Op::DamageRecord),
        1 => tenant.prop_map(Op::DamageTenant),
    ]
}

fn open(db: &Path, worker: usize, fsync: FsyncPolicy) -> Store {
    Store::open(
        db,
        WORKERS[worker],
        StoreOptions { settings: Settings { fsync, ..Settings::default() }, shards: SHARDS, ..StoreOptions::default() },
    )
    .unwrap()
}

/// One appended item, as the model follows it.
#[derive(Debug)]
struct ModelItem {
    worker: usize,
    tenant: usize,
    id: u32,
    /// In a closed log file, or in the active file of a dead worker.
    fin: bool,
    counted: bool,
}

#[derive(Default)]
struct Model {
    items: Vec<ModelItem>,
    /// The ids each tenant counts.
    counted: [BTreeSet<u32>; TENANTS.len()],
}

impl Model {
    fn append(&mut self, worker: usize, items: impl IntoIterator<Item = (usize, u32)>) {
        let appended =
            items.into_iter().map(|(tenant, id)| ModelItem { worker, tenant, id, fin: false, counted: false });
        self.items.extend(appended);
    }

    /// Worker `w`'s active file is closed, or its worker died: its items are final.
    fn finalize(&mut self, w: usize) {
        self.items.iter_mut().filter(|i| i.worker == w).for_each(|i| i.fin = true);
    }

    /// A merge round by worker `w`, with `live` the workers holding their logs.
    fn round(&mut self, w: usize, live: &[bool]) {
        let live: Vec<&str> = WORKERS.iter().zip(live).filter(|(_, up)| **up).map(|(id, _)| *id).collect();
        for item in self.items.iter_mut().filter(|i| i.fin && !i.counted) {
            if owner_of(shard_of(TENANTS[item.tenant], SHARDS), live.iter().copied()) == Some(WORKERS[w]) {
                item.counted = true;
                self.counted[item.tenant].insert(item.id);
            }
        }
    }

    fn count(&self, tenant: usize) -> u64 {
        self.counted[tenant].len() as u64
    }
}

/// The store of worker `w`, opened if it is down.
fn live<'s>(stores: &'s mut [Option<Store>], db: &Path, w: usize, fsync: FsyncPolicy) -> &'s Store {
    stores[w].get_or_insert_with(|| open(db, w, fsync))
}

fn up(stores: &[Option<Store>]) -> Vec<bool> {
    stores.iter().map(Option::is_some).collect()
}

/// The file of `tenant` under `db`, if it has one.
fn tenant_file(db: &Path, tenant: &str) -> Option<PathBuf> {
    let dir = db.join("shards").join(format!("{:03}", shard_of(tenant, SHARDS)));
    let stem = format!(
        "{}.",
        tenant
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .collect::<String>()
    );
    fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        name.starts_with(&stem) && name.ends_with(".json") && read_count_of(p) == Some(tenant.to_owned())
    })
}

/// The tenant a tenant file says it holds.
fn read_count_of(path: &Path) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(&fs::read(path).ok()?).ok()?;
    value["tenant"].as_str().map(str::to_owned)
}

/// Appends the ids `ids` of `tenant`, each written in eight digits, in one batch.
fn append_range(store: &Store, tenant: &str, ids: std::ops::Range<u32>) {
    let ids: Vec<String> = ids.map(|id| format!("{id:08}")).collect();
    let batch: Vec<Item> = ids.iter().map(|id| Item::new(tenant, id)).collect();
    store.append_blocking(&batch).unwrap();
}

/// Every live worker flushes, the model following.
fn flush_all(stores: &mut [Option<Store>], model: &mut Model) -> Result<(), TestCaseError> {
    for w in 0..WORKERS.len() {
        if let Some(store) = &stores[w] {
            store.flush().map_err(|e| TestCaseError::fail(format!("flush by {}: {e}", WORKERS[w])))?;
            model.finalize(w);
            model.round(w, &up(stores));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn counts_match_a_model_of_owners_and_final_files(
        ops in prop::collection::vec(op(), 1..50),
        fsync in prop_oneof![Just(FsyncPolicy::Always), Just(FsyncPolicy::EverySec), Just(FsyncPolicy::Never)],
    ) {
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let mut stores: Vec<Option<Store>> = WORKERS.iter().map(|_| None).collect();
        let mut model = Model::default();
        for op in ops {
            let mut damaged = None;
            match op {
                Op::Append(w, items) => {
                    let store = live(&mut stores, &db, w, fsync);
                    let ids: Vec<String> = items.iter().map(|(_, id)| format!("{id:08}")).collect();
                    let batch: Vec<Item> = items.iter().zip(&ids).map(|((t, _), id)| Item::new(TENANTS[*t], id)).collect();
                    store.append_blocking(&batch).unwrap();
                    model.append(w, items);
                }
                Op::AppendRange(w, t, from, len) => {
                    append_range(live(&mut stores, &db, w, fsync), TENANTS[t], from..from + len);
                    model.append(w, (from..from + len).map(|id| (t, id)));
                }
                Op::Flush(w) => {
                    live(&mut stores, &db, w, fsync).flush().unwrap();
                    model.finalize(w);
                    model.round(w, &up(&stores));
                }
                Op::Merge(w) => {
                    live(&mut stores, &db, w, fsync).merge().unwrap();
                    model.round(w, &up(&stores));
                }
                Op::Crash(w) => {
                    stores[w] = None;
                    model.finalize(w);
                    live(&mut stores, &db, w, fsync);
                }
                Op::Down(w) => {
                    stores[w] = None;
                    model.finalize(w);
                }
                Op::Restart(w) => {
                    if let Some(store) = stores[w].take() {
                        let live_then: Vec<bool> = up(&stores).iter().enumerate().map(|(v, u)| *u || v == w).collect();
                        store.close(Duration::ZERO).unwrap();
                        model.finalize(w);
                        model.round(w, &live_then);
                    }
                    live(&mut stores, &db, w, fsync);
                }
                Op::FaultyFlush(w, n) => {
                    // Under everysec another store's syncer thread could meet the fail point.
                    if fsync != FsyncPolicy::EverySec {
                        let store = live(&mut stores, &db, w, fsync);
                        fail::cfg("store-io", &format!("{n}*off->1*return(EIO)->off")).unwrap();
                        let _ = store.flush();
                        fail::remove("store-io");
                    }
                    // The worker restarts, as a failed fsync makes it do, and flushes again.
                    stores[w] = None;
                    model.finalize(w);
                    live(&mut stores, &db, w, fsync).flush().unwrap();
                    model.round(w, &up(&stores));
                }
                Op::DamageRecord(shard) => {
                    let record = db.join("shards").join(format!("{shard:03}")).join("SHARD.json");
                    if record.exists() {
                        fs::write(&record, "{").unwrap();
                    }
                }
                Op::DamageTenant(t) => {
                    if let Some(file) = tenant_file(&db, TENANTS[t]) {
                        let saved = fs::read(&file).unwrap();
                        fs::write(&file, "junk").unwrap();
                        flush_all(&mut stores, &mut model)?;
                        damaged = Some(t);
                        check_counts(&stores, &db, &model, damaged)?;
                        if fs::read(&file).unwrap() == b"junk" {
                            fs::write(&file, saved).unwrap();
                        }
                        flush_all(&mut stores, &mut model)?;
                        damaged = None;
                    }
                }
            }
            check_counts(&stores, &db, &model, damaged)?;
        }
        // Once everybody is gone, one worker alone owns every shard: its flush counts every id.
        for store in stores.iter_mut() {
            drop(store.take());
        }
        let store = open(&db, 0, fsync);
        store.flush().unwrap();
        for (t, tenant) in TENANTS.iter().enumerate() {
            let all: BTreeSet<u32> = model.items.iter().filter(|i| i.tenant == t).map(|i| i.id).collect();
            prop_assert_eq!(store.count_blocking(tenant).unwrap(), all.len() as u64, "tenant {} at the end", tenant);
        }
        scenario.teardown();
    }
}

/// Every live worker, and a reader of the files, counts exactly the model's ids; the tenant
/// `damaged`, whose file is junk, may answer an error or the count it had instead.
fn check_counts(
    stores: &[Option<Store>],
    db: &Path,
    model: &Model,
    damaged: Option<usize>,
) -> Result<(), TestCaseError> {
    for (t, tenant) in TENANTS.iter().enumerate() {
        let counts = stores.iter().flatten().map(|store| (store.worker_id().to_owned(), store.count_blocking(tenant)));
        for (by, count) in counts.chain([("a reader of the files".to_owned(), read_count(db, tenant))]) {
            match count {
                Ok(count) if Some(t) == damaged => {
                    prop_assert!(count <= model.count(t), "tenant {} by {}: {}", tenant, by, count)
                }
                Err(_) if Some(t) == damaged => {}
                count => {
                    prop_assert_eq!(count.map_err(|e| e.to_string()), Ok(model.count(t)), "tenant {} by {}", tenant, by)
                }
            }
        }
    }
    // Listings (from the shards' indexes of counts where those are current, from the files
    // otherwise) tell the same counts, and list every tenant that counts any id.
    for store in stores.iter().flatten() {
        let Answer::Now(page) = store.list("", "", 1000) else { panic!("the JSON store lists at once") };
        let page = page.map_err(|e| TestCaseError::fail(format!("listing by {}: {e}", store.worker_id())))?;
        for (t, tenant) in TENANTS.iter().enumerate() {
            let listed = page.tenants.iter().find(|(name, _)| name == tenant).map(|(_, count)| count.clone());
            match listed {
                Some(Ok(count)) if Some(t) == damaged => {
                    prop_assert!(
                        count <= model.count(t),
                        "tenant {} listed by {}: {}",
                        tenant,
                        store.worker_id(),
                        count
                    )
                }
                Some(Err(_)) | None if Some(t) == damaged => {}
                listed => prop_assert_eq!(
                    listed,
                    (model.count(t) > 0).then_some(Ok(model.count(t))),
                    "tenant {} listed by {}",
                    tenant,
                    store.worker_id()
                ),
            }
        }
    }
    Ok(())
}

/// Two workers that both take a shard for theirs (each saw the other come or go at a different
/// moment) take turns merging into it: each must reload what the other changed before changing
/// it, or a large tenant's manifest would drop the other's segment, and a small tenant's file
/// would be written without the other's ids. Deterministic: worker A holds the shard's tenants
/// in memory when B, which owns the shard once it is live, merges into it; then B leaves, and A
/// merges again without having run a round in between.
#[test]
fn a_worker_that_regains_a_shard_reloads_what_another_changed() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let (a, b) = (WORKERS[0], WORKERS[1]);
    let options = || StoreOptions { shards: SHARDS, ..StoreOptions::default() };
    // Two tenants of one shard that B owns while both are live.
    let mut names = (0..).map(|i| format!("tenant {i}"));
    let big = names.find(|t| owner_of(shard_of(t, SHARDS), [a, b]) == Some(b)).unwrap();
    let shard = shard_of(&big, SHARDS);
    let small = names.find(|t| shard_of(t, SHARDS) == shard).unwrap();
    let first = Store::open(&db, a, options()).unwrap();
    append_range(&first, &big, 0..2000);
    first.flush().unwrap();
    let second = Store::open(&db, b, options()).unwrap();
    append_range(&second, &big, 2000..3000);
    append_range(&second, &small, 0..10);
    second.flush().unwrap();
    assert_eq!(second.count_blocking(&big).unwrap(), 3000, "B merged into the shard it owns");
    second.close(Duration::ZERO).unwrap();

    append_range(&first, &big, 3000..3500);
    append_range(&first, &small, 10..15);
    first.flush().unwrap();
    assert_eq!(first.count_blocking(&big).unwrap(), 3500, "{big:?}");
    assert_eq!(first.count_blocking(&small).unwrap(), 15, "{small:?}");
    drop(first);
    let reader = Store::open(&db, WORKERS[2], options()).unwrap();
    reader.flush().unwrap();
    assert_eq!(read_count(&db, &big).unwrap(), 3500);
    // Every id, as a worker loading the tenant afresh finds it: none is new.
    append_range(&reader, &big, 0..3500);
    assert_eq!(reader.flush().unwrap().new_ids, 0);
    scenario.teardown();
}

/// A tenant repaired in a round that also brings it new ids takes both in one merge: merged
/// twice, its second merge looked for the segment its first had only staged, and failed. Here
/// a small tenant's file is junk while 1,025 ids arrive (kept in quarantine), is restored, and
/// 1,499 more arrive for the round that repairs it, enough for it to grow into a segment.
#[test]
fn a_repaired_tenant_takes_its_kept_ids_and_the_rounds_new_ids_in_one_merge() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let store = open(&db, 0, FsyncPolicy::Always);
    append_range(&store, "a", 0..1);
    store.flush().unwrap();
    let file = tenant_file(&db, "a").unwrap();
    let saved = fs::read(&file).unwrap();
    fs::write(&file, "junk").unwrap();
    append_range(&store, "a", 0..1025);
    store.flush().unwrap();
    assert!(store.count_blocking("a").is_err(), "quarantined while its file is junk");
    fs::write(&file, saved).unwrap();
    append_range(&store, "a", 1692..3191);
    store.flush().unwrap();
    assert_eq!(store.count_blocking("a").unwrap(), 1025 + 1499);
    assert_eq!(read_count(&db, "a").unwrap(), 1025 + 1499);
    assert!(store.stats().quarantined.is_empty(), "{:?}", store.stats().quarantined);
    scenario.teardown();
}
