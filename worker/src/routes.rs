//! The worker's HTTP API (the README's "Using it"): ingest, counts, membership, health, stats,
//! metrics; the coordinator's graceful shutdown and config edits; and the steps of the other
//! workers' barriers (see `barrier`). Every error is an [`ApiError`].

use std::sync::Arc;
use std::time::Duration;

use crate::items::parse_batch;
use actix_web::http::header::{AUTHORIZATION, ContentType};
use actix_web::web;
use actix_web::{HttpRequest, HttpResponse};
use countapp_server::edge::body::{BodyLimits, read_body};
use countapp_server::http::{ApiError, RequestCounter, TenantRoute, no_such_route, resource, tenant_route};
use countapp_shared::api::{
    Accepted, Consistency, Contains, Count, Counts, Deleted, ListedTenant, MAX_CONTAINS_IDS, MAX_COUNTS_TENANTS,
    MAX_TENANTS_PAGE, TENANTS_PAGE, Tenants, Wait,
};
use countapp_shared::config::{Config, FsyncPolicy};
use countapp_shared::token;
use countapp_shared::wire::{
    AnswersAtOnce, BARRIER_CLOSE_ROUTE, BARRIER_PASSED_ROUTE, BARRIER_SETTLE_ROUTE, ConfigApplied, ConfigPush,
    MergeRound, Quarantined, Ready, SettleRequest, Settled, WorkerStats, unix_ms,
};
use countapp_store::{Answer, Item, Store, shard_of};
use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::BTreeSet;

use crate::barrier;
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
    .service(resource("/counts").route(web::post().to(post_counts)))
    .service(resource("/tenants").route(web::get().to(get_tenants)))
    .service(resource(BARRIER_CLOSE_ROUTE).route(web::post().to(barrier_close)))
    .service(resource(BARRIER_SETTLE_ROUTE).route(web::post().to(barrier_settle)))
    .service(resource(BARRIER_PASSED_ROUTE).route(web::post().to(barrier_passed)))
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

/// `POST /items`: validates the whole batch, appends it to the log, and answers once durable;
/// with `?wait=counted`, once a barrier has made its items visible to every worker's counts.
async fn post_items(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let store = state.store().ok_or_else(not_ready)?;
    let IngestQuery { wait } = query(&req)?;
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
    let shards_of = move |items: &[Item<'_>], store: &Store| match wait {
        Wait::Durable => BTreeSet::new(),
        Wait::Counted => items.iter().map(|item| shard_of(&item.tenant, store.shards())).collect(),
    };
    let (accepted, shards) = if body.len() < PARSE_ELSEWHERE_FROM {
        let items = parse(&body, max_key)?;
        store.append(&items).await.map_err(not_stored)?;
        (items.len(), shards_of(&items, store))
    } else {
        let (store, body) = (store.clone(), body.bytes().clone());
        let stored = web::block(move || {
            let items = parse(&body, max_key)?;
            store.append_blocking(&items).map_err(not_stored)?;
            Ok::<_, ApiError>((items.len(), shards_of(&items, &store)))
        });
        stored.await.map_err(|e| ApiError::Internal(format!("the batch could not be parsed: {e}")))??
    };
    state.metrics.accepted(accepted as u64);
    if wait == Wait::Counted && !shards.is_empty() {
        state.barriers.pass(&state, shards, None).await.map_err(|e| {
            ApiError::Unavailable(format!(
                "the batch is stored, but not yet counted everywhere ({e}); posting it again is safe"
            ))
        })?;
    }
    Ok(HttpResponse::Ok().json(Accepted { accepted }))
}

/// The query of `POST /items`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestQuery {
    #[serde(default)]
    wait: Wait,
}

/// The query of every read: how fresh it must be.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    #[serde(default)]
    consistency: Consistency,
}

/// A query the routes take, and the parameters it has, for the 400 of a bad one.
trait Query: DeserializeOwned + Default {
    const TAKES: &'static str;
}

impl Query for IngestQuery {
    const TAKES: &'static str = "wait=durable (the default) or wait=counted";
}

impl Query for ListQuery {
    const TAKES: &'static str = "prefix, after and limit (1 to 10000)";
}

impl Query for ReadQuery {
    const TAKES: &'static str = "consistency=eventual (the default) or consistency=strong";
}

/// The query of `GET /tenants`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    after: String,
    limit: Option<usize>,
}

/// The request's query as `T`; a 400 for an unknown parameter or value. A request without a
/// query, nearly every one, parses nothing.
fn query<T: Query>(req: &HttpRequest) -> Result<T, ApiError> {
    if req.query_string().is_empty() {
        return Ok(T::default());
    }
    web::Query::<T>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::BadRequest(format!("bad query: {e}; this route takes {}", T::TAKES)))
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

/// Under `/items`: the routes of one tenant (see [`tenant_route`]).
async fn items_subpath(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    match tenant_route(&req)? {
        (TenantRoute::Count, raw) => get_count(&req, raw, &state).await,
        (TenantRoute::Contains, raw) => post_contains(&req, payload, raw, &state).await,
        (TenantRoute::Tenant, raw) => delete_tenant(raw, &state).await,
    }
}

/// `DELETE /items/{tenant}`: once a barrier has deleted the tenant everywhere, every id
/// acknowledged before the request is gone for good; ids acknowledged after count afresh.
async fn delete_tenant(raw: &str, state: &web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store().cloned().ok_or_else(not_ready)?;
    let tenant = tenant_of(raw, state)?;
    if tenant.is_empty() {
        return Err(ApiError::BadRequest("the tenant is empty".to_owned()));
    }
    let shard = shard_of(&tenant, store.shards());
    state.barriers.pass(state, BTreeSet::from([shard]), Some(tenant.clone())).await?;
    tracing::info!(tenant, "tenant deleted");
    Ok(HttpResponse::Ok().json(Deleted { deleted: true }))
}

/// `GET /items/{tenant}/count`: the tenant's count as of the latest merge round by any worker;
/// with `?consistency=strong`, once a barrier has passed for its shard.
async fn get_count(req: &HttpRequest, raw: &str, state: &web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store().cloned().ok_or_else(not_ready)?;
    let ReadQuery { consistency } = query(req)?;
    let tenant = tenant_of(raw, state)?;
    if consistency == Consistency::Strong {
        strong(state, &store, [tenant.as_str()]).await?;
    }
    match store.count(&tenant).get().await {
        Ok(count) => Ok(HttpResponse::Ok().json(Count { count })),
        Err(e) => Err(not_read(e, &tenant)),
    }
}

/// `POST /items/{tenant}/contains` with a JSON array of ids: whether each is in the tenant's
/// set, in their order; `?consistency=strong` as for counts.
async fn post_contains(
    req: &HttpRequest,
    payload: web::Payload,
    raw: &str,
    state: &web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let store = state.store().cloned().ok_or_else(not_ready)?;
    let ReadQuery { consistency } = query(req)?;
    let tenant = tenant_of(raw, state)?;
    let ids = read_names(req, payload, state, "ids", MAX_CONTAINS_IDS).await?;
    if consistency == Consistency::Strong {
        strong(state, &store, [tenant.as_str()]).await?;
    }
    match read(&store, (tenant.clone(), ids), |store, (tenant, ids)| store.contains(tenant, ids)).await {
        Ok(contains) => Ok(HttpResponse::Ok().json(Contains { contains })),
        Err(e) => Err(not_read(e, &tenant)),
    }
}

/// `POST /counts` with a JSON array of tenants: each one's count, 0 for a tenant never posted
/// to; `?consistency=strong` as for one count.
async fn post_counts(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let store = state.store().cloned().ok_or_else(not_ready)?;
    let ReadQuery { consistency } = query(&req)?;
    let tenants = read_names(&req, payload, &state, "tenants", MAX_COUNTS_TENANTS).await?;
    if consistency == Consistency::Strong {
        strong(&state, &store, tenants.iter().map(String::as_str)).await?;
    }
    let tenants = Arc::new(tenants);
    match read(&store, tenants.clone(), |store, tenants| store.counts(tenants)).await {
        Ok(counts) => {
            // The read let go of its share of the names once answered: nothing is copied.
            let counts = Arc::unwrap_or_clone(tenants).into_iter().zip(counts).collect();
            Ok(HttpResponse::Ok().json(Counts { counts }))
        }
        Err(e) => Err(not_read(e, "one of the tenants")),
    }
}

/// `GET /tenants?prefix=&after=&limit=`: a page of the tenants whose names start with `prefix`
/// and come after `after`, in byte order of their names, each with its eventual count.
async fn get_tenants(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store().cloned().ok_or_else(not_ready)?;
    let ListQuery { prefix, after, limit } = query(&req)?;
    let limit = limit.unwrap_or(TENANTS_PAGE);
    if !(1..=MAX_TENANTS_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be 1 to {MAX_TENANTS_PAGE}, not {limit}")));
    }
    let max = state.config.get().max_key_bytes.as_usize();
    if prefix.len() > max || after.len() > max {
        return Err(ApiError::BadRequest(format!("prefix and after are at most max_key_bytes ({max} bytes)")));
    }
    let page = read(&store, (prefix, after), move |store, (prefix, after)| store.list(prefix, after, limit));
    let page = page.await.map_err(|e| not_read(e, "the listing"))?;
    let tenants = page
        .tenants
        .into_iter()
        .map(|(tenant, count)| match count {
            Ok(count) => ListedTenant { tenant, count, error: None },
            Err(why) => ListedTenant { tenant, count: 0, error: Some(why) },
        })
        .collect();
    Ok(HttpResponse::Ok().json(Tenants { tenants, next: page.next }))
}

/// The answer of the store to `ask` with `args`. Where the store reads files on the calling
/// thread, on a thread that may block: a membership check, many counts or a listing take
/// milliseconds, which the worker's one HTTP thread would spend answering no one, other
/// workers' barrier steps included. Where answers come over the network, awaited here.
async fn read<A: Send + 'static, T: Send + 'static>(
    store: &Arc<Store>,
    args: A,
    ask: impl for<'a> FnOnce(&'a Store, &'a A) -> Answer<'a, T> + Send + 'static,
) -> Result<T, StoreError> {
    if !store.reads_files() {
        return ask(store, &args).get().await;
    }
    let store = store.clone();
    let answered = web::block(move || match ask(&store, &args) {
        Answer::Now(answer) => answer,
        // A thread of the blocking pool may wait on the runtime that the HTTP thread drives.
        Answer::Later(answer) => tokio::runtime::Handle::current().block_on(answer),
    });
    answered.await.unwrap_or_else(|e| Err(StoreError::Busy(format!("the read did not finish: {e}"))))
}

/// Waits for a barrier over the shards of `tenants` (see `barrier`).
async fn strong<'a>(
    state: &web::Data<AppState>,
    store: &Store,
    tenants: impl IntoIterator<Item = &'a str>,
) -> Result<(), ApiError> {
    let shards = tenants.into_iter().map(|tenant| shard_of(tenant, store.shards())).collect();
    state.barriers.pass(state, shards, None).await
}

/// The tenant of a route, percent-decoded here, once, from the raw path: every string is a
/// tenant, `/` and `%` included.
fn tenant_of(raw: &str, state: &AppState) -> Result<String, ApiError> {
    let tenant = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ApiError::BadRequest("the tenant is not valid UTF-8 once percent-decoded".to_owned()))?
        .into_owned();
    let max = state.config.get().max_key_bytes.as_usize();
    if tenant.len() > max {
        return Err(ApiError::BadRequest(format!("the tenant is longer than max_key_bytes ({max} bytes)")));
    }
    Ok(tenant)
}

/// The body of a read that names tenants or ids: a JSON array of at most `max` strings, each
/// non-empty and within `max_key_bytes`; a 400 saying what is wrong otherwise.
async fn read_names(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    what: &str,
    max: usize,
) -> Result<Vec<String>, ApiError> {
    let config = state.config.get();
    let body = read_body(req, payload, BodyLimits::of(&config), &state.bodies).await?;
    let names: Vec<String> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body must be a JSON array of {what} (strings): {e}")))?;
    if names.len() > max {
        return Err(ApiError::BadRequest(format!("{} {what} asked; at most {max} per request", names.len())));
    }
    let max_key = config.max_key_bytes.as_usize();
    if let Some((at, name)) = names.iter().enumerate().find(|(_, name)| name.is_empty() || name.len() > max_key) {
        let why = if name.is_empty() {
            "is empty".to_owned()
        } else {
            format!("is longer than max_key_bytes ({max_key} bytes)")
        };
        return Err(ApiError::BadRequest(format!("{what}[{at}] {why}")));
    }
    Ok(names)
}

/// The reply to a read the store could not answer.
fn not_read(e: StoreError, tenant: &str) -> ApiError {
    tracing::error!(tenant, error = %e, "read failed");
    let message = format!("the sets could not be read: {e}");
    match e {
        StoreError::Backend(_) | StoreError::Busy(_) => ApiError::Unavailable(message),
        _ => ApiError::Internal(message),
    }
}

/// `POST /barrier/close`: another worker's barrier has this one close its log.
async fn barrier_close(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store().cloned().ok_or_else(not_ready)?;
    barrier::step(&store, |store| store.close_log()).await?;
    Ok(HttpResponse::Ok().json(Settled { worker: state.worker_id.clone(), shards: Vec::new() }))
}

/// The largest barrier settle body: a list of shard numbers.
const MAX_SETTLE_BYTES: usize = 1 << 20;

/// `POST /barrier/settle`: another worker's barrier has this one merge what changed, and say
/// which of the shards asked it vouches for.
async fn barrier_settle(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let store = state.store().cloned().ok_or_else(not_ready)?;
    let limits = BodyLimits { max: MAX_SETTLE_BYTES, ..BodyLimits::of(&state.config.get()) };
    let body = read_body(&req, payload, limits, &state.bodies).await?;
    let SettleRequest { shards, delete } =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("not a settle request: {e}")))?;
    if let Some(shard) = shards.iter().find(|&&shard| shard >= store.shards()) {
        return Err(ApiError::BadRequest(format!("shard {shard} is not below the {} shards", store.shards())));
    }
    if let Some(tenant) = delete.iter().find(|t| !shards.contains(&shard_of(t, store.shards()))) {
        return Err(ApiError::BadRequest(format!("tenant {tenant:?} to delete is in none of the shards asked")));
    }
    let shards = barrier::step(&store, move |store| store.settle(&shards, &delete)).await?;
    Ok(HttpResponse::Ok().json(Settled { worker: state.worker_id.clone(), shards }))
}

/// `POST /barrier/passed`: another worker's barrier passed, and this one forgets the counts it
/// keeps from earlier reads.
async fn barrier_passed(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let store = state.store().cloned().ok_or_else(not_ready)?;
    store.forget_reads();
    Ok(HttpResponse::Ok().json(Settled { worker: state.worker_id.clone(), shards: Vec::new() }))
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

/// Which requests this worker answers at once under `config`: a batch under `fsync: always`
/// waits for the disk.
fn answers_at_once(config: &Config) -> AnswersAtOnce {
    AnswersAtOnce { batches: config.fsync != FsyncPolicy::Always }
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
    fn a_worker_says_it_answers_batches_at_once_unless_each_waits_for_an_fsync() {
        let config = |yaml: &str| {
            Config::from_yaml_str(&format!("workers: [http://127.0.0.1:5001]\n{yaml}"), std::path::Path::new("/"))
                .unwrap()
        };
        assert_eq!(answers_at_once(&config("")), AnswersAtOnce { batches: true });
        let redis = config("store: redis\nredis_url: redis://127.0.0.1:6379");
        assert_eq!(answers_at_once(&redis), AnswersAtOnce { batches: true });
        assert_eq!(answers_at_once(&config("fsync: always")), AnswersAtOnce { batches: false });
    }
}
