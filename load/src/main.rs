//! `countapp-load`: load for a CountApp cluster, and a check that it lost nothing.
//!
//! A run posts generated batches (or, with `--count`, reads counts; with `--mix`, mixes reads,
//! strong unless `--consistency` says otherwise, and deletes into the batches) over keep-alive
//! connections, measures throughput and latency, waits for the counts to converge and reports
//! lost and unexpected items; with `--redis` it then sends the same stream to Redis for a
//! reference figure. `--help` lists every flag; the exit status says whether the check passed.

mod check;
mod cli;
mod drive;
mod http;
mod mix;
mod plot;
mod progress;
mod redis;
mod report;
mod stats;
mod workload;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Parser;

use crate::check::{Convergence, Ledger, Tally};
use crate::cli::Args;
use crate::drive::{Op, Plan, Shared, drive};
use crate::http::{Connection, CountOp, CountReader, OnFailure, PostOp, Target};
use crate::mix::{Board, Mix, MixFindings, MixOp};
use crate::progress::Progress;
use crate::redis::{RedisOp, RedisTarget};
use crate::report::{Figures, Mode, Report};
use crate::stats::RunStats;
use crate::workload::{Generator, Shape, marker_tenant};

/// The pause between two sweeps over the counts while waiting for them to converge.
const CONVERGE_POLL: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match args.threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        threads => {
            tokio::runtime::Builder::new_multi_thread().worker_threads(usize::from(threads)).enable_all().build()
        }
    };
    let outcome = runtime.context("starting the async runtime").and_then(|runtime| runtime.block_on(run(args)));
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("countapp-load: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs what `args` ask for and reports it; true when the loss check passed or was skipped.
async fn run(args: Args) -> anyhow::Result<bool> {
    let prefix = args.tenant_prefix.clone().unwrap_or_else(|| format!("load-{:08x}-", rand::random::<u32>()));
    let tenants = workload::tenant_names(&prefix, args.tenants as usize);
    let target = Arc::new(Target::resolve(&args.url, &tenants).await?);
    let mode = match (args.count, args.mix) {
        (true, _) => Mode::Count,
        (false, Some(_)) => Mode::Mix,
        (false, None) => Mode::Post,
    };
    let per_request = if args.count { 1 } else { u64::from(args.batch) };
    // --rate counts items (requests with --count); the schedule is of requests.
    let rate = args.rate.map(|rate| rate / per_request as f64);
    let plan = Plan { duration: args.send_for(), units: args.items, per_request, rate };
    let measured = match mode {
        Mode::Post => post(&args, &target, &prefix, &tenants, plan).await?,
        Mode::Count => count(&args, &target, plan).await?,
        Mode::Mix => mixed(&args, &target, &tenants, plan, args.mix.expect("the mode says so")).await?,
    };
    let report = Report {
        mode,
        url: args.url.to_string(),
        connections: args.connections,
        batch: args.batch,
        tenants: args.tenants,
        tenant_prefix: prefix,
        repeat: args.repeat,
        id_bytes: args.id_bytes,
        rate: args.rate,
        ratio: measured.redis.as_ref().map(|redis| measured.run.items_per_s / redis.items_per_s),
        run: measured.run,
        redis: measured.redis,
        check: measured.check,
        mix: measured.mix,
    };

    print!("{}", report.table());
    if let Some(path) = &args.json {
        let json = serde_json::to_vec_pretty(&report).expect("the report serializes");
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        plot::draw(&report, path).with_context(|| format!("drawing {}", path.display()))?;
    }
    // A mix of reads alone posts no batch: only its answers are to be checked.
    let posts = args.mix.is_none_or(|mix| mix.share("batch") > 1e-9);
    if posts && report.run.items == 0 {
        bail!("nothing was acknowledged: {} of {} requests failed", report.run.errors, report.run.requests);
    }
    let checked = report.check.as_ref().is_none_or(|check| {
        let v = &check.verdict;
        if let Some(lost) = v.batches_lost.filter(|&lost| lost > 0) {
            eprintln!("LOST {lost} acknowledged batches: {}", report::lost_batches(v));
        }
        if v.lost > 0 {
            // With markers, the ids of unacknowledged batches the server applied must count too.
            let which = if v.expected.is_some() { "applied" } else { "acknowledged" };
            eprintln!("LOST {} {which} items ({} of {} tenants short)", v.lost, v.tenants_short, args.tenants);
        }
        if let Some(over) = v.batches_over.filter(|&over| over > 0) {
            eprintln!("UNEXPECTED: {over} batch markers count more than their one id");
        }
        if v.unexpected > 0 {
            eprintln!(
                "UNEXPECTED {} items counted but never sent ({} of {} tenants over)",
                v.unexpected, v.tenants_over, args.tenants
            );
        }
        v.passed()
    });
    let mixed_passed = report.mix.as_ref().is_none_or(|mix| {
        if mix.wrong_answers > 0 {
            eprintln!("WRONG: {} answers broke the API's promise: {}", mix.wrong_answers, mix.wrong.join("; "));
        }
        if let Some(m) = mix.membership.as_ref().filter(|m| !m.passed()) {
            eprintln!(
                "DELETES: {} ids acknowledged before a delete are still there, {} acknowledged since are missing",
                m.gone_found, m.kept_missing
            );
        }
        mix.passed()
    });
    Ok(checked && mixed_passed)
}

/// What the modes measured, for the report.
struct Measured {
    run: Figures,
    redis: Option<Figures>,
    check: Option<Convergence>,
    mix: Option<MixFindings>,
}

/// The default mode: post batches, check the counts, then the Redis reference run.
async fn post(
    args: &Args,
    target: &Arc<Target>,
    prefix: &str,
    tenants: &[String],
    plan: Plan,
) -> anyhow::Result<Measured> {
    // Both before the load, so that a wrong URL fails at once rather than after it.
    let redis = match &args.redis {
        Some(url) => Some(RedisTarget::connect(url, tenants, args.timeout).await?),
        None => None,
    };
    let mut reader = CountReader::new(target.clone(), args.timeout, args.check_connections as usize);
    let baselines =
        if args.no_check { Vec::new() } else { reader.all().await.context("reading the counts before the load")? };

    let connections = args.connections as usize;
    let shape = Shape::new(args.id_bytes.into(), connections, tenants.len(), args.repeat);
    let markers = args.exact.then(|| shape.marker_prefix(prefix));
    let ops = (0..connections)
        .map(|c| {
            let connection = Connection::new(target.clone(), args.timeout);
            PostOp::new(connection, Generator::new(&shape, c), markers.clone())
        })
        .collect();
    let (ops, stats) = measured("countapp", "items", ops, plan, args.quiet).await?;

    let mut check = None;
    if let (false, Some(load_end)) = (args.no_check, stats.totals.last_ack) {
        let mut ledger = Ledger { tallies: vec![Tally::default(); tenants.len()], ..Ledger::default() };
        for op in &ops {
            op.generator().add_to(&mut ledger, markers.is_some());
        }
        drop(ops);
        // The markers are read as tenants after the run's own, by a reader of their own.
        let mut with_markers;
        let reader = match &markers {
            None => &mut reader,
            Some(marker_prefix) => {
                let markers = ledger.markers.iter().map(|marker| marker_tenant(marker_prefix, marker.batch));
                let names: Vec<String> = tenants.iter().cloned().chain(markers).collect();
                let target = Arc::new(Target::resolve(&args.url, &names).await?);
                with_markers = CountReader::new(target, args.timeout, args.check_connections as usize);
                &mut with_markers
            }
        };
        let load_end = tokio::time::Instant::from_std(load_end);
        check = Some(converge(args, reader, &baselines, &ledger, load_end).await?);
    }

    let mut redis_figures = None;
    if let Some(redis) = redis {
        let shape = Shape::new(args.id_bytes.into(), connections, tenants.len(), args.repeat);
        let ops = (0..connections).map(|c| RedisOp::new(redis.clone(), Generator::new(&shape, c))).collect();
        let (_, redis_stats) = measured("redis", "items", ops, plan, args.quiet).await?;
        redis.remove_keys().await?;
        redis_figures = Some(Figures::of(&redis_stats));
    }
    Ok(Measured { run: Figures::of(&stats), redis: redis_figures, check, mix: None })
}

/// `--mix`: batches with reads (strong unless `--consistency` says otherwise) and deletes among
/// them, each answer checked as it comes, then the set check across the deletes and a membership
/// check of the ids around them.
async fn mixed(
    args: &Args,
    target: &Arc<Target>,
    tenants: &[String],
    plan: Plan,
    mix: Mix,
) -> anyhow::Result<Measured> {
    let mut reader = CountReader::new(target.clone(), args.timeout, args.check_connections as usize);
    // The counts before the load are where the reads' floors and ceilings start, check or not.
    let mut baselines = reader.all().await.context("reading the counts before the load")?;
    let board = Arc::new(Board::new(&baselines, mix.delete > 0.0));
    let connections = args.connections as usize;
    let shape = Shape::new(args.id_bytes.into(), connections, tenants.len(), args.repeat);
    let ops = (0..connections)
        .map(|c| {
            let generator = Generator::new(&shape, c).with_deletes(board.deletes().clone());
            let post = PostOp::new(Connection::new(target.clone(), args.timeout), generator, None);
            MixOp::new(post, board.clone(), mix, args.reads())
        })
        .collect();
    let (mut ops, stats) = measured("countapp", "items", ops, plan, args.quiet).await?;
    let (wrong_answers, wrong) = board.wrong_answers();
    let mut findings = MixFindings { shares: mix, reads: args.reads(), wrong_answers, wrong, membership: None };

    let mut check = None;
    if let (false, Some(load_end)) = (args.no_check, stats.totals.last_ack) {
        let mut ledger = Ledger { tallies: vec![Tally::default(); tenants.len()], ..Ledger::default() };
        for op in &ops {
            op.generator().add_to(&mut ledger, false);
        }
        mix::settle(&mut baselines, &mut ledger, board.deletes());
        let load_end = tokio::time::Instant::from_std(load_end);
        let mut convergence = converge(args, &mut reader, &baselines, &ledger, load_end).await?;
        // A delete that failed may or may not have taken its tenant's ids: counts only bound them.
        let delete_failed = stats.operations.iter().any(|(name, s)| *name == "delete" && s.totals.error_count() > 0);
        convergence.verdict.exact &= !delete_failed;
        check = Some(convergence);
        let connection = Connection::new(target.clone(), args.timeout);
        let membership = mix::check_membership(connection, &mut ops, board.deletes()).await;
        findings.membership = Some(membership.context("asking about the ids around the deletes")?);
    }
    let mut run = Figures::of(&stats);
    // The kinds left out of the mix would only show as rows of zeros.
    run.operations.retain(|name, _| mix.share(name) > 0.0);
    Ok(Measured { run, redis: None, check, mix: Some(findings) })
}

/// Waits for the counts to include every acknowledged item, and judges them.
async fn converge(
    args: &Args,
    reader: &mut CountReader,
    baselines: &[u64],
    ledger: &Ledger,
    load_end: tokio::time::Instant,
) -> anyhow::Result<Convergence> {
    let markers =
        if ledger.markers.is_empty() { String::new() } else { format!(" and {} batch markers", ledger.markers.len()) };
    eprintln!(
        "waiting up to {} for the counts of {} tenants{markers} to converge ({} connections)...",
        humantime::format_duration(args.converge_timeout),
        ledger.tallies.len(),
        args.check_connections
    );
    check::await_convergence(
        baselines,
        ledger,
        load_end,
        args.converge_timeout,
        CONVERGE_POLL,
        args.check_sample.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        async |tenants: &[usize]| reader.sweep(tenants, OnFailure::Skip).await,
    )
    .await
}

/// `--count`: seed every tenant with one batch, then read counts.
async fn count(args: &Args, target: &Arc<Target>, plan: Plan) -> anyhow::Result<Measured> {
    let shape = Shape::new(args.id_bytes.into(), 1, target.tenants(), 0.0);
    let mut seeder = PostOp::new(Connection::new(target.clone(), args.timeout), Generator::new(&shape, 0), None);
    // Items go round-robin over the tenants, so as many batches as tenants give each one batch.
    let batch = u64::from(args.batch);
    for b in 0..target.tenants() as u64 {
        seeder.prepare(b * batch, batch).await?;
        seeder.send().await.map_err(|failure| anyhow!("seeding the tenants: POST /items: {failure}"))?;
    }
    let ops = (0..args.connections).map(|_| CountOp::new(Connection::new(target.clone(), args.timeout))).collect();
    let (_, stats) = measured("counts", "requests", ops, plan, args.quiet).await?;
    Ok(Measured { run: Figures::of(&stats), redis: None, check: None, mix: None })
}

/// Drives `ops` through `plan` under a progress bar.
async fn measured<O: Op>(
    label: &str,
    unit: &'static str,
    ops: Vec<O>,
    plan: Plan,
    quiet: bool,
) -> anyhow::Result<(Vec<O>, RunStats)> {
    let shared = Arc::new(Shared::default());
    let progress = Progress::start(label, unit, plan, shared.clone(), quiet);
    let outcome = drive(ops, plan, shared).await;
    progress.finish();
    outcome
}
