//! The operator's dashboard: `GET /` serves one page whose HTML, CSS and JavaScript are compiled
//! into the binary, and `GET /dashboard.json` the cluster view that page polls every second
//! (documented in README.md, for scripts too).

use actix_web::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use actix_web::{HttpRequest, HttpResponse, web};
use countapp_server::http::{ApiError, resource};
use serde::Deserialize;

use crate::state::AppState;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const DASHBOARD_CSS: &str = include_str!("../assets/dashboard.css");
const DASHBOARD_JS: &str = include_str!("../assets/dashboard.js");

/// The browser itself refuses anything from outside this coordinator, and any inline script: the
/// page works offline, and text from the cluster (errors, tenant names) can never run as code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Registers the page, its two assets and its JSON.
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/").route(web::get().to(|| async { asset("text/html; charset=utf-8", INDEX_HTML) })))
        .service(
            resource("/dashboard.css")
                .route(web::get().to(|| async { asset("text/css; charset=utf-8", DASHBOARD_CSS) })),
        )
        .service(
            resource("/dashboard.js")
                .route(web::get().to(|| async { asset("text/javascript; charset=utf-8", DASHBOARD_JS) })),
        )
        .service(resource("/dashboard.json").route(web::get().to(dashboard_json)));
}

/// A compiled-in file. `no-cache`: a browser revalidates, so a new binary's page is never mixed
/// with an old one's script.
fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, content_type))
        .insert_header((CACHE_CONTROL, "no-cache"))
        .insert_header((X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((CONTENT_SECURITY_POLICY, CSP))
        .body(body)
}

/// The query of `GET /dashboard.json`.
#[derive(Debug, Deserialize)]
struct Query {
    /// Only samples and events after this time (unix ms): a poller asks for what it lacks.
    #[serde(default)]
    since: u64,
}

/// `GET /dashboard.json[?since=<unix ms>]`: the shared snapshot of the cluster; see README.md.
async fn dashboard_json(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let query = web::Query::<Query>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("bad query: {e}")))?
        .into_inner();
    match state.cluster_view.read(query.since).await {
        Some(body) => Ok(HttpResponse::Ok().insert_header((CACHE_CONTROL, "no-store")).json(body)),
        None => Err(ApiError::Unavailable("the cluster view is not ready yet; try again in a second".to_owned())),
    }
}
