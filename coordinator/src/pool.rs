//! The workers the coordinator knows, how each is doing, and which of them take requests.
//!
//! The supervisor writes states; the proxy reads the live set on every request, so that set is
//! kept ready-made behind a lock taken only briefly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use countapp_shared::config::WorkerUrl;
use countapp_shared::wire::{AnswersAtOnce, Ready};
use parking_lot::{Mutex, RwLock};
use rand::RngExt;
use tokio::sync::Notify;

use crate::events::Events;
use crate::upstream::Kind;

pub use countapp_shared::wire::WorkerState;

/// One worker of the config.
#[derive(Debug)]
pub struct Member {
    /// Its URL in the config.
    pub url: WorkerUrl,
    /// Spawned and supervised by this coordinator, or run by someone else and only routed to.
    pub local: bool,
    status: Mutex<Status>,
    /// Requests this coordinator routed to it and it answered.
    pub requests: AtomicU64,
    /// Items it acknowledged through this coordinator.
    pub items: AtomicU64,
    /// Times it became ready: a request that tried it before may try it again once this moved.
    readied: AtomicU64,
    /// Whether it answers batches at once, as it last said ([`AnswersAtOnce`]): read on every
    /// request, so kept out of the status's lock.
    batches_at_once: AtomicBool,
    /// Wakes its supervisor to check its health now, rather than at the next interval.
    check_now: Notify,
}

/// What changes about a member over time.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// Its state.
    pub state: WorkerState,
    /// Its process id, when known.
    pub pid: Option<u32>,
    /// Times it was respawned after its process exited.
    pub restarts: u64,
    /// When it was last respawned.
    pub restarted_at: Option<SystemTime>,
    /// The latest thing that went wrong with it, and when.
    pub last_error: Option<(SystemTime, String)>,
    /// Whether it has been ready since [`Status::last_error`]: that is history, not its state.
    pub last_error_past: bool,
    /// Why it is not ready, as its `/ready` said last, while it answers but is not ready.
    pub not_ready: Option<String>,
    /// Found already running when this coordinator started, rather than spawned by it.
    pub adopted: bool,
    /// The version of the config it runs, as it last reported or was handed it.
    pub config_version: Option<String>,
    /// Items it acknowledged and has not merged, as its `/ready` said last.
    pub pending_items: Option<u64>,
    /// How far behind its merging was, in seconds, as its `/ready` said last.
    pub merge_lag_s: Option<f64>,
}

impl Status {
    /// Records what went wrong, now.
    pub fn failed(&mut self, why: String) {
        self.last_error = Some((SystemTime::now(), why));
        self.last_error_past = false;
    }
}

impl Member {
    /// The member's status now.
    pub fn status(&self) -> Status {
        self.status.lock().clone()
    }

    /// Counts a request it answered, with the items it acknowledged.
    pub fn record(&self, items: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.items.fetch_add(items, Ordering::Relaxed);
    }

    /// Asks its supervisor to check its health now: a request got no reply from it in time,
    /// which a busy worker may do as well as a hung one, and only the check tells them apart.
    pub fn request_check(&self) {
        self.check_now.notify_one();
    }

    /// Waits until a check is asked for with [`Member::request_check`].
    pub async fn check_requested(&self) {
        self.check_now.notified().await;
    }

    /// Whether it answers a request of `kind` at once (see [`AnswersAtOnce`]), so that the
    /// request may share a pipelined connection; never one that waits for a barrier.
    pub(crate) fn answers_at_once(&self, kind: Kind) -> bool {
        match kind {
            Kind::Batch => self.batches_at_once.load(Ordering::Relaxed),
            Kind::Read => true,
            Kind::Waits | Kind::Barrier => false,
        }
    }
}

/// The members one request has tried, each as it was then: one that has failed since and become
/// ready again (respawned, or passing its health check) is not the same try, and may be tried
/// again; one still ready since (it answered a 5xx) is not.
#[derive(Debug, Default)]
pub struct Tried(Vec<(Arc<Member>, u64)>);

impl Tried {
    /// Records a try of `member`.
    pub fn push(&mut self, member: Arc<Member>) {
        let readied = member.readied.load(Ordering::Relaxed);
        self.0.push((member, readied));
    }

    /// Whether nothing was tried yet.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn holds(&self, member: &Arc<Member>) -> bool {
        self.0.iter().any(|(m, readied)| Arc::ptr_eq(m, member) && *readied == member.readied.load(Ordering::Relaxed))
    }
}

/// Every member, and the live ones ready-made for routing.
#[derive(Debug, Default)]
pub struct Pool {
    members: RwLock<BTreeMap<WorkerUrl, Arc<Member>>>,
    live: RwLock<Arc<Vec<Arc<Member>>>>,
    /// Woken whenever a member becomes ready, for requests waiting for a live worker.
    became_ready: Notify,
    /// What happened to the members, and to the config, for the dashboard.
    pub events: Events,
}

impl Pool {
    /// Adds a member for `url`, starting; returns the existing one if there is one.
    pub fn add(&self, url: &WorkerUrl) -> Arc<Member> {
        let mut members = self.members.write();
        members
            .entry(url.clone())
            .or_insert_with(|| {
                Arc::new(Member {
                    url: url.clone(),
                    local: url.is_local(),
                    status: Mutex::new(Status::default()),
                    requests: AtomicU64::new(0),
                    items: AtomicU64::new(0),
                    readied: AtomicU64::new(0),
                    batches_at_once: AtomicBool::new(false),
                    check_now: Notify::new(),
                })
            })
            .clone()
    }

    /// Forgets the member for `url`.
    pub fn remove(&self, url: &WorkerUrl) {
        self.members.write().remove(url);
        self.refresh_live();
    }

    /// Every member, in URL order.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.members.read().values().cloned().collect()
    }

    /// Marks a member ready, with what its `/ready` said: routed to from now on. Its last
    /// error becomes history.
    pub fn ready(&self, member: &Member, ready: &Ready) {
        let AnswersAtOnce { batches } = ready.answers_at_once;
        member.batches_at_once.store(batches, Ordering::Relaxed);
        let was = {
            let mut status = member.status.lock();
            status.config_version = ready.config_version.clone();
            status.pending_items = ready.pending_items;
            status.merge_lag_s = ready.merge_lag_s;
            status.not_ready = None;
            status.last_error_past = true;
            status.state
        };
        if was != WorkerState::Ready {
            let message = match was {
                WorkerState::Unhealthy => "ready again: back in routing",
                _ => "ready: routed to",
            };
            self.events.record(Some(&member.url), message);
        }
        self.set_state(member, WorkerState::Ready);
    }

    /// Changes a member's state.
    pub fn set_state(&self, member: &Member, state: WorkerState) {
        let changed = {
            let mut status = member.status.lock();
            let changed = status.state != state;
            status.state = state;
            changed
        };
        if changed {
            tracing::debug!(worker = %member.url, state = state.name(), "state");
            if state == WorkerState::Ready {
                member.readied.fetch_add(1, Ordering::Relaxed);
            }
            self.refresh_live();
            if state == WorkerState::Ready {
                self.became_ready.notify_waiters();
            }
        }
    }

    /// Changes the rest of a member's status.
    pub fn update(&self, member: &Member, change: impl FnOnce(&mut Status)) {
        change(&mut member.status.lock());
    }

    /// Marks a ready member unhealthy after a failed request, so that no other request tries it
    /// before a health check or its supervisor says it is back.
    pub fn suspect(&self, member: &Member, error: String) {
        let was_ready = {
            let mut status = member.status.lock();
            status.failed(error.clone());
            status.state == WorkerState::Ready
        };
        if was_ready {
            self.events.record(Some(&member.url), format!("out of routing: {error}"));
            self.set_state(member, WorkerState::Unhealthy);
        }
    }

    /// Marks a ready member unhealthy after it did not answer its health check in time, unless
    /// it is the last one live: a machine too busy to answer within the check's timeout would
    /// otherwise take every worker out of routing at once, and a hung last worker costs a
    /// request no more in routing (a hop timeout) than out of it (the wait for a live one)
    /// while its supervisor replaces it.
    pub fn suspect_unresponsive(&self, member: &Member, error: String) {
        let last = {
            let live = self.live.read();
            live.len() == 1 && std::ptr::eq(Arc::as_ptr(&live[0]), member)
        };
        if last {
            tracing::warn!(worker = %member.url, error, "the last live worker is slow to answer; kept in routing");
            member.status.lock().failed(error);
            return;
        }
        self.suspect(member, error);
    }

    /// A random live member that `tried` does not hold.
    pub fn pick(&self, tried: &Tried) -> Option<Arc<Member>> {
        let live = self.live.read();
        let untried = live.iter().filter(|m| !tried.holds(m)).count();
        if untried == 0 {
            return None;
        }
        live.iter().filter(|m| !tried.holds(m)).nth(rand::rng().random_range(0..untried)).cloned()
    }

    /// The live member of the lowest address (host, then port): the same one for every caller,
    /// for as long as it is live.
    pub fn first_live(&self) -> Option<Arc<Member>> {
        let live = self.live.read();
        live.iter().min_by(|a, b| (a.url.host(), a.url.port()).cmp(&(b.url.host(), b.url.port()))).cloned()
    }

    /// The member for `url`, if it is live.
    pub fn live(&self, url: &WorkerUrl) -> Option<Arc<Member>> {
        self.live.read().iter().find(|m| &m.url == url).cloned()
    }

    /// How many members are live.
    pub fn live_count(&self) -> usize {
        self.live.read().len()
    }

    /// Waits until a member becomes ready, or `at_most` passes.
    pub async fn wait_for_ready(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.became_ready.notified()).await;
    }

    fn refresh_live(&self) {
        let live: Vec<Arc<Member>> =
            self.members.read().values().filter(|m| m.status.lock().state == WorkerState::Ready).cloned().collect();
        *self.live.write() = Arc::new(live);
    }
}
