//! Reading a request body whole, bounded three ways: by `max_body_bytes` (413), by the bytes of
//! bodies the whole server holds (503 with `Retry-After`), and by `request_timeout` (408). Its
//! buffer grows with the bytes that arrive, never from the length a client announces: a client
//! announcing 16 MiB and sending one byte costs one byte.

use std::ops::Deref;
use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::http::header::CONTENT_LENGTH;
use actix_web::web::{self, Bytes};
use futures_util::StreamExt;

use super::budget::{BodyBudget, Held};
use crate::http::ApiError;
use countapp_shared::config::Config;

/// What a request body is held to: the config in force when its request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// The largest body, `max_body_bytes`.
    pub max: usize,
    /// Bytes of bodies the server holds at once, `max_body_bytes_in_flight`.
    pub in_flight: usize,
    /// How long the body may take to arrive, `request_timeout`.
    pub deadline: Duration,
}

impl BodyLimits {
    /// The limits `config` sets.
    pub fn of(config: &Config) -> BodyLimits {
        BodyLimits {
            max: config.max_body_bytes.as_usize(),
            in_flight: config.max_body_bytes_in_flight(),
            deadline: config.request_timeout(),
        }
    }
}

/// A request body read whole; it holds its bytes' share of the server's [`BodyBudget`] until
/// it is dropped, which is when the request is done with it.
#[derive(Debug)]
pub struct Body<'a> {
    bytes: Bytes,
    _held: Held<'a>,
}

impl Body<'_> {
    /// The bytes, shared rather than copied (to forward them, or to parse them elsewhere).
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }
}

impl Deref for Body<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads the body of `req`. A body over `limits.max` gets a 413 as soon as that is known (from
/// its `Content-Length`, or once the bytes read exceed it), one that would take the server's
/// bodies past `limits.in_flight` a 503 with `Retry-After`, and one not all there within
/// `limits.deadline` a 408 that closes the connection.
pub async fn read_body<'a>(
    req: &HttpRequest,
    payload: web::Payload,
    limits: BodyLimits,
    budget: &'a BodyBudget,
) -> Result<Body<'a>, ApiError> {
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limits.max) {
        return Err(ApiError::TooLarge(limits.max));
    }
    let mut held = budget.hold();
    let reading = gather(payload, declared.unwrap_or(limits.max), limits, &mut held);
    match tokio::time::timeout(limits.deadline, reading).await {
        Ok(bytes) => Ok(Body { bytes: bytes?, _held: held }),
        Err(_) => Err(ApiError::RequestTimeout(format!(
            "the body did not arrive within request_timeout ({} s)",
            limits.deadline.as_secs_f64()
        ))),
    }
}

/// The bytes of each body that the budget leaves out: an ordinary batch (a few kilobytes) never
/// waits on it, and is never pushed back by large bodies filling it. What they can hold is
/// bounded all the same, by the connections a server takes at once.
const UNBUDGETED: usize = 16 << 10;

/// The chunks of `payload`, each taken from the budget as it arrives (past [`UNBUDGETED`]),
/// joined.
async fn gather(
    mut payload: web::Payload,
    room_at_most: usize,
    limits: BodyLimits,
    held: &mut Held<'_>,
) -> Result<Bytes, ApiError> {
    let mut body = Gathered::Empty;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body failed: {e}")))?;
        if body.len() + chunk.len() > limits.max {
            return Err(ApiError::TooLarge(limits.max));
        }
        let budgeted = (body.len() + chunk.len()).saturating_sub(UNBUDGETED) - body.len().saturating_sub(UNBUDGETED);
        if budgeted > 0 && !held.take(budgeted, limits.in_flight) {
            return Err(ApiError::PushBack(format!(
                "the server holds max_body_bytes_in_flight ({} bytes) of request bodies; retry shortly",
                limits.in_flight
            )));
        }
        body.push(chunk, room_at_most);
    }
    Ok(body.into_bytes())
}

/// A body as its chunks arrive. Most bodies come in one chunk, which is kept as it is, with no
/// copy; only a second chunk starts a buffer.
enum Gathered {
    Empty,
    One(Bytes),
    Many(Vec<u8>),
}

impl Gathered {
    fn len(&self) -> usize {
        match self {
            Gathered::Empty => 0,
            Gathered::One(bytes) => bytes.len(),
            Gathered::Many(buf) => buf.len(),
        }
    }

    /// Appends `chunk`; the buffer never takes more room than `room_at_most` (the announced
    /// length, or the largest body), nor more than twice the bytes that have arrived.
    fn push(&mut self, chunk: Bytes, room_at_most: usize) {
        *self = match std::mem::replace(self, Gathered::Empty) {
            Gathered::Empty => Gathered::One(chunk),
            Gathered::One(first) => {
                let mut buf = Vec::new();
                grow(&mut buf, first.len() + chunk.len(), room_at_most);
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&chunk);
                Gathered::Many(buf)
            }
            Gathered::Many(mut buf) => {
                let needed = buf.len() + chunk.len();
                grow(&mut buf, needed, room_at_most);
                buf.extend_from_slice(&chunk);
                Gathered::Many(buf)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Gathered::Empty => Bytes::new(),
            Gathered::One(bytes) => bytes,
            Gathered::Many(buf) => Bytes::from(buf),
        }
    }
}

/// Makes room in `buf` for `needed` bytes: twice that, so that a body costs a few copies in
/// all, but within `room_at_most`.
fn grow(buf: &mut Vec<u8>, needed: usize, room_at_most: usize) {
    if needed > buf.capacity() {
        let room = needed.saturating_mul(2).min(room_at_most).max(needed);
        buf.reserve_exact(room - buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_chunk_is_kept_as_it_came_and_more_are_joined_in_room_that_follows_them() {
        let mut body = Gathered::Empty;
        let first = Bytes::from_static(b"[{\"id\":");
        body.push(first.clone(), 1 << 20);
        let Gathered::One(kept) = &body else { panic!("one chunk is kept whole") };
        assert_eq!(kept.as_ptr(), first.as_ptr(), "and not copied");
        body.push(Bytes::from_static(b"\"1\"}]"), 1 << 20);
        let Gathered::Many(buf) = &body else { panic!("two chunks are joined") };
        assert!(buf.capacity() <= 2 * buf.len(), "room for {} bytes: {}", buf.len(), buf.capacity());
        assert_eq!(body.into_bytes(), &b"[{\"id\":\"1\"}]"[..]);
    }

    #[test]
    fn the_room_never_passes_the_announced_length() {
        let mut buf = Vec::new();
        grow(&mut buf, 10, 15);
        assert_eq!(buf.capacity(), 15);
        grow(&mut buf, 100, 1000);
        assert_eq!(buf.capacity(), 200);
        // A client that sends more than it announced still gets room for its bytes.
        grow(&mut buf, 300, 250);
        assert_eq!(buf.capacity(), 300);
    }
}
