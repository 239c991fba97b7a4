//! Opening a large store (`cargo bench -p countapp-store --bench open`): a store holding 10M ids
//! of 16 bytes over 10 tenants is built once, then a fresh process opens it and reports
//!
//! - how long `open` takes until every tenant's count is served,
//! - how long the first flush into every tenant takes (it loads the tenants' id sets),
//! - the resident memory the loaded sets cost per stored id.
//!
//! A fresh process, so that the memory figure is the store's and not the builder's.

use std::process::Command;
use std::time::Instant;

use countapp_shared::config::FsyncPolicy;
use countapp_store::{Item, Settings, Store, StoreOptions};

const TENANTS: usize = 10;
const IDS_PER_TENANT: usize = 1_000_000;
const BATCH: usize = 100;
const CHILD: &str = "COUNTAPP_BENCH_OPEN_DB";

fn options() -> StoreOptions {
    StoreOptions {
        settings: Settings { fsync: FsyncPolicy::EverySec, ..Settings::default() },
        ..StoreOptions::default()
    }
}

fn tenant(t: usize) -> String {
    format!("tenant-{t}")
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn build(db: &std::path::Path) {
    let started = Instant::now();
    let store = Store::open(db, "builder", options()).unwrap();
    for t in 0..TENANTS {
        let name = tenant(t);
        let ids: Vec<String> =
            (0..IDS_PER_TENANT).map(|i| format!("{:016x}", (t * IDS_PER_TENANT + i) as u64)).collect();
        for chunk in ids.chunks(BATCH) {
            let batch: Vec<Item> = chunk.iter().map(|id| Item::new(&name, id)).collect();
            store.append_blocking(&batch).unwrap();
        }
        store.flush().unwrap();
    }
    store.close(std::time::Duration::ZERO).unwrap();
    println!("built a store of {} ids in {:.1?}", TENANTS * IDS_PER_TENANT, started.elapsed());
}

fn measure(db: &std::path::Path) {
    let before = rss();
    let started = Instant::now();
    let store = Store::open(db, "reader", options()).unwrap();
    for t in 0..TENANTS {
        assert_eq!(store.count_blocking(&tenant(t)).unwrap(), IDS_PER_TENANT as u64);
    }
    let ready = started.elapsed();
    let opened = rss();

    let started = Instant::now();
    let names: Vec<String> = (0..TENANTS).map(tenant).collect();
    let batch: Vec<Item> = names.iter().map(|name| Item::new(name, "one more id")).collect();
    store.append_blocking(&batch).unwrap();
    store.flush().unwrap();
    let loaded = started.elapsed();
    let stored = (TENANTS * IDS_PER_TENANT) as u64;
    let per_id = (rss() - before) as f64 / stored as f64;

    println!("open until every count is served: {ready:.2?} (resident memory +{} MiB)", (opened - before) >> 20);
    println!("first flush into every tenant (loads the id sets): {loaded:.2?}");
    println!("resident memory per stored id with the sets loaded: {per_id:.1} bytes");
}

fn main() {
    if let Ok(db) = std::env::var(CHILD) {
        measure(std::path::Path::new(&db));
        return;
    }
    // `cargo bench` passes `--bench`; any other run (such as `cargo test --benches`) only checks
    // that this compiles.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    build(&db);
    let status = Command::new(std::env::current_exe().unwrap()).env(CHILD, &db).status().unwrap();
    assert!(status.success());
}
