//! The coordinator's HTTP API: the workers' API forwarded, plus its own health, readiness,
//! stats and metrics, and the dashboard. The workers' internal routes (config, shutdown,
//! barriers) are not forwarded.

use actix_web::http::Method;
use actix_web::http::header::ContentType;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use countapp_server::edge::body::{BodyLimits, read_body};
use countapp_server::http::{ApiError, RequestCounter, TenantRoute, no_such_route, resource, tenant_route};
use countapp_shared::wire::CoordinatorReady;
use serde_json::json;

use crate::dashboard;
use crate::proxy::forward;
use crate::state::AppState;
use crate::stats::coordinator_stats;
use crate::upstream::{Forward, Kind, Upstream, valid_target};

/// Registers every route of the coordinator.
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/items")
            .service(resource("").route(web::post().to(post_items)))
            .default_service(web::to(items_subpath)),
    )
    .service(resource("/counts").route(web::post().to(post_counts)))
    .service(resource("/tenants").route(web::get().to(get_tenants)))
    .service(resource("/health").route(web::get().to(health)))
    .service(resource("/ready").route(web::get().to(ready)))
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
    let kind = if asks(&req, "wait", "counted") { Kind::Barrier } else { Kind::Batch };
    forward_post(req, payload, &state, &upstream, kind).await
}

/// `POST /counts`: forwarded with its body.
async fn post_counts(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    upstream: web::Data<Upstream>,
) -> Result<HttpResponse, ApiError> {
    // Up to 10,000 counts, even eventual ones, take their time: never on a pipelined
    // connection, where the requests queued behind would wait for them, and with the longer hop
    // timeout.
    let kind = if asks(&req, "consistency", "strong") { Kind::Barrier } else { Kind::Waits };
    forward_post(req, payload, &state, &upstream, kind).await
}

/// `GET /tenants`: forwarded with its query.
async fn get_tenants(
    req: HttpRequest,
    state: web::Data<AppState>,
    upstream: web::Data<Upstream>,
) -> Result<HttpResponse, ApiError> {
    let target = raw_target(&req)?;
    // A page reads a thousand counts: never on a pipelined connection.
    forward(&state, &upstream, Forward { method: Method::GET, target, body: Bytes::new(), kind: Kind::Waits }).await
}

/// Under `/items`: the routes of one tenant (see [`tenant_route`]), forwarded with the path
/// exactly as the client encoded it.
async fn items_subpath(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    upstream: web::Data<Upstream>,
) -> Result<HttpResponse, ApiError> {
    let kind = read_kind(&req);
    match tenant_route(&req)?.0 {
        TenantRoute::Count => {
            let target = raw_target(&req)?;
            forward(&state, &upstream, Forward { method: Method::GET, target, body: Bytes::new(), kind }).await
        }
        TenantRoute::Contains => forward_post(req, payload, &state, &upstream, kind).await,
        TenantRoute::Tenant => {
            let target = raw_target(&req)?;
            let delete = Forward { method: Method::DELETE, target, body: Bytes::new(), kind: Kind::Barrier };
            forward(&state, &upstream, delete).await
        }
    }
}

/// Forwards a `POST`, its body bounded here: a 413 costs no hop.
async fn forward_post(
    req: HttpRequest,
    payload: web::Payload,
    state: &AppState,
    upstream: &Upstream,
    kind: Kind,
) -> Result<HttpResponse, ApiError> {
    let limits = BodyLimits::of(&state.ctx.config.borrow());
    let body = read_body(&req, payload, limits, &state.bodies).await?;
    let target = raw_target(&req)?;
    forward(state, upstream, Forward { method: Method::POST, target, body: body.bytes().clone(), kind }).await
}

/// What a read asks of a worker: a barrier, if it is a strong one.
fn read_kind(req: &HttpRequest) -> Kind {
    if asks(req, "consistency", "strong") { Kind::Barrier } else { Kind::Read }
}

/// Whether the request's query sets `key` to `value`, percent-decoded as the worker reads it.
/// The worker validates the query; this only picks how the request is forwarded.
fn asks(req: &HttpRequest, key: &str, value: &str) -> bool {
    !req.query_string().is_empty()
        && web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .is_ok_and(|query| query.iter().any(|(k, v)| k == key && v == value))
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

/// `GET /health`: liveness: the coordinator is up, however many workers take requests (a
/// supervisor restarting it for having none would only make things worse).
async fn health(state: web::Data<AppState>) -> HttpResponse {
    let live = state.ctx.pool.live_count();
    HttpResponse::Ok().json(json!({ "status": "ok", "live_workers": live }))
}

/// `GET /ready`: readiness, for a load balancer: 200 while some worker takes requests, 503 with
/// the reason while none does, so that clients are sent to a coordinator that can serve them.
async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let live_workers = state.ctx.pool.live_count();
    if live_workers > 0 {
        return HttpResponse::Ok().json(CoordinatorReady { ready: true, live_workers, error: None });
    }
    let members = state.ctx.pool.members();
    let error = if members.is_empty() {
        "no worker is ready: the config lists none".to_owned()
    } else {
        let states: Vec<String> = members.iter().map(|m| format!("{} {}", m.url, m.status().state.name())).collect();
        format!("no worker is ready ({})", states.join(", "))
    };
    HttpResponse::ServiceUnavailable().json(CoordinatorReady { ready: false, live_workers, error: Some(error) })
}

/// `GET /stats`: every worker's state and counts, the cluster's totals, and the config status.
async fn stats(state: web::Data<AppState>, requests: web::Data<RequestCounter>) -> HttpResponse {
    let config = state.config_status.lock().clone();
    HttpResponse::Ok().json(coordinator_stats(&state.ctx.pool, &config, &requests))
}

/// `GET /metrics`: Prometheus text.
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType(
            "application/openmetrics-text; version=1.0.0; charset=utf-8".parse().expect("a valid media type"),
        ))
        .body(state.metrics.render(&state.ctx.pool))
}
