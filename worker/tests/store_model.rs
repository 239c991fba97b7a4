//! The store against a model: random sequences of appends, flushes, merges, crashes, workers
//! going down and graceful restarts by three workers sharing one database of four shards, so
//! that the shards change owners all the time; compared after every step with a set per tenant.
//!
//! The model: an item becomes final when its worker closes its log file (a flush) or dies (a
//! dead worker's active file is final too); a final item is counted once a merge round runs in
//! the worker that owns its tenant's shard among the live workers at that moment. Every store,
//! and a reader of the files, must then count exactly the model's counted ids.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use countapp_shared::config::FsyncPolicy;
use countapp_shared::items::Item;
use countapp_worker::store::{Store, StoreOptions, owner_of, read_count, shard_of};
use proptest::prelude::*;

const TENANTS: [&str; 6] = ["a", "A", "../x", "t é", "b", "."];
const WORKERS: [&str; 3] = ["w1", "w2", "w3"];
const SHARDS: u16 = 4;

#[derive(Debug, Clone)]
enum Op {
    /// Worker `.0` appends `(tenant index, id)` pairs.
    Append(usize, Vec<(usize, u8)>),
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
}

fn op() -> impl Strategy<Value = Op> {
    let worker = 0..WORKERS.len();
    prop_oneof![
        6 => (worker.clone(), prop::collection::vec((0..TENANTS.len(), any::<u8>()), 0..20)).prop_map(|(w, items)| Op::Append(w, items)),
        3 => worker.clone().prop_map(Op::Flush),
        2 => worker.clone().prop_map(Op::Merge),
        1 => worker.clone().prop_map(Op::Crash),
        1 => worker.clone().prop_map(Op::Down),
        1 => worker.prop_map(Op::Restart),
    ]
}

fn open(db: &Path, worker: usize, fsync: FsyncPolicy) -> Store {
    Store::open(db, WORKERS[worker], StoreOptions { fsync, shards: SHARDS, ..StoreOptions::default() }).unwrap()
}

/// One appended item, as the model follows it.
#[derive(Debug)]
struct ModelItem {
    worker: usize,
    tenant: usize,
    id: u8,
    /// In a closed log file, or in the active file of a dead worker.
    fin: bool,
    counted: bool,
}

#[derive(Default)]
struct Model {
    items: Vec<ModelItem>,
}

impl Model {
    /// Worker `w`'s active file is closed, or its worker died: its items are final.
    fn finalize(&mut self, w: usize) {
        self.items.iter_mut().filter(|i| i.worker == w).for_each(|i| i.fin = true);
    }

    /// A merge round by worker `w`, with `live` the workers holding their logs.
    fn round(&mut self, w: usize, live: &[bool]) {
        let live: Vec<&str> = WORKERS.iter().zip(live).filter(|(_, up)| **up).map(|(id, _)| *id).collect();
        for item in self.items.iter_mut().filter(|i| i.fin) {
            if owner_of(shard_of(TENANTS[item.tenant], SHARDS), live.iter().copied()) == Some(WORKERS[w]) {
                item.counted = true;
            }
        }
    }

    fn count(&self, tenant: usize) -> u64 {
        self.items.iter().filter(|i| i.tenant == tenant && i.counted).map(|i| i.id).collect::<BTreeSet<_>>().len()
            as u64
    }
}

/// The store of worker `w`, opened if it is down.
fn live<'s>(stores: &'s mut [Option<Store>], db: &Path, w: usize, fsync: FsyncPolicy) -> &'s Store {
    stores[w].get_or_insert_with(|| open(db, w, fsync))
}

fn up(stores: &[Option<Store>]) -> Vec<bool> {
    stores.iter().map(Option::is_some).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn counts_match_a_model_of_owners_and_final_files(
        ops in prop::collection::vec(op(), 1..50),
        fsync in prop_oneof![Just(FsyncPolicy::Always), Just(FsyncPolicy::EverySec), Just(FsyncPolicy::Never)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let mut stores: Vec<Option<Store>> = WORKERS.iter().map(|_| None).collect();
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Append(w, items) => {
                    let store = live(&mut stores, &db, w, fsync);
                    let ids: Vec<String> = items.iter().map(|(_, id)| id.to_string()).collect();
                    let batch: Vec<Item> = items.iter().zip(&ids).map(|((t, _), id)| Item::new(TENANTS[*t], id)).collect();
                    store.append_blocking(&batch).unwrap();
                    let appended = items.into_iter().map(|(tenant, id)| ModelItem { worker: w, tenant, id, fin: false, counted: false });
                    model.items.extend(appended);
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
            }
            // Every live worker, and a reader of the files, counts exactly the model's ids.
            for (t, tenant) in TENANTS.iter().enumerate() {
                for store in stores.iter().flatten() {
                    prop_assert_eq!(store.count_blocking(tenant).unwrap(), model.count(t), "tenant {} by {}", tenant, store.worker_id());
                }
                prop_assert_eq!(read_count(&db, tenant).unwrap(), model.count(t), "tenant {} read from its file", tenant);
            }
        }
        // Once everybody is gone, one worker alone owns every shard: its flush counts every id.
        for store in stores.iter_mut() {
            drop(store.take());
        }
        let store = open(&db, 0, fsync);
        store.flush().unwrap();
        for (t, tenant) in TENANTS.iter().enumerate() {
            let all: BTreeSet<u8> = model.items.iter().filter(|i| i.tenant == t).map(|i| i.id).collect();
            prop_assert_eq!(store.count_blocking(tenant).unwrap(), all.len() as u64, "tenant {} at the end", tenant);
        }
    }
}

/// Two workers that both take a shard for theirs (each saw the other come or go at a different
/// moment) take turns merging into it: each must reload what the other changed before changing
/// it, or a large tenant's manifest would drop the other's segment, and a small tenant's file
/// would be written without the other's ids. Deterministic: worker A holds the shard's tenants
/// in memory when B, which owns the shard once it is live, merges into it; then B leaves, and A
/// merges again without having run a round in between.
#[test]
fn a_worker_that_regains_a_shard_reloads_what_another_changed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let (a, b) = (WORKERS[0], WORKERS[1]);
    let options = || StoreOptions { shards: SHARDS, ..StoreOptions::default() };
    // Two tenants of one shard that B owns while both are live.
    let mut names = (0..).map(|i| format!("tenant {i}"));
    let big = names.find(|t| owner_of(shard_of(t, SHARDS), [a, b]) == Some(b)).unwrap();
    let shard = shard_of(&big, SHARDS);
    let small = names.find(|t| shard_of(t, SHARDS) == shard).unwrap();
    let append = |store: &Store, tenant: &str, ids: std::ops::Range<u32>| {
        let ids: Vec<String> = ids.map(|i| i.to_string()).collect();
        let batch: Vec<Item> = ids.iter().map(|id| Item::new(tenant, id)).collect();
        store.append_blocking(&batch).unwrap();
    };

    let first = Store::open(&db, a, options()).unwrap();
    append(&first, &big, 0..2000);
    first.flush().unwrap();
    let second = Store::open(&db, b, options()).unwrap();
    append(&second, &big, 2000..3000);
    append(&second, &small, 0..10);
    second.flush().unwrap();
    assert_eq!(second.count_blocking(&big).unwrap(), 3000, "B merged into the shard it owns");
    second.close(Duration::ZERO).unwrap();

    append(&first, &big, 3000..3500);
    append(&first, &small, 10..15);
    first.flush().unwrap();
    assert_eq!(first.count_blocking(&big).unwrap(), 3500, "{big:?}");
    assert_eq!(first.count_blocking(&small).unwrap(), 15, "{small:?}");
    drop(first);
    let reader = Store::open(&db, WORKERS[2], options()).unwrap();
    reader.flush().unwrap();
    assert_eq!(read_count(&db, &big).unwrap(), 3500);
    // Every id, as a worker loading the tenant afresh finds it: none is new.
    append(&reader, &big, 0..3500);
    assert_eq!(reader.flush().unwrap().new_ids, 0);
}
