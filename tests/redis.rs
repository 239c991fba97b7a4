//! `store: redis` as its users run it: a real coordinator and real workers whose tenants are
//! sets in a real `redis-server` (or a real three-master Redis Cluster), each test with its own
//! Redis and its own cluster directory. Workers are killed under load, Redis itself is killed
//! under load and restarted, and every acknowledged item must be counted at the end: the
//! worker's local write-ahead log, not Redis, is what makes an acknowledgement durable.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use countapp_testcluster::redis::{RedisCluster, RedisServer, Role};
use countapp_testcluster::{
    Cluster, Load, Node, PUSHED_BACK, batch, client, count_reply, error_message, eventually, free_port, get_json, post,
    sigkill, try_count,
};
use reqwest::StatusCode;
use reqwest::blocking::Client;

/// How long counts get to converge: a flush every 0.2 s, plus respawns.
const SETTLE: Duration = Duration::from_secs(20);
/// How long counts get to converge after Redis comes back: flushes retry with a backoff.
const AFTER_OUTAGE: Duration = Duration::from_secs(30);

/// A cluster of `workers` local workers behind a coordinator on a free port, storing into the
/// Redis at `redis_url` (a cluster's seed node with `redis_cluster`), flushing every 0.2 s and
/// checking health every 0.5 s, with the config lines `more`.
fn cluster(workers: usize, redis_url: &str, redis_cluster: bool, more: &str) -> (Cluster, Vec<u16>, u16) {
    let ports: Vec<u16> = (0..workers).map(|_| free_port()).collect();
    let listen = free_port();
    let extra = format!(
        "listen: 127.0.0.1:{listen}\nworker_persist: 0.2\nconfig_check: 0.5\n\
         store: redis\nredis_url: {redis_url}\nredis_cluster: {redis_cluster}\n{more}"
    );
    (Cluster::new(&ports, &extra), ports, listen)
}

/// The URL of the local worker on `port`, to ask it directly rather than through the
/// coordinator (which retries a worker's 5xx on the others, and so hides it for a while).
fn worker_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

#[test]
fn sigkill_of_workers_under_load_with_a_redis_store_loses_nothing() {
    let redis = RedisServer::start();
    let (cluster, ports, listen) = cluster(3, &redis.url(), false, "");
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(3);
    let load = Load::start(&coordinator.url(), 4, "rkills", false);
    let tenants = load.tenants.clone();
    for round in 0..3 {
        thread::sleep(Duration::from_secs(2));
        sigkill(coordinator.pid_of(ports[round % ports.len()]));
    }
    let tally = load.stop();
    assert!(tally.errors.is_empty(), "clients saw {} errors, first: {:?}", tally.errors.len(), tally.errors.first());
    assert!(tally.acked_batches() > 0);
    tally.check_counted(&client(), &coordinator.url(), SETTLE);
    // The counts come from Redis, not from a store of the worker's own: one set per tenant.
    assert!(redis.dbsize() >= tenants.len() as u64, "Redis holds only {:?}", redis.keys());
}

#[test]
fn redis_restarted_mid_load_loses_nothing_acknowledged() {
    let mut redis = RedisServer::start();
    let (cluster, ports, listen) = cluster(3, &redis.url(), false, "");
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(3);
    let client = client();
    let load = Load::start(&coordinator.url(), 4, "outage", false);
    thread::sleep(Duration::from_secs(1));

    redis.kill();
    let down = Instant::now();
    // A count needs Redis: once a worker notices it is gone, it answers 503 with a JSON error.
    // The first counts may still race the kill (a reply already on its way), so poll.
    let worker = worker_url(ports[0]);
    eventually(Duration::from_secs(10), "a worker answers 503 to a count while Redis is down", || {
        let reply = count_reply(&client, &worker, "outage-0");
        if reply.status() == StatusCode::OK {
            return false;
        }
        let message = error_message(reply, StatusCode::SERVICE_UNAVAILABLE);
        println!("a count while Redis is down, {:?} after the kill: 503 {message:?}", down.elapsed());
        true
    });
    // Ingest does not need Redis: a worker acknowledges into its log while Redis is down.
    let ids: Vec<String> = (0..50).map(|i| format!("while-down-{i}")).collect();
    let items: Vec<(&str, &str)> = ids.iter().map(|id| ("outage-direct", id.as_str())).collect();
    let reply = post(&client, &worker, batch(&items));
    assert_eq!(reply.status(), StatusCode::OK, "a POST while Redis is down: {}", reply.text().unwrap_or_default());
    thread::sleep(Duration::from_millis(1500).saturating_sub(down.elapsed()));

    redis.restart();
    let up = Instant::now();
    thread::sleep(Duration::from_millis(500));
    let tally = load.stop();
    assert!(tally.errors.is_empty(), "clients saw {} errors, first: {:?}", tally.errors.len(), tally.errors.first());
    assert!(tally.acked_batches() > 0);

    // Flushes retry until Redis takes them; until then counts may answer 503, and are read again.
    let url = coordinator.url();
    tally.check_counted(&client, &url, AFTER_OUTAGE);
    eventually(AFTER_OUTAGE, "the batch posted while Redis was down is counted", || {
        try_count(&client, &url, "outage-direct") == Some(50)
    });
    println!("every acknowledged id counted {:?} after Redis came back", up.elapsed());
    assert!(redis.is_running());
}

#[test]
fn a_three_master_cluster_counts_exactly_over_many_tenants() {
    let redis = RedisCluster::start(3);
    let (cluster, ports, listen) = cluster(2, &redis.url(), true, "");
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(2);
    let client = client();
    let url = coordinator.url();

    // 50 tenants, so that their sets fall in slots of every master; ids drawn from small
    // ranges, so that they repeat across batches and within them.
    let tenants: Vec<String> = (0..50).map(|t| format!("tenant-{t:02}")).collect();
    let mut expected: BTreeMap<&str, HashSet<String>> = tenants.iter().map(|t| (t.as_str(), HashSet::new())).collect();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        seed >> 33
    };
    for _ in 0..40 {
        let items: Vec<(&str, String)> = (0..250)
            .map(|_| {
                let t = (next() % tenants.len() as u64) as usize;
                (tenants[t].as_str(), format!("id-{}", next() % (10 + 4 * t as u64)))
            })
            .collect();
        for (tenant, id) in &items {
            expected.get_mut(tenant).unwrap().insert(id.clone());
        }
        let items: Vec<(&str, &str)> = items.iter().map(|(t, id)| (*t, id.as_str())).collect();
        assert_eq!(post(&client, &url, batch(&items)).status(), StatusCode::OK);
    }

    let exact =
        |url: &str| expected.iter().all(|(tenant, ids)| try_count(&client, url, tenant) == Some(ids.len() as u64));
    eventually(SETTLE, "every tenant counts exactly through the coordinator", || exact(&url));
    // Both workers store into the same sets, so each answers every tenant, whoever took its items.
    for &port in &ports {
        eventually(SETTLE, &format!("every tenant counts exactly at the worker on {port}"), || {
            exact(&worker_url(port))
        });
    }
    let sizes: Vec<u64> = redis.nodes().iter().map(|node| node.dbsize()).collect();
    assert!(sizes.iter().all(|&n| n > 0), "keys per master {:?}: {sizes:?}", redis.ports());
    assert!(sizes.iter().sum::<u64>() >= tenants.len() as u64, "keys per master: {sizes:?}");
}

/// A master of a cluster whose masters each have a replica dies (SIGKILL, no goodbye) under
/// load, with `redis_wait_replicas: 1`: its replica is promoted once the others find it
/// unreachable. Ingest does not wait for Redis, so clients see only acknowledgements, and at
/// worst push-back (503) while merges into its slots fail; every acknowledged id is counted
/// afterwards. The master killed is the seed node of `redis_url`, so that the workers must find
/// the cluster through the others. Until it comes back, as a replica of the promoted one, the
/// promoted master has no replica to confirm `WAIT 1`: the workers keep their log files, and
/// consume them once it is back. Each worker spreads its merges over two connections, each
/// confirming its own writes with `WAIT`.
#[test]
fn a_master_killed_under_load_fails_over_to_its_replica_and_loses_nothing() {
    let mut redis = RedisCluster::start_with_replicas(3, 1, Duration::from_millis(1000));
    let seed = 0;
    let replica = *redis.replicas_of(seed).first().expect("the seed node is a master with a replica");
    let config = "redis_wait_replicas: 1\nredis_merge_connections: 2\n";
    let (cluster, ports, listen) = cluster(3, &redis.url(), true, config);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(3);
    let client = client();
    let url = coordinator.url();
    // A tenant whose set is on the master to be killed, to read its count across the failover:
    // one id in each of 40 tenants puts one there but for a chance of (2/3)^40.
    let probes: Vec<String> = (0..40).map(|p| format!("probe-{p}")).collect();
    let items: Vec<(&str, &str)> = probes.iter().map(|p| (p.as_str(), "1")).collect();
    assert_eq!(post(&client, &url, batch(&items)).status(), StatusCode::OK);
    eventually(SETTLE, "the probes are counted", || probes.iter().all(|p| try_count(&client, &url, p) == Some(1)));
    let on_seed = redis.nodes()[seed].keys();
    let probe = probes.iter().find(|p| on_seed.iter().any(|key| key.ends_with(&format!(":{p}")))).unwrap();
    let reads = Reads::start(&url, probe);
    let load = Load::start(&url, 4, "failover", false);
    thread::sleep(Duration::from_secs(2));

    redis.kill(seed);
    let killed = Instant::now();
    let promoted = redis.wait_promoted(replica, Duration::from_secs(15));
    println!("the replica on {} was promoted {promoted:?} after its master was killed", redis.ports()[replica]);
    thread::sleep(Duration::from_secs(3));
    let tally = load.stop();
    let reads = reads.stop();
    println!("counts of {probe} read across the failover: {reads}");
    assert!(reads.failures.is_empty(), "{} count reads failed, first: {:?}", reads.failures.len(), reads.failures[0]);
    assert!(
        reads.statuses.keys().all(|&status| status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE),
        "{reads}"
    );
    assert_eq!(reads.last, Some(1), "the count of {probe} once the replica was promoted: {reads}");
    let unexpected: Vec<&String> =
        tally.errors.iter().filter(|e| !e.starts_with("503") && !e.starts_with(PUSHED_BACK)).collect();
    assert!(
        unexpected.is_empty(),
        "clients saw {} failures other than 503, first: {:?}",
        unexpected.len(),
        unexpected[0]
    );
    println!(
        "{} batches sent, {} acknowledged; {} replies were 503 with Retry-After, {} batches never acknowledged",
        tally.batches.len(),
        tally.acked_batches(),
        tally.pushbacks,
        tally.errors.len()
    );
    assert!(tally.acked_batches() > 0);
    let accounting = tally.check_counted(&client, &url, SETTLE);
    println!("{accounting}, {:?} after the kill", killed.elapsed());

    // Redis took every id, but the promoted master has no replica to confirm them: the log
    // files stay pending rather than be trusted to one copy.
    let pending = |port: u16| get_json(&client, &format!("{}/stats", worker_url(port)))["pending_items"].as_u64();
    let waiting: Vec<Option<u64>> = ports.iter().map(|&port| pending(port)).collect();
    println!("items pending at the workers while the promoted master has no replica: {waiting:?}");
    assert!(waiting.iter().any(|&n| n > Some(0)), "{waiting:?}");

    // The killed master comes back, and rejoins as a replica of the one promoted in its place:
    // WAIT 1 is met again everywhere, and every worker's log drains.
    redis.restart(seed);
    for &port in &ports {
        eventually(SETTLE, &format!("the worker on {port} consumes its log"), || pending(port) == Some(0));
    }
    assert!(matches!(redis.role(seed), Some(Role::Replica(port, _)) if port == redis.ports()[replica]));
    println!("every log consumed {:?} after the kill", killed.elapsed());
}

/// Counts of one tenant read through the coordinator over and over, on a thread of their own,
/// until stopped: what a reader sees while the tenant's set is unreachable.
struct Reads {
    stop: Arc<AtomicBool>,
    reader: thread::JoinHandle<Read>,
}

/// What a [`Reads`] saw: the statuses answered, with how many of each, the requests that got no
/// reply, the last count answered, and the longest time between two counts answered.
#[derive(Debug, Default)]
struct Read {
    statuses: BTreeMap<StatusCode, usize>,
    failures: Vec<String>,
    last: Option<u64>,
    longest_gap: Duration,
}

impl Reads {
    /// Reads `tenant`'s count at `url` every 20 ms or so.
    fn start(url: &str, tenant: &str) -> Reads {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, tenant, stopped) = (url.to_owned(), tenant.to_owned(), stop.clone());
        let reader = thread::spawn(move || {
            let client = client();
            let mut read = Read::default();
            let mut answered = Instant::now();
            while !stopped.load(Ordering::Relaxed) {
                match client.get(format!("{url}/items/{tenant}/count")).send() {
                    Ok(reply) => {
                        *read.statuses.entry(reply.status()).or_default() += 1;
                        if reply.status() == StatusCode::OK {
                            read.last = reply.json::<serde_json::Value>().ok().and_then(|body| body["count"].as_u64());
                            read.longest_gap = read.longest_gap.max(answered.elapsed());
                            answered = Instant::now();
                        }
                    }
                    Err(e) => read.failures.push(e.to_string()),
                }
                thread::sleep(Duration::from_millis(20));
            }
            read
        });
        Reads { stop, reader }
    }

    /// Stops reading, and says what was read.
    fn stop(self) -> Read {
        self.stop.store(true, Ordering::Relaxed);
        self.reader.join().unwrap()
    }
}

impl std::fmt::Display for Read {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let statuses: Vec<String> =
            self.statuses.iter().map(|(status, n)| format!("{n} x {}", status.as_u16())).collect();
        write!(
            f,
            "{}; {} without a reply; last count {:?}; at most {:?} between two counts",
            statuses.join(", "),
            self.failures.len(),
            self.last,
            self.longest_gap
        )
    }
}

#[test]
fn with_redis_down_ingest_is_acknowledged_up_to_max_pending_items_then_refused_until_it_is_back() {
    let mut redis = RedisServer::start();
    redis.kill();
    let port = free_port();
    let extra = format!("store: redis\nredis_url: {}\nmax_pending_items: 100\nworker_persist: 0.2\n", redis.url());
    let cluster = Cluster::new(&[port], &extra);
    let mut worker = cluster.worker(port);
    worker.wait_ready();
    let client = client();
    let ids: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    let items: Vec<(&str, &str)> = ids.iter().map(|id| ("capped", id.as_str())).collect();
    assert_eq!(post(&client, &worker.url(), batch(&items)).status(), StatusCode::OK);
    let refused = post(&client, &worker.url(), batch(&[("capped", "one more")]));
    let message = error_message(refused, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("max_pending_items"), "{message}");

    // Redis is back: the log drains into it, the count is exact and ingest resumes.
    redis.restart();
    eventually(Duration::from_secs(40), "the logged items reach Redis", || {
        try_count(&client, &worker.url(), "capped") == Some(100)
    });
    // The log file is deleted, and the pending count drops, just after its ids reach Redis.
    eventually(Duration::from_secs(10), "ingest resumes", || {
        post(&client, &worker.url(), batch(&[("capped", "one more")])).status() == StatusCode::OK
    });
}

/// A worker on a free port by itself, storing into `redis` with the `extra` config lines,
/// closing its log file every 0.2 s; ready.
fn lone_worker(redis: &RedisServer, extra: &str) -> (Cluster, Node) {
    countapp_testcluster::lone_worker(&format!(
        "store: redis\nredis_url: {}\nworker_persist: 0.2\n{extra}",
        redis.url()
    ))
}

/// Posts `n` ids to `tenant` at `url`, in batches of 100, asserting each is acknowledged, then
/// waits until the tenant's count in Redis shows them all.
fn post_ids_until_counted(client: &Client, url: &str, tenant: &str, n: usize) {
    let ids: Vec<String> = (0..n).map(|i| format!("{tenant}-{i}")).collect();
    for chunk in ids.chunks(100) {
        let items: Vec<(&str, &str)> = chunk.iter().map(|id| (tenant, id.as_str())).collect();
        assert_eq!(post(client, url, batch(&items)).status(), StatusCode::OK);
    }
    eventually(SETTLE, "the ids reach Redis", || try_count(client, url, tenant) == Some(n as u64));
}

/// The worker's `pending_items` in its `/stats`.
fn pending_items(client: &Client, worker: &Node) -> u64 {
    get_json(client, &format!("{}/stats", worker.url()))["pending_items"].as_u64().unwrap()
}

#[test]
fn a_log_file_redis_cannot_vouch_for_is_kept_for_redis_grace_then_deleted() {
    // Debian's Redis 7.0 has no WAITAOF: it cannot confirm that the ids are on its disk.
    let redis = RedisServer::start();
    let grace = Duration::from_secs(4);
    let (cluster, worker) = lone_worker(&redis, &format!("redis_grace: {}\n", grace.as_secs()));
    let client = client();
    post_ids_until_counted(&client, &worker.url(), "graced", 300);
    // Redis took the ids, so the file is consumed (not pending: no backpressure from it), but
    // kept: Redis could still lose them.
    eventually(Duration::from_secs(2), "the log file is consumed", || {
        cluster.consumed_wal_files().iter().any(|(_, len)| *len > 0)
            && cluster.wal_files().iter().all(|(path, _)| path.extension().is_some_and(|ext| ext == "open"))
    });
    let consumed = cluster.consumed_wal_files();
    let seen = Instant::now();
    assert_eq!(pending_items(&client, &worker), 0);
    thread::sleep(grace / 4);
    assert_eq!(cluster.consumed_wal_files(), consumed, "deleted before redis_grace ({grace:?}) was over");
    // Once the grace is over, it goes.
    eventually(grace + SETTLE, "the consumed log file is deleted", || cluster.consumed_wal_files().is_empty());
    println!("the consumed log file was deleted {:?} after it was first seen consumed", seen.elapsed());
    assert!(seen.elapsed() >= grace / 2, "deleted {:?} after it was seen, grace {grace:?}", seen.elapsed());
    assert_eq!(try_count(&client, &worker.url(), "graced"), Some(300));
}

#[test]
fn ids_redis_loses_within_redis_grace_come_back_from_the_log_when_the_worker_restarts() {
    let redis = RedisServer::start();
    // A grace far longer than the test: the loss below surely falls within it.
    let (cluster, mut worker) = lone_worker(&redis, "redis_grace: 600\n");
    let client = client();
    post_ids_until_counted(&client, &worker.url(), "lost", 500);
    eventually(SETTLE, "the log is consumed", || {
        pending_items(&client, &worker) == 0 && !cluster.consumed_wal_files().is_empty()
    });

    // Redis loses its last writes (a power cut under `appendfsync everysec`, a failover to a
    // replica that lagged): the acknowledged ids are now only in the worker's log.
    redis.cli(&["flushall"]);
    // An eventual count may be one the worker read up to 50 ms before.
    eventually(Duration::from_secs(1), "the count reads what Redis holds", || {
        try_count(&client, &worker.url(), "lost") == Some(0)
    });

    // The worker crashes and restarts: what is still on disk is merged again, exactly once
    // per id (SADD is idempotent).
    worker.kill();
    let port = worker.port;
    let mut worker = cluster.worker(port);
    worker.wait_ready();
    eventually(SETTLE, "the lost ids are back", || try_count(&client, &worker.url(), "lost") == Some(500));
    eventually(SETTLE, "the replayed log is consumed again", || pending_items(&client, &worker) == 0);
}

#[test]
fn ids_redis_loses_within_redis_grace_come_back_from_the_log_when_redis_restarts() {
    let mut redis = RedisServer::start();
    let (cluster, worker) = lone_worker(&redis, "redis_grace: 600\n");
    let client = client();
    post_ids_until_counted(&client, &worker.url(), "restarted", 500);
    eventually(SETTLE, "the log is consumed", || {
        pending_items(&client, &worker) == 0 && !cluster.consumed_wal_files().is_empty()
    });

    // Redis loses its last writes and restarts, while the worker runs on: the worker sees that
    // Redis's history no longer holds them, and merges its consumed files again.
    redis.cli(&["flushall"]);
    redis.restart();
    eventually(SETTLE, "the lost ids are back", || try_count(&client, &worker.url(), "restarted") == Some(500));
    assert!(worker.log().contains("Redis may have lost this log file's ids"), "{}", worker.log());
}

/// The Redis process that took the ids keeps running (its `run_id` unchanged), but loses them:
/// made a replica of an empty server for a moment (a failover that went the wrong way), it
/// takes that server's data, then is promoted again. Its replication history no longer runs
/// through where it was when it took them, so the worker merges its consumed files again.
#[test]
fn ids_a_redis_loses_without_restarting_come_back_from_the_log() {
    let redis = RedisServer::start();
    let (cluster, worker) = lone_worker(&redis, "redis_grace: 600\n");
    let client = client();
    post_ids_until_counted(&client, &worker.url(), "swapped", 300);
    eventually(SETTLE, "the log is consumed", || {
        pending_items(&client, &worker) == 0 && !cluster.consumed_wal_files().is_empty()
    });
    let run_id = |server: &RedisServer| {
        let info = server.cli(&["info", "server"]);
        info.lines().find_map(|line| line.strip_prefix("run_id:")).unwrap().trim().to_owned()
    };
    let before = run_id(&redis);

    let empty = RedisServer::start();
    redis.cli(&["replicaof", empty.host(), &empty.port().to_string()]);
    eventually(SETTLE, "the replica has taken the empty data", || {
        redis.cli(&["info", "replication"]).contains("master_link_status:up") && redis.dbsize() == 0
    });
    redis.cli(&["replicaof", "no", "one"]);
    assert_eq!(run_id(&redis), before, "the same Redis process");
    eventually(SETTLE, "the lost ids are back", || try_count(&client, &worker.url(), "swapped") == Some(300));
    assert!(worker.log().contains("Redis may have lost this log file's ids"), "{}", worker.log());
}

#[test]
fn with_redis_wait_replicas_a_log_file_is_consumed_only_once_that_many_replicas_have_its_ids() {
    let redis = RedisServer::start();
    let _replica = RedisServer::start_replica_of(&redis);
    // Asking for two replicas of a primary that has one: Redis takes the ids, but never
    // confirms, so the log file stays pending and is merged again each round.
    let (cluster, worker) = lone_worker(&redis, "config_check: 0.2\nredis_wait_replicas: 2\n");
    let client = client();
    post_ids_until_counted(&client, &worker.url(), "replicated", 100);
    eventually(SETTLE, "the worker says why it keeps the file", || worker.log().contains("WAIT 2"));
    assert_eq!(pending_items(&client, &worker), 100);
    assert!(cluster.consumed_wal_files().is_empty(), "{:?}", cluster.consumed_wal_files());

    // An edit to one replica applies to the running worker: WAIT 1 is met, and the file is
    // consumed (kept for redis_grace, as Redis 7.0 cannot vouch for its own disk).
    let extra = format!(
        "store: redis\nredis_url: {}\nworker_persist: 0.2\nconfig_check: 0.2\nredis_wait_replicas: 1\n",
        redis.url()
    );
    cluster.write_config(&[worker.port], &extra);
    eventually(SETTLE, "the log file is consumed", || {
        pending_items(&client, &worker) == 0 && !cluster.consumed_wal_files().is_empty()
    });
}

/// With Redis setting the pace of merging, a worker closes its log file as soon as it holds more
/// than Redis takes in under a second, not only every `worker_persist`: with `worker_persist: 60`,
/// most of a bulk load is counted within seconds, and a strong count has every id of it.
#[test]
fn a_log_file_holding_more_than_a_second_of_merging_is_closed_before_worker_persist() {
    let redis = RedisServer::start();
    let (_cluster, worker) =
        countapp_testcluster::lone_worker(&format!("store: redis\nredis_url: {}\nworker_persist: 60\n", redis.url()));
    let (client, url) = (client(), worker.url());
    let ids: Vec<String> = (0..400_000).map(|i| format!("bulk-{i:012}")).collect();
    for chunk in ids.chunks(1000) {
        let items: Vec<(&str, &str)> = chunk.iter().map(|id| ("bulk", id.as_str())).collect();
        // Pushed back (nothing applied) while merging is behind, as a client retries.
        eventually(SETTLE, "the batch acknowledged", || match post(&client, &url, batch(&items)).status() {
            StatusCode::OK => true,
            StatusCode::SERVICE_UNAVAILABLE => false,
            other => panic!("{other}"),
        });
    }
    eventually(Duration::from_secs(20), "most of the bulk counted long before worker_persist", || {
        try_count(&client, &url, "bulk").is_some_and(|count| count >= 200_000)
    });
    let strong = get_json(&client, &format!("{url}/items/bulk/count?consistency=strong"));
    assert_eq!(strong["count"], 400_000);
}
