//! Counts read lately from a server, kept for a moment so that many reads of the same tenants
//! cost the server one round trip: a dashboard polling a tenant, or a client reading the same
//! few tenants thousands of times a second, would otherwise spend a server round trip (and the
//! server's CPU, which ingest needs) on each.
//!
//! An eventual count may be a moment old anyway: a count kept here is at most [`FRESH_FOR`] older
//! than a read from the server, well within what eventual reads promise (`worker_persist` and a
//! couple of seconds). What must see everything at once forgets them all ([`Recent::forget`]):
//! this worker's own merge, and a barrier that passed, so that a strong read, a batch posted
//! with `wait=counted` and a delete are never answered by a count read before them. A read that
//! was on its way while they were forgotten is not kept, since it may predate what made them
//! stale.

use std::time::{Duration, Instant};

use hashbrown::HashMap;
use parking_lot::Mutex;

/// How long a count read from the server answers the same tenant's counts.
pub(crate) const FRESH_FOR: Duration = Duration::from_millis(50);

/// The most tenants kept: about 100 bytes each, so a few megabytes at most, whatever the number
/// of tenants read.
const MOST: usize = 32_768;

/// The counts read lately, each with when its read was sent.
#[derive(Default)]
pub(crate) struct Recent {
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    /// Bumped by each [`Recent::forget`]: a read sent under an earlier one is not kept.
    generation: u64,
    counts: HashMap<String, (u64, Instant)>,
}

/// A read on its way to the server, as [`Recent::sent`] notes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sent {
    generation: u64,
    at: Instant,
}

impl Recent {
    /// The tenant's count, if one read less than [`FRESH_FOR`] ago is kept.
    pub(crate) fn count(&self, tenant: &str) -> Option<u64> {
        let kept = self.kept.lock();
        kept.counts.get(tenant).filter(|(_, at)| at.elapsed() < FRESH_FOR).map(|(count, _)| *count)
    }

    /// Notes that a read is sent now, to keep its answers with [`Recent::keep`].
    pub(crate) fn sent(&self) -> Sent {
        Sent { generation: self.kept.lock().generation, at: Instant::now() }
    }

    /// Keeps the counts a read noted by `sent` answered, unless they were forgotten since it was
    /// sent. Past [`MOST`] tenants, the stale ones make room, and new ones are not kept while
    /// there is none.
    pub(crate) fn keep<'a>(&self, sent: Sent, counts: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut kept = self.kept.lock();
        if kept.generation != sent.generation {
            return;
        }
        let mut full = false;
        for (tenant, count) in counts {
            if let Some(known) = kept.counts.get_mut(tenant) {
                *known = (count, sent.at);
                continue;
            }
            if kept.counts.len() >= MOST && !full {
                kept.counts.retain(|_, (_, at)| at.elapsed() < FRESH_FOR);
                full = kept.counts.len() >= MOST;
            }
            if !full {
                kept.counts.insert(tenant.to_owned(), (count, sent.at));
            }
        }
    }

    /// Forgets every count kept, and every read on its way: from now on, a count is read from
    /// the server.
    pub(crate) fn forget(&self) {
        let mut kept = self.kept.lock();
        kept.generation += 1;
        kept.counts.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    #[test]
    fn a_count_read_lately_answers_until_it_is_stale() {
        let recent = Recent::default();
        assert_eq!(recent.count("t"), None);
        recent.keep(recent.sent(), [("t", 3)]);
        assert_eq!(recent.count("t"), Some(3));
        assert_eq!(recent.count("u"), None);
        thread::sleep(FRESH_FOR);
        assert_eq!(recent.count("t"), None);
    }

    #[test]
    fn a_read_sent_before_counts_were_forgotten_is_not_kept() {
        let recent = Recent::default();
        recent.keep(recent.sent(), [("t", 3)]);
        let on_its_way = recent.sent();
        recent.forget();
        assert_eq!(recent.count("t"), None);
        recent.keep(on_its_way, [("t", 3)]);
        assert_eq!(recent.count("t"), None);
        recent.keep(recent.sent(), [("t", 4)]);
        assert_eq!(recent.count("t"), Some(4));
    }

    #[test]
    fn no_more_than_the_most_tenants_are_kept() {
        let recent = Recent::default();
        // Read at an instant that stays fresh, however slow this test runs.
        let later = Instant::now() + Duration::from_secs(3600);
        recent.kept.lock().counts.extend((0..MOST).map(|i| (format!("t{i}"), (1, later))));
        recent.keep(recent.sent(), [("new", 2), ("t0", 3)]);
        assert_eq!(recent.count("new"), None);
        assert_eq!(recent.count("t0"), Some(3));
        assert_eq!(recent.kept.lock().counts.len(), MOST);
        // Stale ones make room.
        recent.kept.lock().counts.values_mut().take(10).for_each(|(_, at)| *at = Instant::now() - FRESH_FOR);
        recent.keep(recent.sent(), [("new", 2)]);
        assert_eq!(recent.count("new"), Some(2));
        assert_eq!(recent.kept.lock().counts.len(), MOST - 9);
    }
}
