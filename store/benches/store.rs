//! Store benchmarks (`cargo bench -p countapp-store --bench store`):
//!
//! - `append_then_flush`: batches of 100 ids of 16 bytes over 10 tenants, appended by 16 threads
//!   at once under `everysec`, then one flush; the figure is items per second for both.
//! - `flush_10k_new_ids_into/<size>`: one flush of 10k new ids into a tenant that already holds
//!   `size` ids. It should not depend on `size`: a flush writes only the new ids.
//! - `flush_new_small_tenants/10000`: one flush of 10k tenants of one id each, each a new file;
//!   almost all of it is the kernel creating and renaming the files.
//! - `flush_into_redis/<shape>`: one flush of 100k new ids into a local redis-server (AOF off),
//!   over 10k tenants of 10 ids or 10 tenants of 10k ids, and 100k items of 25k ids posted 4
//!   times each (a repeat is sent to Redis once); and `sadd_into_redis/<shape>`, the same items
//!   sent by the redis crate alone, pipelined, repeats and all: what the store adds to (or
//!   saves of) Redis's own cost.
//! - `spread_into_redis/<server>/<connections>`: one flush of 1M new ids over 1,000 tenants,
//!   its pipelines spread over 1, 2 or 4 connections (`redis_merge_connections`), into
//!   redis-server, valkey-server with two I/O threads, and a Redis Cluster of three masters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use countapp_shared::config::FsyncPolicy;
use countapp_store::{Item, Settings, Store, StoreOptions};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const BATCH: usize = 100;
const TENANTS: usize = 10;
const APPENDERS: usize = 16;

/// Ids never repeat across the whole run, so every item is new to its tenant.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// `batches` batches of `BATCH` fresh 16-byte ids, as `(tenant, id)` strings.
fn fresh_batches(batches: usize, tenant: impl Fn(usize) -> String) -> Vec<Vec<(String, String)>> {
    (0..batches)
        .map(|_| (0..BATCH).map(|i| (tenant(i), format!("{:016x}", NEXT_ID.fetch_add(1, Ordering::Relaxed)))).collect())
        .collect()
}

fn as_items(batch: &[(String, String)]) -> Vec<Item<'_>> {
    batch.iter().map(|(tenant, id)| Item::new(tenant, id)).collect()
}

fn open(dir: &std::path::Path) -> Store {
    Store::open(
        dir,
        "bench",
        StoreOptions {
            settings: Settings { fsync: FsyncPolicy::EverySec, ..Settings::default() },
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

fn append_then_flush(c: &mut Criterion) {
    const ITEMS: usize = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut group = c.benchmark_group("append_then_flush");
    group.throughput(Throughput::Elements(ITEMS as u64)).sample_size(10);
    group.bench_function("1M_items_16_appenders_everysec", |b| {
        // Each batch is made untimed; the appends and the flush are timed.
        b.iter_batched(
            || fresh_batches(ITEMS / BATCH, |i| format!("tenant-{}", i % TENANTS)),
            |batches| {
                std::thread::scope(|s| {
                    for share in batches.chunks(batches.len().div_ceil(APPENDERS)) {
                        let store = &store;
                        s.spawn(move || {
                            for batch in share {
                                store.append_blocking(&as_items(batch)).unwrap();
                            }
                        });
                    }
                });
                store.flush().unwrap();
                // Dropped untimed.
                batches
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn flush_into_large_tenant(c: &mut Criterion) {
    const NEW: usize = 10_000;
    let mut group = c.benchmark_group("flush_10k_new_ids_into");
    group.throughput(Throughput::Elements(NEW as u64)).sample_size(20).measurement_time(Duration::from_secs(5));
    for size in [1_000usize, 100_000, 1_000_000, 10_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for chunk in fresh_batches(size / BATCH, |_| "big".to_owned()).chunks(1000) {
            for batch in chunk {
                store.append_blocking(&as_items(batch)).unwrap();
            }
        }
        store.flush().unwrap();
        assert_eq!(store.count_blocking("big").unwrap(), size as u64);
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter_batched(
                || {
                    for batch in fresh_batches(NEW / BATCH, |_| "big".to_owned()) {
                        store.append_blocking(&as_items(&batch)).unwrap();
                    }
                },
                |()| store.flush().unwrap(),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn flush_new_small_tenants(c: &mut Criterion) {
    const TENANTS: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut group = c.benchmark_group("flush_new_small_tenants");
    group.throughput(Throughput::Elements(TENANTS as u64)).sample_size(10);
    let mut round = 0;
    group.bench_with_input(BenchmarkId::from_parameter(TENANTS), &TENANTS, |b, _| {
        b.iter_batched(
            || {
                round += 1;
                let names: Vec<String> = (0..TENANTS).map(|t| format!("tenant-{round}-{t}")).collect();
                for chunk in names.chunks(1000) {
                    let batch: Vec<Item> = chunk.iter().map(|t| Item::new(t, "0123456789abcdef")).collect();
                    store.append_blocking(&batch).unwrap();
                }
            },
            |()| store.flush().unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// The shapes of 100k items the Redis benchmarks merge: (name, tenants, ids per tenant, times
/// each id is posted).
const REDIS_SHAPES: [(&str, usize, usize, usize); 3] = [
    ("10k_tenants_x_10_ids", 10_000, 10, 1),
    ("10_tenants_x_10k_ids", 10, 10_000, 1),
    ("10_tenants_x_2500_ids_x_4", 10, 2_500, 4),
];

/// `tenants` × `ids` fresh `(tenant, id)` pairs, tenants named after `round`, the whole of them
/// `repeats` times over.
fn redis_items(round: usize, tenants: usize, ids: usize, repeats: usize) -> Vec<(String, String)> {
    let pairs: Vec<(String, String)> = (0..tenants * ids)
        .map(|i| (format!("r{round}-t{}", i % tenants), format!("{:016x}", NEXT_ID.fetch_add(1, Ordering::Relaxed))))
        .collect();
    pairs.iter().cycle().take(pairs.len() * repeats).cloned().collect()
}

fn flush_into_redis(c: &mut Criterion) {
    let redis = countapp_testcluster::redis::RedisServer::start_binary("redis-server", false);
    let mut group = c.benchmark_group("flush_into_redis");
    group.sample_size(10);
    let mut round = 0;
    for (shape, tenants, ids, repeats) in REDIS_SHAPES {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            store: countapp_shared::config::StoreKind::Redis,
            redis_url: Some(redis.url()),
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path(), "bench", options).unwrap();
        group.throughput(Throughput::Elements((tenants * ids * repeats) as u64));
        group.bench_function(shape, |b| {
            b.iter_batched(
                || {
                    round += 1;
                    for batch in redis_items(round, tenants, ids, repeats).chunks(1000) {
                        store.append_blocking(&as_items(batch)).unwrap();
                    }
                },
                |()| store.flush().unwrap(),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();

    let mut group = c.benchmark_group("sadd_into_redis");
    group.sample_size(10);
    let mut connection = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    for (shape, tenants, ids, repeats) in REDIS_SHAPES {
        group.throughput(Throughput::Elements((tenants * ids * repeats) as u64));
        group.bench_function(shape, |b| {
            b.iter_batched(
                || {
                    round += 1;
                    redis_items(round, tenants, ids, repeats)
                },
                |items| {
                    let mut by_tenant: std::collections::HashMap<&str, Vec<&str>> = std::collections::HashMap::new();
                    for (tenant, id) in &items {
                        by_tenant.entry(tenant).or_default().push(id);
                    }
                    let mut pipeline = redis::pipe();
                    for (tenant, ids) in &by_tenant {
                        pipeline.cmd("SADD").arg(format!("countapp:tenant:{tenant}")).arg(ids).ignore();
                    }
                    let () = pipeline.query(&mut connection).unwrap();
                    drop(by_tenant);
                    // The items are dropped untimed.
                    items
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// Connections a merge is spread over in `spread_into_redis`.
const SPREADS: [usize; 3] = [1, 2, 4];

/// One flush of 1M new ids over 1,000 tenants (16 MB of ids, four pipelines) spread over 1, 2
/// and 4 connections: into redis-server (one thread), into valkey-server with two I/O threads
/// (where `VALKEY_SERVER` names one), and into a Redis Cluster of three masters.
fn spread_into_redis(c: &mut Criterion) {
    use countapp_testcluster::redis::{RedisCluster, RedisServer};
    let mut group = c.benchmark_group("spread_into_redis");
    group.sample_size(10);
    group.throughput(Throughput::Elements(1_000_000));
    let valkey = std::env::var("VALKEY_SERVER").ok();
    // (name, URL, whether a cluster, the running servers: killed when dropped.)
    let mut servers: Vec<(&str, String, bool, Box<dyn std::any::Any>)> = Vec::new();
    let redis = RedisServer::start_binary("redis-server", false);
    servers.push(("redis", redis.url(), false, Box::new(redis)));
    if let Some(valkey) = &valkey {
        let valkey = RedisServer::start_binary_with(valkey, false, &["--io-threads", "2"]);
        servers.push(("valkey_io_threads_2", valkey.url(), false, Box::new(valkey)));
    }
    let cluster = RedisCluster::start(3);
    servers.push(("cluster_of_3", cluster.url(), true, Box::new(cluster)));
    let mut round = 0;
    for (server, url, cluster, _running) in &servers {
        for connections in SPREADS {
            let dir = tempfile::tempdir().unwrap();
            let options = StoreOptions {
                store: countapp_shared::config::StoreKind::Redis,
                redis_url: Some(url.clone()),
                redis_cluster: *cluster,
                settings: Settings { redis_merge_connections: connections, ..Settings::default() },
                ..StoreOptions::default()
            };
            let store = Store::open(dir.path(), "bench", options).unwrap();
            group.bench_function(BenchmarkId::new(*server, connections), |b| {
                b.iter_batched(
                    || {
                        round += 1;
                        for batch in redis_items(round, 1_000, 1_000, 1).chunks(10_000) {
                            store.append_blocking(&as_items(batch)).unwrap();
                        }
                    },
                    |()| store.flush().unwrap(),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    append_then_flush,
    flush_into_large_tenant,
    flush_new_small_tenants,
    flush_into_redis,
    spread_into_redis
);
criterion_main!(benches);
