//! Connections that stall: a client that opens a connection, or starts a request on one kept
//! alive, and then sends its head slowly or not at all holds a connection (a slot of the
//! server's few thousand) until something closes it. actix-web times out only the head of a
//! connection's first request, with an empty 408; a body is [`super::body`]'s to time out.
//!
//! Each server thread keeps the connections it serves, and looks at them a few times per
//! `request_timeout`. A connection is closed when it has been silent both ways for that long
//! with no request being served on it, or when a request head has been arriving on it for that
//! long: bytes came in after the last that went out, and no request has reached the server's
//! handlers since ([`RequestSeen`] tells which have). Before closing, a JSON 408 is sent when
//! it is in the middle of a request and the reply can still be sent (nothing of ours waits in
//! its send queue); an idle kept-alive connection is closed without a word, as its keep-alive
//! timeout would. The kernel keeps the times and bytes of each socket (`TCP_INFO`), so a request
//! costs this two counts in a cell.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;

use countapp_shared::api::ErrorBody;

/// The `request_timeout` in force, read at every look, so that an edit applies at once.
pub type Timeout = Arc<dyn Fn() -> Duration + Send + Sync>;

/// A served connection: its descriptor, and its socket's inode, which tells it apart from a
/// later socket given the same descriptor number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Socket {
    fd: RawFd,
    inode: u64,
}

/// The requests of a connection that reached the server's handlers, and those done there.
#[derive(Debug, Default)]
struct Requests {
    started: Cell<u64>,
    done: Cell<u64>,
}

/// What the watch keeps of a connection.
struct Watched {
    socket: Socket,
    requests: Rc<Requests>,
    /// Already shut down, waiting for its server to notice.
    closed: bool,
    /// Since when a head has been arriving, and the bytes sent and requests started then: a
    /// later look that finds either changed sees another exchange.
    head_since: Option<(Instant, u64, u64)>,
}

thread_local! {
    /// The connections this server thread serves.
    static SERVED: RefCell<HashMap<RawFd, Watched>> = RefCell::new(HashMap::new());
    /// Whether this thread's watch runs.
    static WATCHING: Cell<bool> = const { Cell::new(false) };
}

/// The `on_connect` hook of a server: keeps each connection it is handed in its thread's
/// watch, starting the watch with the thread's first connection.
pub fn on_connect(timeout: Timeout) -> impl Fn(&dyn Any, &mut Extensions) + Send + Sync + 'static {
    move |io, extensions| {
        let Some(stream) = io.downcast_ref::<TcpStream>() else { return };
        let fd = stream.as_raw_fd();
        let Some(inode) = inode(fd) else { return };
        let (socket, requests) = (Socket { fd, inode }, Rc::new(Requests::default()));
        let watched = Watched { socket, requests: requests.clone(), closed: false, head_since: None };
        SERVED.with_borrow_mut(|served| served.insert(fd, watched));
        // Dropped with the connection: the watch then forgets it.
        extensions.insert(Served { socket, requests });
        if !WATCHING.replace(true) {
            actix_web::rt::spawn(watch(timeout.clone()));
        }
    }
}

/// A connection's place in its thread's watch, for as long as the connection lives.
struct Served {
    socket: Socket,
    requests: Rc<Requests>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = SERVED.try_with(|served| {
            let mut served = served.borrow_mut();
            if served.get(&self.socket.fd).is_some_and(|watched| watched.socket == self.socket) {
                served.remove(&self.socket.fd);
            }
        });
    }
}

/// A request that reached the server's handlers, from then until it is answered: its head has
/// arrived, and its connection is not stalled while it is served.
pub struct RequestSeen(Option<Rc<Requests>>);

impl RequestSeen {
    /// Notes that `req` reached the handlers, until the value is dropped.
    pub fn new(req: &HttpRequest) -> RequestSeen {
        let requests = req.conn_data::<Served>().map(|served| served.requests.clone());
        if let Some(requests) = &requests {
            requests.started.set(requests.started.get() + 1);
        }
        RequestSeen(requests)
    }
}

impl Drop for RequestSeen {
    fn drop(&mut self) {
        if let Some(requests) = &self.0 {
            requests.done.set(requests.done.get() + 1);
        }
    }
}

/// Looks at this thread's connections a few times per `request_timeout`, for ever (the
/// thread's runtime drops it when the server stops).
async fn watch(timeout: Timeout) {
    loop {
        let limit = timeout();
        tokio::time::sleep((limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))).await;
        let limit = timeout();
        let stalled: Vec<(Socket, bool)> = SERVED.with_borrow_mut(|served| {
            served.values_mut().filter(|watched| !watched.closed).filter_map(|watched| watched.stalled(limit)).collect()
        });
        for (socket, mid_request) in stalled {
            let answered = mid_request && unsent(socket.fd) == Some(0) && send_timeout(socket.fd, limit);
            tracing::debug!(fd = socket.fd, mid_request, answered, "closing a stalled connection");
            // SAFETY: the descriptor is this connection's socket (its inode was checked, and no
            // other task of this thread ran since); shutting it down makes its next read end
            // the connection, which then closes it.
            unsafe {
                libc::shutdown(socket.fd, libc::SHUT_RDWR);
            }
            SERVED.with_borrow_mut(|served| {
                if let Some(watched) = served.get_mut(&socket.fd) {
                    watched.closed = true;
                }
            });
        }
    }
}

impl Watched {
    /// Whether the connection has stalled for `limit`, and if so whether mid-request.
    fn stalled(&mut self, limit: Duration) -> Option<(Socket, bool)> {
        // The socket may have been closed and its number reused since it was handed over.
        if inode(self.socket.fd) != Some(self.socket.inode) {
            return None;
        }
        let silence = Silence::of(self.socket.fd)?;
        let (started, done) = (self.requests.started.get(), self.requests.done.get());
        if started != done {
            // A request is being served: its body and its handler have bounds of their own.
            self.head_since = None;
            return None;
        }
        let head_for = if silence.mid_request() {
            let exchange = (silence.bytes_sent, started);
            match self.head_since {
                Some((since, sent, seen)) if (sent, seen) == exchange => since.elapsed(),
                _ => {
                    self.head_since = Some((Instant::now(), exchange.0, exchange.1));
                    Duration::ZERO
                }
            }
        } else {
            self.head_since = None;
            Duration::ZERO
        };
        let silent_for = Duration::from_millis(silence.idle_ms().into());
        (silent_for >= limit || head_for >= limit).then_some((self.socket, silence.mid_request()))
    }
}

/// How long ago a socket last received and last sent data, whether it received any, and the
/// bytes it sent, as the kernel keeps them.
struct Silence {
    received_ms: u32,
    sent_ms: u32,
    received_any: bool,
    bytes_sent: u64,
}

impl Silence {
    fn of(fd: RawFd) -> Option<Silence> {
        // SAFETY: tcp_info is plain data, valid zeroed; getsockopt writes at most `len` bytes
        // into it (an older kernel fewer, leaving the rest zero).
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let got = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
        (got == 0).then_some(Silence {
            received_ms: info.tcpi_last_data_recv,
            sent_ms: info.tcpi_last_data_sent,
            received_any: info.tcpi_bytes_received > 0,
            bytes_sent: info.tcpi_bytes_sent,
        })
    }

    /// How long the socket has been silent both ways.
    fn idle_ms(&self) -> u32 {
        self.received_ms.min(self.sent_ms)
    }

    /// Whether bytes came in after the last that went out (or none ever went out): a request
    /// was started and not answered.
    fn mid_request(&self) -> bool {
        self.received_any && (self.bytes_sent == 0 || self.received_ms < self.sent_ms)
    }
}

/// Bytes of ours still in the socket's send queue.
fn unsent(fd: RawFd) -> Option<i32> {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int.
    (unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } == 0).then_some(queued)
}

/// Sends the JSON 408 of a request not received within `limit`, without waiting; whether it
/// went out whole.
fn send_timeout(fd: RawFd, limit: Duration) -> bool {
    let body = serde_json::to_string(&ErrorBody::new(format!(
        "the request did not arrive within request_timeout ({} s)",
        limit.as_secs_f64()
    )))
    .expect("an error body serializes");
    let reply = format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // SAFETY: sends from a buffer that lives through the call; never blocks, never raises SIGPIPE.
    let sent = unsafe { libc::send(fd, reply.as_ptr().cast(), reply.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    usize::try_from(sent).is_ok_and(|sent| sent == reply.len())
}

/// The inode of the socket on `fd`, if `fd` is open.
fn inode(fd: RawFd) -> Option<u64> {
    // SAFETY: fstat writes one stat struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut stat) } == 0).then_some(stat.st_ino)
}
