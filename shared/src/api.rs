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
