//! What happened in the cluster, recorded when it happened (a worker spawned, exited, ready,
//! taken out of routing; a config edit applied or refused), with its real time, in a bounded
//! ring: the dashboard shows the latest of them whether or not anyone was watching then.

use std::collections::VecDeque;
use std::time::SystemTime;

use countapp_shared::config::WorkerUrl;
use countapp_shared::wire::{Event, unix_ms};
use parking_lot::Mutex;

/// Events kept: the last few hundred, a few minutes of a worker crashing in a loop.
const KEPT: usize = 500;

/// The ring of the latest events, oldest first.
#[derive(Debug, Default)]
pub struct Events {
    ring: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Event>,
    /// The number of the next event: a reader that saw an event does not show it twice.
    next_seq: u64,
}

impl Events {
    /// Records that `message` happened now, to `worker` or (for `None`) to the config.
    pub fn record(&self, worker: Option<&WorkerUrl>, message: impl Into<String>) {
        let message = message.into();
        tracing::debug!(worker = worker.map(|w| w.as_str()), message, "cluster event");
        let mut ring = self.ring.lock();
        let seq = ring.next_seq;
        ring.next_seq += 1;
        if ring.events.len() == KEPT {
            ring.events.pop_front();
        }
        let at_unix_ms = unix_ms(SystemTime::now());
        ring.events.push_back(Event { seq, at_unix_ms, worker: worker.map(|w| w.to_string()), message });
    }

    /// The events recorded at `since` (unix ms) or later, oldest first. Those of the very
    /// millisecond `since` are included, since more may have come in that millisecond after a
    /// reader's last look; a reader skips those it has by their `seq`.
    pub fn since(&self, since: u64) -> Vec<Event> {
        self.ring.lock().events.iter().filter(|e| e.at_unix_ms >= since).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_latest_in_order() {
        let events = Events::default();
        for i in 0..KEPT + 10 {
            events.record(None, format!("event {i}"));
        }
        let kept = events.since(0);
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].message, "event 10");
        assert_eq!(kept.last().unwrap().message, format!("event {}", KEPT + 9));
        assert!(kept.windows(2).all(|w| w[0].seq + 1 == w[1].seq && w[0].at_unix_ms <= w[1].at_unix_ms));
        let last = kept.last().unwrap().at_unix_ms;
        assert!(events.since(last + 1).is_empty());
        assert!(!events.since(last).is_empty());
    }
}
