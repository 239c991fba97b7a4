//! A lean HTTP/1.1 client for the CountApp API, and the two requests the tool makes with it:
//! `POST /items` of a generated batch and `GET /items/{tenant}/count`.
//!
//! The tool shares the machine with the server it measures, so its own cost per request is kept
//! small: one keep-alive connection per load connection, URIs and JSON fragments rendered once,
//! and each body written into a buffer whose allocation is reused from one request to the next.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

use crate::check::{Read, Sweep};
use crate::drive::Op;
use crate::stats::Failure;
use crate::workload::{Generator, marker_tenant};

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
    /// The path prefix of `--url`, without a trailing slash.
    prefix: String,
    items: Uri,
    /// The tenants' names, in tenant order.
    names: Packed,
    /// Per tenant, in tenant order, the path of its count (validated as a URI).
    count_paths: Packed,
    /// Per tenant, the end of an item's JSON after its id: `","tenant":"<name>"}`.
    item_ends: Packed,
    longest_item_end: usize,
}

/// Byte strings, one per tenant, in one buffer: a million tenants cost their bytes and an offset
/// each, rather than an allocation and a header each.
#[derive(Debug)]
struct Packed {
    bytes: Bytes,
    /// Where each string ends in `bytes`.
    ends: Vec<usize>,
}

impl Packed {
    fn new<S: AsRef<[u8]>>(strings: impl IntoIterator<Item = S>) -> Packed {
        let (mut bytes, mut ends) = (Vec::new(), Vec::new());
        for string in strings {
            bytes.extend_from_slice(string.as_ref());
            ends.push(bytes.len());
        }
        Packed { bytes: bytes.into(), ends }
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn range(&self, i: usize) -> std::ops::Range<usize> {
        (if i == 0 { 0 } else { self.ends[i - 1] })..self.ends[i]
    }

    fn get(&self, i: usize) -> &[u8] {
        &self.bytes[self.range(i)]
    }

    /// The string as shared bytes, without a copy.
    fn shared(&self, i: usize) -> Bytes {
        self.bytes.slice(self.range(i))
    }

    fn longest(&self) -> usize {
        (0..self.len()).map(|i| self.range(i).len()).max().unwrap_or(0)
    }
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
        let count_paths = Packed::new(
            tenants.iter().map(|tenant| format!("{prefix}/items/{}/count", utf8_percent_encode(tenant, SEGMENT))),
        );
        for i in 0..count_paths.len() {
            Uri::from_maybe_shared(count_paths.shared(i)).context("a tenant name makes an invalid URI")?;
        }
        let item_ends = Packed::new(tenants.iter().map(|tenant| {
            let name = serde_json::to_string(tenant).expect("a string serializes");
            format!("\",\"tenant\":{name}}}")
        }));
        Ok(Target {
            addr,
            host: HeaderValue::from_str(authority.as_str()).context("--url has an invalid host")?,
            prefix: prefix.to_owned(),
            names: Packed::new(tenants),
            items: format!("{prefix}/items").parse().context("--url has an invalid path")?,
            longest_item_end: item_ends.longest(),
            count_paths,
            item_ends,
        })
    }

    /// The number of tenants.
    pub fn tenants(&self) -> usize {
        self.count_paths.len()
    }

    /// The URI of tenant `tenant`'s count.
    fn count_uri(&self, tenant: usize) -> Uri {
        Uri::from_maybe_shared(self.count_paths.shared(tenant)).expect("validated when the target was made")
    }

    /// The name of tenant `tenant`.
    pub fn name(&self, tenant: usize) -> &str {
        std::str::from_utf8(self.names.get(tenant)).expect("made from a String")
    }

    /// The URI `/items/<tenant>` followed by `tail` (such as "/contains?consistency=strong"),
    /// from the tenant's count path, whose segment is escaped already.
    pub fn tenant_uri(&self, tenant: usize, tail: &str) -> Uri {
        let path = self.count_paths.get(tenant);
        let mut uri = path[..path.len() - "/count".len()].to_vec();
        uri.extend_from_slice(tail.as_bytes());
        Uri::from_maybe_shared(uri).expect("a validated path with a plain tail")
    }

    /// The URI of `path` under `--url`'s prefix (such as "/counts?consistency=strong").
    pub fn uri(&self, path: &str) -> Uri {
        format!("{}{path}", self.prefix).parse().expect("a validated prefix with a plain path")
    }

    /// A request to this server: its Host header, and a JSON content type for a body.
    pub fn request(&self, method: Method, uri: Uri, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::builder().method(method).uri(uri).header(HOST, self.host.clone());
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

    /// The server this connection is to.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Sends `request` and reads the whole answer. A failed or timed-out exchange drops the
    /// connection, since what is left on it is unknown.
    pub async fn exchange(&mut self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), Failure> {
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
        let request = self.target.request(Method::GET, self.target.count_uri(tenant), Bytes::new());
        match self.exchange(request).await? {
            (StatusCode::OK, body) => {
                serde_json::from_slice::<Count>(&body).map(|c| c.count).map_err(|_| Failure::BadReply)
            }
            (status, _) => Err(Failure::Status(status.as_u16())),
        }
    }
}

/// What a count reader does when a count cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// End the whole pass at the first failure: every count is needed (the baselines).
    Stop,
    /// Go on with the other tenants, for a later pass to read the failed ones again. A
    /// connection leaves the pass after [`FAILURES_IN_A_ROW`] failures in a row, so that a
    /// server that is down costs a few tries rather than one per tenant.
    Skip,
}

/// Failures in a row after which a connection leaves a pass.
const FAILURES_IN_A_ROW: u32 = 3;

/// Reads many tenants' counts at once, over keep-alive connections of its own, each with one
/// request in flight, which it keeps from one pass to the next: a pass over a million tenants
/// takes as long as the server needs to answer them, not a million round trips.
pub struct CountReader {
    target: Arc<Target>,
    connections: Vec<Connection>,
}

impl CountReader {
    /// A reader of `target`'s counts over `connections` connections whose requests fail after
    /// `timeout`.
    pub fn new(target: Arc<Target>, timeout: Duration, connections: usize) -> Self {
        let connections = (0..connections.max(1)).map(|_| Connection::new(target.clone(), timeout)).collect();
        CountReader { target, connections }
    }

    /// Reads every tenant's count, in tenant order; fails at the first count that cannot be read.
    pub async fn all(&mut self) -> anyhow::Result<Vec<u64>> {
        let tenants: Vec<usize> = (0..self.target.tenants()).collect();
        let sweep = self.sweep(&tenants, OnFailure::Stop).await;
        if let Some(error) = sweep.error {
            return Err(error);
        }
        let mut counts = vec![0; tenants.len()];
        for read in sweep.reads {
            counts[read.tenant] = read.count;
        }
        Ok(counts)
    }

    /// Reads the counts of `tenants` (indexes into the target's tenants), the connections taking
    /// them in order; each read is stamped with the time its answer came.
    pub async fn sweep(&mut self, tenants: &[usize], on_failure: OnFailure) -> Sweep {
        if tenants.is_empty() {
            return Sweep::default();
        }
        let list: Arc<[u32]> = tenants.iter().map(|&t| u32::try_from(t).expect("at most 2^32 tenants")).collect();
        let next = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let used = self.connections.len().min(tenants.len());
        let tasks: Vec<_> = self
            .connections
            .drain(..used)
            .map(|connection| {
                let (list, next, stop) = (list.clone(), next.clone(), stop.clone());
                tokio::spawn(read_counts(connection, list, next, stop, on_failure))
            })
            .collect();
        let mut sweep = Sweep::default();
        for task in tasks {
            let (connection, reads, error) = task.await.expect("a count reader never panics");
            self.connections.push(connection);
            sweep.reads.extend(reads);
            sweep.error = sweep.error.or(error);
        }
        sweep.unread = tenants.len() - sweep.reads.len();
        if sweep.unread > 0 && sweep.error.is_none() {
            sweep.error = Some(anyhow::anyhow!("{} counts were not read", sweep.unread));
        }
        sweep
    }
}

/// One connection's share of a pass: the tenants of `list` it takes, one after another, from
/// the shared cursor `next`. Returns the connection, the counts it read and its first failure.
async fn read_counts(
    mut connection: Connection,
    list: Arc<[u32]>,
    next: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    on_failure: OnFailure,
) -> (Connection, Vec<Read>, Option<anyhow::Error>) {
    let (mut reads, mut error, mut in_a_row) = (Vec::new(), None, 0);
    while !stop.load(Ordering::Relaxed) {
        let Some(&tenant) = list.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
        let tenant = tenant as usize;
        match connection.count(tenant).await {
            Ok(count) => {
                reads.push(Read { tenant, count, at: tokio::time::Instant::now() });
                in_a_row = 0;
            }
            Err(failure) => {
                let target = &connection.target;
                error.get_or_insert_with(|| {
                    anyhow::anyhow!("GET {} from {}: {failure}", target.count_uri(tenant), target.addr)
                });
                in_a_row += 1;
                if on_failure == OnFailure::Stop {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                if in_a_row >= FAILURES_IN_A_ROW {
                    break;
                }
            }
        }
    }
    (connection, reads, error)
}

/// Posts generated batches: what the load sends in the default mode.
pub struct PostOp {
    connection: Connection,
    generator: Generator,
    /// With `--exact`, the run's marker prefix: each batch ends with its marker item.
    marker_prefix: Option<String>,
    buffer: BytesMut,
    body: Bytes,
    items: u64,
}

impl PostOp {
    /// Posts `generator`'s batches over `connection`; with a `marker_prefix`, each with its
    /// marker item, `{"id":"m","tenant":"<marker_prefix><connection>-<batch>"}`, last.
    pub fn new(connection: Connection, generator: Generator, marker_prefix: Option<String>) -> Self {
        PostOp { connection, generator, marker_prefix, buffer: BytesMut::new(), body: Bytes::new(), items: 0 }
    }

    /// The stream this op sent, with its tallies.
    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    /// The stream, to draw ids to ask about from what it acknowledged (the mixed workload).
    pub fn generator_mut(&mut self) -> &mut Generator {
        &mut self.generator
    }

    /// The connection, for the other requests of the mixed workload.
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.connection
    }
}

impl Op for PostOp {
    async fn prepare(&mut self, start: u64, units: u64) -> anyhow::Result<()> {
        let batch = self.generator.next_batch(start, units as usize)?;
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
            self.buffer.put_slice(target.item_ends.get(tenant));
        }
        // The marker is no item of the workload: it is not counted in the items acknowledged.
        self.items = batch.len() as u64;
        if let Some(prefix) = &self.marker_prefix {
            let tenant = marker_tenant(prefix, self.generator.batch_id());
            self.buffer.put_u8(b',');
            self.buffer.put_slice(ITEM_START);
            self.buffer.put_slice(b"m\",\"tenant\":");
            serde_json::to_writer((&mut self.buffer).writer(), &tenant).expect("a string serializes");
            self.buffer.put_u8(b'}');
        }
        self.buffer.put_u8(b']');
        self.body = self.buffer.split().freeze();
        Ok(())
    }

    async fn send(&mut self) -> Result<u64, Failure> {
        let target = &self.connection.target;
        let request = target.request(Method::POST, target.items.clone(), std::mem::take(&mut self.body));
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
    tenant: usize,
}

impl CountOp {
    /// Reads counts over `connection`.
    pub fn new(connection: Connection) -> Self {
        CountOp { connection, tenant: 0 }
    }
}

impl Op for CountOp {
    /// The read at the run's position `start` is of tenant `start % tenants`.
    async fn prepare(&mut self, start: u64, _units: u64) -> anyhow::Result<()> {
        self.tenant = (start % self.connection.target.tenants() as u64) as usize;
        Ok(())
    }

    async fn send(&mut self) -> Result<u64, Failure> {
        self.connection.count(self.tenant).await.map(|_| 1)
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
        assert_eq!(target.count_uri(0), "/api/items/plain/count");
        assert_eq!(target.count_uri(1), "/api/items/a%20%22quoted%22%2Fodd%20one/count");
        assert_eq!(target.item_ends.get(1), br#"","tenant":"a \"quoted\"/odd one"}"#);

        let shape = Shape::new(16, 1, 2, 0.0);
        let mut op = PostOp::new(Connection::new(target, Duration::from_secs(1)), Generator::new(&shape, 0), None);
        let mut first_body = None;
        for b in 0..3 {
            op.prepare(b * 5, 5).await.unwrap();
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

        // With markers, each batch ends with its own, whose tenant is escaped like any other.
        let connection = Connection::new(op.connection.target.clone(), Duration::from_secs(1));
        let prefix = shape.marker_prefix("a \"quoted\" ");
        let mut op = PostOp::new(connection, Generator::new(&shape, 0), Some(prefix.clone()));
        for b in 0..2 {
            op.prepare(b * 5, 5).await.unwrap();
            let items: Vec<serde_json::Value> = serde_json::from_slice(&op.body).unwrap();
            assert_eq!((items.len(), op.items), (6, 5));
            assert_eq!(items[5], serde_json::json!({ "id": "m", "tenant": format!("{prefix}0-{b}") }));
        }
    }

    #[tokio::test]
    async fn only_http_urls_are_accepted() {
        let url: Uri = "https://127.0.0.1:5999".parse().unwrap();
        assert!(Target::resolve(&url, &["t".to_owned()]).await.is_err());
    }
}
