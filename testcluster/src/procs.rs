//! Processes found in `/proc`, by what they run: those a test did not spawn itself, such as a
//! coordinator's workers, are found and cleaned up this way.

use std::fs;
use std::path::Path;

/// Pids of every running process whose command line contains `needle`: the browser test's
/// chromedriver and Chromium.
#[cfg(feature = "browser")]
pub(crate) fn processes_with(needle: &[u8]) -> Vec<u32> {
    processes_where(|proc_dir| cmdline_has(proc_dir, needle))
}

/// Whether the command line of the process at `proc_dir` contains `needle`.
pub(crate) fn cmdline_has(proc_dir: &Path, needle: &[u8]) -> bool {
    fs::read(proc_dir.join("cmdline")).is_ok_and(|cmdline| cmdline.windows(needle.len()).any(|w| w == needle))
}

/// Pids of every running process whose `/proc/<pid>` directory passes `matches`.
pub(crate) fn processes_where(mut matches: impl FnMut(&Path) -> bool) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if matches(&entry.path()) && is_running(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether a process with this pid is running: it exists, and has not exited to wait for its
/// parent to reap it.
pub fn is_running(pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !matches!(stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()), Some("Z" | "X") | None)
}
