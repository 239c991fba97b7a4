//! Real Redis for the tests of `store: redis`: a `redis-server` (or a Redis Cluster of them, or
//! a `valkey-server`, or a server on its TLS port only) on free loopback ports, each in its own temporary directory, killed and reaped when
//! dropped, so that no server outlives a test, even a failed one. Every wait and every
//! `redis-cli` call is bounded in time, so that a Redis that never answers fails the test
//! instead of hanging it.

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::cluster::{STARTUP, free_port};
use crate::netns::Host;
use crate::process::Process;

/// How long one `redis-cli` call may take before the test fails.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// One `redis-server` on 127.0.0.1 (or on a host of a [`crate::netns::Network`]), with an
/// append-only file in its own directory so that a
/// restart after SIGKILL replays what it had acknowledged (`appendfsync everysec` loses only
/// what the OS had not written when the machine, not the process, died).
pub struct RedisServer {
    process: Option<Process>,
    port: u16,
    dir: tempfile::TempDir,
    /// Arguments beyond the harness's own, such as those of a cluster node; kept for restarts.
    extra: Vec<String>,
    /// The network namespace it runs on, if not the test's own.
    on: Option<Host>,
    /// The server binary: `redis-server`, or another that speaks its protocol.
    binary: String,
    /// Whether it keeps an append-only file.
    aof: bool,
    /// The certificates of its TLS port, if it listens on that port alone.
    tls: Option<Certificates>,
}

impl RedisServer {
    /// A standalone server on a free port, answering `PING`.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// A standalone server of `binary` (such as `valkey-server`) on a free port, with or without
    /// its append-only file.
    pub fn start_binary(binary: &str, aof: bool) -> RedisServer {
        RedisServer::launch(binary, aof, None, &[])
    }

    /// A standalone server of `binary` with `extra` arguments (such as `--io-threads 2`).
    pub fn start_binary_with(binary: &str, aof: bool, extra: &[&str]) -> RedisServer {
        RedisServer::launch(binary, aof, None, extra)
    }

    /// A standalone `redis-server` listening on its TLS port alone, with `certificates`' server
    /// certificate, and asking every client for a certificate its authority signed.
    pub fn start_tls(certificates: Certificates) -> RedisServer {
        RedisServer::launch("redis-server", true, Some(certificates), &[])
    }

    fn launch(binary: &str, aof: bool, tls: Option<Certificates>, extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            process: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|&a| a.to_owned()).collect(),
            on: None,
            binary: binary.to_owned(),
            aof,
            tls,
        };
        server.spawn();
        server
    }

    /// A replica of `primary` on a free port, once `primary` counts it among its connected
    /// replicas.
    pub fn start_replica_of(primary: &RedisServer) -> RedisServer {
        let port = primary.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", primary.host(), &port]);
        let deadline = Instant::now() + STARTUP;
        while !primary.cli(&["info", "replication"]).lines().any(|l| l.trim() == "connected_slaves:1") {
            assert!(Instant::now() < deadline, "the replica on {} not connected in {STARTUP:?}", replica.port);
            thread::sleep(Duration::from_millis(25));
        }
        replica
    }

    /// A standalone server on `host`, at its address, answering `PING`.
    pub fn start_on(host: &Host) -> RedisServer {
        RedisServer::start_with_on(&[], Some(host.clone()))
    }

    /// A server on a free port with `extra` arguments, answering `PING`.
    fn start_with(extra: &[&str]) -> RedisServer {
        RedisServer::start_with_on(extra, None)
    }

    fn start_with_on(extra: &[&str], on: Option<Host>) -> RedisServer {
        let mut server = RedisServer {
            process: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|&a| a.to_owned()).collect(),
            on,
            binary: "redis-server".to_owned(),
            aof: true,
            tls: None,
        };
        // Spawned into `server` first, so that a server that never answers is killed by Drop.
        server.spawn();
        server
    }

    /// Starts `redis-server` on this server's port and directory, and waits for its `PONG`.
    fn spawn(&mut self) {
        assert!(self.process.is_none(), "{} on {} is already running", self.binary, self.port);
        let port = self.port.to_string();
        let mut command = match &self.on {
            Some(host) => host.command(&self.binary),
            None => Command::new(&self.binary),
        };
        match &self.tls {
            None => command.args(["--port", &port]),
            Some(tls) => command
                .args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "yes"])
                .arg("--tls-cert-file")
                .arg(tls.file("server.crt"))
                .arg("--tls-key-file")
                .arg(tls.file("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(tls.file("ca.crt")),
        };
        command
            .args(["--bind", self.host(), "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", if self.aof { "yes" } else { "no" }, "--appendfsync", "everysec", "--save", ""])
            .args(&self.extra);
        let name = format!("{} on {}", self.binary, self.port);
        self.process = Some(Process::spawn_logged(command, &name, &self.log_path()));
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = self.process.as_mut().and_then(Process::try_exit) {
                self.process = None;
                panic!("redis-server on {} exited ({status}) before answering:\n{}", self.port, self.log());
            }
            // A server still loading its append-only file answers LOADING, not PONG.
            if self.try_cli(&["ping"]).is_some_and(|out| out.trim() == "PONG") {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server on {} silent for {STARTUP:?}:\n{}", self.port, self.log());
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address it listens on.
    pub fn host(&self) -> &str {
        self.on.as_ref().map_or("127.0.0.1", |host| host.addr.as_str())
    }

    /// The URL a worker's `redis_url` takes: `rediss://` on a TLS port.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://{}:{}", self.host(), self.port)
    }

    /// SIGKILLs the server and reaps it: no shutdown, no final write of its files.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Kills the server if it runs, and starts it again on the same port and directory, so
    /// that it replays its append-only file; returns once it answers `PING`.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The certificates of its TLS port, if it listens on one.
    pub fn certificates(&self) -> Option<&Certificates> {
        self.tls.as_ref()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Process::is_running)
    }

    /// `redis-cli -p <port> args...`: its standard output, asserting it succeeded in time.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = cli(self.host(), self.port, self.tls.as_ref(), args);
        out.unwrap_or_else(|e| panic!("redis-cli -p {} {args:?}: {e}\n{}", self.port, self.log()))
    }

    /// Like [`RedisServer::cli`], but `None` on failure, as when the server is not up yet.
    fn try_cli(&self, args: &[&str]) -> Option<String> {
        cli(self.host(), self.port, self.tls.as_ref(), args).ok()
    }

    /// Every key the server holds, sorted (`--scan`, so that a large store does not block it).
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.cli(&["--scan"]).lines().map(str::to_owned).collect();
        keys.sort();
        keys
    }

    /// `DBSIZE`: how many keys the server (one node, in a cluster) holds.
    pub fn dbsize(&self) -> u64 {
        let out = self.cli(&["dbsize"]);
        out.trim().parse().unwrap_or_else(|_| panic!("DBSIZE on {}: {out:?}", self.port))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// What the server wrote to its log, over all its runs.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(self.log_path()) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

/// A Redis Cluster: masters sharing the 16384 slots, each with its replicas, each node a
/// [`RedisServer`] in cluster mode. Nodes keep their index for the cluster's life, whatever
/// role a failover gives them.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// A node's `cluster-node-timeout` unless a test asks for another: how long a master may be
/// unreachable before it is failed over.
const NODE_TIMEOUT: Duration = Duration::from_millis(2000);

/// What `ROLE` says a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A master, with the ports of the replicas it has.
    Master(Vec<u16>),
    /// A replica of the master on this port, and whether its link to it is up.
    Replica(u16, bool),
}

impl RedisCluster {
    /// `masters` (at least 3, as `redis-cli --cluster create` requires) nodes sharing the 16384
    /// slots, without replicas, once every node reports `cluster_state:ok`.
    pub fn start(masters: usize) -> RedisCluster {
        RedisCluster::start_with_replicas(masters, 0, NODE_TIMEOUT)
    }

    /// `masters` nodes sharing the slots, each with `replicas_per_master` replicas, failed over
    /// once unreachable for `node_timeout`; returned once every node reports
    /// `cluster_state:ok` and every replica's link to its master is up, so that `WAIT` can be
    /// met from the start.
    pub fn start_with_replicas(masters: usize, replicas_per_master: usize, node_timeout: Duration) -> RedisCluster {
        assert!(masters >= 3, "a Redis Cluster needs at least 3 masters, not {masters}");
        let timeout = node_timeout.as_millis().to_string();
        let node_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout"];
        let node_args: Vec<&str> = node_args.into_iter().chain([timeout.as_str()]).collect();
        // Each node joins `cluster.nodes` as soon as it runs, so that a failure later kills it.
        let mut cluster = RedisCluster { nodes: Vec::new() };
        for _ in 0..masters * (1 + replicas_per_master) {
            cluster.nodes.push(RedisServer::start_with(&node_args));
        }
        let addresses: Vec<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let replicas = replicas_per_master.to_string();
        let mut args = vec!["--cluster", "create"];
        args.extend(addresses.iter().map(String::as_str));
        args.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        cluster.nodes[0].cli(&args);
        let deadline = Instant::now() + STARTUP;
        for node in 0..cluster.nodes.len() {
            loop {
                let linked = match cluster.role(node) {
                    Some(Role::Master(_)) => true,
                    Some(Role::Replica(_, up)) => up,
                    None => false,
                };
                if linked && cluster.state_ok(node) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster on {addresses:?} not ok in {STARTUP:?}:\n{}",
                    cluster.nodes[node].log()
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
        let masters_now = cluster.masters().len();
        assert_eq!(masters_now, masters, "redis-cli made {masters_now} masters of {addresses:?}");
        cluster
    }

    /// A seed node's URL, as a worker's `redis_url` takes it with `redis_cluster: true`.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// The nodes, masters and replicas, in the order they were started.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The nodes' ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// What `ROLE` says node `node` is; `None` if it does not answer (killed, say).
    pub fn role(&self, node: usize) -> Option<Role> {
        let out = self.nodes[node].try_cli(&["role"])?;
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        match lines.as_slice() {
            ["master", _offset, replicas @ ..] => {
                // Each replica is listed as its address, port and offset.
                Some(Role::Master(replicas.chunks(3).filter_map(|r| r.get(1)?.parse().ok()).collect()))
            }
            ["slave", _host, port, state, ..] => Some(Role::Replica(port.parse().ok()?, *state == "connected")),
            _ => None,
        }
    }

    /// The indexes of the nodes that answer as masters, those whose data is primary now.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&n| matches!(self.role(n), Some(Role::Master(_)))).collect()
    }

    /// The indexes of the replicas that node `master` says it has; none if it is no master.
    pub fn replicas_of(&self, master: usize) -> Vec<usize> {
        let Some(Role::Master(replicas)) = self.role(master) else { return Vec::new() };
        replicas.iter().filter_map(|&port| self.nodes.iter().position(|node| node.port == port)).collect()
    }

    /// SIGKILLs node `node` and reaps it: no shutdown, no goodbye to the other nodes, which
    /// find out when it stops answering their pings.
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Starts node `node` again, with its cluster config and append-only file; returns once it
    /// answers `PING`. A master that was failed over rejoins as a replica of the one promoted
    /// in its place.
    pub fn restart(&mut self, node: usize) {
        self.nodes[node].restart();
    }

    /// Waits, for at most `within`, until node `replica` answers as a master and every node
    /// still running reports `cluster_state:ok` (all the slots served again), and returns how
    /// long that took.
    pub fn wait_promoted(&mut self, replica: usize, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let running: Vec<usize> = (0..self.nodes.len()).filter(|&n| self.nodes[n].is_running()).collect();
            if matches!(self.role(replica), Some(Role::Master(_))) && running.iter().all(|&n| self.state_ok(n)) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "the replica on {} not promoted within {within:?}:\n{}",
                self.nodes[replica].port,
                self.nodes[replica].log()
            );
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Whether node `node` reports `cluster_state:ok`.
    fn state_ok(&self, node: usize) -> bool {
        self.nodes[node]
            .try_cli(&["cluster", "info"])
            .is_some_and(|info| info.lines().any(|l| l.trim() == "cluster_state:ok"))
    }
}

/// Runs `redis-cli -h <host> -p <port> args...` and returns its standard output, or why it
/// failed: it exited with an error, or did not exit within [`CLI_TIMEOUT`] (then it is killed).
fn cli(host: &str, port: u16, tls: Option<&Certificates>, args: &[&str]) -> Result<String, String> {
    let mut command = Command::new("redis-cli");
    command.args(["-h", host]).arg("-p").arg(port.to_string());
    if let Some(tls) = tls {
        let client = ["--cacert", "ca.crt", "--cert", "client.crt", "--key", "client.key"];
        command.arg("--tls");
        for pair in client.chunks(2) {
            command.arg(pair[0]).arg(tls.file(pair[1]));
        }
    }
    command.args(args);
    let (mut process, pipes) = Process::spawn_piped(command, "redis-cli");
    // No input: redis-cli reads none with its command in its arguments.
    drop(pipes.stdin);
    // Read both pipes on threads, so that a full pipe cannot stall the child while we wait.
    let read = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(pipes.stdout));
    let stderr = read(Box::new(pipes.stderr));
    // Past the deadline, dropping the process kills it, which closes the pipes.
    let Some(status) = process.wait_for_exit(CLI_TIMEOUT) else {
        return Err(format!("no answer in {CLI_TIMEOUT:?}"));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    // redis-cli exits 0 even on a server error reply when its output is not a terminal; such
    // replies start with "ERR", or "(error)" when it formats them.
    let failed_reply = stdout.starts_with("ERR") || stdout.starts_with("(error)") || stdout.starts_with("LOADING");
    if status.success() && !failed_reply && !stdout.starts_with("Could not connect") {
        Ok(stdout)
    } else {
        Err(format!("{status}: {stdout}{stderr}"))
    }
}

/// A certificate authority, a server certificate for 127.0.0.1 and a client certificate, each
/// with its key, made by `openssl` in a temporary directory that lives as long as the value.
pub struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    /// Makes them: RSA keys, valid for a day.
    pub fn make() -> Certificates {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let key = ["-newkey", "rsa:2048", "-nodes"];
        openssl(
            &[
                &["req", "-x509"],
                &key[..],
                &["-days", "1", "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.crt"],
            ]
            .concat(),
        );
        for (name, extension) in [("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")]
        {
            let (csr, crt, ext) = (format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
            let subject = format!("/CN={name}");
            openssl(
                &[&["req"], &key[..], &["-subj", &subject, "-keyout", &format!("{name}.key"), "-out", &csr]].concat(),
            );
            fs::write(dir.path().join(&ext), extension).unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ]);
        }
        Certificates { dir }
    }

    /// The file `name`: `ca.crt`, `server.crt`, `server.key`, `client.crt` or `client.key`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
