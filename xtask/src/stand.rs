//! What the benchmarks stand up: a fresh cluster of a coordinator and four workers, HAProxy in
//! front of the same workers, and runs of the load tool; every process is the harness's, killed
//! and reaped when dropped, and every wait has a deadline.

use std::fs;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use countapp_testcluster::{Cluster, Node, Process, Signal, binary, client, free_port, get_json};

use crate::is_interrupted;

/// Workers in every benchmark cluster.
pub const WORKERS: usize = 4;

/// How long a cluster gets to stop gracefully (its workers each flush first) before it is
/// killed.
const STOP: Duration = Duration::from_secs(60);

/// A coordinator with [`WORKERS`] local workers in a temporary directory, on free loopback
/// ports. Its directory outlives [`BenchCluster::stop`], until the value is dropped.
pub struct BenchCluster {
    cluster: Cluster,
    coordinator: Option<Node>,
    /// The workers' ports.
    pub workers: Vec<u16>,
}

impl BenchCluster {
    /// Starts a cluster with `fsync: everysec` and the config lines `extra`, once all its
    /// workers are live.
    pub fn start(extra: &str) -> BenchCluster {
        let workers: Vec<u16> = (0..WORKERS).map(|_| free_port()).collect();
        let listen = free_port();
        let cluster = Cluster::new(&workers, &format!("fsync: everysec\nlisten: 127.0.0.1:{listen}\n{extra}"));
        let mut coordinator = cluster.coordinator(listen);
        coordinator.wait_live(WORKERS as u64);
        BenchCluster { cluster, coordinator: Some(coordinator), workers }
    }

    fn coordinator(&self) -> &Node {
        self.coordinator.as_ref().expect("the cluster runs")
    }

    /// The coordinator's URL.
    pub fn url(&self) -> String {
        self.coordinator().url()
    }

    /// The coordinator's pid.
    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator().pid()
    }

    /// The workers' pids, as the coordinator's `/stats` reports them.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.coordinator().workers().iter().filter_map(|w| w["pid"].as_u64()).map(|pid| pid as u32).collect()
    }

    /// The requests the coordinator has forwarded to a worker and got an answer to.
    pub fn forwarded(&self) -> u64 {
        let stats = get_json(&client(), &format!("{}/stats", self.url()));
        stats["cluster"]["requests_forwarded"].as_u64().unwrap_or(0)
    }

    /// The cluster's directory.
    pub fn path(&self) -> &Path {
        self.cluster.path()
    }

    /// Stops the cluster: SIGTERM to the coordinator, which stops its workers (each flushing
    /// first), for at most a minute; past it, SIGKILL to whatever of the cluster still runs.
    pub fn stop(&mut self) {
        let Some(mut coordinator) = self.coordinator.take() else { return };
        // Ctrl-C reaches the coordinator too, which may have stopped already.
        if coordinator.is_running() {
            coordinator.signal(Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP;
        while coordinator.is_running() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        if coordinator.is_running() {
            eprintln!("the coordinator did not stop within {STOP:?}: killing it and its workers");
        }
        drop(coordinator);
        self.cluster.kill_processes();
    }
}

impl Drop for BenchCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// HAProxy as Debian packages it, with its default threads (one per core), in front of the
/// workers on `ports`: random balancing as the coordinator's, keep-alive connections to the
/// workers, reused across client connections.
pub struct HaProxy {
    process: Process,
    port: u16,
}

impl HaProxy {
    /// Starts it with its config and log in `dir`, once it answers.
    pub fn start(dir: &Path, ports: &[u16]) -> anyhow::Result<HaProxy> {
        let port = free_port();
        let mut config = format!(
            "defaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n  timeout client 30s\n  timeout \
             server 30s\nfrontend hop\n  bind 127.0.0.1:{port}\n  default_backend workers\nbackend workers\n  balance \
             random\n  http-reuse always\n"
        );
        for worker in ports {
            config.push_str(&format!("  server w{worker} 127.0.0.1:{worker}\n"));
        }
        let path = dir.join("haproxy.cfg");
        fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let mut command = Command::new("haproxy");
        command.arg("-db").arg("-f").arg(&path);
        let mut haproxy =
            HaProxy { process: Process::spawn_logged(command, "haproxy", &dir.join("haproxy.log")), port };
        let http = client();
        for _ in 0..50 {
            if http.get(format!("{}/health", haproxy.url())).send().is_ok() {
                return Ok(haproxy);
            }
            if !haproxy.process.is_running() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        bail!("haproxy did not start:\n{}", haproxy.process.log())
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops it gracefully, or kills it after 10 s.
    pub fn stop(mut self) {
        if self.process.is_running() {
            self.process.signal(Signal::SIGTERM);
            self.process.wait_for_exit(Duration::from_secs(10));
        }
    }
}

/// Runs the load tool with `args`, its progress on this terminal, for at most `within`; its exit
/// status (0: the check passed, 1: it failed, 2: the run failed).
pub fn load(args: &[String], within: Duration) -> anyhow::Result<ExitStatus> {
    finish_load(start_load(args), within)
}

/// Starts the load tool with `args`, its progress on this terminal, for a run beside another:
/// [`finish_load`] waits for it.
pub fn start_load(args: &[String]) -> Process {
    let mut command = Command::new(binary("countapp-load"));
    command.args(args);
    Process::spawn_inherited(command, "countapp-load")
}

/// Waits for the load tool started as `process` to exit, for at most `within` (counted from
/// now); its exit status, as [`load`]'s.
pub fn finish_load(mut process: Process, within: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        let exited = process.wait_for_exit(Duration::from_millis(200));
        // Ctrl-C reaches the whole process group: the load tool and the cluster stop too.
        if is_interrupted() {
            bail!("interrupted");
        }
        if let Some(status) = exited {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            bail!("countapp-load still running after {within:?}: killed");
        }
    }
}
