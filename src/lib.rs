//! What the `coordinator` and `worker` binaries share at their edge: log set-up.

use countapp_shared::client_errors;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{self, FilterExt};
use tracing_subscriber::layer::{self, Context, Filter, Layer};
use tracing_subscriber::prelude::*;

/// Logs to stderr with `tracing`, at the level of `RUST_LOG` (default `info`). A client's
/// protocol error, which actix logs as an ERROR, is counted and logged at debug level instead
/// (see [`client_errors`]): a client must not be able to fill the log.
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let level = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in the workers' log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(level.and(HideClientErrors));
    let counting = CountClientErrors.with_filter(filter::filter_fn(client_errors::may_be_client_error));
    tracing_subscriber::registry().with(output).with(counting).init();
}

/// Keeps actix's report of a client's protocol error out of the log output.
struct HideClientErrors;

impl<S> Filter<S> for HideClientErrors {
    fn enabled(&self, _: &tracing::Metadata<'_>, _: &layer::Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &layer::Context<'_, S>) -> bool {
        client_errors::is_client_error(event).is_none()
    }
}

/// Counts actix's reports of clients' protocol errors, and logs each at debug level.
struct CountClientErrors;

impl<S: Subscriber> Layer<S> for CountClientErrors {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if let Some(error) = client_errors::is_client_error(event) {
            client_errors::counter().inc();
            tracing::debug!(error, "a client's connection ended in a protocol error");
        }
    }
}
