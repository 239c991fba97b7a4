//! What an operator does around a cluster, with the real binaries: `coordinator --check`, errors
//! that read as a chain rather than a backtrace, JSON logs, the rotation of a worker's log file,
//! and `coordinator --reset`.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use countapp_testcluster::{Cluster, Signal, client, extra, free_port, post, running};
use serde_json::Value;

/// The coordinator binary with `args`, run to its end with RUST_BACKTRACE=1 (so that a
/// backtrace, if anything still printed one, would show).
fn coordinator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A file `config.yaml` holding `yaml`, in a directory of its own.
fn config_file(yaml: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    fs::write(&path, yaml).unwrap();
    (dir, path.to_str().unwrap().to_owned())
}

#[test]
fn check_accepts_a_valid_file_with_an_ok_line_and_exit_status_0() {
    let (_dir, path) = config_file("workers: [http://localhost:5001, http://10.0.0.2:5002]\nworker_persist: 500ms\n");
    for args in [vec!["--check", path.as_str()], vec!["--config", path.as_str(), "--check"]] {
        let output = coordinator(&args);
        assert!(output.status.success(), "{args:?}: {}", text(&output.stderr));
        let stdout = text(&output.stdout);
        assert!(stdout.starts_with(&format!("{path}: OK (2 workers, 1 local;")), "{stdout}");
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
    }
}

#[test]
fn check_refuses_an_invalid_file_naming_key_and_line_with_exit_status_1() {
    let (_dir, path) = config_file("workers: [http://localhost:5001]\nfsync: always\nmax_body_bytes: 16MB\n");
    let output = coordinator(&["--check", &path]);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "{}", text(&output.stdout));
    let stderr = text(&output.stderr);
    assert_eq!(stderr.lines().next().unwrap(), format!("error: loading {path}"));
    let cause = stderr.lines().nth(1).unwrap();
    assert!(cause.starts_with("  caused by: max_body_bytes: invalid value: string \"16MB\""), "{stderr}");
    assert!(cause.ends_with("at line 3, column 1"), "{stderr}");

    let output = coordinator(&["--check", "/nonexistent/config.yaml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("cannot read config file /nonexistent/config.yaml"));
}

#[test]
fn a_user_error_is_its_chain_and_exit_status_1_even_with_rust_backtrace_set() {
    let (_dir, path) = config_file("workers: [http://localhost:5001]\nworker_persist: -1\n");
    let worker = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["5001", "--config", &path])
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .unwrap();
    for (what, output) in [("coordinator", coordinator(&["--config", &path])), ("worker", worker)] {
        assert_eq!(output.status.code(), Some(1), "{what}");
        let stderr = text(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 2, "{what}: {stderr}");
        assert_eq!(lines[0], format!("error: loading {path}"), "{what}");
        assert!(lines[1].starts_with("  caused by: worker_persist: invalid value: integer `-1`"), "{what}: {stderr}");
        assert!(!stderr.to_lowercase().contains("backtrace"), "{what}: {stderr}");
    }
}

/// The non-empty lines of `path`, each parsed as a JSON object, failing on any that is not.
fn json_lines(path: &Path) -> Vec<Value> {
    let log = fs::read_to_string(path).unwrap();
    let lines = log.lines().filter(|line| !line.is_empty());
    lines.map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?} in\n{log}"))).collect()
}

#[test]
fn json_logs_are_one_object_a_line_and_a_workers_carry_its_port() {
    let (cluster, ports, _listen, mut coordinator) = running(1, "log_format: json\n");
    let response = post(&client(), &coordinator.url(), r#"[{"id":"1","tenant":"t"}]"#);
    assert!(response.status().is_success());
    coordinator.signal(Signal::SIGTERM);
    assert!(coordinator.wait_exit(Duration::from_secs(20)).success());

    let worker = json_lines(&cluster.path().join(format!("logs/{}.log", ports[0])));
    assert!(worker.iter().all(|line| line["port"] == ports[0]), "{worker:?}");
    let own: Vec<&Value> = worker.iter().filter(|line| line["process"] == "worker").collect();
    assert!(!own.is_empty(), "{worker:?}");
    for line in &own {
        assert!(line["timestamp"].is_string() && line["level"].is_string(), "{line}");
        assert!(line["fields"]["message"].is_string(), "{line}");
    }
    // The coordinator's marker before each spawn is JSON too.
    assert!(
        worker.iter().any(|line| line["process"] == "coordinator" && line["fields"]["message"] == "starting worker")
    );

    let own = json_lines(&cluster.path().join("coordinator.log"));
    assert!(!own.is_empty());
    assert!(own.iter().all(|line| line["process"] == "coordinator" && line["fields"].is_object()), "{own:?}");
}

#[test]
fn a_workers_log_rotates_at_its_size_keeping_at_most_the_files_asked_for() {
    const MAX: u64 = 1024;
    let (port, listen) = (free_port(), free_port());
    let cluster = Cluster::new(&[port], &extra(listen, "worker_log_max_bytes: 1KiB\nworker_log_files: 2\n"));
    // At debug level a worker logs a line a request: the requests below write many kilobytes.
    let mut coordinator = cluster.coordinator_with_env(listen, &[("RUST_LOG", "debug")]);
    coordinator.wait_live(1);
    let client = client();
    let worker = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        assert!(client.get(format!("{worker}/items/t/count")).send().unwrap().status().is_success());
    }
    let logs = cluster.path().join("logs");
    let log = |suffix: &str| logs.join(format!("{port}.log{suffix}"));
    for suffix in ["", ".1", ".2"] {
        let size = fs::metadata(log(suffix)).unwrap_or_else(|e| panic!("{port}.log{suffix}: {e}")).len();
        assert!(size <= MAX, "{port}.log{suffix} holds {size} bytes");
    }
    // The rotated files were filled to their size, less one line, before they were rotated.
    for suffix in [".1", ".2"] {
        let size = fs::metadata(log(suffix)).unwrap().len();
        assert!(size > MAX / 2, "{port}.log{suffix} holds only {size} bytes");
    }
    assert!(!log(".3").exists(), "more rotated files than worker_log_files");
    let names: Vec<String> =
        fs::read_dir(&logs).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names.iter().filter(|name| name.starts_with(&format!("{port}.log"))).count(), 3, "{names:?}");
    // And the worker still writes to the file at the path.
    let before = fs::read_to_string(log("")).unwrap();
    assert!(client.get(format!("{worker}/items/t/count")).send().unwrap().status().is_success());
    countapp_testcluster::eventually(Duration::from_secs(5), "the worker's next line in the new file", || {
        fs::read_to_string(log("")).is_ok_and(|now| now != before)
    });
}

#[test]
fn reset_refuses_while_any_of_the_cluster_runs_then_removes_the_database_and_the_logs() {
    let (cluster, ports, _listen, mut coordinator) = running(1, "");
    let config = cluster.config_path();
    let config = config.to_str().unwrap();
    assert!(post(&client(), &coordinator.url(), r#"[{"id":"1","tenant":"t"}]"#).status().is_success());
    let database = cluster.path().join("db");
    let worker_log = cluster.path().join(format!("logs/{}.log", ports[0]));
    assert!(database.join("STORE.json").is_file() && worker_log.is_file());

    let output = coordinator_reset(config);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("is in use") && stderr.contains("stop the cluster first"), "{stderr}");
    assert!(database.join("STORE.json").is_file(), "nothing is removed while the cluster runs");

    coordinator.signal(Signal::SIGTERM);
    assert!(coordinator.wait_exit(Duration::from_secs(20)).success());
    // A worker run by hand on the config's port is a running cluster too.
    let mut worker = cluster.worker(ports[0]);
    worker.wait_ready();
    let output = coordinator_reset(config);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stdout));
    assert!(text(&output.stderr).contains(&format!("127.0.0.1:{}", ports[0])), "{}", text(&output.stderr));
    worker.signal(Signal::SIGTERM);
    worker.wait_exit(Duration::from_secs(20));

    let output = coordinator_reset(config);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains(&format!("removed {}", database.display())), "{}", text(&output.stdout));
    assert!(!database.exists() && !worker_log.exists());
    assert!(Path::new(config).is_file(), "the config stays");
}

#[test]
fn reset_leaves_a_directory_that_is_no_database() {
    // Free ports, so that the refusal is for the directory alone.
    let ports = format!("workers: [http://127.0.0.1:{}]\nlisten: 127.0.0.1:{}\n", free_port(), free_port());
    let (dir, path) = config_file(&format!("{ports}database: data/\n"));
    fs::create_dir(dir.path().join("data")).unwrap();
    fs::write(dir.path().join("data/notes.txt"), "mine").unwrap();
    let output = coordinator_reset(&path);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("no STORE.json, so it is no CountApp database"), "{}", text(&output.stderr));
    assert!(dir.path().join("data/notes.txt").is_file());
    // A database that would hold the config itself is never removed.
    let (dir, path) = config_file(&format!("{ports}database: .\n"));
    fs::write(dir.path().join("STORE.json"), "{}").unwrap();
    let output = coordinator_reset(&path);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("holds the config file"), "{}", text(&output.stderr));
    assert!(Path::new(&path).is_file());
}

fn coordinator_reset(config: &str) -> Output {
    coordinator(&["--reset", "--config", config])
}
