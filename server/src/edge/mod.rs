//! The edge of both servers, bounded as nginx's and HAProxy's are by default, so that slow or
//! greedy clients cost a bounded share of the process and everybody else keeps being served:
//! a cap on connections below the limit of open files ([`process`]), a deadline for every
//! request, head ([`stalled`]) and body ([`body`]), body buffers that grow with the bytes that
//! arrive ([`body`]), and a budget for the bytes of bodies held at once ([`budget`]).

pub mod body;
pub mod budget;
pub mod process;
pub mod stalled;

use std::time::Duration;

/// How long a connection is kept alive between requests (actix-web's default, said here so
/// that it is one of the edge's stated bounds).
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);
