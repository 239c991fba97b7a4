//! The one harness of the system tests: real `worker` processes on free loopback ports, each in
//! its own temporary directory with its own `config.yaml`, killed and reaped when dropped, so
//! that no process outlives a test, even a failed one.

#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use serde_json::Value;

/// The token the harness hands its workers for `POST /shutdown`.
pub const TOKEN: &str = "test-shutdown-token";

/// How long a process gets to become ready or to exit before the test fails.
pub const STARTUP: Duration = Duration::from_secs(20);

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An HTTP client with timeouts, so that a hung server fails the test instead of hanging it.
pub fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

/// A cluster's directory: `config.yaml`, `db/` and the processes' log files.
pub struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A new, empty directory with a `config.yaml` listing `workers` (ports on 127.0.0.1) and
    /// holding the `extra` YAML lines.
    pub fn new(workers: &[u16], extra: &str) -> Cluster {
        let cluster = Cluster { dir: tempfile::tempdir().unwrap() };
        cluster.write_config(workers, extra);
        cluster
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.path().join("config.yaml")
    }

    /// The store's directory.
    pub fn database(&self) -> PathBuf {
        self.path().join("db")
    }

    /// Rewrites `config.yaml` in place.
    pub fn write_config(&self, workers: &[u16], extra: &str) {
        let mut yaml = String::from("workers:\n");
        for port in workers {
            yaml.push_str(&format!("  - http://127.0.0.1:{port}\n"));
        }
        yaml.push_str("database: db/\nworker_logs: logs/\n");
        yaml.push_str(extra);
        fs::write(self.config_path(), yaml).unwrap();
    }

    /// Every write-ahead log file (`db/wal/<worker>/*.log`) with its size in bytes, sorted by path.
    pub fn wal_files(&self) -> Vec<(PathBuf, u64)> {
        let mut files = Vec::new();
        let Ok(workers) = fs::read_dir(self.database().join("wal")) else { return files };
        for worker in workers {
            let Ok(entries) = fs::read_dir(worker.unwrap().path()) else { continue };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|ext| ext == "log") {
                    let len = fs::metadata(&path).map_or(0, |m| m.len());
                    files.push((path, len));
                }
            }
        }
        files.sort();
        files
    }

    /// Starts a worker on `port` with this cluster's config.
    pub fn worker(&self, port: u16) -> Proc {
        let log = self.path().join(format!("worker-{port}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
        command
            .arg(port.to_string())
            .arg("--config")
            .arg(self.config_path())
            .env("COUNTAPP_SHUTDOWN_TOKEN", TOKEN);
        Proc::spawn(command, port, log)
    }
}

/// A process of the system under test; killed with SIGKILL and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut command: Command, port: u16, log: PathBuf) -> Proc {
        let out = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        command.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
        let child = command.spawn().unwrap();
        Proc { child: Some(child), port, log }
    }

    /// The base URL of the process.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits until `GET /ready` answers 200.
    pub fn wait_ready(&mut self) -> &mut Self {
        let client = client();
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the process on port {} exited ({status}) before it was ready:\n{}", self.port, self.log());
            }
            let ready = client.get(format!("{}/ready", self.url())).send().is_ok_and(|r| r.status().is_success());
            if ready {
                return self;
            }
            assert!(Instant::now() < deadline, "port {} not ready in {STARTUP:?}:\n{}", self.port, self.log());
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (such as `"TERM"`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit by itself, and returns its status.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("the process was already reaped");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "port {} still running after {within:?}:\n{}", self.port, self.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    /// What the process wrote to stdout and stderr.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `POST {url}/items` with `body`.
pub fn post(client: &Client, url: &str, body: impl Into<reqwest::blocking::Body>) -> Response {
    client.post(format!("{url}/items")).header("content-type", "application/json").body(body).send().unwrap()
}

/// A batch of items as JSON.
pub fn batch(items: &[(&str, &str)]) -> String {
    let items: Vec<Value> = items.iter().map(|(tenant, id)| serde_json::json!({ "id": id, "tenant": tenant })).collect();
    Value::Array(items).to_string()
}

/// `GET {url}/items/{tenant}/count`, percent-encoding the tenant.
pub fn count(client: &Client, url: &str, tenant: &str) -> u64 {
    let tenant: String = tenant
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    let reply: Value = client.get(format!("{url}/items/{tenant}/count")).send().unwrap().json().unwrap();
    reply["count"].as_u64().unwrap_or_else(|| panic!("no count in {reply}"))
}

/// Asserts that `response` has `status` and a JSON body `{"error": "<message>"}`; returns the
/// message.
pub fn error_message(response: Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status, "expected {status} from {}", response.url());
    let url = response.url().clone();
    let text = response.text().unwrap();
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: the {status} body is not JSON ({e}): {text:?}"));
    match body["error"].as_str() {
        Some(message) if !message.is_empty() => message.to_owned(),
        _ => panic!("{url}: the {status} body has no error message: {body}"),
    }
}

/// `GET {url}` as JSON, asserting a 200.
pub fn get_json(client: &Client, url: &str) -> Value {
    let response = client.get(url).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK, "GET {url}");
    response.json().unwrap()
}

/// The value of the series `name{labels...}` in Prometheus text, if it is there; the series may
/// carry other labels besides `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let has = |&(key, want): &(&str, &str)| {
            series_labels.split(',').any(|pair| {
                pair.split_once('=').is_some_and(|(k, v)| {
                    k == key && v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) == Some(want)
                })
            })
        };
        (series_name == name && labels.iter().all(has)).then(|| value.parse().ok())?
    })
}

/// Polls until `check` holds, for at most `within`; returns how long it took.
pub fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(25));
    }
    started.elapsed()
}
