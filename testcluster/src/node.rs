//! A coordinator or a worker: a [`Process`] serving HTTP at its address, and the waits for it to
//! be ready.

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::client::{client, get_json};
use crate::cluster::STARTUP;
use crate::process::Process;

/// A process of the system under test at `host:port`; killed with SIGKILL and reaped when
/// dropped.
pub struct Node {
    process: Process,
    host: String,
    /// The port it serves on.
    pub port: u16,
}

impl Node {
    /// Spawns `command`, which is to serve on `host:port`, with its output in `log`.
    pub fn spawn(command: Command, host: &str, port: u16, log: &Path) -> Node {
        let name = format!("the process on {host}:{port}");
        Node { process: Process::spawn_logged(command, &name, log), host: host.to_owned(), port }
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        self.process.signal(signal);
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Waits for the process to exit by itself, and returns its status; fails with its log if it
    /// still runs after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        self.process.wait_exit(within)
    }

    /// What the process wrote to stdout and stderr.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits until `GET /ready` answers 200.
    pub fn wait_ready(&mut self) -> &mut Self {
        let (http, ready) = (client(), format!("{}/ready", self.url()));
        self.wait_until("ready", || http.get(&ready).send().is_ok_and(|r| r.status().is_success()))
    }

    /// Waits until the coordinator's `/health` reports `live` live workers.
    pub fn wait_live(&mut self, live: u64) -> &mut Self {
        let (http, health) = (client(), format!("{}/health", self.url()));
        self.wait_until(&format!("{live} live workers"), || {
            let health: Option<Value> = http.get(&health).send().ok().and_then(|r| r.json().ok());
            health.is_some_and(|h| h["live_workers"].as_u64() == Some(live))
        })
    }

    /// Polls `check` until it holds, for at most [`STARTUP`]; fails with the log if the process
    /// exits first, or the time passes.
    fn wait_until(&mut self, what: &str, mut check: impl FnMut() -> bool) -> &mut Self {
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = self.process.try_exit() {
                panic!("{} exited ({status}) before {what}:\n{}", self.process.name(), self.log());
            }
            if check() {
                return self;
            }
            assert!(Instant::now() < deadline, "{}: not {what} in {STARTUP:?}:\n{}", self.process.name(), self.log());
            thread::sleep(Duration::from_millis(25));
        }
    }

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
