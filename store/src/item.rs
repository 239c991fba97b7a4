//! The unit of ingest: an id counted once per tenant.

use std::borrow::Cow;

/// One item of a batch: `id` is counted once per `tenant`, however often it is appended.
///
/// The strings may borrow from a request body (the worker's parser borrows them where they hold
/// no JSON escapes), so that taking a batch allocates little.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Item<'a> {
    /// The id to count; any non-empty string.
    pub id: Cow<'a, str>,
    /// The tenant whose distinct ids are counted; any non-empty string.
    pub tenant: Cow<'a, str>,
}

impl<'a> Item<'a> {
    /// An item borrowing `tenant` and `id`.
    pub fn new(tenant: &'a str, id: &'a str) -> Self {
        Item { id: Cow::Borrowed(id), tenant: Cow::Borrowed(tenant) }
    }
}
