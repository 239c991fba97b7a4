//! What both CountApp binaries agree on: the config file, the items a client posts, and the
//! JSON replies of the HTTP API.

pub mod api;
pub mod config;
pub mod items;
