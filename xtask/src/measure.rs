//! What the benchmarks read of the machine while a load runs: CPU time, of one process and of
//! the whole machine, and resident memory, from `/proc`.

use std::fs;

use anyhow::{Context, anyhow};

/// Clock ticks per second, the unit of the CPU times in `/proc`.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system, and has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// A process's CPU time so far, in clock ticks.
#[derive(Debug, Clone, Copy)]
pub struct CpuTicks {
    /// In user mode.
    pub user: u64,
    /// In the kernel, on its behalf.
    pub system: u64,
}

/// The CPU time of the process `pid` so far (`utime` and `stime` of `/proc/<pid>/stat`).
pub fn process_ticks(pid: u32) -> anyhow::Result<CpuTicks> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading pid {pid}'s stat"))?;
    // The fields after the command's name, which is in parentheses and may hold anything: the
    // state is the first of them, utime the 12th and stime the 13th.
    let (_, rest) = stat.rsplit_once(") ").ok_or_else(|| anyhow!("pid {pid}: no command in its stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(|| anyhow!("pid {pid}: no CPU time in its stat"))
    };
    Ok(CpuTicks { user: field(11)?, system: field(12)? })
}

/// The whole machine's busy CPU time so far, every core, in clock ticks: user, nice, system,
/// irq and softirq (not idle, iowait, or the time the hypervisor stole).
pub fn machine_busy_ticks() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().find(|l| l.starts_with("cpu ")).ok_or_else(|| anyhow!("no cpu line in /proc/stat"))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
    Ok(at(0) + at(1) + at(2) + at(5) + at(6))
}

/// The resident memory of the process `pid` in bytes (`VmRSS`), 0 if it is gone.
pub fn resident_bytes(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    kib.unwrap_or(0) * 1024
}

/// `value` rounded to two decimals, as the reports give CPU figures.
pub fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}
