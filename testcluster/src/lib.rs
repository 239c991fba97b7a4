//! Real CountApp processes for the system tests and the benchmarks: a cluster in a temporary
//! directory with its own `config.yaml`, the real `coordinator` and `worker` binaries started on
//! free loopback ports, waited for with deadlines, and killed and reaped when dropped, so that no
//! process outlives a test, even a failed one.
//!
//! A crate of its own, rather than a module each test file compiles, so that the test files,
//! the store's process tests and the benchmarks' driver share one API.

mod attrs;
mod client;
mod cluster;
mod load;
mod node;
mod process;
mod procs;
mod signals;

#[cfg(feature = "browser")]
pub mod browser;
pub mod fake;
pub mod netns;
pub mod redis;

pub use attrs::Immutable;
pub use client::{
    batch, client, count, count_reply, error_message, eventually, eventually_owner, get_json, metric, percent_encoded,
    post, post_range, raw, raw_get, stats, try_count, worker_url,
};
pub use cluster::{Cluster, STARTUP, TOKEN, binary, extra, free_port, lone_worker, running, tenant_files};
pub use load::{Accounting, Load, PUSHED_BACK, Sent, Tally};
/// The signals [`Node::signal`], [`Process::signal`] and [`send_signal`] send.
pub use nix::sys::signal::Signal;
pub use node::Node;
pub use process::{Pipes, Process};
pub use procs::is_running;
pub use signals::{Stopped, send_signal, sigkill};
