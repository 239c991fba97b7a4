//! What a server process sets up once, before it serves: room in its file descriptors for the
//! connections it takes, and a heap that gives the memory of large request bodies back.

/// Connections a server takes at once, over all its threads, however many descriptors it may
/// open: as nginx's and HAProxy's defaults, a bound chosen for memory, not for the kernel.
const MAX_CONNECTIONS: usize = 4096;

/// Allocations at least this large get memory of their own from the kernel, returned when
/// freed. glibc otherwise raises its threshold to the largest block freed, up to 32 MiB, so
/// that after one burst of large bodies the next ones land in its heaps and stay resident.
const OWN_MAPPING_FROM: i32 = 1 << 20;

/// Prepares the process to serve: raises its soft limit of open files to the hard one (as
/// servers commonly do at start; children inherit it), and keeps large allocations out of
/// the heaps so that memory returns after a burst. Returns the limit of open files in force.
pub fn prepare() -> u64 {
    // SAFETY: mallopt only tunes the allocator; a failure leaves its defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING_FROM);
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Connections each of `threads` server threads takes at once, with `open_files` descriptors
/// to the process: half of them at most, the other half left for the process's own files
/// (logs, tenant files, the config's watch) and its connections to workers and Redis. Past
/// it, new connections wait in the listen backlog, and the clients already connected go on
/// being served.
pub fn connections_per_thread(open_files: u64, threads: usize) -> usize {
    let total = usize::try_from(open_files / 2).unwrap_or(usize::MAX).min(MAX_CONNECTIONS);
    (total / threads.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_half_the_descriptors_to_the_process_and_share_the_rest() {
        assert_eq!(connections_per_thread(1024, 1), 512);
        assert_eq!(connections_per_thread(1024, 2), 256);
        assert_eq!(connections_per_thread(1 << 20, 1), MAX_CONNECTIONS);
        assert_eq!(connections_per_thread(1, 4), 1);
    }
}
