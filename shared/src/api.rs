//! The JSON bodies of the HTTP API's replies, shared so that the coordinator, the workers and
//! the tests cannot drift apart on a field name.

use serde::{Deserialize, Serialize};

/// The reply to an accepted `POST /items`: `{"accepted": N}`, sent once the batch is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// How many items the batch held, duplicates included.
    pub accepted: usize,
}

/// The reply to `GET /items/{tenant}/count`: `{"count": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    /// The number of distinct ids posted for the tenant; 0 for a tenant never posted to.
    pub count: u64,
}

/// The reply to `POST /items/{tenant}/contains`: `{"contains": [true, false, ...]}`, one answer
/// per id asked, in their order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contains {
    /// Whether each id asked is in the tenant's set.
    pub contains: Vec<bool>,
}

/// The reply to `POST /counts`: `{"counts": {"t1": N, ...}}`, every tenant asked, 0 for one
/// never posted to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Each tenant's count.
    pub counts: std::collections::BTreeMap<String, u64>,
}

/// The reply to `DELETE /items/{tenant}`: `{"deleted": true}`, once every id acknowledged before
/// the request is gone for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// Always `true` in a `200`.
    pub deleted: bool,
}

/// The reply to `GET /tenants`: a page of tenants in byte order of their names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenants {
    /// The page's tenants, each with its count.
    pub tenants: Vec<ListedTenant>,
    /// The last tenant of the page, to pass as `after` for the next one; `null` on the last.
    pub next: Option<String>,
}

/// One tenant of a [`Tenants`] page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedTenant {
    /// Its name.
    pub tenant: String,
    /// Its distinct count, as an eventual count reads it; 0 where `error` says why not.
    pub count: u64,
    /// Why its count cannot be read, for a tenant in quarantine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Tenants one `GET /tenants` page holds by default, and at most.
pub const TENANTS_PAGE: usize = 1_000;
/// Tenants one `GET /tenants` page may hold at most (`limit`).
pub const MAX_TENANTS_PAGE: usize = 10_000;

/// Tenants one `POST /counts` may ask for, at most.
pub const MAX_COUNTS_TENANTS: usize = 10_000;

/// Ids one `POST /items/{tenant}/contains` may ask about, at most.
pub const MAX_CONTAINS_IDS: usize = 100_000;

/// How fresh a read is, the `consistency` query parameter of every read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// As of the latest merge round by any worker: an id is counted about `worker_persist`
    /// after its acknowledgement.
    #[default]
    Eventual,
    /// Every id whose batch was acknowledged before the read arrived, on any worker, is seen.
    Strong,
}

/// What a `POST /items` waits for before its `200`, the `wait` query parameter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Wait {
    /// Until the batch is durable in the worker's log.
    #[default]
    Durable,
    /// Until every item of the batch is visible to eventual reads, on every worker.
    Counted,
}

/// The body of every error reply (400, 413, 503, ...): `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for a human to read.
    pub error: String,
}

impl ErrorBody {
    /// An error body carrying `message`; takes anything string-like, such as an error's
    /// `to_string()`.
    pub fn new(message: impl Into<String>) -> Self {
        ErrorBody { error: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_documented_shape() {
        assert_eq!(serde_json::to_string(&Accepted { accepted: 3 }).unwrap(), r#"{"accepted":3}"#);
        assert_eq!(serde_json::to_string(&Count { count: 7 }).unwrap(), r#"{"count":7}"#);
        assert_eq!(serde_json::to_string(&ErrorBody::new("bad")).unwrap(), r#"{"error":"bad"}"#);
        let parsed: Count = serde_json::from_str(r#"{"count":42}"#).unwrap();
        assert_eq!(parsed, Count { count: 42 });
    }
}
