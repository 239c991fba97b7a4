//! `make bench`'s reads, once, on a fresh cluster (store: json, four workers), against the
//! read API's targets:
//!   1. strong counts of 1,000 tenants of 1,000 ids each, idle: one connection (latency), then 16
//!      (rate);
//!   2. `POST /counts` of the same 1,000 tenants, eventual and strong, 16 connections: tenant
//!      counts/s, of the requests answered 200 (a 503 is the workers' push-back);
//!   3. membership checks of 1,000 ids each, eventual and strong, 16 connections, over 16 tenants
//!      of their own: ids/s (1% of the requests are batches of 1,000 ids, which give the checks
//!      ids to ask about);
//!   4. strong counts on one connection while a second load tool posts through the coordinator
//!      at a fixed 1M items/s (batches of 100 over 10 tenants, 16 connections), last but the
//!      listing, so that the merges it leaves behind slow none of the idle reads: the counts'
//!      p99, and the ingest rate the machine reached beside them;
//!   5. `--listing-tenants` tenants of one id each, posted through the coordinator and waited for
//!      by the load tool's own check, then `GET /tenants?limit=1000` paged through to the end:
//!      each page's latency, timed here.
//!
//! Each load run checks every answer (the load tool's `--mix`), and the listing must hold every
//! tenant made for it, each with its one id. The reports go to target/bench/reads/.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use countapp_shared::api::Tenants;
use countapp_testcluster::{client, percent_encoded};
use serde_json::Value;

use super::{Bench, OUT, load_args, passed, read_json, thousands};
use crate::is_interrupted;
use crate::stand::{BenchCluster, finish_load, load, start_load};

/// The tenants that the counts and `POST /counts` read, and the ids posted to each first.
const TENANTS: u64 = 1000;
const IDS_PER_TENANT: u64 = 1000;
/// Their names: this prefix and 0 to 999.
const PREFIX: &str = "reads-";
/// The names of the listing's tenants: this prefix and a number.
const LISTED: &str = "listed-";
/// Tenants one `POST /counts` asks for, ids one membership check asks about, tenants one listing
/// page holds.
const PER_REQUEST: u64 = 1000;
/// The ingest rate that the strong counts beside it are measured under, items per second.
const INGEST_RATE: u64 = 1_000_000;
/// How long the ingest runs before the strong counts beside it start, and after they end.
const INGEST_LEAD: Duration = Duration::from_secs(2);
/// How long the listing's tenants may take to be counted, every one of them.
const LISTING_CONVERGE: &str = "300s";
/// How long the load run that makes the listing's tenants may take: reading the counts before
/// it, posting, and the convergence wait.
const LISTING_SETUP: Duration = Duration::from_secs(900);

/// One figure of the reads: its name, with its target, and its value.
pub type Figure = (String, Option<f64>);

impl Bench<'_> {
    /// Runs the reads on a fresh cluster; their figures, for the summary.
    pub(super) fn reads(&self) -> anyhow::Result<Vec<Figure>> {
        let dir = Path::new(OUT).join("reads");
        fs::create_dir_all(&dir)?;
        let cluster = BenchCluster::start("store: json\n");
        let url = cluster.url();
        let json = |name: &str| dir.join(format!("{name}.json"));
        let (tenants, per_request) = (TENANTS.to_string(), PER_REQUEST.to_string());
        let ours = ["--tenants", &tenants, "--tenant-prefix", PREFIX];

        println!("=== reads: {tenants} tenants of {IDS_PER_TENANT} ids each, posted through the coordinator ===");
        let mut seed = load_args(&url, &json("seed"), "16");
        let items = (TENANTS * IDS_PER_TENANT).to_string();
        seed.extend(ours.iter().chain(&["--items", &items, "--batch", "1000"]).map(|a| (*a).to_owned()));
        self.load(&seed)?;

        for connections in ["1", "16"] {
            println!("=== reads: strong counts, idle, {connections} connection(s) ===");
            let json = json(&format!("strong-{connections}"));
            self.load(&self.mix_args(&url, &json, connections, "strong=1", &ours))?;
        }

        for consistency in ["eventual", "strong"] {
            println!("=== reads: {consistency} POST /counts of {tenants} tenants, 16 connections ===");
            let extra = [&ours[..], &["--counts-tenants", &per_request, "--consistency", consistency]].concat();
            self.load(&self.mix_args(&url, &json(&format!("counts-{consistency}")), "16", "counts=1", &extra))?;
            println!("=== reads: {consistency} membership checks of {per_request} ids, 16 connections ===");
            let extra =
                ["--tenants", "16", "--batch", "1000", "--contains-ids", &per_request, "--consistency", consistency];
            self.load(&self.mix_args(&url, &json(&format!("contains-{consistency}")), "16", "contains=0.99", &extra))?;
        }

        println!(
            "=== reads: strong counts, 1 connection, while another load tool posts at {} items/s ===",
            thousands(INGEST_RATE as f64)
        );
        let mut ingest = load_args(&url, &json("ingest"), "16");
        let (rate, ingest_for) =
            (INGEST_RATE.to_string(), humantime::format_duration(self.options.duration + INGEST_LEAD * 2).to_string());
        ingest.extend(
            ["--tenants", "10", "--batch", "100", "--rate", &rate, "--duration", &ingest_for].map(String::from),
        );
        let ingesting = start_load(&ingest);
        thread::sleep(INGEST_LEAD);
        let strong = self.load(&self.mix_args(&url, &json("strong-under-ingest"), "1", "strong=1", &ours));
        let ingested = finish_load(ingesting, self.options.duration * 4 + Duration::from_secs(180));
        strong?;
        passed(&ingest, ingested?)?;

        let pages = match self.options.listing_tenants {
            0 => Vec::new(),
            tenants => listing(&url, tenants, &json("listing-tenants"))?,
        };
        drop(cluster);
        figures(&dir, self.options.listing_tenants, &pages)
    }

    /// The load tool's arguments for a `--mix` run of `mix` at `url` over `connections`
    /// connections, for `--duration`, its report in `json`, with `extra`.
    fn mix_args(&self, url: &str, json: &Path, connections: &str, mix: &str, extra: &[&str]) -> Vec<String> {
        let mut args = load_args(url, json, connections);
        args.extend(["--duration".to_owned(), self.duration(), "--mix".to_owned(), mix.to_owned()]);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }
}

/// Makes `tenants` tenants of one id each through the coordinator at `url`, its report in
/// `json`, waits for every one to be counted, then pages through `GET /tenants?limit=1000` to the
/// end: each page's latency in milliseconds.
fn listing(url: &str, tenants: u64, json: &Path) -> anyhow::Result<Vec<f64>> {
    println!("=== reads: {} tenants of one id each, posted through the coordinator ===", thousands(tenants as f64));
    let n = tenants.to_string();
    let mut args = load_args(url, json, "16");
    // --items alone ends the run; a sample of the tenants is waited for before all of them.
    let more = ["--tenants", &n, "--items", &n, "--batch", "1000", "--tenant-prefix", LISTED, "--check-sample", "1000"];
    args.extend(more.iter().chain(&["--converge-timeout", LISTING_CONVERGE]).map(|a| (*a).to_owned()));
    passed(&args, load(&args, LISTING_SETUP)?)?;

    println!("=== reads: GET /tenants?limit={PER_REQUEST}, paged through to the end ===");
    let http = client();
    let (mut pages, mut listed, mut after) = (Vec::new(), 0u64, String::new());
    loop {
        if is_interrupted() {
            bail!("interrupted");
        }
        let page_url = format!("{url}/tenants?limit={PER_REQUEST}&after={}", percent_encoded(&after));
        let start = Instant::now();
        let reply = http.get(&page_url).send().and_then(|reply| reply.error_for_status()?.bytes());
        pages.push(start.elapsed().as_secs_f64() * 1000.0);
        let reply = reply.with_context(|| format!("GET {page_url}"))?;
        let page: Tenants =
            serde_json::from_slice(&reply).with_context(|| format!("GET {page_url}: not a page of tenants"))?;
        for tenant in page.tenants.iter().filter(|t| t.tenant.starts_with(LISTED)) {
            ensure!(tenant.count == 1, "the listing counts {} ids in {}, not 1", tenant.count, tenant.tenant);
            listed += 1;
        }
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    ensure!(listed == tenants, "the listing holds {listed} of the {tenants} tenants made for it");
    println!("{} pages, {} tenants of one id each listed", pages.len(), thousands(listed as f64));
    Ok(pages)
}

/// The reads' figures, from their reports in `dir` and the latencies of the listing's `pages`
/// through `listing_tenants` tenants.
fn figures(dir: &Path, listing_tenants: u64, pages: &[f64]) -> anyhow::Result<Vec<Figure>> {
    let report = |name: &str| read_json(&dir.join(format!("{name}.json")));
    let of = |report: &Value, kind: &str, field: &str| report["run"]["operations"][kind].pointer(field)?.as_f64();
    // Requests answered 200 a second: a 503 (the workers' push-back) answered nothing.
    let rate = |report: &Value, kind: &str| {
        Some((of(report, kind, "/requests")? - of(report, kind, "/errors")?) / of(report, kind, "/seconds")?)
    };
    let failed = |report: &Value, kind: &str| of(report, kind, "/errors");
    let p = |report: &Value, kind: &str, which: &str| of(report, kind, &format!("/latency_ms/{which}"));
    let times_per_request = |value: Option<f64>| value.map(|v| v * PER_REQUEST as f64);
    let (strong1, strong16, under) = (report("strong-1")?, report("strong-16")?, report("strong-under-ingest")?);
    let mut figures: Vec<Figure> = vec![
        ("strong count, idle, 1 connection: p50 ms".into(), p(&strong1, "strong", "p50")),
        ("strong count, idle, 1 connection: p99 ms (target <= 50)".into(), p(&strong1, "strong", "p99")),
        ("strong count, idle, 1 connection: counts/s".into(), rate(&strong1, "strong")),
        ("strong counts/s, idle, 16 connections (target >= 2,000)".into(), rate(&strong16, "strong")),
        ("strong count, idle, 16 connections: p99 ms".into(), p(&strong16, "strong", "p99")),
        ("strong count under ingest, 1 connection: p99 ms (target <= 250)".into(), p(&under, "strong", "p99")),
        (
            format!("  ingest beside it, items/s (asked: {})", thousands(INGEST_RATE as f64)),
            report("ingest")?["run"]["items_per_s"].as_f64(),
        ),
    ];
    for consistency in ["eventual", "strong"] {
        let (counts, contains) =
            (report(&format!("counts-{consistency}"))?, report(&format!("contains-{consistency}"))?);
        figures.extend([
            (
                format!("{consistency} POST /counts of 1,000 tenants: tenant counts/s (target >= 500,000)"),
                times_per_request(rate(&counts, "counts")),
            ),
            (format!("{consistency} POST /counts of 1,000 tenants: p99 ms"), p(&counts, "counts", "p99")),
            (format!("{consistency} POST /counts of 1,000 tenants: requests failed"), failed(&counts, "counts")),
            (
                format!("{consistency} membership of 1,000 ids: ids/s (target >= 1,000,000)"),
                times_per_request(rate(&contains, "contains")),
            ),
            (format!("{consistency} membership of 1,000 ids: p99 ms"), p(&contains, "contains", "p99")),
            (format!("{consistency} membership of 1,000 ids: requests failed"), failed(&contains, "contains")),
        ]);
    }
    if !pages.is_empty() {
        let tenants = thousands(listing_tenants as f64);
        figures.extend([
            (format!("listing page of 1,000 of {tenants} tenants: p50 ms"), Some(percentile(pages, 0.5))),
            (
                format!("listing page of 1,000 of {tenants} tenants: p99 ms (target <= 20)"),
                Some(percentile(pages, 0.99)),
            ),
            (format!("listing of {tenants} tenants: pages read"), Some(pages.len() as f64)),
        ]);
    }
    Ok(figures)
}

/// The `q` quantile (0 to 1) of `values`, none empty, by nearest rank.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
