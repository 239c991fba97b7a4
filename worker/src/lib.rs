//! A CountApp worker: takes batches of items over HTTP, makes them durable in its write-ahead
//! log before acknowledging them, and flushes them periodically into the per-tenant files that
//! every worker shares, so that any worker answers any tenant's count.
//!
//! - [`store`]: the durable heart, the log and the tenant files.
//! - [`startup`]: wires the store, the HTTP server, the flusher and the shutdown signal; the
//!   `worker` binary and the tests start workers through it.
//! - `routes`: the HTTP API; `state`: what its handlers share; `metrics`: Prometheus counters.

mod metrics;
mod routes;
pub mod startup;
mod state;
pub mod store;
