//! The store under real processes and real files: several worker processes merging the same
//! tenants at once, workers killed with SIGKILL at random instants mid-load and mid-merge, shard
//! owners coming and going under load, a log torn at every byte, the log of a dead worker merged
//! by the live ones, tenant names that try to escape the database, and two processes claiming one
//! worker id.
//!
//! Why real processes: the store's promises are about processes, not threads. Its shards are
//! guarded by OS file locks between processes and its log by a lock the OS drops when a process
//! dies; a dead worker is recognised by that lock alone, and the live workers share out the
//! shards by it. And a crash simulated inside one process
//! (dropping a `Store`) runs destructors and joins the log writer, so it can never stop the store
//! half-way through a write, a rename or a flush: SIGKILL can, at any instruction.
//!
//! The harness: the test binary re-runs itself (`std::env::current_exe()`, as sled's crash tests
//! do) with `--exact child`, and [`CHILD_ENV`] holds a JSON [`ChildSpec`] saying what that child
//! does. In a normal run the variable is absent and the test `child` passes at once. Children
//! speak one line per event on stdout (see [`Role`]), each line written and flushed only after
//! the event happened, so the parent knows a batch was acknowledged exactly when it has read its
//! `ACK` line. Every child is a `countapp_testcluster::Process`, which kills and reaps it when
//! dropped, even when an assertion fails; every wait has a deadline, and every child ends itself
//! after [`CHILD_LIFETIME`] whatever happens to its parent.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use countapp_shared::config::FsyncPolicy;
use countapp_store::{Item, MergeReport, Settings, Store, StoreError, StoreOptions};
use countapp_testcluster::{Pipes, Process};
use rand::RngExt;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// The child side: what a re-executed test binary does.
// ---------------------------------------------------------------------------------------------

/// The environment variable that turns a run of this binary into a child; holds a [`ChildSpec`].
const CHILD_ENV: &str = "COUNTAPP_STORE_PROCESSES_CHILD";

/// The name of the test function that is a child's entry point.
const CHILD_TEST: &str = "child";

/// A child exits by itself after this long, so that none outlives a parent that died or hung.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

/// Everything a child needs: which store to open as which worker, and its role.
#[derive(Debug, Serialize, Deserialize)]
struct ChildSpec {
    db: PathBuf,
    worker: String,
    fsync: FsyncPolicy,
    role: Role,
}

/// The roles a child can play. Every child opens its store first and then prints `READY`.
///
/// Lines a child prints: `READY` (store open), `SENT <n>` (batch `n` is about to be appended),
/// `ACK <n>` (the append of batch `n` returned: it is acknowledged), `DONE` (its work is over),
/// and `ERROR <message>` just before it exits on a failure.
#[derive(Debug, Serialize, Deserialize)]
enum Role {
    /// Waits for a `GO` line on stdin (so that all such children start at once), appends its part
    /// of [`overlap_items`] in batches, flushing every [`OVERLAP_FLUSH_EVERY`] batches, closes the
    /// store (waiting for the other children to merge its log), prints `DONE` and exits 0.
    OverlapWriter { part: usize },
    /// Appends [`batch`]es `first, first + 1, ...` from `appenders` threads at once (so that group
    /// commit groups them), printing `SENT` and `ACK` around each, while another thread flushes
    /// every [`LOAD_FLUSH_PERIOD`]; runs until killed.
    LoadUntilKilled { first: u64, appenders: u64 },
    /// Appends [`batch`]es `0..batches`, printing `ACK` after each, never flushes, prints `DONE`
    /// and then holds the store open (its log locked) until killed or its stdin closes.
    AppendThenHold { batches: u64 },
}

/// The entry point of every child; a no-op pass in a normal test run.
#[test]
fn child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spec: ChildSpec = serde_json::from_str(&spec).expect("a child spec");
    // A failure in any thread ends the child at once, and says so: a child whose flush thread
    // died while its appenders went on would look healthy until killed.
    std::panic::set_hook(Box::new(|info| {
        say(&format!("ERROR {}", info.to_string().replace('\n', " ")));
        eprintln!("{info}");
        std::process::exit(101);
    }));
    thread::spawn(|| {
        thread::sleep(CHILD_LIFETIME);
        std::process::exit(3);
    });
    // libtest has printed `test child ... ` without a newline: end that line, so that the
    // parent reads ours whole.
    say("");
    let options =
        StoreOptions { settings: Settings { fsync: spec.fsync, ..Settings::default() }, ..StoreOptions::default() };
    let store = Store::open(&spec.db, &spec.worker, options).expect("child: open the store");
    say("READY");
    let deadline = Instant::now() + CHILD_LIFETIME;
    match spec.role {
        Role::OverlapWriter { part } => {
            let mut go = String::new();
            io::stdin().read_line(&mut go).expect("child: read GO");
            assert_eq!(go.trim(), "GO", "child: the parent went away before GO");
            let owned = overlap_items(part);
            for (b, chunk) in owned.chunks(OVERLAP_BATCH).enumerate() {
                let batch: Vec<Item> = chunk.iter().map(|(t, id)| Item::new(OVERLAP_TENANTS[*t], id)).collect();
                store.append_blocking(&batch).expect("child: append");
                if b % OVERLAP_FLUSH_EVERY == OVERLAP_FLUSH_EVERY - 1 {
                    store.flush().expect("child: flush");
                }
            }
            store.close(Duration::from_secs(30)).expect("child: close");
            say("DONE");
        }
        Role::LoadUntilKilled { first, appenders } => thread::scope(|s| {
            let store = &store;
            s.spawn(move || {
                while Instant::now() < deadline {
                    thread::sleep(LOAD_FLUSH_PERIOD);
                    store.flush().expect("child: flush");
                }
            });
            for k in 0..appenders {
                s.spawn(move || {
                    let mut n = first + k;
                    for i in 1.. {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let owned = batch(n, LOAD_BATCH);
                        say(&format!("SENT {n}"));
                        store.append_blocking(&items(&owned)).expect("child: append");
                        say(&format!("ACK {n}"));
                        n += appenders;
                        if i % LOAD_BURST == 0 {
                            thread::sleep(LOAD_PAUSE);
                        }
                    }
                });
            }
        }),
        Role::AppendThenHold { batches } => {
            for n in 0..batches {
                store.append_blocking(&items(&batch(n, LOAD_BATCH))).expect("child: append");
                say(&format!("ACK {n}"));
            }
            say("DONE");
            // Returns when the parent closes our stdin or dies; SIGKILL usually comes first.
            let _ = io::stdin().read_to_end(&mut Vec::new());
        }
    }
}

/// Prints one line and flushes it at once: the parent must see it before anything that follows.
/// A child whose parent is gone has nobody to talk to, and exits.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(4);
    }
}

// ---------------------------------------------------------------------------------------------
// The parent side: children spawned, read and reaped through the harness's `Process`.
// ---------------------------------------------------------------------------------------------

/// A running child and what it said. Its [`Process`] kills (SIGKILL) and reaps it when dropped,
/// so that a failing assertion never leaves a process behind holding a lock or writing to the
/// database.
struct ChildProcess {
    process: Process,
    stdin: ChildStdin,
    /// Whole lines of the child's stdout, from a reader thread; disconnected at the child's EOF.
    lines: mpsc::Receiver<String>,
    /// Every line received so far, in order.
    seen: Vec<String>,
    /// The child's whole stderr (its panic message, if any), once it has exited.
    stderr: Option<JoinHandle<String>>,
}

impl ChildProcess {
    /// Starts this test binary again as a child playing `role` as worker `worker` on `db`.
    fn spawn(db: &Path, worker: &str, fsync: FsyncPolicy, role: Role) -> ChildProcess {
        let name = format!("child {worker} ({role:?}, {fsync:?})");
        let spec = ChildSpec { db: db.to_path_buf(), worker: worker.to_owned(), fsync, role };
        let mut command = Command::new(std::env::current_exe().expect("the test binary's path"));
        command
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, serde_json::to_string(&spec).expect("serialise the spec"));
        let (process, Pipes { stdin, stdout, mut stderr }) = Process::spawn_piped(command, &name);
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                // A line cut short by the kill carries no promise: only whole lines count.
                if line.ends_with(b"\n")
                    && tx.send(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned()).is_err()
                {
                    return;
                }
            }
        });
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        ChildProcess { process, stdin, lines, seen: Vec::new(), stderr: Some(stderr) }
    }

    /// Writes one line to the child's stdin.
    fn send(&mut self, line: &str) {
        if let Err(e) = writeln!(self.stdin, "{line}").and_then(|()| self.stdin.flush()) {
            self.fail(&format!("cannot write {line:?} to it: {e}"));
        }
    }

    /// Reads lines until one equals `wanted`; fails if the child exits or `timeout` passes first.
    fn wait_for(&mut self, wanted: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let found = line == wanted;
                    self.receive(line);
                    if found {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.fail(&format!("no {wanted:?} within {timeout:?}")),
                Err(RecvTimeoutError::Disconnected) => self.fail(&format!("exited before {wanted:?}")),
            }
        }
    }

    /// Kills the child with SIGKILL, reaps it, and returns every line it printed: whatever it
    /// wrote before dying is still in the pipe and read to the end. A child that is already dead
    /// died of an error of its own (a failed append or flush), which fails the test.
    fn kill(&mut self) -> &[String] {
        if let Some(status) = self.process.try_exit() {
            self.drain();
            self.fail(&format!("died before it was killed ({status})"));
        }
        self.process.kill();
        self.drain();
        &self.seen
    }

    /// Waits for the child to exit by itself, checks that it succeeded, and returns its lines.
    fn wait_success(&mut self, timeout: Duration) -> &[String] {
        match self.process.wait_for_exit(timeout) {
            None => self.fail(&format!("still running after {timeout:?}")),
            Some(status) if !status.success() => self.fail(&format!("exited with {status}")),
            Some(_) => {}
        }
        self.drain();
        &self.seen
    }

    /// Reads the rest of the stdout of a child that has exited.
    fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => self.receive(line),
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{}: stdout still open 10 s after it exited", self.process.name())
                }
            }
        }
    }

    /// Records a line of the child's; an `ERROR` line fails the test.
    fn receive(&mut self, line: String) {
        let error = line.starts_with("ERROR ");
        self.seen.push(line);
        if error {
            self.fail("reported an error");
        }
    }

    /// Kills the child and fails the test, showing what the child said on both streams.
    fn fail(&mut self, why: &str) -> ! {
        self.process.kill();
        let stderr = self.stderr.take().map(|t| t.join().unwrap_or_default()).unwrap_or_default();
        let tail = &self.seen[self.seen.len().saturating_sub(10)..];
        panic!("{}: {why}\nlast stdout lines: {tail:?}\nstderr:\n{stderr}", self.process.name());
    }
}

/// The numbers of the lines `<word> <n>` among `lines`.
fn numbered(lines: &[String], word: &str) -> Vec<u64> {
    lines.iter().filter_map(|line| line.strip_prefix(word)?.strip_prefix(' ')?.parse().ok()).collect()
}

// ---------------------------------------------------------------------------------------------
// Data: what children append, computed the same way by the parent to know what to expect.
// ---------------------------------------------------------------------------------------------

/// The tenants of [`batch`]: names a careless store would mix up or turn into paths, enough of
/// them that several workers own some.
const LOAD_TENANTS: [&str; 8] = ["alpha", "Alpha", "../beta", "gamma", "δ", "a b", "%2e%2e", "."];

/// Items in a batch of the kill test and of the adoption tests.
const LOAD_BATCH: usize = 3;

/// A loaded appender thread pauses for [`LOAD_PAUSE`] after every [`LOAD_BURST`] batches. The
/// threads' bursts overlap, so group commit still gathers them, but a round stays at some
/// thousand batches: the store's tenants grow over the rounds, and a process's first flush loads
/// them whole, which must stay well under the kill delay for kills to land in every phase of a
/// flush, not only in its loading.
const LOAD_BURST: u64 = 16;
const LOAD_PAUSE: Duration = Duration::from_millis(4);

/// How often a loaded child flushes, concurrently with its appends: kills land mid-flush too.
const LOAD_FLUSH_PERIOD: Duration = Duration::from_millis(20);

/// Batch `n`: `len` items, ids `n-0, n-1, ...` (so no two batches share an id), spread over
/// [`LOAD_TENANTS`].
fn batch(n: u64, len: usize) -> Vec<(String, String)> {
    (0..len).map(|j| (LOAD_TENANTS[(n as usize + j) % LOAD_TENANTS.len()].to_owned(), format!("{n}-{j}"))).collect()
}

/// Borrows owned `(tenant, id)` pairs as items.
fn items(owned: &[(String, String)]) -> Vec<Item<'_>> {
    owned.iter().map(|(tenant, id)| Item::new(tenant, id)).collect()
}

/// How many items of `batches` each tenant received; equal to its distinct ids, as batches share
/// no ids.
fn per_tenant(batches: impl IntoIterator<Item = u64>, len: usize) -> BTreeMap<String, u64> {
    let mut counts: BTreeMap<String, u64> = LOAD_TENANTS.iter().map(|t| (t.to_string(), 0)).collect();
    for n in batches {
        for (tenant, _) in batch(n, len) {
            *counts.get_mut(&tenant).unwrap() += 1;
        }
    }
    counts
}

/// Asserts that `store` counts exactly `expected` for each tenant.
#[track_caller]
fn assert_counts(store: &Store, expected: &BTreeMap<String, u64>, context: &str) {
    for (tenant, want) in expected {
        let got = store.count_blocking(tenant).unwrap_or_else(|e| panic!("{context}: count of {tenant:?}: {e}"));
        assert_eq!(got, *want, "{context}: count of tenant {tenant:?}");
    }
}

/// The store a parent opens to check the children's work; once the children are dead it owns
/// every shard, so its flush merges whatever they left.
fn checker(db: &Path, fsync: FsyncPolicy) -> (Store, MergeReport) {
    let store = Store::open(db, "checker", options(fsync)).unwrap();
    let report = store.flush().unwrap();
    (store, report)
}

/// Appends every acknowledged batch again and flushes: if every one was stored, none of their ids
/// is new. The counts alone could hide a lost acknowledged batch behind a counted unacknowledged
/// one; this cannot.
#[track_caller]
fn assert_all_stored(store: &Store, acked: &[u64], context: &str) {
    let again: Vec<(String, String)> = acked.iter().flat_map(|&n| batch(n, LOAD_BATCH)).collect();
    for chunk in again.chunks(10_000) {
        store.append_blocking(&items(chunk)).unwrap();
    }
    let report = store.flush().unwrap();
    assert_eq!(report.new_ids, 0, "{context}: acknowledged ids missing");
}

/// Options for the parent's stores: a generous lock wait, since the only other holders of a log
/// are this test's children, which are dead (and their locks freed) by the time it opens.
fn options(fsync: FsyncPolicy) -> StoreOptions {
    StoreOptions { settings: Settings { fsync, ..Settings::default() }, ..StoreOptions::default() }
}

/// The log files (`.open` and `.log`) directly in `dir`, sorted by name, which sorts them by
/// sequence number.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log" || x == "open"))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("listing {}: {e}", dir.display()),
    };
    files.sort();
    files
}

/// The log files under `db` that hold anything.
fn unmerged(db: &Path) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for worker in fs::read_dir(db.join("wal")).unwrap() {
        left.extend(log_files(&worker.unwrap().path()).into_iter().filter(|f| fs::metadata(f).unwrap().len() > 0));
    }
    left
}

/// Every file and directory under `root`, recursively.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            found.push(path);
        }
    }
    found
}

/// Copies the directory tree `from` to `to`, which must not exist.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Concurrent flushes from four processes into the same tenant files.
// ---------------------------------------------------------------------------------------------

/// The tenants every overlap writer writes to.
const OVERLAP_TENANTS: [&str; 5] = ["t", "T", "t t", "../t", "té"];
/// Overlap writers; each is a separate process with its own worker id.
const OVERLAP_PARTS: usize = 4;
/// Part `p` writes ids `p * STRIDE .. p * STRIDE + SPAN`: the ranges of neighbours overlap, and
/// ids `(PARTS - 1) * STRIDE .. SPAN` are written by all four.
const OVERLAP_STRIDE: usize = 300;
const OVERLAP_SPAN: usize = 1500;
const OVERLAP_BATCH: usize = 50;
const OVERLAP_FLUSH_EVERY: usize = 3;

/// The `(tenant index, id)` items of overlap writer `part`, in append order: tenant `t` gets the
/// ids of the part's range divisible by `t + 1`, so every tenant has a different count, and each
/// batch touches every tenant, so every flush contends on all their files.
fn overlap_items(part: usize) -> Vec<(usize, String)> {
    let start = part * OVERLAP_STRIDE;
    (start..start + OVERLAP_SPAN)
        .flat_map(|i| (0..OVERLAP_TENANTS.len()).filter(move |t| i % (t + 1) == 0).map(move |t| (t, i.to_string())))
        .collect()
}

/// The Go original lost 22% of the items here: four processes loaded, merged and saved the same
/// tenant file under an in-process mutex only. Here the four come and go as owners of the shards
/// while they write, and each waits, when it closes, for the others to merge its log.
#[test]
fn four_processes_flushing_overlapping_ids_count_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let mut expected: Vec<HashSet<String>> = vec![HashSet::new(); OVERLAP_TENANTS.len()];
    for part in 0..OVERLAP_PARTS {
        for (t, id) in overlap_items(part) {
            expected[t].insert(id);
        }
    }
    let mut children: Vec<ChildProcess> = (0..OVERLAP_PARTS)
        .map(|part| ChildProcess::spawn(&db, &format!("w{part}"), FsyncPolicy::EverySec, Role::OverlapWriter { part }))
        .collect();
    for child in &mut children {
        child.wait_for("READY", Duration::from_secs(30));
    }
    for child in &mut children {
        child.send("GO");
    }
    for child in &mut children {
        let lines = child.wait_success(Duration::from_secs(50));
        assert!(lines.iter().any(|l| l == "DONE"), "a child exited without DONE: {lines:?}");
    }
    assert_eq!(unmerged(&db), Vec::<PathBuf>::new(), "children closed gracefully: their logs should be merged");
    let (store, report) = checker(&db, FsyncPolicy::EverySec);
    assert_eq!(report.items, 0, "children closed gracefully: nothing should be left to merge");
    for (t, tenant) in OVERLAP_TENANTS.iter().enumerate() {
        assert_eq!(store.count_blocking(tenant).unwrap(), expected[t].len() as u64, "tenant {tenant:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. SIGKILL at random instants, under every fsync policy.
// ---------------------------------------------------------------------------------------------

const KILL_ROUNDS: u64 = 20;
const POLICIES: [FsyncPolicy; 3] = [FsyncPolicy::Always, FsyncPolicy::EverySec, FsyncPolicy::Never];

/// Each round, a child loads the store from four threads while flushing every 20 ms, and is
/// killed 20-300 ms after it opened. Reopening the same worker id must succeed (nothing corrupt)
/// and replay the log: every acknowledged item is counted, and nothing that was never sent.
#[test]
fn sigkill_mid_load_loses_no_acknowledged_batch() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let mut rng = rand::rng();
    let mut acked_total = per_tenant([], LOAD_BATCH);
    let mut sent_total = acked_total.clone();
    for round in 0..KILL_ROUNDS {
        let fsync = POLICIES[round as usize % POLICIES.len()];
        // Batch numbers never repeat across rounds, so neither do ids.
        let first = round << 32;
        let mut child = ChildProcess::spawn(&db, "loaded", fsync, Role::LoadUntilKilled { first, appenders: 4 });
        child.wait_for("READY", Duration::from_secs(30));
        let delay = rng.random_range(20..=300);
        thread::sleep(Duration::from_millis(delay));
        let lines = child.kill();
        let sent: HashSet<u64> = numbered(lines, "SENT").into_iter().collect();
        let acked = numbered(lines, "ACK");
        let context =
            format!("round {round} ({fsync:?}, killed {delay} ms after READY, {} batches acknowledged)", acked.len());
        assert!(acked.iter().all(|n| sent.contains(n)), "{context}: an ACK without its SENT");
        for (tenant, n) in per_tenant(acked.iter().copied(), LOAD_BATCH) {
            *acked_total.get_mut(&tenant).unwrap() += n;
        }
        for (tenant, n) in per_tenant(sent.iter().copied(), LOAD_BATCH) {
            *sent_total.get_mut(&tenant).unwrap() += n;
        }

        let store = Store::open(&db, "loaded", options(fsync))
            .unwrap_or_else(|e| panic!("{context}: reopening after SIGKILL failed: {e}"));
        store.flush().unwrap_or_else(|e| panic!("{context}: the first flush after SIGKILL failed: {e}"));
        for tenant in LOAD_TENANTS {
            let count = store.count_blocking(tenant).unwrap();
            assert!(
                acked_total[tenant] <= count && count <= sent_total[tenant],
                "{context}: tenant {tenant:?} counts {count}, expected between {} acknowledged and {} sent",
                acked_total[tenant],
                sent_total[tenant]
            );
        }
        assert_all_stored(&store, &acked, &context);
        store.close(Duration::ZERO).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Shard owners coming and going under load.
// ---------------------------------------------------------------------------------------------

const OWNER_ROUNDS: u64 = 16;
const OWNER_IDS: [&str; 3] = ["w0", "w1", "w2"];

/// Up to three workers load the store and merge every 20 ms, and each round one of them is killed
/// with SIGKILL and another started in its place, so the shards' owners change under load and
/// mid-merge. Counts read from the files never go down, and at the end every acknowledged batch
/// is counted exactly once.
#[test]
fn shard_owners_killed_and_replaced_under_load_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let mut rng = rand::rng();
    let mut running: Vec<(usize, ChildProcess)> = Vec::new();
    let (mut acked, mut sent) = (Vec::new(), HashSet::new());
    let mut last_counts: BTreeMap<&str, u64> = BTreeMap::new();
    for round in 0..OWNER_ROUNDS {
        // Start every worker id that is not running, each with batch numbers of its own.
        for (w, id) in OWNER_IDS.iter().enumerate() {
            if running.iter().all(|(r, _)| *r != w) {
                let first = (round << 32) | ((w as u64) << 28);
                let mut child =
                    ChildProcess::spawn(&db, id, FsyncPolicy::EverySec, Role::LoadUntilKilled { first, appenders: 2 });
                child.wait_for("READY", Duration::from_secs(30));
                running.push((w, child));
            }
        }
        thread::sleep(Duration::from_millis(rng.random_range(50..=300)));
        let (_, mut victim) = running.swap_remove(rng.random_range(0..running.len()));
        let lines = victim.kill();
        acked.extend(numbered(lines, "ACK"));
        sent.extend(numbered(lines, "SENT"));
        for tenant in LOAD_TENANTS {
            let count = countapp_store::read_count(&db, tenant).unwrap();
            let before = last_counts.insert(tenant, count).unwrap_or(0);
            assert!(count >= before, "round {round}: the count of {tenant:?} went down from {before} to {count}");
        }
    }
    for (_, mut child) in running {
        let lines = child.kill();
        acked.extend(numbered(lines, "ACK"));
        sent.extend(numbered(lines, "SENT"));
    }
    let (store, _) = checker(&db, FsyncPolicy::EverySec);
    let context = format!("after {OWNER_ROUNDS} rounds, {} batches acknowledged", acked.len());
    let (low, high) = (per_tenant(acked.iter().copied(), LOAD_BATCH), per_tenant(sent, LOAD_BATCH));
    for tenant in LOAD_TENANTS {
        let count = store.count_blocking(tenant).unwrap();
        assert!(low[tenant] <= count && count <= high[tenant], "{context}: {tenant:?} counts {count}");
    }
    assert_all_stored(&store, &acked, &context);
}

// ---------------------------------------------------------------------------------------------
// 4. A log torn at every byte.
// ---------------------------------------------------------------------------------------------

/// A crash mid-append leaves a prefix of the log: cut at any byte, the whole records before the
/// cut are counted, the torn one is dropped (and reported), and the store goes on appending
/// after it. In-process, on copies of one real log file.
#[test]
fn a_torn_log_tail_at_every_byte_offset_keeps_every_earlier_record() {
    const K: u64 = 4;
    const LEN: usize = 2;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let store = Store::open(&db, "torn", options(FsyncPolicy::Never)).unwrap();
    let logs = log_files(&db.join("wal/torn"));
    let [log] = &logs[..] else { panic!("one active log file expected, found {logs:?}") };
    let log_name = log.strip_prefix(&db).unwrap().to_path_buf();
    // `ends[k]`: the log's length with k records; the writer writes before it acknowledges.
    let mut ends = vec![fs::metadata(log).unwrap().len()];
    for n in 0..K {
        store.append_blocking(&items(&batch(n, LEN))).unwrap();
        ends.push(fs::metadata(log).unwrap().len());
    }
    drop(store); // a crash: the log stays for the next open
    assert!(ends[0] > 0, "a new log file holds its header");
    assert_eq!(fs::metadata(log).unwrap().len(), ends[K as usize], "the log changed after the crash");

    // Cut inside the header too: a file whose header is torn holds nothing acknowledged.
    for cut in 0..=ends[K as usize] {
        let whole = ends.iter().rposition(|&end| end <= cut).unwrap_or(0) as u64;
        let context = format!("log cut at byte {cut} of {} (record ends {ends:?})", ends[K as usize]);
        let copy = tempfile::tempdir().unwrap();
        let cdb = copy.path().join("db");
        copy_tree(&db, &cdb);
        fs::OpenOptions::new().write(true).open(cdb.join(&log_name)).unwrap().set_len(cut).unwrap();

        let store = Store::open(&cdb, "torn", options(FsyncPolicy::Never))
            .unwrap_or_else(|e| panic!("{context}: open failed: {e}"));
        let report = store.flush().unwrap_or_else(|e| panic!("{context}: flush failed: {e}"));
        assert_counts(&store, &per_tenant(0..whole, LEN), &context);
        // A file that holds no whole record holds nothing acknowledged: its worker deletes it
        // when it starts, and no merge ever reads it.
        let dropped = if whole == 0 { 0 } else { cut - ends[whole as usize] };
        assert_eq!(report.torn_tail_bytes, dropped, "{context}: torn tail bytes");
        assert_eq!(report.damaged_bytes, 0, "{context}: a torn tail is no damage");
        assert!(!cdb.join("damaged").exists(), "{context}: nothing is kept aside for a torn tail");
        assert_eq!(report.items, whole * LEN as u64, "{context}: merged items");

        if cut > ends[K as usize - 1] {
            // What comes after a torn record must not be lost behind it.
            store.append_blocking(&items(&batch(K, LEN))).unwrap();
            drop(store);
            let store = Store::open(&cdb, "torn", options(FsyncPolicy::Never)).unwrap();
            store.flush().unwrap();
            let expected = per_tenant((0..whole).chain([K]), LEN);
            assert_counts(&store, &expected, &format!("{context}, then one more batch and a crash"));
        }
    }
}

/// Damage in the middle of a log is no torn tail: with any one byte of the file's header or of
/// its first record flipped, every record after it is still counted (all of them, for a byte of
/// the header), the damage is reported as such, and the file is kept aside under `damaged/`.
#[test]
fn a_flipped_byte_anywhere_in_the_header_or_first_record_keeps_every_record_after_it_and_the_file_aside() {
    const K: u64 = 3;
    const LEN: usize = 2;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let store = Store::open(&db, "flip", options(FsyncPolicy::Never)).unwrap();
    let logs = log_files(&db.join("wal/flip"));
    let [log] = &logs[..] else { panic!("one active log file expected, found {logs:?}") };
    let log_name = log.strip_prefix(&db).unwrap().to_path_buf();
    let header_end = fs::metadata(log).unwrap().len();
    let mut first_end = 0;
    for n in 0..K {
        store.append_blocking(&items(&batch(n, LEN))).unwrap();
        if n == 0 {
            first_end = fs::metadata(log).unwrap().len();
        }
    }
    drop(store);

    for at in 0..first_end {
        let context = format!("byte {at} of the header and first record ({first_end} bytes) flipped");
        let copy = tempfile::tempdir().unwrap();
        let cdb = copy.path().join("db");
        copy_tree(&db, &cdb);
        let path = cdb.join(&log_name);
        let mut bytes = fs::read(&path).unwrap();
        bytes[at as usize] ^= 0x5a;
        fs::write(&path, bytes).unwrap();

        let store = Store::open(&cdb, "flip", options(FsyncPolicy::Never)).unwrap();
        let report = store.flush().unwrap_or_else(|e| panic!("{context}: flush failed: {e}"));
        let intact = if at < header_end { 0..K } else { 1..K };
        assert_counts(&store, &per_tenant(intact, LEN), &context);
        assert!(report.damaged_bytes > 0, "{context}: the damage must be reported");
        assert_eq!(report.torn_tail_bytes, 0, "{context}: no torn tail");
        let aside = log_files(&cdb.join("damaged"));
        assert_eq!(aside.len(), 1, "{context}: the damaged file is kept aside: {aside:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. The log of a dead worker.
// ---------------------------------------------------------------------------------------------

const DEAD_BATCHES: u64 = 40;

/// A worker killed with acknowledged batches it never merged: its log files are final, and the
/// next flush of a live worker merges them; the dead worker coming back, and later flushes, count
/// nothing twice.
#[test]
fn a_dead_workers_log_is_merged_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let dead_wal = db.join("wal/dead");
    let mut child =
        ChildProcess::spawn(&db, "dead", FsyncPolicy::EverySec, Role::AppendThenHold { batches: DEAD_BATCHES });
    child.wait_for("DONE", Duration::from_secs(30));
    let acked = numbered(child.kill(), "ACK");
    assert_eq!(acked, (0..DEAD_BATCHES).collect::<Vec<_>>());
    let expected = per_tenant(acked.iter().copied(), LOAD_BATCH);
    assert!(!log_files(&dead_wal).is_empty(), "the killed worker left no log");

    let live = Store::open(&db, "live", options(FsyncPolicy::EverySec)).unwrap();
    let report = live.flush().unwrap();
    assert_counts(&live, &expected, "after the live worker merged the dead one's log");
    assert_eq!(report.items, DEAD_BATCHES * LOAD_BATCH as u64, "{report:?}");
    assert_eq!(log_files(&dead_wal), Vec::<PathBuf>::new(), "the merged log files were not deleted");

    let dead = Store::open(&db, "dead", options(FsyncPolicy::EverySec)).unwrap();
    let report = dead.flush().unwrap();
    assert_eq!(report.items, 0, "the dead worker's restart merged its log again: {report:?}");
    let report = live.flush().unwrap();
    assert_eq!(report.items, 0, "{report:?}");
    assert_counts(&live, &expected, "after the dead worker's restart and a flush");
    assert_counts(&dead, &expected, "as the restarted worker reads them");
    dead.close(Duration::from_secs(5)).unwrap();
    live.close(Duration::from_secs(5)).unwrap();
    assert_eq!(unmerged(&db), Vec::<PathBuf>::new(), "log files left after both closed");
    let (store, _) = checker(&db, FsyncPolicy::EverySec);
    assert_counts(&store, &expected, "at the end");
}

/// The same with the live worker already running: its flush must leave the log of a running
/// worker alone (its active file may still grow), and merge it once that worker is dead.
#[test]
fn a_running_workers_active_log_is_left_alone_until_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let live = Store::open(&db, "live", options(FsyncPolicy::EverySec)).unwrap();
    let mut child =
        ChildProcess::spawn(&db, "dead", FsyncPolicy::Never, Role::AppendThenHold { batches: DEAD_BATCHES });
    child.wait_for("DONE", Duration::from_secs(30));
    let zero = per_tenant([], LOAD_BATCH);
    let report = live.flush().unwrap();
    assert_eq!(report.log_files, 0, "a flush read the active log of a running worker: {report:?}");
    assert_counts(&live, &zero, "while the other worker runs");

    let acked = numbered(child.kill(), "ACK");
    assert_eq!(acked, (0..DEAD_BATCHES).collect::<Vec<_>>());
    let expected = per_tenant(acked.iter().copied(), LOAD_BATCH);
    let report = live.flush().unwrap();
    assert_eq!(report.items, DEAD_BATCHES * LOAD_BATCH as u64, "{report:?}");
    assert_counts(&live, &expected, "after the live worker's flush merged the dead one's log");
    assert_eq!(log_files(&db.join("wal/dead")), Vec::<PathBuf>::new(), "the merged log files were not deleted");
    let report = live.flush().unwrap();
    assert_eq!(report.items, 0, "a second flush merged again: {report:?}");
    assert_counts(&live, &expected, "after a second flush");
}

// ---------------------------------------------------------------------------------------------
// 6. Tenant names.
// ---------------------------------------------------------------------------------------------

/// Tenant names that a store deriving paths from names would mix up or let out of the database;
/// each gets a different number of ids, and every byte the store writes stays in the database.
#[test]
fn tenant_names_are_distinct_and_stay_inside_the_database() {
    let long = "é".repeat(128);
    assert_eq!(long.len(), 256);
    let tenants = ["a", "A", "a b", "../x", "../../x", "..", "%2e%2e", ".", &long, " ", "/", "a/b", "\\", "a\0b"];
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let store = Store::open(&db, "w", options(FsyncPolicy::EverySec)).unwrap();
    let ids: Vec<Vec<String>> = (0..tenants.len()).map(|i| (0..=i).map(|j| format!("id{j}")).collect()).collect();
    let owned: Vec<(String, String)> = tenants
        .iter()
        .zip(&ids)
        .flat_map(|(tenant, ids)| ids.iter().map(|id| (tenant.to_string(), id.clone())))
        .collect();
    // Twice over, so that each tenant also sees repeats.
    store.append_blocking(&items(&owned)).unwrap();
    store.append_blocking(&items(&owned)).unwrap();
    store.flush().unwrap();
    let check = |store: &Store, when: &str| {
        for (i, tenant) in tenants.iter().enumerate() {
            assert_eq!(store.count_blocking(tenant).unwrap(), i as u64 + 1, "{when}: tenant {tenant:?}");
        }
        for never in ["b", "a  b", "../y", "...", "x", "a\0"] {
            assert_eq!(store.count_blocking(never).unwrap(), 0, "{when}: tenant {never:?} was never posted to");
        }
    };
    check(&store, "after the flush");
    store.close(Duration::ZERO).unwrap();
    let other = Store::open(&db, "other", options(FsyncPolicy::EverySec)).unwrap();
    check(&other, "as another worker reads them");
    other.close(Duration::ZERO).unwrap();

    for path in walk(dir.path()) {
        assert!(path.starts_with(&db), "{} was written outside the database {}", path.display(), db.display());
    }
    for path in walk(&db) {
        let top = path.strip_prefix(&db).unwrap().components().next().unwrap();
        let top = top.as_os_str().to_str().unwrap();
        assert!(["wal", "shards", "STORE.json"].contains(&top), "unexpected {}", path.display());
    }
    let mut names = Vec::new();
    for shard in fs::read_dir(db.join("shards")).unwrap() {
        for entry in fs::read_dir(shard.unwrap().path()).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().expect("a UTF-8 file name");
            if ["LOCK", "SHARD.json", "TENANTS", "COUNTS"].contains(&name.as_str()) {
                continue;
            }
            assert!(entry.file_type().unwrap().is_file(), "{name:?}: a small tenant is one file");
            assert!(name.ends_with(".json") && !name.starts_with('.'), "a tenant file named {name:?}");
            assert!(!tenants.contains(&name.trim_end_matches(".json")), "tenant {name:?} is a raw file name");
            assert!(name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\'), "unsafe name {name:?}");
            names.push(name);
        }
    }
    assert_eq!(names.len(), tenants.len(), "one file per tenant: {names:?}");
    let folded: HashSet<String> = names.iter().map(|n| n.to_lowercase()).collect();
    assert_eq!(folded.len(), names.len(), "file names collide on a case-insensitive file system: {names:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. One worker id, two processes.
// ---------------------------------------------------------------------------------------------

/// Two processes started with one worker id would interleave one log: the second must be refused
/// while the first lives, and take over (replaying the log) once it is dead.
#[test]
fn a_second_process_cannot_open_a_running_workers_log() {
    const BATCHES: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let mut child = ChildProcess::spawn(&db, "w", FsyncPolicy::Always, Role::AppendThenHold { batches: BATCHES });
    child.wait_for("DONE", Duration::from_secs(30));
    let wait = Duration::from_millis(200);
    let started = Instant::now();
    match Store::open(
        &db,
        "w",
        StoreOptions {
            settings: Settings { fsync: FsyncPolicy::Always, ..Settings::default() },
            lock_wait: wait,
            ..StoreOptions::default()
        },
    ) {
        Err(StoreError::LogInUse(id)) => assert_eq!(id, "w"),
        Err(e) => panic!("expected LogInUse, got {e}"),
        Ok(_) => panic!("a second process opened the log of a running worker"),
    }
    let waited = started.elapsed();
    assert!(waited >= wait && waited < Duration::from_secs(5), "waited {waited:?} for a lock_wait of {wait:?}");

    let acked = numbered(child.kill(), "ACK");
    assert_eq!(acked, (0..BATCHES).collect::<Vec<_>>());
    let store = Store::open(
        &db,
        "w",
        StoreOptions {
            settings: Settings { fsync: FsyncPolicy::Always, ..Settings::default() },
            lock_wait: wait,
            ..StoreOptions::default()
        },
    )
    .expect("open once the other process is dead");
    store.flush().unwrap();
    assert_counts(&store, &per_tenant(0..BATCHES, LOAD_BATCH), "after taking over the dead process's log");
}
