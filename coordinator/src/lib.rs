//! The CountApp coordinator: keeps the workers of a live `config.yaml` running and routes each
//! request to a random live worker.
//!
//! - [`startup`]: wires everything together; the `coordinator` binary and the tests use it.
//! - [`supervisor`]: spawns, watches, respawns and stops the workers, one task each;
//!   `adoption`: whether a process on a worker's port is one of ours; `token_file`: the token
//!   its workers hold, kept for the next coordinator; `control`: the client of the workers'
//!   control routes.
//! - [`pool`]: the workers, their states, and the live set requests are routed to.
//! - `proxy`: forwards a request to a live worker, retrying on another when one fails;
//!   `upstream`: the hop itself, on each server thread's keep-alive connections to the workers.
//! - `routes`: the HTTP API; `state`: what its handlers share; `stats`: the `/stats` body;
//!   `metrics`: Prometheus metrics.
//! - [`events`]: what happened in the cluster, when it happened.
//! - `dashboard`: the operator's page at `/`; `cluster_view`: the snapshot of the cluster it
//!   shows, shared by every reader.

mod adoption;
mod cluster_view;
mod control;
mod dashboard;
pub mod events;
mod metrics;
pub mod pool;
mod proxy;
mod routes;
pub mod startup;
mod state;
mod stats;
pub mod supervisor;
mod token_file;
mod upstream;
