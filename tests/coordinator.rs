//! The coordinator as its users run it: a real `coordinator` process that spawns real `worker`
//! processes from a `config.yaml` in a temporary directory, killed, edited and restarted under
//! load, with every acknowledged item counted at the end.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use countapp_testcluster::fake::{self, FakeWorker};
use countapp_testcluster::{
    Cluster, Immutable, Load, PUSHED_BACK, Signal, Stopped, batch, client, count, count_reply, error_message,
    eventually, free_port, get_json, is_running, metric, post, raw_get, sigkill,
};
use reqwest::StatusCode;
use serde_json::Value;

/// How long counts get to converge: a flush every 0.2 s, plus respawns.
const SETTLE: Duration = Duration::from_secs(20);
/// How long a removed worker's process gets to exit, and an added one to serve.
const CONFIG_EDIT: Duration = Duration::from_secs(2);

/// A cluster of `workers` local workers behind a coordinator on a free port, flushing every
/// 0.2 s and checking health every 0.5 s.
fn cluster(workers: usize) -> (Cluster, Vec<u16>, u16) {
    let ports: Vec<u16> = (0..workers).map(|_| free_port()).collect();
    let listen = free_port();
    let cluster = Cluster::new(&ports, &extra(listen));
    (cluster, ports, listen)
}

fn extra(listen: u16) -> String {
    format!("listen: 127.0.0.1:{listen}\nworker_persist: 0.2\nconfig_check: 0.5\n")
}

fn wait_gone(pid: u32, within: Duration) -> Duration {
    eventually(within, &format!("pid {pid} exits"), || !is_running(pid))
}

#[test]
fn sigkill_a_worker_every_2s_under_load_loses_nothing_and_no_client_sees_an_error() {
    let (cluster, ports, listen) = cluster(3);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(3);
    let load = Load::start(&coordinator.url(), 4, "kills", false);
    for round in 0..5 {
        thread::sleep(Duration::from_secs(2));
        let port = ports[round % ports.len()];
        sigkill(coordinator.pid_of(port));
    }
    let tally = load.stop();
    assert!(tally.errors.is_empty(), "clients saw {} errors, first: {:?}", tally.errors.len(), tally.errors.first());
    assert!(tally.acked_batches() > 0);
    tally.check_counted(&client(), &coordinator.url(), SETTLE);
    let restarts: u64 = coordinator.workers().iter().map(|w| w["restarts"].as_u64().unwrap()).sum();
    assert_eq!(restarts, 5);
}

#[test]
fn sigkill_every_worker_after_a_burst_then_all_is_counted_once_they_are_back() {
    let (cluster, ports, listen) = cluster(3);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(3);
    let client = client();
    let mut expected = 0;
    for b in 0..50 {
        let ids: Vec<String> = (0..20).map(|i| format!("b{b}-{i}")).collect();
        let items: Vec<(&str, &str)> = ids.iter().map(|id| ("burst", id.as_str())).collect();
        assert_eq!(post(&client, &coordinator.url(), batch(&items)).status(), StatusCode::OK);
        expected += 20;
    }
    let pids: Vec<u32> = ports.iter().map(|&port| coordinator.pid_of(port)).collect();
    for &pid in &pids {
        sigkill(pid);
    }
    eventually(SETTLE, "every worker respawned", || {
        let now = coordinator.workers();
        now.iter().all(|w| w["state"] == "ready" && w["restarts"].as_u64() >= Some(1))
    });
    for (port, old) in ports.iter().zip(&pids) {
        assert_ne!(coordinator.pid_of(*port), *old);
    }
    eventually(SETTLE, "the burst is counted", || count(&client, &coordinator.url(), "burst") == expected);
}

#[test]
fn config_edits_remove_add_and_invalid_take_effect_while_serving() {
    let (cluster, ports, listen) = cluster(3);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(3);
    let client = client();
    let url = coordinator.url();
    let ids: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    let items: Vec<(&str, &str)> = ids.iter().map(|id| ("edits", id.as_str())).collect();
    for chunk in items.chunks(10) {
        assert_eq!(post(&client, &url, batch(chunk)).status(), StatusCode::OK);
    }

    // Remove the third worker by writing a new file and renaming it over the old one, as
    // editors do: the watch on the directory must still see it.
    let third = coordinator.pid_of(ports[2]);
    let tmp = cluster.path().join("config.yaml.new");
    fs::write(&tmp, config_text(&ports[..2], listen)).unwrap();
    fs::rename(&tmp, cluster.config_path()).unwrap();
    let took = wait_gone(third, CONFIG_EDIT);
    println!("removed by rename: the worker exited {took:?} after the edit was seen");

    // Remove the second by editing the file in place.
    let second = coordinator.pid_of(ports[1]);
    fs::write(cluster.config_path(), config_text(&ports[..1], listen)).unwrap();
    wait_gone(second, CONFIG_EDIT);
    coordinator.wait_live(1);
    eventually(SETTLE, "the removed workers' items stay counted", || count(&client, &url, "edits") == 100);

    // Add a worker: it serves, and answers the counts the others stored.
    let added = free_port();
    fs::write(cluster.config_path(), config_text(&[ports[0], added], listen)).unwrap();
    let started = Instant::now();
    eventually(CONFIG_EDIT, "the added worker is live", || {
        coordinator
            .workers()
            .iter()
            .any(|w| w["url"].as_str().unwrap().ends_with(&format!(":{added}")) && w["state"] == "ready")
    });
    println!("added: live {:?} after the edit", started.elapsed());
    assert_eq!(count(&client, &format!("http://127.0.0.1:{added}"), "edits"), 100);

    // An invalid edit: logged, shown in /stats, and everything keeps serving on the last good config.
    fs::write(cluster.config_path(), "workers: [\n").unwrap();
    eventually(CONFIG_EDIT, "/stats shows the invalid config", || {
        get_json(&client, &format!("{url}/stats"))["config"]["valid"] == false
    });
    assert_eq!(post(&client, &url, batch(&[("edits", "one more")])).status(), StatusCode::OK);
    eventually(SETTLE, "ingest goes on", || count(&client, &url, "edits") == 101);
    assert_eq!(coordinator.workers().len(), 2);
    assert!(coordinator.is_running());
}

/// A config of local workers on `ports`, as the harness writes it.
fn config_text(ports: &[u16], listen: u16) -> String {
    let mut yaml = String::from("workers:\n");
    for port in ports {
        yaml.push_str(&format!("  - http://127.0.0.1:{port}\n"));
    }
    yaml.push_str("database: db/\nworker_logs: logs/\n");
    yaml.push_str(&extra(listen));
    yaml
}

#[test]
fn sigterm_stops_every_worker_and_exits_0() {
    let (cluster, _, listen) = cluster(3);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(3);
    let client = client();
    assert_eq!(post(&client, &coordinator.url(), batch(&[("term", "1"), ("term", "2")])).status(), StatusCode::OK);
    assert_eq!(cluster.processes().len(), 4);
    coordinator.signal(Signal::SIGTERM);
    let status = coordinator.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "the coordinator exited with {status}");
    assert!(cluster.processes().is_empty(), "processes left behind: {:?}", cluster.processes());
    // Every worker flushed before it exited: the logs are empty.
    assert!(cluster.wal_files().iter().all(|(_, len)| *len == 0), "{:?}", cluster.wal_files());
}

#[test]
fn a_new_coordinator_adopts_the_workers_of_one_killed_with_sigkill() {
    let (cluster, ports, listen) = cluster(2);
    let mut first = cluster.coordinator(listen);
    first.wait_live(2);
    let pids: Vec<u32> = ports.iter().map(|&port| first.pid_of(port)).collect();
    // The token the workers hold stays for the next coordinator, readable by this user alone.
    let token_file = cluster.path().join("logs/coordinator.token");
    assert_eq!(fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    first.kill();
    assert!(pids.iter().all(|&pid| is_running(pid)), "workers must outlive a coordinator killed with SIGKILL");

    let mut second = cluster.coordinator(listen);
    second.wait_live(2);
    for (port, pid) in ports.iter().zip(&pids) {
        assert_eq!(second.pid_of(*port), *pid, "the worker on {port} was not adopted");
    }
    assert!(second.workers().iter().all(|w| w["adopted"] == true));
    assert_eq!(cluster.processes().len(), 3, "no worker may be duplicated");
    let client = client();
    assert_eq!(post(&client, &second.url(), batch(&[("adopted", "1")])).status(), StatusCode::OK);
    eventually(SETTLE, "served by adopted workers", || count(&client, &second.url(), "adopted") == 1);

    second.signal(Signal::SIGTERM);
    assert!(second.wait_exit(Duration::from_secs(20)).success());
    for pid in pids {
        wait_gone(pid, Duration::from_secs(5));
    }
    assert!(!token_file.exists(), "no worker holds the token any more");
}

#[test]
fn a_worker_on_another_host_is_routed_to_but_never_spawned_or_stopped() {
    // 127.0.0.2 stands in for another machine: it is not one of the local hosts.
    let (remote_port, local_port, listen) = (free_port(), free_port(), free_port());
    let cluster = Cluster::new(&[], "");
    let remote_url = format!("http://127.0.0.2:{remote_port}");
    let write = |workers: &[String]| {
        let mut yaml = String::from("workers:\n");
        for url in workers {
            yaml.push_str(&format!("  - {url}\n"));
        }
        yaml.push_str("database: db/\nworker_logs: logs/\n");
        yaml.push_str(&extra(listen));
        fs::write(cluster.config_path(), yaml).unwrap();
    };
    write(std::slice::from_ref(&remote_url));
    let mut remote = cluster.worker_at("127.0.0.2", remote_port);
    remote.wait_ready();
    write(&[remote_url.clone(), format!("http://127.0.0.1:{local_port}")]);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(2);

    let entry = coordinator.workers().into_iter().find(|w| w["url"] == remote_url.as_str()).unwrap();
    assert_eq!(entry["local"], false);
    assert_eq!(entry["pid"], Value::Null, "a remote worker is never spawned");
    let client = client();
    for i in 0..40 {
        let id = i.to_string();
        assert_eq!(post(&client, &coordinator.url(), batch(&[("remote", &id)])).status(), StatusCode::OK);
    }
    let routed = coordinator.workers().into_iter().find(|w| w["url"] == remote_url.as_str()).unwrap();
    assert!(routed["requests"].as_u64().unwrap() > 0, "no request was routed to the remote worker");

    // Removed from the config, it keeps running: its owner stops it, not the coordinator.
    write(&[format!("http://127.0.0.1:{local_port}")]);
    coordinator.wait_live(1);
    thread::sleep(Duration::from_millis(500));
    assert!(remote.is_running());
    coordinator.signal(Signal::SIGTERM);
    assert!(coordinator.wait_exit(Duration::from_secs(20)).success());
    assert!(remote.is_running(), "the coordinator stopped a worker it does not own");
}

#[test]
fn oversize_bodies_stop_at_the_coordinator_bad_batches_pass_through_and_no_worker_means_503() {
    let (port, listen) = (free_port(), free_port());
    let cluster = Cluster::new(&[port], &format!("{}max_body_bytes: 1000\nmax_key_bytes: 8\n", extra(listen)));
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(1);
    let client = client();
    let url = coordinator.url();
    let message = error_message(post(&client, &url, "x".repeat(1001)), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(message.contains("max_body_bytes"), "{message}");
    let message =
        error_message(post(&client, &url, batch(&[("t", "1"), ("t", "too long an id")])), StatusCode::BAD_REQUEST);
    assert!(message.starts_with("item 1"), "{message}");
    let message =
        error_message(client.get(format!("{url}/items/t/count/extra")).send().unwrap(), StatusCode::NOT_FOUND);
    assert!(!message.is_empty());

    // The only worker runs on a host the coordinator does not own and nobody started.
    let ghost = free_port();
    let yaml = format!("workers:\n  - http://127.0.0.2:{ghost}\ndatabase: db/\nworker_logs: logs/\n{}", extra(listen));
    fs::write(cluster.config_path(), yaml).unwrap();
    coordinator.wait_live(0);
    let started = Instant::now();
    let message = error_message(post(&client, &url, batch(&[("t", "1")])), StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("no live worker"), "{message}");
    assert!(started.elapsed() >= Duration::from_secs(1), "a request waits briefly for a worker before a 503");
    let text = client.get(format!("{url}/metrics")).send().unwrap().text().unwrap();
    let unavailable = |cause| metric(&text, "countapp_coordinator_unavailable_total", &[("cause", cause)]);
    assert_eq!(unavailable("no_live_worker"), Some(1.0), "{text}");
    assert_eq!(unavailable("push_back"), Some(0.0), "{text}");
    assert!(coordinator.log().contains("request not served by a worker"), "each 503 is logged");
}

#[test]
fn concurrent_requests_share_connections_to_the_workers_and_each_gets_its_own_reply() {
    let (cluster, _, listen) = cluster(2);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(2);
    let url = coordinator.url();
    let client = client();
    // Tenant i holds i ids, so that a reply meant for another request shows in its number.
    const TENANTS: usize = 24;
    let tenants: Vec<(String, Vec<String>)> =
        (1..=TENANTS).map(|i| (format!("tenant-{i}"), (0..i).map(|id| id.to_string()).collect())).collect();
    let batch_of =
        |tenant: &str, ids: &[String]| batch(&ids.iter().map(|id| (tenant, id.as_str())).collect::<Vec<_>>());
    for (tenant, ids) in &tenants {
        assert_eq!(post(&client, &url, batch_of(tenant, ids)).status(), StatusCode::OK);
    }
    for (tenant, ids) in &tenants {
        eventually(SETTLE, &format!("{tenant} counts {}", ids.len()), || {
            count(&client, &url, tenant) == ids.len() as u64
        });
    }
    let metrics =
        |name| metric(&client.get(format!("{url}/metrics")).send().unwrap().text().unwrap(), name, &[]).unwrap();
    let writes_before = metrics("countapp_coordinator_worker_writes_total");
    let forwarded = || get_json(&client, &format!("{url}/stats"))["cluster"]["requests_forwarded"].as_u64().unwrap();
    let forwarded_before = forwarded();

    // 16 clients at once, each reading counts and posting again ids the tenants hold (which
    // changes no count), so that counts and acknowledgements share the connections.
    thread::scope(|scope| {
        for client_no in 0..16 {
            let (client, url, tenants, batch_of) = (client.clone(), &url, &tenants, &batch_of);
            scope.spawn(move || {
                for round in 0..150 {
                    let (tenant, ids) = &tenants[(client_no * 7 + round) % TENANTS];
                    if round % 3 == 0 {
                        // Pushed back while a busy machine's merging is behind: sent again, as a
                        // client does on a 503 with Retry-After.
                        let mut tries = 0;
                        let reply: Value = loop {
                            let reply = post(&client, url, batch_of(tenant, ids));
                            let pushed_back = reply.headers().contains_key("retry-after");
                            tries += 1;
                            if !pushed_back || tries == 50 {
                                break reply.json().unwrap();
                            }
                            thread::sleep(Duration::from_millis(100));
                        };
                        assert_eq!(reply["accepted"], ids.len(), "POST of {} ids to {tenant}: {reply}", ids.len());
                    } else {
                        assert_eq!(count(&client, url, tenant), ids.len() as u64, "count of {tenant}");
                    }
                }
            });
        }
    });
    let writes = metrics("countapp_coordinator_worker_writes_total") - writes_before;
    let forwarded = forwarded() - forwarded_before;
    println!("{forwarded} requests forwarded in {writes} writes");
    assert!(forwarded >= 16 * 150, "{forwarded} forwarded");
    assert!(writes < forwarded as f64, "{forwarded} requests forwarded in {writes} writes: none shared a write");
}

#[test]
fn tenants_named_like_dot_segments_or_holding_a_slash_are_counted_through_the_coordinator() {
    let (cluster, ports, listen) = cluster(2);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(2);
    let client = client();
    // Each tenant gets its own number of ids, and is named by every raw path listed.
    let tenants: [(&str, u64, &[&str]); 5] = [
        (".", 1, &["/items/./count", "/items/%2E/count", "/items/%2e/count"]),
        ("..", 2, &["/items/../count", "/items/%2E%2E/count", "/items/.%2e/count"]),
        ("a/b", 3, &["/items/a%2Fb/count", "/items/a%2fb/count"]),
        ("a b", 4, &["/items/a%20b/count"]),
        ("%2E%2E", 5, &["/items/%252E%252E/count"]),
    ];
    for (tenant, n, _) in tenants {
        let ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let items: Vec<(&str, &str)> = ids.iter().map(|id| (tenant, id.as_str())).collect();
        assert_eq!(post(&client, &coordinator.url(), batch(&items)).status(), StatusCode::OK, "{tenant:?}");
    }
    let worker = format!("http://127.0.0.1:{}", ports[0]);
    for (tenant, n, paths) in tenants {
        for path in paths {
            let through = || raw_get(&coordinator.url(), path);
            eventually(SETTLE, &format!("GET {path} counts {tenant:?}"), || {
                let (status, body) = through();
                status == 200 && serde_json::from_str::<Value>(&body).unwrap()["count"] == n
            });
            assert_eq!(
                through(),
                raw_get(&worker, path),
                "GET {path}: through the coordinator and straight to a worker"
            );
        }
    }
}

#[test]
fn a_hung_worker_costs_a_request_a_hop_timeout_then_another_worker_answers() {
    let (cluster, ports, listen) = cluster(3);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(3);
    let url = coordinator.url();
    let hung = Stopped::new(coordinator.pid_of(ports[0]));
    // Several clients at once, so that some requests reach the hung worker before anything
    // takes it out of routing.
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let url = url.clone();
            thread::spawn(move || {
                let client = client();
                let (mut failures, mut slowest) = (Vec::new(), Duration::ZERO);
                let started = Instant::now();
                for i in 0.. {
                    if started.elapsed() > Duration::from_secs(3) {
                        break;
                    }
                    let sent = Instant::now();
                    let reply = if i % 2 == 0 {
                        post(&client, &url, batch(&[("hung", &format!("{c}-{i}"))]))
                    } else {
                        count_reply(&client, &url, "hung")
                    };
                    slowest = slowest.max(sent.elapsed());
                    if reply.status() != StatusCode::OK {
                        failures.push(format!("{}: {}", reply.status(), reply.text().unwrap_or_default()));
                    }
                }
                (failures, slowest)
            })
        })
        .collect();
    for client in clients {
        let (failures, slowest) = client.join().unwrap();
        assert!(failures.is_empty(), "requests failed while a worker hung: {failures:?}");
        println!("the slowest request while a worker hung took {slowest:?}");
        // A functional bound: the hop's timeout, not the client's, decides.
        assert!(slowest < Duration::from_secs(2), "a request took {slowest:?} while a worker hung");
    }
    let metrics = client().get(format!("{url}/metrics")).send().unwrap().text().unwrap();
    let retries = metric(&metrics, "countapp_coordinator_retries_total", &[]).unwrap();
    assert!(retries >= 1.0, "no request reached the hung worker and went elsewhere:\n{metrics}");
    drop(hung);
}

#[test]
fn when_every_worker_answers_5xx_a_request_tries_each_live_worker_once() {
    let (cluster, ports, listen) = cluster(3);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(3);
    let client = client();
    // Merges that cannot write make every worker fall behind, and refuse ingest with a 503. A
    // worker merges the shards it owns, so the items go to tenants all over the shards.
    let shards = cluster.database().join("shards");
    fs::create_dir_all(&shards).unwrap();
    let _frozen = Immutable::new(&shards);
    let tenants: Vec<String> = (0..256).map(|t| format!("behind-{t}")).collect();
    let items: Vec<(&str, &str)> = tenants.iter().map(|tenant| (tenant.as_str(), "1")).collect();
    let workers: Vec<String> = ports.iter().map(|port| format!("http://127.0.0.1:{port}")).collect();
    for worker in &workers {
        eventually(SETTLE, &format!("{worker} refuses ingest"), || {
            post(&client, worker, batch(&items)).status() == StatusCode::SERVICE_UNAVAILABLE
        });
    }
    // The `POST /items` each worker has answered, by its own count.
    let posts_seen = |worker: &String| {
        let text = client.get(format!("{worker}/metrics")).send().unwrap().text().unwrap();
        let served =
            |status| metric(&text, "countapp_worker_requests_total", &[("route", "/items"), ("status", status)]);
        served("200").unwrap_or(0.0) + served("503").unwrap_or(0.0)
    };
    let before: Vec<f64> = workers.iter().map(posts_seen).collect();

    let reply = post(&client, &coordinator.url(), batch(&[("behind", "through the coordinator")]));
    assert_eq!(reply.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"), "the workers' Retry-After");
    let message = error_message(reply, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("behind"), "the workers' own explanation: {message}");
    let attempts: Vec<f64> = workers.iter().zip(&before).map(|(worker, before)| posts_seen(worker) - before).collect();
    assert_eq!(attempts, vec![1.0; workers.len()], "attempts on each worker");
    // Counted as the workers' push-back, not as no worker being live.
    let text = client.get(format!("{}/metrics", coordinator.url())).send().unwrap().text().unwrap();
    let unavailable = |cause| metric(&text, "countapp_coordinator_unavailable_total", &[("cause", cause)]);
    assert_eq!((unavailable("push_back"), unavailable("no_live_worker")), (Some(1.0), Some(0.0)), "{text}");
}

/// The fewest live workers the coordinator at `url` reported, polled until `stop` is set.
fn fewest_live(url: &str, stop: &AtomicBool) -> u64 {
    let client = client();
    let mut fewest = u64::MAX;
    while !stop.load(Ordering::Relaxed) {
        fewest = fewest.min(get_json(&client, &format!("{url}/health"))["live_workers"].as_u64().unwrap());
        thread::sleep(Duration::from_millis(20));
    }
    fewest
}

#[test]
fn a_worker_killed_under_a_load_of_new_tenants_costs_clients_nothing_but_push_back() {
    let (cluster, ports, listen) = cluster(4);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(4);
    let url = coordinator.url();
    // Busy, not hung: a tenant per batch keeps the merges working hard.
    let load = Load::start_tenant_per_batch(&url, 8, "busy");
    let stop = AtomicBool::new(false);
    let fewest_live = thread::scope(|scope| {
        // How many workers take requests, all along: the killed one is out until respawned, and
        // no other may be taken out for being busy.
        let fewest_live = scope.spawn(|| fewest_live(&url, &stop));
        thread::sleep(Duration::from_secs(4));
        sigkill(coordinator.pid_of(ports[0]));
        thread::sleep(Duration::from_secs(4));
        stop.store(true, Ordering::Relaxed);
        fewest_live.join().unwrap()
    });
    let tally = load.stop();
    // Push-back (503 with Retry-After) is retried, as any client should, and may outlast the
    // client's patience while the merges catch up; anything else that failed is here.
    let errors: Vec<&String> = tally.errors.iter().filter(|e| !e.starts_with(PUSHED_BACK)).collect();
    assert!(errors.is_empty(), "clients saw {} errors: {:?}", errors.len(), &errors[..errors.len().min(5)]);
    println!("at least {fewest_live} of 4 workers were live all along");
    assert!(fewest_live >= 3, "only {fewest_live} workers were live at one point: busy ones were taken out");
    assert!(tally.acked_batches() > 0);
    println!("{}", tally.check_counted(&client(), &url, SETTLE));
}

#[test]
fn workers_too_busy_to_answer_for_a_moment_stay_in_routing() {
    let (cluster, ports, listen) = cluster(3);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(3);
    let url = coordinator.url();
    let pids: Vec<u32> = ports.iter().map(|&port| coordinator.pid_of(port)).collect();
    let load = Load::start(&url, 4, "moment", false);
    let stop = AtomicBool::new(false);
    let fewest_live = thread::scope(|scope| {
        let fewest = scope.spawn(|| fewest_live(&url, &stop));
        thread::sleep(Duration::from_secs(1));
        // Every worker answers nothing for longer than a hop's timeout, and less than its health
        // check's: as busy as a worker gets, and alive.
        let paused: Vec<Stopped> = pids.iter().map(|&pid| Stopped::new(pid)).collect();
        thread::sleep(Duration::from_millis(900));
        drop(paused);
        thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        fewest.join().unwrap()
    });
    let tally = load.stop();
    assert!(tally.errors.is_empty(), "clients saw {} errors, first: {:?}", tally.errors.len(), tally.errors.first());
    println!("at least {fewest_live} of 3 workers were live all along");
    assert_eq!(fewest_live, 3, "workers late for a moment were taken out of routing");
    assert!(coordinator.workers().iter().all(|w| w["restarts"] == 0), "no worker was replaced");
    tally.check_counted(&client(), &url, SETTLE);
}

/// What a hostile or broken program on a worker's address answers `POST /items` with, in turn:
/// a terabyte announced, a chunked body that never ends, a head that never ends, and bytes that
/// are no HTTP at all.
fn junk_reply(n: usize, stream: &mut std::net::TcpStream) -> std::io::Result<()> {
    use std::io::Write;
    match n % 4 {
        0 => stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n{\"accepted\":"),
        1 => {
            stream.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")?;
            let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, " ".repeat(64 << 10));
            loop {
                stream.write_all(chunk.as_bytes())?;
            }
        }
        2 => {
            stream.write_all(b"HTTP/1.1 200 OK\r\n")?;
            loop {
                stream.write_all(b"x-filler: yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\r\n")?;
            }
        }
        _ => stream.write_all(b"SURELY NOT HTTP\r\n\r\n"),
    }
}

#[test]
fn a_worker_answering_junk_is_taken_out_of_routing_and_clients_keep_getting_200s() {
    // 127.0.0.2 stands in for another machine: a listed worker that the coordinator only routes
    // to, and that answers its health checks well and every batch with junk.
    let posts = Arc::new(AtomicUsize::new(0));
    let fake = {
        let posts = posts.clone();
        FakeWorker::start("127.0.0.2:0", move |request, stream| {
            match (request.method.as_str(), request.target.as_str()) {
                ("GET", "/ready") => fake::reply(stream, "200 OK", r#"{"ready":true}"#),
                ("POST", "/items") => junk_reply(posts.fetch_add(1, Ordering::Relaxed), stream),
                _ => fake::reply(stream, "404 Not Found", r#"{"error":"no such route"}"#),
            }
        })
    };
    let (port, listen) = (free_port(), free_port());
    let cluster = Cluster::with_urls(&[format!("http://127.0.0.1:{port}"), fake.url()], &extra(listen));
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(2);
    let url = coordinator.url();

    // Clients post until every kind of junk has come back at least twice (the fake is back in
    // routing each time its health check passes, within half a second).
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (url, posts) = (url.clone(), posts.clone());
            thread::spawn(move || {
                let client = client();
                let started = Instant::now();
                let mut sent = Vec::new();
                while posts.load(Ordering::Relaxed) < 8 && started.elapsed() < SETTLE {
                    let id = format!("{c}-{}", sent.len());
                    let reply = post(&client, &url, batch(&[("junk", &id)]));
                    assert_eq!(reply.status(), StatusCode::OK, "{}", reply.text().unwrap_or_default());
                    sent.push(id);
                }
                sent.len() as u64
            })
        })
        .collect();
    let sent: u64 = clients.into_iter().map(|c| c.join().unwrap()).sum();
    assert!(posts.load(Ordering::Relaxed) >= 8, "the fake was tried {} times", posts.load(Ordering::Relaxed));
    assert!(coordinator.is_running(), "the coordinator died:\n{}", coordinator.log());
    let entry = coordinator.workers().into_iter().find(|w| w["url"] == fake.url().as_str()).unwrap();
    assert!(entry["last_error"].as_str().unwrap_or_default().contains("bad reply"), "{entry}");
    // Asked of the real worker: the fake answers no count (a 404 the coordinator passes on), and
    // the real one acknowledged every batch.
    let worker = format!("http://127.0.0.1:{port}");
    eventually(SETTLE, "every batch counted", || count(&client(), &worker, "junk") == sent);
}
