//! A cluster's directory and its processes: a temporary directory with a `config.yaml`, the
//! store under `db/`, and the real `coordinator` and `worker` binaries started on it.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::client::worker_url;
use crate::netns::Host;
use crate::node::Node;
use crate::procs::{cmdline_has, processes_where};

/// The token the harness hands the workers it starts itself, for `POST /shutdown`.
pub const TOKEN: &str = "test-shutdown-token";

/// How long a process gets to become ready or to exit before the test fails.
pub const STARTUP: Duration = Duration::from_secs(20);

/// The environment variable naming the directory of the `coordinator` and `worker` binaries,
/// where they are not beside the running program.
const BIN_DIR_ENV: &str = "COUNTAPP_BIN_DIR";

/// The path of the binary `name` (`coordinator`, `worker`, `countapp-load`): in `COUNTAPP_BIN_DIR` if set, else
/// beside the running program, as cargo lays out a target directory: a test runs from
/// `target/<profile>/deps/` and the binaries it tests are in `target/<profile>/`, where the
/// benchmarks' driver runs too.
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("the running program's path");
            let dir = exe.parent().expect("the running program's directory");
            if dir.ends_with("deps") { dir.parent().unwrap().to_owned() } else { dir.to_owned() }
        }
    };
    let path = dir.join(name);
    assert!(path.is_file(), "{} is not built: cargo build --bins (or set {BIN_DIR_ENV})", path.display());
    path
}

/// A port that was free a moment ago on 127.0.0.1, and never handed out before in this process:
/// the kernel may offer a port again as soon as it is released, and a worker on the
/// coordinator's own port could never start.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The config lines of a coordinator on 127.0.0.1:`listen` that checks its workers every 0.5 s,
/// and the keys `more`.
pub fn extra(listen: u16, more: &str) -> String {
    format!("listen: 127.0.0.1:{listen}\nconfig_check: 0.5\n{more}")
}

/// A live coordinator with `workers` local workers, its config holding the keys `more`: the
/// cluster, the workers' ports, the coordinator's, and the coordinator.
pub fn running(workers: usize, more: &str) -> (Cluster, Vec<u16>, u16, Node) {
    let (ports, listen): (Vec<u16>, u16) = ((0..workers).map(|_| free_port()).collect(), free_port());
    let cluster = Cluster::new(&ports, &extra(listen, more));
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(workers as u64);
    (cluster, ports, listen, coordinator)
}

/// A worker started by hand on a free port, ready, its config holding the keys `more`.
pub fn lone_worker(more: &str) -> (Cluster, Node) {
    let port = free_port();
    let cluster = Cluster::new(&[port], more);
    let mut worker = cluster.worker(port);
    worker.wait_ready();
    (cluster, worker)
}

/// What the JSON database at `database` keeps of `tenant`, found by the readable prefix of its
/// name: its file, its directory of segments, its quarantine file.
pub fn tenant_files(database: &Path, tenant: &str) -> Vec<PathBuf> {
    let shards = fs::read_dir(database.join("shards")).unwrap();
    let entries = shards.flatten().flat_map(|shard| fs::read_dir(shard.path()).unwrap().flatten());
    let prefix = format!("{tenant}.");
    let mut found: Vec<PathBuf> = entries
        .filter(|entry| entry.file_name().to_str().is_some_and(|name| name.starts_with(&prefix)))
        .map(|entry| entry.path())
        .collect();
    found.sort();
    found
}

/// A cluster's directory: `config.yaml`, `db/` and the processes' log files. Dropped, it kills
/// every process still running with its config, such as the workers of a coordinator that a
/// test killed with SIGKILL, so that none outlives its test.
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
        let urls: Vec<String> = workers.iter().map(|&port| worker_url(port)).collect();
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

    /// The tenant file of `tenant` (`db/shards/NNN/<name>.<hash>.json`), found by the readable
    /// prefix of its name.
    pub fn tenant_file(&self, tenant: &str) -> PathBuf {
        let mut files = tenant_files(&self.database(), tenant).into_iter();
        files
            .find(|path| path.extension().is_some_and(|e| e == "json"))
            .unwrap_or_else(|| panic!("no tenant file for {tenant}"))
    }

    /// Starts a worker on 127.0.0.1:`port` with this cluster's config.
    pub fn worker(&self, port: u16) -> Node {
        self.worker_at("127.0.0.1", port)
    }

    /// Starts a worker on `host`:`port` with this cluster's config, as its owner would by hand.
    pub fn worker_at(&self, host: &str, port: u16) -> Node {
        self.worker_with_env(host, port, &[])
    }

    /// [`Cluster::worker_at`] with more environment variables, such as `FAILPOINTS`.
    pub fn worker_with_env(&self, host: &str, port: u16, env: &[(&str, &str)]) -> Node {
        self.worker_by(Command::new(binary("worker")), host, port, env)
    }

    /// Starts a worker on the network namespace `host`, at its address, as its owner would by
    /// hand on that machine.
    pub fn worker_on(&self, host: &Host, port: u16) -> Node {
        self.worker_by(host.command(binary("worker")), &host.addr, port, &[])
    }

    /// Runs the worker binary through `command` (the binary itself, or a launcher of it).
    fn worker_by(&self, mut command: Command, host: &str, port: u16, env: &[(&str, &str)]) -> Node {
        command
            .arg(port.to_string())
            .arg("--config")
            .arg(self.config_path())
            .arg("--host")
            .arg(host)
            .env(countapp_shared::spawn::TOKEN_ENV, TOKEN)
            .envs(env.iter().copied());
        Node::spawn(command, host, port, &self.path().join(format!("worker-{port}.log")))
    }

    /// Starts the coordinator with this cluster's config; `port` must be the config's `listen`.
    pub fn coordinator(&self, port: u16) -> Node {
        self.coordinator_with_env(port, &[])
    }

    /// [`Cluster::coordinator`] with more environment variables, such as `HTTP_PROXY`.
    pub fn coordinator_with_env(&self, port: u16, env: &[(&str, &str)]) -> Node {
        let mut command = Command::new(binary("coordinator"));
        command.envs(env.iter().copied());
        self.coordinator_by(command, "127.0.0.1", port)
    }

    /// Starts the coordinator on the network namespace `host`, where it spawns its local
    /// workers; `host`'s address and `port` must be the config's `listen`.
    pub fn coordinator_on(&self, host: &Host, port: u16) -> Node {
        self.coordinator_by(host.command(binary("coordinator")), &host.addr, port)
    }

    /// Starts the coordinator as `make run` does: from the cluster's directory, with the
    /// relative `--config config.yaml`, so that the config's relative paths stay relative.
    pub fn coordinator_in_place(&self, port: u16) -> Node {
        let mut command = Command::new(binary("coordinator"));
        command.current_dir(self.path()).arg("--config").arg("config.yaml");
        Node::spawn(command, "127.0.0.1", port, &self.path().join("coordinator.log"))
    }

    /// [`Cluster::coordinator`] with at most `open_files` descriptors (soft and hard limit),
    /// which its workers inherit.
    pub fn coordinator_with_open_files(&self, port: u16, open_files: u64) -> Node {
        let mut command = Command::new(binary("coordinator"));
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

    fn coordinator_by(&self, mut command: Command, host: &str, port: u16) -> Node {
        command.arg("--config").arg(self.config_path());
        Node::spawn(command, host, port, &self.path().join("coordinator.log"))
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

    /// Kills with SIGKILL every process of [`Cluster::processes`]: what a coordinator stopped
    /// with SIGKILL leaves behind, or a cluster that would not stop.
    pub fn kill_processes(&self) {
        for pid in self.processes() {
            // It may have exited since it was listed.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_processes();
    }
}
