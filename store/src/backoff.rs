//! When to try again something that failed for a reason that may pass (a disk error on one
//! shard, a tenant's file that could not be read), waiting longer after each failure.

use std::time::{Duration, Instant};

/// The time of the next try, and the wait that led to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    next_try: Instant,
    wait: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    /// After a first failure.
    pub(crate) fn new() -> Backoff {
        Backoff { next_try: Instant::now() + Backoff::FIRST, wait: Backoff::FIRST }
    }

    /// After one more failure: twice the last wait, up to a minute.
    pub(crate) fn again(self) -> Backoff {
        let wait = (self.wait * 2).min(Backoff::MAX);
        Backoff { next_try: Instant::now() + wait, wait }
    }

    /// Whether it is time to try again.
    pub(crate) fn due(&self) -> bool {
        Instant::now() >= self.next_try
    }

    /// How long the wait before the next try is.
    pub(crate) fn wait(&self) -> Duration {
        self.wait
    }
}
