//! The operator's dashboard at `GET /`, as an operator sees it: headless Chromium opens the page
//! of a real coordinator with four workers, and the test reads what the page's script rendered
//! from live data (never the static HTML): the workers ready, one killed with SIGKILL and back
//! without a reload (its exit an event with the time it happened, its last error shown with its
//! time and as past), a tenant's count looked up, workers added by a config edit (the others
//! keeping their colours, one whose port another program holds shown as blocked), an invalid
//! config edit and its error. A screenshot of the end is saved as `target/dashboard.png`. The
//! JSON behind the page is checked on its own, and so is that many readers cost the workers no
//! more than one.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use countapp_shared::wire::Dashboard;
use countapp_testcluster::browser::Browser;
use countapp_testcluster::{
    Cluster, batch, client, count, error_message, eventually, free_port, get_json, metric, post, sigkill,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// How long the page gets to show each change: a refresh a second, a poll a second, a respawn.
const WAIT: Duration = Duration::from_secs(15);
/// The WebDriver key code of Enter.
const ENTER: &str = "\u{E007}";

/// A coordinator of `workers` local workers on free ports, flushing every 0.2 s.
fn cluster(workers: usize) -> (Cluster, Vec<u16>, u16) {
    let ports: Vec<u16> = (0..workers).map(|_| free_port()).collect();
    let listen = free_port();
    let cluster =
        Cluster::new(&ports, &format!("listen: 127.0.0.1:{listen}\nworker_persist: 0.2\nconfig_check: 0.5\n"));
    (cluster, ports, listen)
}

#[test]
fn the_dashboard_shows_workers_a_restart_a_tenant_count_and_a_bad_config_live() {
    let started = Instant::now();
    let (cluster, ports, listen) = cluster(4);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(4);
    let url = coordinator.url();
    let trickle = Trickle::start(&url);
    let browser = Browser::start();
    browser.goto(&format!("{url}/"));
    let row = |port: u16| format!("#workers tbody tr[data-url='http://127.0.0.1:{port}']");

    // Four workers, each ready with the pid the coordinator reports.
    browser.wait_text("#summary-workers", WAIT, "four of four workers ready", |t| t == "4 of 4");
    for &port in &ports {
        let badge = browser.text(&format!("{} .badge", row(port)));
        assert_eq!(badge.as_deref(), Some("✓ Ready"), "the worker on {port}");
        let pid = browser.text(&format!("{} td.pid", row(port)));
        assert_eq!(pid, Some(coordinator.pid_of(port).to_string()), "the worker on {port}");
    }
    assert_eq!(browser.texts("#workers tbody tr").len(), 4);
    browser.wait_text("#connection", WAIT, "the page says it is live", |t| t.starts_with("Live"));
    let moving = |t: &str| t.chars().next().is_some_and(|c| c.is_ascii_digit() && c != '0');
    browser.wait_text("#summary-ingest", WAIT, "the ingest rate", moving);
    browser.wait_text("#chart-ingest-now", WAIT, "the ingest chart", |t| moving(t.trim_start_matches("now ")));

    // A tenant's count, looked up from the keyboard (Enter submits) and with the button.
    let client = client();
    let tenant = "dash board/1";
    let ids: Vec<String> = (0..5).map(|i| format!("id-{i}")).collect();
    let mut items: Vec<(&str, &str)> = ids.iter().map(|id| (tenant, id.as_str())).collect();
    items.push(("other", "a"));
    items.push(("other", "b"));
    items.push((tenant, "id-0"));
    assert_eq!(post(&client, &url, batch(&items)).status(), StatusCode::OK);
    eventually(WAIT, "the items are counted", || {
        count(&client, &url, tenant) == 5 && count(&client, &url, "other") == 2
    });
    browser.fill("#lookup-tenant", &format!("{tenant}{ENTER}"));
    let shown = browser.wait_text("#lookup-result", WAIT, "the tenant's count", |t| t.contains("distinct ids"));
    assert!(shown.starts_with("5 distinct ids for tenant “dash board/1”"), "{shown}");
    browser.fill("#lookup-tenant", "other");
    browser.click("#lookup-button");
    let shown = browser.wait_text("#lookup-result", WAIT, "the other tenant's count", |t| {
        t.contains("distinct ids") && t.contains("“other”")
    });
    assert!(shown.starts_with("2 distinct ids"), "{shown}");
    // Membership, strong: a batch acknowledged just now is found at once.
    assert_eq!(post(&client, &url, batch(&[("other", "just-now")])).status(), StatusCode::OK);
    browser.fill("#membership-ids", "a, zzz just-now");
    browser.click("#membership-button");
    let shown = browser.wait_text("#membership-result", WAIT, "the membership", |t| t.contains(" of 3 in"));
    assert!(shown.starts_with("2 of 3 in “other”"), "{shown}");
    let contains = browser.script("return document.querySelector('#membership-result').dataset.contains");
    assert_eq!(contains, json!("[true,false,true]"));

    // A worker killed with SIGKILL: the page shows it restarting (or its restart, if that took
    // less than a refresh), then ready again with a new pid, all without a reload.
    browser.script("window.sameDocument = true; return null");
    let victim = ports[1];
    let old_pid = coordinator.pid_of(victim);
    let killed_at = unix_ms();
    sigkill(old_pid);
    let restarting = browser.wait_text(&row(victim), WAIT, "the killed worker shows its restart", |t| {
        ["Restarting", "Exited", "Starting", "restarted"].iter().any(|word| t.contains(word))
    });
    println!("while restarting, the row read: {restarting:?}");
    browser.wait_text(&format!("{} .badge", row(victim)), WAIT, "the worker is ready again", |t| t == "✓ Ready");
    let new_pid = coordinator.pid_of(victim);
    assert_ne!(new_pid, old_pid);
    browser.wait_text(&format!("{} td.pid", row(victim)), WAIT, "the new pid", |t| t == new_pid.to_string());
    assert_eq!(browser.text(&format!("{} td.restarts", row(victim))).as_deref(), Some("1"));
    let error = browser.wait_text(&format!("{} td.last-error", row(victim)), WAIT, "the error as past", |t| {
        t.contains("before it was ready again")
    });
    assert!(error.contains("SIGKILL") || error.contains("signal: 9"), "last error: {error}");
    let error_time = browser.text(&format!("{} td.last-error time", row(victim))).unwrap();
    assert!(is_clock(&error_time), "the last error's time: {error_time:?}");

    // The exit is an event stamped when it happened, not when the page happened to look.
    let exit = format!("http://127.0.0.1:{victim}");
    browser
        .wait_text("#events", WAIT, "the exit is in the events", |t| t.contains("SIGKILL") || t.contains("signal: 9"));
    let shown = browser.script(
        "return Array.from(document.querySelectorAll('#events li')).map(li => ({ \
           seq: Number(li.dataset.seq), at: Date.parse(li.querySelector('time').dateTime), \
           time: li.querySelector('time').innerText, text: li.innerText }))",
    );
    let shown = shown.as_array().unwrap();
    let exited = shown
        .iter()
        .find(|e| e["text"].as_str().unwrap().contains(&exit) && e["text"].as_str().unwrap().contains("signal"))
        .unwrap_or_else(|| panic!("no exit event for {exit} in {shown:?}"));
    assert!(is_clock(exited["time"].as_str().unwrap()), "{exited}");
    let recorded = get_json(&client, &format!("{url}/dashboard.json"))["events"].clone();
    let recorded = recorded.as_array().unwrap().iter().find(|e| e["seq"] == exited["seq"]).cloned().unwrap();
    let at = recorded["at_unix_ms"].as_u64().unwrap();
    assert_eq!(exited["at"].as_u64(), Some(at), "the page shows the time recorded: {recorded}");
    assert!(at >= killed_at && at <= unix_ms(), "the exit's time {at} is when it happened (killed at {killed_at})");
    let seqs: Vec<u64> = shown.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let mut unique = seqs.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), seqs.len(), "an event shown twice: {seqs:?}");
    browser.wait_text("#summary-workers", WAIT, "four of four ready again", |t| t == "4 of 4");

    // Two workers added by a config edit, one of them on a port another program holds: every
    // worker keeps its colour, even in a page opened afresh (where the added one, first in URL
    // order, would otherwise take the first colour), and the held port shows as blocked.
    let colours = || -> BTreeMap<String, String> {
        let found = browser.script(
            "return Object.fromEntries(Array.from(document.querySelectorAll('#workers tbody tr')).map(tr => \
               [tr.dataset.url, getComputedStyle(tr.querySelector('.swatch')).borderTopColor]))",
        );
        serde_json::from_value(found).unwrap()
    };
    let before = colours();
    assert_eq!(before.len(), 4, "{before:?}");
    let lowest = ports.iter().map(|p| p.to_string()).min().unwrap();
    let added = loop {
        let port = free_port();
        if port.to_string() < lowest {
            break port;
        }
    };
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let held = squatter.local_addr().unwrap().port();
    let mut edited = ports.clone();
    edited.extend([added, held]);
    cluster.write_config(&edited, &format!("listen: 127.0.0.1:{listen}\nworker_persist: 0.2\nconfig_check: 0.5\n"));
    browser.wait_text(&format!("{} .badge", row(added)), WAIT, "the added worker is ready", |t| t == "✓ Ready");
    let blocked = browser.wait_text(&format!("{} .badge", row(held)), WAIT, "the held port", |t| t.contains("Blocked"));
    assert_eq!(blocked, "⊘ Blocked: port taken");
    let why = browser.text(&format!("{} td.last-error", row(held))).unwrap();
    assert!(why.contains("held by another program"), "{why}");
    browser.wait_text("#summary-workers", WAIT, "five of six ready", |t| t == "5 of 6");
    let after = colours();
    for (worker, colour) in &before {
        assert_eq!(after.get(worker), Some(colour), "{worker} kept its colour in the same page");
    }
    browser.goto(&format!("{url}/"));
    browser.wait_text("#summary-workers", WAIT, "five of six ready, reloaded", |t| t == "5 of 6");
    let reloaded = colours();
    for (worker, colour) in &before {
        assert_eq!(reloaded.get(worker), Some(colour), "{worker} kept its colour in a page opened afresh");
    }
    browser.script("window.sameDocument = true; return null");

    // An invalid edit of config.yaml: refused, and shown with the coordinator's own words.
    fs::write(cluster.config_path(), "workers: [\n").unwrap();
    browser.wait_text("#summary-config", WAIT, "the config shows as invalid", |t| t == "Invalid");
    let reason = get_json(&client, &format!("{url}/stats"))["config"]["error"].as_str().unwrap().to_owned();
    let shown = browser.wait_text("#config-error", WAIT, "the config error", |t| !t.is_empty());
    assert_eq!(shown.trim(), reason.trim());
    assert!(browser.text("#config-state").unwrap().starts_with("✕ Invalid"));
    assert_eq!(browser.script("return window.sameDocument === true"), json!(true), "the page was reloaded");

    assert!(trickle.stop() > 0, "the trickle of items was never acknowledged");
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("dashboard.png");
    browser.screenshot(&screenshot);
    println!("screenshot: {}; the test took {:?}", screenshot.display(), started.elapsed());
}

/// Now, in milliseconds since the unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Whether `text` is a time of day as the page prints it, `HH:MM:SS`.
fn is_clock(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 3 && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_digit()))
}

/// A light, steady ingest (a batch of new ids every 50 ms) so that the rates and charts move.
struct Trickle {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<u64>>,
}

impl Trickle {
    /// Starts posting to the coordinator at `url`, tenant `trickle`.
    fn start(url: &str) -> Trickle {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, flag) = (url.to_owned(), stop.clone());
        let thread = thread::spawn(move || {
            let client = client();
            let mut acked = 0;
            for b in 0.. {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let ids: Vec<String> = (0..40).map(|i| format!("{b}-{i}")).collect();
                let items: Vec<(&str, &str)> = ids.iter().map(|id| ("trickle", id.as_str())).collect();
                if post(&client, &url, batch(&items)).status() == StatusCode::OK {
                    acked += 1;
                }
                thread::sleep(Duration::from_millis(50));
            }
            acked
        });
        Trickle { stop, thread: Some(thread) }
    }

    /// Stops it; the batches acknowledged.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn dashboard_json_is_one_shared_snapshot_and_the_page_is_self_contained() {
    let (cluster, ports, listen) = cluster(2);
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(2);
    let client = client();
    let url = coordinator.url();

    // The page and its assets come from the binary; the browser is told to load nothing else.
    let page = client.get(format!("{url}/")).send().unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
    let html = page.text().unwrap();
    assert!(html.contains("src=\"/dashboard.js\"") && !html.contains("://"), "the page must load nothing from outside");
    for asset in ["/dashboard.js", "/dashboard.css"] {
        let reply = client.get(format!("{url}{asset}")).send().unwrap();
        assert_eq!(reply.status(), StatusCode::OK, "{asset}");
        assert!(!reply.text().unwrap().contains("://"), "{asset} must load nothing from outside");
    }
    error_message(client.post(format!("{url}/")).send().unwrap(), StatusCode::METHOD_NOT_ALLOWED);
    error_message(client.get(format!("{url}/nothing-here")).send().unwrap(), StatusCode::NOT_FOUND);
    error_message(client.get(format!("{url}/dashboard.json?since=soon")).send().unwrap(), StatusCode::BAD_REQUEST);

    // The snapshot: /stats, completed with each worker's own figures, and the charts' samples.
    let first = get_json(&client, &format!("{url}/dashboard.json"));
    assert_eq!(post(&client, &url, batch(&[("snap", "1"), ("snap", "2")])).status(), StatusCode::OK);
    let workers = first["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for worker in workers {
        assert_eq!(worker["state"], "ready");
        assert!(worker["pending_items"].is_u64(), "{worker}");
        assert!(worker["merge_lag_s"].is_f64(), "{worker}");
        assert_eq!(worker["stats_error"], Value::Null);
        for key in ["pid", "restarts", "last_error", "requests_per_s", "items_per_s", "restarted_at_unix_ms"] {
            assert!(worker.get(key).is_some(), "{key} missing in {worker}");
        }
        assert_eq!(worker["quarantined"], json!([]), "{worker}");
    }
    // The body is the typed contract, whole.
    let typed: Dashboard = serde_json::from_value(first.clone()).unwrap();
    assert_eq!(typed.workers.len(), 2);
    let events = typed.events.iter().map(|e| e.message.as_str()).collect::<Vec<_>>();
    assert!(events.iter().filter(|m| m.starts_with("spawned")).count() == 2, "{events:?}");
    assert!(events.iter().filter(|m| m.starts_with("ready")).count() == 2, "{events:?}");
    assert!(first["cluster"]["pending_items"].is_u64());
    assert_eq!(first["config"]["valid"], true);
    let taken = first["taken_at_unix_ms"].as_u64().unwrap();
    assert!(!first["history"].as_array().unwrap().is_empty());
    let next = eventually(WAIT, "a newer snapshot", || {
        get_json(&client, &format!("{url}/dashboard.json?since={taken}"))["taken_at_unix_ms"].as_u64() > Some(taken)
    });
    println!("the next snapshot came {next:?} later");
    let since = get_json(&client, &format!("{url}/dashboard.json?since={taken}"));
    let samples = since["history"].as_array().unwrap();
    assert!(!samples.is_empty() && samples.iter().all(|s| s["t_unix_ms"].as_u64() > Some(taken)), "{samples:?}");
    eventually(WAIT, "the items' rate is seen", || {
        let history = get_json(&client, &format!("{url}/dashboard.json"))["history"].clone();
        history.as_array().unwrap().iter().any(|s| s["items_per_s"].as_f64() > Some(0.0))
    });

    // Eight readers polling as fast as they can cost each worker one /stats a second, not one
    // per reader.
    let stats_served = || {
        let text = client.get(format!("http://127.0.0.1:{}/metrics", ports[0])).send().unwrap().text().unwrap();
        metric(&text, "countapp_worker_requests_total", &[("route", "/stats")]).unwrap_or(0.0) as u64
    };
    let before = stats_served();
    let polls = Duration::from_secs(2);
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            thread::spawn(move || {
                let client = countapp_testcluster::client();
                let started = Instant::now();
                let mut reads = 0;
                while started.elapsed() < polls {
                    get_json(&client, &format!("{url}/dashboard.json"));
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    let refreshes = stats_served() - before;
    println!("{reads} reads of /dashboard.json in {polls:?}; the worker answered {refreshes} /stats");
    assert!(reads > 20, "only {reads} reads");
    assert!(refreshes <= 4, "{refreshes} /stats on one worker for {reads} reads in {polls:?}");
}
