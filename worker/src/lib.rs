//! A CountApp worker. [`store`] is the durable heart: a write-ahead log that makes every
//! acknowledged batch survive a crash, and per-tenant JSON segment files that every worker of
//! the cluster shares.

pub mod store;
