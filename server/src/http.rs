//! What both servers do alike: one error type for every JSON error, the routes' JSON 404 and
//! 405, and counting requests.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::RETRY_AFTER;
use actix_web::middleware::Next;
use actix_web::web;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, ResponseError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::edge::stalled::RequestSeen;
use countapp_shared::api::ErrorBody;

/// Every error either server answers, and the one place that picks its status: handlers return
/// `Result<_, ApiError>`, and actix turns the error into `{"error": message}` with that status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; nothing of it was applied.
    #[error("{0}")]
    BadRequest(String),
    /// 403: the request needs the token the worker was started with.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no route matches the path.
    #[error("no such route")]
    NotFound,
    /// 405: the route exists, not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 408: the request did not arrive within `request_timeout`; the connection is closed.
    #[error("{0}")]
    RequestTimeout(String),
    /// 409: the request conflicts with what runs (a config edit of a fixed key).
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is over `max_body_bytes`.
    #[error("the body exceeds max_body_bytes ({0} bytes)")]
    TooLarge(usize),
    /// 500: the server cannot answer this request (a tenant in quarantine, a damaged file).
    #[error("{0}")]
    Internal(String),
    /// 502: the workers the request was tried on answered with something that is no reply.
    #[error("{0}")]
    BadGateway(String),
    /// 503: the server cannot take the request now; retry, here or elsewhere.
    #[error("{0}")]
    Unavailable(String),
    /// 503 with `Retry-After: 1`: the server pushes back under load; retry shortly.
    #[error("{0}")]
    PushBack(String),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) | ApiError::PushBack(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut reply = HttpResponse::build(self.status_code());
        match self {
            ApiError::PushBack(_) => {
                reply.insert_header((RETRY_AFTER, "1"));
            }
            // The rest of the body may still come: the connection cannot carry another request.
            ApiError::RequestTimeout(_) => {
                reply.force_close();
            }
            _ => {}
        }
        reply.json(ErrorBody::new(self.to_string()))
    }
}

/// A resource whose other methods get a JSON 405, not an empty one.
pub fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(|| async { ApiError::MethodNotAllowed.error_response() }))
}

/// The JSON 404 for a path no route matches.
pub async fn no_such_route() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// A route under `/items/{tenant}/`, which both servers match by hand (see [`tenant_route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantRoute {
    /// `GET /items/{tenant}/count`.
    Count,
    /// `POST /items/{tenant}/contains`.
    Contains,
    /// `DELETE /items/{tenant}`.
    Tenant,
}

impl TenantRoute {
    /// The route's last segment, its method, and its name in metrics.
    fn parts(self) -> (&'static str, actix_web::http::Method, &'static str) {
        match self {
            TenantRoute::Count => ("/count", actix_web::http::Method::GET, "/items/{tenant}/count"),
            TenantRoute::Contains => ("/contains", actix_web::http::Method::POST, "/items/{tenant}/contains"),
            TenantRoute::Tenant => ("", actix_web::http::Method::DELETE, "/items/{tenant}"),
        }
    }
}

/// Matches `GET /items/{tenant}/count`, `POST /items/{tenant}/contains` and `DELETE
/// /items/{tenant}` under the `/items` scope: returns the route and the tenant segment, still
/// percent-encoded, or the JSON 404 or 405 to answer instead.
///
/// Both servers match these routes by hand, under a static `/items` scope: actix matches a
/// dynamic segment with a regular expression on every request, and again to name the route for
/// metrics, which cost a worker serving counts a tenth of its time.
pub fn tenant_route(req: &HttpRequest) -> Result<(TenantRoute, &str), ApiError> {
    let rest = req.path().strip_prefix("/items/").ok_or(ApiError::NotFound)?;
    for route in [TenantRoute::Count, TenantRoute::Contains, TenantRoute::Tenant] {
        let (suffix, method, label) = route.parts();
        let Some(raw) = rest.strip_suffix(suffix).filter(|raw| !raw.is_empty() && !raw.contains('/')) else {
            continue;
        };
        if req.method() != method {
            return Err(ApiError::MethodNotAllowed);
        }
        req.extensions_mut().insert(RouteLabel(label));
        return Ok((route, raw));
    }
    Err(ApiError::NotFound)
}

/// A route name given to a request matched by hand, for metrics.
#[derive(Debug, Clone, Copy)]
struct RouteLabel(&'static str);

/// The labels of a served request: its route pattern (never the raw path, whose tenants would
/// make the series unbounded) and its status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Cow<'static, str>,
    status: u16,
}

/// The label of a request's duration: its route pattern alone, so that the histograms stay few.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Cow<'static, str>,
}

/// The buckets of request durations, in seconds: from a count answered in tens of microseconds
/// to a 16 MiB batch, or a request that waited out the hop's retries.
const DURATION_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// Counts the requests a server answers, by route and status, and times them by route, for
/// `/metrics` and `/stats`.
#[derive(Debug)]
pub struct RequestCounter {
    by_route: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram, fn() -> Histogram>,
    served: AtomicU64,
}

impl RequestCounter {
    /// A counter registered in `registry` as `requests`, with its durations as
    /// `request_duration_seconds`.
    pub fn registered(registry: &mut Registry) -> RequestCounter {
        let counter = RequestCounter {
            by_route: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            served: AtomicU64::new(0),
        };
        registry.register("requests", "HTTP requests served, by route and status", counter.by_route.clone());
        registry.register(
            "request_duration_seconds",
            "Time from a request's head read to its reply, by route",
            counter.durations.clone(),
        );
        counter
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn count(&self, route: Cow<'static, str>, status: u16, seconds: f64) {
        self.durations.get_or_create(&RouteLabels { route: route.clone() }).observe(seconds);
        self.by_route.get_or_create(&RequestLabels { route, status }).inc();
        self.served.fetch_add(1, Ordering::Relaxed);
    }
}

/// Middleware: counts every request in the app's `web::Data<RequestCounter>`, logs it at debug
/// level, and tells the stalled-connection watch that its head is in. A request matched by hand or by a static route costs it no allocation, and the
/// log's copy of the path is made only when debug logging is on.
pub async fn count_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    // Its head is in: its connection is not stalled while it is served.
    let _seen = RequestSeen::new(req.request());
    let counter = req.app_data::<web::Data<RequestCounter>>().cloned();
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| (req.method().clone(), req.path().to_owned()));
    let started = Instant::now();
    let res = next.call(req).await?;
    let seconds = started.elapsed().as_secs_f64();
    let labelled = res.request().extensions().get::<RouteLabel>().map(|label| Cow::Borrowed(label.0));
    let route =
        labelled.or_else(|| res.request().match_pattern().map(Cow::Owned)).unwrap_or(Cow::Borrowed("unmatched"));
    let status = res.status().as_u16();
    if let Some(counter) = counter {
        counter.count(route, status, seconds);
    }
    if let Some((method, path)) = logged {
        tracing::debug!(%method, path, status, "request");
    }
    Ok(res)
}
