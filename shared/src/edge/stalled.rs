//! Connections that stall: a client that opens a connection, or starts a request on one kept
//! alive, and then sends nothing more holds a connection (a slot of the server's few thousand)
//! until something closes it. actix-web times out only the head of a connection's first
//! request, with an empty 408; a stalled body is [`super::body`]'s to time out.
//!
//! Each server thread keeps the connections it serves, and looks at them a few times per
//! `request_timeout`: one whose socket has neither received nor sent a byte for that long is
//! closed, after a JSON 408 when it is in the middle of a request (it received bytes since it
//! last sent any) and the reply can still be sent (nothing of ours waits in its send queue).
//! An idle kept-alive connection is closed without a word, as its keep-alive timeout would.
//! The kernel keeps those times (`TCP_INFO`), so a request costs this nothing.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;

use crate::api::ErrorBody;

/// The `request_timeout` in force, read at every look, so that an edit applies at once.
pub type Timeout = Arc<dyn Fn() -> Duration + Send + Sync>;

/// A served connection: its descriptor, and its socket's inode, which tells it apart from a
/// later socket given the same descriptor number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Socket {
    fd: RawFd,
    inode: u64,
}

thread_local! {
    /// The connections this server thread serves, and whether each was closed already.
    static SERVED: RefCell<HashMap<RawFd, (Socket, bool)>> = RefCell::new(HashMap::new());
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
        let socket = Socket { fd, inode };
        SERVED.with_borrow_mut(|served| served.insert(fd, (socket, false)));
        // Dropped with the connection: the watch then forgets it.
        extensions.insert(Served(socket));
        if !WATCHING.replace(true) {
            actix_web::rt::spawn(watch(timeout.clone()));
        }
    }
}

/// A connection's place in its thread's watch, for as long as the connection lives.
struct Served(Socket);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = SERVED.try_with(|served| {
            let mut served = served.borrow_mut();
            if served.get(&self.0.fd).is_some_and(|(socket, _)| *socket == self.0) {
                served.remove(&self.0.fd);
            }
        });
    }
}

/// Looks at this thread's connections a few times per `request_timeout`, for ever (the
/// thread's runtime drops it when the server stops).
async fn watch(timeout: Timeout) {
    loop {
        let limit = timeout();
        tokio::time::sleep((limit / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))).await;
        let limit = u32::try_from(timeout().as_millis()).unwrap_or(u32::MAX);
        let open: Vec<Socket> = SERVED
            .with_borrow(|served| served.values().filter(|(_, closed)| !closed).map(|(socket, _)| *socket).collect());
        for socket in open {
            // The socket may have been closed and its number reused since the list was made.
            if inode(socket.fd) != Some(socket.inode) {
                continue;
            }
            let Some(silence) = Silence::of(socket.fd) else { continue };
            if silence.idle_ms() < limit {
                continue;
            }
            let answered = silence.mid_request() && unsent(socket.fd) == Some(0) && send_timeout(socket.fd, limit);
            tracing::debug!(fd = socket.fd, silent_ms = silence.idle_ms(), answered, "closing a stalled connection");
            // SAFETY: the descriptor is this connection's socket (its inode was checked, and no
            // other task of this thread ran since); shutting it down makes its next read end
            // the connection, which then closes it.
            unsafe {
                libc::shutdown(socket.fd, libc::SHUT_RDWR);
            }
            SERVED.with_borrow_mut(|served| {
                if let Some((_, closed)) = served.get_mut(&socket.fd) {
                    *closed = true;
                }
            });
        }
    }
}

/// How long ago a socket last received and last sent data, and whether it ever sent any, as the
/// kernel keeps it.
struct Silence {
    received_ms: u32,
    sent_ms: u32,
    received_any: bool,
    sent_any: bool,
}

impl Silence {
    fn of(fd: RawFd) -> Option<Silence> {
        // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let got = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
        (got == 0).then_some(Silence {
            received_ms: info.tcpi_last_data_recv,
            sent_ms: info.tcpi_last_data_sent,
            received_any: info.tcpi_bytes_received > 0,
            sent_any: info.tcpi_bytes_sent > 0,
        })
    }

    /// How long the socket has been silent both ways.
    fn idle_ms(&self) -> u32 {
        self.received_ms.min(self.sent_ms)
    }

    /// Whether bytes came in after the last that went out (or none ever went out): a request
    /// was started and not answered.
    fn mid_request(&self) -> bool {
        self.received_any && (!self.sent_any || self.received_ms < self.sent_ms)
    }
}

/// Bytes of ours still in the socket's send queue.
fn unsent(fd: RawFd) -> Option<i32> {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int.
    (unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } == 0).then_some(queued)
}

/// Sends the JSON 408 of a request not received within `limit_ms`, without waiting; whether it
/// went out whole.
fn send_timeout(fd: RawFd, limit_ms: u32) -> bool {
    let body = serde_json::to_string(&ErrorBody::new(format!(
        "the request did not arrive within request_timeout ({} s)",
        f64::from(limit_ms) / 1000.0
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
