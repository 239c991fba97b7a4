//! Operating a cluster live, as an operator does: editing `config.yaml` under a running
//! coordinator (every key reaches every worker; fixed keys and invalid files are refused whole),
//! removing and re-adding a worker while it is slow to stop, a port taken by another program,
//! and a coordinator restarted after a crash. Real processes, real files.

use std::fs;
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use countapp_testcluster::{
    Cluster, Signal, batch, client, count, eventually, extra, free_port, is_running, lone_worker, metric, post,
    running, send_signal, sigkill, stats, worker_url,
};
use reqwest::StatusCode;
use serde_json::Value;

/// How long an edit gets to reach every process: "within about a second", with room for a
/// loaded machine.
const EDIT_APPLIED: Duration = Duration::from_secs(5);
/// How long a respawned or re-added worker gets to serve.
const RESPAWN: Duration = Duration::from_secs(15);

/// The coordinator's `/stats` entry of the worker on `port`, if it lists one.
fn entry(coordinator: &str, port: u16) -> Option<Value> {
    let workers = stats(coordinator)["workers"].as_array().unwrap().clone();
    workers.into_iter().find(|w| w["url"].as_str().unwrap().ends_with(&format!(":{port}")))
}

/// The version of the config the worker on `port` says it runs.
fn runs(port: u16) -> String {
    stats(&worker_url(port))["config_version"].as_str().unwrap().to_owned()
}

/// A batch of one item in a tenant of `tenant_len` bytes.
fn long_tenant(tenant_len: usize) -> String {
    batch(&[(&"t".repeat(tenant_len), "id")])
}

#[test]
fn every_key_edit_reaches_every_running_worker_without_a_restart() {
    let (cluster, ports, listen, coordinator) = running(2, "worker_persist: 30\n");
    let url = coordinator.url();
    let client = client();
    let pids: Vec<u32> = ports.iter().map(|&p| coordinator.pid_of(p)).collect();
    let before = stats(&url)["config"]["version"].as_str().unwrap().to_owned();
    assert!(ports.iter().all(|&p| runs(p) == before), "the workers start on the coordinator's config");

    // Posted under `worker_persist: 30`: not counted for up to 30 s, unless the edit applies.
    assert_eq!(post(&client, &url, batch(&[("live", "1"), ("live", "2")])).status(), StatusCode::OK);
    cluster.write_config(&ports, &extra(listen, "worker_persist: 0.2\nmax_key_bytes: 8\nfsync: always\n"));
    let edited = Instant::now();
    eventually(EDIT_APPLIED, "the coordinator takes the edit", || stats(&url)["config"]["version"] != before);
    let version = stats(&url)["config"]["version"].as_str().unwrap().to_owned();
    eventually(EDIT_APPLIED, "every worker runs the edited config", || ports.iter().all(|&p| runs(p) == version));
    println!("every worker ran the edit {:?} after it was saved", edited.elapsed());
    for entry in stats(&url)["workers"].as_array().unwrap() {
        assert_eq!(entry["config_version"], version.as_str(), "{entry}");
    }

    // The new limit holds on each worker, straight and through the coordinator.
    for &port in &ports {
        assert_eq!(post(&client, &worker_url(port), long_tenant(9)).status(), StatusCode::BAD_REQUEST);
        assert_eq!(post(&client, &worker_url(port), long_tenant(8)).status(), StatusCode::OK);
    }
    assert_eq!(post(&client, &url, long_tenant(9)).status(), StatusCode::BAD_REQUEST);
    // The new flush interval holds: the items wait no 30 s.
    let took =
        eventually(EDIT_APPLIED, "items posted before the edit are counted", || count(&client, &url, "live") == 2);
    println!("counted {took:?} after the edit reached the workers");
    // Under fsync: always, ingest goes on.
    assert_eq!(post(&client, &url, batch(&[("live", "3")])).status(), StatusCode::OK);

    let now: Vec<u32> = ports.iter().map(|&p| coordinator.pid_of(p)).collect();
    assert_eq!(now, pids, "no worker was restarted");
    assert!(stats(&url)["workers"].as_array().unwrap().iter().all(|w| w["restarts"] == 0));
}

#[test]
fn a_fixed_key_edit_is_refused_whole_and_a_worker_respawned_while_the_file_is_invalid_runs_the_last_good_config() {
    let (cluster, ports, listen, coordinator) = running(2, "worker_persist: 0.2\n");
    let url = coordinator.url();
    let client = client();
    let good = stats(&url)["config"]["version"].as_str().unwrap().to_owned();

    // Moving the store cannot happen live: the whole edit is refused, its live part too.
    let redis = "worker_persist: 0.2\nmax_key_bytes: 8\nstore: redis\nredis_url: redis://127.0.0.1:1\n";
    cluster.write_config(&ports, &extra(listen, redis));
    eventually(EDIT_APPLIED, "/stats shows the refusal", || stats(&url)["config"]["valid"] == false);
    let config = stats(&url)["config"].clone();
    let error = config["error"].as_str().unwrap();
    assert!(error.starts_with("store, redis_url cannot change while the cluster runs"), "{error}");
    assert_eq!(config["version"], good.as_str());
    assert!(ports.iter().all(|&p| runs(p) == good));
    assert_eq!(post(&client, &url, long_tenant(9)).status(), StatusCode::OK, "the refused limit must not apply");

    // An invalid file, then a worker dies: it comes back on the last good config.
    fs::write(cluster.config_path(), "workers: [\n").unwrap();
    eventually(EDIT_APPLIED, "/stats shows the invalid file", || {
        stats(&url)["config"]["error"].as_str().is_some_and(|e| e.starts_with("config is not valid YAML"))
    });
    let pid = coordinator.pid_of(ports[0]);
    sigkill(pid);
    eventually(RESPAWN, "the killed worker is back", || {
        entry(&url, ports[0]).is_some_and(|w| w["state"] == "ready" && w["pid"] != pid)
    });
    assert_eq!(runs(ports[0]), good);
    assert_eq!(post(&client, &worker_url(ports[0]), batch(&[("after", "1")])).status(), StatusCode::OK);

    // A valid file again is applied everywhere.
    cluster.write_config(&ports, &extra(listen, "worker_persist: 0.2\nmax_key_bytes: 8\n"));
    eventually(EDIT_APPLIED, "the fixed file is in force", || stats(&url)["config"]["valid"] == true);
    let version = stats(&url)["config"]["version"].as_str().unwrap().to_owned();
    assert_ne!(version, good);
    eventually(EDIT_APPLIED, "every worker runs it", || ports.iter().all(|&p| runs(p) == version));
    assert_eq!(post(&client, &url, long_tenant(9)).status(), StatusCode::BAD_REQUEST);
}

#[test]
fn a_worker_added_again_while_it_is_slow_to_stop_is_started_again_and_routed_to() {
    let more = "worker_persist: 0.2\n";
    let (cluster, ports, listen, mut coordinator) = running(2, more);
    let url = coordinator.url();
    let client = client();
    let paused = coordinator.pid_of(ports[1]);

    // Paused, the worker cannot answer its shutdown request: its stop runs long.
    send_signal(paused, Signal::SIGSTOP);
    cluster.write_config(&ports[..1], &extra(listen, more));
    thread::sleep(Duration::from_secs(1));
    cluster.write_config(&ports, &extra(listen, more));
    thread::sleep(Duration::from_secs(1));
    send_signal(paused, Signal::SIGCONT);

    eventually(RESPAWN, "the re-added worker runs again, in a new process", || {
        !is_running(paused) && entry(&url, ports[1]).is_some_and(|w| w["state"] == "ready" && w["pid"] != paused)
    });
    // Routed to: with only that worker in the config, every request goes to it.
    cluster.write_config(&ports[1..], &extra(listen, more));
    coordinator.wait_live(1);
    eventually(EDIT_APPLIED, "the other worker is gone from /stats", || entry(&url, ports[0]).is_none());
    for i in 0..5 {
        let reply = post(&client, &url, batch(&[("readded", &i.to_string())]));
        assert_eq!(reply.status(), StatusCode::OK, "{}", reply.text().unwrap());
    }
    eventually(EDIT_APPLIED, "counted", || count(&client, &url, "readded") == 5);
}

#[test]
fn a_port_held_by_another_program_is_reported_and_taken_once_free() {
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let (port, listen) = (squatter.local_addr().unwrap().port(), free_port());
    let cluster = Cluster::new(&[port], &extra(listen, "worker_persist: 0.2\n"));
    let mut coordinator = cluster.coordinator(listen);
    let url = coordinator.url();
    eventually(RESPAWN, "the worker shows as blocked", || {
        client().get(format!("{url}/stats")).send().is_ok()
            && entry(&url, port).is_some_and(|w| w["state"] == "blocked")
    });
    let worker = entry(&url, port).unwrap();
    assert!(worker["last_error"].as_str().unwrap().contains("held by another program"), "{worker}");
    assert!(worker["last_error_at_unix_ms"].as_u64().is_some_and(|ms| ms > 0), "{worker}");
    assert_eq!(worker["last_error_past"], false, "{worker}");
    assert_eq!(worker["restarts"], 0, "nothing was spawned to fail: {worker}");
    assert_eq!(cluster.processes().len(), 1, "only the coordinator runs");

    // Alive, but not ready: a load balancer sends no client here, and says why.
    let client = client();
    assert_eq!(client.get(format!("{url}/health")).send().unwrap().status(), StatusCode::OK);
    let not_ready = client.get(format!("{url}/ready")).send().unwrap();
    assert_eq!(not_ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = not_ready.json().unwrap();
    assert_eq!((body["ready"].as_bool(), body["live_workers"].as_u64()), (Some(false), Some(0)), "{body}");
    let why = body["error"].as_str().unwrap();
    assert!(why.contains("no worker is ready") && why.contains(&format!(":{port} blocked")), "{body}");
    let text = client.get(format!("{url}/metrics")).send().unwrap().text().unwrap();
    for state in ["starting", "ready", "unhealthy", "exited", "stopping", "blocked"] {
        let expected = if state == "blocked" { 1.0 } else { 0.0 };
        assert_eq!(metric(&text, "countapp_coordinator_workers", &[("state", state)]), Some(expected), "{state}");
    }

    drop(squatter);
    coordinator.wait_live(1);
    let ready = client.get(format!("{url}/ready")).send().unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    let body: Value = ready.json().unwrap();
    assert_eq!((body["ready"].as_bool(), body["live_workers"].as_u64()), (Some(true), Some(1)), "{body}");
    let worker = entry(&url, port).unwrap();
    assert_eq!(worker["last_error_past"], true, "the error is history once the worker is ready: {worker}");
    assert_eq!(post(&client, &url, batch(&[("freed", "1")])).status(), StatusCode::OK);
}

#[test]
fn an_adopted_worker_that_dies_is_respawned_and_counted_as_a_restart() {
    let (port, listen) = (free_port(), free_port());
    let cluster = Cluster::new(&[port], &extra(listen, "worker_persist: 0.2\n"));
    let mut first = cluster.coordinator(listen);
    first.wait_live(1);
    first.kill();
    let mut second = cluster.coordinator(listen);
    second.wait_live(1);
    let url = second.url();
    let adopted = entry(&url, port).unwrap();
    assert_eq!(adopted["adopted"], true);
    let pid = adopted["pid"].as_u64().unwrap() as u32;

    sigkill(pid);
    eventually(RESPAWN, "the worker is respawned", || {
        entry(&url, port).is_some_and(|w| w["state"] == "ready" && w["pid"] != pid)
    });
    let respawned = entry(&url, port).unwrap();
    assert_eq!((respawned["restarts"].as_u64(), respawned["adopted"].as_bool()), (Some(1), Some(false)), "{respawned}");
}

/// `make run` on a fresh checkout: the coordinator started from the config's directory with a
/// relative `--config config.yaml`, and neither `db/` nor `logs/` there yet. Every worker must
/// come up at the first try: four of them create the database at once.
#[test]
fn a_fresh_directory_starts_every_worker_at_the_first_try() {
    let (ports, listen): (Vec<u16>, u16) = ((0..4).map(|_| free_port()).collect(), free_port());
    let cluster = Cluster::new(&ports, &extra(listen, "worker_persist: 0.2\n"));
    assert!(!cluster.database().exists() && !cluster.path().join("logs").exists());
    let mut coordinator = cluster.coordinator_in_place(listen);
    coordinator.wait_live(4);
    let url = coordinator.url();
    assert_eq!(post(&client(), &url, batch(&[("fresh", "1"), ("fresh", "2")])).status(), StatusCode::OK);
    eventually(RESPAWN, "the batch is counted", || count(&client(), &url, "fresh") == 2);
    for worker in stats(&url)["workers"].as_array().unwrap() {
        assert_eq!((worker["restarts"].as_u64(), worker["last_error"].as_str()), (Some(0), None), "{worker}");
    }
}

#[test]
fn sighup_applies_an_edit_the_watch_cannot_see_at_once_and_the_coordinator_runs_on() {
    // The config is a symbolic link to a file in another directory, as a mounted config map is:
    // the watch on the link's directory never sees the file change, and with `config_check: 60`
    // its next re-read is a minute away. Only SIGHUP can make the edit apply in time.
    let slow = "worker_persist: 0.2\nconfig_check: 60\n";
    let (ports, listen): (Vec<u16>, u16) = ((0..2).map(|_| free_port()).collect(), free_port());
    let cluster = Cluster::new(&ports, &format!("listen: 127.0.0.1:{listen}\n{slow}"));
    let elsewhere = cluster.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::rename(cluster.config_path(), elsewhere.join("config.yaml")).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("config.yaml"), cluster.config_path()).unwrap();
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(2);
    let url = coordinator.url();
    let version = || stats(&url)["config"]["version"].as_str().unwrap().to_owned();
    let before = version();

    cluster.write_config(&ports, &format!("listen: 127.0.0.1:{listen}\n{slow}max_key_bytes: 8\n"));
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(version(), before, "the edit was seen without SIGHUP: this test proves nothing");
    coordinator.signal(Signal::SIGHUP);
    let took = eventually(EDIT_APPLIED, "SIGHUP applies the edit", || version() != before);
    println!("applied {took:?} after SIGHUP");
    let edited = version();
    eventually(EDIT_APPLIED, "every worker runs it", || ports.iter().all(|&p| runs(p) == edited));
    assert_eq!(post(&client(), &url, long_tenant(9)).status(), StatusCode::BAD_REQUEST);

    // An invalid file is refused on SIGHUP as on an edit, and shown; the coordinator runs on.
    fs::write(cluster.config_path(), "workers: [\n").unwrap();
    coordinator.signal(Signal::SIGHUP);
    eventually(EDIT_APPLIED, "/stats shows the refusal", || stats(&url)["config"]["valid"] == false);
    assert!(coordinator.is_running());
    assert_eq!(version(), edited);

    // SIGTERM still stops it gracefully.
    coordinator.signal(Signal::SIGTERM);
    assert!(coordinator.wait_exit(RESPAWN).success(), "{}", coordinator.log());
}

#[test]
fn a_worker_run_by_hand_follows_its_own_config_file() {
    let (cluster, worker) = lone_worker("worker_persist: 0.2\nconfig_check: 0.5\n");
    let port = worker.port;
    let client = client();
    let before = runs(port);
    assert_eq!(post(&client, &worker.url(), long_tenant(9)).status(), StatusCode::OK);

    cluster.write_config(&[port], "worker_persist: 0.2\nconfig_check: 0.5\nmax_key_bytes: 8\n");
    eventually(EDIT_APPLIED, "the worker runs the edited file", || runs(port) != before);
    assert_eq!(post(&client, &worker.url(), long_tenant(9)).status(), StatusCode::BAD_REQUEST);

    // A fixed key: refused, and the worker keeps serving on what it runs.
    let edited = runs(port);
    cluster.write_config(
        &[port],
        "worker_persist: 0.2\nconfig_check: 0.5\nstore: redis\nredis_url: redis://127.0.0.1:1\n",
    );
    thread::sleep(Duration::from_secs(1));
    assert_eq!(runs(port), edited);
    assert!(worker.log().contains("config edit not applied"), "{}", worker.log());
    assert_eq!(post(&client, &worker.url(), long_tenant(8)).status(), StatusCode::OK);
}

#[test]
fn a_hung_worker_is_killed_and_replaced() {
    let (_cluster, ports, _, coordinator) = running(2, "worker_persist: 0.2\n");
    let url = coordinator.url();
    let hung = coordinator.pid_of(ports[0]);
    // Alive but answering nothing: only its health checks can tell.
    send_signal(hung, Signal::SIGSTOP);
    let took = eventually(RESPAWN, "the hung worker is replaced by a new process", || {
        !is_running(hung) && entry(&url, ports[0]).is_some_and(|w| w["state"] == "ready" && w["pid"] != hung)
    });
    println!("replaced {took:?} after it hung");
    let replaced = entry(&url, ports[0]).unwrap();
    assert_eq!(replaced["restarts"], 1, "{replaced}");
    assert!(replaced["last_error"].as_str().unwrap().contains("failed health checks"), "{replaced}");
    assert_eq!(post(&client(), &url, batch(&[("after-hang", "1")])).status(), StatusCode::OK);
}

/// A worker still recovering its log (held back here by its log's lock, as a previous run of it
/// would hold it): the coordinator shows why it is not ready, as the worker says it, and is not
/// ready itself until the worker is.
#[test]
fn a_worker_recovering_its_log_says_why_and_the_coordinator_is_ready_once_it_is() {
    let (port, listen) = (free_port(), free_port());
    let cluster = Cluster::new(&[port], &extra(listen, "worker_persist: 0.2\n"));
    let log_dir = cluster.database().join("wal").join(format!("127.0.0.1-{port}"));
    fs::create_dir_all(&log_dir).unwrap();
    let lock = fs::File::create(log_dir.join("LOCK")).unwrap();
    lock.lock().unwrap();
    let mut coordinator = cluster.coordinator(listen);
    let url = coordinator.url();
    let mut recovering = None;
    eventually(RESPAWN, "the worker says it is recovering", || {
        recovering = client()
            .get(format!("{url}/stats"))
            .send()
            .is_ok()
            .then(|| entry(&url, port))
            .flatten()
            .filter(|w| w["not_ready"].as_str().is_some_and(|why| why.contains("recovering")));
        recovering.is_some()
    });
    let recovering = recovering.unwrap();
    assert_eq!(recovering["state"], "starting", "{recovering}");
    let reply = client().get(format!("{url}/ready")).send().unwrap();
    assert_eq!(reply.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = reply.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains(&format!(":{port} starting")), "{body}");

    drop(lock);
    coordinator.wait_live(1);
    let ready = entry(&url, port).unwrap();
    assert_eq!((ready["state"].as_str(), &ready["not_ready"]), (Some("ready"), &Value::Null), "{ready}");
    assert_eq!(client().get(format!("{url}/ready")).send().unwrap().status(), StatusCode::OK);
}
