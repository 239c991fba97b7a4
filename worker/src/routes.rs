//! The worker's HTTP API (SPEC.md, "HTTP API"): ingest, counts, health, stats, metrics and the
//! coordinator's graceful shutdown.

use std::time::{Duration, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::http::header::{AUTHORIZATION, ContentType, HeaderValue, RETRY_AFTER};
use actix_web::web;
use actix_web::{HttpRequest, HttpResponse};
use countapp_shared::api::{Accepted, Count};
use countapp_shared::config::Config;
use countapp_shared::http::{RequestCounter, count_route, error, no_such_route, read_body, resource};
use countapp_shared::items::parse_batch;
use percent_encoding::percent_decode_str;
use serde_json::json;

use crate::live_config::ApplyError;
use crate::state::AppState;
use crate::store::StoreError;

/// Registers every route of the worker.
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/items")
            .service(resource("").route(web::post().to(post_items)))
            .default_service(web::to(items_subpath)),
    )
    .service(resource("/health").route(web::get().to(health)))
    .service(resource("/ready").route(web::get().to(ready)))
    .service(resource("/stats").route(web::get().to(stats)))
    .service(resource("/metrics").route(web::get().to(metrics)))
    .service(resource("/shutdown").route(web::post().to(shutdown)))
    .service(resource("/config").route(web::put().to(put_config)))
    .default_service(web::to(no_such_route));
}

/// How far behind its merging may fall before a worker refuses ingest: counts then converge
/// within about `worker_persist` plus this of the last acknowledgement, however long the load.
const MAX_MERGE_LAG: Duration = Duration::from_secs(2);

/// A 503 asking the client to come back: `Retry-After: 1`.
fn push_back(message: String) -> HttpResponse {
    let mut reply = error(StatusCode::SERVICE_UNAVAILABLE, message);
    reply.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    reply
}

fn not_ready() -> HttpResponse {
    error(StatusCode::SERVICE_UNAVAILABLE, "the worker is recovering its log and not ready yet")
}

/// `POST /items`: validates the whole batch, appends it to the log, and answers once durable.
async fn post_items(req: HttpRequest, payload: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    let Some(store) = state.store() else { return not_ready() };
    let config = state.config.get();
    let pending = store.pending_items();
    if pending >= config.max_pending_items.get() {
        // The tenants' store has not taken this worker's log for a while (Redis down): stop
        // acknowledging before the log fills the disk. The coordinator retries elsewhere.
        let message = format!("{pending} items wait for the tenant store; max_pending_items is reached");
        return push_back(message);
    }
    let lag = store.merge_lag();
    if lag > MAX_MERGE_LAG {
        // Ingest outruns this worker's merging: shed it (the coordinator tries the other
        // workers) rather than let the counts fall further behind.
        return push_back(format!("merging is {:.1} s behind; retry shortly", lag.as_secs_f64()));
    }
    let body = match read_body(&req, payload, config.max_body_bytes.as_usize()).await {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let items = match parse_batch(&body, config.max_key_bytes.as_usize()) {
        Ok(items) => items,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match store.append(&items).await {
        Ok(()) => {
            state.metrics.accepted(items.len() as u64);
            HttpResponse::Ok().json(Accepted { accepted: items.len() })
        }
        Err(e) => {
            tracing::error!(error = %e, "append failed");
            error(StatusCode::SERVICE_UNAVAILABLE, format!("the batch was not stored: {e}"))
        }
    }
}

/// Under `/items`: the count route (see [`count_route`]).
async fn items_subpath(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    match count_route(&req) {
        Ok(raw) => get_count(raw, &state).await,
        Err(reply) => reply,
    }
}

/// `GET /items/{tenant}/count`: the tenant's count as of the latest flush by any worker.
async fn get_count(raw: &str, state: &AppState) -> HttpResponse {
    let Some(store) = state.store().cloned() else { return not_ready() };
    // Decoded here, once, from the raw path: every string is a tenant, `/` and `%` included.
    let tenant = match percent_decode_str(raw).decode_utf8() {
        Ok(tenant) => tenant.into_owned(),
        Err(_) => {
            return error(StatusCode::BAD_REQUEST, "the tenant is not valid UTF-8 once percent-decoded");
        }
    };
    let max = state.config.get().max_key_bytes.as_usize();
    if tenant.len() > max {
        return error(StatusCode::BAD_REQUEST, format!("the tenant is longer than max_key_bytes ({max} bytes)"));
    }
    match store.count(&tenant).await {
        Ok(count) => HttpResponse::Ok().json(Count { count }),
        Err(e) => {
            tracing::error!(tenant, error = %e, "count failed");
            let status = match e {
                StoreError::Backend(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, format!("the count could not be read: {e}"))
        }
    }
}

/// `GET /health`: the process is alive and serving HTTP.
async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// `GET /ready`: the log is recovered and the worker takes ingest.
async fn ready(state: web::Data<AppState>) -> HttpResponse {
    match state.store() {
        Some(store) if let Some(why) = store.failure().borrow().clone() => {
            error(StatusCode::SERVICE_UNAVAILABLE, format!("the worker is stopping: {why}"))
        }
        Some(_) if !state.shutdown.is_cancelled() => {
            HttpResponse::Ok().json(json!({ "ready": true, "config_version": state.config.version() }))
        }
        Some(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the worker is shutting down"),
        None => not_ready(),
    }
}

/// `GET /stats`: what the worker has done, as JSON.
async fn stats(state: web::Data<AppState>, requests: web::Data<RequestCounter>) -> HttpResponse {
    let store = state.store().map(|store| store.stats());
    let last_flush = store.as_ref().and_then(|s| s.last_flush.as_ref()).map(|(at, took, report)| {
        json!({
            "at_unix_ms": at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            "took_ms": took.as_secs_f64() * 1000.0,
            "log_files": report.log_files,
            "items": report.items,
            "tenants": report.tenants,
            "new_ids": report.new_ids,
            "deleted_files": report.deleted_files,
        })
    });
    HttpResponse::Ok().json(json!({
        "worker": state.worker_id,
        "pid": std::process::id(),
        "ready": store.is_some(),
        "config_version": state.config.version(),
        "requests": requests.served(),
        "items_accepted": state.metrics.items_accepted(),
        "pending_items": store.as_ref().map_or(0, |s| s.pending_items),
        "merge_lag_s": store.as_ref().map_or(0.0, |s| s.merge_lag.as_secs_f64()),
        "ids_in_memory": store.as_ref().map_or(0, |s| s.ids_in_memory.0),
        "ids_in_memory_bytes": store.as_ref().map_or(0, |s| s.ids_in_memory.1),
        "log_bytes_appended": store.as_ref().map_or(0, |s| s.log_bytes_appended),
        "last_merge": last_flush,
    }))
}

/// `GET /metrics`: Prometheus text.
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let stats = state.store().map(|store| store.stats());
    HttpResponse::Ok()
        .content_type(ContentType(
            "application/openmetrics-text; version=1.0.0; charset=utf-8".parse().expect("a valid media type"),
        ))
        .body(state.metrics.render(stats.as_ref()))
}

/// `POST /shutdown`: with the coordinator's token (`Authorization: Bearer <token>`), stop taking
/// requests, finish those in flight, flush and exit 0.
async fn shutdown(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if !from_coordinator(&req, &state) {
        return error(StatusCode::FORBIDDEN, "shutdown needs the token this worker was started with");
    }
    tracing::info!("shutdown requested");
    state.shutdown.cancel();
    HttpResponse::Accepted().json(json!({ "status": "shutting down" }))
}

/// `PUT /config`: with the coordinator's token, puts the config in the body (JSON, as
/// [`Config::to_json`] writes it) in force. `409` if it changes a key that only a restart can.
async fn put_config(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    if !from_coordinator(&req, &state) {
        return error(StatusCode::FORBIDDEN, "a config edit needs the token this worker was started with");
    }
    let config = match std::str::from_utf8(&body)
        .map_err(|e| e.to_string())
        .and_then(|json| Config::from_json(json).map_err(|e| e.to_string()))
    {
        Ok(config) => config,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid config: {e}")),
    };
    match state.config.apply(config, state.store().map(|store| &**store)) {
        Ok(_) => HttpResponse::Ok().json(json!({ "config_version": state.config.version() })),
        Err(e @ ApplyError::Fixed(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// Whether the request carries the coordinator's token (`Authorization: Bearer <token>`).
fn from_coordinator(req: &HttpRequest, state: &AppState) -> bool {
    let presented = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()?.strip_prefix("Bearer "));
    presented.is_some_and(|token| state.is_shutdown_token(token))
}
