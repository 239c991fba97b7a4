//! The metrics every Prometheus exporter is expected to have, for both servers: the standard
//! `process_*` series (CPU seconds, resident memory, open and allowed file descriptors, start
//! time), read from `/proc/self` at each scrape, and a `build_info` gauge naming the version.
//! The `process_*` series carry no prefix, as in every other exporter, so that the dashboards
//! and alerts written for them work unchanged.

use std::fs;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// The label of `build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Registers `build_info` in `registry`: 1, with the `version` label, so that a dashboard sees
/// which version each process runs, and when that changed.
pub fn register_build_info(registry: &mut Registry, version: &str) {
    let info = Family::<BuildLabels, Gauge>::default();
    info.get_or_create(&BuildLabels { version: version.to_owned() }).set(1);
    registry.register("build_info", "The version this process runs, in the version label; always 1", info);
}

/// `registry` then the `process_*` series, as Prometheus (OpenMetrics) text ending in `# EOF`.
pub fn encode(registry: &Registry) -> String {
    let mut process = Registry::default();
    process.register_collector(Box::new(ProcessCollector));
    let mut text = String::new();
    encode_registry(&mut text, registry).expect("writing to a String cannot fail");
    encode_registry(&mut text, &process).expect("writing to a String cannot fail");
    encode_eof(&mut text).expect("writing to a String cannot fail");
    text
}

/// Reads `/proc/self` at each scrape; a figure that cannot be read is left out.
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessFigures {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
    start_time_seconds: Option<f64>,
}

impl ProcessFigures {
    fn read() -> ProcessFigures {
        // SAFETY: sysconf only reads a constant of the system.
        let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // The fields after the parenthesised command name, which may hold spaces: the state is
        // the first (field 3 of proc(5)), so field N is at N - 3.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let per_tick = (ticks > 0).then(|| 1.0 / ticks as f64);
        let cpu_seconds = match (field(14), field(15), per_tick) {
            (Some(user), Some(system), Some(per_tick)) => Some((user + system) as f64 * per_tick),
            _ => None,
        };
        let boot_time = fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines().find_map(|line| line.strip_prefix("btime ").and_then(|t| t.trim().parse::<u64>().ok()))
        });
        let start_time_seconds = match (boot_time, field(22), per_tick) {
            (Some(boot), Some(start), Some(per_tick)) => Some(boot as f64 + start as f64 * per_tick),
            _ => None,
        };
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes only into the struct it is given.
        let max_fds = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0)
            .then(|| i64::try_from(limit.rlim_cur).unwrap_or(i64::MAX));
        ProcessFigures {
            cpu_seconds,
            resident_bytes: field(24).map(|pages| (pages as i64).saturating_mul(page)),
            virtual_bytes: field(23).map(|bytes| bytes as i64),
            open_fds: fs::read_dir("/proc/self/fd").ok().map(|dir| dir.count() as i64),
            max_fds,
            start_time_seconds,
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let figures = ProcessFigures::read();
        if let Some(seconds) = figures.cpu_seconds {
            let metric = ConstCounter::new(seconds);
            let help = "User and system CPU time spent, in seconds";
            metric.encode(encoder.encode_descriptor("process_cpu_seconds", help, None, metric.metric_type())?)?;
        }
        let gauges = [
            ("process_resident_memory_bytes", "Resident memory size, in bytes", figures.resident_bytes),
            ("process_virtual_memory_bytes", "Virtual memory size, in bytes", figures.virtual_bytes),
            ("process_open_fds", "Open file descriptors", figures.open_fds),
            ("process_max_fds", "The most file descriptors this process may open", figures.max_fds),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let metric = ConstGauge::new(value);
                metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)?;
            }
        }
        if let Some(seconds) = figures.start_time_seconds {
            let metric = ConstGauge::new(seconds);
            let help = "Start time of the process since the unix epoch, in seconds";
            metric.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                help,
                None,
                metric.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_read_from_proc() {
        let figures = ProcessFigures::read();
        assert!(figures.cpu_seconds.is_some_and(|s| s >= 0.0), "{figures:?}");
        assert!(figures.resident_bytes.is_some_and(|b| b > 0), "{figures:?}");
        assert!(figures.open_fds.is_some_and(|n| n > 0), "{figures:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(figures.start_time_seconds.is_some_and(|t| t <= now + 1.0 && t > now - 86_400.0), "{figures:?}");
    }

    #[test]
    fn the_exposition_ends_once_after_the_process_series() {
        let mut registry = Registry::with_prefix("countapp_test");
        register_build_info(&mut registry, "1.2.3");
        let text = encode(&registry);
        assert!(text.contains("countapp_test_build_info{version=\"1.2.3\"} 1\n"), "{text}");
        assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");
        assert!(text.contains("\nprocess_open_fds "), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }
}
