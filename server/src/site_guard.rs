//! Refuses what a browser sends on another site's behalf, and what reaches a server on a
//! loopback address under a host name that is not its own: a page in the operator's browser
//! can neither post to a coordinator or worker on localhost (cross-site request forgery, which
//! needs no CORS preflight for a `text/plain` POST) nor read its replies by making its own name
//! resolve to 127.0.0.1 (DNS rebinding). curl, scripts, the load tool, the coordinator's hop and
//! the dashboard's own page are unaffected: they send no `Origin` or `Sec-Fetch-Site` naming
//! another site, and a loopback `Host`.
//!
//! Refused with a JSON 403, before any route runs:
//! - a request whose `Origin` is not the server's own (`http://` and its `Host`; `null` too);
//! - a request a browser marks `Sec-Fetch-Site: cross-site` or `same-site` (a page on another
//!   port of localhost is the same site, not the same origin);
//! - on a server listening on a loopback address, a `Host` other than `localhost`,
//!   `127.0.0.1`, `[::1]` and the server's own address, each with any port or none.
//!
//! Except a navigation (`Sec-Fetch-Mode: navigate`, `GET` or `HEAD` only), such as a link to
//! the dashboard followed from another site: it changes nothing, and the other site cannot
//! read what it gets.

use std::net::SocketAddr;
use std::rc::Rc;

use actix_web::body::EitherBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::header::{HOST, HeaderMap, ORIGIN};
use actix_web::http::{Method, header::HeaderName};
use actix_web::{HttpRequest, ResponseError};
use futures_util::TryFutureExt;
use futures_util::future::{Either, MapOk, Ready, ready};

use crate::http::ApiError;

const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
const SEC_FETCH_MODE: HeaderName = HeaderName::from_static("sec-fetch-mode");

/// The guard of one server: wrap the server's app in it.
#[derive(Debug, Clone)]
pub struct SiteGuard {
    /// The host names accepted in `Host`, for a server on a loopback address; `None` for a
    /// server on any other address, whose names only DNS knows.
    hosts: Option<Rc<[String]>>,
}

impl SiteGuard {
    /// The guard of a server listening on `addr`.
    pub fn listening_on(addr: SocketAddr) -> SiteGuard {
        let hosts = addr.ip().is_loopback().then(|| {
            let own = match addr {
                SocketAddr::V4(v4) => v4.ip().to_string(),
                SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
            };
            ["localhost".to_owned(), "127.0.0.1".to_owned(), "[::1]".to_owned(), own].into()
        });
        SiteGuard { hosts }
    }

    /// Why `req` is refused, if it is.
    fn refusal(&self, req: &HttpRequest) -> Option<String> {
        let headers = req.headers();
        let host = header(headers, &HOST);
        if let (Some(hosts), Some(host)) = (&self.hosts, host) {
            let name = host_name(host);
            if !hosts.iter().any(|allowed| allowed.eq_ignore_ascii_case(name)) {
                return Some(format!(
                    "Host {host:?} is not a name of this server: on a loopback address it answers only to {}",
                    hosts.join(", ")
                ));
            }
        }
        let navigation =
            header(headers, &SEC_FETCH_MODE) == Some("navigate") && matches!(*req.method(), Method::GET | Method::HEAD);
        if navigation {
            return None;
        }
        if let Some(site @ ("cross-site" | "same-site")) = header(headers, &SEC_FETCH_SITE) {
            return Some(format!("a request from another site's page (Sec-Fetch-Site: {site}) is refused"));
        }
        let origin = headers.get(ORIGIN)?;
        let own = host.is_some_and(|host| {
            let origin = origin.as_bytes();
            origin.len() == "http://".len() + host.len()
                && origin[..7].eq_ignore_ascii_case(b"http://")
                && origin[7..].eq_ignore_ascii_case(host.as_bytes())
        });
        (!own).then(|| {
            format!("a request from another origin ({}) is refused", String::from_utf8_lossy(origin.as_bytes()))
        })
    }
}

/// The value of `name` in `headers`, if it is there and text.
fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The host of a `Host` value, without its port: `localhost`, `127.0.0.1`, `[::1]`.
fn host_name(host: &str) -> &str {
    let port_at = if host.starts_with('[') { host.find("]:").map(|at| at + 1) } else { host.rfind(':') };
    match port_at {
        Some(at) if host[at + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..at],
        _ => host,
    }
}

impl<S, B> Transform<S, ServiceRequest> for SiteGuard
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = SiteGuardService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(SiteGuardService { service, guard: self.clone() }))
    }
}

/// The guard around a server's app.
pub struct SiteGuardService<S> {
    service: S,
    guard: SiteGuard,
}

/// The reply to a request let through, its body type widened to that of a refusal's.
type Passed<F, B> = MapOk<F, fn(ServiceResponse<B>) -> ServiceResponse<EitherBody<B>>>;

impl<S, B> Service<ServiceRequest> for SiteGuardService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    // No allocation for a request let through: the app's own future, mapped in place.
    type Future = Either<Passed<S::Future, B>, Ready<Result<Self::Response, Self::Error>>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        match self.guard.refusal(req.request()) {
            None => Either::Left(self.service.call(req).map_ok(ServiceResponse::map_into_left_body as fn(_) -> _)),
            Some(why) => {
                tracing::debug!(method = %req.method(), path = req.path(), reason = why, "request refused");
                let refused = ApiError::Forbidden(why).error_response();
                Either::Right(ready(Ok(req.into_response(refused).map_into_right_body())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn refused(guard: &SiteGuard, method: Method, headers: &[(&str, &str)]) -> bool {
        let mut req = TestRequest::default().method(method);
        for &(name, value) in headers {
            req = req.insert_header((name, value));
        }
        guard.refusal(&req.to_http_request()).is_some()
    }

    #[test]
    fn only_a_foreign_origin_or_a_browsers_cross_site_mark_is_refused() {
        let guard = SiteGuard::listening_on("127.0.0.1:5000".parse().unwrap());
        let host = ("host", "localhost:5000");
        assert!(!refused(&guard, Method::POST, &[host]));
        assert!(!refused(&guard, Method::POST, &[host, ("origin", "http://localhost:5000")]));
        assert!(!refused(&guard, Method::POST, &[host, ("origin", "HTTP://LocalHost:5000")]));
        assert!(!refused(&guard, Method::POST, &[host, ("sec-fetch-site", "same-origin")]));
        assert!(!refused(&guard, Method::GET, &[host, ("sec-fetch-site", "none")]));
        for bad in ["http://evil.example", "http://localhost:5001", "https://localhost:5000", "null"] {
            assert!(refused(&guard, Method::POST, &[host, ("origin", bad)]), "{bad}");
            assert!(refused(&guard, Method::GET, &[host, ("origin", bad)]), "{bad}");
        }
        for site in ["cross-site", "same-site"] {
            assert!(refused(&guard, Method::POST, &[host, ("sec-fetch-site", site)]), "{site}");
            assert!(refused(&guard, Method::DELETE, &[host, ("sec-fetch-site", site)]), "{site}");
            assert!(refused(&guard, Method::GET, &[host, ("sec-fetch-site", site), ("sec-fetch-mode", "cors")]));
            assert!(!refused(&guard, Method::GET, &[host, ("sec-fetch-site", site), ("sec-fetch-mode", "navigate")]));
            assert!(refused(&guard, Method::POST, &[host, ("sec-fetch-site", site), ("sec-fetch-mode", "navigate")]));
        }
    }

    #[test]
    fn on_loopback_only_loopback_names_and_the_listen_address_are_hosts() {
        let guard = SiteGuard::listening_on("127.0.0.2:5000".parse().unwrap());
        for good in ["localhost", "LOCALHOST:5000", "127.0.0.1:5000", "[::1]", "[::1]:8080", "127.0.0.2:5000"] {
            assert!(!refused(&guard, Method::GET, &[("host", good)]), "{good}");
        }
        for bad in ["evil.example", "evil.example:5000", "localhost.evil.example", "127.0.0.3:5000", "[::2]:5000"] {
            assert!(refused(&guard, Method::GET, &[("host", bad)]), "{bad}");
        }
        // No Host at all (HTTP/1.0): no browser sends that.
        assert!(!refused(&guard, Method::GET, &[]));
        let public = SiteGuard::listening_on("0.0.0.0:5000".parse().unwrap());
        assert!(!refused(&public, Method::GET, &[("host", "countapp.example:5000")]));
        let v6 = SiteGuard::listening_on("[::1]:5000".parse().unwrap());
        assert!(!refused(&v6, Method::GET, &[("host", "[::1]:5000")]));
    }
}
