//! Hostile neighbours and clients, with real processes: what a program on a worker's address,
//! the environment, a page of another site in the operator's browser or a careless client may
//! throw at the coordinator and the workers.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use countapp_testcluster::fake::{self, FakeWorker};
use countapp_testcluster::{
    Cluster, Node, Process, Signal, batch, client, count, error_message, eventually, extra, free_port, get_json,
    lone_worker, metric, post, raw, running,
};
use reqwest::StatusCode;
use serde_json::Value;

/// How long a coordinator gets to notice a worker's port, and a worker to start.
const STARTUP: Duration = Duration::from_secs(20);

/// The keys every cluster here has beside `listen` and `config_check`.
const MORE: &str = "worker_persist: 0.2\n";

/// The coordinator's `/stats` entry of the worker on `port`, if it lists one.
fn entry(coordinator: &Node, port: u16) -> Option<Value> {
    let workers = get_json(&client(), &format!("{}/stats", coordinator.url()))["workers"].as_array()?.clone();
    workers.into_iter().find(|w| w["url"].as_str().is_some_and(|url| url.ends_with(&format!(":{port}"))))
}

/// Waits until the coordinator reports the worker on `port` blocked; returns its entry.
fn wait_blocked(coordinator: &Node, port: u16) -> Value {
    let mut blocked = None;
    eventually(STARTUP, "the worker shows as blocked", || {
        blocked = client()
            .get(format!("{}/stats", coordinator.url()))
            .send()
            .is_ok()
            .then(|| entry(coordinator, port))
            .flatten()
            .filter(|w| w["state"] == "blocked");
        blocked.is_some()
    });
    blocked.unwrap()
}

#[test]
fn a_program_on_a_workers_port_naming_another_pid_is_reported_and_nothing_is_signalled() {
    let cluster = Cluster::new(&[], "");
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let mut sleeper = Process::spawn_logged(sleep, "sleep", &cluster.path().join("sleep.log"));
    let victim = sleeper.pid();
    // It answers like a worker: its `/stats` names the sleep's pid, and it runs another config,
    // which is what made a coordinator stop a worker it took for its own.
    let (port, listen) = (free_port(), free_port());
    let squatter = FakeWorker::start(&format!("127.0.0.1:{port}"), move |request, stream| {
        match request.target.split('?').next().unwrap_or_default() {
            "/stats" => fake::reply(stream, "200 OK", &format!(r#"{{"pid":{victim},"config_version":"000000"}}"#)),
            "/ready" | "/health" => fake::reply(stream, "200 OK", r#"{"ready":true,"config_version":"000000"}"#),
            _ => fake::reply(stream, "404 Not Found", r#"{"error":"no such route"}"#),
        }
    });
    cluster.write_config(&[port], &extra(listen, MORE));
    let mut coordinator = cluster.coordinator(listen);

    let blocked = wait_blocked(&coordinator, port);
    // A coordinator that adopted it sent the sleep SIGTERM within 50 ms: give it many times that.
    thread::sleep(Duration::from_secs(2));
    assert!(sleeper.is_running(), "the coordinator signalled pid {victim}, named by a program on a worker's port");
    let blocked_since = entry(&coordinator, port).unwrap();
    assert_eq!((blocked_since["state"].as_str(), blocked_since["restarts"].as_u64()), (Some("blocked"), Some(0)));
    let why = blocked["last_error"].as_str().unwrap();
    assert!(why.contains("held by another program") && why.contains(&std::process::id().to_string()), "{blocked}");
    assert_eq!((blocked["pid"].as_u64(), blocked["adopted"].as_bool()), (None, Some(false)), "{blocked}");
    assert!(
        squatter.requests().iter().all(|r| r.header("authorization").is_none()),
        "the token was sent to the program on the worker's port: {:?}",
        squatter.requests()
    );

    // Once the port is free, the worker is spawned there.
    drop(squatter);
    coordinator.wait_live(1);
    assert!(sleeper.is_running());
}

#[test]
fn the_worker_binary_run_by_someone_else_on_the_port_is_not_adopted_without_the_token() {
    let (port, listen) = (free_port(), free_port());
    let cluster = Cluster::new(&[port], &extra(listen, MORE));
    // A genuine worker, the same binary on the same config, but started by hand with a token of
    // its own: anyone on the machine can run the binary, only the coordinator knows its token.
    let mut stranger = cluster.worker(port);
    stranger.wait_ready();
    let coordinator = cluster.coordinator(listen);

    let blocked = wait_blocked(&coordinator, port);
    let why = blocked["last_error"].as_str().unwrap();
    assert!(why.contains(&format!("pid {}", stranger.pid())) && why.contains("token"), "{blocked}");
    thread::sleep(Duration::from_secs(1));
    assert!(stranger.is_running(), "the coordinator stopped a worker it did not start");
    assert_eq!(entry(&coordinator, port).unwrap()["state"], "blocked");
}

#[test]
fn proxy_variables_in_the_environment_are_ignored_and_the_token_never_leaves_for_a_proxy() {
    let proxy = FakeWorker::start("127.0.0.1:0", |_, stream| fake::reply(stream, "502 Bad Gateway", "{}"));
    let proxy_url = proxy.url();
    let env: Vec<(&str, &str)> = ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .into_iter()
        .map(|name| (name, proxy_url.as_str()))
        .collect();
    let (ports, listen) = ([free_port(), free_port()], free_port());
    let cluster = Cluster::new(&ports, &extra(listen, MORE));
    let mut coordinator = cluster.coordinator_with_env(listen, &env);
    coordinator.wait_live(2);
    let (client, url) = (client(), coordinator.url());

    // Every kind of control request: health checks, the dashboard's stats polls, a config push
    // (with the token), and the shutdown requests (with the token).
    assert_eq!(post(&client, &url, batch(&[("proxied", "1")])).status(), StatusCode::OK);
    eventually(STARTUP, "counted", || count(&client, &url, "proxied") == 1);
    let dashboard = get_json(&client, &format!("{url}/dashboard.json"));
    assert!(dashboard["workers"].as_array().unwrap().iter().all(|w| w["stats_error"].is_null()), "{dashboard}");
    let before = get_json(&client, &format!("{url}/stats"))["config"]["version"].clone();
    cluster.write_config(&ports, &extra(listen, &format!("{MORE}max_key_bytes: 8\n")));
    eventually(STARTUP, "every worker runs the edit", || {
        let stats = get_json(&client, &format!("{url}/stats"));
        stats["config"]["version"] != before
            && stats["workers"].as_array().unwrap().iter().all(|w| w["config_version"] == stats["config"]["version"])
    });
    coordinator.signal(Signal::SIGTERM);
    assert!(coordinator.wait_exit(STARTUP).success(), "{}", coordinator.log());
    assert!(cluster.processes().is_empty(), "workers left running");

    assert_eq!(proxy.connections(), 0, "the proxy was sent: {:?}", proxy.requests());
}

/// The peak resident memory of the process `pid`, in bytes (`VmHWM`).
fn peak_memory(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_reply_of_any_size_to_a_health_check_or_a_stats_poll_costs_the_coordinator_at_most_a_mebibyte() {
    const HUGE: usize = 256 << 20;
    // 127.0.0.2 stands in for other machines: listed workers the coordinator only checks and
    // routes to. One answers its health checks with 256 MiB; the other answers them well, and
    // its stats (which the dashboard polls) with 256 MiB.
    let huge_health = FakeWorker::start("127.0.0.2:0", |request, stream| match request.target.as_str() {
        "/ready" => fake::huge_reply(stream, "200 OK", HUGE),
        _ => fake::reply(stream, "404 Not Found", "{}"),
    });
    let huge_stats = FakeWorker::start("127.0.0.2:0", |request, stream| match request.target.as_str() {
        "/ready" => fake::reply(stream, "200 OK", r#"{"ready":true}"#),
        "/stats" => fake::huge_reply(stream, "200 OK", HUGE),
        _ => fake::reply(stream, "404 Not Found", "{}"),
    });
    let (port, listen) = (free_port(), free_port());
    let urls = [format!("http://127.0.0.1:{port}"), huge_health.url(), huge_stats.url()];
    let cluster = Cluster::with_urls(&urls, &extra(listen, MORE));
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(2);
    let client = client();
    let url = coordinator.url();
    let dashboard = eventually_dashboard(&client, &url, &huge_stats.url());
    // Each huge reply read whole, or cut off by the coordinator.
    eventually(STARTUP, "huge replies read or refused", || huge_health.answered() >= 2 && huge_stats.answered() >= 1);

    let peak = peak_memory(coordinator.pid());
    println!("the coordinator's peak resident memory: {} MiB", peak >> 20);
    assert!(peak < (HUGE / 4) as u64, "the coordinator grew to {} MiB", peak >> 20);
    assert!(coordinator.is_running());
    let entry = |url: &str| dashboard["workers"].as_array().unwrap().iter().find(|w| w["url"] == url).unwrap().clone();
    assert!(entry(&huge_stats.url())["stats_error"].as_str().unwrap().contains("over"), "{dashboard}");
    assert_ne!(entry(&huge_health.url())["state"], "ready", "{dashboard}");
}

/// The dashboard's view once it has polled the worker at `worker` (or failed to).
fn eventually_dashboard(client: &reqwest::blocking::Client, url: &str, worker: &str) -> Value {
    let mut dashboard = Value::Null;
    eventually(STARTUP, "the dashboard polled the worker's stats", || {
        dashboard = get_json(client, &format!("{url}/dashboard.json"));
        let workers = dashboard["workers"].as_array().unwrap();
        workers.iter().any(|w| w["url"] == worker && !w["stats_error"].is_null())
    });
    dashboard
}

/// `POST {url}/items` of one item, with `headers`: the status.
fn post_with(url: &str, headers: &[(&str, &str)], id: &str) -> reqwest::blocking::Response {
    let mut request = client().post(format!("{url}/items")).body(batch(&[("cross", id)]));
    for &(name, value) in headers {
        request = request.header(name, value);
    }
    request.send().unwrap()
}

#[test]
fn requests_from_other_sites_pages_are_refused_and_curl_keeps_working() {
    let (cluster, ports, _, coordinator) = running(1, MORE);
    let worker = format!("http://127.0.0.1:{}", ports[0]);
    let mut accepted = 0;
    for url in [coordinator.url(), worker.clone()] {
        let own = url.clone();
        // What `curl -d` sends, and a page of this very server: taken.
        for headers in [&[("content-type", "application/x-www-form-urlencoded")][..], &[("origin", &own)]] {
            assert_eq!(
                post_with(&url, headers, &format!("ok-{accepted}")).status(),
                StatusCode::OK,
                "{url} {headers:?}"
            );
            accepted += 1;
        }
        // A form or a fetch of another site's page: refused, and nothing of it applied.
        for headers in [
            &[("origin", "http://evil.example"), ("content-type", "text/plain")][..],
            &[("origin", "null")],
            &[("origin", "http://localhost:1")],
            &[("sec-fetch-site", "cross-site"), ("sec-fetch-mode", "no-cors")],
            &[("sec-fetch-site", "same-site"), ("sec-fetch-mode", "navigate")],
        ] {
            let message = error_message(post_with(&url, headers, "refused"), StatusCode::FORBIDDEN);
            assert!(message.contains("another"), "{url} {headers:?}: {message}");
        }
        // Its scripts cannot read the data either; a link followed to the page is fine.
        let read = client().get(format!("{url}/stats")).header("sec-fetch-site", "cross-site");
        assert_eq!(read.header("sec-fetch-mode", "cors").send().unwrap().status(), StatusCode::FORBIDDEN);
        let link = client().get(format!("{url}/stats")).header("sec-fetch-site", "cross-site");
        assert_eq!(link.header("sec-fetch-mode", "navigate").send().unwrap().status(), StatusCode::OK);
        // DNS rebinding: a name other than the loopback ones is refused, reads included.
        let authority = url.strip_prefix("http://").unwrap();
        let port = authority.rsplit_once(':').unwrap().1;
        for host in ["evil.example", &format!("evil.example:{port}")] {
            let (status, body) =
                raw(&url, &format!("GET /stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"));
            assert_eq!(status, 403, "{url} Host {host}: {body}");
            assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string(), "{body}");
        }
        for host in ["localhost", &format!("localhost:{port}"), &format!("[::1]:{port}"), authority] {
            let (status, body) =
                raw(&url, &format!("GET /stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"));
            assert_eq!(status, 200, "{url} Host {host}: {body}");
        }
    }
    // Even with the token, a worker's config cannot be changed from another site's page.
    let token = fs::read_to_string(cluster.path().join("logs/coordinator.token")).unwrap();
    let put = client().put(format!("{worker}/config")).bearer_auth(token).header("origin", "http://evil.example");
    let message = error_message(put.body("{}").send().unwrap(), StatusCode::FORBIDDEN);
    assert!(message.contains("another origin"), "{message}");
    eventually(STARTUP, "only the accepted batches are counted", || {
        count(&client(), &coordinator.url(), "cross") == accepted
    });
}

#[test]
fn a_workers_config_route_refuses_a_request_without_the_token_before_reading_its_body() {
    let (_cluster, worker) = lone_worker("");
    let port = worker.port;
    // A head announcing a body that never comes: answered at once, not waited for.
    let started = Instant::now();
    let (status, body) = raw(
        &worker.url(),
        &format!(
            "PUT /config HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
             Content-Length: 100000\r\nConnection: close\r\n\r\n{{"
        ),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("token"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(5), "answered only after {:?}", started.elapsed());
}

#[test]
fn a_listen_on_every_address_with_a_local_worker_on_its_port_is_refused_at_start() {
    let port = free_port();
    for listen in [format!("0.0.0.0:{port}"), format!("\"[::]:{port}\"")] {
        let cluster = Cluster::new(&[port], &format!("listen: {listen}\n"));
        let mut coordinator = cluster.coordinator(port);
        let status = coordinator.wait_exit(STARTUP);
        assert_eq!(status.code(), Some(1), "{}", coordinator.log());
        let log = coordinator.log();
        assert!(log.contains("workers[0]: ") && log.contains("listen: "), "{log}");
    }
}

#[test]
fn malformed_requests_are_counted_and_logged_at_debug_not_as_errors() {
    let (cluster, ports, _, coordinator) = running(1, MORE);
    let worker = format!("http://127.0.0.1:{}", ports[0]);
    const MALFORMED: [&[u8]; 3] = [
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
        b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    ];
    for (url, server) in [(&coordinator.url(), "coordinator"), (&worker, "worker")] {
        for request in MALFORMED {
            let mut stream = std::net::TcpStream::connect(url.strip_prefix("http://").unwrap()).unwrap();
            stream.write_all(request).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = std::io::Read::read(&mut stream, &mut [0; 256]);
        }
        let metrics = client().get(format!("{url}/metrics")).send().unwrap().text().unwrap();
        let counted = metric(&metrics, &format!("countapp_{server}_client_protocol_errors_total"), &[]);
        assert_eq!(counted, Some(MALFORMED.len() as f64), "{url}:\n{metrics}");
    }
    let logs: PathBuf = cluster.path().join("logs").join(format!("{}.log", ports[0]));
    for (name, log) in [("coordinator", coordinator.log()), ("worker", fs::read_to_string(logs).unwrap())] {
        let errors: Vec<&str> = log.lines().filter(|line| line.contains("ERROR")).collect();
        assert!(errors.is_empty(), "the {name} logged client errors as its own:\n{}", errors.join("\n"));
    }
}
