use countapp_shared::config::FsyncPolicy;
use countapp_shared::items::Item;
use countapp_worker::store::{Store, StoreOptions};
use std::time::Instant;
fn main() {
    let fsync = match std::env::args().nth(1).as_deref() {
        Some("never") => FsyncPolicy::Never,
        _ => FsyncPolicy::EverySec,
    };
    let rounds: usize = std::env::args().nth(2).map_or(8, |s| s.parse().unwrap());
    let dir = tempfile::tempdir_in("/work").unwrap();
    let store = Store::open(dir.path(), "w", StoreOptions { fsync, ..Default::default() }).unwrap();
    let tenants: Vec<String> = (0..10).map(|t| format!("tenant-{t}")).collect();
    let mut next = 0u64;
    let mut total = std::time::Duration::ZERO;
    for round in 0..rounds {
        for _ in 0..5000 {
            let ids: Vec<String> = (0..100)
                .map(|_| {
                    next += 1;
                    format!("{next:016x}")
                })
                .collect();
            let batch: Vec<Item> = ids.iter().enumerate().map(|(i, id)| Item::new(&tenants[i % 10], id)).collect();
            store.append_blocking(&batch).unwrap();
        }
        let t = Instant::now();
        let r = store.flush().unwrap();
        let took = t.elapsed();
        total += took;
        println!(
            "round {round}: {:?} for {} items ({:.0} ns/item), wrote {} MB",
            took,
            r.items,
            took.as_nanos() as f64 / r.items as f64,
            r.written_bytes >> 20
        );
    }
    println!("total {total:?}");
}
