//! A CountApp worker: takes batches of items over HTTP, makes them durable in its write-ahead
//! log before acknowledging them, and merges the logs of every worker, shard by shard, into the
//! per-tenant files that every worker shares, so that any worker answers any tenant's count.
//!
//! - `items`: a `POST /items` body parsed into the store's items, in one pass.
//! - [`startup`]: wires the store, the HTTP server, the merger and the shutdown signal; the
//!   `worker` binary and the tests start workers through it.
//! - `live_config`: the config in force, and how edits reach a running worker.
//! - `merger`: the background thread that closes the log and merges; `routes`: the HTTP API;
//!   `state`: what its handlers share; `metrics`: Prometheus counters.
//! - `barrier`: what strong reads and `wait=counted` batches wait for, across the workers that
//!   `peers` finds.

mod barrier;
mod items;
pub mod live_config;
mod merger;
mod metrics;
mod peers;
mod routes;
pub mod startup;
mod state;
