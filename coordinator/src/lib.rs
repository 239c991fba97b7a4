//! The CountApp coordinator: keeps the workers of a live `config.yaml` running and routes each
//! request to a random live worker.
//!
//! - [`startup`]: wires everything together; the `coordinator` binary and the tests use it.
//! - [`config_watch`]: notices edits of the config file.
//! - [`supervisor`]: spawns, watches, respawns and stops the workers, one task each.
//! - [`pool`]: the workers, their states, and the live set requests are routed to.
//! - `proxy`: forwards a request to a live worker, retrying on another when one fails;
//!   `upstream`: the hop itself, on each server thread's keep-alive connections to the workers.
//! - `routes`: the HTTP API; `state`: what its handlers share; `metrics`: Prometheus counters.

pub mod config_watch;
mod metrics;
pub mod pool;
mod proxy;
mod routes;
pub mod startup;
mod state;
pub mod supervisor;
mod upstream;
