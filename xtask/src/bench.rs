//! `make bench`: the load tool against freshly started systems, with Redis measured in the same
//! run. Starts redis-server (AOF, appendfsync everysec), then, `--rounds` times, a fresh
//! coordinator with four workers (fsync everysec) in a temporary directory on free loopback
//! ports, and measures in each round:
//!   1. POST through the coordinator, and the same stream as pipelined SADD into Redis;
//!   2. POST straight to one worker, with the whole machine's busy CPU per request: what a POST
//!      costs the load tool, the worker and the merging together, which a hop's CPU adds to;
//!   3. GET counts through the coordinator, and straight to one worker;
//!   4. POST and GET counts through HAProxy in front of the same four workers: the reference for
//!      what a hop costs on this machine (an HTTP proxy in C, keep-alive to the workers), with
//!      its CPU per request measured as the coordinator's is.
//!
//! Then against Redis and against Valkey (`VALKEY_SERVER`, which `make bench` sets), as many runs
//! as rounds, each on an empty server, their medians in the summary:
//!   5. redis-benchmark -t sadd -P 100 -c 16: what the server itself takes, the reference for
//!      ingest;
//!   6. POST through a coordinator whose workers keep the tenants in that server (store: redis),
//!      until every count converged: the ingest it settles at is what it acknowledged over the
//!      load and the convergence together, against redis-benchmark's rate;
//!   7. GET counts through that coordinator, and straight to one of its workers, against the
//!      store: json figures of step 3.
//!
//! Then, once, the reads, on a fresh cluster (store: json): strong counts idle and under a fixed
//! 1M items/s of ingest, `POST /counts` of 1,000 tenants, membership checks of 1,000 ids, and the
//! listing of a million tenants (see `reads.rs`; `--reads-only` runs them alone).
//!
//! Each run through the coordinator also reports the coordinator's CPU time per forwarded
//! request: utime+stime from /proc/<pid>/stat over the run, over the run's delta of /stats
//! cluster.requests_forwarded, and stime alone: the kernel's share, which no change to the
//! coordinator's own code removes (in target/bench/coordinator-cpu.json). A summary of the
//! ratios the README's performance targets name (see its Benchmarks) ends the output: each round's, and their medians, since one run
//! on this machine varies by 10-20%. Figures go to target/bench/ (round N's in round-N/).

use std::cell::RefCell;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use countapp_testcluster::Process;
use countapp_testcluster::redis::RedisServer;
use serde_json::{Map, Value, json};

use crate::is_interrupted;
use crate::measure::{machine_busy_ticks, process_ticks, round2, ticks_per_second};
use crate::stand::{BenchCluster, HaProxy, load};

mod reads;

/// Where the figures go.
const OUT: &str = "target/bench";

/// How long an AOF rewrite of Redis may take before the bench gives up.
const REWRITE: Duration = Duration::from_secs(300);

/// The knobs of `make bench`.
#[derive(clap::Args)]
pub struct Options {
    /// How long each load run sends.
    #[arg(long, env = "BENCH_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Rounds, each on a fresh cluster and an empty Redis; the summary gives their medians.
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// A `valkey-server` for the round of `store: redis` against Valkey beside Redis; none, no
    /// such round.
    #[arg(long, env = "VALKEY_SERVER")]
    valkey: Option<String>,
    /// Tenants of one id each that the reads make, then list page by page; 0 leaves the
    /// listing out. A million took 9 minutes to make and count on this project's 2-core machine
    /// (shared with a build), and 8 more to remove with their cluster.
    #[arg(long, env = "BENCH_LISTING_TENANTS", default_value_t = 1_000_000)]
    listing_tenants: u64,
    /// Connections each worker's merge spreads its pipelines over in the runs of `store: redis`
    /// (the config's `redis_merge_connections`).
    #[arg(long, env = "BENCH_REDIS_MERGE_CONNECTIONS", default_value_t = 1)]
    redis_merge_connections: u32,
    /// Only the reads, on their own fresh cluster: no rounds, and no run through Redis or HAProxy.
    #[arg(long, env = "BENCH_READS_ONLY", value_parser = clap::builder::FalseyValueParser::new())]
    reads_only: bool,
}

/// The `store: json` figures the store rounds compare with: GET counts per second through the
/// coordinator and straight to one worker, medians of the rounds.
struct JsonReference {
    coordinator: f64,
    worker: f64,
}

/// The figures of a round of `store: redis` against one server, as the summary shows them.
struct StoreFigures {
    /// The server: "redis" or "valkey".
    name: String,
    /// Each figure, the median of the runs.
    rows: Vec<(&'static str, Option<f64>)>,
    /// Each run's figures, in the order of `rows`.
    runs: Vec<Vec<Option<f64>>>,
}

/// The coordinator's CPU over one load run through it.
struct CpuFigure {
    run: String,
    cpu_us_per_request: Option<f64>,
    system_us_per_request: Option<f64>,
    json: Value,
}

/// One `make bench`, state and all.
struct Bench<'a> {
    options: &'a Options,
    redis: RedisServer,
    /// The coordinator's CPU of each run through it, in the order of the runs.
    cpu: RefCell<Vec<CpuFigure>>,
}

/// Runs `make bench`; true when every load run's check passed.
pub fn run(options: &Options) -> anyhow::Result<bool> {
    let out = Path::new(OUT);
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("emptying {OUT}"))?;
    }
    fs::create_dir_all(out)?;
    let bench = Bench { options, redis: RedisServer::start(), cpu: RefCell::default() };
    if options.reads_only {
        let reads = bench.reads()?;
        println!("=== summary of the reads (targets from the read API's issue) ===");
        let summary = json!({ "reads": show_reads(&reads) });
        fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
        return Ok(true);
    }
    for round in 1..=options.rounds {
        bench.round(round)?;
    }
    let json_get = |name: &str| -> anyhow::Result<f64> {
        let rates = (1..=options.rounds)
            .map(|r| rate(&read_json(&round_dir(r).join(format!("{name}.json")))?))
            .collect::<anyhow::Result<Vec<f64>>>()?;
        Ok(median(&rates))
    };
    let reference = JsonReference { coordinator: json_get("coordinator-count")?, worker: json_get("worker-count")? };
    let mut stores = vec![bench.store_round("redis", &bench.redis, &reference)?];
    match &options.valkey {
        Some(binary) => {
            let valkey = RedisServer::start_binary(binary, true);
            stores.push(bench.store_round("valkey", &valkey, &reference)?);
        }
        None => println!("=== no Valkey round: VALKEY_SERVER is not set (make bench sets it) ==="),
    }
    let figures: Vec<Value> = bench.cpu.borrow().iter().map(|c| c.json.clone()).collect();
    fs::write(out.join("coordinator-cpu.json"), serde_json::to_string_pretty(&figures)?)?;
    let reads = bench.reads()?;

    println!("=== summary (targets from the README's Benchmarks) ===");
    let mut summary = bench.summary(&stores)?;
    println!("=== summary of the reads, one run (targets from the read API's issue) ===");
    summary.insert("reads".into(), show_reads(&reads));
    fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(true)
}

/// Prints the reads' figures, a table of one column; the same as JSON, for summary.json.
fn show_reads(reads: &[reads::Figure]) -> Value {
    let width = reads.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, value) in reads {
        println!("{name:width$}  {:>10}", show_figure(*value));
    }
    Value::Object(reads.iter().map(|(name, value)| (name.clone(), json!(value))).collect())
}

/// Round `round`'s directory of figures.
fn round_dir(round: u32) -> PathBuf {
    Path::new(OUT).join(format!("round-{round}"))
}

impl Bench<'_> {
    /// One round on a fresh cluster and an empty Redis.
    fn round(&self, round: u32) -> anyhow::Result<()> {
        let (r, rounds) = (round_dir(round), self.options.rounds);
        fs::create_dir_all(&r)?;
        fresh(&self.redis)?;
        let mut cluster = BenchCluster::start("store: json\n");
        let (url, worker) = (cluster.url(), format!("http://127.0.0.1:{}", cluster.workers[0]));
        println!(
            "=== round {round} of {rounds}: POST through the coordinator (4 workers), and Redis SADD in the same run ==="
        );
        let mut post = self.post_args(&url, &r.join("coordinator-post.json"));
        post.extend(["--redis".into(), self.redis.url(), "--plot".into(), path_arg(&r.join("coordinator-post.svg"))]);
        self.through_coordinator(&cluster, &format!("post, round {round}"), &post)?;
        println!("=== round {round} of {rounds}: POST straight to one worker ===");
        self.measured(&r.join("worker-post.json"), None, &self.post_args(&worker, &r.join("worker-post.json")))?;
        println!("=== round {round} of {rounds}: GET counts through the coordinator ===");
        let count = self.count_args(&url, &r.join("coordinator-count.json"));
        self.through_coordinator(&cluster, &format!("count, round {round}"), &count)?;
        println!("=== round {round} of {rounds}: GET counts straight to one worker ===");
        self.load(&self.count_args(&worker, &r.join("worker-count.json")))?;
        let haproxy = HaProxy::start(cluster.path(), &cluster.workers)?;
        println!("=== round {round} of {rounds}: POST through HAProxy (the same 4 workers) ===");
        let json = r.join("haproxy-post.json");
        self.measured(&json, Some(haproxy.pid()), &self.post_args(&haproxy.url(), &json))?;
        println!("=== round {round} of {rounds}: GET counts through HAProxy ===");
        let json = r.join("haproxy-count.json");
        self.measured(&json, Some(haproxy.pid()), &self.count_args(&haproxy.url(), &json))?;
        haproxy.stop();
        cluster.stop();
        Ok(())
    }

    /// The load tool's arguments for POSTs to `url`, batches of 100 over 10 tenants, its report
    /// in `json`.
    fn post_args(&self, url: &str, json: &Path) -> Vec<String> {
        let mut args = self.common_args(url, json);
        args.extend(["--batch", "100", "--tenants", "10"].map(String::from));
        args
    }

    /// The load tool's arguments for GET counts at `url` over 10 tenants, its report in `json`.
    fn count_args(&self, url: &str, json: &Path) -> Vec<String> {
        let mut args = self.common_args(url, json);
        args.extend(["--count", "--tenants", "10"].map(String::from));
        args
    }

    fn common_args(&self, url: &str, json: &Path) -> Vec<String> {
        let mut args = load_args(url, json, "16");
        args.extend(["--duration".to_owned(), self.duration()]);
        args
    }

    /// `--duration`, as the load tool takes it.
    fn duration(&self) -> String {
        humantime::format_duration(self.options.duration).to_string()
    }

    /// Runs the load tool, failing the bench if its check failed.
    fn load(&self, args: &[String]) -> anyhow::Result<()> {
        // The load, its convergence wait (30 s at most) and a Redis reference run, with room.
        passed(args, load(args, self.options.duration * 4 + Duration::from_secs(180))?)
    }

    /// Runs the load tool through the coordinator of `cluster`, then records the coordinator's
    /// CPU per forwarded request over that run under the name `name`.
    fn through_coordinator(&self, cluster: &BenchCluster, name: &str, args: &[String]) -> anyhow::Result<()> {
        let pid = cluster.coordinator_pid();
        let (ticks0, forwarded0) = (process_ticks(pid)?, cluster.forwarded());
        self.load(args)?;
        let (ticks1, forwarded1) = (process_ticks(pid)?, cluster.forwarded());
        let hz = ticks_per_second();
        let user = (ticks1.user - ticks0.user) as f64 / hz;
        let system = (ticks1.system - ticks0.system) as f64 / hz;
        let forwarded = forwarded1 - forwarded0;
        let per_request = |seconds: f64| (forwarded > 0).then(|| round2(seconds * 1e6 / forwarded as f64));
        let figure = CpuFigure {
            run: name.to_owned(),
            cpu_us_per_request: per_request(user + system),
            system_us_per_request: per_request(system),
            json: json!({
                "run": name,
                "cpu_seconds": user + system,
                "requests_forwarded": forwarded,
                "cpu_us_per_request": per_request(user + system),
                "system_us_per_request": per_request(system),
            }),
        };
        println!("coordinator CPU: {}", figure.json);
        self.cpu.borrow_mut().push(figure);
        Ok(())
    }

    /// Runs the load tool with its report in `json`, then adds to that report the machine's busy
    /// CPU per request over the run, and the process `pid`'s (HAProxy's) if given.
    fn measured(&self, json: &Path, pid: Option<u32>, args: &[String]) -> anyhow::Result<()> {
        let process0 = pid.map(process_ticks).transpose()?;
        let machine0 = machine_busy_ticks()?;
        self.load(args)?;
        let machine1 = machine_busy_ticks()?;
        let process1 = pid.map(process_ticks).transpose()?;
        let mut report = read_json(json)?;
        let requests =
            report["run"]["requests"].as_u64().ok_or_else(|| anyhow!("{}: no run.requests", json.display()))?;
        let hz = ticks_per_second();
        let per_request = |ticks: u64| (requests > 0).then(|| round2(ticks as f64 / hz * 1e6 / requests as f64));
        let machine = per_request(machine1 - machine0);
        let object = report.as_object_mut().ok_or_else(|| anyhow!("{}: not an object", json.display()))?;
        object.insert("machine_cpu_us_per_request".into(), json!(machine));
        let mut line = format!("the machine's CPU: {} us per request", show(machine));
        if let (Some(p0), Some(p1)) = (process0, process1) {
            let process = per_request(p1.user - p0.user + p1.system - p0.system);
            object.insert("process_cpu_us_per_request".into(), json!(process));
            line.push_str(&format!(", haproxy's: {} us", show(process)));
        }
        fs::write(json, serde_json::to_string_pretty(&report)?)?;
        println!("{line}");
        Ok(())
    }

    /// `store: redis` against `server` (Redis, or Valkey, by `name`), as many runs as the rounds
    /// (see [`Bench::store_run`]): each figure's median, and every run's.
    fn store_round(&self, name: &str, server: &RedisServer, json: &JsonReference) -> anyhow::Result<StoreFigures> {
        let runs = (1..=self.options.rounds)
            .map(|run| self.store_run(name, run, server, json))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let rows = runs[0]
            .iter()
            .enumerate()
            .map(|(i, (row, _))| (*row, median_known(runs.iter().map(|run| run[i].1))))
            .collect();
        let runs = runs.into_iter().map(|run| run.into_iter().map(|(_, value)| value).collect()).collect();
        Ok(StoreFigures { name: name.to_owned(), rows, runs })
    }

    /// Run `run` of `store: redis` against `server`: what `redis-benchmark`'s pipelined `SADD`
    /// takes from it, then POST through a coordinator whose workers keep the tenants there (the
    /// load tool waits for every count to converge), and GET counts through the coordinator and
    /// straight to one worker, each on an empty server. Its figures, with their ratios to the
    /// references.
    fn store_run(
        &self,
        name: &str,
        run: u32,
        server: &RedisServer,
        json: &JsonReference,
    ) -> anyhow::Result<Vec<(&'static str, Option<f64>)>> {
        let (out, rounds) = (Path::new(OUT), self.options.rounds);
        let name_run = format!("{name}-{run}");
        fresh(server)?;
        println!("=== {name}, run {run} of {rounds}: redis-benchmark -t sadd -P 100 -c 16 -r 100000000 -n 2000000 ===");
        let line = redis_benchmark(server.port())?;
        println!("{line}");
        let sadd = line
            .split_whitespace()
            .find_map(|word| word.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("no rate in redis-benchmark's {line:?}"))?;
        fresh(server)?;
        let connections = self.options.redis_merge_connections;
        let config = format!("store: redis\nredis_url: {}\nredis_merge_connections: {connections}\n", server.url());
        let mut cluster = BenchCluster::start(&config);
        println!("=== {name}, run {run} of {rounds}: store: redis: POST through the coordinator ===");
        let post_json = out.join(format!("{name_run}-store-post.json"));
        let post_args = self.post_args(&cluster.url(), &post_json);
        self.through_coordinator(&cluster, &format!("{name_run}-store-post"), &post_args)?;
        println!("=== {name}, run {run} of {rounds}: store: redis: GET counts through the coordinator ===");
        let count_json = out.join(format!("{name_run}-store-count.json"));
        let count_args = self.count_args(&cluster.url(), &count_json);
        self.through_coordinator(&cluster, &format!("{name_run}-store-count"), &count_args)?;
        println!("=== {name}, run {run} of {rounds}: store: redis: GET counts straight to one worker ===");
        let worker_json = out.join(format!("{name_run}-store-worker-count.json"));
        let worker = format!("http://127.0.0.1:{}", cluster.workers[0]);
        self.load(&self.count_args(&worker, &worker_json))?;
        cluster.stop();
        let post = read_json(&post_json)?;
        let (items, seconds) = (post["run"]["items"].as_f64(), post["run"]["seconds"].as_f64());
        let converged = post["check"]["waited"].as_f64();
        let settled = match (items, seconds, converged) {
            (Some(items), Some(seconds), Some(converged)) => Some(items / (seconds + converged)),
            _ => None,
        };
        let (get, get_worker) = (rate(&read_json(&count_json)?)?, rate(&read_json(&worker_json)?)?);
        let figures = vec![
            ("redis-benchmark SADD/s (pipelined, 16 connections)", Some(sadd)),
            ("POST items/s acknowledged through the coordinator", post["run"]["items_per_s"].as_f64()),
            ("counts converged, s after the last ack (target <= 7)", converged),
            ("ingest settled, items/s: acknowledged / (load + convergence)", settled),
            ("ingest settled / redis-benchmark (target >= 0.9)", settled.map(|settled| settled / sadd)),
            ("GET counts/s through the coordinator", Some(get)),
            ("GET through the coordinator / store: json (target >= 0.8)", Some(get / json.coordinator)),
            ("GET counts/s straight to one worker", Some(get_worker)),
            ("GET straight to one worker / store: json", Some(get_worker / json.worker)),
        ];
        for (row, value) in &figures {
            println!("{name}, run {run}: {row}: {}", show_figure(*value));
        }
        Ok(figures)
    }

    /// Prints the summary of every round and their medians, and of the rounds of `store: redis`;
    /// the same as JSON, for summary.json.
    fn summary(&self, stores: &[StoreFigures]) -> anyhow::Result<Map<String, Value>> {
        let figures = self.cpu.borrow();
        let cpu = |run: &str| figures.iter().find(|c| c.run == run);
        let mut rounds: Vec<Vec<(&str, Option<f64>)>> = Vec::new();
        for r in 1..=self.options.rounds {
            let dir = round_dir(r);
            let report = |name: &str| read_json(&dir.join(format!("{name}.json")));
            let (cpost, wpost, ccount, wcount, hpost, hcount) = (
                report("coordinator-post")?,
                report("worker-post")?,
                report("coordinator-count")?,
                report("worker-count")?,
                report("haproxy-post")?,
                report("haproxy-count")?,
            );
            let items = |r: &Value| r["run"]["items_per_s"].as_f64();
            let requests = |r: &Value| r["run"]["requests_per_s"].as_f64();
            let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
            let redis = cpost["redis"]["items_per_s"].as_f64();
            let (post, count) = (cpu(&format!("post, round {r}")), cpu(&format!("count, round {r}")));
            rounds.push(vec![
                ("POST items/s through the coordinator", items(&cpost)),
                ("POST items/s straight to one worker", items(&wpost)),
                ("Redis SADD items/s", redis),
                ("POST coordinator/worker (target >= 0.9)", ratio(items(&cpost), items(&wpost))),
                ("POST coordinator/Redis (target >= 2)", ratio(items(&cpost), redis)),
                ("GET counts/s through the coordinator", requests(&ccount)),
                ("GET counts/s straight to one worker", requests(&wcount)),
                ("GET coordinator/worker (target >= 0.5)", ratio(requests(&ccount), requests(&wcount))),
                ("p99 ms POST through the coordinator (target <= 10)", cpost["run"]["latency_ms"]["p99"].as_f64()),
                ("p99 ms GET through the coordinator (target <= 5)", ccount["run"]["latency_ms"]["p99"].as_f64()),
                ("coordinator CPU us per POST (target <= 15)", post.and_then(|c| c.cpu_us_per_request)),
                ("coordinator CPU us per GET (target <= 15)", count.and_then(|c| c.cpu_us_per_request)),
                ("  of which in the kernel, per POST", post.and_then(|c| c.system_us_per_request)),
                ("  of which in the kernel, per GET", count.and_then(|c| c.system_us_per_request)),
                ("machine CPU us per POST straight to one worker", wpost["machine_cpu_us_per_request"].as_f64()),
                ("POST HAProxy/worker (reference)", ratio(items(&hpost), items(&wpost))),
                ("GET HAProxy/worker (reference)", ratio(requests(&hcount), requests(&wcount))),
                ("HAProxy CPU us per POST (reference)", hpost["process_cpu_us_per_request"].as_f64()),
                ("HAProxy CPU us per GET (reference)", hcount["process_cpu_us_per_request"].as_f64()),
            ]);
        }
        let width = rounds[0].iter().map(|(name, _)| name.len()).max().unwrap_or(0);
        let mut header = format!("{:width$}  ", "");
        for r in 1..=self.options.rounds {
            header.push_str(&format!("{:>10}  ", format!("round {r}")));
        }
        println!("{header}{:>10}", "median");
        let mut medians = Map::new();
        for (i, (name, _)) in rounds[0].iter().enumerate() {
            let values: Vec<Option<f64>> = rounds.iter().map(|round| round[i].1).collect();
            let middle = median_known(values.iter().copied());
            let mut line = format!("{name:width$}  ");
            for value in &values {
                line.push_str(&format!("{:>10}  ", show_figure(*value)));
            }
            println!("{line}{:>10}", show_figure(middle));
            medians.insert((*name).to_owned(), json!(middle));
        }
        let rounds: Vec<Value> = rounds
            .iter()
            .map(|round| Value::Object(round.iter().map(|(name, value)| ((*name).to_owned(), json!(value))).collect()))
            .collect();
        let (mut by_store, mut runs_by_store) = (Map::new(), Map::new());
        for store in stores {
            println!("store: redis against {}: each run, and their median", store.name);
            for (i, (row, value)) in store.rows.iter().enumerate() {
                let runs: String = store.runs.iter().map(|run| format!("{:>10}  ", show_figure(run[i]))).collect();
                println!("  {row:width$}{runs}{:>10}", show_figure(*value), width = width - 2);
            }
            let rows = store.rows.iter().map(|(row, value)| ((*row).to_owned(), json!(value))).collect();
            by_store.insert(store.name.clone(), Value::Object(rows));
            let runs = store
                .runs
                .iter()
                .map(|run| {
                    Value::Object(
                        store.rows.iter().zip(run).map(|((row, _), v)| ((*row).to_owned(), json!(v))).collect(),
                    )
                })
                .collect();
            runs_by_store.insert(store.name.clone(), Value::Array(runs));
        }
        let summary = Map::from_iter([
            ("rounds".to_owned(), Value::Array(rounds)),
            ("median".to_owned(), medians.into()),
            ("store_redis".to_owned(), by_store.into()),
            ("store_redis_runs".to_owned(), runs_by_store.into()),
        ]);
        let redis: Vec<String> = figures
            .iter()
            .filter(|c| c.run.contains("-store-"))
            .map(|c| format!("{} {}", c.run, show(c.cpu_us_per_request)))
            .collect();
        println!("store: redis, coordinator CPU us per forwarded request: {}", redis.join(", "));
        Ok(summary)
    }
}

/// Empties `server` and rewrites its AOF, so that each measurement starts from the same Redis:
/// one left with a round's 20M ids rewrites its AOF (a fork and a full copy) during the next.
fn fresh(server: &RedisServer) -> anyhow::Result<()> {
    server.cli(&["flushall"]);
    server.cli(&["bgrewriteaof"]);
    let deadline = Instant::now() + REWRITE;
    loop {
        let info = server.cli(&["info", "persistence"]);
        let idle = ["aof_rewrite_in_progress:0", "aof_rewrite_scheduled:0"];
        if idle.iter().all(|want| info.lines().any(|l| l.trim() == *want)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{} still rewriting its AOF after {REWRITE:?}", server.url());
        }
        if is_interrupted() {
            bail!("interrupted");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// `redis-benchmark -t sadd -P 100 -c 16 -r 100000000 -n 2000000` against the Redis on `port`:
/// its last line of requests per second.
fn redis_benchmark(port: u16) -> anyhow::Result<String> {
    let mut command = Command::new("redis-benchmark");
    command.arg("-p").arg(port.to_string()).args([
        "-t",
        "sadd",
        "-P",
        "100",
        "-c",
        "16",
        "-r",
        "100000000",
        "-n",
        "2000000",
        "-q",
    ]);
    let (mut process, mut pipes) = Process::spawn_piped(command, "redis-benchmark");
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = pipes.stdout.read_to_string(&mut text);
        text
    });
    let status = process
        .wait_for_exit(Duration::from_secs(600))
        .ok_or_else(|| anyhow!("redis-benchmark still running after 10 minutes"))?;
    let text = reader.join().map_err(|_| anyhow!("reading redis-benchmark's output"))?;
    if !status.success() {
        bail!("redis-benchmark: {status}");
    }
    // It redraws its progress with carriage returns: the figure is the last line that has one.
    let line = text.split(['\r', '\n']).rfind(|l| l.contains("requests per second"));
    Ok(line.unwrap_or_default().trim().to_owned())
}

/// Fails the bench unless the load tool run with `args` ended with `status` 0: its check passed.
fn passed(args: &[String], status: ExitStatus) -> anyhow::Result<()> {
    if !status.success() {
        bail!("countapp-load {}: {status}", args.join(" "));
    }
    Ok(())
}

/// The report of a load run.
fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A count run's requests per second.
fn rate(report: &Value) -> anyhow::Result<f64> {
    report["run"]["requests_per_s"].as_f64().ok_or_else(|| anyhow!("a report without run.requests_per_s"))
}

/// The median of the `values` known; `None` if none is.
fn median_known(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let known: Vec<f64> = values.into_iter().flatten().collect();
    (!known.is_empty()).then(|| median(&known))
}

/// The median of `values` (the mean of the two middle ones for an even number), none empty.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

/// `value` with no decimals and commas between thousands, as 1,780,000.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut grouped = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if value < 0.0 { format!("-{grouped}") } else { grouped }
}

/// A figure of the summary: a rate in thousands, a ratio or a time with two decimals.
fn show_figure(value: Option<f64>) -> String {
    match value {
        Some(v) if v >= 1000.0 => thousands(v),
        Some(v) => format!("{v:.2}"),
        None => "n/a".to_owned(),
    }
}

/// A CPU figure as the reports give it, `n/a` where there was no request.
fn show(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| v.to_string())
}

/// The load tool's arguments for a quiet run at `url` over `connections` connections, its report
/// in `json`.
fn load_args(url: &str, json: &Path, connections: &str) -> Vec<String> {
    let mut args: Vec<String> = ["--url", url, "--connections", connections, "--quiet"].map(String::from).into();
    args.extend(["--json".to_owned(), path_arg(json)]);
    args
}

/// A path as the load tool's argument.
fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
