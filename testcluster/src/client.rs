//! The requests the tests make of a coordinator or a worker, each bounded in time, so that a
//! hung server fails a test instead of hanging it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::{Body, Client, Response};
use serde_json::Value;

/// How long a request may take, in [`client`] and [`raw`].
const TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP client with timeouts, so that a hung server fails the test instead of hanging it.
pub fn client() -> Client {
    Client::builder().timeout(TIMEOUT).build().unwrap()
}

/// The URL of the worker on 127.0.0.1:`port`.
pub fn worker_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// `POST {url}/items` with `body`.
pub fn post(client: &Client, url: &str, body: impl Into<Body>) -> Response {
    client.post(format!("{url}/items")).header("content-type", "application/json").body(body).send().unwrap()
}

/// A batch of `(tenant, id)` items as JSON.
pub fn batch(items: &[(&str, &str)]) -> String {
    let items: Vec<Value> =
        items.iter().map(|(tenant, id)| serde_json::json!({ "id": id, "tenant": tenant })).collect();
    Value::Array(items).to_string()
}

/// Posts ids `<tenant>-<i>` for `i` in `from..to` of `tenant` to `url`, in batches of 50, each
/// acknowledged.
pub fn post_range(url: &str, tenant: &str, from: usize, to: usize) {
    let client = client();
    let ids: Vec<String> = (from..to).map(|i| format!("{tenant}-{i}")).collect();
    for chunk in ids.chunks(50) {
        let items: Vec<(&str, &str)> = chunk.iter().map(|id| (tenant, id.as_str())).collect();
        assert_eq!(post(&client, url, batch(&items)).status(), StatusCode::OK);
    }
}

/// `text` with every byte but ASCII letters and digits percent-encoded: a path segment, or a
/// query value, that stands for exactly `text`.
pub fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// `{url}/items/{tenant}/count`, percent-encoding the tenant.
fn count_url(url: &str, tenant: &str) -> String {
    format!("{url}/items/{}/count", percent_encoded(tenant))
}

/// `GET {url}/items/{tenant}/count`, percent-encoding the tenant: the reply, whatever its status.
pub fn count_reply(client: &Client, url: &str, tenant: &str) -> Response {
    client.get(count_url(url, tenant)).send().unwrap()
}

/// The count of `tenant` at `url`, or `None` if it did not answer one (no reply, or a 503 while
/// the store is unreachable): unlike [`count`], a caller polling across an outage can go on.
pub fn try_count(client: &Client, url: &str, tenant: &str) -> Option<u64> {
    let reply = client.get(count_url(url, tenant)).send().ok()?;
    if reply.status() != StatusCode::OK {
        return None;
    }
    reply.json::<Value>().ok()?["count"].as_u64()
}

/// `GET {url}/items/{tenant}/count`, asserting a count in the reply.
pub fn count(client: &Client, url: &str, tenant: &str) -> u64 {
    let reply: Value = count_reply(client, url, tenant).json().unwrap();
    reply["count"].as_u64().unwrap_or_else(|| panic!("no count in {reply}"))
}

/// Asserts that `response` has `status` and a JSON body `{"error": "<message>"}`; returns the
/// message.
pub fn error_message(response: Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status, "expected {status} from {}", response.url());
    let url = response.url().clone();
    let text = response.text().unwrap();
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: the {status} body is not JSON ({e}): {text:?}"));
    match body["error"].as_str() {
        Some(message) if !message.is_empty() => message.to_owned(),
        _ => panic!("{url}: the {status} body has no error message: {body}"),
    }
}

/// `GET {url}` as JSON, asserting a 200.
pub fn get_json(client: &Client, url: &str) -> Value {
    let response = client.get(url).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK, "GET {url}");
    response.json().unwrap()
}

/// The `/stats` of the process at `url`.
pub fn stats(url: &str) -> Value {
    get_json(&client(), &format!("{url}/stats"))
}

/// The value of the series `name{labels...}` in Prometheus text, if it is there; the series may
/// carry other labels besides `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|line| !line.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let has = |&(key, want): &(&str, &str)| {
            series_labels.split(',').any(|pair| {
                pair.split_once('=').is_some_and(|(k, v)| {
                    k == key && v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) == Some(want)
                })
            })
        };
        (series_name == name && labels.iter().all(has)).then(|| value.parse().ok())?
    })
}

/// Polls until `check` holds, for at most `within`; returns how long it took.
pub fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(25));
    }
    started.elapsed()
}

/// The worker of `ports` whose `/stats` lists `tenant` in quarantine, once one does.
pub fn eventually_owner(ports: &[u16], tenant: &str, within: Duration) -> u16 {
    let mut owner = None;
    eventually(within, &format!("a worker shows {tenant} in quarantine"), || {
        owner = ports.iter().copied().find(|&port| {
            stats(&worker_url(port))["quarantined"].as_array().is_some_and(|q| q.iter().any(|t| t["tenant"] == tenant))
        });
        owner.is_some()
    });
    owner.unwrap()
}

/// `GET {url}{path}` with `path` sent byte for byte, as HTTP/1.1 over a plain socket: reqwest and
/// the `url` crate remove dot segments (`/./`, `/%2E%2E/`) from a path before sending it. Returns
/// the status and the body.
pub fn raw_get(url: &str, path: &str) -> (u16, String) {
    let authority = url.strip_prefix("http://").expect("an http:// URL");
    raw(url, &format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"))
}

/// Sends `request` to `url` byte for byte, as a client that builds its requests by hand (or
/// lies in them) would, and reads the reply until the server closes the connection or 10 s
/// pass. Returns the status and the body.
pub fn raw(url: &str, request: &str) -> (u16, String) {
    let authority = url.strip_prefix("http://").expect("an http:// URL");
    let mut stream = TcpStream::connect(authority).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    let line = request.lines().next().unwrap_or_default();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{line}: no reply head in {reply:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
    (status.unwrap_or_else(|| panic!("{line}: no status in {head:?}")), body.to_owned())
}
