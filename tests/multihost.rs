//! CountApp across machines, as "Beyond one machine" in the README runs it: three hosts with
//! addresses of their own (network namespaces on this machine, joined by a switch), links cut
//! and healed under load.
//!
//! - host A runs the coordinator, which spawns two local workers;
//! - host B runs two workers started by hand, with a config and a database of B's own; A's
//!   coordinator lists them by URL;
//! - host C runs redis-server, which every worker stores the tenants' sets into.
//!
//! The test's own namespace is on the switch too, and drives the load through A's coordinator.
//! Every batch carries a marker (id `m` in a tenant of the batch's own), so that each batch's
//! fate is read exactly at the end: every acknowledged batch must be counted, and every tenant
//! must count exactly the ids of the batches counted.

use std::thread;
use std::time::{Duration, Instant};

use countapp_testcluster::netns::Network;
use countapp_testcluster::redis::RedisServer;
use countapp_testcluster::{Cluster, Load, Node, client, count_reply, error_message, eventually, free_port, get_json};
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::Value;

/// How long a link stays cut.
const OUTAGE: Duration = Duration::from_secs(5);
/// How long a client waits for a reply: past the coordinator's own hop to a worker (10 s), so
/// that a request stuck on a worker that was just cut off is retried by the coordinator on
/// another worker, not failed by the client.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The coordinator's `/stats`.
fn stats(client: &Client, coordinator: &Node) -> Value {
    get_json(client, &format!("{}/stats", coordinator.url()))
}

/// The coordinator's live workers.
fn live_workers(client: &Client, coordinator: &Node) -> u64 {
    stats(client, coordinator)["cluster"]["live_workers"].as_u64().unwrap()
}

/// Items the coordinator routed to the workers whose URL starts with `prefix`, and acknowledged.
fn items_routed(client: &Client, coordinator: &Node, prefix: &str) -> u64 {
    let stats = stats(client, coordinator);
    let workers = stats["workers"].as_array().unwrap();
    workers
        .iter()
        .filter(|w| w["url"].as_str().unwrap().starts_with(prefix))
        .map(|w| w["items_accepted"].as_u64().unwrap())
        .sum()
}

#[test]
fn hosts_cut_off_and_healed_under_load_lose_nothing_acknowledged() {
    let mut network = match Network::new() {
        Ok(network) => network,
        Err(why) => {
            println!("skipped: network namespaces cannot be created here: {why}");
            return;
        }
    };
    let (a, b, c) = (network.host('a', 1), network.host('b', 2), network.host('c', 3));
    let started = Instant::now();
    let redis = RedisServer::start_on(&c);
    let common = format!("store: redis\nredis_url: {}\nworker_persist: 0.5\nconfig_check: 0.5\n", redis.url());

    // Host B: its owner starts its workers by hand, bound to B's address.
    let b_urls: Vec<String> = (0..2).map(|_| format!("http://{}:{}", b.addr, free_port())).collect();
    let host_b = Cluster::with_urls(&b_urls, &common);
    let mut b_workers: Vec<Node> =
        b_urls.iter().map(|url| host_b.worker_on(&b, url.rsplit(':').next().unwrap().parse().unwrap())).collect();
    for worker in &mut b_workers {
        worker.wait_ready();
    }
    // Host A: the coordinator spawns its two local workers, and routes to B's as well.
    let mut workers: Vec<String> = (0..2).map(|_| format!("http://127.0.0.1:{}", free_port())).collect();
    workers.extend(b_urls.iter().cloned());
    let listen = free_port();
    let host_a = Cluster::with_urls(&workers, &format!("{common}listen: {}:{listen}\n", a.addr));
    let mut coordinator = host_a.coordinator_on(&a, listen);
    coordinator.wait_live(4);
    let url = coordinator.url();
    let client = client();
    let on_b = format!("http://{}:", b.addr);

    let load = Load::start_paced(&url, 3, "hosts", Duration::from_millis(40), CLIENT_TIMEOUT);
    let tenants = load.tenants.clone();
    eventually(Duration::from_secs(10), "B's workers take a share of the load", || {
        items_routed(&client, &coordinator, &on_b) > 0
    });

    // B is cut off: the coordinator stops routing to its workers, and no client sees an error.
    network.cut(&b);
    let cut = Instant::now();
    let noticed =
        eventually(OUTAGE, "the coordinator stops routing to B's workers", || live_workers(&client, &coordinator) == 2);
    thread::sleep(OUTAGE.saturating_sub(cut.elapsed()));
    network.heal(&b);
    let healed = Instant::now();
    eventually(Duration::from_secs(20), "B's workers rejoin", || live_workers(&client, &coordinator) == 4);
    let rejoined = healed.elapsed();
    let routed = items_routed(&client, &coordinator, &on_b);
    eventually(Duration::from_secs(10), "B's workers take requests again", || {
        items_routed(&client, &coordinator, &on_b) > routed
    });
    println!("B cut off: noticed in {noticed:?}; healed after {:?}; rejoined {rejoined:?} later", healed - cut);

    // C is cut off: ingest goes on into the workers' logs; counts answer 503 with the reason.
    let acked_before = stats(&client, &coordinator)["cluster"]["items_accepted"].as_u64().unwrap();
    network.cut(&c);
    let cut = Instant::now();
    eventually(OUTAGE, "a count answers 503 with the reason", || {
        let reply = count_reply(&client, &url, &tenants[0]);
        if reply.status() == StatusCode::OK {
            return false;
        }
        let message = error_message(reply, StatusCode::SERVICE_UNAVAILABLE);
        assert!(message.contains("redis"), "{message}");
        println!("a count with Redis cut off, {:?} after the cut: 503 {message:?}", cut.elapsed());
        true
    });
    thread::sleep(OUTAGE.saturating_sub(cut.elapsed()));
    let acked_during = stats(&client, &coordinator)["cluster"]["items_accepted"].as_u64().unwrap() - acked_before;
    assert!(acked_during > 0, "nothing acknowledged while Redis was cut off");
    network.heal(&c);
    thread::sleep(Duration::from_secs(1));
    let tally = load.stop();
    assert!(tally.errors.is_empty(), "clients saw {} errors, first: {:?}", tally.errors.len(), tally.errors.first());

    // Every acknowledged batch is counted, and nothing else but batches whose reply was lost.
    let converging = Instant::now();
    let accounting = tally.check_counted(&client, &url, Duration::from_secs(40));
    println!(
        "{accounting} ({acked_during} items acknowledged while Redis was cut off); exact {:?} after the load, {:?} in all",
        converging.elapsed(),
        started.elapsed()
    );
    assert!(b_workers.iter_mut().all(Node::is_running), "a worker of B died");
    assert!(coordinator.is_running());
}
