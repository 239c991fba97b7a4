//! Forwards a request to a random live worker, and to another one when that fails.
//!
//! A connection failure, a timeout or a 5xx is retried on another live worker: ingest is
//! idempotent (a set ignores an id it holds), so a batch that reached a worker before the
//! failure is not double-counted by the retry. A worker's 4xx is the client's fault and passes
//! through. With no live worker, the request waits briefly for one before a 503.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{ContentType, RETRY_AFTER};
use countapp_shared::http::error;

use crate::pool::{Member, WorkerState};
use crate::state::AppState;
use crate::upstream::{Forward, Reply, Upstream};

/// How long a request waits for a live worker before it gets a 503.
const WAIT_FOR_WORKER: Duration = Duration::from_secs(3);
/// Attempts on distinct workers a request gets, at most.
const MAX_ATTEMPTS: usize = 8;
/// How long a worker gets to answer.
const HOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Forwards `request` and returns the reply of the first worker that handles it.
pub(crate) async fn forward(state: &AppState, upstream: &Upstream, request: Forward) -> HttpResponse {
    let pool = &state.ctx.pool;
    let deadline = Instant::now() + WAIT_FOR_WORKER;
    let mut tried: Vec<Arc<Member>> = Vec::new();
    let mut last_error = None;
    // The last worker reply that was a 5xx: if every attempt ends so, the client gets the
    // workers' own explanation (such as their tenant store being down, or their merging being
    // behind, with when to retry), not a generic one.
    let mut last_reply: Option<Reply> = None;
    while tried.len() < MAX_ATTEMPTS {
        let Some(member) = pool.pick(&tried) else {
            if Instant::now() >= deadline {
                break;
            }
            // Every live worker failed us or none is live: wait for one to (re)start.
            pool.wait_for_ready(Duration::from_millis(100)).await;
            tried.retain(|m| m.status().state != WorkerState::Ready);
            continue;
        };
        if !tried.is_empty() {
            state.metrics.retries.inc();
        }
        match upstream.send(&member.url, &request, HOP_TIMEOUT).await {
            Ok(reply) if !reply.status.is_server_error() => {
                let items = if reply.status == hyper::StatusCode::OK && request.method == hyper::Method::POST {
                    accepted(&reply.body)
                } else {
                    0
                };
                member.record(items);
                return HttpResponse::build(status(&reply)).insert_header(ContentType::json()).body(reply.body);
            }
            Ok(reply) => {
                let why = format!("{}: {}", reply.status, String::from_utf8_lossy(&reply.body));
                tracing::debug!(worker = %member.url, error = why, "worker failed a request; retrying elsewhere");
                last_error = Some(why);
                last_reply = Some(reply);
            }
            Err(e) => {
                let why = e.to_string();
                tracing::warn!(worker = %member.url, error = why, "cannot reach worker; retrying elsewhere");
                pool.suspect(&member, why.clone());
                last_error = Some(why);
            }
        }
        tried.push(member);
    }
    state.metrics.unavailable.inc();
    if let Some(reply) = last_reply {
        let mut response = HttpResponse::build(status(&reply));
        if let Some(retry_after) = reply.retry_after.as_ref().and_then(|v| v.to_str().ok()) {
            response.insert_header((RETRY_AFTER, retry_after));
        }
        return response.insert_header(ContentType::json()).body(reply.body);
    }
    let detail = last_error.map_or_else(String::new, |e| format!(" (last error: {e})"));
    error(StatusCode::SERVICE_UNAVAILABLE, format!("no live worker could take the request{detail}"))
}

/// A worker's status as actix's type (actix and hyper use different `http` crates).
fn status(reply: &Reply) -> StatusCode {
    StatusCode::from_u16(reply.status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY)
}

/// The `accepted` count of a worker's `200` reply to `POST /items`.
fn accepted(body: &[u8]) -> u64 {
    serde_json::from_slice::<countapp_shared::api::Accepted>(body).map_or(0, |a| a.accepted as u64)
}
