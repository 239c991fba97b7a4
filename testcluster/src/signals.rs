//! Signals to processes by pid, through `kill(2)`: processes the harness did not spawn itself,
//! such as the workers a coordinator spawned.

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// Sends `signal` to the process `pid`, failing the test if there is no such process.
pub fn send_signal(pid: u32, signal: Signal) {
    let target = Pid::from_raw(i32::try_from(pid).expect("a pid fits an i32"));
    signal::kill(target, signal).unwrap_or_else(|e| panic!("kill -{signal} {pid}: {e}"));
}

/// Kills the process `pid` with SIGKILL.
pub fn sigkill(pid: u32) {
    send_signal(pid, Signal::SIGKILL);
}

/// A process stopped with SIGSTOP, alive but not answering (hung), for as long as the value
/// lives: dropped, even by a failed test, it continues the process with SIGCONT.
pub struct Stopped(u32);

impl Stopped {
    /// Stops the process `pid`.
    pub fn new(pid: u32) -> Stopped {
        send_signal(pid, Signal::SIGSTOP);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // The process may have died meanwhile: then there is nothing to continue.
        let _ = signal::kill(Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}
