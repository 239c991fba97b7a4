//! `make bench-scale`: how CountApp scales in memory, in sustained load and in tenants. Each run
//! gets a fresh coordinator with four local workers (fsync everysec) in a temporary directory on
//! free loopback ports, loaded through the coordinator by countapp-load:
//!   memory     2M ids in one tenant, 20M in one tenant, 20M over 1,000 tenants: the workers'
//!              resident memory (sum of VmRSS) before the load and once the counts converged
//!              (plus 2 s), per stored id. Target: at most 40 B/id.
//!   sustained  16 connections, batches of 100 over 10 tenants (as `make bench`) for 10, 60 and
//!              180 s: items/s, 503s and errors, and the convergence time after the last ack.
//!              Target: worker_persist + 2 s.
//!   tenants    100,000 and 1,000,000 tenants of one id each: the convergence time after the last
//!              ack as the files show it (the newest tenant file's ctime), and as the client sees
//!              it (a sample of 1,000 tenants, then all, with the sweep's granularity), the tenant
//!              files and their disk use. Targets: worker_persist + 3 s (100k), + 15 s (1M); one
//!              file and at most 4.5 KiB per tenant.
//!
//! Figures go to target/bench-scale/*.json (each load run's report, and summary.json); a summary
//! is printed at the end. Every run's files are kept until the end (about 10 GB at full size): on
//! ext4 without a journal, as on this project's machine, deleting a million files slows every
//! file created in the next few minutes, which would skew the runs that follow.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::stand::{BenchCluster, load};

/// Where the figures go.
const OUT: &str = "target/bench-scale";

/// The knobs of `make bench-scale`, each also read from the environment variable it names. A
/// smoke run, a minute or two: `WORKER_PERSIST=1 MEMORY_RUNS="200000:1 200000:100" SUSTAINED=3
/// TENANT_RUNS=10000 make bench-scale`.
#[derive(clap::Args)]
pub struct Options {
    /// Which scenarios, in order: memory, sustained, tenants.
    #[arg(long, env = "SCENARIOS", default_value = "memory sustained tenants")]
    scenarios: String,
    /// The workers' worker_persist, seconds.
    #[arg(long, env = "WORKER_PERSIST", default_value_t = 5.0)]
    worker_persist: f64,
    /// Memory runs, as IDS:TENANTS.
    #[arg(long, env = "MEMORY_RUNS", default_value = "2000000:1 20000000:1 20000000:1000")]
    memory_runs: String,
    /// Sustained runs' durations, seconds.
    #[arg(long, env = "SUSTAINED", default_value = "10 60 180")]
    sustained: String,
    /// The tenant counts of the tenants scenario, one id each.
    #[arg(long, env = "TENANT_RUNS", default_value = "100000 1000000")]
    tenant_runs: String,
    /// The load tool's --converge-timeout.
    #[arg(long, env = "CONVERGE_TIMEOUT", default_value = "300s", value_parser = humantime::parse_duration)]
    converge_timeout: Duration,
    /// The load tool's --check-connections.
    #[arg(long, env = "CHECK_CONNECTIONS", default_value_t = 16)]
    check_connections: u32,
}

/// A run to summarise: its scenario and load report, and what was measured beside it.
struct Record {
    scenario: &'static str,
    report: PathBuf,
    /// The load tool's exit status: 0, 1 (the check failed), 2 (the run failed).
    load_status: i32,
    extra: Value,
}

/// Runs `make bench-scale`; true when every load run passed its check.
pub fn run(options: &Options) -> anyhow::Result<bool> {
    let scenarios: Vec<&str> = options.scenarios.split_whitespace().collect();
    if let Some(unknown) = scenarios.iter().find(|s| !["memory", "sustained", "tenants"].contains(s)) {
        bail!("SCENARIOS: unknown scenario '{unknown}' (memory, sustained, tenants)");
    }
    if !options.worker_persist.is_finite() || options.worker_persist <= 0.0 {
        bail!("WORKER_PERSIST: not a number of seconds: {}", options.worker_persist);
    }
    fs::create_dir_all(OUT)?;
    for entry in fs::read_dir(OUT)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            fs::remove_file(&path)?;
        }
    }
    let mut scale = Scale { options, records: Vec::new(), kept: Vec::new() };
    for scenario in scenarios {
        match scenario {
            "memory" => scale.memory()?,
            "sustained" => scale.sustained()?,
            _ => scale.tenants()?,
        }
    }
    scale.summary()?;
    Ok(scale.records.iter().all(|r| r.load_status == 0))
}

/// One `make bench-scale`: its runs so far, and their stopped clusters, whose files are kept
/// until the end.
struct Scale<'a> {
    options: &'a Options,
    records: Vec<Record>,
    kept: Vec<BenchCluster>,
}

impl Scale<'_> {
    /// A fresh cluster for a run.
    fn cluster(&self) -> BenchCluster {
        BenchCluster::start(&format!("worker_persist: {}\n", self.options.worker_persist))
    }

    /// Runs the load tool against `cluster` with `args` after the common ones, its report in
    /// `json`; its exit status, which fails the bench-scale at the end, not at once.
    fn load(&self, cluster: &BenchCluster, json: &Path, args: &[&str]) -> anyhow::Result<i32> {
        let converge = humantime::format_duration(self.options.converge_timeout).to_string();
        let mut all: Vec<String> = vec![
            "--url".into(),
            cluster.url(),
            "--quiet".into(),
            "--json".into(),
            json.to_string_lossy().into_owned(),
            "--converge-timeout".into(),
            converge,
            "--check-connections".into(),
            self.options.check_connections.to_string(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        // The largest run sends 20M ids in well under ten minutes; the wait for the counts adds
        // at most the convergence timeout.
        let within = self.options.converge_timeout + Duration::from_secs(1800);
        let status = load(&all, within)?.code().unwrap_or(2);
        if status != 0 {
            eprintln!("countapp-load exited with status {status}");
        }
        Ok(status)
    }

    /// Stops `cluster` and keeps its files until the end.
    fn keep(&mut self, mut cluster: BenchCluster) {
        cluster.stop();
        self.kept.push(cluster);
    }

    fn memory(&mut self) -> anyhow::Result<()> {
        for run in self.options.memory_runs.split_whitespace() {
            let (ids, tenants) = run.split_once(':').context("MEMORY_RUNS: IDS:TENANTS")?;
            let (ids, tenants): (u64, u64) = (ids.parse()?, tenants.parse()?);
            let json = Path::new(OUT).join(format!("memory-{ids}-ids-{tenants}-tenants.json"));
            println!("=== memory: {ids} ids over {tenants} tenant(s) ===");
            let cluster = self.cluster();
            let before = workers_rss(&cluster);
            let (ids_arg, tenants_arg) = (ids.to_string(), tenants.to_string());
            let args = ["--tenants", &tenants_arg, "--items", &ids_arg, "--connections", "16", "--batch", "100"];
            let load_status = self.load(&cluster, &json, &args)?;
            thread::sleep(Duration::from_secs(2));
            let after = workers_rss(&cluster);
            let extra = json!({ "ids": ids, "tenants": tenants, "rss_before": before, "rss_after": after });
            self.records.push(Record { scenario: "memory", report: json, load_status, extra });
            self.keep(cluster);
        }
        Ok(())
    }

    fn sustained(&mut self) -> anyhow::Result<()> {
        for seconds in self.options.sustained.split_whitespace() {
            let seconds: u64 = seconds.parse().context("SUSTAINED: seconds")?;
            let json = Path::new(OUT).join(format!("sustained-{seconds}s.json"));
            println!("=== sustained: {seconds} s, 16 connections, batches of 100 over 10 tenants ===");
            let cluster = self.cluster();
            let duration = seconds.to_string();
            let args = ["--duration", &duration, "--connections", "16", "--batch", "100", "--tenants", "10"];
            let load_status = self.load(&cluster, &json, &args)?;
            let extra = json!({ "seconds": seconds, "rss_after": workers_rss(&cluster) });
            self.records.push(Record { scenario: "sustained", report: json, load_status, extra });
            self.keep(cluster);
        }
        Ok(())
    }

    fn tenants(&mut self) -> anyhow::Result<()> {
        for tenants in self.options.tenant_runs.split_whitespace() {
            let tenants: u64 = tenants.parse().context("TENANT_RUNS: a number of tenants")?;
            let json = Path::new(OUT).join(format!("tenants-{tenants}.json"));
            println!("=== tenants: {tenants} tenants of one id each ===");
            let cluster = self.cluster();
            // Only a sample is read while the workers merge: reading every count through the
            // coordinator meanwhile would take the CPU the merges need. The verdict reads them all.
            let n = tenants.to_string();
            let args =
                ["--tenants", &n, "--batch", "1000", "--items", &n, "--connections", "16", "--check-sample", "1000"];
            let load_status = self.load(&cluster, &json, &args)?;
            let files = TenantFiles::of(&cluster.path().join("db/shards"));
            let extra = json!({
                "tenants": tenants,
                "newest_ctime": files.as_ref().and_then(|f| f.newest_ctime),
                "files": files.as_ref().map(|f| f.files),
                "du_kib": files.as_ref().map(|f| f.disk_bytes / 1024),
            });
            self.records.push(Record { scenario: "tenants", report: json, load_status, extra });
            self.keep(cluster);
        }
        Ok(())
    }

    /// The summary: figures against their targets, printed and written to summary.json.
    fn summary(&self) -> anyhow::Result<()> {
        let persist = self.options.worker_persist;
        let mut entries = Vec::new();
        let mut lines = Vec::new();
        for record in &self.records {
            let (entry, line) = summarise(record, persist);
            entries.push(entry);
            lines.push(line);
        }
        let path = Path::new(OUT).join("summary.json");
        let summary = json!({ "worker_persist": persist, "runs": entries });
        fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
        println!();
        println!("=== bench-scale summary (worker_persist {persist} s; figures in {OUT}) ===");
        for line in lines {
            println!("{line}");
        }
        Ok(())
    }
}

/// One run's entry of summary.json, and its line of the printed summary.
fn summarise(record: &Record, persist: f64) -> (Value, String) {
    let report: Option<Value> = fs::read_to_string(&record.report).ok().and_then(|t| serde_json::from_str(&t).ok());
    let run = report.as_ref().map(|r| &r["run"]).filter(|r| r.is_object());
    let check = report.as_ref().map(|r| &r["check"]).filter(|c| c.is_object());
    let x = &record.extra;
    let mut entry = json!({
        "scenario": record.scenario,
        "load_status": record.load_status,
        "report": record.report.to_string_lossy(),
    });
    let e = entry.as_object_mut().unwrap();
    if let Some(check) = check {
        for (to, from) in [
            ("lost", "lost"),
            ("unexpected", "unexpected"),
            ("converged", "converged"),
            ("waited_s", "waited"),
            ("sweep_s", "sweep_s"),
        ] {
            e.insert(to.into(), check[from].clone());
        }
    }
    let http_503 = run.map(|r| r["errors_by_kind"]["HTTP 503"].as_u64().unwrap_or(0));
    if let Some(run) = run {
        e.insert("items_per_s".into(), run["items_per_s"].clone());
        e.insert("errors".into(), run["errors"].clone());
        e.insert("http_503".into(), json!(http_503));
        e.insert("last_ack_unix_ms".into(), run["last_ack_unix_ms"].clone());
    }
    let check_text = match check {
        Some(c) => format!("lost {}, unexpected {}", c["lost"], c["unexpected"]),
        None => "no check".to_owned(),
    };
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    let mib = |bytes: &Value| bytes.as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let line = match record.scenario {
        "memory" => {
            let ids = check.and_then(|c| c["counted"].as_u64()).or(x["ids"].as_u64()).unwrap_or(0);
            let per_id = (ids > 0).then(|| (f(&x["rss_after"]) - f(&x["rss_before"])) / ids as f64);
            for key in ["tenants", "rss_before", "rss_after"] {
                e.insert(key.into(), x[key].clone());
            }
            e.insert("ids".into(), json!(ids));
            e.insert("bytes_per_id".into(), json!(per_id));
            e.insert("target_bytes_per_id".into(), json!(40));
            format!(
                "memory     {:>10} ids / {:<7} tenants  RSS {:>7.1} -> {:>7.1} MiB  {:>6} B/id (target <= 40: {})  {check_text}",
                u(&x["ids"]),
                u(&x["tenants"]),
                mib(&x["rss_before"]),
                mib(&x["rss_after"]),
                per_id.map_or("n/a".to_owned(), |p| format!("{p:.1}")),
                verdict(per_id.is_some_and(|p| p <= 40.0)),
            )
        }
        "sustained" => {
            let target = persist + 2.0;
            e.insert("seconds".into(), x["seconds"].clone());
            e.insert("rss_after".into(), x["rss_after"].clone());
            e.insert("target_converge_s".into(), json!(target));
            match (run, check) {
                (Some(run), Some(check)) => {
                    let converged = check["converged"].as_bool().unwrap_or(false);
                    let waited = f(&check["waited"]);
                    format!(
                        "sustained  {:>4} s  {:>9.0} items/s  {} x 503, {} errors  converged {} s after the last ack \
                         (sweep {:.2} s; target <= {target:.0} s: {})  RSS {:.0} MiB  {check_text}",
                        u(&x["seconds"]),
                        f(&run["items_per_s"]),
                        http_503.unwrap_or(0),
                        u(&run["errors"]),
                        if converged { format!("{waited:.2}") } else { format!("NOT within {waited:.0}") },
                        f(&check["sweep_s"]),
                        verdict(converged && waited <= target),
                        mib(&x["rss_after"]),
                    )
                }
                _ => {
                    format!("sustained  {:>4} s  the load run failed (status {})", u(&x["seconds"]), record.load_status)
                }
            }
        }
        _ => {
            let n = x["tenants"].as_u64().unwrap_or(0);
            let target = persist + if n <= 100_000 { 3.0 } else { 15.0 };
            let last_ack = run.and_then(|r| r["last_ack_unix_ms"].as_f64()).filter(|&ms| ms > 0.0);
            let server_s = x["newest_ctime"].as_f64().zip(last_ack).map(|(ctime, ms)| ctime - ms / 1000.0);
            let per_tenant = x["du_kib"].as_f64().map(|kib| kib / n as f64);
            e.insert("tenants".into(), json!(n));
            e.insert("target_converge_s".into(), json!(target));
            e.insert("server_converge_s".into(), json!(server_s));
            e.insert("tenant_files".into(), x["files"].clone());
            e.insert("du_kib".into(), x["du_kib"].clone());
            e.insert("kib_per_tenant".into(), json!(per_tenant));
            e.insert("target_kib_per_tenant".into(), json!(4.5));
            match (run, check) {
                (Some(_), Some(check)) => {
                    let converged = check["converged"].as_bool().unwrap_or(false);
                    let waited = f(&check["waited"]);
                    let client = if converged {
                        let sample = check["sample_s"].as_f64().map_or("n/a".to_owned(), |s| format!("{s:.2}"));
                        format!("sample {sample} s, all {waited:.2} s (sweep {:.2} s)", f(&check["sweep_s"]))
                    } else {
                        format!("NOT within {waited:.0} s")
                    };
                    // The files say when the last tenant became readable; the client's figure
                    // adds the time it takes to read a count of every tenant.
                    let converged_s = server_s.unwrap_or(waited);
                    format!(
                        "tenants    {n:>8}  converged after the last ack: files {}, client {client} (target <= \
                         {target:.0} s: {})  {} tenant files (target {n}: {}), {} KiB/tenant (target <= 4.5: {})  \
                         {check_text}",
                        server_s.map_or("n/a".to_owned(), |s| format!("{s:.2} s")),
                        verdict(converged && converged_s <= target),
                        x["files"].as_u64().map_or("n/a".to_owned(), |f| f.to_string()),
                        verdict(x["files"].as_u64() == Some(n)),
                        per_tenant.map_or("n/a".to_owned(), |p| format!("{p:.2}")),
                        verdict(per_tenant.is_some_and(|p| p <= 4.5)),
                    )
                }
                _ => format!("tenants    {n:>8}  the load run failed (status {})", record.load_status),
            }
        }
    };
    (entry, line)
}

/// The workers' resident memory, summed, in bytes.
fn workers_rss(cluster: &BenchCluster) -> u64 {
    cluster.worker_pids().into_iter().map(crate::measure::resident_bytes).sum()
}

/// What the tenants' files under `db/shards` hold on disk.
struct TenantFiles {
    /// Every `*.json` file but the shards' records (`SHARD.json`).
    files: u64,
    /// The newest of those files' ctimes, in seconds since the epoch.
    newest_ctime: Option<f64>,
    /// Disk blocks of everything under `db/shards`, files and directories, in bytes, as `du`.
    disk_bytes: u64,
}

impl TenantFiles {
    /// The tenant files under `shards`, or `None` if there is no such directory.
    fn of(shards: &Path) -> Option<TenantFiles> {
        let mut found = TenantFiles { files: 0, newest_ctime: None, disk_bytes: 0 };
        let mut dirs = vec![shards.to_owned()];
        found.disk_bytes += fs::symlink_metadata(shards).ok()?.blocks() * 512;
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                found.disk_bytes += meta.blocks() * 512;
                if meta.is_dir() {
                    dirs.push(entry.path());
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.ends_with(".json") && name != "SHARD.json" {
                    found.files += 1;
                    let ctime = meta.ctime() as f64 + meta.ctime_nsec() as f64 / 1e9;
                    found.newest_ctime = Some(found.newest_ctime.map_or(ctime, |n: f64| n.max(ctime)));
                }
            }
        }
        Some(found)
    }
}
