//! What every CountApp program agrees on: the config file, the JSON replies of the HTTP API,
//! what a spawned worker is handed and how it proves it holds its coordinator's token, the
//! shutdown signal, the wire contract between the coordinator and its workers, and the process
//! metrics both servers export. Without actix, so that the load tool takes it without a server:
//! the servers' own side is `countapp-server`.

pub mod api;
pub mod config;
pub mod shutdown;
pub mod spawn;
pub mod token;
pub mod wire;
