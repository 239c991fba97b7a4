//! The hop to the workers: HTTP/1.1 on keep-alive connections that each server thread keeps to
//! each worker, so that forwarding a request costs a write and a read on a connection already
//! open, driven by the thread that took the request, with no copy of the body.
//!
//! hyper's connection API is used as is, without a pool or a service stack above it: the
//! request URI is the client's path and query as received (nothing parses or normalizes it, so
//! `/items/%2E%2E/count` reaches the worker as sent), and the worker's address and `Host`
//! header are worked out once per worker and thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use countapp_shared::config::WorkerUrl;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Idle connections a server thread keeps to one worker, at most: about the requests it has in
/// flight at once; beyond that a connection is closed after its request.
const MAX_IDLE: usize = 128;

/// A request to forward, as the client sent it.
pub(crate) struct Forward {
    pub(crate) method: Method,
    /// The path and query exactly as the client sent them.
    pub(crate) uri: Uri,
    /// The body, shared with the client's request rather than copied; empty for a `GET`.
    pub(crate) body: Bytes,
}

/// A worker's reply, read whole.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    /// The worker's `Retry-After`, if it sent one (with a 503).
    pub(crate) retry_after: Option<HeaderValue>,
    pub(crate) body: Bytes,
}

/// Why a hop to a worker failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HopError {
    /// No connection could be opened.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// The worker did not answer in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The connection failed during the exchange.
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// One server thread's connections to the workers. Each server thread makes its own (in the
/// app factory), so that its connections are driven by its own runtime and a forwarded request
/// never wakes another thread; hence no locks, only cells.
#[derive(Default)]
pub(crate) struct Upstream {
    workers: RefCell<HashMap<WorkerUrl, Rc<Worker>>>,
}

impl Upstream {
    /// Sends `request` to the worker at `url` and reads its reply, within `timeout` for the
    /// whole exchange, a new connection included.
    pub(crate) async fn send(&self, url: &WorkerUrl, request: &Forward, timeout: Duration) -> Result<Reply, HopError> {
        let worker = self.worker(url);
        tokio::time::timeout(timeout, worker.exchange(request)).await.unwrap_or(Err(HopError::Timeout(timeout)))
    }

    fn worker(&self, url: &WorkerUrl) -> Rc<Worker> {
        if let Some(worker) = self.workers.borrow().get(url) {
            return worker.clone();
        }
        let worker = Rc::new(Worker::new(url));
        self.workers.borrow_mut().insert(url.clone(), worker.clone());
        worker
    }
}

/// What a server thread keeps about one worker.
struct Worker {
    url: WorkerUrl,
    addr: Addr,
    /// The `Host` header of every request to it.
    host: HeaderValue,
    /// Connections with no request in flight, the most recently used last.
    idle: RefCell<Vec<SendRequest<Full<Bytes>>>>,
}

/// Where a worker listens.
enum Addr {
    /// An IP address, known from its URL.
    Ip(SocketAddr),
    /// A host name, resolved for each new connection (not for each request).
    Name(String, u16),
}

impl Worker {
    fn new(url: &WorkerUrl) -> Worker {
        let addr = url.bind_addr().map_or_else(|| Addr::Name(url.host().to_owned(), url.port()), Addr::Ip);
        let authority = url.as_str().trim_start_matches("http://");
        let host = HeaderValue::from_str(authority).expect("a worker URL's host and port make a valid header");
        Worker { url: url.clone(), addr, host, idle: RefCell::new(Vec::new()) }
    }

    /// One exchange, on an idle connection if there is one. A kept-alive connection may have
    /// been closed by the worker meanwhile (its keep-alive timeout, a restart): that says
    /// nothing about the worker now, so a failure there gets one more try on a new connection.
    async fn exchange(&self, request: &Forward) -> Result<Reply, HopError> {
        if let Some(mut sender) = self.checkout() {
            match exchange_on(&mut sender, self.request(request)).await {
                Ok(reply) => {
                    self.checkin(sender);
                    return Ok(reply);
                }
                Err(e) => {
                    tracing::debug!(worker = %self.url, error = %e, "a kept-alive connection failed; opening another")
                }
            }
        }
        let mut sender = self.connect().await?;
        let reply = exchange_on(&mut sender, self.request(request)).await?;
        self.checkin(sender);
        Ok(reply)
    }

    fn request(&self, forward: &Forward) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(forward.body.clone()));
        *request.method_mut() = forward.method.clone();
        *request.uri_mut() = forward.uri.clone();
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        if !forward.body.is_empty() {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        request
    }

    fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.borrow_mut();
        while let Some(sender) = idle.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn checkin(&self, sender: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < MAX_IDLE && !sender.is_closed() {
            idle.push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, HopError> {
        let stream = match &self.addr {
            Addr::Ip(addr) => TcpStream::connect(addr).await,
            Addr::Name(host, port) => TcpStream::connect((host.as_str(), *port)).await,
        }
        .map_err(HopError::Connect)?;
        // Requests are written whole; Nagle would only hold back their last segment.
        stream.set_nodelay(true).map_err(HopError::Connect)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        // The connection's I/O runs in a task of its own on this thread; it ends when the
        // worker closes the connection or the sender is dropped.
        let url = self.url.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(worker = %url, error = %e, "a connection to a worker ended");
            }
        });
        Ok(sender)
    }
}

/// Sends `request` on `sender` and reads the whole reply.
async fn exchange_on(sender: &mut SendRequest<Full<Bytes>>, request: Request<Full<Bytes>>) -> Result<Reply, HopError> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let retry_after = if status.is_server_error() { response.headers().get(RETRY_AFTER).cloned() } else { None };
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply { status, retry_after, body })
}
