//! The server side that the coordinator and the worker share: the HTTP helpers both answer with,
//! the bounds of their edge (connections, deadlines, bodies), the guard both keep against other
//! sites' pages, the count of clients' protocol errors, and the process metrics both export. Kept apart from `countapp-shared` so
//! that the config and the wire types, which the load tool uses too, come without actix.

pub mod client_errors;
pub mod edge;
pub mod http;
pub mod process_metrics;
pub mod site_guard;
