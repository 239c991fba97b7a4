//! The figures of a run, as the plain-text table printed at the end and as the JSON written
//! with `--json`: one structure feeds both, so they always agree.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::check::{Convergence, Verdict};
use crate::mix::MixFindings;
use crate::stats::{Interval, RunStats};

/// What a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Batches of items (`POST /items`).
    Post,
    /// Count reads (`GET /items/{tenant}/count`).
    Count,
    /// Batches mixed with strong reads and deletes (`--mix`).
    Mix,
}

/// Everything a run reports.
#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub url: String,
    pub connections: u32,
    pub batch: u32,
    pub tenants: u32,
    pub tenant_prefix: String,
    pub repeat: f64,
    pub id_bytes: u16,
    /// The fixed rate asked for (items a second, or requests with `--count`), with `--rate`:
    /// then latency runs from each request's intended start.
    pub rate: Option<f64>,
    /// The run against `url`.
    pub run: Figures,
    /// The same stream sent to Redis, with `--redis`.
    pub redis: Option<Figures>,
    /// Items/s of the run over Redis's.
    pub ratio: Option<f64>,
    /// The loss check, unless `--no-check` (or `--count`).
    pub check: Option<Convergence>,
    /// With `--mix`: the shares, how the reads were asked, the wrong answers and the membership
    /// check around deletes.
    pub mix: Option<MixFindings>,
}

/// The figures of one run.
#[derive(Debug, Serialize)]
pub struct Figures {
    pub seconds: f64,
    pub requests: u64,
    pub requests_per_s: f64,
    /// Items acknowledged (with `--count`, counts read).
    pub items: u64,
    pub items_per_s: f64,
    /// Latency of acknowledged requests.
    pub latency_ms: Latency,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// When the last request was acknowledged (the end of the load), in milliseconds since the
    /// Unix epoch; null when none was.
    pub last_ack_unix_ms: Option<u64>,
    /// The run second by second.
    pub per_second: Vec<Interval>,
    /// With `--mix`, the figures of each kind of request, by name ("batch", "strong",
    /// "contains", "counts", "delete").
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub operations: BTreeMap<String, Figures>,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Figures {
    /// The figures of `stats`.
    pub fn of(stats: &RunStats) -> Figures {
        Figures {
            seconds: stats.elapsed.as_secs_f64(),
            requests: stats.totals.requests,
            requests_per_s: stats.requests_per_s(),
            items: stats.totals.items,
            items_per_s: stats.items_per_s(),
            latency_ms: Latency {
                p50: stats.latency_ms(0.5),
                p99: stats.latency_ms(0.99),
                p999: stats.latency_ms(0.999),
                max: stats.max_latency_ms(),
            },
            errors: stats.totals.error_count(),
            errors_by_kind: stats.totals.errors.iter().map(|(failure, &n)| (failure.to_string(), n)).collect(),
            last_ack_unix_ms: stats.last_ack_unix_ms(),
            per_second: stats.per_second(),
            operations: stats.operations.iter().map(|(name, stats)| (name.to_string(), Figures::of(stats))).collect(),
        }
    }
}

/// Lost batches and tenants named in the text; the JSON lists more.
const SHOWN: usize = 10;

/// The first lost batches of `v`, by name, and how many more there are.
pub fn lost_batches(v: &Verdict) -> String {
    let named: Vec<String> =
        v.lost_batches.iter().take(SHOWN).map(|b| format!("connection {} batch {}", b.connection, b.seq)).collect();
    let more = v.batches_lost.unwrap_or(0).saturating_sub(named.len() as u64);
    named.join(", ") + &if more > 0 { format!(" and {more} more") } else { String::new() }
}

impl Report {
    /// The report as a plain-text table, ending in a newline.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let what = match self.mode {
            Mode::Count => format!("GET counts of {} tenants", self.tenants),
            Mode::Mix => format!(
                "POST batches of {} over {} tenants, {:.0}% repeated ids, mixed: {}",
                self.batch,
                self.tenants,
                self.repeat * 100.0,
                self.mix.as_ref().map_or_else(String::new, |mix| format!("{}; {}", mix.shares, mix.reads))
            ),
            Mode::Post => format!(
                "POST batches of {} over {} tenants, {:.0}% repeated ids",
                self.batch,
                self.tenants,
                self.repeat * 100.0
            ),
        };
        let _ = writeln!(
            out,
            "{} ({}*), {} connections, {what}, {:.1} s",
            self.url, self.tenant_prefix, self.connections, self.run.seconds
        );
        if let Some(rate) = self.rate {
            let unit = if self.mode == Mode::Count { "requests" } else { "items" };
            let _ = writeln!(
                out,
                "fixed rate: {rate:.0} {unit}/s asked; latency from each request's intended start (no coordinated omission)"
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<10}{:>10}{:>12}{:>12}{:>9}{:>9}{:>9}{:>9}{:>8}",
            "", "requests", "requests/s", "items/s", "p50 ms", "p99 ms", "p999 ms", "max ms", "errors"
        );
        // Only batches have items; reads and deletes have none.
        let mut row = |name: &str, f: &Figures, items: bool| {
            let items_per_s = if items { format!("{:.0}", f.items_per_s) } else { "-".to_owned() };
            let _ = writeln!(
                out,
                "{name:<10}{:>10}{:>12.0}{items_per_s:>12}{:>9.2}{:>9.2}{:>9.2}{:>9.2}{:>8}",
                f.requests,
                f.requests_per_s,
                f.latency_ms.p50,
                f.latency_ms.p99,
                f.latency_ms.p999,
                f.latency_ms.max,
                f.errors
            );
        };
        row("countapp", &self.run, self.mode != Mode::Count);
        for (name, figures) in &self.run.operations {
            row(&format!("  {name}"), figures, name == "batch");
        }
        if let Some(redis) = &self.redis {
            row("redis", redis, true);
        }
        if let Some(ratio) = self.ratio {
            let _ = writeln!(out, "\ncountapp/redis: {ratio:.2}x items/s");
        }
        let operations = self.run.operations.iter().map(|(name, f)| (name.as_str(), Some(f)));
        let all = [("countapp", Some(&self.run)), ("redis", self.redis.as_ref())].into_iter().chain(operations);
        for (name, figures) in all {
            if let Some(f) = figures.filter(|f| f.errors > 0) {
                let kinds: Vec<String> = f.errors_by_kind.iter().map(|(kind, n)| format!("{n} × {kind}")).collect();
                let _ = writeln!(out, "\n{name} errors: {}", kinds.join(", "));
            }
        }
        if let Some(check) = &self.check {
            let v = &check.verdict;
            let wait = if check.converged {
                format!("converged {:.2} s after the last ack", check.waited.as_secs_f64())
            } else {
                let markers = match check.unconverged_markers {
                    0 => String::new(),
                    n => format!(" and {n} acknowledged batches' markers missing"),
                };
                format!(
                    "did NOT converge within {:.2} s of the last ack, {} tenants short{markers}",
                    check.waited.as_secs_f64(),
                    check.unconverged
                )
            };
            let sample = check.sampled.map_or_else(String::new, |s| {
                format!("the sampled tenants {:.2} s after the last ack, ", s.as_secs_f64())
            });
            let sweeps = format!(
                "{sample}first sweep over the counts {:.2} s, {} sweep{}",
                check.sweep.as_secs_f64(),
                check.sweeps,
                if check.sweeps == 1 { "" } else { "s" }
            );
            let _ = writeln!(
                out,
                "\ncheck: {} distinct ids acknowledged, {} sent, {} counted; {wait} ({sweeps}); lost {}, unexpected {}{}",
                v.acked,
                v.sent,
                v.counted,
                v.lost,
                v.unexpected,
                if v.passed() { "" } else { " -- FAILED" }
            );
            self.batch_lines(v, &mut out);
        }
        if let Some(mix) = &self.mix {
            mix_lines(mix, &mut out);
        }
        out
    }

    /// The check's lines on batches: with markers, the fate of every batch and the lost ones by
    /// name; without, what counts alone cannot tell. Then the first tenants whose count is off.
    fn batch_lines(&self, v: &Verdict, out: &mut String) {
        if let Some(lost) = v.batches_lost {
            let named = if lost > 0 { format!(": {}", lost_batches(v)) } else { String::new() };
            let _ = writeln!(
                out,
                "batches (each read by its marker): {} sent, {} unacknowledged of which {} applied; {lost} acknowledged \
                 and lost{named}",
                v.batches,
                v.batches_unacked,
                v.batches_unacked_applied.unwrap_or(0),
            );
        } else if v.batches_unacked > 0 {
            let _ = writeln!(
                out,
                "batches: {} sent, {} unacknowledged: counts alone cannot tell whether those were applied, so as many \
                 lost acknowledged batches could hide behind them (--exact reads each batch's fate)",
                v.batches, v.batches_unacked
            );
        }
        for t in v.tenants_off.iter().take(SHOWN) {
            let should = if t.at_least == t.at_most {
                format!("{}", t.at_least)
            } else {
                format!("{} to {}", t.at_least, t.at_most)
            };
            let _ = writeln!(out, "  {}{}: counts {}, should count {should}", self.tenant_prefix, t.tenant, t.count);
        }
    }
}

/// The mixed workload's findings: wrong answers, and the ids asked about around the deletes.
fn mix_lines(mix: &MixFindings, out: &mut String) {
    let wrong = match mix.wrong_answers {
        0 => "every strong read and membership check answered as owed".to_owned(),
        n => format!(
            "{n} wrong answers -- FAILED: {}",
            mix.wrong.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ")
        ),
    };
    let _ = writeln!(out, "mix: {wrong}");
    if let Some(m) = mix.membership.as_ref().filter(|m| m.tenants > 0) {
        let _ = writeln!(
            out,
            "deletes: {} tenants deleted; of the ids around their last delete, {} of {} acknowledged before are still \
             there, {} of {} acknowledged since are missing{}",
            m.tenants,
            m.gone_found,
            m.gone_asked,
            m.kept_missing,
            m.kept_asked,
            if m.passed() { "" } else { " -- FAILED" }
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::check::{BatchId, TenantFigures};

    fn figures(items_per_s: f64) -> Figures {
        Figures {
            seconds: 2.0,
            requests: 20,
            requests_per_s: 10.0,
            items: (items_per_s * 2.0) as u64,
            items_per_s,
            latency_ms: Latency { p50: 1.0, p99: 2.0, p999: 3.0, max: 4.0 },
            errors: 2,
            errors_by_kind: BTreeMap::from([("HTTP 503".to_owned(), 2)]),
            last_ack_unix_ms: Some(1_700_000_000_000),
            per_second: Vec::new(),
            operations: BTreeMap::new(),
        }
    }

    #[test]
    fn the_table_shows_every_figure() {
        let report = Report {
            mode: Mode::Post,
            url: "http://127.0.0.1:5000".into(),
            connections: 2,
            batch: 100,
            tenants: 3,
            tenant_prefix: "load-x-".into(),
            repeat: 0.25,
            id_bytes: 16,
            rate: Some(5000.0),
            run: figures(1000.0),
            redis: Some(figures(500.0)),
            ratio: Some(2.0),
            check: Some(Convergence {
                verdict: Verdict {
                    acked: 90,
                    sent: 95,
                    expected: Some(95),
                    counted: 85,
                    lost: 10,
                    tenants_short: 1,
                    tenants_off: vec![TenantFigures { tenant: 2, count: 20, at_least: 30, at_most: 30 }],
                    exact: true,
                    batches: 19,
                    batches_unacked: 1,
                    batches_unacked_applied: Some(1),
                    batches_lost: Some(2),
                    batches_over: Some(0),
                    lost_batches: vec![BatchId { connection: 1, seq: 4 }, BatchId { connection: 0, seq: 7 }],
                    ..Verdict::default()
                },
                converged: false,
                waited: Duration::from_secs(30),
                sweep: Duration::from_millis(1500),
                sampled: None,
                sweeps: 12,
                unconverged: 1,
                unconverged_markers: 2,
            }),
            mix: None,
        };
        let table = report.table();
        for needle in [
            "25% repeated ids",
            "redis",
            "2.00x",
            "2 × HTTP 503",
            "did NOT converge within 30.00 s of the last ack, 1 tenants short and 2 acknowledged batches' markers \
             missing (first sweep",
            "first sweep over the counts 1.50 s, 12 sweeps",
            "lost 10, unexpected 0 -- FAILED",
            "19 sent, 1 unacknowledged of which 1 applied; 2 acknowledged and lost: connection 1 batch 4, connection 0 batch 7\n",
            "  load-x-2: counts 20, should count 30\n",
        ] {
            assert!(table.contains(needle), "{needle:?} missing from\n{table}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["check"]["lost"], 10);
        assert_eq!(json["check"]["lost_batches"][1], serde_json::json!({ "connection": 0, "seq": 7 }));
        assert_eq!(json["check"]["tenants_off"][0]["at_least"], 30);
        assert_eq!((json["check"]["exact"].as_bool(), json["check"]["batches_lost"].as_u64()), (Some(true), Some(2)));
        assert_eq!(json["check"]["waited"], 30.0);
        assert_eq!(json["check"]["sweep_s"], 1.5);
        assert_eq!(json["check"]["sweeps"], 12);
        assert_eq!(json["run"]["last_ack_unix_ms"], 1_700_000_000_000u64);
        assert_eq!(json["redis"]["items_per_s"], 500.0);
    }

    #[test]
    fn a_mixed_run_shows_each_kind_of_request_and_its_findings() {
        let mut run = figures(1000.0);
        run.operations.insert("batch".into(), figures(1000.0));
        let mut strong = figures(0.0);
        strong.errors_by_kind = BTreeMap::from([("wrong answer".to_owned(), 1), ("HTTP 503".to_owned(), 1)]);
        run.operations.insert("strong".into(), strong);
        let report = Report {
            mode: Mode::Mix,
            url: "http://127.0.0.1:5000".into(),
            connections: 2,
            batch: 100,
            tenants: 3,
            tenant_prefix: "load-x-".into(),
            repeat: 0.0,
            id_bytes: 16,
            rate: None,
            run,
            redis: None,
            ratio: None,
            check: None,
            mix: Some(MixFindings {
                shares: "strong=0.05,delete=0.01".parse().unwrap(),
                reads: crate::mix::Reads::default(),
                wrong_answers: 1,
                wrong: vec!["strong count of load-x-1 was 3, below the 5 ids acknowledged before it".into()],
                membership: Some(crate::mix::Membership {
                    tenants: 2,
                    gone_asked: 40,
                    gone_found: 1,
                    kept_asked: 30,
                    kept_missing: 0,
                }),
            }),
        };
        let table = report.table();
        for needle in [
            "mixed: 94.0% batches, 5.0% strong counts, 0.0% contains, 0.0% POST /counts, 1.00% deletes; strong \
             reads, POST /counts of 16 tenants, contains of 20 ids",
            "\n  batch           20          10        1000",
            "\n  strong          20          10           -",
            "strong errors: 1 × HTTP 503, 1 × wrong answer",
            "mix: 1 wrong answers -- FAILED: strong count of load-x-1 was 3",
            "2 tenants deleted; of the ids around their last delete, 1 of 40 acknowledged before are still there, 0 of \
             30 acknowledged since are missing -- FAILED",
        ] {
            assert!(table.contains(needle), "{needle:?} missing from\n{table}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["mode"], "mix");
        assert_eq!(json["run"]["operations"]["strong"]["errors_by_kind"]["wrong answer"], 1);
        assert_eq!(json["mix"]["membership"]["gone_found"], 1);
        assert_eq!(json["mix"]["shares"]["delete"], 0.01);
        assert_eq!(json["mix"]["reads"]["consistency"], "strong");
    }
}
