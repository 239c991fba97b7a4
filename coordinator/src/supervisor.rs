//! Keeps the workers of the config running: one task per worker.
//!
//! A local worker (127.0.0.0/8, localhost, ::1) is spawned from the `worker` binary beside the
//! coordinator's own, its output appended to `worker_logs/<port>.log`. Its exit is seen at once
//! through its child handle and it is respawned, with backoff if it keeps dying; it is also
//! health-checked every `config_check`. A worker already answering on its port when the
//! coordinator starts (left by a coordinator that was killed) is adopted, not duplicated.
//! Removed from the config, a worker is stopped gracefully: `POST /shutdown` with its token,
//! then SIGKILL if it has not exited in time. A worker on another host is only health-checked.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use countapp_shared::config::{Config, WorkerUrl};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::RwLock;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::pool::{Member, Pool, WorkerState};

/// How often a worker that is not ready yet is asked whether it is.
const STARTING_POLL: Duration = Duration::from_millis(50);
/// Health checks a ready worker may fail in a row before it is killed and respawned.
const FAILED_CHECKS_BEFORE_KILL: u32 = 3;
/// How long a worker asked to stop gets to flush and exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// The first and the longest pause before respawning a worker that keeps exiting.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that ran this long before exiting is respawned without delay.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// The timeout of a health check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What every supervising task needs.
pub struct Context {
    /// The `worker` binary.
    pub worker_bin: PathBuf,
    /// The config file, passed on to the workers.
    pub config_path: PathBuf,
    /// The token this coordinator's workers accept on `POST /shutdown`.
    pub token: String,
    /// The config in force, for the log directory and the health-check interval.
    pub config: RwLock<Arc<Config>>,
    /// The client for health checks and shutdown requests.
    pub http: reqwest::Client,
    /// The workers and their states.
    pub pool: Arc<Pool>,
}

impl Context {
    fn check_interval(&self) -> Duration {
        self.config.read().config_check()
    }
}

/// The supervising tasks, one per worker of the config in force.
pub struct Supervisor {
    ctx: Arc<Context>,
    tasks: HashMap<WorkerUrl, (watch::Sender<bool>, JoinHandle<()>)>,
}

impl Supervisor {
    /// A supervisor with no workers yet; [`Supervisor::apply`] gives it some.
    pub fn new(ctx: Arc<Context>) -> Supervisor {
        Supervisor { ctx, tasks: HashMap::new() }
    }

    /// Makes the running workers those of `config`: starts the added ones and stops the
    /// removed ones, in the background.
    pub fn apply(&mut self, config: &Config) {
        *self.ctx.config.write() = Arc::new(config.clone());
        self.tasks.retain(|url, (stop, task)| {
            let keep = config.workers.contains(url) && !task.is_finished();
            if !keep {
                tracing::info!(worker = %url, "removed from the config: stopping");
                stop.send_replace(true);
            }
            keep
        });
        for url in &config.workers {
            if self.tasks.contains_key(url) {
                continue;
            }
            tracing::info!(worker = %url, local = url.is_local(), "added");
            let member = self.ctx.pool.add(url);
            let (stop, stopped) = watch::channel(false);
            let ctx = self.ctx.clone();
            let task = tokio::spawn(async move {
                if member.local {
                    supervise_local(&ctx, &member, stopped).await;
                } else {
                    supervise_remote(&ctx, &member, stopped).await;
                }
                ctx.pool.remove(&member.url);
            });
            self.tasks.insert(url.clone(), (stop, task));
        }
    }

    /// Stops every worker gracefully and waits until they have exited.
    pub async fn stop_all(&mut self) {
        for (stop, _) in self.tasks.values() {
            stop.send_replace(true);
        }
        for (url, (_, task)) in self.tasks.drain() {
            if let Err(e) = task.await {
                tracing::error!(worker = %url, error = %e, "supervising task failed");
            }
        }
    }
}

/// How a spawned worker's run ended.
enum Ended {
    /// It was asked to stop, and has.
    Stopped,
    /// Its process exited by itself.
    Exited(String),
}

async fn supervise_local(ctx: &Context, member: &Member, mut stop: watch::Receiver<bool>) {
    if let Some(pid) = running_pid(ctx, member).await {
        tracing::info!(worker = %member.url, pid, "adopting the worker already running on its port");
        ctx.pool.update(member, |s| {
            s.pid = Some(pid);
            s.adopted = true;
        });
        if let Ended::Stopped = watch_adopted(ctx, member, pid, &mut stop).await {
            return;
        }
    }
    let mut backoff = BACKOFF_MIN;
    loop {
        if *stop.borrow() {
            return;
        }
        ctx.pool.set_state(member, WorkerState::Starting);
        let started = Instant::now();
        let ended = match spawn(ctx, member) {
            Ok(child) => {
                ctx.pool.update(member, |s| {
                    s.pid = child.id();
                    s.adopted = false;
                });
                watch_child(ctx, member, child, &mut stop).await
            }
            Err(e) => Ended::Exited(format!("cannot spawn {}: {e}", ctx.worker_bin.display())),
        };
        let Ended::Exited(why) = ended else { return };
        tracing::warn!(worker = %member.url, reason = why, "worker exited; respawning");
        ctx.pool.set_state(member, WorkerState::Exited);
        ctx.pool.update(member, |s| {
            s.restarts += 1;
            s.pid = None;
            s.last_error = Some(why);
        });
        backoff = if started.elapsed() >= HEALTHY_RUN { BACKOFF_MIN } else { (backoff * 2).min(BACKOFF_MAX) };
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Starts the worker process, its output appended to its log file after a marker line.
fn spawn(ctx: &Context, member: &Member) -> std::io::Result<Child> {
    let config = ctx.config.read().clone();
    fs::create_dir_all(&config.worker_logs)?;
    let path = config.worker_logs.join(format!("{}.log", member.url.port()));
    let mut log = OpenOptions::new().create(true).append(true).open(&path)?;
    writeln!(
        log,
        "--- {} starting worker {} (coordinator pid {}) ---",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        member.url,
        std::process::id()
    )?;
    let mut command = Command::new(&ctx.worker_bin);
    command
        .arg(member.url.port().to_string())
        .arg("--config")
        .arg(&ctx.config_path)
        .env("COUNTAPP_SHUTDOWN_TOKEN", &ctx.token)
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
    tracing::info!(worker = %member.url, pid = child.id(), log = %path.display(), "spawned");
    Ok(child)
}

/// Follows a spawned worker until it exits or is asked to stop.
async fn watch_child(ctx: &Context, member: &Member, mut child: Child, stop: &mut watch::Receiver<bool>) -> Ended {
    let mut failed_checks = 0;
    loop {
        let pause = if member.status().state == WorkerState::Ready { ctx.check_interval() } else { STARTING_POLL };
        tokio::select! {
            status = child.wait() => {
                return Ended::Exited(match status {
                    Ok(status) => format!("exited: {status}"),
                    Err(e) => format!("cannot wait for it: {e}"),
                });
            }
            () = stopped(stop) => {
                stop_gracefully(ctx, member, Some(&mut child)).await;
                return Ended::Stopped;
            }
            () = tokio::time::sleep(pause) => {
                failed_checks = check(ctx, member, failed_checks).await;
                if failed_checks >= FAILED_CHECKS_BEFORE_KILL {
                    tracing::warn!(worker = %member.url, "failed {failed_checks} health checks: killing it");
                    let _ = child.start_kill();
                }
            }
        }
    }
}

/// Follows a worker found running at start-up, which is not our child: through health checks
/// and by asking the kernel whether its pid still exists.
async fn watch_adopted(ctx: &Context, member: &Member, pid: u32, stop: &mut watch::Receiver<bool>) -> Ended {
    let mut failed_checks = 0;
    let mut next_check = Instant::now();
    loop {
        if !alive(pid) {
            return Ended::Exited(format!("adopted worker (pid {pid}) is gone"));
        }
        if Instant::now() >= next_check {
            failed_checks = check(ctx, member, failed_checks).await;
            if failed_checks >= FAILED_CHECKS_BEFORE_KILL {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            next_check = Instant::now() + ctx.check_interval();
        }
        tokio::select! {
            // Without a child handle, a short poll of the pid stands in for the exit notice.
            () = tokio::time::sleep(STARTING_POLL) => {}
            () = stopped(stop) => {
                stop_gracefully(ctx, member, None).await;
                return Ended::Stopped;
            }
        }
    }
}

/// One health check: a ready worker stays ready, a failing one is taken out of routing.
/// Returns the number of checks failed in a row.
async fn check(ctx: &Context, member: &Member, failed_before: u32) -> u32 {
    let reply = ctx.http.get(format!("{}/ready", member.url)).timeout(CHECK_TIMEOUT).send().await;
    match reply {
        Ok(reply) if reply.status().is_success() => {
            ctx.pool.set_state(member, WorkerState::Ready);
            0
        }
        // Not ready yet, or not answering: either way, not routed to.
        Ok(reply) => {
            let state = member.status().state;
            if state == WorkerState::Ready {
                ctx.pool.suspect(member, format!("/ready answered {}", reply.status()));
            }
            if state == WorkerState::Starting { failed_before } else { failed_before + 1 }
        }
        Err(e) => {
            let state = member.status().state;
            if state == WorkerState::Ready || state == WorkerState::Unhealthy {
                ctx.pool.suspect(member, format!("health check failed: {e}"));
                failed_before + 1
            } else {
                failed_before
            }
        }
    }
}

/// Asks the worker to stop (its token on `POST /shutdown` for our child, SIGTERM for an adopted
/// one), waits for it to flush and exit, and kills it if it takes too long.
async fn stop_gracefully(ctx: &Context, member: &Member, child: Option<&mut Child>) {
    ctx.pool.set_state(member, WorkerState::Stopping);
    let pid = member.status().pid;
    let started = Instant::now();
    match child {
        Some(child) => {
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
            match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
                Ok(Ok(status)) => {
                    tracing::info!(worker = %member.url, %status, ms = started.elapsed().as_millis() as u64, "stopped")
                }
                Ok(Err(e)) => tracing::error!(worker = %member.url, error = %e, "cannot wait for the worker"),
                Err(_) => {
                    tracing::error!(worker = %member.url, "did not stop in {STOP_TIMEOUT:?}: killing it");
                    let _ = child.kill().await;
                }
            }
        }
        None => {
            let Some(pid) = pid else { return };
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            while alive(pid) && started.elapsed() < STOP_TIMEOUT {
                tokio::time::sleep(STARTING_POLL).await;
            }
            if alive(pid) {
                tracing::error!(worker = %member.url, pid, "did not stop in {STOP_TIMEOUT:?}: killing it");
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            } else {
                tracing::info!(worker = %member.url, pid, "stopped");
            }
        }
    }
}

/// The pid of a worker already answering on the member's port, from its `/stats`.
async fn running_pid(ctx: &Context, member: &Member) -> Option<u32> {
    let reply = ctx.http.get(format!("{}/stats", member.url)).timeout(CHECK_TIMEOUT).send().await.ok()?;
    let stats: serde_json::Value = reply.json().await.ok()?;
    let pid = u32::try_from(stats.get("pid")?.as_u64()?).ok()?;
    alive(pid).then_some(pid)
}

/// Whether a process with this pid runs. An adopted worker is not our child: once it exits it
/// stays a zombie until its new parent reaps it, which is not running.
fn alive(pid: u32) -> bool {
    if kill(Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    // The state is the field after the parenthesised command name in /proc/<pid>/stat.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

/// Health-checks a worker run by someone else; it is never spawned or stopped.
async fn supervise_remote(ctx: &Context, member: &Member, mut stop: watch::Receiver<bool>) {
    loop {
        check(ctx, member, 0).await;
        let pause = if member.status().state == WorkerState::Ready { ctx.check_interval() } else { STARTING_POLL * 10 };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once the task is asked to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender also means stop: the supervisor is gone.
    let _ = stop.wait_for(|s| *s).await;
}
