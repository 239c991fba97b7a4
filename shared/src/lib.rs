//! What both CountApp binaries agree on: the config file, the JSON
//! replies of the HTTP API and the helpers both servers answer with, the bounds of their edge,
//! what a spawned worker is handed and how it proves it holds its coordinator's token, the guard
//! both servers keep against other sites' pages, the shutdown signal, the wire contract between
//! the coordinator and its workers, and the process metrics both export.

pub mod api;
pub mod client_errors;
pub mod config;
pub mod edge;
pub mod http;
pub mod process_metrics;
pub mod shutdown;
pub mod site_guard;
pub mod spawn;
pub mod token;
pub mod wire;
