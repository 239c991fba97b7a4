//! The edge of both servers against slow and greedy clients, with real processes: hundreds of
//! connections that stall (heads, bodies, idle sockets) are timed out while a normal client
//! goes on being served; bodies held at once stay within their budget, and their memory is
//! given back once they are gone; connections past the cap wait, and the process keeps room
//! for its own files.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use countapp_testcluster::{Cluster, Node, batch, client, eventually, free_port, get_json, post};
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::Value;

/// The deadline of a request in these tests' configs.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long past its deadline a slow connection may still be open: the watch looks a few
/// times per deadline, and a shared machine is slow.
const SLACK: Duration = Duration::from_secs(8);
/// A normal client's slowest request, as a functional bound: the slow ones must not hold it
/// up for anything like their deadline.
const SERVED_WITHIN: Duration = Duration::from_secs(3);

/// What a slow connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slow {
    /// Connects and sends nothing.
    Idle,
    /// Sends part of a request head, then nothing.
    Head,
    /// Sends a head announcing a 16 MB body, and one byte of it.
    Body,
}

/// A connection to `addr` that stalls as `slow` says.
fn stall(addr: &str, slow: Slow) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    let sent: &[u8] = match slow {
        Slow::Idle => b"",
        Slow::Head => b"POST /items HTTP/1.1\r\nhost: localhost\r\ncontent-le",
        Slow::Body => b"POST /items HTTP/1.1\r\nhost: localhost\r\ncontent-length: 16000000\r\n\r\n[",
    };
    stream.write_all(sent).unwrap();
    stream
}

/// How a connection ended, read for at most `within`: the status and body of the reply it got
/// (`None` if it was closed without one), or `Err` if it is still open.
fn ending(mut stream: TcpStream, within: Duration) -> Result<Option<(u16, String)>, String> {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => {}
        // A reset after the reply (the server closed with unread bytes) still ends it.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => {
            return Err(format!(
                "still open after {within:?} ({e}), having read {:?}",
                String::from_utf8_lossy(&reply)
            ));
        }
    }
    if reply.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("no reply head in {text:?}"))?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no status in {head:?}"))?;
    Ok(Some((status, body.to_owned())))
}

/// Asserts that `reply` is `status` with a JSON error naming `words`.
fn assert_json_error(reply: &(u16, String), status: u16, words: &str) {
    assert_eq!(reply.0, status, "{reply:?}");
    let body: Value = serde_json::from_str(&reply.1).unwrap_or_else(|e| panic!("not JSON ({e}): {reply:?}"));
    let message = body["error"].as_str().unwrap_or_else(|| panic!("no error message: {reply:?}"));
    assert!(message.contains(words), "{message}");
}

/// A normal client's requests to `url` for `how_long` (at least two), a batch and a count in
/// turn: each must succeed; returns the slowest.
fn serve_meanwhile(client: &Client, url: &str, prefix: &str, how_long: Duration) -> Duration {
    let (started, mut slowest) = (Instant::now(), Duration::ZERO);
    for i in 0.. {
        if i >= 2 && started.elapsed() > how_long {
            break;
        }
        let sent = Instant::now();
        let reply = if i % 2 == 0 {
            post(client, url, batch(&[(prefix, &i.to_string())]))
        } else {
            client.get(format!("{url}/items/{prefix}/count")).send().unwrap()
        };
        slowest = slowest.max(sent.elapsed());
        assert_eq!(reply.status(), StatusCode::OK, "{url}: {}", reply.text().unwrap_or_default());
        thread::sleep(Duration::from_millis(20));
    }
    slowest
}

/// A field of `/proc/<pid>/status` in kB, such as `VmRSS` (resident) or `VmSize` (virtual).
fn memory_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A coordinator with one worker, with `more` in its config: the cluster, the worker's port and
/// the coordinator.
fn cluster(more: &str) -> (Cluster, u16, Node) {
    let (port, listen) = (free_port(), free_port());
    let cluster = Cluster::new(&[port], &format!("listen: 127.0.0.1:{listen}\nworker_persist: 0.2\n{more}"));
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(1);
    (cluster, port, coordinator)
}

#[test]
fn hundreds_of_stalled_connections_are_timed_out_while_a_normal_client_is_served() {
    let (_cluster, port, coordinator) = cluster(&format!("request_timeout: {}\n", REQUEST_TIMEOUT.as_secs_f64()));
    let worker = format!("http://127.0.0.1:{port}");
    for (name, url, pid) in
        [("coordinator", coordinator.url(), coordinator.pid()), ("worker", worker.clone(), coordinator.pid_of(port))]
    {
        let (virtual_before, resident_before) = (memory_kb(pid, "VmSize"), memory_kb(pid, "VmRSS"));
        let addr = url.trim_start_matches("http://");
        let stalled: Vec<(Slow, TcpStream)> = (0..300)
            .map(|i| [Slow::Idle, Slow::Head, Slow::Body][i % 3])
            .map(|slow| (slow, stall(addr, slow)))
            .collect();
        let client = client();
        let slowest = serve_meanwhile(&client, &url, &format!("edge-{name}"), REQUEST_TIMEOUT / 2);
        println!("{name}: with 300 stalled connections, a normal client's slowest request took {slowest:?}");
        assert!(slowest < SERVED_WITHIN, "{name}: a normal request took {slowest:?} beside stalled connections");
        // 100 bodies announcing 16 MB each cost what arrived of them, not what they announced.
        let (virtual_grew, resident_grew) = (
            memory_kb(pid, "VmSize").saturating_sub(virtual_before),
            memory_kb(pid, "VmRSS").saturating_sub(resident_before),
        );
        println!("{name}: virtual size grew {virtual_grew} kB, resident {resident_grew} kB");
        assert!(virtual_grew < 512 << 10, "{name}: the virtual size grew {virtual_grew} kB");
        assert!(resident_grew < 64 << 10, "{name}: the resident size grew {resident_grew} kB");

        let deadline = Instant::now() + REQUEST_TIMEOUT + SLACK;
        for (slow, stream) in stalled {
            let ended =
                ending(stream, deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)));
            match (slow, ended) {
                (_, Err(e)) => panic!("{name}: a connection with {slow:?} is {e}"),
                (Slow::Idle, Ok(reply)) => {
                    assert_eq!(reply, None, "{name}: an idle connection is closed without a reply")
                }
                (_, Ok(None)) => panic!("{name}: a connection with {slow:?} was closed without its 408"),
                (Slow::Head, Ok(Some(reply))) => assert_json_error(&reply, 408, "request_timeout"),
                (Slow::Body, Ok(Some(reply))) => assert_json_error(&reply, 408, "request_timeout"),
            }
        }
        assert!(serve_meanwhile(&client, &url, &format!("edge-{name}"), Duration::ZERO) < SERVED_WITHIN);
    }
}

#[test]
fn a_request_stalled_on_a_kept_alive_connection_is_timed_out_too() {
    let (_cluster, _, coordinator) = cluster(&format!("request_timeout: {}\n", REQUEST_TIMEOUT.as_secs_f64()));
    let mut stream = TcpStream::connect(coordinator.url().trim_start_matches("http://")).unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    let mut first = [0; 12];
    stream.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // Later than the reply (the kernel keeps times to a few milliseconds), a request begins and
    // stalls; the rest of the first reply is read along with the 408.
    thread::sleep(Duration::from_millis(100));
    stream.write_all(b"GET /hea").unwrap();
    let mut rest = Vec::new();
    stream.set_read_timeout(Some(REQUEST_TIMEOUT + SLACK)).unwrap();
    stream.read_to_end(&mut rest).expect("the connection is closed");
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("408 Request Timeout") && text.contains("request_timeout"), "{text}");
}

#[test]
fn a_head_sent_a_byte_at_a_time_is_timed_out_though_never_silent() {
    let (_cluster, _, coordinator) = cluster(&format!("request_timeout: {}\n", REQUEST_TIMEOUT.as_secs_f64()));
    let mut stream = TcpStream::connect(coordinator.url().trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let head = format!("GET /health HTTP/1.1\r\nhost: localhost\r\nx-slow: {}\r\n\r\n", "s".repeat(200));
    let started = Instant::now();
    let mut reply = Vec::new();
    // A byte every 200 ms: the connection is never silent for the deadline, its head takes 45 s.
    for byte in head.bytes() {
        if stream.write_all(&[byte]).is_err() || stream.read_to_end(&mut reply).is_ok() {
            break;
        }
        assert!(started.elapsed() < REQUEST_TIMEOUT + SLACK, "the head is still being read");
        thread::sleep(Duration::from_millis(200));
    }
    stream.set_read_timeout(Some(SLACK)).unwrap();
    let _ = stream.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 408") && text.contains("request_timeout"), "{text}");
    println!("a head sent a byte at a time was answered 408 after {:?}", started.elapsed());
}

#[test]
fn bodies_held_at_once_stay_within_their_budget_and_their_memory_returns() {
    // The default limits: 16 MiB bodies, 64 MiB of them at once.
    let (_cluster, _, coordinator) = cluster("request_timeout: 3\n");
    let (url, pid) = (coordinator.url(), coordinator.pid());
    let addr = url.trim_start_matches("http://").to_owned();
    let resident_before = memory_kb(pid, "VmRSS");
    // 40 bodies of 16 MiB, each sent but for its last byte, at once.
    let sending: Vec<_> = (0..40)
        .map(|_| {
            let addr = addr.clone();
            thread::spawn(move || {
                let mut stream = TcpStream::connect(&addr).unwrap();
                stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                let len = 16 << 20;
                let head = format!("POST /items HTTP/1.1\r\nhost: localhost\r\ncontent-length: {len}\r\n\r\n");
                // Refused (503) before it is all sent, a body finds its connection closed.
                let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(&vec![b' '; len - 1]));
                stream
            })
        })
        .collect();
    let connections: Vec<TcpStream> = sending.into_iter().map(|t| t.join().unwrap()).collect();
    let resident_held = memory_kb(pid, "VmRSS");
    println!("resident: {resident_before} kB before, {resident_held} kB with 40 bodies of 16 MiB arriving");
    assert!(
        resident_held < resident_before + (256 << 10),
        "resident size {resident_held} kB, from {resident_before} kB"
    );
    let (mut pushed_back, mut timed_out) = (0, 0);
    for connection in connections {
        match ending(connection, Duration::from_secs(3) + SLACK) {
            Ok(Some(reply)) if reply.0 == 503 => {
                assert_json_error(&reply, 503, "max_body_bytes_in_flight");
                pushed_back += 1;
            }
            Ok(Some(reply)) => {
                assert_json_error(&reply, 408, "request_timeout");
                timed_out += 1;
            }
            other => panic!("a body past the budget or its deadline ended so: {other:?}"),
        }
    }
    println!("{pushed_back} bodies pushed back, {timed_out} timed out");
    assert!(pushed_back >= 30 && timed_out >= 1, "{pushed_back} pushed back, {timed_out} timed out");
    assert!(serve_meanwhile(&client(), &url, "edge-budget", Duration::ZERO) < SERVED_WITHIN);
    let mut resident_after = 0;
    eventually(Duration::from_secs(5), "the bodies' memory is given back", || {
        resident_after = memory_kb(pid, "VmRSS");
        resident_after < resident_before + (32 << 10)
    });
    println!("resident: {resident_after} kB once they are gone");
}

#[test]
fn connections_past_the_cap_wait_while_the_process_keeps_room_for_its_own_files() {
    let (port, listen) = (free_port(), free_port());
    let config = |more: &str| format!("listen: 127.0.0.1:{listen}\nworker_persist: 0.2\nrequest_timeout: 2\n{more}");
    let cluster = Cluster::new(&[port], &config(""));
    // With 256 descriptors, the coordinator takes 128 connections at once.
    let mut coordinator = cluster.coordinator_with_open_files(listen, 256);
    coordinator.wait_live(1);
    let url = coordinator.url();
    let client = client();
    let version = get_json(&client, &format!("{url}/stats"))["config"]["version"].clone();

    let idle: Vec<TcpStream> = (0..300).map(|_| stall(url.trim_start_matches("http://"), Slow::Idle)).collect();
    // The normal client's connection is open already: it goes on being served.
    let slowest = serve_meanwhile(&client, &url, "edge-cap", Duration::from_secs(1));
    assert!(slowest < SERVED_WITHIN, "a normal request took {slowest:?} beside 300 idle connections");
    // The coordinator can still open its own files: an edit of the config is read and applied.
    cluster.write_config(&[port], &config("max_key_bytes: 100\n"));
    eventually(Duration::from_secs(5), "the edit is applied", || {
        let status = get_json(&client, &format!("{url}/stats"))["config"].clone();
        assert_eq!(status["valid"], true, "{status}");
        status["version"] != version
    });
    // Those waiting are taken as the others time out, and time out in turn.
    let deadline = Instant::now() + Duration::from_secs(30);
    for stream in idle {
        let ended = ending(stream, deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)));
        assert_eq!(ended, Ok(None), "an idle connection is closed without a reply");
    }
    assert!(coordinator.log().lines().all(|line| !line.contains("Too many open files")), "{}", coordinator.log());
}
