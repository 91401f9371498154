//! The SVG chart: hit rate and p90 TTFT by policy, one panel pair per workload.
//!
//! Drawn with `plotters`' SVG backend only (no system fonts needed: text is emitted as SVG
//! `<text>` elements and laid out by the viewer).

use crate::report::Report;
use kvroute::{Error, Result};
use plotters::prelude::*;

const BAR: RGBColor = RGBColor(0x3b, 0x6e, 0xa8);
const BAR2: RGBColor = RGBColor(0xd9, 0x7a, 0x2b);

fn err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Io(format!("svg: {e:?}"))
}

/// Renders `reports` as one SVG document: per workload, hit rate (%) and p90 TTFT (s) bars
/// by policy.
pub fn svg(reports: &[Report]) -> Result<String> {
    let mut out = String::new();
    let rows = reports.len().max(1) as u32;
    {
        let root = SVGBackend::with_string(&mut out, (1100, 380 * rows)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        for (area, rep) in root.split_evenly((rows as usize, 1)).iter().zip(reports) {
            let (left, right) = area.split_horizontally(550);
            let n = rep.results.len();
            let names: Vec<String> = rep.results.iter().map(|r| r.policy.clone()).collect();
            let hits: Vec<f64> = rep.results.iter().map(|r| r.hit_rate * 100.0).collect();
            let ttft: Vec<f64> = rep.results.iter().map(|r| r.ttft_p90_s.unwrap_or(0.0)).collect();
            // Rows without a TTFT (the oracle has no time model) say so instead of "0".
            let has_ttft: Vec<bool> = rep.results.iter().map(|r| r.ttft_p90_s.is_some()).collect();
            let panels = [
                (left, format!("{}: prefix-cache hit rate (%)", rep.workload), hits, BAR, None),
                (right, format!("{}: p90 TTFT (s)", rep.workload), ttft, BAR2, Some(&has_ttft)),
            ];
            for (panel, title, vals, color, known) in panels {
                // Horizontal bars: policy names read left to right, values at the bar ends.
                let top = vals.iter().copied().fold(0.0f64, f64::max).max(1e-3) * 1.2;
                let mut chart = ChartBuilder::on(&panel)
                    .caption(title, ("sans-serif", 18))
                    .margin(12)
                    .x_label_area_size(30)
                    .y_label_area_size(120)
                    .build_cartesian_2d(0.0..top, (0..n).into_segmented())
                    .map_err(err)?;
                let labels = names.clone();
                chart
                    .configure_mesh()
                    .disable_y_mesh()
                    .y_labels(n.max(1))
                    .y_label_formatter(&|y| match y {
                        SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                        _ => String::new(),
                    })
                    .y_label_style(("sans-serif", 13))
                    .x_label_style(("sans-serif", 12))
                    .draw()
                    .map_err(err)?;
                chart
                    .draw_series(
                        Histogram::horizontal(&chart)
                            .style(color.filled())
                            .margin(4)
                            .data(vals.iter().enumerate().map(|(i, &v)| (i, v))),
                    )
                    .map_err(err)?;
                chart
                    .draw_series(vals.iter().enumerate().map(|(i, &v)| {
                        let text = if known.is_some_and(|k| !k[i]) {
                            "n/a".to_string()
                        } else if v >= 10.0 {
                            format!("{v:.1}")
                        } else if v >= 1.0 {
                            format!("{v:.2}")
                        } else {
                            format!("{v:.3}")
                        };
                        Text::new(
                            text,
                            (v + top * 0.01, SegmentValue::CenterOf(i)),
                            ("sans-serif", 12).into_font(),
                        )
                    }))
                    .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    Ok(out)
}
