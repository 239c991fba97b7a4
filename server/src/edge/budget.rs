//! The bytes of request bodies a server holds at once, over all its connections: a budget
//! shared by every connection, so that many large bodies arriving together push back (a 503 a
//! client retries) instead of growing the process without bound.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The request-body bytes a server holds now; one per process, shared by its server threads.
#[derive(Debug, Default)]
pub struct BodyBudget {
    held: AtomicUsize,
}

impl BodyBudget {
    /// Bytes held now, by every request reading or holding its body.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// An empty hold on the budget, for one request's body.
    pub fn hold(&self) -> Held<'_> {
        Held { budget: self, bytes: 0 }
    }
}

/// The part of a [`BodyBudget`] one request's body holds, given back when dropped.
#[derive(Debug)]
pub struct Held<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
}

impl Held<'_> {
    /// Takes `bytes` more, unless the budget would then exceed `limit`; false, taking nothing,
    /// if it would.
    pub fn take(&mut self, bytes: usize, limit: usize) -> bool {
        let before = self.budget.held.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > limit {
            self.budget.held.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        self.bytes += bytes;
        true
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_add_up_to_the_limit_and_are_given_back_when_dropped() {
        let budget = BodyBudget::default();
        let mut first = budget.hold();
        assert!(first.take(60, 100));
        let mut second = budget.hold();
        assert!(!second.take(41, 100), "past the limit");
        assert_eq!(budget.held(), 60, "a refused take holds nothing");
        assert!(second.take(40, 100));
        drop(first);
        assert_eq!(budget.held(), 40);
        assert!(second.take(60, 100));
        drop(second);
        assert_eq!(budget.held(), 0);
    }
}
