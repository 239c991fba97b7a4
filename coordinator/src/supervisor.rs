//! Keeps the workers of the config running: one task per worker URL.
//!
//! A local worker (127.0.0.0/8, localhost, ::1) is spawned from the `worker` binary beside the
//! coordinator's own, its output appended to `worker_logs/<port>.log` (which the worker rotates
//! by size), and handed the config in force. Its exit is seen at once through its child handle
//! and it is respawned, with backoff if it keeps dying; it is also health-checked every
//! `config_check` (more often while it fails, and at once when a request got no reply from it
//! in time), and killed and respawned after
//! [`FAILED_CHECKS_BEFORE_KILL`] failed checks in a row, so that a hung worker is replaced. A
//! worker already running on its port (left by a coordinator that was killed) is adopted, not
//! duplicated, once it is proven one this coordinator or its predecessor started
//! ([`crate::adoption`]). A port held by any other program is reported, not fought over, and
//! that program is never signalled.
//!
//! Each config edit is pushed to every local worker (`PUT /config`, with the coordinator's
//! token), and every health check compares the version a worker runs with the one in force, so
//! that a push that failed is made again. Removed from the config, a worker is stopped
//! gracefully: `POST /shutdown` with its token, then SIGKILL if it has not exited in time. A URL
//! added again while its worker is still stopping waits for that stop, then starts afresh. A
//! worker on another host is only health-checked and routed to.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use countapp_shared::api::ErrorBody;
use countapp_shared::config::{Config, LogFormat, WorkerUrl};
use countapp_shared::shutdown::WORKER_STOP_TIMEOUT;
use countapp_shared::spawn::{CONFIG_ENV, LOG_FILE_ENV, TOKEN_ENV};
use countapp_shared::wire::{ConfigApplied, ConfigPush, Ready};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adoption::{self, Holder};
use crate::control;
use crate::pool::{Member, Pool, WorkerState};

/// How often a worker that is not ready yet is asked whether it is.
const STARTING_POLL: Duration = Duration::from_millis(50);
/// How often a worker that failed a check or a request is checked again: a hung worker is then
/// replaced within a few seconds, whatever `config_check` is.
const UNHEALTHY_POLL: Duration = Duration::from_millis(500);
/// Health checks a worker may fail in a row before it is killed and respawned.
const FAILED_CHECKS_BEFORE_KILL: u32 = 3;
/// The first and the longest pause before respawning a worker that keeps exiting.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that ran this long before exiting is respawned without delay.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// The timeout of a health check, an identity check, a config push or a shutdown request.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What every supervising task needs.
pub struct Context {
    /// The `worker` binary.
    pub worker_bin: PathBuf,
    /// The config file, passed on to the workers.
    pub config_path: PathBuf,
    /// The token this coordinator's workers accept on `POST /shutdown` and `PUT /config`.
    pub token: String,
    /// The config in force; every supervising task watches it.
    pub config: watch::Sender<Arc<Config>>,
    /// The client for health checks, config pushes and shutdown requests.
    pub http: reqwest::Client,
    /// The workers and their states.
    pub pool: Arc<Pool>,
}

impl Context {
    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    fn check_interval(&self) -> Duration {
        self.config.borrow().config_check()
    }
}

/// The supervising tasks: one per worker URL, whether in the config or still stopping.
pub struct Supervisor {
    ctx: Arc<Context>,
    tasks: HashMap<WorkerUrl, Task>,
    tracker: TaskTracker,
}

/// The task of one worker URL.
struct Task {
    /// Cancelled when the worker is removed from the config or the coordinator stops.
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl Supervisor {
    /// A supervisor with no workers yet; [`Supervisor::apply`] gives it some.
    pub fn new(ctx: Arc<Context>) -> Supervisor {
        Supervisor { ctx, tasks: HashMap::new(), tracker: TaskTracker::new() }
    }

    /// Makes the running workers and their settings those of `config`: pushes it to the running
    /// workers, starts the added ones and stops the removed ones, in the background.
    pub fn apply(&mut self, config: &Config) {
        self.ctx.config.send_replace(Arc::new(config.clone()));
        for (url, task) in &self.tasks {
            if !config.workers.contains(url) && !task.stop.is_cancelled() {
                tracing::info!(worker = %url, "removed from the config: stopping");
                self.ctx.pool.events.record(Some(url), "removed from the config: stopping");
                task.stop.cancel();
            }
        }
        for url in &config.workers {
            let previous = match self.tasks.remove(url) {
                Some(task) if !task.stop.is_cancelled() && !task.handle.is_finished() => {
                    self.tasks.insert(url.clone(), task);
                    continue;
                }
                Some(task) => Some(task.handle),
                None => None,
            };
            if previous.is_some() {
                tracing::info!(worker = %url, "added again: starting once its previous run has stopped");
            } else {
                tracing::info!(worker = %url, local = url.is_local(), "added");
            }
            self.ctx.pool.events.record(Some(url), "added to the config");
            let stop = CancellationToken::new();
            let (ctx, url_owned, stopped) = (self.ctx.clone(), url.clone(), stop.clone());
            let handle = self.tracker.spawn(async move {
                // One run per URL at a time: the previous one removes its member when done.
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                let member = ctx.pool.add(&url_owned);
                if member.local {
                    supervise_local(&ctx, &member, &stopped).await;
                } else {
                    supervise_remote(&ctx, &member, &stopped).await;
                }
                ctx.pool.remove(&member.url);
            });
            self.tasks.insert(url.clone(), Task { stop, handle });
        }
        self.tasks.retain(|_, task| !(task.stop.is_cancelled() && task.handle.is_finished()));
    }

    /// Stops every worker gracefully and waits until they have exited.
    pub async fn stop_all(&mut self) {
        for task in self.tasks.values() {
            task.stop.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
        self.tasks.clear();
    }
}

/// How a spawned worker's run ended.
enum Ended {
    /// It was asked to stop, and has.
    Stopped,
    /// Its process exited by itself, or was killed for failing its checks.
    Exited(String),
}

/// A process the coordinator follows: its pid, and its start time (in clock ticks since boot,
/// from `/proc/<pid>/stat`), so that a pid reused by another process is never taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Process {
    pid: u32,
    start_time: u64,
}

impl Process {
    /// The process `pid`, if it runs.
    fn find(pid: u32) -> Option<Process> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the parenthesised command name: state is the first, start time the
        // twentieth.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // An adopted worker is not our child: once it exits it stays a zombie until its new
        // parent reaps it, which is not running.
        if matches!(fields.first(), Some(&("Z" | "X"))) {
            return None;
        }
        Some(Process { pid, start_time: fields.get(19)?.parse().ok()? })
    }

    /// Whether this very process still runs.
    fn alive(&self) -> bool {
        Process::find(self.pid) == Some(*self)
    }

    fn signal(&self, signal: Signal) {
        if self.alive() {
            let _ = kill(Pid::from_raw(self.pid as i32), signal);
        }
    }
}

async fn supervise_local(ctx: &Context, member: &Member, stop: &CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let holder = match adoption::holder(ctx, member).await {
            Holder::Ours(pid) => match Process::find(pid) {
                Some(process) => {
                    match adopt(ctx, member, process, stop).await {
                        Ended::Stopped => return,
                        Ended::Exited(why) => exited(ctx, member, why),
                    }
                    continue;
                }
                None => None,
            },
            Holder::Other(why) => Some(why),
            Holder::Nobody => port_held(member),
        };
        if let Some(holder) = holder {
            // Something else holds the port: spawning would only fail again and again, and it
            // is never signalled. Report it, and look again later.
            let why = format!("port {} is held by another program ({holder}); not spawning", member.url.port());
            let status = member.status();
            if status.state != WorkerState::Blocked {
                tracing::error!(worker = %member.url, error = why, "cannot start the worker");
                ctx.pool.events.record(Some(&member.url), format!("blocked: {why}"));
            }
            // Stamped when it first said so, not at every look while it stays so.
            if status.state != WorkerState::Blocked || status.last_error.is_none_or(|(_, said)| said != why) {
                ctx.pool.update(member, |s| s.failed(why));
            }
            ctx.pool.set_state(member, WorkerState::Blocked);
            tokio::select! {
                () = tokio::time::sleep(ctx.check_interval()) => continue,
                () = stop.cancelled() => return,
            }
        }
        ctx.pool.set_state(member, WorkerState::Starting);
        let started = Instant::now();
        let ended = match spawn(ctx, member) {
            Ok(child) => {
                ctx.pool.update(member, |s| {
                    s.pid = child.id();
                    s.adopted = false;
                });
                watch_child(ctx, member, child, stop).await
            }
            Err(e) => Ended::Exited(format!("cannot spawn {}: {e}", ctx.worker_bin.display())),
        };
        let Ended::Exited(why) = ended else { return };
        exited(ctx, member, why);
        backoff = if started.elapsed() >= HEALTHY_RUN { BACKOFF_MIN } else { (backoff * 2).min(BACKOFF_MAX) };
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Takes over a worker that a previous coordinator started, proven ours, and follows it.
async fn adopt(ctx: &Context, member: &Member, process: Process, stop: &CancellationToken) -> Ended {
    tracing::info!(worker = %member.url, pid = process.pid, "adopting the worker already running on its port");
    ctx.pool
        .events
        .record(Some(&member.url), format!("adopted the worker already running on its port (pid {})", process.pid));
    ctx.pool.update(member, |s| {
        s.pid = Some(process.pid);
        s.adopted = true;
    });
    watch_adopted(ctx, member, process, stop).await
}

/// Records that a worker's process is gone, about to be respawned: before it was ever ready,
/// a crash at start-up.
fn exited(ctx: &Context, member: &Member, why: String) {
    tracing::warn!(worker = %member.url, reason = why, "worker exited; respawning");
    let at_start = member.status().state == WorkerState::Starting;
    let message = if at_start { format!("crashed at start-up: {why}") } else { format!("{why}; respawning") };
    ctx.pool.events.record(Some(&member.url), message);
    ctx.pool.set_state(member, WorkerState::Exited);
    ctx.pool.update(member, |s| {
        s.restarts += 1;
        s.restarted_at = Some(SystemTime::now());
        s.pid = None;
        s.adopted = false;
        s.config_version = None;
        s.pending_items = None;
        s.merge_lag_s = None;
        s.not_ready = None;
        s.failed(why);
    });
}

/// Whether something holds the member's port on its address without listening there, and
/// what.
fn port_held(member: &Member) -> Option<String> {
    let addr = member.url.bind_addr()?;
    match TcpListener::bind(addr) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(e.to_string()),
        // Anything else (no such address) is for the worker to report when it tries.
        Err(_) => None,
    }
}

/// Starts the worker process with the config in force, its output appended to its log file
/// after a marker line.
fn spawn(ctx: &Context, member: &Member) -> std::io::Result<Child> {
    let config = ctx.config();
    fs::create_dir_all(&config.worker_logs)?;
    let path = config.worker_logs.join(format!("{}.log", member.url.port()));
    let mut log = OpenOptions::new().create(true).append(true).open(&path)?;
    let now = humantime::format_rfc3339_micros(SystemTime::now());
    let (url, pid, version) = (&member.url, std::process::id(), config.version());
    // A marker between two runs of the worker, in the format of the lines around it.
    let marker = match config.log_format {
        LogFormat::Text => format!("--- {now} starting worker {url} (coordinator pid {pid}, config {version}) ---"),
        LogFormat::Json => serde_json::json!({
            "timestamp": now.to_string(), "level": "INFO", "process": "coordinator", "port": url.port(),
            "fields": { "message": "starting worker", "worker": url.as_str(), "coordinator_pid": pid, "config": version },
            "target": module_path!(),
        })
        .to_string(),
    };
    writeln!(log, "{marker}")?;
    let mut command = Command::new(&ctx.worker_bin);
    command
        .arg(member.url.port().to_string())
        .arg("--config")
        .arg(&ctx.config_path)
        // The config in force, which is the last good one while the file is invalid.
        .env(CONFIG_ENV, config.to_json())
        .env(TOKEN_ENV, &ctx.token)
        // The worker rotates this file, its stdout and stderr, by size (`worker_log_max_bytes`).
        .env(LOG_FILE_ENV, &path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C at the terminal reaches the coordinator alone, which
        // then stops each worker in order instead of racing them.
        .process_group(0);
    if let Some(addr) = member.url.bind_addr() {
        command.arg("--host").arg(addr.ip().to_string());
    }
    let child = command.spawn()?;
    ctx.pool.update(member, |s| s.config_version = Some(config.version()));
    tracing::info!(worker = %member.url, pid = child.id(), log = %path.display(), "spawned");
    let pid = child.id().map_or_else(String::new, |pid| format!(" (pid {pid})"));
    ctx.pool.events.record(Some(&member.url), format!("spawned{pid}"));
    Ok(child)
}

/// How often a worker in `state` is checked.
fn check_pause(ctx: &Context, state: WorkerState) -> Duration {
    match state {
        WorkerState::Ready => ctx.check_interval(),
        WorkerState::Unhealthy => UNHEALTHY_POLL.min(ctx.check_interval()),
        _ => STARTING_POLL,
    }
}

/// Follows a spawned worker until it exits or is asked to stop.
async fn watch_child(ctx: &Context, member: &Member, mut child: Child, stop: &CancellationToken) -> Ended {
    let mut failed_checks = 0;
    let mut config = ctx.config.subscribe();
    loop {
        let pause = check_pause(ctx, member.status().state);
        tokio::select! {
            status = child.wait() => {
                return Ended::Exited(match status {
                    Ok(status) => format!("exited: {status}"),
                    Err(e) => format!("cannot wait for it: {e}"),
                });
            }
            () = stop.cancelled() => {
                stop_gracefully(ctx, member, Running::Child(&mut child)).await;
                return Ended::Stopped;
            }
            Ok(()) = config.changed() => {
                push_config(ctx, member).await;
                continue;
            }
            () = tokio::time::sleep(pause) => {}
            () = member.check_requested() => {}
        }
        let checked = check(ctx, member, failed_checks).await;
        failed_checks = checked.failed;
        if checked.runs_other_config {
            push_config(ctx, member).await;
        }
        if failed_checks >= FAILED_CHECKS_BEFORE_KILL {
            tracing::warn!(worker = %member.url, failed_checks, "failing its health checks: killing it");
            let _ = child.kill().await;
            return Ended::Exited(format!("killed after {failed_checks} failed health checks"));
        }
    }
}

/// Follows a worker found running at start-up, which is not our child: through health checks
/// and by asking the kernel whether its process still exists. It was started by an earlier
/// coordinator, with a token this one does not know: if it runs another config, it is stopped
/// (SIGTERM, a graceful stop) and respawned on the config in force.
async fn watch_adopted(ctx: &Context, member: &Member, process: Process, stop: &CancellationToken) -> Ended {
    let mut failed_checks = 0;
    let mut next_check = Instant::now();
    loop {
        if !process.alive() {
            return Ended::Exited(format!("adopted worker (pid {}) is gone", process.pid));
        }
        if Instant::now() >= next_check {
            let checked = check(ctx, member, failed_checks).await;
            failed_checks = checked.failed;
            if checked.runs_other_config {
                tracing::info!(worker = %member.url, "the adopted worker runs another config: restarting it");
                stop_gracefully(ctx, member, Running::Adopted(process)).await;
                return Ended::Exited("restarted to run the config in force".to_owned());
            }
            if failed_checks >= FAILED_CHECKS_BEFORE_KILL {
                process.signal(Signal::SIGKILL);
            }
            next_check = Instant::now() + check_pause(ctx, member.status().state);
        }
        tokio::select! {
            // Without a child handle, a short poll of the pid stands in for the exit notice.
            () = tokio::time::sleep(STARTING_POLL) => {}
            () = member.check_requested() => next_check = Instant::now(),
            () = stop.cancelled() => {
                stop_gracefully(ctx, member, Running::Adopted(process)).await;
                return Ended::Stopped;
            }
        }
    }
}

/// What a health check found.
struct Checked {
    /// Checks failed in a row, this one included.
    failed: u32,
    /// The worker answered ready, but runs a config other than the one in force.
    runs_other_config: bool,
}

/// One health check: a ready worker stays ready, a failing one is taken out of routing. A
/// worker's reply is untrusted: read within bounds, as [`Ready`], or taken for a failure.
async fn check(ctx: &Context, member: &Member, failed_before: u32) -> Checked {
    let reply = ctx.http.get(format!("{}/ready", member.url)).timeout(CHECK_TIMEOUT).send().await;
    let state = member.status().state;
    let (why, timed_out) = match reply {
        Ok(reply) if reply.status().is_success() => match control::json::<Ready>(reply).await {
            Ok(ready) => {
                let runs_other_config = ready.config_version.as_deref().is_some_and(|v| v != ctx.config().version());
                ctx.pool.ready(member, &ready);
                return Checked { failed: 0, runs_other_config };
            }
            Err(e) => (e.to_string(), false),
        },
        // Not ready yet, or not answering: either way, not routed to.
        Ok(reply) => {
            let status = reply.status();
            let said = control::json::<ErrorBody>(reply).await.map(|body| body.error);
            let why = said.unwrap_or_else(|_| format!("/ready answered {status}"));
            if state == WorkerState::Ready {
                ctx.pool.suspect(member, format!("/ready answered {status}: {why}"));
            }
            ctx.pool.update(member, |s| s.not_ready = Some(why));
            let failed = if state == WorkerState::Starting { failed_before } else { failed_before + 1 };
            return Checked { failed, runs_other_config: false };
        }
        Err(e) => (e.to_string(), e.is_timeout()),
    };
    let failed = if state == WorkerState::Ready || state == WorkerState::Unhealthy {
        let why = format!("health check failed: {why}");
        if timed_out {
            ctx.pool.suspect_unresponsive(member, why);
        } else {
            ctx.pool.suspect(member, why);
        }
        failed_before + 1
    } else {
        failed_before
    };
    Checked { failed, runs_other_config: false }
}

/// Hands the config in force to a spawned worker. A failure is logged and left to the next
/// health check, which pushes again while the worker runs another version.
async fn push_config(ctx: &Context, member: &Member) {
    let config = ctx.config();
    let version = config.version();
    if member.status().config_version.as_deref() == Some(version.as_str()) {
        return;
    }
    let reply = ctx
        .http
        .put(format!("{}/config", member.url))
        .bearer_auth(&ctx.token)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(ConfigPush(config.as_ref().clone()).to_body())
        .timeout(CHECK_TIMEOUT)
        .send()
        .await;
    match reply {
        Ok(reply) if reply.status().is_success() => {
            // The version the worker says it runs now; a reply that cannot be read leaves it
            // unknown, for the next health check to learn.
            let runs = control::json::<ConfigApplied>(reply).await.ok().map(|applied| applied.config_version);
            tracing::info!(worker = %member.url, version, runs = runs.as_deref(), "config applied");
            ctx.pool.update(member, |s| s.config_version = runs);
        }
        Ok(reply) => {
            let status = reply.status();
            let body = control::body(reply).await.unwrap_or_default();
            let why = format!("config {version} refused: {status} {}", String::from_utf8_lossy(&body));
            tracing::error!(worker = %member.url, error = why, "config not applied");
            ctx.pool.events.record(Some(&member.url), why.clone());
            ctx.pool.update(member, |s| s.failed(why));
        }
        Err(e) => tracing::warn!(worker = %member.url, version, error = %e, "cannot push the config; retrying"),
    }
}

/// A worker process being stopped: a child of this coordinator, or one it adopted.
enum Running<'a> {
    Child(&'a mut Child),
    Adopted(Process),
}

/// Asks the worker to stop (its token on `POST /shutdown` for our child, SIGTERM for an adopted
/// one), waits for it to drain, flush and exit, and kills it if it takes longer than a worker's
/// own stop ever should.
async fn stop_gracefully(ctx: &Context, member: &Member, running: Running<'_>) {
    ctx.pool.set_state(member, WorkerState::Stopping);
    let started = Instant::now();
    match running {
        Running::Child(child) => {
            let asked = ctx
                .http
                .post(format!("{}/shutdown", member.url))
                .bearer_auth(&ctx.token)
                .timeout(CHECK_TIMEOUT)
                .send()
                .await;
            if let Err(e) = asked {
                // It may be starting, or hung: a signal reaches it either way.
                tracing::warn!(worker = %member.url, error = %e, "shutdown request failed; sending SIGTERM");
                if let Some(pid) = child.id() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                }
            }
            match tokio::time::timeout(WORKER_STOP_TIMEOUT, child.wait()).await {
                Ok(Ok(status)) => {
                    tracing::info!(worker = %member.url, %status, ms = started.elapsed().as_millis() as u64, "stopped");
                    ctx.pool.events.record(Some(&member.url), format!("stopped: {status}"));
                }
                Ok(Err(e)) => tracing::error!(worker = %member.url, error = %e, "cannot wait for the worker"),
                Err(_) => {
                    tracing::error!(worker = %member.url, timeout = ?WORKER_STOP_TIMEOUT, "did not stop in time: killing it");
                    let _ = child.kill().await;
                }
            }
        }
        Running::Adopted(process) => {
            // The very process proven ours when it was adopted: a pid since reused by another
            // process is not it (its start time differs), and is left alone.
            process.signal(Signal::SIGTERM);
            while process.alive() && started.elapsed() < WORKER_STOP_TIMEOUT {
                tokio::time::sleep(STARTING_POLL).await;
            }
            if process.alive() {
                tracing::error!(worker = %member.url, pid = process.pid, "did not stop in time: killing it");
                process.signal(Signal::SIGKILL);
            } else {
                tracing::info!(worker = %member.url, pid = process.pid, "stopped");
                ctx.pool.events.record(Some(&member.url), format!("stopped (pid {})", process.pid));
            }
        }
    }
}

/// Health-checks a worker run by someone else; it is never spawned, stopped or handed a config
/// (it follows its own file), and the version it runs is shown in `/stats`.
async fn supervise_remote(ctx: &Context, member: &Member, stop: &CancellationToken) {
    loop {
        check(ctx, member, 0).await;
        let pause = if member.status().state == WorkerState::Ready { ctx.check_interval() } else { STARTING_POLL * 10 };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = member.check_requested() => {}
            () = stop.cancelled() => return,
        }
    }
}
