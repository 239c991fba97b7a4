//! The store against a model: random sequences of appends, flushes, crashes and graceful
//! restarts by two workers sharing one database, compared after every step with a `HashSet` per
//! tenant.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use countapp_shared::config::FsyncPolicy;
use countapp_shared::items::Item;
use countapp_worker::store::{Store, StoreOptions};
use proptest::prelude::*;

const TENANTS: [&str; 4] = ["a", "A", "../x", "t é"];
const WORKERS: [&str; 2] = ["w1", "w2"];

#[derive(Debug, Clone)]
enum Op {
    /// Worker `.0` appends `(tenant index, id)` pairs.
    Append(usize, Vec<(usize, u8)>),
    /// Worker `.0` flushes.
    Flush(usize),
    /// Worker `.0` crashes: dropped without a flush, then opened again.
    Crash(usize),
    /// Worker `.0` crashes and stays down until it is next used: its log is an orphan meanwhile.
    Down(usize),
    /// Worker `.0` closes gracefully and opens again.
    Restart(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let worker = 0..WORKERS.len();
    prop_oneof![
        6 => (worker.clone(), prop::collection::vec((0..TENANTS.len(), any::<u8>()), 0..20)).prop_map(|(w, items)| Op::Append(w, items)),
        3 => worker.clone().prop_map(Op::Flush),
        1 => worker.clone().prop_map(Op::Crash),
        1 => worker.clone().prop_map(Op::Down),
        1 => worker.prop_map(Op::Restart),
    ]
}

fn open(dir: &Path, worker: usize, fsync: FsyncPolicy) -> Store {
    Store::open(dir, WORKERS[worker], StoreOptions { fsync, ..StoreOptions::default() }).unwrap()
}

/// The model: what each worker holds unflushed in its log, and every id flushed per tenant.
#[derive(Default)]
struct Model {
    unflushed: [Vec<(usize, u8)>; WORKERS.len()],
    flushed: BTreeMap<usize, BTreeSet<u8>>,
}

impl Model {
    fn flush_log_of(&mut self, worker: usize) {
        for (t, id) in self.unflushed[worker].drain(..) {
            self.flushed.entry(t).or_default().insert(id);
        }
    }

    /// A flush or an open by `worker` consumes its own log and adopts those of the workers down.
    fn flush_by(&mut self, worker: usize, stores: &[Option<Store>]) {
        for (w, store) in stores.iter().enumerate() {
            if w == worker || store.is_none() {
                self.flush_log_of(w);
            }
        }
    }

    fn count(&self, tenant: usize) -> u64 {
        self.flushed.get(&tenant).map_or(0, |ids| ids.len() as u64)
    }
}

/// The store of worker `w`, opened (which flushes) if it is down.
fn live<'s>(stores: &'s mut [Option<Store>], model: &mut Model, db: &Path, w: usize, fsync: FsyncPolicy) -> &'s Store {
    if stores[w].is_none() {
        model.flush_by(w, stores);
        stores[w] = Some(open(db, w, fsync));
    }
    stores[w].as_ref().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn counts_match_a_hash_set_model(
        ops in prop::collection::vec(op(), 1..40),
        fsync in prop_oneof![Just(FsyncPolicy::Always), Just(FsyncPolicy::EverySec), Just(FsyncPolicy::Never)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        let mut stores: Vec<Option<Store>> = vec![None, None];
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Append(w, items) => {
                    let store = live(&mut stores, &mut model, &db, w, fsync);
                    let ids: Vec<String> = items.iter().map(|(_, id)| id.to_string()).collect();
                    let batch: Vec<Item> = items.iter().zip(&ids).map(|((t, _), id)| Item::new(TENANTS[*t], id)).collect();
                    store.append_blocking(&batch).unwrap();
                    model.unflushed[w].extend(items);
                }
                Op::Flush(w) => {
                    live(&mut stores, &mut model, &db, w, fsync).flush().unwrap();
                    model.flush_by(w, &stores);
                }
                Op::Crash(w) => {
                    stores[w] = None;
                    live(&mut stores, &mut model, &db, w, fsync);
                }
                Op::Down(w) => stores[w] = None,
                Op::Restart(w) => {
                    if let Some(store) = stores[w].take() {
                        store.close().unwrap();
                        model.flush_log_of(w);
                    }
                    live(&mut stores, &mut model, &db, w, fsync);
                }
            }
            // Every live worker reads the same counts, exactly those of the model.
            for store in stores.iter().flatten() {
                for (t, tenant) in TENANTS.iter().enumerate() {
                    prop_assert_eq!(store.count(tenant).unwrap(), model.count(t), "tenant {}", tenant);
                }
            }
        }
        // Once everybody has closed, every acknowledged id is counted.
        for (w, store) in stores.iter_mut().enumerate() {
            if let Some(store) = store.take() {
                store.close().unwrap();
                model.flush_log_of(w);
            }
        }
        let store = live(&mut stores, &mut model, &db, 0, fsync);
        for (t, tenant) in TENANTS.iter().enumerate() {
            prop_assert_eq!(store.count(tenant).unwrap(), model.count(t), "tenant {} at the end", tenant);
            prop_assert!(model.unflushed.iter().all(Vec::is_empty));
        }
    }
}
