//! The coordinator's HTTP API: the workers' API forwarded, plus its own health, stats and
//! metrics, and the dashboard.

use std::time::UNIX_EPOCH;

use actix_web::http::Method;
use actix_web::http::header::ContentType;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use countapp_server::edge::body::{BodyLimits, read_body};
use countapp_server::http::{ApiError, RequestCounter, count_route, no_such_route, resource};
use serde_json::{Value, json};

use crate::dashboard;
use crate::proxy::forward;
use crate::state::AppState;
use crate::upstream::{Forward, Upstream, valid_target};

/// Registers every route of the coordinator.
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/items")
            .service(resource("").route(web::post().to(post_items)))
            .default_service(web::to(items_subpath)),
    )
    .service(resource("/health").route(web::get().to(health)))
    .service(resource("/stats").route(web::get().to(stats)))
    .service(resource("/metrics").route(web::get().to(metrics)))
    .configure(dashboard::configure)
    .default_service(web::to(no_such_route));
}

/// `POST /items`: bounded here (a 413 costs no hop), validated and stored by a worker.
async fn post_items(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    upstream: web::Data<Upstream>,
) -> Result<HttpResponse, ApiError> {
    let limits = BodyLimits::of(&state.ctx.config.borrow());
    let body = read_body(&req, payload, limits, &state.bodies).await?;
    let target = raw_target(&req)?;
    forward(&state, &upstream, Forward { method: Method::POST, target, body: body.bytes().clone() }).await
}

/// Under `/items`: the count route (see [`count_route`]), forwarded with the path exactly as the
/// client encoded it.
async fn items_subpath(
    req: HttpRequest,
    state: web::Data<AppState>,
    upstream: web::Data<Upstream>,
) -> Result<HttpResponse, ApiError> {
    count_route(&req)?;
    let target = raw_target(&req)?;
    forward(&state, &upstream, Forward { method: Method::GET, target, body: Bytes::new() }).await
}

/// The request's path and query exactly as the client sent them, for the worker: nothing
/// decodes or normalizes them, so that `.`, `..` or `%2E%2E` stay tenants, not dot segments.
fn raw_target(req: &HttpRequest) -> Result<Bytes, ApiError> {
    let target = req.uri().path_and_query().map_or(req.path(), |pq| pq.as_str());
    // actix parsed it already; this keeps anything that could split the request line or start
    // a header from reaching the worker, whatever the parser let through.
    if !valid_target(target.as_bytes()) {
        return Err(ApiError::BadRequest("invalid request path".to_owned()));
    }
    Ok(Bytes::copy_from_slice(target.as_bytes()))
}

/// `GET /health`: the coordinator is up; how many workers take requests.
async fn health(state: web::Data<AppState>) -> HttpResponse {
    let live = state.ctx.pool.live_count();
    HttpResponse::Ok().json(json!({ "status": "ok", "live_workers": live }))
}

/// `GET /stats`: every worker's state and counts, the cluster's totals, and the config status.
async fn stats(state: web::Data<AppState>, requests: web::Data<RequestCounter>) -> HttpResponse {
    HttpResponse::Ok().json(stats_json(&state, &requests))
}

/// The `/stats` body; the dashboard's snapshot is built on it.
pub(crate) fn stats_json(state: &AppState, requests: &RequestCounter) -> Value {
    let mut total_requests = 0;
    let mut total_items = 0;
    let workers: Vec<_> = state
        .ctx
        .pool
        .members()
        .iter()
        .map(|member| {
            let status = member.status();
            let served = member.requests.load(std::sync::atomic::Ordering::Relaxed);
            let items = member.items.load(std::sync::atomic::Ordering::Relaxed);
            total_requests += served;
            total_items += items;
            json!({
                "url": member.url.as_str(),
                "local": member.local,
                "pid": status.pid,
                "state": status.state,
                "adopted": status.adopted,
                "requests": served,
                "items_accepted": items,
                "restarts": status.restarts,
                "last_error": status.last_error,
                "config_version": status.config_version,
            })
        })
        .collect();
    let config = state.config_status.lock().clone();
    json!({
        "workers": workers,
        "cluster": {
            "requests": requests.served(),
            "requests_forwarded": total_requests,
            "items_accepted": total_items,
            "live_workers": state.ctx.pool.live_count(),
            "workers": workers.len(),
        },
        "config": {
            "path": config.path.display().to_string(),
            "loaded_at_unix_ms": config.loaded_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            "version": config.version,
            "valid": config.error.is_none(),
            "error": config.error,
        },
    })
}

/// `GET /metrics`: Prometheus text.
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType(
            "application/openmetrics-text; version=1.0.0; charset=utf-8".parse().expect("a valid media type"),
        ))
        .body(state.metrics.render(&state.ctx.pool))
}
