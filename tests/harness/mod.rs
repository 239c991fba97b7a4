//! The one harness of the system tests: real `worker` processes on free loopback ports, each in
//! its own temporary directory with its own `config.yaml`, killed and reaped when dropped, so
//! that no process outlives a test, even a failed one.

#![allow(dead_code)] // Each test file uses a different part of the harness.

pub mod browser;
pub mod netns;
pub mod redis;

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

/// A port that was free a moment ago on 127.0.0.1, and never handed out before in this test
/// process: the kernel may offer a port again as soon as it is released, and a worker on the
/// coordinator's own port could never start.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
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

    /// [`Cluster::new`] with the workers' URLs as they are, such as those of other hosts.
    pub fn with_urls(workers: &[String], extra: &str) -> Cluster {
        let cluster = Cluster { dir: tempfile::tempdir().unwrap() };
        cluster.write_config_urls(workers, extra);
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
        let urls: Vec<String> = workers.iter().map(|port| format!("http://127.0.0.1:{port}")).collect();
        self.write_config_urls(&urls, extra);
    }

    fn write_config_urls(&self, workers: &[String], extra: &str) {
        let mut yaml = String::from("workers:\n");
        for url in workers {
            yaml.push_str(&format!("  - {url}\n"));
        }
        yaml.push_str("database: db/\nworker_logs: logs/\n");
        yaml.push_str(extra);
        fs::write(self.config_path(), yaml).unwrap();
    }

    /// Every write-ahead log file (`db/wal/<worker>/*.open` and `*.log`) with its size in bytes,
    /// sorted by path.
    pub fn wal_files(&self) -> Vec<(PathBuf, u64)> {
        self.wal_files_named(&["log", "open"])
    }

    /// The consumed log files (`db/wal/<worker>/*.done`: their ids are in Redis, which could not
    /// yet vouch for them) with their sizes in bytes, sorted by path.
    pub fn consumed_wal_files(&self) -> Vec<(PathBuf, u64)> {
        self.wal_files_named(&["done"])
    }

    fn wal_files_named(&self, extensions: &[&str]) -> Vec<(PathBuf, u64)> {
        let mut files = Vec::new();
        let Ok(workers) = fs::read_dir(self.database().join("wal")) else { return files };
        for worker in workers {
            let Ok(entries) = fs::read_dir(worker.unwrap().path()) else { continue };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|ext| extensions.iter().any(|e| ext == *e)) {
                    let len = fs::metadata(&path).map_or(0, |m| m.len());
                    files.push((path, len));
                }
            }
        }
        files.sort();
        files
    }

    /// Starts a worker on 127.0.0.1:`port` with this cluster's config.
    pub fn worker(&self, port: u16) -> Proc {
        self.worker_at("127.0.0.1", port)
    }

    /// Starts a worker on `host`:`port` with this cluster's config, as its owner would by hand.
    pub fn worker_at(&self, host: &str, port: u16) -> Proc {
        self.worker_with_env(host, port, &[])
    }

    /// [`Cluster::worker_at`] with more environment variables, such as `FAILPOINTS`.
    pub fn worker_with_env(&self, host: &str, port: u16, env: &[(&str, &str)]) -> Proc {
        self.worker_by(Command::new(env!("CARGO_BIN_EXE_worker")), host, port, env)
    }

    /// Starts a worker on the network namespace `host`, at its address, as its owner would by
    /// hand on that machine.
    pub fn worker_on(&self, host: &netns::Host, port: u16) -> Proc {
        self.worker_by(host.command(env!("CARGO_BIN_EXE_worker")), &host.addr, port, &[])
    }

    /// Runs the worker binary through `command` (the binary itself, or a launcher of it).
    fn worker_by(&self, mut command: Command, host: &str, port: u16, env: &[(&str, &str)]) -> Proc {
        let log = self.path().join(format!("worker-{port}.log"));
        command
            .arg(port.to_string())
            .arg("--config")
            .arg(self.config_path())
            .arg("--host")
            .arg(host)
            .env("COUNTAPP_SHUTDOWN_TOKEN", TOKEN)
            .envs(env.iter().copied());
        Proc::spawn(command, host, port, log)
    }
}

/// A process of the system under test; killed with SIGKILL and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
    host: String,
    pub port: u16,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut command: Command, host: &str, port: u16, log: PathBuf) -> Proc {
        let out = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        command.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
        let child = command.spawn().unwrap();
        Proc { child: Some(child), host: host.to_owned(), port, log }
    }

    /// The base URL of the process.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
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
    let items: Vec<Value> =
        items.iter().map(|(tenant, id)| serde_json::json!({ "id": id, "tenant": tenant })).collect();
    Value::Array(items).to_string()
}

/// `GET {url}/items/{tenant}/count`, percent-encoding the tenant: the reply, whatever its status.
pub fn count_reply(client: &Client, url: &str, tenant: &str) -> Response {
    let tenant: String = tenant
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    client.get(format!("{url}/items/{tenant}/count")).send().unwrap()
}

/// `GET {url}/items/{tenant}/count`, asserting a count in the reply.
pub fn count(client: &Client, url: &str, tenant: &str) -> u64 {
    let reply: Value = count_reply(client, url, tenant).json().unwrap();
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

impl Cluster {
    /// Starts the coordinator with this cluster's config; `port` must be the config's `listen`.
    pub fn coordinator(&self, port: u16) -> Proc {
        self.coordinator_by(Command::new(env!("CARGO_BIN_EXE_coordinator")), "127.0.0.1", port)
    }

    /// Starts the coordinator on the network namespace `host`, where it spawns its local
    /// workers; `host`'s address and `port` must be the config's `listen`.
    pub fn coordinator_on(&self, host: &netns::Host, port: u16) -> Proc {
        self.coordinator_by(host.command(env!("CARGO_BIN_EXE_coordinator")), &host.addr, port)
    }

    fn coordinator_by(&self, mut command: Command, host: &str, port: u16) -> Proc {
        let log = self.path().join("coordinator.log");
        command.arg("--config").arg(self.config_path());
        Proc::spawn(command, host, port, log)
    }

    /// Pids of every running process started with this cluster's config: its coordinator and
    /// the workers, spawned or not.
    pub fn processes(&self) -> Vec<u32> {
        processes_with(self.config_path().as_os_str().as_encoded_bytes())
    }
}

/// Pids of every running process whose command line contains `needle`.
pub fn processes_with(needle: &[u8]) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        if cmdline.windows(needle.len()).any(|w| w == needle) && !is_zombie(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Kills whatever a test left running with this cluster's config, such as the workers of a
/// coordinator that the test killed with SIGKILL, so that no process outlives its test.
impl Drop for Cluster {
    fn drop(&mut self) {
        for pid in self.processes() {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
    }
}

/// Whether the process has exited and waits to be reaped.
pub fn is_zombie(pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    matches!(stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()), Some("Z" | "X") | None)
}

/// Whether a process with this pid is running.
pub fn is_running(pid: u32) -> bool {
    !is_zombie(pid)
}

impl Proc {
    /// Waits until the coordinator's `/health` reports `live` live workers.
    pub fn wait_live(&mut self, live: u64) -> &mut Self {
        let client = client();
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the process on port {} exited ({status}):\n{}", self.port, self.log());
            }
            let health: Option<Value> =
                client.get(format!("{}/health", self.url())).send().ok().and_then(|r| r.json().ok());
            if health.is_some_and(|h| h["live_workers"].as_u64() == Some(live)) {
                return self;
            }
            assert!(
                Instant::now() < deadline,
                "port {}: not {live} live workers in {STARTUP:?}:\n{}",
                self.port,
                self.log()
            );
            thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Load on a server: client threads posting batches of ids that never repeat, over a few
/// tenants, until stopped (or, bounded, after `MAX_BATCHES` each), recording per tenant what
/// was sent and what was acknowledged.
pub struct Load {
    pub tenants: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<thread::JoinHandle<Tally>>,
}

/// What a load did: per tenant, ids in acknowledged batches and ids sent at all; every failed
/// request, as text; and, for a marked load, each batch's marker tenant and whether the batch
/// was acknowledged.
#[derive(Debug, Default)]
pub struct Tally {
    pub acked: Vec<u64>,
    pub sent: Vec<u64>,
    pub errors: Vec<String>,
    pub batches: Vec<(String, bool)>,
}

/// How a load's clients behave.
#[derive(Debug, Clone, Copy)]
struct Manner {
    /// Stop at the first failed request.
    stop_on_error: bool,
    /// Add to each batch a marker: id `m` in a tenant of the batch's own, so that a count of
    /// that tenant tells whether the batch was applied, acknowledged or not.
    marked: bool,
    /// The pause between a reply and the next request.
    pause: Duration,
    /// How long a client waits for a reply.
    timeout: Duration,
}

impl Load {
    /// Items per batch; a multiple of the tenant count.
    pub const BATCH: usize = 60;
    /// Batches per client at most, so that a load nobody stops still ends.
    pub const MAX_BATCHES: usize = 20_000;

    /// Starts `clients` threads posting to `url` over the tenants `<prefix>-0..3`. With
    /// `stop_on_error`, a client stops at its first failed request (the server went away);
    /// otherwise it records the failure and goes on.
    pub fn start(url: &str, clients: usize, prefix: &str, stop_on_error: bool) -> Load {
        let manner = Manner { stop_on_error, marked: false, pause: Duration::ZERO, timeout: Duration::from_secs(10) };
        Load::spawn(url, clients, prefix, manner)
    }

    /// Starts `clients` threads that go on through failures, each posting a batch every `pause`
    /// or so, every batch marked (see [`Tally::check_exact`]), waiting up to `timeout` for each
    /// reply.
    pub fn start_marked(url: &str, clients: usize, prefix: &str, pause: Duration, timeout: Duration) -> Load {
        Load::spawn(url, clients, prefix, Manner { stop_on_error: false, marked: true, pause, timeout })
    }

    fn spawn(url: &str, clients: usize, prefix: &str, manner: Manner) -> Load {
        let tenants: Vec<String> = (0..3).map(|t| format!("{prefix}-{t}")).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..clients)
            .map(|c| {
                let (url, tenants, stop) = (url.to_owned(), tenants.clone(), stop.clone());
                let marker = format!("{prefix}~batch-c{c}");
                thread::spawn(move || Load::client(&url, c, &tenants, &marker, &stop, manner))
            })
            .collect();
        Load { tenants, stop, clients }
    }

    fn client(
        url: &str,
        c: usize,
        tenants: &[String],
        marker: &str,
        stop: &std::sync::atomic::AtomicBool,
        manner: Manner,
    ) -> Tally {
        let client = Client::builder().timeout(manner.timeout).build().unwrap();
        let per_tenant = (Load::BATCH / tenants.len()) as u64;
        let mut tally = Tally { acked: vec![0; tenants.len()], sent: vec![0; tenants.len()], ..Tally::default() };
        for b in 0..Load::MAX_BATCHES {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            thread::sleep(manner.pause);
            let mut items: Vec<(String, String)> =
                (0..Load::BATCH).map(|i| (tenants[i % tenants.len()].clone(), format!("c{c}-b{b}-i{i}"))).collect();
            if manner.marked {
                items.push((format!("{marker}-b{b}"), "m".to_owned()));
            }
            let items: Vec<(&str, &str)> = items.iter().map(|(t, id)| (t.as_str(), id.as_str())).collect();
            tally.sent.iter_mut().for_each(|n| *n += per_tenant);
            let reply = client
                .post(format!("{url}/items"))
                .header("content-type", "application/json")
                .body(batch(&items))
                .send();
            let acked = matches!(&reply, Ok(r) if r.status() == StatusCode::OK);
            if manner.marked {
                tally.batches.push((format!("{marker}-b{b}"), acked));
            }
            let failure = match reply {
                Ok(_) if acked => {
                    tally.acked.iter_mut().for_each(|n| *n += per_tenant);
                    continue;
                }
                Ok(r) => format!("{}: {}", r.status(), r.text().unwrap_or_default()),
                Err(e) => e.to_string(),
            };
            tally.errors.push(failure);
            if manner.stop_on_error {
                break;
            }
        }
        tally
    }

    /// Stops the clients and sums what they did.
    pub fn stop(self) -> Tally {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total =
            Tally { acked: vec![0; self.tenants.len()], sent: vec![0; self.tenants.len()], ..Tally::default() };
        for client in self.clients {
            let tally = client.join().unwrap();
            for t in 0..self.tenants.len() {
                total.acked[t] += tally.acked[t];
                total.sent[t] += tally.sent[t];
            }
            total.errors.extend(tally.errors);
            total.batches.extend(tally.batches);
        }
        total
    }
}

impl Tally {
    /// Waits until every tenant at `url` counts every acknowledged id, then checks that none
    /// counts more than was sent (a batch whose reply was lost may or may not count).
    pub fn check_counted(&self, client: &Client, url: &str, tenants: &[String], within: Duration) {
        for (t, tenant) in tenants.iter().enumerate() {
            let acked = self.acked[t];
            eventually(within, &format!("{tenant} counts its {acked} acknowledged ids"), || {
                count(client, url, tenant) >= acked
            });
        }
        for (t, tenant) in tenants.iter().enumerate() {
            let (sent, n) = (self.sent[t], count(client, url, tenant));
            assert!(n <= sent, "{tenant}: {n} counted, but only {sent} sent");
        }
    }

    /// Exact accounting of a marked load: waits until every acknowledged batch is applied (its
    /// marker counts 1) and every tenant counts exactly the ids of the batches applied, whether
    /// acknowledged or not (a batch whose reply was lost may be applied). Returns how many
    /// batches were applied without an acknowledgement.
    pub fn check_exact(&self, client: &Client, url: &str, tenants: &[String], within: Duration) -> usize {
        let per_tenant = (Load::BATCH / tenants.len()) as u64;
        let mut applied = vec![false; self.batches.len()];
        let started = Instant::now();
        loop {
            let before: Vec<u64> = tenants.iter().map(|t| count(client, url, t)).collect();
            // A marker once counted stays counted: only the others are read again.
            for (b, (marker, _)) in self.batches.iter().enumerate() {
                if !applied[b] {
                    applied[b] = count(client, url, marker) == 1;
                }
            }
            let after: Vec<u64> = tenants.iter().map(|t| count(client, url, t)).collect();
            let n = applied.iter().filter(|&&a| a).count() as u64;
            let unapplied = self.batches.iter().zip(&applied).filter(|((_, acked), applied)| *acked && !**applied);
            let unapplied: Vec<&str> = unapplied.map(|((marker, _), _)| marker.as_str()).collect();
            if unapplied.is_empty() && before == after && after.iter().all(|&c| c == n * per_tenant) {
                return self.batches.iter().zip(&applied).filter(|((_, acked), applied)| !acked && **applied).count();
            }
            assert!(
                started.elapsed() < within,
                "not exact within {within:?}: {} acknowledged batches not applied (first {:?}); tenants count \
                 {after:?}, the {n} batches applied hold {} ids each",
                unapplied.len(),
                unapplied.first(),
                n * per_tenant
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Proc {
    /// A coordinator's `/stats` entries of its workers.
    pub fn workers(&self) -> Vec<Value> {
        get_json(&client(), &format!("{}/stats", self.url()))["workers"].as_array().unwrap().clone()
    }

    /// The pid of the worker on `port`, as this coordinator reports it.
    pub fn pid_of(&self, port: u16) -> u32 {
        let entry = self.workers().into_iter().find(|w| w["url"].as_str().unwrap().ends_with(&format!(":{port}")));
        entry.and_then(|w| w["pid"].as_u64()).unwrap_or_else(|| panic!("no pid for the worker on {port}")) as u32
    }
}

/// Kills the process `pid` with SIGKILL.
pub fn sigkill(pid: u32) {
    signal(pid, "KILL");
}

/// Sends the process `pid` the signal named `signal` (`STOP`, `CONT`, ...).
pub fn signal(pid: u32, signal: &str) {
    assert!(Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap().success());
}
