//! The behaviour every backend of the tenants' sets must have, as one set of scripts run against
//! each: the JSON files; Redis (a real `redis-server` on loopback, one per test, which cannot
//! confirm its writes: log files wait out a grace); and Valkey with its append-only file on, whose
//! `WAITAOF` confirms them (log files go at once); and Redis over TLS (`rediss://`, with mutual
//! authentication, certificates made by `openssl` for the test). A new backend is added to
//! [`every_backend!`] and must pass them all. Then the hand-off of log files to a Redis server,
//! each way, and a server that a foreign authority vouches for, refused.
//!
//! The scripts go through the store's public API only: what a worker sees, whatever keeps the
//! sets.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use countapp_shared::config::{RedisHandoff, StoreKind};
use countapp_store::{Item, RedisTls, Settings, Store, StoreError, StoreOptions};
use countapp_testcluster::redis::{Certificates, RedisServer};
use countapp_testcluster::tenant_files;

/// A backend under test: a database directory, and for Redis the server its sets live in.
struct Backend {
    dir: tempfile::TempDir,
    kind: StoreKind,
    redis: Option<RedisServer>,
    tls: RedisTls,
}

impl Backend {
    fn json() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        Backend { dir, kind: StoreKind::Json, redis: None, tls: RedisTls::default() }
    }

    fn redis() -> Backend {
        Backend::redis_on(RedisServer::start_binary("redis-server", false))
    }

    fn valkey_with_aof() -> Backend {
        Backend::redis_on(RedisServer::start_binary(&valkey_server(), true))
    }

    /// Redis on its TLS port only, asking for a client certificate; the client trusts the test's
    /// authority alone and shows its own certificate.
    fn redis_over_tls() -> Backend {
        let server = RedisServer::start_tls(Certificates::make());
        let mut backend = Backend::redis_on(server);
        backend.tls = client_tls(backend.redis.as_ref().and_then(RedisServer::certificates).unwrap());
        backend
    }

    fn redis_on(server: RedisServer) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        Backend { dir, kind: StoreKind::Redis, redis: Some(server), tls: RedisTls::default() }
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    /// Opens the store of worker `worker`. Where Redis cannot vouch for its writes (no AOF), a
    /// consumed log file waits out a short grace.
    fn open(&self, worker: &str) -> Store {
        self.open_with_grace(worker, Duration::from_millis(50))
    }

    fn open_with_grace(&self, worker: &str, grace: Duration) -> Store {
        let options = StoreOptions {
            store: self.kind,
            redis_url: self.redis.as_ref().map(RedisServer::url),
            redis_tls: self.tls.clone(),
            lock_wait: Duration::from_secs(5),
            shards: 8,
            forget_gone_after: Duration::ZERO,
            settings: Settings { redis_handoff: RedisHandoff { grace, wait_replicas: 0 }, ..Settings::default() },
            ..StoreOptions::default()
        };
        Store::open(&self.db(), worker, options).unwrap()
    }
}

/// Runs each script as a test against every backend.
macro_rules! every_backend {
    ($($script:ident),* $(,)?) => {
        mod json {
            $(#[test] fn $script() { super::$script(&super::Backend::json()) })*
        }
        mod redis {
            $(#[test] fn $script() { super::$script(&super::Backend::redis()) })*
        }
        mod valkey_with_aof {
            $(#[test] fn $script() { super::$script(&super::Backend::valkey_with_aof()) })*
        }
        mod redis_over_tls {
            $(#[test] fn $script() { super::$script(&super::Backend::redis_over_tls()) })*
        }
    };
}

every_backend!(
    counts_every_distinct_id_once,
    counts_answer_alike_in_and_out_of_a_runtime,
    a_crashed_workers_log_is_merged_by_a_live_one,
    a_restarted_worker_loses_nothing,
    nothing_is_pending_once_drained,
    tenant_names_of_any_shape_keep_their_own_ids,
    live_settings_change_nothing_acknowledged,
    many_counts_and_memberships_answer_in_the_order_asked,
    a_barrier_makes_every_workers_items_visible,
    a_deleted_tenant_is_gone_for_good_and_counts_afresh,
);

fn append(store: &Store, tenant: &str, ids: impl IntoIterator<Item = String>) {
    let ids: Vec<String> = ids.into_iter().collect();
    let batch: Vec<Item> = ids.iter().map(|id| Item::new(tenant, id)).collect();
    store.append_blocking(&batch).unwrap();
}

fn ids(range: std::ops::Range<u32>) -> impl Iterator<Item = String> {
    range.map(|i| format!("id-{i:05}"))
}

/// Merges until `store` has nothing pending, within a deadline.
fn drained(store: &Store) {
    store.drain(Duration::from_secs(10)).unwrap();
    assert_eq!(store.pending_items(), 0, "items still pending after the drain");
}

fn counts_every_distinct_id_once(backend: &Backend) {
    let store = backend.open("w1");
    append(&store, "a", ids(0..100));
    // Repeats within a batch, across batches, and across rounds.
    append(&store, "a", ids(50..150).chain(ids(50..150)));
    append(&store, "b", ids(0..10));
    store.flush().unwrap();
    append(&store, "a", ids(100..200));
    drained(&store);
    assert_eq!(store.count_blocking("a").unwrap(), 200);
    assert_eq!(store.count_blocking("b").unwrap(), 10);
    assert_eq!(store.count_blocking("never-seen").unwrap(), 0);
}

fn counts_answer_alike_in_and_out_of_a_runtime(backend: &Backend) {
    let store = backend.open("w1");
    append(&store, "t", ids(0..42));
    drained(&store);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    assert_eq!(answered(&runtime, || store.count("t")), 42);
    assert_eq!(answered(&runtime, || store.count("u")), 0);
    assert_eq!(store.count_blocking("t").unwrap(), 42);
}

fn a_crashed_workers_log_is_merged_by_a_live_one(backend: &Backend) {
    let crashed = backend.open("w1");
    append(&crashed, "t", ids(0..300));
    crashed.close_log().unwrap();
    append(&crashed, "t", ids(300..400));
    // Dropped without closing: as a crash, its log stays behind, its last file still `.open`.
    drop(crashed);
    let live = backend.open("w2");
    let deadline = Instant::now() + Duration::from_secs(10);
    while live.count_blocking("t").unwrap() < 400 {
        assert!(Instant::now() < deadline, "the dead worker's log was not merged");
        live.flush().unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(live.count_blocking("t").unwrap(), 400);
    // Once taken, the dead worker's files go (after Redis's grace, where it applies), and then
    // its directory, once nothing records its files: the shards that did are rewritten here.
    let dead = backend.db().join("wal").join("w1");
    while dead.exists() {
        assert!(Instant::now() < deadline, "the dead worker's log stays: {:?}", log_files(&dead));
        append(&live, &format!("touch-{}", rand_tenant()), ids(0..1));
        live.flush().unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    // Should it come back after all, it starts afresh, and nothing it writes counts as merged.
    let back = backend.open("w1");
    append(&back, "t", ids(400..450));
    while live.count_blocking("t").unwrap() < 450 {
        assert!(Instant::now() < deadline, "the returning worker's ids are not counted");
        back.flush().unwrap();
        live.flush().unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(back.count_blocking("t").unwrap(), 450);
}

/// Runs the read `read` makes to its answer in `runtime`: one for every read, as a worker's HTTP
/// thread, since the store's connection to Redis lives in the runtime that made it. A read that
/// Redis does not answer in time (the first, while a TLS handshake of a debug build on a busy
/// machine takes longer than a read may) is asked again shortly, as a client does on a 503.
fn answered<'s, T>(runtime: &tokio::runtime::Runtime, read: impl Fn() -> countapp_store::Answer<'s, T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match runtime.block_on(read().get()) {
            Err(StoreError::Backend(why)) if Instant::now() < deadline => {
                println!("asked again: {why}");
                thread::sleep(Duration::from_millis(50));
            }
            answer => return answer.unwrap(),
        }
    }
}

fn many_counts_and_memberships_answer_in_the_order_asked(backend: &Backend) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = backend.open("w1");
    append(&store, "a", ids(0..10));
    append(&store, "b", ids(0..3));
    // Past the ids a tenant keeps in its own file, over two rounds: in segments.
    append(&store, "big", ids(0..2000));
    store.flush().unwrap();
    append(&store, "big", ids(1500..3000));
    drained(&store);
    let tenants: Vec<String> = ["a", "never", "b", "big", "a"].map(String::from).to_vec();
    assert_eq!(answered(&runtime, || store.counts(&tenants)), [10, 0, 3, 3000, 10]);
    let asked: Vec<String> = ["id-00005", "nope", "id-02999", "id-00005", "id-03000"].map(String::from).to_vec();
    assert_eq!(answered(&runtime, || store.contains("big", &asked)), [true, false, true, true, false]);
    assert_eq!(answered(&runtime, || store.contains("a", &asked)), [true, false, false, true, false]);
    assert_eq!(answered(&runtime, || store.contains("never", &asked)), [false; 5]);
    assert!(answered(&runtime, || store.contains("a", &[])).is_empty());
    // Listed in byte order of their names, with their counts, a page at a time.
    let listed = |prefix, after, limit| {
        let page = answered(&runtime, || store.list(prefix, after, limit));
        let tenants: Vec<(String, u64)> = page.tenants.into_iter().map(|(t, n)| (t, n.unwrap())).collect();
        (tenants, page.next)
    };
    let all = vec![("a".to_owned(), 10), ("b".to_owned(), 3), ("big".to_owned(), 3000)];
    assert_eq!(listed("", "", 10), (all.clone(), None));
    assert_eq!(listed("", "", 2), (all[..2].to_vec(), Some("b".to_owned())));
    assert_eq!(listed("", "b", 2), (all[2..].to_vec(), None));
    assert_eq!(listed("b", "", 10), (all[1..].to_vec(), None));
    assert_eq!(listed("b", "b", 10), (all[2..].to_vec(), None));
    assert_eq!(listed("c", "", 10), (Vec::new(), None));
    assert_eq!(listed("", "big", 10), (Vec::new(), None));
}

fn a_barrier_makes_every_workers_items_visible(backend: &Backend) {
    let (w1, w2) = (backend.open("w1"), backend.open("w2"));
    let tenants: Vec<String> = (0..20).map(|t| format!("tenant-{t}")).collect();
    for (i, tenant) in tenants.iter().enumerate() {
        append(if i % 2 == 0 { &w1 } else { &w2 }, tenant, ids(0..(i as u32 + 1)));
    }
    let shards: Vec<u16> = tenants.iter().map(|t| countapp_store::shard_of(t, w1.shards())).collect();
    // Step 1, every worker closes its log; step 2, each merges and vouches, until covered.
    w1.close_log().unwrap();
    w2.close_log().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w1.covered(&shards, &[w1.settle(&shards, &[]).unwrap(), w2.settle(&shards, &[]).unwrap()]) {
        assert!(Instant::now() < deadline, "the workers never vouched for every shard");
        thread::sleep(Duration::from_millis(20));
    }
    for (i, tenant) in tenants.iter().enumerate() {
        assert_eq!(w1.count_blocking(tenant).unwrap(), i as u64 + 1, "{tenant} at w1");
        assert_eq!(w2.count_blocking(tenant).unwrap(), i as u64 + 1, "{tenant} at w2");
    }
    // Where each worker merges its own log, one worker's word is not every worker's.
    if backend.kind == StoreKind::Redis {
        assert!(!w1.covered(&shards, &[w1.settle(&shards, &[]).unwrap(), Vec::new()]));
    }
}

fn a_deleted_tenant_is_gone_for_good_and_counts_afresh(backend: &Backend) {
    // Where Redis cannot vouch for its writes, consumed log files wait out a grace long enough
    // that a deletion that did not outlast them would be undone by the replay below.
    let grace = Duration::from_secs(1);
    let (w1, w2) = (backend.open_with_grace("w1", grace), backend.open_with_grace("w2", grace));
    // A small tenant and one in segments, their ids in both workers' logs, merged or not.
    for tenant in ["small", "big"] {
        let n = if tenant == "big" { 3000 } else { 100 };
        append(&w1, tenant, ids(0..n));
        w1.flush().unwrap();
        append(&w2, tenant, ids(n / 2..n + 50));
    }
    append(&w1, "kept", ids(0..7));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let contains = |store: &Store, asked: &[&str]| {
        let asked: Vec<String> = asked.iter().map(|id| (*id).to_owned()).collect();
        answered(&runtime, || store.contains("big", &asked))
    };
    // Membership checks read the segments of "big" (and keep them, where segments are files),
    // merged by whichever worker merges its shard.
    let merged = || [&w1, &w2, &w1].map(|store| store.flush().unwrap());
    merged();
    for store in [&w1, &w2] {
        assert_eq!(contains(store, &["id-00005", "id-03049", "id-05001"]), [true, true, false]);
    }
    let delete = |tenant: &str| {
        let (shards, deletes) = (vec![countapp_store::shard_of(tenant, w1.shards())], vec![tenant.to_owned()]);
        w1.close_log().unwrap();
        w2.close_log().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let vouched = [w1.settle(&shards, &deletes).unwrap(), w2.settle(&shards, &deletes).unwrap()];
            if w1.covered(&shards, &vouched) {
                break;
            }
            assert!(Instant::now() < deadline, "{tenant} was never deleted");
            thread::sleep(Duration::from_millis(20));
        }
    };
    delete("small");
    delete("big");
    // A barrier's round merges the shards it is for alone: the rest is the merger's, here.
    w1.flush().unwrap();
    w2.flush().unwrap();
    for store in [&w1, &w2] {
        assert_eq!(store.count_blocking("small").unwrap(), 0);
        assert_eq!(store.count_blocking("big").unwrap(), 0);
        assert_eq!(store.count_blocking("kept").unwrap(), 7);
        let page = answered(&runtime, || store.list("", "", 10));
        assert_eq!(page.tenants, [("kept".to_owned(), Ok(7))], "the deleted tenants are still listed");
    }
    if backend.kind == StoreKind::Json {
        assert_eq!(tenant_files(&backend.db(), "big"), Vec::<PathBuf>::new(), "the deleted tenant's files stay");
    }
    // Posted to again, in segments from the first round on: numbered afresh, under the names of
    // the deleted ones, which no membership check may answer from.
    append(&w1, "big", ids(5000..7000));
    merged();
    for store in [&w1, &w2] {
        assert_eq!(contains(store, &["id-00005", "id-03049", "id-05001"]), [false, false, true]);
    }
    drop(runtime);
    // Gone for good: nothing a crash leaves behind, merged again, brings an id back.
    drop((w1, w2));
    let w1 = backend.open_with_grace("w1", grace);
    drained(&w1);
    assert_eq!(w1.count_blocking("big").unwrap(), 2000);
    // Ids acknowledged after the deletion count afresh.
    append(&w1, "big", ids(10..15));
    drained(&w1);
    assert_eq!(w1.count_blocking("big").unwrap(), 2005);
    assert_eq!(w1.count_blocking("kept").unwrap(), 7);
}

/// A tenant name of its own for each call, to touch shards in turn.
fn rand_tenant() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn a_restarted_worker_loses_nothing(backend: &Backend) {
    let first = backend.open("w1");
    append(&first, "t", ids(0..100));
    drop(first);
    let second = backend.open("w1");
    append(&second, "t", ids(100..150));
    drained(&second);
    assert_eq!(second.count_blocking("t").unwrap(), 150);
    drop(second);
    let third = backend.open("w1");
    append(&third, "t", ids(140..160));
    drained(&third);
    assert_eq!(third.count_blocking("t").unwrap(), 160);
}

fn nothing_is_pending_once_drained(backend: &Backend) {
    let store = backend.open("w1");
    assert_eq!(store.oldest_pending(), Duration::ZERO);
    append(&store, "t", ids(0..10));
    assert_eq!(store.pending_items(), 10);
    thread::sleep(Duration::from_millis(30));
    assert!(store.oldest_pending() >= Duration::from_millis(30), "{:?}", store.oldest_pending());
    store.close_log().unwrap();
    assert_eq!(store.pending_items(), 10, "a closed file's items are pending until merged");
    assert!(store.oldest_pending() >= Duration::from_millis(30), "{:?}", store.oldest_pending());
    drained(&store);
    assert_eq!(store.oldest_pending(), Duration::ZERO);
    assert_eq!(store.merge_lag(), Duration::ZERO);
    let stats = store.stats();
    assert_eq!(stats.pending_items, 0);
    let (_, _, last) = stats.last_merge.expect("a round that merged something");
    assert_eq!((last.items, last.new_ids), (10, 10));
}

fn tenant_names_of_any_shape_keep_their_own_ids(backend: &Backend) {
    let names = ["..", "a/b", "a b", "{tag}", "é", "t\u{0}x", &"long".repeat(64)];
    let store = backend.open("w1");
    for (n, name) in names.iter().enumerate() {
        append(&store, name, ids(0..(n as u32 + 1)));
    }
    drained(&store);
    for (n, name) in names.iter().enumerate() {
        assert_eq!(store.count_blocking(name).unwrap(), n as u64 + 1, "tenant {name:?}");
    }
}

fn live_settings_change_nothing_acknowledged(backend: &Backend) {
    let store = backend.open("w1");
    append(&store, "t", ids(0..10));
    for fsync in [countapp_shared::config::FsyncPolicy::Always, countapp_shared::config::FsyncPolicy::Never] {
        store.apply(&Settings { fsync, damaged_max_bytes: 1 << 20, ..Settings::default() });
        append(&store, "t", ids(0..20));
        store.flush().unwrap();
    }
    drained(&store);
    assert_eq!(store.count_blocking("t").unwrap(), 20);
}

/// Where the server has `WAITAOF` and its append-only file is on, it confirms that it wrote the
/// ids to disk: a merged log file is deleted at once, whatever the grace.
#[test]
fn with_waitaof_a_merged_log_file_is_deleted_at_once() {
    let backend = Backend::valkey_with_aof();
    let store = backend.open_with_grace("w1", Duration::from_secs(600));
    append(&store, "t", ids(0..100));
    store.flush().unwrap();
    assert_eq!(store.count_blocking("t").unwrap(), 100);
    let left = log_files(&backend.db());
    assert!(left.iter().all(|f| f.extension().is_some_and(|e| e == "open")), "{left:?}");
}

/// A merge spread over several connections (`redis_merge_connections`) counts every id once,
/// and each connection asks Redis to confirm its own writes before the log file goes: `WAITAOF`
/// confirms only the writes of the connection that sends it.
#[test]
fn a_merge_spread_over_connections_counts_every_id_and_each_connection_confirms() {
    let backend = Backend::valkey_with_aof();
    let store = backend.open_with_grace("w1", Duration::from_secs(600));
    store.apply(&Settings { redis_merge_connections: 4, ..Settings::default() });
    // 16 MB of ids over 4 tenants: four pipelines, each tenant's ids in several.
    for tenant in ["a", "b", "c", "d"] {
        append(&store, tenant, (0..250_000u32).map(|i| format!("{tenant}-{i:014}")));
        append(&store, tenant, (0..1_000u32).map(|i| format!("{tenant}-{i:014}")));
    }
    store.flush().unwrap();
    for tenant in ["a", "b", "c", "d"] {
        assert_eq!(store.count_blocking(tenant).unwrap(), 250_000, "{tenant}");
    }
    let left = log_files(&backend.db());
    assert!(left.iter().all(|f| f.extension().is_some_and(|e| e == "open")), "{left:?}");
    let redis = backend.redis.as_ref().unwrap();
    // Each connection sent a share of the ids: megabytes in.
    let clients = redis.cli(&["client", "list"]);
    let senders = clients.lines().filter(|client| {
        let bytes_in = client.split(' ').find_map(|field| field.strip_prefix("tot-net-in="));
        bytes_in.and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 1 << 20)
    });
    assert_eq!(senders.count(), 4, "{clients}");
    let stats = redis.cli(&["info", "commandstats"]);
    assert!(stats.lines().any(|line| line.starts_with("cmdstat_waitaof:calls=4,")), "{stats}");
}

/// Where it has `WAITAOF` but no append-only file, it refuses to confirm: a merged log file is
/// consumed (`.done`), no longer pending, and kept for the grace.
#[test]
fn without_an_append_only_file_a_merged_log_file_waits_out_the_grace() {
    let backend = Backend::redis_on(RedisServer::start_binary(&valkey_server(), false));
    let store = backend.open_with_grace("w1", Duration::from_secs(600));
    append(&store, "t", ids(0..100));
    store.flush().unwrap();
    assert_eq!(store.count_blocking("t").unwrap(), 100);
    assert_eq!(store.pending_items(), 0);
    let consumed = log_files(&backend.db()).into_iter().filter(|f| f.extension().is_some_and(|e| e == "done"));
    assert_eq!(consumed.count(), 1);
}

/// A server whose certificate an authority other than the one the client trusts signed is
/// refused: nothing is merged into it, and a count says why.
/// Sets written by the release before tenants were listed, which named them nowhere, are listed
/// once a worker of this release has run a round, on a server and on a cluster alike.
#[test]
fn the_sets_of_the_release_before_listing_are_listed() {
    let earlier = [("a", 3), ("{tagged}", 2), ("50%", 1)];
    let write = |cli: &dyn Fn(&[&str]) -> String| {
        for (tenant, ids) in earlier {
            let key = format!("countapp:tenant:{}", tenant.replace('%', "%25").replace('{', "%7B").replace('}', "%7D"));
            let ids: Vec<String> = (0..ids).map(|i| i.to_string()).collect();
            let mut args = vec!["SADD", key.as_str()];
            args.extend(ids.iter().map(String::as_str));
            cli(&args);
        }
    };
    let expected: Vec<(String, Result<u64, String>)> =
        [("50%", 1), ("a", 3), ("{tagged}", 2)].iter().map(|(t, n)| (t.to_string(), Ok(*n))).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    let server = Backend::redis();
    let redis = server.redis.as_ref().unwrap();
    write(&|args| redis.cli(args));
    let store = server.open("w1");
    store.flush().unwrap();
    assert_eq!(runtime.block_on(store.list("", "", 10).get()).unwrap().tenants, expected);

    let cluster = countapp_testcluster::redis::RedisCluster::start(3);
    write(&|args| cluster.nodes()[0].cli(&[&["-c"][..], args].concat()));
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        store: StoreKind::Redis,
        redis_url: Some(cluster.url()),
        redis_cluster: true,
        shards: 8,
        ..StoreOptions::default()
    };
    let store = Store::open(&dir.path().join("db"), "w1", options).unwrap();
    store.flush().unwrap();
    assert_eq!(runtime.block_on(store.list("", "", 10).get()).unwrap().tenants, expected);
}

#[test]
fn a_server_vouched_for_by_a_foreign_authority_is_refused() {
    let ours = Certificates::make();
    let mut backend = Backend::redis_on(RedisServer::start_tls(Certificates::make()));
    backend.tls = client_tls(&ours);
    let store = backend.open("w1");
    append(&store, "t", ids(0..10));
    let refused = store.flush().expect_err("a merge into a server the client does not trust");
    assert!(refused.to_string().contains("redis"), "{refused}");
    assert!(store.count_blocking("t").is_err());
    assert_eq!(store.pending_items(), 10, "nothing merged, nothing lost");
}

/// What a client of a server `certificates` made shows and trusts.
fn client_tls(certificates: &Certificates) -> RedisTls {
    RedisTls {
        ca_file: Some(certificates.file("ca.crt")),
        cert_file: Some(certificates.file("client.crt")),
        key_file: Some(certificates.file("client.key")),
    }
}

/// The `valkey-server` to run: `$VALKEY_SERVER` (which `make tests` sets, see
/// scripts/ensure-valkey.sh), else the one on PATH.
fn valkey_server() -> String {
    std::env::var("VALKEY_SERVER").unwrap_or_else(|_| "valkey-server".to_owned())
}

/// The log files (`.open`, `.log`, `.done`) in the log directory `dir`, or under every worker's
/// directory of the database `dir`.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files = Vec::new();
    for path in entries.flatten().map(|entry| entry.path()) {
        if path.is_dir() {
            files.extend(log_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "open" || ext == "log" || ext == "done") {
            files.push(path);
        }
    }
    files
}
