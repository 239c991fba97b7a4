//! The cluster as the dashboard shows it: one snapshot, shared by every reader, refreshed at most
//! once a second and only while someone has asked for it in the last few seconds. However many
//! tabs poll `GET /dashboard.json`, the workers see one `GET /stats` each per second, and none
//! while nobody looks.
//!
//! A snapshot is the coordinator's own `/stats` with each worker's entry completed from that
//! worker's `/stats` (items acknowledged but not yet counted, how far behind its merging is, its
//! tenants in quarantine) and with rates against the previous snapshot. The view also keeps the
//! last few minutes of samples for the charts; the events come from the pool's ring, recorded
//! when they happened.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix_web::web;
use countapp_server::http::RequestCounter;
use countapp_shared::wire::{Dashboard, DashboardCluster, DashboardWorker, Sample, WorkerSample, WorkerStats, unix_ms};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::control;
use crate::pool::WorkerState;
use crate::stats::{ConfigStatus, coordinator_stats};
use crate::supervisor::Context;

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

/// The shared snapshot, its history, and whether anyone is looking.
pub(crate) struct ClusterView {
    /// The workers, their events, and the client to ask them for their `/stats`.
    ctx: Arc<Context>,
    /// The config status, which the coordinator's reloads update.
    config_status: Arc<Mutex<ConfigStatus>>,
    /// The coordinator's request counter, for the `/stats` part of a snapshot.
    requests: web::Data<RequestCounter>,
    last_asked: Mutex<Option<Instant>>,
    asked: Notify,
    latest: watch::Sender<Option<Arc<Snapshot>>>,
    samples: Mutex<VecDeque<Sample>>,
}

/// One refresh's view of the cluster.
pub(crate) struct Snapshot {
    taken: Instant,
    /// The `/dashboard.json` body without its `history` and `events`.
    body: Dashboard,
    /// What the next refresh compares against, per worker URL.
    seen: HashMap<String, Seen>,
}

/// A worker's counters at a snapshot, for rates.
struct Seen {
    requests: u64,
    items: u64,
}

impl ClusterView {
    /// A view with no snapshot yet; [`run`] refreshes it.
    pub(crate) fn new(
        ctx: Arc<Context>,
        config_status: Arc<Mutex<ConfigStatus>>,
        requests: web::Data<RequestCounter>,
    ) -> ClusterView {
        ClusterView {
            ctx,
            config_status,
            requests,
            last_asked: Mutex::new(None),
            asked: Notify::new(),
            latest: watch::Sender::new(None),
            samples: Mutex::new(VecDeque::new()),
        }
    }

    /// The latest snapshot with the samples taken after `since` (unix ms; all of them for 0)
    /// and the events recorded since then. Marks the view as watched; after a pause in watching
    /// it waits briefly for a fresh snapshot. `None` only if none could be taken yet.
    pub(crate) async fn read(&self, since: u64) -> Option<Dashboard> {
        *self.last_asked.lock() = Some(Instant::now());
        self.asked.notify_one();
        let mut latest = self.latest.subscribe();
        let fresh = |s: &Option<Arc<Snapshot>>| s.as_ref().is_some_and(|s| s.taken.elapsed() <= STALE);
        let _ = tokio::time::timeout(FRESH_WAIT, latest.wait_for(fresh)).await;
        let snapshot = latest.borrow().clone()?;
        let mut body = snapshot.body.clone();
        body.history = self.samples.lock().iter().filter(|s| s.t_unix_ms > since).cloned().collect();
        body.events = self.ctx.pool.events.since(since);
        Some(body)
    }

    fn watched(&self) -> bool {
        self.last_asked.lock().is_some_and(|at| at.elapsed() <= WATCHED)
    }

    /// Takes a snapshot: every ready worker's `/stats` at once, then the coordinator's own.
    async fn refresh(&self) {
        let mut fetched = fetch_worker_stats(&self.ctx).await;
        let stats = coordinator_stats(&self.ctx.pool, &self.config_status.lock().clone(), &self.requests);
        let now = Instant::now();
        let now_unix_ms = unix_ms(SystemTime::now());
        let previous = self.latest.borrow().clone();
        // Rates against a snapshot from before a pause in watching would be averages over the
        // pause, not rates.
        let recent = previous.as_ref().filter(|p| now.duration_since(p.taken) <= STALE);
        let elapsed = recent.map(|p| now.duration_since(p.taken).as_secs_f64()).filter(|e| *e > 0.0);
        let mut seen = HashMap::new();
        let mut sample = Sample {
            t_unix_ms: now_unix_ms,
            items_per_s: None,
            requests_per_s: None,
            pending_items: None,
            oldest_pending_s: None,
            workers: BTreeMap::new(),
        };
        let mut workers = Vec::with_capacity(stats.workers.len());
        for mut entry in stats.workers {
            let now_seen = Seen { requests: entry.requests, items: entry.items_accepted };
            let before = recent.and_then(|p| p.seen.get(&entry.url));
            // A counter that went down belongs to a member that was removed and added again.
            let per_s = |now: u64, then: u64| Some(now.checked_sub(then)? as f64 / elapsed?);
            let requests_per_s = before.and_then(|b| per_s(now_seen.requests, b.requests));
            let items_per_s = before.and_then(|b| per_s(now_seen.items, b.items));
            let (worker_stats, stats_error) = match fetched.remove(&entry.url) {
                Some(Ok(stats)) => (Some(stats), None),
                Some(Err(e)) => (None, Some(e)),
                None => (None, None),
            };
            let pending_items = worker_stats.as_ref().map(|s| s.pending_items);
            let merge_lag_s = worker_stats.as_ref().map(|s| s.merge_lag_s);
            add(&mut sample.items_per_s, items_per_s);
            add(&mut sample.requests_per_s, requests_per_s);
            add(&mut sample.pending_items, pending_items);
            // What a client waits, at most, to see an item counted: the oldest pending item of
            // any worker, whether its log file is closed yet or not.
            if let Some(waited) = worker_stats.as_ref().map(|s| s.oldest_pending_s) {
                sample.oldest_pending_s = Some(sample.oldest_pending_s.map_or(waited, |w| w.max(waited)));
            }
            sample.workers.insert(entry.url.clone(), WorkerSample { items_per_s, pending_items, merge_lag_s });
            let quarantined = match worker_stats {
                Some(stats) => {
                    // The version a worker says it runs, unless the coordinator already knows one.
                    if entry.config_version.is_none() {
                        entry.config_version = stats.config_version;
                    }
                    stats.quarantined
                }
                None => Vec::new(),
            };
            seen.insert(entry.url.clone(), now_seen);
            workers.push(DashboardWorker {
                entry,
                requests_per_s,
                items_per_s,
                pending_items,
                merge_lag_s,
                quarantined,
                stats_error,
            });
        }
        let body = Dashboard {
            taken_at_unix_ms: now_unix_ms,
            refresh_s: REFRESH.as_secs_f64(),
            workers,
            cluster: DashboardCluster {
                totals: stats.cluster,
                requests_per_s: sample.requests_per_s,
                items_per_s: sample.items_per_s,
                pending_items: sample.pending_items,
                oldest_pending_s: sample.oldest_pending_s,
            },
            config: stats.config,
            history: Vec::new(),
            events: Vec::new(),
        };
        {
            let mut samples = self.samples.lock();
            if samples.len() == HISTORY {
                samples.pop_front();
            }
            samples.push_back(sample);
        }
        self.latest.send_replace(Some(Arc::new(Snapshot { taken: now, body, seen })));
    }
}

/// Refreshes `view` once a second while it is watched, and sleeps while it is not. Runs until
/// aborted.
pub(crate) async fn run(view: Arc<ClusterView>) {
    loop {
        while !view.watched() {
            view.asked.notified().await;
        }
        let started = Instant::now();
        view.refresh().await;
        tokio::time::sleep_until((started + REFRESH).into()).await;
    }
}

/// Every ready worker's `/stats`, fetched concurrently, by URL: the reply, or why it could not
/// be had (a worker's reply is untrusted: bounded, and read as [`WorkerStats`] or refused).
async fn fetch_worker_stats(ctx: &Context) -> HashMap<String, Result<WorkerStats, String>> {
    let mut fetches = JoinSet::new();
    for member in ctx.pool.members() {
        if member.status().state != WorkerState::Ready {
            continue;
        }
        let http = ctx.http.clone();
        let url = member.url.as_str().to_owned();
        let port = member.url.port();
        fetches.spawn(async move {
            let reply = http.get(format!("{url}/stats")).timeout(STATS_TIMEOUT).send().await;
            let stats = match reply.and_then(reqwest::Response::error_for_status) {
                Ok(reply) => control::json::<WorkerStats>(reply).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(error) = &stats {
                tracing::debug!(worker = url, port, error, "worker stats unavailable");
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

/// Adds `value` to a total that stays `None` until some figure is known.
fn add<T: std::ops::Add<Output = T> + Copy>(total: &mut Option<T>, value: Option<T>) {
    if let Some(value) = value {
        *total = Some(total.map_or(value, |t| t + value));
    }
}
