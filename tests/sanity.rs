//! The eventual-consistency sanity suite of the original CountApp, done properly: the real
//! system started from a fresh directory on free ports (so it runs beside a `make run`), the
//! original's sample batch posted through the coordinator, and the counts polled until they are
//! right, printing how long consistency took; then the same under a live config edit and under
//! a worker killed with SIGKILL mid-load, after which every acknowledged batch is accounted for. `make tests` runs it last, with its output shown.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use countapp_testcluster::{Cluster, Load, Node, batch, client, count, eventually, free_port, get_json, post, sigkill};
use reqwest::StatusCode;

/// The original's sample batch.
const SAMPLE: [(&str, &str); 4] = [("t1", "1"), ("t2", "2"), ("t3", "2"), ("t1", "4")];
/// How long consistency may take: `worker_persist` is 1 s here, so well under this.
const CONSISTENCY: Duration = Duration::from_secs(15);
/// How long the killed worker is under load before it is killed, and the cluster after.
const UNDER_LOAD: Duration = Duration::from_millis(700);

/// The original's four workers behind a coordinator, all on free ports, flushing every second.
fn system() -> (Cluster, Vec<u16>, Node) {
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let listen = free_port();
    let cluster = Cluster::new(&ports, &format!("listen: 127.0.0.1:{listen}\nworker_persist: 1\nconfig_check: 1\n"));
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(4);
    (cluster, ports, coordinator)
}

/// Posts the sample batch with its tenants renamed by `prefix`, and polls (through the
/// coordinator, so any worker may answer) until t1 counts 2 and t2 and t3 count 1.
fn post_sample_and_wait(coordinator: &Node, prefix: &str, situation: &str) {
    let client = client();
    let tenants: Vec<String> = SAMPLE.iter().map(|(t, _)| format!("{prefix}{t}")).collect();
    let items: Vec<(&str, &str)> = tenants.iter().zip(SAMPLE).map(|(t, (_, id))| (t.as_str(), id)).collect();
    println!("POST {}", batch(&items));
    let reply = post(&client, &coordinator.url(), batch(&items));
    assert_eq!(reply.status(), StatusCode::OK);
    println!("  -> 200 {}", reply.text().unwrap());
    let expected = [(format!("{prefix}t1"), 2), (format!("{prefix}t2"), 1), (format!("{prefix}t3"), 1)];
    let took = eventually(CONSISTENCY, "the sample batch is counted", || {
        expected.iter().all(|(tenant, n)| count(&client, &coordinator.url(), tenant) == *n)
    });
    println!("  consistency achieved {situation} in {:.2} s: t1=2, t2=1, t3=1", took.as_secs_f64());
}

#[test]
fn sanity_the_sample_batch_becomes_consistent() {
    let (_cluster, _, coordinator) = system();
    post_sample_and_wait(&coordinator, "", "on a quiet system");
}

#[test]
fn sanity_consistent_under_a_live_config_edit() {
    let (cluster, ports, coordinator) = system();
    // Drop one worker and add another while the batch is being counted.
    let added = free_port();
    let text = fs::read_to_string(cluster.config_path()).unwrap();
    let edited = text.replace(&format!("http://127.0.0.1:{}", ports[3]), &format!("http://127.0.0.1:{added}"));
    fs::write(cluster.config_path(), edited).unwrap();
    post_sample_and_wait(&coordinator, "edit-", "during a config edit");
    eventually(CONSISTENCY, "the added worker is live", || {
        let stats = get_json(&client(), &format!("{}/stats", coordinator.url()));
        stats["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["url"].as_str().unwrap().ends_with(&format!(":{added}")) && w["state"] == "ready")
    });
}

#[test]
fn sanity_consistent_under_a_killed_worker() {
    let (_cluster, _, coordinator) = system();
    let client = client();
    let victim = &coordinator.workers()[0];
    let (url, pid) = (victim["url"].as_str().unwrap().to_owned(), victim["pid"].as_u64().unwrap() as u32);
    // Load straight to worker 0, so that it surely holds acknowledged items when it dies, and
    // through the coordinator, whose clients must not notice.
    let direct = Load::start(&url, 2, "kill-direct", true);
    let routed = Load::start(&coordinator.url(), 2, "kill-routed", false);
    thread::sleep(UNDER_LOAD);
    sigkill(pid);
    println!("SIGKILL worker 0 (pid {pid}) under load: 2 clients posting straight to it, 2 through the coordinator");
    thread::sleep(UNDER_LOAD);
    let (direct, routed) = (direct.stop(), routed.stop());
    assert!(direct.acked_batches() > 0, "worker 0 acknowledged nothing before it was killed");
    assert!(!direct.errors.is_empty(), "worker 0 was killed only after its clients had stopped");
    assert!(
        routed.errors.is_empty(),
        "clients of the coordinator saw {} errors: {:?}",
        routed.errors.len(),
        routed.errors
    );
    for (clients, tally) in [("straight to worker 0", &direct), ("through the coordinator", &routed)] {
        let started = Instant::now();
        let accounting = tally.check_counted(&client, &coordinator.url(), CONSISTENCY);
        let took = started.elapsed().as_secs_f64();
        println!("  posted {clients}: {accounting}; read through the coordinator in {took:.2} s");
    }
    post_sample_and_wait(&coordinator, "kill-", "after a worker was killed by SIGKILL");
}
