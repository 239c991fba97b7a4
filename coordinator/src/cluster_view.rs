//! The cluster as the dashboard shows it: one snapshot, shared by every reader, refreshed at most
//! once a second and only while someone has asked for it in the last few seconds. However many
//! tabs poll `GET /dashboard.json`, the workers see one `GET /stats` each per second, and none
//! while nobody looks.
//!
//! A snapshot is the coordinator's own `/stats` body with each worker's entry completed from that
//! worker's `/stats` (items acknowledged but not yet counted, how far behind its merging is) and
//! with rates against the previous snapshot. The view also keeps the last few minutes of samples
//! for the charts, and the events seen between snapshots (restarts, state changes, config edits):
//! a worker that is killed and back within a second still leaves a trace.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::web;
use countapp_server::http::RequestCounter;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::control;
use crate::pool::WorkerState;
use crate::routes::stats_json;
use crate::state::AppState;

/// The shortest time between two refreshes.
pub(crate) const REFRESH: Duration = Duration::from_secs(1);
/// How long after the last reader the view keeps refreshing.
const WATCHED: Duration = Duration::from_secs(5);
/// How long a worker's `/stats` may take: a slow worker only loses its figures for one refresh.
const STATS_TIMEOUT: Duration = Duration::from_millis(500);
/// A snapshot older than this was taken before a pause in watching: a reader waits for the next.
const STALE: Duration = Duration::from_millis(2500);
/// How long a reader waits for a fresh snapshot before it takes whatever there is.
const FRESH_WAIT: Duration = Duration::from_secs(2);
/// Samples kept for the charts: five minutes at one a second.
const HISTORY: usize = 300;
/// Events kept.
const EVENTS: usize = 100;

/// The shared snapshot, its history, and whether anyone is looking.
pub(crate) struct ClusterView {
    /// The coordinator's request counter, for the `/stats` part of a snapshot.
    requests: web::Data<RequestCounter>,
    last_asked: Mutex<Option<Instant>>,
    asked: Notify,
    latest: watch::Sender<Option<Arc<Snapshot>>>,
    log: Mutex<Log>,
}

/// One refresh's view of the cluster.
pub(crate) struct Snapshot {
    taken: Instant,
    /// The `/dashboard.json` body without its `history` and `events`.
    body: Value,
    /// What the next refresh compares against, per worker URL.
    seen: HashMap<String, Seen>,
    config: ConfigSeen,
}

/// A worker's figures at a snapshot.
struct Seen {
    state: WorkerState,
    restarts: u64,
    requests: u64,
    items: u64,
    restarted_at_unix_ms: Option<u64>,
}

/// The config status at a snapshot.
#[derive(PartialEq)]
struct ConfigSeen {
    loaded_at: SystemTime,
    error: Option<String>,
}

/// The charts' data and the event log, oldest first.
#[derive(Default)]
struct Log {
    samples: VecDeque<Sample>,
    events: VecDeque<Event>,
}

/// The cluster at one refresh, for the charts. A figure nobody could read is `null`.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    t_unix_ms: u64,
    items_per_s: Option<f64>,
    requests_per_s: Option<f64>,
    pending_items: Option<u64>,
    oldest_pending_s: Option<f64>,
    workers: BTreeMap<String, WorkerSample>,
}

/// One worker at one refresh, for the charts.
#[derive(Debug, Clone, Serialize)]
struct WorkerSample {
    items_per_s: Option<f64>,
    pending_items: Option<u64>,
    merge_lag_s: Option<f64>,
}

/// Something that changed between two snapshots.
#[derive(Debug, Clone, Serialize)]
struct Event {
    at_unix_ms: u64,
    /// The worker's URL, or `null` for the cluster's config.
    worker: Option<String>,
    message: String,
}

impl ClusterView {
    /// A view with no snapshot yet; [`run`] refreshes it.
    pub(crate) fn new(requests: web::Data<RequestCounter>) -> ClusterView {
        ClusterView {
            requests,
            last_asked: Mutex::new(None),
            asked: Notify::new(),
            latest: watch::Sender::new(None),
            log: Mutex::new(Log::default()),
        }
    }

    /// The latest snapshot, as JSON, with the samples and events taken after `since` (unix ms;
    /// all of them for 0). Marks the view as watched; after a pause in watching it waits briefly
    /// for a fresh snapshot. `None` only if none could be taken yet.
    pub(crate) async fn read(&self, since: u64) -> Option<Value> {
        *self.last_asked.lock() = Some(Instant::now());
        self.asked.notify_one();
        let mut latest = self.latest.subscribe();
        let fresh = |s: &Option<Arc<Snapshot>>| s.as_ref().is_some_and(|s| s.taken.elapsed() <= STALE);
        let _ = tokio::time::timeout(FRESH_WAIT, latest.wait_for(fresh)).await;
        let snapshot = latest.borrow().clone()?;
        let mut body = snapshot.body.clone();
        let log = self.log.lock();
        let history: Vec<&Sample> = log.samples.iter().filter(|s| s.t_unix_ms > since).collect();
        let events: Vec<&Event> = log.events.iter().filter(|e| e.at_unix_ms > since).collect();
        body["history"] = json!(history);
        body["events"] = json!(events);
        Some(body)
    }

    fn watched(&self) -> bool {
        self.last_asked.lock().is_some_and(|at| at.elapsed() <= WATCHED)
    }

    /// Takes a snapshot: every ready worker's `/stats` at once, then the coordinator's own.
    async fn refresh(&self, state: &AppState) {
        let workers = fetch_worker_stats(state).await;
        let mut body = stats_json(state, &self.requests);
        let now = Instant::now();
        let now_unix_ms = unix_ms(SystemTime::now());
        let previous = self.latest.borrow().clone();
        // Rates against a snapshot from before a pause in watching would be averages over the
        // pause, not rates.
        let recent = previous.as_ref().filter(|p| now.duration_since(p.taken) <= STALE);
        let elapsed = recent.map(|p| now.duration_since(p.taken).as_secs_f64());
        let mut events = Vec::new();
        let mut seen = HashMap::new();
        let mut sample = Sample {
            t_unix_ms: now_unix_ms,
            items_per_s: None,
            requests_per_s: None,
            pending_items: None,
            oldest_pending_s: None,
            workers: BTreeMap::new(),
        };
        for member in state.ctx.pool.members() {
            let url = member.url.as_str().to_owned();
            let status = member.status();
            let before = previous.as_ref().and_then(|p| p.seen.get(&url));
            let mut now_seen = Seen {
                state: status.state,
                restarts: status.restarts,
                requests: member.requests.load(Ordering::Relaxed),
                items: member.items.load(Ordering::Relaxed),
                restarted_at_unix_ms: before.and_then(|b| b.restarted_at_unix_ms),
            };
            let change = match before {
                Some(before) => worker_change(before, &mut now_seen, status.last_error.as_deref(), now_unix_ms),
                None => previous.is_some().then(|| "added to the config".to_owned()),
            };
            if let Some(message) = change {
                events.push(event(now_unix_ms, &url, message));
            }
            let per_s = |now: u64, then: u64| {
                let elapsed = elapsed.filter(|e| *e > 0.0)?;
                // A counter that went down belongs to a member that was removed and added again.
                now.checked_sub(then).map(|delta| delta as f64 / elapsed)
            };
            let recent_before = recent.and_then(|p| p.seen.get(&url));
            let requests_per_s = recent_before.and_then(|b| per_s(now_seen.requests, b.requests));
            let items_per_s = recent_before.and_then(|b| per_s(now_seen.items, b.items));
            let (pending_items, merge_lag_s, stats_error, config_version) = match workers.get(&url) {
                Some(Ok(stats)) => (
                    stats["pending_items"].as_u64(),
                    stats["merge_lag_s"].as_f64(),
                    None,
                    stats.get("config_version").cloned(),
                ),
                Some(Err(e)) => (None, None, Some(e.clone()), None),
                None => (None, None, None, None),
            };
            add(&mut sample.items_per_s, items_per_s);
            add(&mut sample.requests_per_s, requests_per_s);
            add(&mut sample.pending_items, pending_items);
            if let Some(lag) = merge_lag_s {
                sample.oldest_pending_s = Some(sample.oldest_pending_s.map_or(lag, |l| l.max(lag)));
            }
            sample.workers.insert(url.clone(), WorkerSample { items_per_s, pending_items, merge_lag_s });
            if let Some(entry) = worker_entry(&mut body, &url) {
                entry.insert("requests_per_s".into(), json!(requests_per_s));
                entry.insert("items_per_s".into(), json!(items_per_s));
                entry.insert("pending_items".into(), json!(pending_items));
                entry.insert("merge_lag_s".into(), json!(merge_lag_s));
                entry.insert("stats_error".into(), json!(stats_error));
                entry.insert("restarted_at_unix_ms".into(), json!(now_seen.restarted_at_unix_ms));
                // The version a worker says it runs, unless the coordinator already reports one.
                if let Some(version) = config_version {
                    entry.entry("config_version").or_insert(version);
                }
            }
            seen.insert(url, now_seen);
        }
        if let Some(previous) = &previous {
            for url in previous.seen.keys().filter(|url| !seen.contains_key(*url)) {
                events.push(event(now_unix_ms, url, "removed from the config".to_owned()));
            }
        }
        let config = {
            let status = state.config_status.lock();
            ConfigSeen { loaded_at: status.loaded_at, error: status.error.clone() }
        };
        if let Some(message) = previous.as_ref().and_then(|p| config_change(&p.config, &config)) {
            events.push(Event { at_unix_ms: now_unix_ms, worker: None, message });
        }
        body["cluster"]["items_per_s"] = json!(sample.items_per_s);
        body["cluster"]["requests_per_s"] = json!(sample.requests_per_s);
        body["cluster"]["pending_items"] = json!(sample.pending_items);
        body["cluster"]["oldest_pending_s"] = json!(sample.oldest_pending_s);
        body["taken_at_unix_ms"] = json!(now_unix_ms);
        body["refresh_s"] = json!(REFRESH.as_secs_f64());
        {
            let mut log = self.log.lock();
            push_bounded(&mut log.samples, sample, HISTORY);
            for event in events {
                tracing::debug!(worker = event.worker, message = event.message, "cluster event");
                push_bounded(&mut log.events, event, EVENTS);
            }
        }
        self.latest.send_replace(Some(Arc::new(Snapshot { taken: now, body, seen, config })));
    }
}

/// Refreshes the view of `state` once a second while it is watched, and sleeps while it is
/// not. Runs until aborted.
pub(crate) async fn run(state: web::Data<AppState>) {
    let view = &state.cluster_view;
    loop {
        while !view.watched() {
            view.asked.notified().await;
        }
        let started = Instant::now();
        view.refresh(&state).await;
        tokio::time::sleep_until((started + REFRESH).into()).await;
    }
}

/// Every ready worker's `/stats`, fetched concurrently, by URL: the body, or why it could not be
/// had.
async fn fetch_worker_stats(state: &AppState) -> HashMap<String, Result<Value, String>> {
    let mut fetches = JoinSet::new();
    for member in state.ctx.pool.members() {
        if member.status().state != WorkerState::Ready {
            continue;
        }
        let http = state.ctx.http.clone();
        let url = member.url.as_str().to_owned();
        fetches.spawn(async move {
            let reply = http.get(format!("{url}/stats")).timeout(STATS_TIMEOUT).send().await;
            let stats = match reply.and_then(reqwest::Response::error_for_status) {
                Ok(reply) => control::json::<Value>(reply).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(error) = &stats {
                tracing::debug!(worker = url, error, "worker stats unavailable");
            }
            (url, stats)
        });
    }
    let mut stats = HashMap::new();
    while let Some(fetched) = fetches.join_next().await {
        if let Ok((url, result)) = fetched {
            stats.insert(url, result);
        }
    }
    stats
}

/// What changed about a worker between two snapshots, if anything; a restart is noted in `now`.
fn worker_change(before: &Seen, now: &mut Seen, last_error: Option<&str>, at_unix_ms: u64) -> Option<String> {
    if now.restarts > before.restarts {
        now.restarted_at_unix_ms = Some(at_unix_ms);
        let why = last_error.unwrap_or("its process exited");
        return Some(match now.restarts - before.restarts {
            1 => format!("restarted after: {why}"),
            n => format!("restarted {n} times, last after: {why}"),
        });
    }
    (now.state != before.state).then(|| format!("now {}", state_name(now.state)))
}

/// What changed about the config between two snapshots, if anything.
fn config_change(before: &ConfigSeen, now: &ConfigSeen) -> Option<String> {
    if before == now {
        return None;
    }
    Some(match (&before.error, &now.error) {
        (_, Some(error)) => format!("config edit refused, the last good config stays in force: {error}"),
        (Some(_), None) if before.loaded_at == now.loaded_at => "config file valid again".to_owned(),
        _ => "config reloaded".to_owned(),
    })
}

/// The entry of the worker `url` in a `/stats` body.
fn worker_entry<'a>(body: &'a mut Value, url: &str) -> Option<&'a mut serde_json::Map<String, Value>> {
    body["workers"].as_array_mut()?.iter_mut().find(|w| w["url"] == url)?.as_object_mut()
}

/// Adds `value` to a total that stays `None` until some figure is known.
fn add<T: std::ops::Add<Output = T> + Copy>(total: &mut Option<T>, value: Option<T>) {
    if let Some(value) = value {
        *total = Some(total.map_or(value, |t| t + value));
    }
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, bound: usize) {
    if queue.len() == bound {
        queue.pop_front();
    }
    queue.push_back(item);
}

fn event(at_unix_ms: u64, url: &str, message: String) -> Event {
    Event { at_unix_ms, worker: Some(url.to_owned()), message }
}

/// A state as `/stats` spells it.
fn state_name(state: WorkerState) -> String {
    serde_json::to_value(state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
