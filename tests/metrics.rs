//! The `/metrics` of a real coordinator and its real workers, read as Prometheus reads them:
//! every line of each exposition is checked against the text format's rules (a family's HELP
//! and TYPE before its samples, valid names, counters' samples ending in `_total`, histograms
//! with their `+Inf` bucket, `_sum` and `_count`), and the series an operator alerts on are
//! there: requests timed by route, the hop timed per worker, restarts counted per worker,
//! workers by every state, 503s by cause, the config reload's outcome, a worker's merge lag and
//! backlog, build info and the `process_*` series.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::time::Duration;

use countapp_testcluster::{
    Cluster, batch, client, count, eventually, extra, free_port, get_json, metric, post, sigkill,
};
use reqwest::StatusCode;

/// How long a change gets to show: a health check, a respawn, a reload.
const WAIT: Duration = Duration::from_secs(20);

/// One sample line: its name, its labels, its value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Whether `name` is a valid metric name, `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Whether `name` is a valid label name, `[a-zA-Z_][a-zA-Z0-9_]*`.
fn valid_label(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The labels of `{...}` (without the braces), quoted values unescaped.
fn parse_labels(text: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("a label without a quoted value: {line}"));
        assert!(valid_label(name), "label name {name:?}: {line}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => panic!("a bad escape {other:?}: {line}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("an unterminated label value: {line}"),
            }
        };
        assert!(labels.insert(name.to_owned(), value).is_none(), "label {name} twice: {line}");
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    labels
}

/// Checks every line of an exposition and returns its samples by family, with each family's
/// type. Panics, naming the line, at the first rule broken.
fn check_exposition(text: &str) -> (HashMap<String, String>, Vec<(String, Sample)>) {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition ends with # EOF");
    assert_eq!(text.matches("# EOF").count(), 1, "one # EOF");
    let mut family: Option<String> = None;
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let (kind, rest) = rest.split_once(' ').unwrap_or_else(|| panic!("a bare comment: {line}"));
            let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(valid_name(name), "family name {name:?}: {line}");
            match kind {
                "HELP" => {
                    assert!(!value.is_empty(), "an empty HELP: {line}");
                    assert!(helped.insert(name.to_owned()), "HELP twice: {line}");
                    assert!(!types.contains_key(name), "HELP after TYPE for {name}");
                }
                "TYPE" => {
                    assert!(["counter", "gauge", "histogram", "info", "unknown"].contains(&value), "type: {line}");
                    assert!(helped.contains(name), "TYPE of {name} without a HELP before it");
                    assert!(types.insert(name.to_owned(), value.to_owned()).is_none(), "TYPE twice: {line}");
                    family = Some(name.to_owned());
                }
                "UNIT" => {}
                other => panic!("an unknown descriptor {other}: {line}"),
            }
            continue;
        }
        assert!(!line.is_empty() && !line.starts_with('#'), "a stray line: {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value {v:?}: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, parse_labels(labels.strip_suffix('}').expect("a closing brace"), line)),
            None => (series, BTreeMap::new()),
        };
        assert!(valid_name(name), "sample name {name:?}: {line}");
        let family = family.clone().unwrap_or_else(|| panic!("a sample before any TYPE: {line}"));
        let kind = types[&family].as_str();
        let suffix = name.strip_prefix(family.as_str()).unwrap_or_else(|| panic!("{name} is not of family {family}"));
        let allowed: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "gauge" | "unknown" => &[""],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "info" => &["_info"],
            _ => unreachable!(),
        };
        assert!(allowed.contains(&suffix), "a {kind} sample named {name}: {line}");
        if kind == "counter" && suffix == "_total" {
            assert!(value >= 0.0, "a negative counter: {line}");
        }
        if suffix == "_bucket" {
            assert!(labels.contains_key("le"), "a bucket without le: {line}");
        }
        samples.push((family, Sample { name: name.to_owned(), labels, value }));
    }
    check_histograms(&types, &samples);
    (types, samples)
}

/// One histogram series as read: its buckets (bound, count), `_sum` and `_count`.
#[derive(Default)]
struct HistogramSeries {
    buckets: Vec<(f64, f64)>,
    sum: Option<f64>,
    count: Option<f64>,
}

/// Every histogram series has its buckets rising to `+Inf`, which equals its `_count`, and a
/// `_sum`.
fn check_histograms(types: &HashMap<String, String>, samples: &[(String, Sample)]) {
    let mut series: BTreeMap<(String, BTreeMap<String, String>), HistogramSeries> = BTreeMap::new();
    for (family, sample) in samples.iter().filter(|(family, _)| types[family] == "histogram") {
        let mut labels = sample.labels.clone();
        let le = labels.remove("le");
        let entry = series.entry((family.clone(), labels)).or_default();
        if sample.name.ends_with("_bucket") {
            let le = le.unwrap();
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
            entry.buckets.push((bound, sample.value));
        } else if sample.name.ends_with("_sum") {
            entry.sum = Some(sample.value);
        } else if sample.name.ends_with("_count") {
            entry.count = Some(sample.value);
        }
    }
    for ((family, labels), HistogramSeries { buckets, sum, count }) in series {
        let what = format!("{family}{labels:?}");
        assert!(sum.is_some(), "{what} has no _sum");
        let count = count.unwrap_or_else(|| panic!("{what} has no _count"));
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{what}: buckets {buckets:?}");
        assert_eq!(buckets.last().copied(), Some((f64::INFINITY, count)), "{what}: +Inf is the count");
    }
}

/// The exposition at `url`, checked.
fn scrape(url: &str) -> (String, HashMap<String, String>) {
    let reply = client().get(format!("{url}/metrics")).send().unwrap();
    assert_eq!(reply.status(), StatusCode::OK);
    let text = reply.text().unwrap();
    let (types, _) = check_exposition(&text);
    (text, types)
}

/// The user and system CPU seconds of process `pid`, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, in parentheses: utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / ticks
}

#[test]
fn the_expositions_of_a_running_cluster_follow_prometheus_conventions_and_hold_what_operators_alert_on() {
    let (ports, listen) = ((0..2).map(|_| free_port()).collect::<Vec<u16>>(), free_port());
    let cluster = Cluster::new(&ports, &extra(listen, "worker_persist: 0.2\n"));
    let mut coordinator = cluster.coordinator(listen);
    coordinator.wait_live(2);
    let url = coordinator.url();
    let client = client();
    assert_eq!(post(&client, &url, batch(&[("m", "1"), ("m", "2")])).status(), StatusCode::OK);
    eventually(WAIT, "the items are counted", || count(&client, &url, "m") == 2);

    // A worker: requests timed by route, its merge lag and backlog, build info, process_*.
    let worker = format!("http://127.0.0.1:{}", ports[0]);
    let worker_pid = coordinator.pid_of(ports[0]);
    let cpu_before = cpu_seconds(worker_pid);
    let (text, types) = scrape(&worker);
    let cpu_after = cpu_seconds(worker_pid);
    assert_eq!(types["countapp_worker_request_duration_seconds"], "histogram");
    assert!(metric(&text, "countapp_worker_request_duration_seconds_count", &[("route", "/ready")]) > Some(0.0));
    for gauge in ["countapp_worker_merge_lag_seconds", "countapp_worker_pending_items", "process_resident_memory_bytes"]
    {
        assert_eq!(types[gauge], "gauge", "{gauge}");
        assert!(metric(&text, gauge, &[]).is_some(), "{gauge}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(metric(&text, "countapp_worker_build_info", &[("version", version)]), Some(1.0));
    // As `/proc` tells it, around the scrape: a worker that has used less than a clock tick
    // rightly says 0.
    let cpu = metric(&text, "process_cpu_seconds_total", &[]).unwrap();
    assert!((cpu_before..=cpu_after).contains(&cpu), "{cpu} s, not within {cpu_before}..={cpu_after} s");
    assert!(metric(&text, "process_open_fds", &[]) > Some(0.0));
    let started = metric(&text, "process_start_time_seconds", &[]).unwrap();
    assert!(metric(&text, "process_max_fds", &[]) > Some(0.0));

    // The coordinator: a worker killed is a restart of that worker, counted.
    let victim = coordinator.pid_of(ports[1]);
    sigkill(victim);
    let victim_url = format!("http://127.0.0.1:{}", ports[1]);
    eventually(WAIT, "the killed worker is back", || {
        coordinator.workers().iter().any(|w| w["url"] == victim_url && w["state"] == "ready" && w["restarts"] == 1)
    });
    // Hops to each worker, timed per worker.
    for i in 0..20 {
        assert_eq!(post(&client, &url, batch(&[("hop", &i.to_string())])).status(), StatusCode::OK);
    }
    let (text, types) = scrape(&url);
    let restarts = |worker: &str| metric(&text, "countapp_coordinator_worker_restarts_total", &[("worker", worker)]);
    assert_eq!((restarts(&victim_url), restarts(&worker)), (Some(1.0), Some(0.0)), "{text}");
    assert_eq!(types["countapp_coordinator_worker_restarts"], "counter");
    assert_eq!(types["countapp_coordinator_hop_duration_seconds"], "histogram");
    let hops = |w: &str| metric(&text, "countapp_coordinator_hop_duration_seconds_count", &[("worker", w)]);
    assert!(hops(&worker).unwrap_or(0.0) + hops(&victim_url).unwrap_or(0.0) >= 20.0, "{text}");
    assert!(metric(&text, "countapp_coordinator_request_duration_seconds_count", &[("route", "/items")]) >= Some(20.0));
    for state in ["starting", "ready", "unhealthy", "exited", "stopping", "blocked"] {
        let expected = if state == "ready" { 2.0 } else { 0.0 };
        assert_eq!(metric(&text, "countapp_coordinator_workers", &[("state", state)]), Some(expected), "{state}");
    }
    for cause in ["no_live_worker", "workers_unreachable", "push_back", "worker_error", "bad_reply"] {
        assert_eq!(metric(&text, "countapp_coordinator_unavailable_total", &[("cause", cause)]), Some(0.0), "{cause}");
    }
    assert!(metric(&text, "countapp_coordinator_worker_pending_items", &[("worker", &worker)]).is_some(), "{text}");
    assert!(metric(&text, "countapp_coordinator_worker_merge_lag_seconds", &[("worker", &worker)]).is_some());
    assert_eq!(metric(&text, "countapp_coordinator_build_info", &[("version", version)]), Some(1.0));
    assert!(metric(&text, "process_start_time_seconds", &[]).is_some_and(|t| (t - started).abs() < 3600.0));

    // A refused edit, then a good one: the reload's outcome, and when the good one came.
    let loaded = |text: &str| metric(text, "countapp_coordinator_config_last_reload_success_timestamp_seconds", &[]);
    let first_load = loaded(&text).unwrap();
    assert_eq!(metric(&text, "countapp_coordinator_config_last_reload_successful", &[]), Some(1.0));
    fs::write(cluster.config_path(), "workers: [\n").unwrap();
    eventually(WAIT, "the refused edit shows", || {
        metric(&scrape(&url).0, "countapp_coordinator_config_last_reload_successful", &[]) == Some(0.0)
    });
    assert_eq!(loaded(&scrape(&url).0), Some(first_load), "the config in force is still the first");
    cluster.write_config(&ports, &extra(listen, "worker_persist: 0.3\n"));
    eventually(WAIT, "the good edit shows", || {
        let text = scrape(&url).0;
        metric(&text, "countapp_coordinator_config_last_reload_successful", &[]) == Some(1.0)
            && loaded(&text) > Some(first_load)
    });
    assert_eq!(get_json(&client, &format!("{url}/stats"))["config"]["valid"], true);
}

#[test]
fn the_exposition_checker_refuses_what_prometheus_would() {
    let good = "# HELP a_total_things Things.\n# TYPE a_total_things counter\na_total_things_total 1\n# EOF\n";
    check_exposition(good);
    let refused = [
        ("a counter sample without _total", "# HELP c C.\n# TYPE c counter\nc 1\n# EOF\n"),
        ("a sample before its TYPE", "c_total 1\n# HELP c C.\n# TYPE c counter\n# EOF\n"),
        ("a TYPE without HELP", "# TYPE c counter\nc_total 1\n# EOF\n"),
        ("a bad name", "# HELP 1c C.\n# TYPE 1c gauge\n1c 1\n# EOF\n"),
        ("no EOF", "# HELP g G.\n# TYPE g gauge\ng 1\n"),
        (
            "a histogram without +Inf",
            "# HELP h H.\n# TYPE h histogram\nh_sum 1\nh_count 1\nh_bucket{le=\"1.0\"} 1\n# EOF\n",
        ),
        ("a histogram without _sum", "# HELP h H.\n# TYPE h histogram\nh_count 1\nh_bucket{le=\"+Inf\"} 1\n# EOF\n"),
    ];
    for (what, text) in refused {
        let caught = std::panic::catch_unwind(|| check_exposition(text));
        assert!(caught.is_err(), "{what} passed the checker");
    }
}
