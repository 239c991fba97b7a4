//! Barriers: what a strong read, and a batch posted with `wait=counted`, wait for.
//!
//! A barrier makes every item that any worker acknowledged before it started visible to
//! eventual reads of the shards it is for:
//!
//! 1. every worker closes its log file ([`BARRIER_CLOSE_ROUTE`]), so that each such item is in
//!    a final file;
//! 2. then every worker runs a merge round, if anything changed since its last, and says which
//!    of the shards it vouches for ([`BARRIER_SETTLE_ROUTE`]); the store tells whether that
//!    covers them ([`Store::covered`]), and step 2 is asked again until it does, or until
//!    [`BARRIER_TIMEOUT`] has passed (a 503);
//! 3. where the store keeps counts from earlier reads for a moment (Redis), every worker forgets
//!    them ([`BARRIER_PASSED_ROUTE`]): a count read while another worker was still merging
//!    must not answer after the barrier passed.
//!
//! The workers are those of [`peers`]. One that refuses the connection is not running, and its
//! log is final already: merged by the others. Unless it still holds its log's lock here
//! (starting, or stopping before it closed its log): the barrier then starts over.
//!
//! A barrier may also delete tenants: each worker's step 2 then deletes those it is to (see
//! `Store::settle`), and vouches for their shards only once they are gone.
//!
//! Concurrent requests share barriers, as appends share an fsync: a request joins the next
//! barrier to start, which covers the shards of every request that joined it, and a worker
//! runs one barrier at a time. A strong read on an idle cluster costs a round trip to each
//! worker and a listing of the logs; under load, one log close per worker and the merge of
//! what was closed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::web;
use countapp_server::edge;
use countapp_server::http::ApiError;
use countapp_shared::wire::{
    BARRIER_CLOSE_ROUTE, BARRIER_PASSED_ROUTE, BARRIER_SETTLE_ROUTE, BARRIER_TIMEOUT, SettleRequest, Settled,
};
use countapp_store::Store;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::peers::{Peer, peers};
use crate::state::AppState;

/// How long a barrier waits before it asks again, when the workers' answers did not cover its
/// shards yet (a shard changing hands, a merge round of a dead worker's log in progress).
const RETRY: Duration = Duration::from_millis(20);

/// The largest reply a worker gives a barrier: its id and a list of shards.
const MAX_REPLY_BYTES: usize = 1 << 20;

/// The barriers of one worker: the one running, and the one that requests join meanwhile.
pub(crate) struct Barriers {
    queue: Mutex<Queue>,
    /// The connections to the other workers, kept alive between barriers.
    http: reqwest::Client,
}

impl Default for Barriers {
    fn default() -> Self {
        // Straight to the workers, as the coordinator talks to them: a proxy from the
        // environment could not reach them, and no redirect leads anywhere a barrier should go.
        // An idle connection is dropped well before a worker closes it, so that a barrier
        // seldom sends on one that is closing (see `ask` for when it does).
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(edge::KEEP_ALIVE / 2)
            .build()
            .expect("an HTTP client without TLS builds");
        Barriers { queue: Mutex::new(Queue::default()), http }
    }
}

#[derive(Default)]
struct Queue {
    /// Whether a barrier is running; it starts the next when it ends.
    running: bool,
    /// The next barrier to start, with the shards of the requests that joined it.
    next: Option<Group>,
}

/// The requests waiting for one barrier.
struct Group {
    shards: BTreeSet<u16>,
    /// Tenants to delete, each in one of `shards`.
    deletes: BTreeSet<String>,
    passed: watch::Sender<Option<Result<(), String>>>,
}

impl Barriers {
    /// Waits until a barrier that started after this call has passed for `shards`, and has
    /// deleted `deletes` (tenants of those shards); a 503 with the reason if it could not within
    /// [`BARRIER_TIMEOUT`].
    pub(crate) async fn pass(
        &self,
        state: &web::Data<AppState>,
        shards: BTreeSet<u16>,
        deletes: Option<String>,
    ) -> Result<(), ApiError> {
        let mut passed = {
            let mut queue = self.queue.lock();
            let group = queue.next.get_or_insert_with(|| Group {
                shards: BTreeSet::new(),
                deletes: BTreeSet::new(),
                passed: watch::channel(None).0,
            });
            group.shards.extend(shards);
            group.deletes.extend(deletes);
            let passed = group.passed.subscribe();
            if !queue.running {
                queue.running = true;
                actix_web::rt::spawn(run(state.clone()));
            }
            passed
        };
        // The barrier running now may take its time before the one joined starts: the request
        // waits no longer than one barrier may take, so that its 503 reaches the coordinator
        // before the coordinator gives up on this worker.
        let waited = tokio::time::timeout(BARRIER_TIMEOUT, passed.wait_for(Option::is_some)).await;
        match waited.map(|outcome| outcome.map(|outcome| outcome.clone())) {
            Ok(Ok(Some(Ok(())))) => Ok(()),
            Ok(Ok(Some(Err(why)))) => Err(ApiError::Unavailable(why)),
            Ok(Ok(None) | Err(_)) => Err(ApiError::Unavailable("the barrier was dropped; retry".to_owned())),
            Err(_) => Err(ApiError::Unavailable(format!("no barrier passed within {BARRIER_TIMEOUT:?}; retry"))),
        }
    }
}

/// Runs the queued barriers one after another, until none is queued.
async fn run(state: web::Data<AppState>) {
    loop {
        let group = {
            let mut queue = state.barriers.queue.lock();
            match queue.next.take() {
                Some(group) => group,
                None => {
                    queue.running = false;
                    return;
                }
            }
        };
        let shards: Vec<u16> = group.shards.into_iter().collect();
        let deletes: Vec<String> = group.deletes.into_iter().collect();
        let outcome = barrier(&state, &shards, &deletes).await;
        state.metrics.led_barrier();
        if let Err(why) = &outcome {
            tracing::warn!(shards = shards.len(), error = why.as_str(), "a barrier did not pass");
        }
        let _ = group.passed.send(Some(outcome));
    }
}

/// One barrier for `shards`, deleting `deletes` (see the module documentation).
async fn barrier(state: &AppState, shards: &[u16], deletes: &[String]) -> Result<(), String> {
    let store = state.store().cloned().ok_or("the worker is recovering its log and not ready yet")?;
    let deadline = Instant::now() + BARRIER_TIMEOUT;
    let late = || format!("the workers did not all settle within {BARRIER_TIMEOUT:?}; retry");
    'start: loop {
        let live = blocking(&store, |store| store.live_workers()).await?;
        let peers = peers(&state.config.get(), &live, state.addr);
        // 1. Every worker closes its log.
        let close = peers.iter().map(|peer| ask(&state.barriers.http, peer, BARRIER_CLOSE_ROUTE, None, deadline));
        let (mine, theirs) =
            tokio::join!(blocking(&store, |store| store.close_log()), futures_util::future::join_all(close));
        mine?;
        let mut reached = Vec::new();
        for (peer, answer) in peers.iter().zip(theirs) {
            match answer? {
                Some(_) => reached.push(peer),
                None if peer.local_id.as_ref().is_some_and(|id| live.contains(id)) => {
                    // Running here, but not answering yet, or no more: its log may not be
                    // final. Start over once it is either up or gone.
                    if Instant::now() + RETRY >= deadline {
                        return Err(late());
                    }
                    tokio::time::sleep(RETRY).await;
                    continue 'start;
                }
                None => {}
            }
        }
        // 2. Every worker merges and vouches, until they cover the shards. Where each shard is
        // merged by its owner, the owners alone are asked first (a strong read of one tenant
        // then costs one worker's round, not every worker's); should they not cover the shards
        // (ownership moving as workers come and go), every worker is asked.
        let request = SettleRequest { shards: shards.to_vec(), delete: deletes.to_vec() };
        let body = serde_json::to_vec(&request).expect("serializes");
        let mut owners = store.owners_of(shards, &live).filter(|owners| {
            owners.iter().all(|id| *id == state.worker_id || reached.iter().any(|p| p.local_id.as_ref() == Some(id)))
        });
        loop {
            let (asked, deleting) = (shards.to_vec(), deletes.to_vec());
            let asks =
                |id: Option<&String>| owners.as_ref().is_none_or(|owners| id.is_some_and(|id| owners.contains(id)));
            let settle = reached
                .iter()
                .filter(|peer| asks(peer.local_id.as_ref()))
                .map(|peer| ask(&state.barriers.http, peer, BARRIER_SETTLE_ROUTE, Some(body.clone()), deadline));
            let settle_mine = asks(Some(&state.worker_id));
            let (mine, theirs) = tokio::join!(
                async {
                    match settle_mine {
                        true => blocking(&store, move |store| store.settle(&asked, &deleting)).await,
                        false => Ok(Vec::new()),
                    }
                },
                futures_util::future::join_all(settle)
            );
            let mut vouched = vec![mine?];
            for answer in theirs {
                // A worker that stopped since it closed its log left it final: others merge it.
                if let Some(settled) = answer? {
                    vouched.push(settled.shards);
                }
            }
            if store.covered(shards, &vouched) {
                return forget_reads(state, &store, &reached, deadline).await;
            }
            tracing::debug!(
                shards = shards.len(),
                ?vouched,
                "the workers' settle rounds did not cover the barrier's shards yet"
            );
            owners = None;
            if Instant::now() + RETRY >= deadline {
                return Err(late());
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Step 3: every worker `reached` forgets the counts it keeps from earlier reads, where the store
/// keeps any; this one too.
async fn forget_reads(state: &AppState, store: &Store, reached: &[&Peer], deadline: Instant) -> Result<(), String> {
    if !store.keeps_reads() {
        return Ok(());
    }
    store.forget_reads();
    let passed = reached.iter().map(|peer| ask(&state.barriers.http, peer, BARRIER_PASSED_ROUTE, None, deadline));
    for answer in futures_util::future::join_all(passed).await {
        // A worker that stopped since answers no count.
        answer?;
    }
    Ok(())
}

/// Runs a barrier step of this worker's store (a close, a settle round) on a blocking thread,
/// since it touches the disk: for the barrier this worker leads, and for the routes by which
/// other workers' barriers ask it. A store that fails the step answers 503; a step that did not
/// finish, 500.
pub(crate) async fn step<T: Send + 'static>(
    store: &Arc<Store>,
    call: impl FnOnce(&Store) -> Result<T, countapp_store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = store.clone();
    match web::block(move || call(&store)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ApiError::Unavailable(format!("this worker's store failed a barrier step: {e}"))),
        Err(e) => Err(ApiError::Internal(format!("this worker's barrier step did not finish: {e}"))),
    }
}

/// [`step`], its error as the barrier tells it.
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    call: impl FnOnce(&Store) -> Result<T, countapp_store::StoreError> + Send + 'static,
) -> Result<T, String> {
    step(store, call).await.map_err(|e| e.to_string())
}

/// Posts a barrier step to `peer`: its reply, or `None` if it refused the connection (it is
/// not running). Any other failure fails the barrier, since the peer may hold acknowledged
/// items; but one on a kept-alive connection that the peer was closing meanwhile is tried once
/// more on a new one: both steps may be taken twice.
async fn ask(
    http: &reqwest::Client,
    peer: &Peer,
    route: &str,
    body: Option<Vec<u8>>,
    deadline: Instant,
) -> Result<Option<Settled>, String> {
    let failed = |why: String| format!("worker {} did not take the barrier: {why}", peer.url);
    let send = || {
        let mut request =
            http.post(format!("{}{route}", peer.url)).timeout(deadline.saturating_duration_since(Instant::now()));
        if let Some(body) = &body {
            request = request.header("content-type", "application/json").body(body.clone());
        }
        request.send()
    };
    let sent = match send().await {
        Err(e) if e.is_request() && !e.is_timeout() && !e.is_connect() => send().await,
        sent => sent,
    };
    let mut response = match sent {
        Ok(response) => response,
        Err(e) if e.is_connect() && !e.is_timeout() => return Ok(None),
        Err(e) => return Err(failed(error_chain(&e))),
    };
    let status = response.status();
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(error_chain(&e)))? {
        if bytes.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(failed(format!("a reply over {MAX_REPLY_BYTES} bytes")));
        }
        bytes.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let why = String::from_utf8_lossy(&bytes[..bytes.len().min(256)]).into_owned();
        return Err(failed(format!("{status}: {why}")));
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| failed(format!("a reply that is no barrier's: {e}")))
}

/// An error with its causes, which say what `reqwest`'s own message does not.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
