//! A child process that cannot outlive its owner: killed with SIGKILL and reaped when dropped,
//! even by a failed test, and waited for only up to a deadline.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::signals::send_signal;

/// How often a wait looks whether the process has exited.
const POLL: Duration = Duration::from_millis(10);

/// A running child, named for the messages that mention it, and the file its output goes to,
/// if it has one. Dropped, it is killed and reaped: no process of a test outlives it.
pub struct Process {
    child: Option<Child>,
    name: String,
    log: Option<PathBuf>,
}

/// The standard streams of a [`Process`] spawned with pipes, for its owner to talk to it.
pub struct Pipes {
    /// Its standard input.
    pub stdin: ChildStdin,
    /// Its standard output.
    pub stdout: ChildStdout,
    /// Its standard error.
    pub stderr: ChildStderr,
}

impl Process {
    /// Spawns `command` with no input and its output (stdout and stderr) appended to `log`,
    /// which [`Process::log`] reads back for the failure messages.
    pub fn spawn_logged(mut command: Command, name: &str, log: &Path) -> Process {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        command.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
        Process::start(command, name, Some(log.to_owned()))
    }

    /// Spawns `command` with its output on this process's terminal: for a tool whose progress
    /// its user watches, such as the load tool under the benchmarks.
    pub fn spawn_inherited(mut command: Command, name: &str) -> Process {
        command.stdin(Stdio::null());
        Process::start(command, name, None)
    }

    /// Spawns `command` with its three streams piped to the caller, who takes them at once.
    pub fn spawn_piped(mut command: Command, name: &str) -> (Process, Pipes) {
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut process = Process::start(command, name, None);
        let child = process.child.as_mut().unwrap();
        let pipes = Pipes {
            stdin: child.stdin.take().unwrap(),
            stdout: child.stdout.take().unwrap(),
            stderr: child.stderr.take().unwrap(),
        };
        (process, pipes)
    }

    fn start(mut command: Command, name: &str, log: Option<PathBuf>) -> Process {
        let child =
            command.spawn().unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", command.get_program()));
        Process { child: Some(child), name: name.to_owned(), log }
    }

    /// The name it was given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap_or_else(|| panic!("{} was already reaped", self.name)).id()
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().unwrap_or_else(|e| panic!("polling {}: {e}", self.name))?;
        self.child = None;
        Some(status)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_exit().is_none()
    }

    /// Waits for it to exit by itself, for at most `within`: its status, or `None` if it still
    /// runs then.
    pub fn wait_for_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// [`Process::wait_for_exit`], failing with its log if it still runs after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        assert!(self.child.is_some(), "{} was already reaped", self.name);
        self.wait_for_exit(within)
            .unwrap_or_else(|| panic!("{} still running after {within:?}:\n{}", self.name, self.log()))
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: Signal) {
        send_signal(self.pid(), signal);
    }

    /// SIGKILLs it and reaps it; nothing if it was reaped already.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What it wrote to its log so far; empty for a process without one.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|log| fs::read(log).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
