//! The progress bar shown on stderr while a run goes on: elapsed time, progress towards the
//! duration or item budget, the current rate and the errors so far.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;

use crate::drive::{Plan, Shared};

/// How often the bar is redrawn, and the window its rate is measured over.
const TICK: Duration = Duration::from_millis(500);

/// The bar's resolution: progress is shown in thousandths.
const STEPS: u64 = 1000;

/// A progress bar updated in the background until [`Progress::finish`].
pub struct Progress {
    bar: ProgressBar,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Shows a bar named `label` for a run following `plan`, counting `unit`s ("items",
    /// "requests"); nothing is shown when `quiet` or when stderr is not a terminal.
    pub fn start(label: &str, unit: &'static str, plan: Plan, shared: Arc<Shared>, quiet: bool) -> Progress {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress { bar: ProgressBar::hidden(), ticker: None };
        }
        let bar = ProgressBar::with_draw_target(Some(STEPS), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix:>8} {elapsed_precise} [{bar:30}] {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_owned());
        let ticker = tokio::spawn(tick(bar.clone(), unit, plan, shared));
        Progress { bar, ticker: Some(ticker) }
    }

    /// Stops updating and removes the bar.
    pub fn finish(self) {
        if let Some(ticker) = self.ticker {
            ticker.abort();
        }
        self.bar.finish_and_clear();
    }
}

async fn tick(bar: ProgressBar, unit: &'static str, plan: Plan, shared: Arc<Shared>) {
    let start = Instant::now();
    let mut interval = tokio::time::interval(TICK);
    let (mut last_at, mut last_items) = (start, 0);
    loop {
        interval.tick().await;
        let now = Instant::now();
        let items = shared.live.items.load(Ordering::Relaxed);
        let errors = shared.live.errors.load(Ordering::Relaxed);
        let rate = (items - last_items) as f64 / now.duration_since(last_at).as_secs_f64().max(1e-3);
        (last_at, last_items) = (now, items);
        let done = plan.progress(now - start, shared.claimed.load(Ordering::Relaxed));
        bar.set_position((done * STEPS as f64) as u64);
        bar.set_message(format!("{rate:>10.0} {unit}/s  {errors} errors"));
    }
}
