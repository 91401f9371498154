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
            let panels = [
                (left, format!("{}: prefix-cache hit rate (%)", rep.workload), hits, BAR),
                (right, format!("{}: p90 TTFT (s)", rep.workload), ttft, BAR2),
            ];
            for (panel, title, vals, color) in panels {
                let top = vals.iter().copied().fold(0.0f64, f64::max).max(1e-3) * 1.15;
                let mut chart = ChartBuilder::on(&panel)
                    .caption(title, ("sans-serif", 18))
                    .margin(10)
                    .x_label_area_size(90)
                    .y_label_area_size(50)
                    .build_cartesian_2d((0..n).into_segmented(), 0.0..top)
                    .map_err(err)?;
                let labels = names.clone();
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_labels(n.max(1))
                    .x_label_formatter(&|x| match x {
                        SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                        _ => String::new(),
                    })
                    .x_label_style(
                        ("sans-serif", 12).into_font().transform(FontTransform::Rotate90),
                    )
                    .draw()
                    .map_err(err)?;
                chart
                    .draw_series(
                        Histogram::vertical(&chart)
                            .style(color.filled())
                            .margin(8)
                            .data(vals.iter().enumerate().map(|(i, &v)| (i, v))),
                    )
                    .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    Ok(out)
}
