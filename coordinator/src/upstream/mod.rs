//! The hop to the workers: HTTP/1.1 on keep-alive connections that each server thread keeps to
//! each worker, with requests pipelined, so that the requests a thread takes at about the same
//! time go to a worker in one write and their replies come back in one read.
//!
//! Pipelining is what makes the hop cheap: a write and a read to a worker cost the coordinator
//! (and the worker) about as much kernel time for one request as for twenty. Its price is that
//! a worker answers the requests of one connection in order, so a request queued behind a slow
//! one waits for it. Hence only requests the worker answers at once, or within a round trip to
//! Redis, are pipelined (the caller says which; never one that waits on the disk or on a
//! barrier), each only behind requests of its own kind (a batch never waits for a count that
//! waits on Redis), and only on a connection whose every request was sent within
//! [`PIPELINE_WINDOW`], at most [`MAX_DEPTH`] deep: a worker that has become slow gets new
//! connections rather than a queue. Any other request takes an idle connection or opens one,
//! as without pipelining.
//!
//! The request target is the client's path and query as received (nothing parses or
//! normalizes it, so `/items/%2E%2E/count` reaches the worker as sent), and the worker's
//! address and `Host` are worked out once per worker and thread.

mod connection;
mod wire;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use countapp_shared::config::WorkerUrl;
use tokio::net::TcpStream;

use self::connection::{Connection, Failure};
pub(crate) use self::wire::{Forward, Kind, Reply, valid_target};
use crate::metrics::HopCounters;

/// How long ago the oldest unanswered request on a connection may have been sent for another
/// to be pipelined behind it.
const PIPELINE_WINDOW: Duration = Duration::from_micros(500);
/// Requests in flight on one connection, at most, while there is room for more connections.
const MAX_DEPTH: usize = 32;
/// Connections a server thread keeps to one worker, at most; beyond them, requests queue on the
/// least busy one.
const MAX_CONNECTIONS: usize = 128;

/// Why a hop to a worker failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HopError {
    /// No connection could be opened.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// The worker did not answer in time (shown in whole milliseconds: "no reply within 501 ms").
    #[error("no reply within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The connection ended before the reply.
    #[error("{0}")]
    Connection(String),
    /// The worker's bytes were no reply, or one over the bounds a reply is held to.
    #[error("a bad reply: {0}")]
    BadReply(String),
}

/// One server thread's connections to the workers. Each server thread makes its own (in the
/// app factory), so that its connections are driven by its own runtime and a forwarded request
/// never wakes another thread; hence no locks, only cells.
pub(crate) struct Upstream {
    workers: RefCell<HashMap<WorkerUrl, Rc<Worker>>>,
    /// The worker the latest request went to.
    latest: RefCell<Option<Rc<Worker>>>,
    counters: HopCounters,
}

impl Upstream {
    /// A server thread's hop, counting into `counters`.
    pub(crate) fn new(counters: HopCounters) -> Upstream {
        Upstream { workers: RefCell::default(), latest: RefCell::default(), counters }
    }

    /// The worker that a request queued now would reach in the same write as others: the one
    /// the latest request went to, while that request is not written yet. Requests that arrive
    /// together then cost the worker and this thread one write and one read, not one each.
    /// Its URL is handed to `find` (which looks up whether it still takes requests) rather than
    /// copied out, since this is asked for every request.
    pub(crate) fn filling<T>(&self, kind: Kind, find: impl FnOnce(&WorkerUrl) -> Option<T>) -> Option<T> {
        let now = Instant::now();
        self.latest.borrow().as_ref().filter(|worker| worker.filling(now, kind)).and_then(|worker| find(&worker.url))
    }

    /// Sends `request` to the worker at `url` and reads its reply, within `timeout` for the
    /// whole exchange, a new connection included. `pipeline` says that the worker answers it at
    /// once, so that it may be queued behind others.
    pub(crate) async fn send(
        &self,
        url: &WorkerUrl,
        request: &Forward,
        pipeline: bool,
        timeout: Duration,
    ) -> Result<Reply, HopError> {
        let worker = self.worker(url);
        *self.latest.borrow_mut() = Some(worker.clone());
        let exchange = worker.exchange(request, pipeline);
        tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(HopError::Timeout(timeout)))
    }

    fn worker(&self, url: &WorkerUrl) -> Rc<Worker> {
        if let Some(worker) = self.workers.borrow().get(url) {
            return worker.clone();
        }
        let worker = Rc::new(Worker::new(url, self.counters.clone()));
        self.workers.borrow_mut().insert(url.clone(), worker.clone());
        worker
    }
}

/// What a server thread keeps about one worker.
struct Worker {
    url: WorkerUrl,
    addr: Addr,
    /// The `Host` header of every request to it.
    host: Vec<u8>,
    /// Its open connections.
    connections: RefCell<Vec<Rc<Connection>>>,
    counters: HopCounters,
}

/// Where a worker listens.
enum Addr {
    /// An IP address, known from its URL.
    Ip(SocketAddr),
    /// A host name, resolved for each new connection (not for each request).
    Name(String, u16),
}

impl Worker {
    fn new(url: &WorkerUrl, counters: HopCounters) -> Worker {
        let addr = url.bind_addr().map_or_else(|| Addr::Name(url.host().to_owned(), url.port()), Addr::Ip);
        let host = url.as_str().trim_start_matches("http://").as_bytes().to_vec();
        Worker { url: url.clone(), addr, host, connections: RefCell::new(Vec::new()), counters }
    }

    /// One exchange, on a connection already open if one will do. A connection open a while
    /// may have been closed by the worker meanwhile (its keep-alive timeout, a restart): that
    /// says nothing about the worker now, so a failure there gets one more try on a new
    /// connection.
    async fn exchange(&self, request: &Forward, pipeline: bool) -> Result<Reply, HopError> {
        if let Some(connection) = self.open_connection(pipeline, request.kind) {
            match exchange_on(&connection, request, &self.host).await {
                Err(HopError::Connection(e)) => {
                    tracing::debug!(worker = %self.url, error = %e, "a kept-alive connection failed; opening another")
                }
                done => return done,
            }
        }
        let connection = self.connect().await?;
        exchange_on(&connection, request, &self.host).await
    }

    /// Whether a request of `kind` queued now would go out with others, in a write not made yet.
    fn filling(&self, now: Instant, kind: Kind) -> bool {
        self.connections.borrow().iter().any(|c| c.has_unwritten() && joinable(c, now, kind))
    }

    /// The connection for a request now, if one of those open will do. A request that may be
    /// pipelined joins one with requests not written yet, else the one with the fewest in
    /// flight; any other request takes an idle one. Past [`MAX_CONNECTIONS`], the least busy.
    fn open_connection(&self, pipeline: bool, kind: Kind) -> Option<Rc<Connection>> {
        let mut connections = self.connections.borrow_mut();
        connections.retain(|c| !c.is_closed());
        let now = Instant::now();
        let joined = pipeline
            .then(|| {
                let joinable = connections.iter().filter(|c| joinable(c, now, kind));
                joinable.min_by_key(|c| (!c.has_unwritten(), c.in_flight()))
            })
            .flatten();
        let idle = || connections.iter().find(|c| c.in_flight() == 0);
        let least_busy =
            || connections.iter().min_by_key(|c| c.in_flight()).filter(|_| connections.len() >= MAX_CONNECTIONS);
        joined.or_else(idle).or_else(least_busy).cloned()
    }

    async fn connect(&self) -> Result<Rc<Connection>, HopError> {
        let stream = match &self.addr {
            Addr::Ip(addr) => TcpStream::connect(addr).await,
            Addr::Name(host, port) => TcpStream::connect((host.as_str(), *port)).await,
        }
        .map_err(HopError::Connect)?;
        // Requests are written whole; Nagle would only hold back their last segment.
        stream.set_nodelay(true).map_err(HopError::Connect)?;
        self.counters.connections.inc();
        let connection = Connection::start(stream, self.counters.writes.clone());
        self.connections.borrow_mut().push(connection.clone());
        Ok(connection)
    }
}

/// Whether a request of `kind` may be pipelined on `connection` now: it has requests of that
/// kind in flight, not too many, all sent within [`PIPELINE_WINDOW`].
fn joinable(connection: &Connection, now: Instant, kind: Kind) -> bool {
    let in_flight = connection.in_flight();
    in_flight > 0
        && in_flight < MAX_DEPTH
        && connection.kind() == Some(kind)
        && connection.oldest().is_some_and(|oldest| now.duration_since(oldest) <= PIPELINE_WINDOW)
}

/// Sends `request` on `connection` and waits for the reply.
async fn exchange_on(connection: &Connection, request: &Forward, host: &[u8]) -> Result<Reply, HopError> {
    match connection.send(request, host).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(Failure::Ended(why))) => Err(HopError::Connection(why)),
        Ok(Err(Failure::BadReply(why))) => Err(HopError::BadReply(why)),
        Err(_) => Err(HopError::Connection("the connection ended".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::Method;
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn get(tenant: &str) -> Forward {
        let target = Bytes::from(format!("/items/{tenant}/count"));
        Forward { method: Method::GET, target, body: Bytes::new(), kind: Kind::Read }
    }

    /// A scripted worker: each connection it accepts goes to `serve`, with its number.
    async fn worker<F, Fut>(serve: F) -> (Upstream, WorkerUrl, HopCounters)
    where
        F: Fn(usize, TcpStream) -> Fut + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap()).parse().unwrap();
        actix_web::rt::spawn(async move {
            for n in 1.. {
                let (stream, _) = listener.accept().await.unwrap();
                actix_web::rt::spawn(serve(n, stream));
            }
        });
        let counters = HopCounters::default();
        (Upstream::new(counters.clone()), url, counters)
    }

    /// Reads one request head from `stream`; the tenant it asks for, or `None` at its end.
    async fn request(stream: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0];
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        let line = String::from_utf8(head).unwrap();
        Some(line.split(' ').nth(1).unwrap().trim_start_matches("/items/").trim_end_matches("/count").to_owned())
    }

    async fn answer(stream: &mut TcpStream, tenant: &str) {
        let body = format!("{{\"tenant\":\"{tenant}\"}}");
        let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        stream.write_all(reply.as_bytes()).await.unwrap();
    }

    fn tenant_of(reply: Result<Reply, HopError>) -> String {
        let body: serde_json::Value = serde_json::from_slice(&reply.unwrap().body).unwrap();
        body["tenant"].as_str().unwrap().to_owned()
    }

    #[actix_web::test]
    async fn a_request_is_not_queued_behind_one_sent_longer_ago_than_the_window() {
        // The first connection answers "slow" only once the second has answered "fast".
        let (answered_fast, fast_done) = mpsc::unbounded_channel::<()>();
        let fast_done = Rc::new(RefCell::new(Some(fast_done)));
        let (upstream, url, counters) = worker(move |n, mut stream| {
            let answered_fast = answered_fast.clone();
            let fast_done = fast_done.clone();
            async move {
                while let Some(tenant) = request(&mut stream).await {
                    if n == 1 {
                        let mut waiting = fast_done.borrow_mut().take().unwrap();
                        waiting.recv().await;
                    }
                    answer(&mut stream, &tenant).await;
                    if n == 2 {
                        answered_fast.send(()).unwrap();
                    }
                }
            }
        })
        .await;
        let slow = async { upstream.send(&url, &get("slow"), true, TIMEOUT).await };
        let fast = async {
            tokio::time::sleep(PIPELINE_WINDOW * 4).await;
            upstream.send(&url, &get("fast"), true, TIMEOUT).await
        };
        let (slow, fast) = tokio::join!(slow, fast);
        assert_eq!((tenant_of(slow), tenant_of(fast)), ("slow".to_owned(), "fast".to_owned()));
        assert_eq!(counters.connections.get(), 2);
    }

    /// A scripted worker that answers every request at once, on every connection.
    async fn answering_worker() -> (Upstream, WorkerUrl, HopCounters) {
        worker(|_, mut stream| async move {
            while let Some(tenant) = request(&mut stream).await {
                answer(&mut stream, &tenant).await;
            }
        })
        .await
    }

    /// Sends a count of each of `tenants` at once, after one request alone (which leaves an
    /// idle connection); the tenant each reply names, in order.
    async fn send_together(upstream: &Upstream, url: &WorkerUrl, tenants: &[&str], pipeline: bool) -> Vec<String> {
        assert_eq!(tenant_of(upstream.send(url, &get("first"), pipeline, TIMEOUT).await), "first");
        let requests: Vec<Forward> = tenants.iter().map(|t| get(t)).collect();
        let sends = requests.iter().map(|request| upstream.send(url, request, pipeline, TIMEOUT));
        futures_util::future::join_all(sends).await.into_iter().map(tenant_of).collect()
    }

    #[actix_web::test]
    async fn requests_sent_together_share_a_connection_and_a_write() {
        let (upstream, url, counters) = answering_worker().await;
        assert_eq!(send_together(&upstream, &url, &["a", "b", "c", "d"], true).await, ["a", "b", "c", "d"]);
        assert_eq!((counters.connections.get(), counters.writes.get()), (1, 2));
    }

    #[actix_web::test]
    async fn requests_that_wait_at_the_worker_are_never_queued_behind_each_other() {
        let (upstream, url, counters) = answering_worker().await;
        assert_eq!(send_together(&upstream, &url, &["a", "b", "c"], false).await, ["a", "b", "c"]);
        // The idle connection takes one; the other two open one each.
        assert_eq!((counters.connections.get(), counters.writes.get()), (3, 4));
        assert!(upstream.filling(Kind::Read, |_| Some(())).is_none());
    }

    #[actix_web::test]
    async fn a_request_is_pipelined_only_behind_requests_of_its_own_kind() {
        // The read is answered only once the batch is: queued behind the read, the batch
        // would wait for ever.
        let (answered_batch, batch_done) = mpsc::unbounded_channel::<()>();
        let batch_done = Rc::new(RefCell::new(Some(batch_done)));
        let (upstream, url, counters) = worker(move |_, mut stream| {
            let (answered_batch, batch_done) = (answered_batch.clone(), batch_done.clone());
            async move {
                while let Some(tenant) = request(&mut stream).await {
                    if tenant == "read" {
                        let mut waiting = batch_done.borrow_mut().take().unwrap();
                        waiting.recv().await;
                    }
                    answer(&mut stream, &tenant).await;
                    if tenant == "batch" {
                        answered_batch.send(()).unwrap();
                    }
                }
            }
        })
        .await;
        assert_eq!(tenant_of(upstream.send(&url, &get("first"), true, TIMEOUT).await), "first");
        let (read, batch) = (get("read"), Forward { kind: Kind::Batch, ..get("batch") });
        let (read, batch) =
            tokio::join!(upstream.send(&url, &read, true, TIMEOUT), upstream.send(&url, &batch, true, TIMEOUT));
        assert_eq!((tenant_of(read), tenant_of(batch)), ("read".to_owned(), "batch".to_owned()));
        assert_eq!(counters.connections.get(), 2);
    }

    #[actix_web::test]
    async fn a_kept_alive_connection_that_fails_gets_one_more_try_on_a_new_one() {
        // The first connection answers one request, then closes on the next.
        let (upstream, url, counters) = worker(|n, mut stream| async move {
            while let Some(tenant) = request(&mut stream).await {
                if n == 1 && tenant != "first" {
                    return;
                }
                answer(&mut stream, &tenant).await;
            }
        })
        .await;
        assert_eq!(tenant_of(upstream.send(&url, &get("first"), true, TIMEOUT).await), "first");
        assert_eq!(tenant_of(upstream.send(&url, &get("second"), true, TIMEOUT).await), "second");
        assert_eq!(counters.connections.get(), 2);
    }

    #[actix_web::test]
    async fn a_bad_reply_on_a_kept_alive_connection_is_not_tried_again_on_a_new_one() {
        let (upstream, url, counters) = worker(|_, mut stream| async move {
            while let Some(tenant) = request(&mut stream).await {
                if tenant != "first" {
                    let huge = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n";
                    stream.write_all(huge).await.unwrap();
                    continue;
                }
                answer(&mut stream, &tenant).await;
            }
        })
        .await;
        assert_eq!(tenant_of(upstream.send(&url, &get("first"), true, TIMEOUT).await), "first");
        let refused = upstream.send(&url, &get("second"), true, TIMEOUT).await;
        assert!(matches!(&refused, Err(HopError::BadReply(why)) if why.contains("1000000000000")), "{refused:?}");
        assert_eq!(counters.connections.get(), 1);
    }

    #[actix_web::test]
    async fn a_new_connection_that_fails_is_not_tried_again() {
        let (upstream, url, counters) = worker(|_, mut stream| async move {
            request(&mut stream).await;
        })
        .await;
        let failed = upstream.send(&url, &get("a"), true, TIMEOUT).await;
        assert!(matches!(failed, Err(HopError::Connection(_))), "{failed:?}");
        assert_eq!(counters.connections.get(), 1);
    }

    #[test]
    fn a_timeout_reads_in_whole_milliseconds() {
        assert_eq!(HopError::Timeout(Duration::from_micros(501_275)).to_string(), "no reply within 501 ms");
    }
}
