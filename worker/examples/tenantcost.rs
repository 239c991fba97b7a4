use countapp_shared::config::FsyncPolicy;
use countapp_shared::items::Item;
use countapp_worker::store::{Store, StoreOptions};
use std::time::Instant;
fn main() {
    let n: usize = std::env::args().nth(1).map_or(100_000, |s| s.parse().unwrap());
    let dir = tempfile::tempdir_in("/work").unwrap();
    let store =
        Store::open(dir.path(), "w", StoreOptions { fsync: FsyncPolicy::EverySec, ..Default::default() }).unwrap();
    for round in 0..2 {
        let names: Vec<String> = (0..n).map(|t| format!("load-abcdef12-{t}")).collect();
        let id = format!("{round:016x}");
        for chunk in names.chunks(1000) {
            let batch: Vec<Item> = chunk.iter().map(|t| Item::new(t, &id)).collect();
            store.append_blocking(&batch).unwrap();
        }
        let t = Instant::now();
        let r = store.flush().unwrap();
        println!(
            "round {round}: {:?} for {} tenants ({:.1} us/tenant)",
            t.elapsed(),
            r.tenants,
            t.elapsed().as_micros() as f64 / n as f64
        );
    }
}
