//! The `--plot` chart: items/s (left axis) and p99 latency (right axis) second by second, for
//! the run and, with `--redis`, for the reference run, as an SVG file.

use std::path::Path;

use plotters::prelude::*;

use crate::report::{Figures, Mode, Report};
use crate::stats::Interval;

/// Draws `report`'s per-second series into the SVG file at `path`.
pub fn draw(report: &Report, path: &Path) -> anyhow::Result<()> {
    let unit = match report.mode {
        Mode::Post | Mode::Mix => "items/s",
        Mode::Count => "requests/s",
    };
    let runs: Vec<(&str, &Figures, RGBColor, RGBColor)> = [
        Some(("countapp", &report.run, BLUE, RED)),
        report.redis.as_ref().map(|redis| ("redis", redis, GREEN, MAGENTA)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let seconds = runs.iter().map(|(_, f, ..)| f.seconds).fold(1.0, f64::max);
    let peak = |value: fn(&Interval) -> f64| {
        let top = runs.iter().flat_map(|(_, f, ..)| f.per_second.iter().map(value)).fold(0.0, f64::max);
        // Headroom above the highest point; an empty run still gets a usable axis.
        if top > 0.0 { top * 1.1 } else { 1.0 }
    };

    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{} — {} connections, {} tenants", report.url, report.connections, report.tenants),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0.0..seconds, 0.0..peak(|s| s.items_per_s))?
        .set_secondary_coord(0.0..seconds, 0.0..peak(|s| s.p99_ms));
    chart.configure_mesh().x_desc("seconds").y_desc(unit).y_label_formatter(&|&rate| short(rate)).draw()?;
    chart.configure_secondary_axes().y_desc("p99 latency (ms)").y_label_formatter(&|ms| format!("{ms:.1}")).draw()?;
    for (name, figures, rate_color, p99_color) in runs {
        chart
            .draw_series(LineSeries::new(figures.per_second.iter().map(|s| (s.start, s.items_per_s)), rate_color))?
            .label(format!("{name} {unit}"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], rate_color));
        chart
            .draw_secondary_series(LineSeries::new(figures.per_second.iter().map(|s| (s.start, s.p99_ms)), p99_color))?
            .label(format!("{name} p99 ms"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], p99_color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A rate for an axis label: 850, 12k, 1.5M.
fn short(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.1}M", rate / 1e6)
    } else if rate >= 1e4 {
        format!("{:.0}k", rate / 1e3)
    } else {
        format!("{rate:.0}")
    }
}
