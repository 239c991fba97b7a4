//! Forwards a request to a random live worker, and to another one when that fails. Requests
//! that wait for a barrier (strong reads, batches posted with `wait=counted`, deletes) go first
//! to one worker, the live one of the lowest address, so that they share its barriers.
//!
//! A connection failure, a timeout or a 5xx is retried on another live worker: ingest is
//! idempotent (a set ignores an id it holds), so a batch that reached a worker before the
//! failure is not double-counted by the retry. A worker's 4xx is the client's fault and passes
//! through. Each live worker is tried once: when every one answers a 5xx, the client gets the
//! last of them; when every one is late, they are tried again until the request has waited
//! [`WAIT_FOR_WORKER`]. With no live worker, the request waits that long for one before a 503.
//!
//! The hop to a worker has its own timeout, well under a client's: a worker that does not answer
//! in time costs a request [`HOP_TIMEOUT`] before it goes to another worker. A late reply alone
//! does not take the worker out of routing, since a busy worker is late as well as a hung one:
//! it has its supervisor check its health at once, and only a failed check takes it out (until
//! a check passes again, or it is replaced). A worker that refuses the connection or drops it is
//! taken out at once, and so is one whose bytes are no reply (malformed, or over the bounds a
//! reply is held to); if that is all the request met, the client gets a 502.

use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::http::header::{ContentType, RETRY_AFTER};
use actix_web::{HttpResponse, ResponseError};
use countapp_server::http::ApiError;
use countapp_shared::wire::{BARRIER_HOP_TIMEOUT, HOP_TIMEOUT, HOP_TIMEOUT_PER_MIB};

use crate::metrics::Cause;
use crate::pool::Tried;
use crate::state::AppState;
use crate::upstream::{Forward, HopError, Kind, Reply, Upstream};

/// How long a request waits for a live worker before it gets a 503.
const WAIT_FOR_WORKER: Duration = Duration::from_secs(3);

/// Forwards `request` and returns the reply of the first worker that handles it.
pub(crate) async fn forward(state: &AppState, upstream: &Upstream, request: Forward) -> Result<HttpResponse, ApiError> {
    let pool = &state.ctx.pool;
    let deadline = Instant::now() + WAIT_FOR_WORKER;
    let timeout = hop_timeout(&request);
    let mut tried = Tried::default();
    let mut last_error: Option<HopError> = None;
    // The last worker reply that was a 5xx: if every attempt ends so, the client gets the
    // workers' own explanation (such as their tenant store being down, or their merging being
    // behind, with when to retry), not a generic one.
    let mut last_reply: Option<Reply> = None;
    loop {
        if !tried.is_empty() && Instant::now() >= deadline {
            break;
        }
        // A first try of a request that waits for a barrier goes to the worker every such
        // request goes to, so that concurrent ones share its barriers (each costs a log close
        // and a round on every worker, which each worker leading its own would multiply). Any
        // other first try joins the requests about to be written to a worker, if there are any
        // and that worker answers this request at once. Otherwise, and for a retry, any live
        // worker at random.
        let joining = match tried.is_empty() {
            true if request.kind == Kind::Barrier => pool.first_live(),
            true => upstream.filling(request.kind, |url| pool.live(url)).filter(|m| m.answers_at_once(request.kind)),
            false => None,
        };
        let Some(member) = joining.or_else(|| pool.pick(&tried)) else {
            // Every live worker has answered: waiting would only get the same answers again.
            if last_reply.is_some() || Instant::now() >= deadline {
                break;
            }
            if pool.live_count() > 0 {
                // Every live worker was late (one that failed otherwise is out of routing):
                // busy ones may answer another try, until the wait is over.
                tried = Tried::default();
                continue;
            }
            // No worker is live, or those that were failed us: wait for one to (re)start.
            pool.wait_for_ready(Duration::from_millis(100)).await;
            continue;
        };
        if !tried.is_empty() {
            state.metrics.retries.inc();
        }
        tried.push(member.clone());
        let pipeline = member.answers_at_once(request.kind);
        let sent = Instant::now();
        let replied = upstream.send(&member.url, &request, pipeline, timeout).await;
        state.metrics.hop_took(member.url.as_str(), sent.elapsed());
        match replied {
            Ok(reply) if !reply.status.is_server_error() => {
                let ingest = request.target.as_ref() == b"/items" || request.target.starts_with(b"/items?");
                let items = if reply.status == StatusCode::OK && ingest { accepted(&reply.body) } else { 0 };
                member.record(items);
                return Ok(HttpResponse::build(reply.status).insert_header(ContentType::json()).body(reply.body));
            }
            Ok(reply) => {
                tracing::debug!(worker = %member.url, status = %reply.status, "worker failed a request; retrying elsewhere");
                last_reply = Some(reply);
            }
            Err(e @ HopError::Timeout(_)) => {
                let why = e.to_string();
                tracing::warn!(worker = %member.url, error = why, "worker late; retrying elsewhere and checking it");
                member.request_check();
                last_error = Some(e);
            }
            Err(e) => {
                let why = e.to_string();
                tracing::warn!(worker = %member.url, error = why, "worker unreachable or answering junk; retrying elsewhere");
                pool.suspect(&member, why);
                last_error = Some(e);
            }
        }
    }
    if let Some(reply) = last_reply {
        let cause = if reply.retry_after.is_some() { Cause::PushBack } else { Cause::WorkerError };
        let why = String::from_utf8_lossy(&reply.body[..reply.body.len().min(256)]).into_owned();
        state.metrics.failed(cause, reply.status.as_u16(), &why);
        let mut response = HttpResponse::build(reply.status);
        if let Some(retry_after) = reply.retry_after {
            response.insert_header((RETRY_AFTER, retry_after));
        }
        return Ok(response.insert_header(ContentType::json()).body(reply.body));
    }
    let (cause, error) = match last_error {
        Some(e @ HopError::BadReply(_)) => {
            (Cause::BadReply, ApiError::BadGateway(format!("no worker answered the request well (last: {e})")))
        }
        Some(e) => (
            Cause::WorkersUnreachable,
            ApiError::Unavailable(format!("no live worker could take the request (last error: {e})")),
        ),
        None => (Cause::NoLiveWorker, ApiError::Unavailable("no live worker could take the request".to_owned())),
    };
    state.metrics.failed(cause, error.status_code().as_u16(), &error.to_string());
    Err(error)
}

/// The hop timeout of `request`: longer for a larger body, and for one that waits for a
/// barrier.
fn hop_timeout(request: &Forward) -> Duration {
    let base = if request.kind.takes_time() { BARRIER_HOP_TIMEOUT } else { HOP_TIMEOUT };
    base + HOP_TIMEOUT_PER_MIB.mul_f64(request.body.len() as f64 / f64::from(1 << 20))
}

/// The `accepted` count of a worker's `200` reply to `POST /items`.
fn accepted(body: &[u8]) -> u64 {
    serde_json::from_slice::<countapp_shared::api::Accepted>(body).map_or(0, |a| a.accepted as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hop_timeout_grows_with_the_body_and_for_a_barrier() {
        use actix_web::http::Method;
        let request = |len: usize, kind| Forward {
            method: Method::POST,
            target: actix_web::web::Bytes::from_static(b"/items"),
            body: vec![b'x'; len].into(),
            kind,
        };
        assert_eq!(hop_timeout(&request(0, Kind::Batch)), HOP_TIMEOUT);
        assert!(hop_timeout(&request(10 << 10, Kind::Batch)) < HOP_TIMEOUT + Duration::from_millis(5));
        assert_eq!(hop_timeout(&request(16 << 20, Kind::Batch)), HOP_TIMEOUT + HOP_TIMEOUT_PER_MIB * 16);
        assert_eq!(hop_timeout(&request(0, Kind::Waits)), BARRIER_HOP_TIMEOUT);
        assert_eq!(hop_timeout(&request(0, Kind::Barrier)), BARRIER_HOP_TIMEOUT);
    }
}
