//! The command line: every knob of a run, with its help text, parsed and checked by clap.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use hyper::Uri;

use countapp_shared::api::Consistency;

use crate::mix::{CONTAINS_IDS, COUNTS_TENANTS, Mix, Reads};
use crate::workload::MIN_ID_BYTES;

/// Load for a CountApp cluster, and a check that it lost nothing.
///
/// Posts batches of `{"id","tenant"}` items over keep-alive connections, one request in flight
/// per connection, for a duration or a number of items, whichever comes first. Then prints
/// requests/s, items/s, latency percentiles and errors, waits for every tenant's count to
/// include every acknowledged item, and reports items lost (acknowledged but never counted) and
/// unexpected (counted but never sent), as Jepsen's set checker does; with --exact, it also
/// reads each batch's fate and names the acknowledged batches lost.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "\
Exit status: 0 when the check passed (or was skipped); 1 when items were lost or unexpected;
2 on any other failure, including a run that posted batches and had none acknowledged.

Examples:
  countapp-load                                  10 s against the coordinator on :5000
  countapp-load --url http://127.0.0.1:5001 --repeat 0.2 --redis redis://127.0.0.1/
  countapp-load --count --json counts.json       GET counts instead of posting batches
  countapp-load --mix strong=0.05,contains=0.05,counts=0.02,delete=0.001
                                                 strong reads and deletes among the batches, checked
  countapp-load --mix counts=1 --counts-tenants 1000 --tenants 1000 --consistency eventual
                                                 eventual POST /counts of 1000 tenants, nothing posted
  countapp-load --items 1000000 --plot run.svg   a million items, plotted over time
  countapp-load --exact --duration 30s           while workers are killed: every batch's fate read
  countapp-load -R 200000 -d 30s                 200k items/s on a fixed schedule: latency at that rate
  countapp-load -c 64 -b 1000 -n 10000000 -q     short flags, as wrk's and oha's"
)]
pub struct Args {
    /// The server to load: a coordinator or a single worker.
    #[arg(short, long, default_value = "http://127.0.0.1:5000")]
    pub url: Uri,

    /// Concurrent keep-alive connections, each with one request in flight.
    #[arg(short, long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,

    /// Items per POST batch.
    #[arg(short, long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch: u32,

    /// Tenants the items are spread over, round-robin.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub tenants: u32,

    /// How long to send: "10s", "1m30s", "500ms" or plain seconds. Defaults to 10 s, unless
    /// --items is given, which then alone ends the run.
    #[arg(short, long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Stop after sending this many items (or, with --count, requests), acknowledged or not.
    #[arg(short = 'n', long, value_parser = clap::value_parser!(u64).range(1..))]
    pub items: Option<u64>,

    /// Send at this fixed rate, in items per second (requests per second with --count), as
    /// wrk2's -R and oha's -q do: each request has an intended start on an even schedule, and
    /// its latency runs from then, so that a server's stall counts against every request due
    /// during it (no coordinated omission). The connections must be enough to keep up: a
    /// request late for want of a free connection is measured late. Without it, each
    /// connection sends its next request as soon as the last is answered.
    #[arg(short = 'R', long, value_name = "PER_SECOND", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Share of the items (0 to 1) that repeat an id already acknowledged for their tenant,
    /// to exercise deduplication; the rest are fresh ids.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub repeat: f64,

    /// Length of every id, in bytes.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(MIN_ID_BYTES as i64..=4096))]
    pub id_bytes: u16,

    /// Prefix of the tenant names (followed by 0, 1, ...). Defaults to "load-<random>-", so that
    /// no two runs share a tenant; give the prefix of an earlier run to count its tenants.
    #[arg(long)]
    pub tenant_prefix: Option<String>,

    /// Also send the same stream to this Redis (redis://host:port/db) as pipelined SADD, one
    /// pipeline per batch, after the main run, and print the ratio of the two.
    #[arg(long, value_name = "URL", conflicts_with = "count")]
    pub redis: Option<String>,

    /// Benchmark GET /items/{tenant}/count, round-robin over the tenants, instead of posting.
    /// One batch is posted to each tenant first, so that the counts read are of real tenants.
    #[arg(long)]
    pub count: bool,

    /// Mix strong reads and deletes into the batches, each kind a share of the requests (0 to
    /// 1), the rest batches: e.g. "strong=0.05,contains=0.05,counts=0.02,delete=0.001". Every
    /// answer is checked, and the report gives each kind its rate, latency and errors.
    ///
    /// The kinds: "strong", GET /items/<tenant>/count?consistency=strong; "contains", POST
    /// /items/<tenant>/contains?consistency=strong of 16 ids the connection had acknowledged for
    /// the tenant and 4 it never sent (--contains-ids); "counts", POST /counts?consistency=strong
    /// of 16 tenants (--counts-tenants); "delete", DELETE /items/<tenant>. The reads are strong
    /// unless --consistency says otherwise. Not with --count, --redis or --exact.
    ///
    /// A strong count must reach the distinct ids acknowledged for the tenant since its last
    /// delete before the request was sent (a lower bound: batches of other connections are in
    /// flight meanwhile), and a membership check must find every acknowledged id asked and none
    /// of those never sent. Any count, strong or eventual, may not exceed the tenant's count
    /// before the load plus the distinct ids sent to it since, acknowledged or not. A wrong
    /// answer fails the run. To keep this exact, the tool never
    /// lets a tenant's batches and its delete overlap: a delete waits for the batches and reads
    /// of its tenant in flight, and holds back new ones until it is answered (that wait is the
    /// tool's, not the server's: it is not measured, except as lateness with --rate).
    ///
    /// The set check then owes each tenant the ids acknowledged since its last delete, forbids
    /// those acknowledged before its last acknowledged delete (repeats draw only on ids of the
    /// tenant's current life), and asks, strongly, about up to 1000 ids per connection on
    /// either side of each deleted tenant's last delete. A delete that failed may or may not
    /// have been applied: the ids before it are no longer owed, nor yet forbidden. A failed
    /// delete is taken as over when its request ends, so keep --timeout above the server's 4 s
    /// for a delete. Every request takes a batch's positions, so --items counts them all.
    #[arg(long, value_name = "KIND=SHARE,...", conflicts_with_all = ["count", "redis", "exact"])]
    pub mix: Option<Mix>,

    /// The consistency of the mix's reads (its "strong", "contains" and "counts" kinds, whatever
    /// their names): "strong", or "eventual", which reads as of the latest merge round. An
    /// eventual answer is checked less: a count only to be at most the tenant's count before the
    /// load plus the distinct ids sent to it since (it may be from before any of them), and a
    /// membership check only to find none of the ids never sent.
    #[arg(long, default_value = "strong", value_parser = parse_consistency, requires = "mix")]
    pub consistency: Consistency,

    /// Tenants one "counts" request of the mix asks for (consecutive ones, as many as --tenants
    /// at most).
    #[arg(long, default_value_t = COUNTS_TENANTS, requires = "mix",
          value_parser = clap::value_parser!(u32).range(1..=countapp_shared::api::MAX_COUNTS_TENANTS as i64))]
    pub counts_tenants: u32,

    /// Ids one "contains" request of the mix asks about: four in five (rounded down) picked
    /// among those the connection had acknowledged for the tenant, the rest ids never sent (all
    /// of them, while it has acknowledged none for the tenant).
    #[arg(long, default_value_t = CONTAINS_IDS, requires = "mix",
          value_parser = clap::value_parser!(u32).range(1..=countapp_shared::api::MAX_CONTAINS_IDS as i64))]
    pub contains_ids: u32,

    /// Write the figures (and the per-second series) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Draw items/s and p99 latency per second into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// How long to wait, after the load, for the counts to include every acknowledged item. The
    /// counts are read in sweeps, each over the tenants not yet seen to include theirs.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub converge_timeout: Duration,

    /// Connections that read the counts for the check, before the load (the baselines) and
    /// while waiting for the counts to converge, each with one request in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub check_connections: u32,

    /// While waiting, read only this many tenants (evenly spread) until they all converged, and
    /// only then every tenant: with many tenants, reading them all while the server still
    /// merges would load the very server being measured. The verdict still reads every tenant.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub check_sample: Option<u64>,

    /// A request without a complete answer after this long is an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Skip the loss check after the load.
    #[arg(long)]
    pub no_check: bool,

    /// Make the loss check exact: each batch also carries one item in a tenant of its own,
    /// "<prefix>~<run tag>-<connection>-<batch>", whose count (1 or 0) tells whether the server
    /// applied the batch (batches are all-or-nothing). Then an acknowledged batch whose marker
    /// counts 0 is reported lost, by name, and each tenant must count exactly the ids of the
    /// batches applied, acknowledged or not. Without it, the check bounds each count between the
    /// ids acknowledged and the ids sent, which is exact only when every batch was acknowledged:
    /// a lost acknowledged batch can hide behind an unacknowledged one that was applied. Off by
    /// default because a tenant per batch (thousands a second) changes the workload being
    /// measured and lengthens the check; use it for runs where requests fail, such as those that
    /// kill workers. The markers are not counted as items, nor sent in the Redis reference run.
    #[arg(long, conflicts_with_all = ["no_check", "count"])]
    pub exact: bool,

    /// No progress bar (also the case when stderr is not a terminal).
    #[arg(short, long)]
    pub quiet: bool,

    /// Threads of the load tool. One is plenty for most runs, and leaves the other core of a
    /// small machine to the server under test.
    #[arg(short, long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
}

/// The default duration, when neither --duration nor --items is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

impl Args {
    /// How the mix asks its reads: --consistency, --counts-tenants and --contains-ids.
    pub fn reads(&self) -> Reads {
        Reads {
            consistency: self.consistency,
            counts_tenants: self.counts_tenants as usize,
            contains_ids: self.contains_ids as usize,
        }
    }

    /// How long to send: --duration, else 10 s unless --items bounds the run.
    pub fn send_for(&self) -> Option<Duration> {
        match (self.duration, self.items) {
            (Some(duration), _) => Some(duration),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_DURATION),
        }
    }
}

/// Parses "10s", "1m30s", "250ms" (humantime), or a plain number of seconds ("2.5").
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = match text.parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())?,
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string())?,
    };
    if duration.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(duration)
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("must be a number of items (or requests) per second above zero".into()),
    }
}

fn parse_consistency(text: &str) -> Result<Consistency, String> {
    match text {
        "strong" => Ok(Consistency::Strong),
        "eventual" => Ok(Consistency::Eventual),
        _ => Err("must be strong or eventual".into()),
    }
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err("must be a number from 0 to 1".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_or_plain_seconds() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn items_alone_end_the_run() {
        let parse = |args: &[&str]| Args::try_parse_from([&["countapp-load"], args].concat()).unwrap();
        assert_eq!(parse(&[]).send_for(), Some(DEFAULT_DURATION));
        assert_eq!(parse(&["--items", "1000"]).send_for(), None);
        assert_eq!(parse(&["--items", "1000", "--duration", "3"]).send_for(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn short_flags_name_the_common_options() {
        let args = Args::try_parse_from([
            "countapp-load",
            "-u",
            "http://127.0.0.1:5001",
            "-c",
            "4",
            "-b",
            "50",
            "-d",
            "3s",
            "-n",
            "900",
            "-R",
            "2000",
            "-t",
            "2",
            "-q",
        ])
        .unwrap();
        assert_eq!(args.url, "http://127.0.0.1:5001");
        assert_eq!((args.connections, args.batch, args.items, args.threads), (4, 50, Some(900), 2));
        assert_eq!((args.duration, args.rate, args.quiet), (Some(Duration::from_secs(3)), Some(2000.0), true));
    }

    #[test]
    fn the_mix_takes_shares_by_name() {
        let args = Args::try_parse_from(["countapp-load", "--mix", "strong=0.05,delete=0.001"]).unwrap();
        assert_eq!(args.mix, Some(Mix { strong: 0.05, delete: 0.001, ..Mix::default() }));
    }

    #[test]
    fn the_mix_reads_take_a_consistency_and_sizes() {
        let parse = |args: &[&str]| Args::try_parse_from([&["countapp-load", "--mix", "counts=1"], args].concat());
        assert_eq!(parse(&[]).unwrap().reads(), Reads::default());
        assert_eq!(Reads::default(), Reads { consistency: Consistency::Strong, counts_tenants: 16, contains_ids: 20 });
        let args = parse(&["--consistency", "eventual", "--counts-tenants", "1000", "--contains-ids", "1000"]).unwrap();
        assert_eq!(
            args.reads(),
            Reads { consistency: Consistency::Eventual, counts_tenants: 1000, contains_ids: 1000 }
        );
        assert_eq!(parse(&["--consistency", "strong"]).unwrap().reads().consistency, Consistency::Strong);
        assert_eq!(
            parse(&["--counts-tenants", "10000", "--contains-ids", "100000"]).unwrap().reads().contains_ids,
            100_000
        );
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["--repeat", "1.5"][..],
            &["--connections", "0"],
            &["--check-connections", "0"],
            &["--id-bytes", "4"],
            &["--count", "--redis", "redis://x"],
            &["--exact", "--no-check"],
            &["--exact", "--count"],
            &["--rate", "0"],
            &["-R", "-5"],
            &["-R", "fast"],
            &["--mix", "strong=1.5"],
            &["--mix", "reads=0.1"],
            &["--mix", "delete=0.1", "--exact"],
            &["--mix", "delete=0.1", "--count"],
            &["--mix", "delete=0.1", "--redis", "redis://x"],
            &["--mix", "strong=1", "--consistency", "weak"],
            &["--mix", "strong=1", "--consistency", "Strong"],
            &["--mix", "strong=1", "--consistency", ""],
            &["--mix", "counts=1", "--counts-tenants", "0"],
            &["--mix", "counts=1", "--counts-tenants", "10001"],
            &["--mix", "counts=1", "--counts-tenants", "many"],
            &["--mix", "contains=1", "--contains-ids", "0"],
            &["--mix", "contains=1", "--contains-ids", "100001"],
            &["--mix", "contains=1", "--contains-ids", "-1"],
            &["--consistency", "eventual"],
            &["--counts-tenants", "100"],
            &["--contains-ids", "100"],
        ] {
            assert!(Args::try_parse_from([&["countapp-load"], args].concat()).is_err(), "{args:?}");
        }
    }
}
