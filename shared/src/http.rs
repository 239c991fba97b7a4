//! What both servers do alike: JSON errors, bounded request bodies, and counting requests.

use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::CONTENT_LENGTH;
use actix_web::middleware::Next;
use actix_web::web::{self, BytesMut};
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::api::ErrorBody;

/// A JSON error reply: `{"error": message}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody::new(message))
}

/// A resource whose other methods get a JSON 405, not an empty one.
pub fn resource(path: &str) -> actix_web::Resource {
    web::resource(path)
        .default_service(web::to(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed") }))
}

/// The JSON 404 for a path no route matches.
pub async fn no_such_route() -> HttpResponse {
    error(StatusCode::NOT_FOUND, "no such route")
}

/// Reads a request body of at most `max` bytes. A larger one gets a JSON 413 as soon as it is
/// known to be too large (from its `Content-Length`, or once the bytes read exceed `max`), so
/// that an oversize body never sits in memory.
pub async fn read_body(req: &HttpRequest, mut payload: web::Payload, max: usize) -> Result<BytesMut, HttpResponse> {
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body exceeds max_body_bytes ({max} bytes)"));
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large());
    }
    let mut body = BytesMut::with_capacity(declared.unwrap_or(8 << 10).min(max));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading the body failed: {e}")))?;
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The metrics name of the count route.
const COUNT_ROUTE: &str = "/items/{tenant}/count";

/// Matches `GET /items/{tenant}/count` under the `/items` scope: returns the tenant segment,
/// still percent-encoded, or the JSON 404 or 405 to answer instead.
///
/// Both servers match this route by hand, under a static `/items` scope: actix matches a
/// dynamic segment with a regular expression on every request, and again to name the route for
/// metrics, which cost a worker serving counts a tenth of its time.
#[expect(clippy::result_large_err, reason = "the error is the reply itself, built once per rejected request")]
pub fn count_route(req: &HttpRequest) -> Result<&str, HttpResponse> {
    let raw = req.path().strip_prefix("/items/").and_then(|p| p.strip_suffix("/count"));
    let Some(raw) = raw.filter(|raw| !raw.is_empty() && !raw.contains('/')) else {
        return Err(error(StatusCode::NOT_FOUND, "no such route"));
    };
    if req.method() != actix_web::http::Method::GET {
        return Err(error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"));
    }
    req.extensions_mut().insert(RouteLabel(COUNT_ROUTE));
    Ok(raw)
}

/// A route name given to a request matched by hand, for metrics.
#[derive(Debug, Clone, Copy)]
struct RouteLabel(&'static str);

/// The labels of a served request: its route pattern (never the raw path, whose tenants would
/// make the series unbounded) and its status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
}

/// Counts the requests a server answers, by route and status, for `/metrics` and `/stats`.
#[derive(Debug, Default)]
pub struct RequestCounter {
    by_route: Family<RequestLabels, Counter>,
    served: AtomicU64,
}

impl RequestCounter {
    /// A counter registered in `registry` as `requests`.
    pub fn registered(registry: &mut Registry) -> RequestCounter {
        let counter = RequestCounter::default();
        registry.register("requests", "HTTP requests served, by route and status", counter.by_route.clone());
        counter
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn count(&self, route: &str, status: u16) {
        self.by_route.get_or_create(&RequestLabels { route: route.to_owned(), status }).inc();
        self.served.fetch_add(1, Ordering::Relaxed);
    }
}

/// Middleware: counts every request in the app's `web::Data<RequestCounter>`, and logs it at
/// debug level.
pub async fn count_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let counter = req.app_data::<web::Data<RequestCounter>>().cloned();
    let method = req.method().clone();
    let path = req.path().to_owned();
    let res = next.call(req).await?;
    let labelled = res.request().extensions().get::<RouteLabel>().map(|label| label.0.to_owned());
    let route = labelled.or_else(|| res.request().match_pattern()).unwrap_or_else(|| "unmatched".to_owned());
    let status = res.status().as_u16();
    if let Some(counter) = counter {
        counter.count(&route, status);
    }
    tracing::debug!(%method, path, status, "request");
    Ok(res)
}
