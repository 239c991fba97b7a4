//! The worker's HTTP API (the README's "Using it"): ingest, counts, health, stats, metrics, and the
//! coordinator's graceful shutdown and config edits. Every error is an [`ApiError`].

use std::time::Duration;

use crate::items::parse_batch;
use actix_web::http::header::{AUTHORIZATION, ContentType};
use actix_web::web;
use actix_web::{HttpRequest, HttpResponse};
use countapp_server::edge::body::{BodyLimits, read_body};
use countapp_server::http::{ApiError, RequestCounter, count_route, no_such_route, resource};
use countapp_shared::api::{Accepted, Count};
use countapp_shared::config::{Config, FsyncPolicy, StoreKind};
use countapp_shared::token;
use countapp_shared::wire::{
    AnswersAtOnce, ConfigApplied, ConfigPush, MergeRound, Quarantined, Ready, WorkerStats, unix_ms,
};
use countapp_store::Item;
use percent_encoding::percent_decode_str;
use serde_json::json;

use crate::live_config::ApplyError;
use crate::state::AppState;
use countapp_store::StoreError;

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
    .service(resource(token::IDENTITY_ROUTE).route(web::get().to(identity)))
    .default_service(web::to(no_such_route));
}

/// How far behind its merging may fall before a worker refuses ingest: counts then converge
/// within about `worker_persist` plus this of the last acknowledgement, however long the load.
const MAX_MERGE_LAG: Duration = Duration::from_secs(2);

/// Bodies from this size on are parsed, validated and encoded on a blocking thread: a batch of
/// 16 MiB takes a good part of a second, which the worker's one HTTP thread would otherwise
/// spend answering no one, health checks included. Smaller ones, nearly all, stay on the HTTP
/// thread, where a batch of this size takes about a millisecond, less than handing it over.
const PARSE_ELSEWHERE_FROM: usize = 128 << 10;

fn not_ready() -> ApiError {
    ApiError::Unavailable("the worker is recovering its log and not ready yet".to_owned())
}

/// `POST /items`: validates the whole batch, appends it to the log, and answers once durable.
async fn post_items(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let store = state.store().ok_or_else(not_ready)?;
    let config = state.config.get();
    let pending = store.pending_items();
    if pending >= config.max_pending_items.get() {
        // The tenants' store has not taken this worker's log for a while (Redis down): stop
        // acknowledging before the log fills the disk. The coordinator retries elsewhere.
        let message = format!("{pending} items wait for the tenant store; max_pending_items is reached");
        return Err(ApiError::PushBack(message));
    }
    if let Some(lag) = store.outrun(MAX_MERGE_LAG) {
        // Ingest outruns this worker's merging: shed it (the coordinator tries the other
        // workers) rather than let the counts fall further behind.
        return Err(ApiError::PushBack(format!("merging is {:.1} s behind; retry shortly", lag.as_secs_f64())));
    }
    let body = read_body(&req, payload, BodyLimits::of(&config), &state.bodies).await?;
    let max_key = config.max_key_bytes.as_usize();
    let accepted = if body.len() < PARSE_ELSEWHERE_FROM {
        let items = parse(&body, max_key)?;
        store.append(&items).await.map_err(not_stored)?;
        items.len()
    } else {
        let (store, body) = (store.clone(), body.bytes().clone());
        let stored = web::block(move || {
            let items = parse(&body, max_key)?;
            store.append_blocking(&items).map_err(not_stored)?;
            Ok::<_, ApiError>(items.len())
        });
        stored.await.map_err(|e| ApiError::Internal(format!("the batch could not be parsed: {e}")))??
    };
    state.metrics.accepted(accepted as u64);
    Ok(HttpResponse::Ok().json(Accepted { accepted }))
}

/// The items of the batch in `body`, every one of them validated.
fn parse(body: &[u8], max_key: usize) -> Result<Vec<Item<'_>>, ApiError> {
    parse_batch(body, max_key).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// The reply to a batch the log did not take.
fn not_stored(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "append failed");
    ApiError::Unavailable(format!("the batch was not stored: {e}"))
}

/// Under `/items`: the count route (see [`count_route`]).
async fn items_subpath(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    get_count(count_route(&req)?, &state).await
}

/// `GET /items/{tenant}/count`: the tenant's count as of the latest merge round by any worker.
async fn get_count(raw: &str, state: &AppState) -> Result<HttpResponse, ApiError> {
    let store = state.store().cloned().ok_or_else(not_ready)?;
    // Decoded here, once, from the raw path: every string is a tenant, `/` and `%` included.
    let tenant = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::BadRequest("the tenant is not valid UTF-8 once percent-decoded".to_owned()))?
        .into_owned();
    let max = state.config.get().max_key_bytes.as_usize();
    if tenant.len() > max {
        return Err(ApiError::BadRequest(format!("the tenant is longer than max_key_bytes ({max} bytes)")));
    }
    match store.count(&tenant).get().await {
        Ok(count) => Ok(HttpResponse::Ok().json(Count { count })),
        Err(e) => {
            tracing::error!(tenant, error = %e, "count failed");
            let message = format!("the count could not be read: {e}");
            Err(match e {
                StoreError::Backend(_) => ApiError::Unavailable(message),
                _ => ApiError::Internal(message),
            })
        }
    }
}

/// `GET /health`: the process is alive and serving HTTP.
async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// `GET /ready`: the log is recovered and the worker takes ingest; with what the coordinator
/// needs to know of it (see [`Ready`]).
async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let failure = state.store().and_then(|store| store.failure().borrow().clone());
    match (state.store(), failure) {
        (Some(_), Some(why)) => Err(ApiError::Unavailable(format!("the worker is stopping: {why}"))),
        (Some(store), None) if !state.shutdown.is_cancelled() => Ok(HttpResponse::Ok().json(Ready {
            ready: true,
            config_version: Some(state.config.version()),
            answers_at_once: answers_at_once(&state.config.get()),
            pending_items: Some(store.pending_items()),
            merge_lag_s: Some(store.merge_lag().as_secs_f64()),
        })),
        (Some(_), None) => Err(ApiError::Unavailable("the worker is shutting down".to_owned())),
        (None, _) => Err(not_ready()),
    }
}

/// Which requests this worker answers at once under `config`: a count from Redis waits for
/// Redis, and a batch under `fsync: always` for the disk.
fn answers_at_once(config: &Config) -> AnswersAtOnce {
    AnswersAtOnce { counts: config.store == StoreKind::Json, batches: config.fsync != FsyncPolicy::Always }
}

/// `GET /stats`: what the worker has done, as JSON.
async fn stats(state: web::Data<AppState>, requests: web::Data<RequestCounter>) -> HttpResponse {
    let mut stats = WorkerStats {
        worker: state.worker_id.clone(),
        pid: std::process::id(),
        ready: false,
        config_version: Some(state.config.version()),
        requests: requests.served(),
        items_accepted: state.metrics.items_accepted(),
        answers_at_once: answers_at_once(&state.config.get()),
        ..WorkerStats::default()
    };
    if let Some(store) = state.store().map(|store| store.stats()) {
        stats.ready = true;
        stats.pending_items = store.pending_items;
        stats.merge_lag_s = store.merge_lag.as_secs_f64();
        stats.oldest_pending_s = store.oldest_pending.as_secs_f64();
        (stats.ids_in_memory, stats.ids_in_memory_bytes) = store.ids_in_memory;
        stats.log_bytes_appended = store.log_bytes_appended;
        stats.last_merge = store.last_merge.map(|(at, took, report)| MergeRound {
            at_unix_ms: unix_ms(at),
            took_ms: took.as_secs_f64() * 1000.0,
            log_files: report.log_files,
            items: report.items,
            tenants: report.tenants,
            new_ids: report.new_ids,
            deleted_files: report.deleted_files,
        });
        stats.quarantined = store
            .quarantined
            .into_iter()
            .map(|q| Quarantined {
                tenant: q.tenant,
                file: q.file.display().to_string(),
                reason: q.reason,
                kept_ids: q.kept_ids,
            })
            .collect();
    }
    HttpResponse::Ok().json(stats)
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
async fn shutdown(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if !from_coordinator(&req, &state) {
        return Err(ApiError::Forbidden("shutdown needs the token this worker was started with".to_owned()));
    }
    tracing::info!("shutdown requested");
    state.shutdown.cancel();
    Ok(HttpResponse::Accepted().json(json!({ "status": "shutting down" })))
}

/// The largest config a coordinator pushes: a few hundred bytes, plus about 30 per worker URL.
const MAX_CONFIG_BYTES: usize = 1 << 20;

/// `PUT /config`: with the coordinator's token, puts the config in the body (a [`ConfigPush`])
/// in force. `409` if it changes a key that only a restart can.
/// The token is checked before a byte of the body is read: without it, a request costs nothing.
async fn put_config(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if !from_coordinator(&req, &state) {
        return Err(ApiError::Forbidden("a config edit needs the token this worker was started with".to_owned()));
    }
    let config = state.config.get();
    let limits = BodyLimits { max: MAX_CONFIG_BYTES, ..BodyLimits::of(&config) };
    let body = read_body(&req, payload, limits, &state.bodies).await?;
    let config = std::str::from_utf8(&body)
        .map_err(|e| e.to_string())
        .and_then(|json| ConfigPush::from_body(json).map_err(|e| e.to_string()))
        .map_err(|e| ApiError::BadRequest(format!("invalid config: {e}")))?;
    match state.config.apply(config.0, state.store().map(|store| &**store)) {
        Ok(_) => Ok(HttpResponse::Ok().json(ConfigApplied { config_version: state.config.version() })),
        Err(e @ ApplyError::Fixed(_)) => Err(ApiError::Conflict(e.to_string())),
        Err(e) => Err(ApiError::BadRequest(e.to_string())),
    }
}

/// The query of `GET /identity`.
#[derive(Debug, serde::Deserialize)]
struct Challenge {
    challenge: String,
}

/// `GET /identity?challenge=<hex>`: proves to a coordinator that this worker holds the token it
/// was started with, without sending it (see [`token`]): a restarted coordinator adopts a
/// running worker only on this proof. A worker started by hand, without a token, has nothing to
/// prove.
async fn identity(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let query = web::Query::<Challenge>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("bad query: {e}")))?;
    if !token::is_hex(&query.challenge) {
        let message = format!("the challenge must be 1 to {} hex digits", token::MAX_CHALLENGE);
        return Err(ApiError::BadRequest(message));
    }
    let identity = state.identity(&query.challenge);
    let identity = identity.ok_or_else(|| ApiError::Forbidden("this worker was started without a token".to_owned()))?;
    Ok(HttpResponse::Ok().json(identity))
}

/// Whether the request carries the coordinator's token (`Authorization: Bearer <token>`).
fn from_coordinator(req: &HttpRequest, state: &AppState) -> bool {
    let presented = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()?.strip_prefix("Bearer "));
    presented.is_some_and(|token| state.is_shutdown_token(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_says_it_answers_at_once_only_what_waits_on_nothing_else() {
        let config = |yaml: &str| {
            Config::from_yaml_str(&format!("workers: [http://127.0.0.1:5001]\n{yaml}"), std::path::Path::new("/"))
                .unwrap()
        };
        assert_eq!(answers_at_once(&config("")), AnswersAtOnce { counts: true, batches: true });
        let redis = config("store: redis\nredis_url: redis://127.0.0.1:6379");
        assert_eq!(answers_at_once(&redis), AnswersAtOnce { counts: false, batches: true });
        assert_eq!(answers_at_once(&config("fsync: always")), AnswersAtOnce { counts: true, batches: false });
    }
}
