//! Client-caused protocol errors: connections a client ended with bytes that are no HTTP
//! request (a malformed head, conflicting framing, a TLS hello on the plain port) or broke off
//! mid-request. actix answers them (400, 408, ...) and logs each as an ERROR, `stream error:
//! ...`, which would let any client fill the log. The binaries' logging recognizes these events
//! with [`is_client_error`], counts them in [`counter`] and logs them at debug level instead;
//! both servers show the count in `/metrics` as `client_protocol_errors_total`.

use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata};

/// Where actix's HTTP/1 connection handling logs.
const DISPATCHER: &str = "actix_http::h1::dispatcher";
/// How its event for a connection ended by an error starts.
const STREAM_ERROR: &str = "stream error";

/// The process's count of client protocol errors, shared by its logging and its metrics.
pub fn counter() -> Counter {
    static COUNTER: LazyLock<Counter> = LazyLock::new(Counter::default);
    COUNTER.clone()
}

/// Registers [`counter`] in a server's `registry`, as `client_protocol_errors`.
pub fn register(registry: &mut Registry) {
    registry.register(
        "client_protocol_errors",
        "Client connections ended by a protocol error: bytes that are no HTTP request, or a request broken off",
        counter(),
    );
}

/// Whether events of `metadata` may report client protocol errors: a filter cheap enough for
/// every call site, which leaves every other event of actix uninspected.
pub fn may_be_client_error(metadata: &Metadata<'_>) -> bool {
    metadata.target() == DISPATCHER && *metadata.level() == Level::ERROR
}

/// What `event` says, if it is actix's report of a connection ended by a client's protocol
/// error.
pub fn is_client_error(event: &Event<'_>) -> Option<String> {
    if !may_be_client_error(event.metadata()) {
        return None;
    }
    let mut message = Message(None);
    event.record(&mut message);
    message.0.filter(|text| text.starts_with(STREAM_ERROR))
}

/// The `message` field of an event.
struct Message(Option<String>);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}
