//! What the `coordinator` and `worker` binaries share at their edge: log set-up, the rotation of
//! a worker's log file, how an error ends the process, and the coordinator's reset.

pub mod log_file;
pub mod reset;

use std::process::ExitCode;

use countapp_server::client_errors;
use countapp_shared::config::LogFormat;
use countapp_shared::spawn::LOG_FILE_ENV;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{self, FilterExt};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::{self, Context, Filter, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

use crate::log_file::RotatingStderr;

/// Which process logs, named in every JSON line so that lines shipped from many files into one
/// place still say where they came from.
#[derive(Debug, Clone, Copy)]
pub enum Process {
    /// The coordinator.
    Coordinator,
    /// The worker on this port.
    Worker(u16),
}

/// Logs to stderr with `tracing`, at the level of `RUST_LOG` (default `info`), as text lines or
/// JSON objects. A worker whose stderr is its log file under `worker_logs` (the coordinator
/// says so through [`LOG_FILE_ENV`]) rotates that file at `max_bytes`, keeping `keep`
/// rotated files. A client's protocol error, which actix logs as an ERROR, is counted and
/// logged at debug level instead (see [`client_errors`]): a client must not be able to fill
/// the log.
pub fn init_logging(format: LogFormat, process: Process, rotation: Option<(u64, u32)>) {
    let writer = match (rotation, std::env::var_os(LOG_FILE_ENV)) {
        (Some((max_bytes, keep)), Some(path)) => RotatingStderr::new(path.into(), max_bytes, keep),
        _ => RotatingStderr::plain(),
    };
    let level = || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let output = match format {
        LogFormat::Text => text_layer(writer).with_filter(level().and(HideClientErrors)).boxed(),
        LogFormat::Json => json_layer(writer, process).with_filter(level().and(HideClientErrors)).boxed(),
    };
    let counting = CountClientErrors.with_filter(filter::filter_fn(client_errors::may_be_client_error));
    tracing_subscriber::registry().with(output).with(counting).init();
}

fn text_layer<S>(writer: RotatingStderr) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, not in the workers' log files.
    let ansi = writer.is_plain() && std::io::stderr().is_terminal();
    tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi)
}

fn json_layer<S>(writer: RotatingStderr, process: Process) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let fields = match process {
        Process::Coordinator => r#""process":"coordinator","#.to_owned(),
        Process::Worker(port) => format!(r#""process":"worker","port":{port},"#),
    };
    tracing_subscriber::fmt::layer()
        .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
        .event_format(WithFields { inner: tracing_subscriber::fmt::format().json(), fields })
        .with_writer(writer)
}

/// tracing-subscriber's JSON lines with fields of the process's own in front: the formatter
/// has no static fields, and a span entered on every thread of every runtime would be a hook
/// in each of them.
struct WithFields<F> {
    inner: F,
    /// `"key":value,` pairs, each followed by a comma, written after the opening brace.
    fields: String,
}

impl<S, N, F> FormatEvent<S, N> for WithFields<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                writer.write_char('{')?;
                writer.write_str(&self.fields)?;
                writer.write_str(rest)
            }
            None => writer.write_str(&line),
        }
    }
}

impl<'a> MakeWriter<'a> for RotatingStderr {
    type Writer = &'a RotatingStderr;
    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Keeps actix's report of a client's protocol error out of the log output.
struct HideClientErrors;

impl<S> Filter<S> for HideClientErrors {
    fn enabled(&self, _: &tracing::Metadata<'_>, _: &layer::Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &layer::Context<'_, S>) -> bool {
        client_errors::is_client_error(event).is_none()
    }
}

/// Counts actix's reports of clients' protocol errors, and logs each at debug level.
struct CountClientErrors;

impl<S: Subscriber> Layer<S> for CountClientErrors {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if let Some(error) = client_errors::is_client_error(event) {
            client_errors::counter().inc();
            tracing::debug!(error, "a client's connection ended in a protocol error");
        }
    }
}

/// Ends a binary's `main`: nothing on success; on an error, its chain on stderr, one cause a
/// line (`error: ...` then `  caused by: ...`), and exit status 1.
///
/// A returned error is the operator's to act on (a bad config, a port taken, a directory not
/// writable): what went wrong and why, whatever `RUST_BACKTRACE` says, which then only adds a
/// backtrace to a panic, a bug of CountApp's own. Returning `anyhow::Result` from `main` would
/// print the error's `Debug` instead, a backtrace of dozens of frames under `RUST_BACKTRACE=1`.
pub fn exit_status(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprint!("{}", error_report(&error));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, one a line: `error: ...`, then `  caused by: ...` for each cause.
pub fn error_report(error: &anyhow::Error) -> String {
    let mut report = format!("error: {error}\n");
    for cause in error.chain().skip(1) {
        report.push_str(&format!("  caused by: {cause}\n"));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_reads_as_its_chain_one_cause_a_line() {
        let error = anyhow::anyhow!("worker_persist: invalid value").context("loading config.yaml");
        assert_eq!(error_report(&error), "error: loading config.yaml\n  caused by: worker_persist: invalid value\n");
    }
}
