//! A fake worker: a listener on an address the test picks, answering each request as the test's
//! script says, so that the coordinator meets what a broken or hostile program on a worker's
//! address may send. It records every request it reads (a recording proxy is the same thing),
//! and stops when dropped, even by a failed test.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How often a fake's threads look whether it was dropped.
const POLL: Duration = Duration::from_millis(20);

/// A request a fake read: its method, its target as sent, its headers (names in lower case) and
/// its body.
#[derive(Debug, Clone)]
pub struct Request {
    /// Its method, such as `GET`.
    pub method: String,
    /// Its target as sent, path and query.
    pub target: String,
    /// Its headers, names in lower case, in the order sent.
    pub headers: Vec<(String, String)>,
    /// Its body, as long as its `Content-Length` said.
    pub body: Vec<u8>,
}

impl Request {
    /// The value of the header `name` (lower case), if the request carries it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// What a fake does with a request: writes whatever it likes to the connection. An error (the
/// coordinator hung up) ends that connection.
pub type Script = dyn Fn(&Request, &mut TcpStream) -> io::Result<()> + Send + Sync;

/// A running fake; dropped, it stops accepting and its connections close.
pub struct FakeWorker {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<Request>>>,
    connections: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl FakeWorker {
    /// Listens on `addr` (such as `127.0.0.2:0`) and answers every request with `script`.
    pub fn start(
        addr: &str,
        script: impl Fn(&Request, &mut TcpStream) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let script: Arc<Script> = Arc::new(script);
        let acceptor = {
            let (stop, requests, connections, answered) =
                (stop.clone(), requests.clone(), connections.clone(), answered.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            connections.fetch_add(1, Ordering::Relaxed);
                            let (stop, requests, answered, script) =
                                (stop.clone(), requests.clone(), answered.clone(), script.clone());
                            thread::spawn(move || serve(stream, &stop, &requests, &answered, &*script));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
                        Err(e) => panic!("accepting: {e}"),
                    }
                }
            })
        };
        FakeWorker { addr, stop, requests, connections, answered, acceptor: Some(acceptor) }
    }

    /// Its base URL, `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request it has read so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Connections it has accepted, whether or not a request came on them.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Requests it has answered to the end, or whose reply the other side cut off.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Reads requests off one connection and answers each with `script`, until either side ends it.
fn serve(
    stream: TcpStream,
    stop: &AtomicBool,
    requests: &Mutex<Vec<Request>>,
    answered: &AtomicUsize,
    script: &Script,
) {
    stream.set_read_timeout(Some(POLL)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader, stop) {
        requests.lock().unwrap().push(request.clone());
        let written = script(&request, &mut writer);
        answered.fetch_add(1, Ordering::Relaxed);
        if written.is_err() {
            return;
        }
    }
}

/// The next request on the connection; `None` once it ends or the fake is dropped.
fn read_request(reader: &mut BufReader<TcpStream>, stop: &AtomicBool) -> Option<Request> {
    let mut lines = Vec::new();
    let mut line = String::new();
    loop {
        match reader.read_line(&mut line) {
            Ok(0) => return None,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => lines.push(std::mem::take(&mut line).trim_end().to_owned()),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
    let mut request_line = lines.first()?.split(' ');
    let (method, target) = (request_line.next()?.to_owned(), request_line.next()?.to_owned());
    let headers: Vec<(String, String)> = lines[1..]
        .iter()
        .filter_map(|h| h.split_once(':').map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned())))
        .collect();
    let length = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0; length];
    let mut read = 0;
    while read < length {
        match reader.read(&mut body[read..]) {
            Ok(0) => return None,
            Ok(n) => read += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
    Some(Request { method, target, headers, body })
}

/// Writes a reply of `status` (such as `"200 OK"`) with a JSON `body`.
pub fn reply(stream: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Writes a reply of `status` whose body is `len` bytes of JSON whitespace and then `{}`: valid
/// JSON, of any size.
pub fn huge_reply(stream: &mut TcpStream, status: &str, len: usize) -> io::Result<()> {
    write!(stream, "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", len + 2)?;
    let spaces = vec![b' '; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(spaces.len());
        stream.write_all(&spaces[..n])?;
        left -= n;
    }
    stream.write_all(b"{}")
}
