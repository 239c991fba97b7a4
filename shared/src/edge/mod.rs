//! The edge of both servers, bounded as nginx's and HAProxy's are by default, so that slow or
//! greedy clients cost a bounded share of the process and everybody else keeps being served:
//! a deadline for every request body, body buffers that grow with the bytes that arrive
//! ([`body`]), and a budget for the bytes of bodies held at once ([`budget`]).

pub mod body;
pub mod budget;
