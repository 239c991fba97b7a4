//! A lean HTTP/1.1 client for the CountApp API, and the two requests the tool makes with it:
//! `POST /items` of a generated batch and `GET /items/{tenant}/count`.
//!
//! The tool shares the machine with the server it measures, so its own cost per request is kept
//! small: one keep-alive connection per load connection, URIs and JSON fragments rendered once,
//! and each body written into a buffer whose allocation is reused from one request to the next.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use countapp_shared::api::Count;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use tokio::net::TcpStream;

use crate::drive::Op;
use crate::stats::Failure;
use crate::workload::Generator;

/// What a path segment may hold unescaped (RFC 3986's unreserved characters).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The start of an item's JSON, before its id.
const ITEM_START: &[u8] = b"{\"id\":\"";

/// After a failed connect, wait this long before the next try, so that a server that is down
/// costs a few errors a second rather than a busy loop.
const CONNECT_BACKOFF: Duration = Duration::from_millis(50);

/// How long to try an address of the server before trying the next.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The server under test, with every URI and fragment the requests need, rendered once.
#[derive(Debug)]
pub struct Target {
    addr: SocketAddr,
    host: HeaderValue,
    items: Uri,
    /// `GET` URIs, one per tenant, in tenant order.
    counts: Vec<Uri>,
    /// Per tenant, the end of an item's JSON after its id: `","tenant":"<name>"}`.
    item_ends: Vec<Bytes>,
    longest_item_end: usize,
}

impl Target {
    /// The server at `url` (`http://host:port`, optionally with a path prefix), for `tenants`.
    pub async fn resolve(url: &Uri, tenants: &[String]) -> anyhow::Result<Target> {
        if url.scheme_str() != Some("http") {
            bail!("--url {url}: only http:// URLs are supported");
        }
        let authority = url.authority().with_context(|| format!("--url {url} has no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((authority.host(), port))
            .await
            .with_context(|| format!("resolving {}", authority.host()))?
            .collect();
        // "localhost" may resolve to ::1 and 127.0.0.1 while the server listens on one of them:
        // take the first that accepts a connection (or the first, to fail on it later).
        let mut addr = *addrs.first().with_context(|| format!("{} has no address", authority.host()))?;
        for candidate in addrs {
            if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(candidate)).await {
                addr = candidate;
                break;
            }
        }
        let prefix = url.path().trim_end_matches('/');
        let counts = tenants
            .iter()
            .map(|tenant| format!("{prefix}/items/{}/count", utf8_percent_encode(tenant, SEGMENT)).parse())
            .collect::<Result<_, _>>()
            .context("a tenant name makes an invalid URI")?;
        let item_ends: Vec<Bytes> = tenants
            .iter()
            .map(|tenant| {
                let name = serde_json::to_string(tenant).expect("a string serializes");
                Bytes::from(format!("\",\"tenant\":{name}}}"))
            })
            .collect();
        let longest_item_end = item_ends.iter().map(Bytes::len).max().unwrap_or(0);
        Ok(Target {
            addr,
            host: HeaderValue::from_str(authority.as_str()).context("--url has an invalid host")?,
            items: format!("{prefix}/items").parse().context("--url has an invalid path")?,
            counts,
            item_ends,
            longest_item_end,
        })
    }

    /// The number of tenants.
    pub fn tenants(&self) -> usize {
        self.counts.len()
    }

    fn request(&self, method: Method, uri: &Uri, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::builder().method(method).uri(uri.clone()).header(HOST, self.host.clone());
        if !body.is_empty() {
            request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        request.body(Full::new(body)).expect("the parts were validated when the target was made")
    }
}

/// One keep-alive HTTP/1.1 connection, made on first use and made again after a failure.
pub struct Connection {
    target: Arc<Target>,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Connection {
    /// A connection to `target` whose requests fail after `timeout`.
    pub fn new(target: Arc<Target>, timeout: Duration) -> Self {
        Connection { target, timeout, sender: None }
    }

    /// Sends `request` and reads the whole answer. A failed or timed-out exchange drops the
    /// connection, since what is left on it is unknown.
    async fn exchange(&mut self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), Failure> {
        let outcome =
            tokio::time::timeout(self.timeout, self.exchange_untimed(request)).await.unwrap_or(Err(Failure::Timeout));
        if outcome.is_err() {
            self.sender = None;
        }
        outcome
    }

    async fn exchange_untimed(&mut self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), Failure> {
        // A server may close a keep-alive connection between requests; that is no error.
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            self.sender = Some(self.connect().await?);
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await.map_err(|_| Failure::Connection)?;
        let response = sender.send_request(request).await.map_err(|_| Failure::Connection)?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|_| Failure::Connection)?.to_bytes();
        Ok((status, body))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let handshake = async {
            let stream = TcpStream::connect(self.target.addr).await.ok()?;
            // Requests are written whole; Nagle would only hold back their last segment.
            stream.set_nodelay(true).ok()?;
            http1::handshake(TokioIo::new(stream)).await.ok()
        };
        let Some((sender, connection)) = handshake.await else {
            tokio::time::sleep(CONNECT_BACKOFF).await;
            return Err(Failure::Connect);
        };
        // The connection's I/O runs beside the requests; it ends when the sender is dropped.
        tokio::spawn(connection);
        Ok(sender)
    }

    /// Reads one tenant's count (tenant index into the target's tenants).
    async fn count(&mut self, tenant: usize) -> Result<u64, Failure> {
        let request = self.target.request(Method::GET, &self.target.counts[tenant], Bytes::new());
        match self.exchange(request).await? {
            (StatusCode::OK, body) => {
                serde_json::from_slice::<Count>(&body).map(|c| c.count).map_err(|_| Failure::BadReply)
            }
            (status, _) => Err(Failure::Status(status.as_u16())),
        }
    }

    /// Reads every tenant's count, in tenant order.
    pub async fn counts(&mut self) -> anyhow::Result<Vec<u64>> {
        let mut counts = Vec::with_capacity(self.target.tenants());
        for tenant in 0..self.target.tenants() {
            let count = self.count(tenant).await.map_err(|failure| {
                anyhow::anyhow!("GET {} from {}: {failure}", self.target.counts[tenant], self.target.addr)
            })?;
            counts.push(count);
        }
        Ok(counts)
    }
}

/// Posts generated batches: what the load sends in the default mode.
pub struct PostOp {
    connection: Connection,
    generator: Generator,
    buffer: BytesMut,
    body: Bytes,
    items: u64,
}

impl PostOp {
    /// Posts `generator`'s batches over `connection`.
    pub fn new(connection: Connection, generator: Generator) -> Self {
        PostOp { connection, generator, buffer: BytesMut::new(), body: Bytes::new(), items: 0 }
    }

    /// The stream this op sent, with its tallies.
    pub fn generator(&self) -> &Generator {
        &self.generator
    }
}

impl Op for PostOp {
    fn prepare(&mut self, units: u64) -> anyhow::Result<()> {
        let batch = self.generator.next_batch(units as usize)?;
        let target = &self.connection.target;
        // Once the previous body is dropped, this reclaims its allocation rather than making one.
        let per_item = ITEM_START.len() + target.longest_item_end + 1;
        self.buffer.reserve(2 + batch.id_bytes_total() + batch.len() * per_item);
        self.buffer.put_u8(b'[');
        for (i, (tenant, id)) in batch.items().enumerate() {
            if i > 0 {
                self.buffer.put_u8(b',');
            }
            self.buffer.put_slice(ITEM_START);
            self.buffer.put_slice(id);
            self.buffer.put_slice(&target.item_ends[tenant]);
        }
        self.buffer.put_u8(b']');
        self.body = self.buffer.split().freeze();
        self.items = batch.len() as u64;
        Ok(())
    }

    async fn send(&mut self) -> Result<u64, Failure> {
        let target = &self.connection.target;
        let request = target.request(Method::POST, &target.items, std::mem::take(&mut self.body));
        match self.connection.exchange(request).await? {
            (StatusCode::OK, _) => {
                self.generator.acknowledged();
                Ok(self.items)
            }
            (status, _) => Err(Failure::Status(status.as_u16())),
        }
    }
}

/// Reads counts round-robin over the tenants: what the load sends with `--count`.
pub struct CountOp {
    connection: Connection,
    next: usize,
}

impl CountOp {
    /// Reads counts over `connection`, starting with tenant `first`.
    pub fn new(connection: Connection, first: usize) -> Self {
        let next = first % connection.target.tenants();
        CountOp { connection, next }
    }
}

impl Op for CountOp {
    fn prepare(&mut self, _units: u64) -> anyhow::Result<()> {
        Ok(())
    }

    async fn send(&mut self) -> Result<u64, Failure> {
        let tenant = self.next;
        self.next = (self.next + 1) % self.connection.target.tenants();
        self.connection.count(tenant).await.map(|_| 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Shape;

    #[tokio::test]
    async fn bodies_and_uris_are_valid_and_escaped() {
        let tenants = vec!["plain".to_owned(), "a \"quoted\"/odd one".to_owned()];
        let url: Uri = "http://127.0.0.1:5999/api/".parse().unwrap();
        let target = Arc::new(Target::resolve(&url, &tenants).await.unwrap());
        assert_eq!(target.items, "/api/items");
        assert_eq!(target.counts[1], "/api/items/a%20%22quoted%22%2Fodd%20one/count");

        let shape = Shape::new(16, 1, 2, 0.0);
        let mut op = PostOp::new(Connection::new(target, Duration::from_secs(1)), Generator::new(&shape, 0));
        let mut first_body = None;
        for _ in 0..3 {
            op.prepare(5).unwrap();
            // Each body is written where the one before it was, once that one is gone.
            assert_eq!(*first_body.get_or_insert(op.body.as_ptr()), op.body.as_ptr());
            let items: Vec<serde_json::Value> = serde_json::from_slice(&op.body).unwrap();
            assert_eq!(items.len(), 5);
            for item in &items {
                assert!(tenants.iter().any(|t| item["tenant"] == t.as_str()), "{item}");
                assert_eq!(item["id"].as_str().unwrap().len(), 16);
            }
            op.body = Bytes::new();
        }
    }

    #[tokio::test]
    async fn only_http_urls_are_accepted() {
        let url: Uri = "https://127.0.0.1:5999".parse().unwrap();
        assert!(Target::resolve(&url, &["t".to_owned()]).await.is_err());
    }
}
