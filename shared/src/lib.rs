//! What every CountApp program agrees on: the config file, the items a client posts, the JSON
//! replies of the HTTP API, what a spawned worker is handed and how it proves it holds its
//! coordinator's token, and the shutdown signal. Without actix, so that the load tool takes it
//! without a server: the servers' own side is `countapp-server`.

pub mod api;
pub mod config;
pub mod items;
pub mod shutdown;
pub mod spawn;
pub mod token;
