//! System tests of a set's API beyond ingest and one eventual count, with real processes: strong
//! counts (read-your-writes across workers), batches posted with `wait=counted`, membership,
//! many counts in one request, and deleting a tenant, through the coordinator and at each
//! worker, with the JSON files and with Redis; and the 400s of their bad input.
//!
//! The workers close their logs once an hour here, so that an eventual read would not see the
//! batches these tests post: only a barrier makes them visible within the test.

use std::collections::BTreeSet;
use std::thread;
use std::time::Duration;

use countapp_testcluster::redis::RedisServer;
use countapp_testcluster::{
    Load, batch, client, count, error_message, eventually, metric, percent_encoded, post, running, sigkill,
    tenant_files, worker_url,
};
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};

/// Logs closed once an hour: only a barrier makes a batch visible within a test.
const SLOW_CLOSE: &str = "worker_persist: 3600\n";

/// `GET {url}/items/{tenant}/count?consistency=strong`.
fn strong_count(client: &Client, url: &str, tenant: &str) -> u64 {
    let reply = client.get(format!("{url}/items/{tenant}/count?consistency=strong")).send().unwrap();
    let status = reply.status();
    let body: Value = reply.json().unwrap();
    assert_eq!(status, StatusCode::OK, "strong count of {tenant} at {url}: {body}");
    body["count"].as_u64().unwrap()
}

/// `POST {url}{path}` with the JSON `body`: the status and the reply's JSON.
fn post_json(client: &Client, url: &str, path: &str, body: &Value) -> (StatusCode, Value) {
    let reply = client.post(format!("{url}{path}")).json(body).send().unwrap();
    (reply.status(), reply.json().unwrap())
}

/// Posts `ids` of `tenant` to `url` in one batch, acknowledged.
fn post_ids(client: &Client, url: &str, tenant: &str, ids: &[String]) {
    let items: Vec<(&str, &str)> = ids.iter().map(|id| (tenant, id.as_str())).collect();
    assert_eq!(post(client, url, batch(&items)).status(), StatusCode::OK);
}

fn ids(tenant: &str, range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("{tenant}-{i}")).collect()
}

#[test]
fn a_strong_read_sees_every_acknowledged_batch_at_once_on_every_worker() {
    let (_cluster, ports, _, coordinator) = running(3, SLOW_CLOSE);
    let (client, url) = (client(), coordinator.url());
    // Batches spread over the workers by the coordinator, and one straight to each worker.
    for (i, tenant) in ["alpha", "beta", "gamma"].iter().enumerate() {
        for chunk in ids(tenant, 0..(100 * (i as u32 + 1))).chunks(25) {
            post_ids(&client, &url, tenant, chunk);
        }
    }
    for &port in &ports {
        post_ids(&client, &worker_url(port), "alpha", &ids("alpha", 90..110));
    }
    let expected = [("alpha", 110), ("beta", 200), ("gamma", 300), ("never", 0)];
    for at in std::iter::once(url.clone()).chain(ports.iter().map(|&p| worker_url(p))) {
        for (tenant, n) in expected {
            assert_eq!(strong_count(&client, &at, tenant), n, "{tenant} at {at}");
        }
        let asked = json!(["alpha-0", "alpha-109", "alpha-110", "beta-0", "alpha-0"]);
        let (status, reply) = post_json(&client, &at, "/items/alpha/contains?consistency=strong", &asked);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply, json!({"contains": [true, true, false, false, true]}));
        let (status, reply) =
            post_json(&client, &at, "/counts?consistency=strong", &json!(["gamma", "never", "alpha", "beta"]));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply, json!({"counts": {"alpha": 110, "beta": 200, "gamma": 300, "never": 0}}));
    }
    // What a barrier made visible, eventual reads see too, on every worker.
    for &port in &ports {
        assert_eq!(count(&client, &worker_url(port), "gamma"), 300);
        let (status, reply) = post_json(&client, &worker_url(port), "/counts", &json!(["beta"]));
        assert_eq!((status, reply), (StatusCode::OK, json!({"counts": {"beta": 200}})));
    }
}

#[test]
fn a_batch_posted_with_wait_counted_is_counted_everywhere_once_acknowledged() {
    waited_batches_and_deletes_show_in_plain_counts_at_once(SLOW_CLOSE);
}

#[test]
fn with_redis_no_count_kept_from_before_a_waited_batch_or_a_delete_answers_after_it() {
    let redis = RedisServer::start();
    waited_batches_and_deletes_show_in_plain_counts_at_once(&format!(
        "{SLOW_CLOSE}store: redis\nredis_url: {}\n",
        redis.url()
    ));
}

/// Batches posted with `wait=counted`, each to another worker, then a delete: plain counts at
/// every worker, straight after each answer, count them. Each worker counts the tenant just
/// before too, so that a worker keeping counts it read (Redis) would answer one from before.
fn waited_batches_and_deletes_show_in_plain_counts_at_once(config: &str) {
    let (_cluster, ports, _, coordinator) = running(3, config);
    let client = client();
    let mut urls: Vec<String> = ports.iter().map(|&port| worker_url(port)).collect();
    urls.push(coordinator.url());
    let mut expected = BTreeSet::new();
    for round in 0..8u32 {
        for url in &urls {
            assert_eq!(count(&client, url, "waited"), expected.len() as u64, "round {round}, before, at {url}");
        }
        let batch_ids = ids("waited", round * 40..round * 40 + 50);
        expected.extend(batch_ids.iter().cloned());
        let items: Vec<(&str, &str)> = batch_ids.iter().map(|id| ("waited", id.as_str())).collect();
        let to = &urls[round as usize % urls.len()];
        let reply = client.post(format!("{to}/items?wait=counted")).body(batch(&items)).send().unwrap();
        let status = reply.status();
        assert_eq!((status, reply.json::<Value>().unwrap()), (StatusCode::OK, json!({"accepted": 50})));
        for url in &urls {
            assert_eq!(count(&client, url, "waited"), expected.len() as u64, "round {round}, after, at {url}");
        }
    }
    delete(&client, &urls[1], "waited");
    for url in &urls {
        assert_eq!(count(&client, url, "waited"), 0, "after the delete, at {url}");
    }
}

#[test]
fn strong_counts_are_exact_under_load_from_several_clients() {
    let (_cluster, _ports, _, coordinator) = running(3, "worker_persist: 0.5\n");
    let url = coordinator.url();
    // Other tenants' ingest meanwhile, so that barriers close logs holding others' items.
    let load = Load::start_paced(&url, 2, "background", Duration::from_millis(2), Duration::from_secs(10));
    let readers: Vec<_> = (0..4)
        .map(|reader| {
            let url = url.clone();
            thread::spawn(move || {
                let (client, tenant) = (client(), format!("reader-{reader}"));
                let mut acknowledged = BTreeSet::new();
                let mut wrong = Vec::new();
                for round in 0..25u32 {
                    // Overlapping ranges: some ids repeat across batches.
                    let batch_ids = ids(&tenant, round * 7..round * 7 + 10);
                    post_ids(&client, &url, &tenant, &batch_ids);
                    acknowledged.extend(batch_ids);
                    let counted = strong_count(&client, &url, &tenant);
                    if counted != acknowledged.len() as u64 {
                        wrong.push((round, counted, acknowledged.len()));
                    }
                }
                (tenant, wrong)
            })
        })
        .collect();
    let results: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let tally = load.stop();
    assert!(tally.batches.iter().any(|sent| sent.acked), "the background load acknowledged nothing");
    for (tenant, wrong) in results {
        assert!(wrong.is_empty(), "{tenant}: strong counts (round, counted, acknowledged) that missed: {wrong:?}");
    }
}

/// The counter `name` of the `/metrics` of the server at `url`.
fn counter(url: &str, name: &str) -> f64 {
    let metrics = client().get(format!("{url}/metrics")).send().unwrap().text().unwrap();
    metric(&metrics, name, &[]).unwrap_or_else(|| panic!("no {name} at {url}: {metrics}"))
}

/// Barriers that each worker of `ports` led so far, as its `/metrics` says.
fn barriers_led(ports: &[u16]) -> Vec<f64> {
    ports.iter().map(|&port| counter(&worker_url(port), "countapp_worker_barriers_total")).collect()
}

/// Requests that wait for a barrier go through the coordinator to one worker, the live one of
/// the lowest address, so that concurrent ones share its barriers rather than each worker
/// leading its own; while that worker is down, they go to another.
#[test]
fn requests_that_wait_for_a_barrier_share_the_barriers_of_one_worker() {
    let (_cluster, mut ports, _, coordinator) = running(3, SLOW_CLOSE);
    ports.sort_unstable();
    let url = coordinator.url();
    let retries = || counter(&url, "countapp_coordinator_retries_total");
    let (before, retried_before) = (barriers_led(&ports), retries());
    let readers: Vec<_> = (0..4)
        .map(|reader| {
            let url = url.clone();
            thread::spawn(move || {
                let (client, tenant) = (client(), format!("shared-{reader}"));
                for round in 0..10u32 {
                    post_ids(&client, &url, &tenant, &ids(&tenant, round * 5..round * 5 + 5));
                    assert_eq!(strong_count(&client, &url, &tenant), u64::from(round + 1) * 5, "{tenant}");
                }
            })
        })
        .collect();
    readers.into_iter().for_each(|reader| reader.join().unwrap());
    let led: Vec<f64> = barriers_led(&ports).iter().zip(&before).map(|(after, before)| after - before).collect();
    // A request retried elsewhere (its first worker late on a busy machine) leads a barrier there.
    let retried = retries() - retried_before;
    let elsewhere: f64 = led[1..].iter().sum();
    assert!(led[0] >= 1.0 && elsewhere <= retried, "barriers led by each worker: {led:?}, {retried} retries");

    // Its worker killed, a strong read is answered all the same, exactly.
    sigkill(coordinator.pid_of(ports[0]));
    let client = client();
    post_ids(&client, &url, "after-kill", &ids("after-kill", 0..3));
    assert_eq!(strong_count(&client, &url, "after-kill"), 3);
}

#[test]
fn strong_reads_and_waited_batches_work_with_redis_too() {
    let redis = RedisServer::start();
    let (_cluster, ports, _, coordinator) =
        running(2, &format!("{SLOW_CLOSE}store: redis\nredis_url: {}\n", redis.url()));
    let (client, url) = (client(), coordinator.url());
    for chunk in ids("r", 0..120).chunks(30) {
        post_ids(&client, &url, "r", chunk);
    }
    post_ids(&client, &worker_url(ports[1]), "r", &ids("r", 100..130));
    assert_eq!(strong_count(&client, &url, "r"), 130);
    assert_eq!(strong_count(&client, &worker_url(ports[0]), "r"), 130);
    let (status, reply) = post_json(&client, &url, "/items/r/contains?consistency=strong", &json!(["r-129", "r-130"]));
    assert_eq!((status, reply), (StatusCode::OK, json!({"contains": [true, false]})));
    let reply = client.post(format!("{url}/items?wait=counted")).body(batch(&[("s", "1"), ("s", "2")])).send().unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let (status, reply) = post_json(&client, &worker_url(ports[0]), "/counts", &json!(["s", "r", "nobody"]));
    assert_eq!((status, reply), (StatusCode::OK, json!({"counts": {"s": 2, "r": 130, "nobody": 0}})));
}

/// `DELETE {url}/items/{tenant}`, answered `{"deleted": true}`.
fn delete(client: &Client, url: &str, tenant: &str) {
    let reply = client.delete(format!("{url}/items/{tenant}")).send().unwrap();
    assert_eq!(reply.status(), StatusCode::OK, "delete of {tenant} at {url}");
    assert_eq!(reply.json::<Value>().unwrap(), json!({"deleted": true}));
}

#[test]
fn a_deleted_tenant_stays_gone_across_sigkill_of_every_worker_and_counts_afresh() {
    let (cluster, ports, _, coordinator) = running(
        3,
        "worker_persist: 0.5
",
    );
    let (client, url) = (client(), coordinator.url());
    // Ids of the tenant in every worker's log, some merged (past 1,024: in segments), some not.
    for chunk in ids("doomed", 0..2000).chunks(100) {
        post_ids(&client, &url, "doomed", chunk);
    }
    eventually(Duration::from_secs(10), "the first ids merged", || count(&client, &url, "doomed") > 0);
    for &port in &ports {
        post_ids(&client, &worker_url(port), "doomed", &ids("doomed", 1990..2010));
    }
    post_ids(&client, &url, "bystander", &ids("b", 0..30));
    delete(&client, &url, "doomed");
    let left = tenant_files(&cluster.database(), "doomed");
    assert!(left.is_empty(), "the deleted tenant's files stay: {left:?}");
    for &port in &ports {
        assert_eq!(strong_count(&client, &worker_url(port), "doomed"), 0);
    }
    let pids: Vec<u32> = ports.iter().map(|&port| coordinator.pid_of(port)).collect();
    for &pid in &pids {
        sigkill(pid);
    }
    eventually(Duration::from_secs(20), "every worker respawned", || {
        let now = coordinator.workers();
        now.iter().all(|w| w["state"] == "ready" && w["restarts"].as_u64() >= Some(1))
    });
    // Whatever the dead workers' logs held, merged again, brings no deleted id back.
    assert_eq!(strong_count(&client, &url, "doomed"), 0);
    assert_eq!(strong_count(&client, &url, "bystander"), 30);
    post_ids(&client, &url, "doomed", &ids("doomed", 5..12));
    assert_eq!(strong_count(&client, &url, "doomed"), 7);
    let (status, reply) = post_json(&client, &url, "/items/doomed/contains", &json!(["doomed-5", "doomed-0"]));
    assert_eq!((status, reply), (StatusCode::OK, json!({"contains": [true, false]})));
    // Listed as counted, on every worker: the shards' indexes of counts, kept by workers killed
    // mid-way and their successors, agree with the files.
    let everyone =
        json!({"tenants": [{"tenant": "bystander", "count": 30}, {"tenant": "doomed", "count": 7}], "next": null});
    for &port in &ports {
        let listed: Value = client.get(format!("{}/tenants", worker_url(port))).send().unwrap().json().unwrap();
        assert_eq!(listed, everyone, "listed by the worker on {port}");
    }
}

#[test]
fn a_deleted_tenant_is_gone_from_redis_and_counts_afresh() {
    let redis = RedisServer::start();
    let (_cluster, ports, _, coordinator) = running(
        2,
        &format!(
            "worker_persist: 0.5
store: redis
redis_url: {}
",
            redis.url()
        ),
    );
    let (client, url) = (client(), coordinator.url());
    for chunk in ids("doomed", 0..300).chunks(50) {
        post_ids(&client, &url, "doomed", chunk);
    }
    post_ids(&client, &url, "bystander", &ids("b", 0..3));
    assert_eq!(strong_count(&client, &url, "doomed"), 300);
    delete(&client, &worker_url(ports[0]), "doomed");
    assert!(redis.keys().iter().all(|key| !key.contains("doomed")), "keys left: {:?}", redis.keys());
    assert_eq!(strong_count(&client, &url, "doomed"), 0);
    assert_eq!(strong_count(&client, &url, "bystander"), 3);
    post_ids(&client, &url, "doomed", &ids("doomed", 0..4));
    assert_eq!(strong_count(&client, &worker_url(ports[1]), "doomed"), 4);
}

#[test]
fn tenants_list_in_byte_order_a_page_at_a_time_with_their_counts() {
    let (_cluster, ports, _, coordinator) = running(2, SLOW_CLOSE);
    let (client, url) = (client(), coordinator.url());
    let names = ["b", "a/b", "a", "é", "a b", "ab", "B", "gone"];
    for (i, name) in names.iter().enumerate() {
        let items: Vec<String> = (0..=i).map(|n| n.to_string()).collect();
        let items: Vec<(&str, &str)> = items.iter().map(|id| (*name, id.as_str())).collect();
        let reply = client.post(format!("{url}/items?wait=counted")).body(batch(&items)).send().unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
    }
    delete(&client, &url, "gone");
    let page = |query: &str| {
        let reply = client.get(format!("{url}/tenants{query}")).send().unwrap();
        assert_eq!(reply.status(), StatusCode::OK, "{query}");
        reply.json::<Value>().unwrap()
    };
    let entry = |name: &str| {
        let count = names.iter().position(|n| n == &name).unwrap() + 1;
        json!({"tenant": name, "count": count})
    };
    let mut sorted: Vec<&str> = names.iter().copied().filter(|n| *n != "gone").collect();
    sorted.sort();
    let everyone: Vec<Value> = sorted.iter().map(|name| entry(name)).collect();
    assert_eq!(page(""), json!({"tenants": everyone, "next": null}));
    // A page at a time, at the coordinator and at a worker alike.
    for at in [url.clone(), worker_url(ports[1])] {
        let (mut listed, mut after) = (Vec::new(), None::<String>);
        loop {
            let query = match &after {
                Some(after) => format!("/tenants?limit=3&after={}", percent_encoded(after)),
                None => "/tenants?limit=3".to_owned(),
            };
            let reply: Value = client.get(format!("{at}{query}")).send().unwrap().json().unwrap();
            listed.extend(reply["tenants"].as_array().unwrap().iter().cloned());
            match reply["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(listed, everyone, "paged at {at}");
    }
    let a: Vec<Value> = ["a", "a b", "a/b", "ab"].iter().map(|name| entry(name)).collect();
    assert_eq!(page("?prefix=a"), json!({"tenants": a, "next": null}));
    assert_eq!(page("?prefix=a&after=a%20b&limit=1"), json!({"tenants": [entry("a/b")], "next": "a/b"}));
    assert_eq!(page("?prefix=zz"), json!({"tenants": [], "next": null}));
}

#[test]
fn bad_reads_get_a_400_saying_why_and_change_nothing() {
    let (_cluster, ports, _, coordinator) = running(2, SLOW_CLOSE);
    let client = client();
    for url in [coordinator.url(), worker_url(ports[0])] {
        let refused = |reply: reqwest::blocking::Response| error_message(reply, StatusCode::BAD_REQUEST);
        let get = |path: &str| client.get(format!("{url}{path}")).send().unwrap();
        let post_raw =
            |path: &str, body: &str| client.post(format!("{url}{path}")).body(body.to_owned()).send().unwrap();
        assert!(refused(get("/items/t/count?consistency=linearizable")).contains("consistency"));
        assert!(refused(get("/items/t/count?consistancy=strong")).contains("consistancy"));
        assert!(refused(post_raw("/items/t/contains", r#"{"id": "x"}"#)).contains("JSON array of ids"));
        assert!(refused(post_raw("/items/t/contains", r#"["x", ""]"#)).contains("ids[1] is empty"));
        assert!(refused(post_raw("/counts", r#"["t", 7]"#)).contains("JSON array of tenants"));
        let long = "x".repeat(257);
        assert!(refused(post_raw("/counts", &format!(r#"["{long}"]"#))).contains("max_key_bytes"));
        let many = serde_json::to_string(&(0..10_001).map(|t| t.to_string()).collect::<Vec<_>>()).unwrap();
        assert!(refused(post_raw("/counts", &many)).contains("at most 10000"));
        // A batch with a bad `wait` is refused whole, before anything is stored.
        assert!(refused(post_raw("/items?wait=forever", &batch(&[("bad-wait", "1")]))).contains("wait"));
        assert_eq!(strong_count(&client, &url, "bad-wait"), 0);
        assert!(refused(get("/tenants?limit=0")).contains("limit must be 1 to 10000"));
        assert!(refused(get("/tenants?limit=10001")).contains("limit must be 1 to 10000"));
        assert!(refused(get("/tenants?start=a")).contains("prefix, after and limit"));
        let wrong_method = client.get(format!("{url}/items/t/contains")).send().unwrap();
        error_message(wrong_method, StatusCode::METHOD_NOT_ALLOWED);
    }
    // The barrier's steps are the workers' own: the coordinator does not forward them.
    let reply = client.post(format!("{}/barrier/close", coordinator.url())).send().unwrap();
    error_message(reply, StatusCode::NOT_FOUND);
}
