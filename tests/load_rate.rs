//! The load tool's fixed-rate mode (`countapp-load --rate`) against real workers: it keeps the
//! rate asked for, and it measures latency from each request's intended start, so that a worker
//! stalled with SIGSTOP shows its stall in every request that was due meanwhile, where the
//! closed loop shows it in only the few requests that were waiting.
//!
//! The tool is the `countapp-load` binary of the workspace, built beside these tests by
//! `cargo test --workspace` (as `make tests` runs it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use countapp_testcluster::{Stopped, lone_worker, running};
use serde_json::Value;

/// The `countapp-load` binary in the target directory of these tests.
fn load_tool() -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let tool = deps.parent().unwrap().join("countapp-load");
    assert!(tool.is_file(), "{} is missing: build it with cargo build -p countapp-load", tool.display());
    tool
}

/// Starts the load tool against `url` with `args`, its report going to a JSON file.
fn start_load(url: &str, args: &[&str], json: &std::path::Path) -> Child {
    Command::new(load_tool())
        .args(["--url", url, "--no-check", "--quiet", "--json"])
        .arg(json)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for the load tool and returns its JSON report.
fn report(child: Child, json: &std::path::Path) -> Value {
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "countapp-load: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

#[test]
fn the_rate_mode_keeps_its_rate_through_a_coordinator() {
    let (cluster, _ports, _listen, coordinator) = running(2, "");
    let json = cluster.path().join("rate.json");
    let load = start_load(&coordinator.url(), &["-R", "20000", "-b", "100", "-c", "8", "-d", "3s"], &json);
    let run = &report(load, &json)["run"];
    let items_per_s = run["items_per_s"].as_f64().unwrap();
    assert!((15_000.0..=22_000.0).contains(&items_per_s), "asked 20000 items/s, got {items_per_s}: {run}");
    // 200 requests a second for 3 s, give or take the last slots.
    let requests = run["requests"].as_u64().unwrap();
    assert!((540..=610).contains(&requests), "{requests} requests: {run}");
    assert_eq!(run["errors"], 0, "{run}");
}

/// The median and p99 latency, in ms, of a 3 s run against a worker stopped from 0.5 s to 2.5 s.
fn latency_with_a_stall(args: &[&str]) -> (f64, f64) {
    // No log file closes during the 3 s run: one closed just before the stall would wait out
    // the stall unmerged, and the worker would rightly push back for a moment once it resumes.
    let (cluster, worker) = lone_worker("worker_persist: 60\n");
    let json = cluster.path().join("stall.json");
    let mut all = vec!["-b", "10", "-c", "4", "-d", "3s", "--timeout", "10s"];
    all.extend_from_slice(args);
    let load = start_load(&worker.url(), &all, &json);
    thread::sleep(Duration::from_millis(500));
    let stopped = Stopped::new(worker.pid());
    thread::sleep(Duration::from_secs(2));
    drop(stopped);
    let run = report(load, &json)["run"].clone();
    assert_eq!(run["errors"], 0, "{run}");
    (run["latency_ms"]["p50"].as_f64().unwrap(), run["latency_ms"]["p99"].as_f64().unwrap())
}

#[test]
fn latency_at_a_fixed_rate_runs_from_the_intended_start_through_a_stall() {
    // 100 requests a second: two thirds of them fall due while the worker is stopped, and each
    // waits from its due time to the end of the stall.
    let (p50, p99) = latency_with_a_stall(&["-R", "1000"]);
    assert!(p50 >= 250.0, "the median request was due during the stall, yet p50 is {p50} ms");
    assert!(p99 >= 1500.0, "the first requests due waited about 2 s, yet p99 is {p99} ms");
    // The closed loop sends nothing while its 4 requests wait: the stall hides in 4 requests.
    let (p50, _) = latency_with_a_stall(&[]);
    assert!(p50 < 100.0, "closed loop: p50 {p50} ms");
}
