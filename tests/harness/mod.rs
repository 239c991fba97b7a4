//! The one harness of the system tests: real `worker` processes on free loopback ports, each in
//! its own temporary directory with its own `config.yaml`, killed and reaped when dropped, so
//! that no process outlives a test, even a failed one.

#![allow(dead_code)] // Each test file uses a different part of the harness.

pub mod browser;
pub mod fake;
pub mod netns;
pub mod redis;

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
            .env(countapp_shared::spawn::TOKEN_ENV, TOKEN)
            .envs(env.iter().copied());
        Proc::spawn(command, host, port, log)
    }
}

/// A process of the system under test, or beside it; killed with SIGKILL and reaped when
/// dropped.
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

    /// Starts a program that is no part of the system under test (such as `sleep`), its output
    /// appended to `log`.
    pub fn other_program(command: Command, log: PathBuf) -> Proc {
        Proc::spawn(command, "127.0.0.1", 0, log)
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
        send_signal(self.pid(), signal);
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

/// `{url}/items/{tenant}/count`, percent-encoding the tenant.
fn count_url(url: &str, tenant: &str) -> String {
    let tenant: String = tenant
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    format!("{url}/items/{tenant}/count")
}

/// `GET {url}/items/{tenant}/count`, percent-encoding the tenant: the reply, whatever its status.
pub fn count_reply(client: &Client, url: &str, tenant: &str) -> Response {
    client.get(count_url(url, tenant)).send().unwrap()
}

/// The count of `tenant` at `url`, or `None` if it did not answer one (no reply, or a 503 while
/// the store is unreachable): unlike [`count`], a caller polling across an outage can go on.
pub fn try_count(client: &Client, url: &str, tenant: &str) -> Option<u64> {
    let reply = client.get(count_url(url, tenant)).send().ok()?;
    if reply.status() != StatusCode::OK {
        return None;
    }
    reply.json::<Value>().ok()?["count"].as_u64()
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
        self.coordinator_with_env(port, &[])
    }

    /// [`Cluster::coordinator`] with more environment variables, such as `HTTP_PROXY`.
    pub fn coordinator_with_env(&self, port: u16, env: &[(&str, &str)]) -> Proc {
        let mut command = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        command.envs(env.iter().copied());
        self.coordinator_by(command, "127.0.0.1", port)
    }

    /// Starts the coordinator on the network namespace `host`, where it spawns its local
    /// workers; `host`'s address and `port` must be the config's `listen`.
    pub fn coordinator_on(&self, host: &netns::Host, port: u16) -> Proc {
        self.coordinator_by(host.command(env!("CARGO_BIN_EXE_coordinator")), &host.addr, port)
    }

    /// Starts the coordinator as `make run` does: from the cluster's directory, with the
    /// relative `--config config.yaml`, so that the config's relative paths stay relative.
    pub fn coordinator_in_place(&self, port: u16) -> Proc {
        let mut command = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        command.current_dir(self.path()).arg("--config").arg("config.yaml");
        Proc::spawn(command, "127.0.0.1", port, self.path().join("coordinator.log"))
    }

    /// [`Cluster::coordinator`] with at most `open_files` descriptors (soft and hard limit),
    /// which its workers inherit.
    pub fn coordinator_with_open_files(&self, port: u16, open_files: u64) -> Proc {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        let limit = libc::rlimit { rlim_cur: open_files, rlim_max: open_files };
        // SAFETY: setrlimit is async-signal-safe, and `limit` is copied into the closure.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        self.coordinator_by(command, "127.0.0.1", port)
    }

    fn coordinator_by(&self, mut command: Command, host: &str, port: u16) -> Proc {
        let log = self.path().join("coordinator.log");
        command.arg("--config").arg(self.config_path());
        Proc::spawn(command, host, port, log)
    }

    /// Pids of every running process started with this cluster's config, or in its directory:
    /// its coordinator and the workers, spawned or not.
    pub fn processes(&self) -> Vec<u32> {
        let config = self.config_path();
        let needle = config.as_os_str().as_encoded_bytes();
        let dir = self.path().canonicalize().unwrap();
        processes_where(|proc_dir| {
            cmdline_has(proc_dir, needle) || fs::read_link(proc_dir.join("cwd")).is_ok_and(|cwd| cwd == dir)
        })
    }
}

/// The config lines of a coordinator on 127.0.0.1:`listen` that checks its workers every 0.5 s,
/// and the keys `more`.
pub fn extra(listen: u16, more: &str) -> String {
    format!("listen: 127.0.0.1:{listen}\nconfig_check: 0.5\n{more}")
}

/// A live coordinator with `workers` local workers, its config holding the keys `more`: the
/// cluster, the workers' ports, the coordinator's, and the coordinator.
pub fn running(workers: usize, more: &str) -> (Cluster, Vec<u16>, u16, Proc) {
    let (ports, listen): (Vec<u16>, u16) = ((0..workers).map(|_| free_port()).collect(), free_port());
    let cluster = Cluster::new(&ports, &extra(listen, more));
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(workers as u64);
    (cluster, ports, listen, coordinator)
}

/// A worker started by hand on a free port, ready, its config holding the keys `more`.
pub fn lone_worker(more: &str) -> (Cluster, Proc) {
    let port = free_port();
    let cluster = Cluster::new(&[port], more);
    let mut worker = cluster.worker(port);
    worker.wait_ready();
    (cluster, worker)
}

/// Pids of every running process whose command line contains `needle`.
pub fn processes_with(needle: &[u8]) -> Vec<u32> {
    processes_where(|proc_dir| cmdline_has(proc_dir, needle))
}

/// Whether the command line of the process at `proc_dir` contains `needle`.
fn cmdline_has(proc_dir: &Path, needle: &[u8]) -> bool {
    fs::read(proc_dir.join("cmdline")).is_ok_and(|cmdline| cmdline.windows(needle.len()).any(|w| w == needle))
}

/// Pids of every running process whose `/proc/<pid>` directory passes `matches`.
fn processes_where(mut matches: impl FnMut(&Path) -> bool) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if matches(&entry.path()) && !is_zombie(pid) {
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

/// The `/stats` of the process at `url`.
pub fn stats(url: &str) -> Value {
    get_json(&client(), &format!("{url}/stats"))
}

/// The URL of the worker on 127.0.0.1:`port`.
pub fn worker_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The worker of `ports` whose `/stats` lists `tenant` in quarantine, once one does.
pub fn eventually_owner(ports: &[u16], tenant: &str, within: Duration) -> u16 {
    let mut owner = None;
    eventually(within, &format!("a worker shows {tenant} in quarantine"), || {
        owner = ports.iter().copied().find(|&port| {
            stats(&worker_url(port))["quarantined"].as_array().is_some_and(|q| q.iter().any(|t| t["tenant"] == tenant))
        });
        owner.is_some()
    });
    owner.unwrap()
}

/// The tenant file of `tenant` (`db/shards/NNN/<name>.<hash>.json`), found by the readable
/// prefix of its name.
pub fn tenant_file(cluster: &Cluster, tenant: &str) -> PathBuf {
    let shards = fs::read_dir(cluster.database().join("shards")).unwrap();
    let mut found = shards.flatten().flat_map(|shard| fs::read_dir(shard.path()).unwrap().flatten()).filter(|entry| {
        let name = entry.file_name().into_string().unwrap();
        name.starts_with(&format!("{tenant}.")) && name.ends_with(".json")
    });
    found.next().unwrap_or_else(|| panic!("no tenant file for {tenant}")).path()
}

/// Posts ids `<tenant>-<i>` for `i` in `from..to` of `tenant` to `url`, in batches of 50, each
/// acknowledged.
pub fn post_range(url: &str, tenant: &str, from: usize, to: usize) {
    let client = client();
    let ids: Vec<String> = (from..to).map(|i| format!("{tenant}-{i}")).collect();
    for chunk in ids.chunks(50) {
        let items: Vec<(&str, &str)> = chunk.iter().map(|id| (tenant, id.as_str())).collect();
        assert_eq!(post(&client, url, batch(&items)).status(), StatusCode::OK);
    }
}

/// Load on a server: client threads posting batches of fresh ids (never in another batch) over
/// a few tenants, until stopped (or, bounded, after `MAX_BATCHES` each), recording which batches
/// were acknowledged.
///
/// Each batch also carries marker ids, so that [`Tally::check_counted`] can read back whether
/// the server applied it, acknowledged or not: batch `seq` of client `c` puts 2^(`seq` %
/// [`Load::GROUP`]) ids of its own in the marker tenant `<prefix>~batches-<c>-<seq / GROUP>`.
/// Batches are all-or-nothing, so that tenant's count is the sum of the powers of two of its
/// group's batches that were applied: a bitmask naming each of them, at one marker tenant per
/// [`Load::GROUP`] batches (each a tenant the server stores, and the check reads, on its own).
pub struct Load {
    /// The data tenants, `<prefix>-0..3`.
    pub tenants: Vec<String>,
    prefix: String,
    stop: Arc<AtomicBool>,
    clients: Vec<thread::JoinHandle<Tally>>,
}

/// One batch a load sent: which client sent it, its sequence number there, and whether the
/// server acknowledged it (200).
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// The client thread, from 0.
    pub client: usize,
    /// The batch's number among that client's, from 0.
    pub seq: usize,
    /// Whether the server answered 200.
    pub acked: bool,
}

impl Sent {
    /// The batch's group of [`Load::GROUP`], whose marker tenant it shares.
    fn group(&self) -> (usize, usize) {
        (self.client, self.seq / Load::GROUP)
    }

    /// The batch's bit in its group's marker count.
    fn bit(&self) -> u64 {
        1 << (self.seq % Load::GROUP)
    }
}

/// What a load did: every batch it sent, and every failed request, as text.
#[derive(Debug, Default)]
pub struct Tally {
    /// The data tenants, `<prefix>-0..3`; each batch has [`Load::PER_TENANT`] ids in each.
    pub tenants: Vec<String>,
    prefix: String,
    /// Every batch sent, acknowledged or not.
    pub batches: Vec<Sent>,
    /// Every failed request, as text.
    pub errors: Vec<String>,
}

/// How the clients of a [`Load`] post.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// Stop at the first failed request (the server went away).
    stop_on_error: bool,
    /// The pause before each batch.
    pause: Duration,
    /// How long a client waits for a reply.
    timeout: Duration,
    /// Each batch also puts an id in a tenant of its own, so that the merges make a tenant
    /// file for every batch, as `countapp-load --exact` has them do.
    tenant_per_batch: bool,
}

/// Times a client of a [`Load`] sends a batch a server pushed back (503 with Retry-After).
const PUSHBACK_RETRIES: usize = 10;

/// Threads that read counts at once while checking: a few hundred markers in well under a
/// second.
const READERS: usize = 8;

impl Load {
    /// Data items per batch; a multiple of the tenant count.
    pub const BATCH: usize = 150;
    /// Data tenants.
    pub const TENANTS: usize = 3;
    /// Ids per data tenant in each batch.
    pub const PER_TENANT: u64 = (Load::BATCH / Load::TENANTS) as u64;
    /// Batches of a client that share a marker tenant: 8 adds 32 marker ids to a batch on
    /// average, and makes 8 times fewer tenants than a marker tenant per batch.
    pub const GROUP: usize = 8;
    /// Batches per client at most, so that a load nobody stops still ends.
    pub const MAX_BATCHES: usize = 20_000;

    /// Starts `clients` threads posting to `url` over the tenants `<prefix>-0..3`. With
    /// `stop_on_error`, a client stops at its first failed request (the server went away);
    /// otherwise it records the failure and goes on.
    pub fn start(url: &str, clients: usize, prefix: &str, stop_on_error: bool) -> Load {
        Load::spawn(
            url,
            clients,
            prefix,
            Pace { stop_on_error, pause: Duration::ZERO, timeout: Duration::from_secs(10), tenant_per_batch: false },
        )
    }

    /// [`Load::start`], going on through failures, with a new tenant in every batch besides
    /// the data tenants: the load under which merging works hardest.
    pub fn start_tenant_per_batch(url: &str, clients: usize, prefix: &str) -> Load {
        let pace = Pace {
            stop_on_error: false,
            pause: Duration::ZERO,
            timeout: Duration::from_secs(10),
            tenant_per_batch: true,
        };
        Load::spawn(url, clients, prefix, pace)
    }

    /// Starts `clients` threads that go on through failures, each posting a batch every `pause`
    /// or so and waiting up to `timeout` for each reply: a load that outlasts network cuts.
    pub fn start_paced(url: &str, clients: usize, prefix: &str, pause: Duration, timeout: Duration) -> Load {
        Load::spawn(url, clients, prefix, Pace { stop_on_error: false, pause, timeout, tenant_per_batch: false })
    }

    fn spawn(url: &str, clients: usize, prefix: &str, pace: Pace) -> Load {
        let tenants: Vec<String> = (0..Load::TENANTS).map(|t| format!("{prefix}-{t}")).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|c| {
                let (url, prefix, stop) = (url.to_owned(), prefix.to_owned(), stop.clone());
                thread::spawn(move || Load::client(&url, c, &prefix, &stop, pace))
            })
            .collect();
        Load { tenants, prefix: prefix.to_owned(), stop, clients }
    }

    fn client(url: &str, c: usize, prefix: &str, stop: &AtomicBool, pace: Pace) -> Tally {
        let client = Client::builder().timeout(pace.timeout).build().unwrap();
        let mut tally = Tally::default();
        for seq in 0..Load::MAX_BATCHES {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            thread::sleep(pace.pause);
            let sent = Sent { client: c, seq, acked: false };
            let mut items: Vec<(String, String)> = (0..Load::BATCH)
                .map(|i| (format!("{prefix}-{}", i % Load::TENANTS), format!("c{c}-b{seq}-i{i}")))
                .collect();
            let marker = marker(prefix, sent.group());
            items.extend((0..sent.bit()).map(|k| (marker.clone(), format!("b{seq}-{k}"))));
            if pace.tenant_per_batch {
                items.push((format!("{prefix}~tenant-{c}-{seq}"), "1".to_owned()));
            }
            let items: Vec<(&str, &str)> = items.iter().map(|(t, id)| (t.as_str(), id.as_str())).collect();
            let body = batch(&items);
            let failure = post_retrying(&client, url, &body).err();
            tally.batches.push(Sent { acked: failure.is_none(), ..sent });
            if let Some(failure) = failure {
                tally.errors.push(failure);
                if pace.stop_on_error {
                    break;
                }
            }
        }
        tally
    }

    /// Stops the clients and gathers what they did.
    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally { tenants: self.tenants, prefix: self.prefix, ..Tally::default() };
        for client in self.clients {
            let tally = client.join().unwrap();
            total.batches.extend(tally.batches);
            total.errors.extend(tally.errors);
        }
        total
    }
}

/// `POST {url}/items` with `body`, as any well-behaved client does it: a server pushing back
/// under load (503 with Retry-After) is asked again when it says, up to a few times (the
/// refused batch was stored nowhere, and sending it again is idempotent anyway). `Err` is why
/// it was not acknowledged: a batch still pushed back after those tries starts with
/// [`PUSHED_BACK`].
fn post_retrying(client: &Client, url: &str, body: &str) -> Result<(), String> {
    let mut failure = String::new();
    for _ in 0..PUSHBACK_RETRIES {
        let reply =
            client.post(format!("{url}/items")).header("content-type", "application/json").body(body.to_owned()).send();
        match reply {
            Ok(r) if r.status() == StatusCode::OK => return Ok(()),
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE && r.headers().contains_key("retry-after") => {
                let after = r.headers()["retry-after"].to_str().ok().and_then(|v| v.parse().ok()).unwrap_or(1);
                failure = format!("{}: {}", r.status(), r.text().unwrap_or_default());
                thread::sleep(Duration::from_secs(after).min(Duration::from_secs(1)));
            }
            Ok(r) => return Err(format!("{}: {}", r.status(), r.text().unwrap_or_default())),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("{PUSHED_BACK} {PUSHBACK_RETRIES} times, last: {failure}"))
}

/// How the failure of a batch that the server kept pushing back begins.
pub const PUSHED_BACK: &str = "pushed back";

/// The marker tenant of a group of batches, (client, group): `~` keeps it apart from the data
/// tenants.
fn marker(prefix: &str, (client, group): (usize, usize)) -> String {
    format!("{prefix}~batches-{client}-{group}")
}

/// How a load's batches fared, once accounted for: every acknowledged one was applied, and of
/// the unacknowledged ones (whose reply never came), `applied` were applied anyway.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Accounting {
    /// Acknowledged batches, each counted.
    pub acked: usize,
    /// Unacknowledged batches.
    pub unacked: usize,
    /// Unacknowledged batches that were applied all the same.
    pub applied: usize,
}

impl std::fmt::Display for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Accounting { acked, unacked, applied } = self;
        write!(f, "{acked} acknowledged batches all counted; of {unacked} unacknowledged, {applied} applied")
    }
}

/// The batches that share a marker tenant: the group, and the indexes of its batches in
/// [`Tally::batches`].
struct Group {
    id: (usize, usize),
    batches: Vec<usize>,
}

impl Tally {
    /// The batches the server acknowledged.
    pub fn acked_batches(&self) -> usize {
        self.batches.iter().filter(|b| b.acked).count()
    }

    /// Accounts for every batch exactly at `url`, polling for at most `within` until it holds:
    /// every acknowledged batch is applied by its marker (else that batch was LOST, and is
    /// named), and each data tenant counts exactly the ids of the batches applied, acknowledged
    /// or not (else items were lost or invented there). A count that is not answered (such as a
    /// 503 while a store is down) is read again on the next poll.
    pub fn check_counted(&self, client: &Client, url: &str, within: Duration) -> Accounting {
        let mut groups: Vec<Group> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for (b, sent) in self.batches.iter().enumerate() {
            let g = *index.entry(sent.group()).or_insert_with(|| {
                groups.push(Group { id: sent.group(), batches: Vec::new() });
                groups.len() - 1
            });
            groups[g].batches.push(b);
        }
        let markers: Vec<String> = groups.iter().map(|group| marker(&self.prefix, group.id)).collect();
        let deadline = Instant::now() + within;
        // The markers are read once the data tenants hold at least the acknowledged ids, rather
        // than on every poll while the server is still merging.
        let acked = self.acked_batches() as u64 * Load::PER_TENANT;
        while Instant::now() < deadline {
            let counts = try_counts(client, url, self.tenants.iter().map(String::as_str));
            if counts.iter().all(|n| n.is_some_and(|n| n >= acked)) {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let mut marks: Vec<Option<u64>> = vec![None; groups.len()];
        // A group of acknowledged batches seen all applied stays so: only the others are read
        // again.
        let mut settled = vec![false; groups.len()];
        loop {
            let unsettled: Vec<usize> = (0..groups.len()).filter(|&g| !settled[g]).collect();
            let read = try_counts(client, url, unsettled.iter().map(|&g| markers[g].as_str()));
            for (&g, count) in unsettled.iter().zip(read) {
                marks[g] = count;
                let batches = groups[g].batches.iter().map(|&b| self.batches[b]);
                settled[g] = batches.clone().all(|b| b.acked) && count == Some(batches.map(|b| b.bit()).sum());
            }
            let counts = try_counts(client, url, self.tenants.iter().map(String::as_str));
            let fates = self.fates(&groups, &marks, &counts);
            if fates.exact() {
                return fates.accounting;
            }
            assert!(Instant::now() < deadline, "{url}: the load is not accounted for within {within:?}:\n{fates}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Judges one reading of the markers and data tenants.
    fn fates<'t>(&'t self, groups: &[Group], marks: &[Option<u64>], counts: &[Option<u64>]) -> Fates<'t> {
        let mut fates = Fates {
            tally: self,
            accounting: Accounting::default(),
            lost: Vec::new(),
            invented: Vec::new(),
            unread: 0,
            tenants: Vec::new(),
        };
        for (group, &mark) in groups.iter().zip(marks) {
            let Some(mark) = mark else {
                fates.unread += group.batches.len();
                continue;
            };
            let sent: u64 = group.batches.iter().map(|&b| self.batches[b].bit()).sum();
            if mark & !sent != 0 {
                fates.invented.push((marker(&self.prefix, group.id), mark));
            }
            for sent in group.batches.iter().map(|&b| self.batches[b]) {
                match (sent.acked, mark & sent.bit() != 0) {
                    (true, true) => fates.accounting.acked += 1,
                    (true, false) => fates.lost.push(sent),
                    (false, true) => fates.accounting.applied += 1,
                    (false, false) => {}
                }
            }
        }
        fates.accounting.unacked = self.batches.len() - self.acked_batches();
        let applied = (self.acked_batches() + fates.accounting.applied) as u64;
        fates.tenants =
            self.tenants.iter().zip(counts).map(|(t, &n)| (t.as_str(), n, applied * Load::PER_TENANT)).collect();
        fates
    }
}

/// One reading of a load's fate: what is off, if anything.
#[derive(Debug)]
struct Fates<'t> {
    tally: &'t Tally,
    accounting: Accounting,
    /// Acknowledged batches that their marker says were not applied.
    lost: Vec<Sent>,
    /// Marker tenants, with their count, that count ids of batches never sent.
    invented: Vec<(String, u64)>,
    /// Batches whose marker's count was not answered.
    unread: usize,
    /// Per data tenant: its name, its count if answered, and the ids of the batches applied.
    tenants: Vec<(&'t str, Option<u64>, u64)>,
}

impl Fates<'_> {
    fn exact(&self) -> bool {
        let tenants_exact = self.tenants.iter().all(|&(_, n, expected)| n == Some(expected));
        self.lost.is_empty() && self.invented.is_empty() && self.unread == 0 && tenants_exact
    }
}

impl std::fmt::Display for Fates<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        /// Batches named in full; the rest are only counted.
        const NAMED: usize = 20;
        let Accounting { acked, unacked, applied } = self.accounting;
        writeln!(
            f,
            "{} batches sent: {acked} acknowledged and applied; of {unacked} unacknowledged, {applied} applied",
            self.tally.batches.len()
        )?;
        if !self.lost.is_empty() {
            let named: Vec<String> =
                self.lost.iter().take(NAMED).map(|b| format!("client {} batch {}", b.client, b.seq)).collect();
            let more = self.lost.len().saturating_sub(NAMED);
            let more = if more > 0 { format!(" and {more} more") } else { String::new() };
            let tenants = self.tally.tenants.join(", ");
            writeln!(
                f,
                "LOST {} acknowledged batches, each {} ids in each of {tenants}: {}{more}",
                self.lost.len(),
                Load::PER_TENANT,
                named.join(", ")
            )?;
        }
        for (marker, count) in &self.invented {
            writeln!(f, "INVENTED: marker {marker} counts {count}, ids of batches never sent")?;
        }
        if self.unread > 0 {
            writeln!(f, "{} batches' markers not answered", self.unread)?;
        }
        for &(tenant, n, expected) in &self.tenants {
            let off = match n {
                None => "no count answered".to_owned(),
                Some(n) if n < expected => format!("counts {n}: {} LOST", expected - n),
                Some(n) if n > expected => format!("counts {n}: {} INVENTED", n - expected),
                Some(n) => format!("counts {n}"),
            };
            writeln!(f, "{tenant}: the batches applied hold {expected} ids; {off}")?;
        }
        Ok(())
    }
}

/// The counts of `tenants` at `url`, read by a few threads at once, in order; `None` where no
/// count was answered.
pub fn try_counts<'a>(client: &Client, url: &str, tenants: impl Iterator<Item = &'a str>) -> Vec<Option<u64>> {
    let tenants: Vec<&str> = tenants.collect();
    let next = AtomicUsize::new(0);
    let mut counts = vec![None; tenants.len()];
    thread::scope(|scope| {
        let readers: Vec<_> = (0..READERS.min(tenants.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut read = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(tenant) = tenants.get(i) else { return read };
                        read.push((i, try_count(client, url, tenant)));
                    }
                })
            })
            .collect();
        for reader in readers {
            for (i, count) in reader.join().unwrap() {
                counts[i] = count;
            }
        }
    });
    counts
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

/// Sends `signal` (such as `"TERM"`) to the process `pid`.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Kills the process `pid` with SIGKILL.
pub fn sigkill(pid: u32) {
    send_signal(pid, "KILL");
}

/// A process stopped with SIGSTOP, alive but not answering (hung), for as long as the value
/// lives: dropped, even by a failed test, it continues the process with SIGCONT.
pub struct Stopped(u32);

impl Stopped {
    /// Stops the process `pid`.
    pub fn new(pid: u32) -> Stopped {
        send_signal(pid, "STOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-CONT").arg(self.0.to_string()).status();
    }
}

/// Makes `dir` immutable (`chattr +i`), so that nothing, not even root, can create a file in
/// it, for as long as the value lives.
pub struct Immutable<'a>(&'a std::path::Path);

impl<'a> Immutable<'a> {
    pub fn new(dir: &'a std::path::Path) -> Self {
        let status = Command::new("chattr").arg("+i").arg(dir).status().unwrap();
        assert!(status.success(), "chattr +i {}", dir.display());
        Immutable(dir)
    }
}

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(self.0).status();
    }
}

/// `GET {url}{path}` with `path` sent byte for byte, as HTTP/1.1 over a plain socket: reqwest and
/// the `url` crate remove dot segments (`/./`, `/%2E%2E/`) from a path before sending it. Returns
/// the status and the body.
pub fn raw_get(url: &str, path: &str) -> (u16, String) {
    let authority = url.strip_prefix("http://").expect("an http:// URL");
    raw(url, &format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"))
}

/// Sends `request` to `url` byte for byte, as a client that builds its requests by hand (or
/// lies in them) would, and reads the reply until the server closes the connection or 10 s
/// pass. Returns the status and the body.
pub fn raw(url: &str, request: &str) -> (u16, String) {
    use std::io::Write;
    let authority = url.strip_prefix("http://").expect("an http:// URL");
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    let line = request.lines().next().unwrap_or_default();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{line}: no reply head in {reply:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
    (status.unwrap_or_else(|| panic!("{line}: no status in {head:?}")), body.to_owned())
}
