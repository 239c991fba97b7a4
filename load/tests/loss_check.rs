//! The load tool run as a real process against tiny in-test servers on loopback: an honest one,
//! which counts exactly what it took, and deliberately broken ones, which the loss check must
//! catch. Each server keeps its own tally of what it did wrong, so the tool's report can be held
//! to the exact number. The runs use `--exact` (a marker tenant per batch, whose name tells
//! the server's tally which batch it was), but for one that shows what counts alone miss. The
//! servers also answer the reads and deletes of the mixed workload (`--mix`).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

/// How a test server treats what it is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    /// Counts every distinct id it acknowledged.
    Honest,
    /// Acknowledges everything, but every 10th item it receives never reaches its count.
    Forgetful,
    /// Adds an id nobody sent to each batch's first tenant.
    Inventive,
    /// Applies every batch, but answers every 4th with a 503: items the tool sent without an
    /// acknowledgement, which may count without being unexpected.
    Flaky,
    /// Applies every 5th batch but answers it 503, and drops the one after it whole but answers
    /// 200: as many acknowledged batches lost as unacknowledged ones applied, so that the counts
    /// balance.
    Swapping,
    /// Answers a delete 200 but deletes nothing.
    Undeleting,
    /// Answers every read that names its consistency (the mixed workload's, strong or eventual)
    /// from before the load: counts 0, contains nothing.
    Lagging,
}

/// Whether a tenant is one of the load tool's batch markers rather than one of its tenants.
fn is_marker(tenant: &str) -> bool {
    tenant.contains('~')
}

#[derive(Debug)]
struct Server {
    behaviour: Behaviour,
    sets: Mutex<HashMap<String, HashSet<String>>>,
    items_seen: AtomicU64,
    posts: AtomicU64,
    /// Items of the load's tenants acknowledged but dropped (Forgetful), ids made up
    /// (Inventive), or batches acknowledged but dropped (Swapping).
    misdeeds: AtomicU64,
    /// The marker tenants of the batches that Forgetful dropped the marker of, or that Swapping
    /// dropped whole.
    lost_markers: Mutex<Vec<String>>,
    /// Deletes answered, and the tenants they named.
    deletes: AtomicU64,
    deleted: Mutex<HashSet<String>>,
}

#[derive(Deserialize)]
struct Item {
    id: String,
    tenant: String,
}

impl Server {
    /// Starts a server on a loopback port, on a thread of its own that lives as long as the test.
    fn start(behaviour: Behaviour) -> (Arc<Server>, SocketAddr) {
        let server = Arc::new(Server {
            behaviour,
            sets: Mutex::default(),
            items_seen: AtomicU64::new(0),
            posts: AtomicU64::new(0),
            misdeeds: AtomicU64::new(0),
            lost_markers: Mutex::default(),
            deletes: AtomicU64::new(0),
            deleted: Mutex::default(),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = server.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let server = serving.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request| server.clone().handle(request));
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                    });
                }
            });
        });
        (server, addr)
    }

    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = request.uri().path().to_owned();
        let reply = |status: StatusCode, body: String| {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            Ok(response)
        };
        // A read of the lagging server that names its consistency sees nothing of the load.
        let lagging = self.behaviour == Behaviour::Lagging
            && request.uri().query().is_some_and(|query| query.starts_with("consistency="));
        match (request.method(), path.split('/').collect::<Vec<_>>().as_slice()) {
            (&Method::POST, ["", "items"]) => {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let Ok(items) = serde_json::from_slice::<Vec<Item>>(&body) else {
                    return reply(StatusCode::BAD_REQUEST, r#"{"error":"bad batch"}"#.into());
                };
                let post = self.posts.fetch_add(1, Ordering::Relaxed) + 1;
                let mut sets = self.sets.lock().unwrap();
                if self.behaviour == Behaviour::Swapping && post % 5 == 1 && post > 1 {
                    self.misdeeds.fetch_add(1, Ordering::Relaxed);
                    let marker = items.iter().find(|item| is_marker(&item.tenant));
                    self.lost_markers.lock().unwrap().extend(marker.map(|item| item.tenant.clone()));
                    return reply(StatusCode::OK, format!(r#"{{"accepted":{}}}"#, items.len()));
                }
                for item in &items {
                    let seen = self.items_seen.fetch_add(1, Ordering::Relaxed) + 1;
                    let set = sets.entry(item.tenant.clone()).or_default();
                    if self.behaviour == Behaviour::Forgetful && seen.is_multiple_of(10) {
                        if is_marker(&item.tenant) {
                            self.lost_markers.lock().unwrap().push(item.tenant.clone());
                        } else if !set.contains(&item.id) {
                            self.misdeeds.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    set.insert(item.id.clone());
                }
                if let (Behaviour::Inventive, Some(first)) = (self.behaviour, items.first()) {
                    sets.entry(first.tenant.clone()).or_default().insert(format!("phantom-{post}"));
                    self.misdeeds.fetch_add(1, Ordering::Relaxed);
                }
                let refused = match self.behaviour {
                    Behaviour::Flaky => post.is_multiple_of(4),
                    Behaviour::Swapping => post.is_multiple_of(5),
                    _ => false,
                };
                if refused {
                    return reply(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"flaky"}"#.into());
                }
                reply(StatusCode::OK, format!(r#"{{"accepted":{}}}"#, items.len()))
            }
            (&Method::GET, ["", "items", tenant, "count"]) => {
                let count = if lagging { 0 } else { self.sets.lock().unwrap().get(*tenant).map_or(0, HashSet::len) };
                reply(StatusCode::OK, format!(r#"{{"count":{count}}}"#))
            }
            (&Method::POST, ["", "items", tenant, "contains"]) => {
                let tenant = tenant.to_string();
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let ids: Vec<String> = serde_json::from_slice(&body).unwrap();
                let sets = self.sets.lock().unwrap();
                let set = sets.get(&tenant);
                let contains: Vec<bool> =
                    ids.iter().map(|id| !lagging && set.is_some_and(|set| set.contains(id))).collect();
                reply(StatusCode::OK, serde_json::json!({ "contains": contains }).to_string())
            }
            (&Method::POST, ["", "counts"]) => {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let tenants: Vec<String> = serde_json::from_slice(&body).unwrap();
                let sets = self.sets.lock().unwrap();
                let counts: HashMap<&String, usize> = tenants
                    .iter()
                    .map(|t| (t, if lagging { 0 } else { sets.get(t).map_or(0, HashSet::len) }))
                    .collect();
                reply(StatusCode::OK, serde_json::json!({ "counts": counts }).to_string())
            }
            (&Method::DELETE, ["", "items", tenant]) => {
                self.deletes.fetch_add(1, Ordering::Relaxed);
                self.deleted.lock().unwrap().insert((*tenant).to_owned());
                if self.behaviour != Behaviour::Undeleting {
                    self.sets.lock().unwrap().remove(*tenant);
                }
                reply(StatusCode::OK, r#"{"deleted":true}"#.into())
            }
            _ => reply(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.into()),
        }
    }
}

/// Runs the load tool against `addr` for a second over two connections, with `extra` flags, and
/// writes its JSON report to `json`. Batches of 51 ids give each of the 3 tenants 17 of them.
fn load(addr: SocketAddr, json: &Path, extra: &[&str]) -> Output {
    let url = format!("http://{addr}");
    let json = json.to_str().unwrap();
    let mut args = vec!["--url", &url, "--duration", "1s", "--connections", "2", "--batch", "51", "--tenants", "3"];
    args.extend(["--converge-timeout", "1s", "--quiet", "--json", json]);
    args.extend(extra);
    let output = Command::new(env!("CARGO_BIN_EXE_countapp-load")).args(&args).output().unwrap();
    eprintln!(
        "countapp-load {}\n--- stdout\n{}--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn report(json: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

/// The batch a marker tenant names, `<prefix>~<tag>-<connection>-<batch>`, as the report's
/// `lost_batches` lists it.
fn batch_of_marker(tenant: &str) -> serde_json::Value {
    let (rest, seq) = tenant.rsplit_once('-').unwrap();
    let connection = rest.rsplit_once('-').unwrap().1;
    serde_json::json!({ "connection": connection.parse::<u64>().unwrap(), "seq": seq.parse::<u64>().unwrap() })
}

/// The distinct ids of the load's tenants that `server` counts, markers aside.
fn counted(server: &Server) -> u64 {
    let sets = server.sets.lock().unwrap();
    sets.iter().filter(|(tenant, _)| !is_marker(tenant)).map(|(_, set)| set.len() as u64).sum()
}

#[test]
fn an_honest_store_passes_with_repeats() {
    let (server, addr) = Server::start(Behaviour::Honest);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = load(addr, &json, &["--repeat", "0.3", "--exact"]);
    assert_eq!(output.status.code(), Some(0));

    let report = report(&json);
    let check = &report["check"];
    assert_eq!(check["lost"], 0);
    assert_eq!(check["unexpected"], 0);
    assert_eq!(check["converged"], true);
    // Repeats were sent and deduplicated: more items than distinct ids, and the counts hold
    // exactly the distinct ids.
    let counted = counted(&server);
    assert_eq!(check["counted"], counted);
    assert_eq!(check["acked"], counted);
    assert!(report["run"]["items"].as_u64().unwrap() as f64 > 1.2 * counted as f64);
    // Every batch, each with its marker, was acknowledged and read applied.
    assert_eq!(check["batches"], server.posts.load(Ordering::Relaxed));
    assert_eq!((check["batches_lost"].as_u64(), check["exact"].as_bool()), (Some(0), Some(true)));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("lost 0, unexpected 0") && stdout.contains("0 acknowledged and lost"), "{stdout}");
}

#[test]
fn a_store_that_forgets_acknowledged_items_fails_loudly() {
    let (server, addr) = Server::start(Behaviour::Forgetful);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = load(addr, &json, &["--exact"]);
    assert_eq!(output.status.code(), Some(1));

    let forgotten = server.misdeeds.load(Ordering::Relaxed);
    assert!(forgotten > 0);
    let check = &report(&json)["check"];
    assert_eq!(check["lost"], forgotten);
    assert_eq!(check["unexpected"], 0);
    assert_eq!(check["converged"], false);
    // A batch whose marker was forgotten reads as never applied: acknowledged, so lost.
    let lost_markers = server.lost_markers.lock().unwrap().clone();
    assert!(!lost_markers.is_empty());
    assert_eq!(check["batches_lost"], lost_markers.len() as u64);
    let lost_batches: HashSet<String> = lost_markers.iter().map(|m| batch_of_marker(m).to_string()).collect();
    for batch in check["lost_batches"].as_array().unwrap() {
        assert!(lost_batches.contains(&batch.to_string()), "{batch} was not lost");
    }
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains(&format!("LOST {forgotten} applied items")), "{stderr}");
    assert!(stderr.contains(&format!("LOST {} acknowledged batches: connection", lost_markers.len())), "{stderr}");
    assert!(String::from_utf8(output.stdout).unwrap().contains("FAILED"));
}

#[test]
fn a_store_that_invents_items_fails() {
    let (server, addr) = Server::start(Behaviour::Inventive);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = load(addr, &json, &["--exact"]);
    assert_eq!(output.status.code(), Some(1));

    let check = &report(&json)["check"];
    assert_eq!(check["lost"], 0);
    assert_eq!(check["unexpected"], server.misdeeds.load(Ordering::Relaxed));
    assert!(String::from_utf8(output.stderr).unwrap().contains("UNEXPECTED"));
}

#[test]
fn failed_batches_are_errors_but_not_losses() {
    let (server, addr) = Server::start(Behaviour::Flaky);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = load(addr, &json, &["--exact"]);
    assert_eq!(output.status.code(), Some(0));

    let report = report(&json);
    let posts = server.posts.load(Ordering::Relaxed);
    assert_eq!(report["run"]["errors"], posts / 4);
    assert_eq!(report["run"]["errors_by_kind"]["HTTP 503"], posts / 4);
    let check = &report["check"];
    // The 503'd batches were applied: counted and sent, never acknowledged; their markers say
    // so, and the counts must hold their ids too.
    assert_eq!(check["counted"], check["sent"]);
    assert_eq!(check["expected"], check["sent"]);
    assert!(check["acked"].as_u64() < check["sent"].as_u64());
    assert_eq!(
        (check["batches_unacked"].as_u64(), check["batches_unacked_applied"].as_u64()),
        (Some(posts / 4), Some(posts / 4))
    );
    assert_eq!((check["lost"].as_u64(), check["unexpected"].as_u64()), (Some(0), Some(0)));
    assert!(String::from_utf8(output.stdout).unwrap().contains("errors: "));
}

#[test]
fn a_lost_batch_hidden_by_an_applied_one_passes_counts_alone_but_not_the_exact_check() {
    // Counts alone: every count lies between the ids acknowledged and the ids sent, so the
    // check passes, though the server dropped acknowledged batches; it says what it cannot tell.
    let (server, addr) = Server::start(Behaviour::Swapping);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = load(addr, &json, &[]);
    assert_eq!(output.status.code(), Some(0));
    assert!(server.misdeeds.load(Ordering::Relaxed) > 0);
    let check = &report(&json)["check"];
    assert_eq!((check["lost"].as_u64(), check["exact"].as_bool()), (Some(0), Some(false)));
    assert!(String::from_utf8(output.stdout).unwrap().contains("counts alone cannot tell"));

    // With markers, each dropped batch is named.
    let (server, addr) = Server::start(Behaviour::Swapping);
    let output = load(addr, &json, &["--exact"]);
    assert_eq!(output.status.code(), Some(1));
    let dropped: HashSet<String> =
        server.lost_markers.lock().unwrap().iter().map(|m| batch_of_marker(m).to_string()).collect();
    assert!(!dropped.is_empty());
    assert_eq!(dropped.len() as u64, server.misdeeds.load(Ordering::Relaxed));
    let check = &report(&json)["check"];
    assert_eq!(check["batches_lost"], dropped.len() as u64);
    for batch in check["lost_batches"].as_array().unwrap() {
        assert!(dropped.contains(&batch.to_string()), "{batch} was not dropped");
    }
    assert_eq!(check["lost"], dropped.len() as u64 * 51);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains(&format!("LOST {} acknowledged batches: connection", dropped.len())), "{stderr}");
}

#[test]
fn count_mode_reads_counts_and_plots() {
    let (server, addr) = Server::start(Behaviour::Honest);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let svg = dir.path().join("run.svg");
    let output = load(addr, &json, &["--count", "--plot", svg.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));

    let report = report(&json);
    assert_eq!(report["mode"], "count");
    assert!(report["run"]["requests"].as_u64().unwrap() > 10);
    assert_eq!(report["run"]["errors"], 0);
    assert!(report["check"].is_null());
    // Each tenant was seeded with one batch before its counts were read.
    assert!(server.sets.lock().unwrap().values().all(|set| set.len() == 51));
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("requests/s"));
}

#[test]
fn an_unreachable_server_is_an_error_at_once() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let output = load(addr, &dir.path().join("report.json"), &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8(output.stderr).unwrap().contains("reading the counts before the load"));
}

/// The mixed workload with shares high enough that a second holds every kind, deletes included.
const MIX: &[&str] = &["--mix", "strong=0.1,contains=0.1,counts=0.05,delete=0.05", "--repeat", "0.3"];

#[test]
fn the_mixed_workload_passes_against_an_honest_store() {
    let (server, addr) = Server::start(Behaviour::Honest);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = load(addr, &json, MIX);
    assert_eq!(output.status.code(), Some(0));

    let report = report(&json);
    assert_eq!(report["mode"], "mix");
    for kind in ["batch", "strong", "contains", "counts", "delete"] {
        assert!(report["run"]["operations"][kind]["requests"].as_u64().unwrap() > 0, "{kind}");
    }
    assert_eq!(report["run"]["operations"]["delete"]["requests"], server.deletes.load(Ordering::Relaxed));
    // What the store counts is what the check owed it: the ids acknowledged since each delete.
    let check = &report["check"];
    assert_eq!((check["lost"].as_u64(), check["unexpected"].as_u64()), (Some(0), Some(0)));
    assert_eq!(check["counted"], counted(&server));
    assert_eq!(check["acked"], counted(&server));
    let mix = &report["mix"];
    assert_eq!(mix["wrong_answers"], 0);
    assert!(mix["membership"]["gone_asked"].as_u64().unwrap() > 0);
    // Ids acknowledged since a tenant's last delete are asked about, unless no deleted tenant
    // got a batch after its last delete (the run may end on a delete of each).
    let refilled = {
        let sets = server.sets.lock().unwrap();
        server.deleted.lock().unwrap().iter().any(|tenant| sets.get(tenant).is_some_and(|set| !set.is_empty()))
    };
    assert_eq!(mix["membership"]["kept_asked"].as_u64().unwrap() > 0, refilled);
}

#[test]
fn a_store_that_acknowledges_deletes_but_keeps_the_ids_fails_the_mixed_check() {
    let (server, addr) = Server::start(Behaviour::Undeleting);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = load(addr, &json, MIX);
    assert_eq!(output.status.code(), Some(1));
    assert!(server.deletes.load(Ordering::Relaxed) > 0);

    let report = report(&json);
    // The ids acknowledged before the deletes still count: more than the check allows.
    let check = &report["check"];
    assert_eq!(check["lost"], 0);
    assert!(check["unexpected"].as_u64().unwrap() > 0);
    assert_eq!(check["counted"], counted(&server));
    // Each one asked about is found, though it had to be gone.
    let membership = &report["mix"]["membership"];
    assert!(membership["gone_asked"].as_u64().unwrap() > 0);
    assert_eq!(membership["gone_found"], membership["gone_asked"]);
    assert_eq!(membership["kept_missing"], 0);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("acknowledged before a delete are still there"), "{stderr}");
}

#[test]
fn a_store_whose_strong_reads_lag_gives_wrong_answers() {
    let (_server, addr) = Server::start(Behaviour::Lagging);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = load(addr, &json, &["--mix", "strong=0.1,contains=0.1,counts=0.05"]);
    assert_eq!(output.status.code(), Some(1));

    let report = report(&json);
    let wrong = report["mix"]["wrong_answers"].as_u64().unwrap();
    assert!(wrong > 0);
    // Each kind of read was caught, as an error of its own kind.
    let by_kind =
        |kind: &str| report["run"]["operations"][kind]["errors_by_kind"]["wrong answer"].as_u64().unwrap_or(0);
    assert!(by_kind("strong") > 0 && by_kind("contains") > 0 && by_kind("counts") > 0, "{report}");
    assert_eq!(by_kind("strong") + by_kind("contains") + by_kind("counts"), wrong);
    // The set check reads eventual counts, which are right: only the strong reads were wrong.
    assert_eq!(report["check"]["lost"], 0);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("WRONG:") && stderr.contains("below the"), "{stderr}");
}

#[test]
fn eventual_reads_may_lag_but_may_not_count_what_was_never_sent() {
    let reads = ["--mix", "strong=0.1,contains=0.1,counts=0.05", "--consistency", "eventual"];
    let sizes = ["--counts-tenants", "2", "--contains-ids", "30"];
    let (_server, addr) = Server::start(Behaviour::Lagging);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = load(addr, &json, &[&reads[..], &sizes].concat());
    assert_eq!(output.status.code(), Some(0));
    let lagging = report(&json);
    assert_eq!(lagging["mix"]["wrong_answers"], 0);
    assert_eq!(
        lagging["mix"]["reads"],
        serde_json::json!({"consistency": "eventual", "counts_tenants": 2, "contains_ids": 30})
    );
    for kind in ["strong", "contains", "counts"] {
        assert!(lagging["run"]["operations"][kind]["requests"].as_u64().unwrap() > 0, "{kind}");
    }

    // A store that counts ids nobody sent is caught by eventual counts too.
    let (_server, addr) = Server::start(Behaviour::Inventive);
    let output = load(addr, &json, &reads);
    assert_eq!(output.status.code(), Some(1));
    let report = report(&json);
    let by_kind =
        |kind: &str| report["run"]["operations"][kind]["errors_by_kind"]["wrong answer"].as_u64().unwrap_or(0);
    assert!(by_kind("strong") > 0 && by_kind("counts") > 0, "{report}");
    assert_eq!(by_kind("contains"), 0);
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("WRONG:") && stderr.contains("eventual count of") && stderr.contains("above the"),
        "{stderr}"
    );
}
