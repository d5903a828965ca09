//! PNG plots with plotters' bitmap backend. Text is drawn with an embedded DejaVu Sans
//! (assets/, Bitstream Vera licence) through ab_glyph, so no system fonts are needed.

use crate::metrics::LogHistogram;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (900, 600);

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded file is a valid TrueType font; failing here would be a build error.
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("embedded DejaVuSans.ttf is not a valid font"));
    });
}

/// A fixed colour per series name so every plot of a sweep agrees.
pub fn series_color(name: &str) -> RGBColor {
    match name {
        "gated" => RGBColor(214, 39, 40),
        "relu" => RGBColor(31, 119, 180),
        "topk" => RGBColor(44, 160, 44),
        "batchtopk" => RGBColor(148, 103, 189),
        "jumprelu" => RGBColor(255, 127, 14),
        _ => RGBColor(90, 90, 90),
    }
}

fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e}", path.display())
}

/// Padded (lo, hi) of finite values; a small range around a single value.
fn range(vals: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let v: Vec<f64> = vals
        .filter(|x| x.is_finite() && (!log || *x > 0.0))
        .collect();
    if v.is_empty() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if log {
        (lo / 1.25, hi * 1.25)
    } else {
        let pad = if hi > lo {
            (hi - lo) * 0.08
        } else {
            lo.abs().max(1e-3) * 0.1
        };
        (lo - pad, hi + pad)
    }
}

/// One curve per series (points joined in x order) on a log x axis.
pub fn curves_log_x(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
    y_ref: Option<f64>,
) -> Result<()> {
    register_font();
    let e = err(path);
    let (x0, x1) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)), true);
    let mut ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .collect();
    ys.extend(y_ref);
    let (y0, y1) = range(ys.into_iter(), false);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x0..x1)
                .log_scale()
                .with_key_points(log_key_points(x0, x1, &[1.0, 2.0, 5.0]))
                .with_light_points(log_key_points(x0, x1, &[3.0, 4.0, 6.0, 7.0, 8.0, 9.0])),
            y0..y1,
        )
        .map_err(&e)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 18))
        .x_label_formatter(&|v| log_tick(*v))
        .y_label_formatter(&|v| format_tick(*v))
        .draw()
        .map_err(&e)?;
    if let Some(r) = y_ref {
        chart
            .draw_series(LineSeries::new(vec![(x0, r), (x1, r)], BLACK.mix(0.4)))
            .map_err(&e)?;
    }
    for (name, pts) in series {
        let color = series_color(name);
        let mut pts: Vec<(f64, f64)> = pts
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && *x > 0.0 && y.is_finite())
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(&e)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))
            .map_err(&e)?;
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

/// Latent firing-frequency histogram on log10 bins; dead latents are stated in the title.
pub fn firing_histogram(path: &Path, title: &str, hist: &LogHistogram, dead: usize) -> Result<()> {
    register_font();
    let e = err(path);
    let first = hist.counts.iter().position(|&c| c > 0).unwrap_or(0);
    let last = hist
        .counts
        .iter()
        .rposition(|&c| c > 0)
        .unwrap_or(hist.counts.len() - 1);
    let (x0, _) = hist.edges(first.saturating_sub(1));
    let (_, x1) = hist.edges((last + 1).min(hist.counts.len() - 1));
    let y1 = hist.counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.1;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(&e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title} ({dead} dead latents not shown)"),
            (FAMILY, 22),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(&e)?;
    chart
        .configure_mesh()
        .x_desc("log10(firing frequency)")
        .y_desc("latents")
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 18))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(&e)?;
    let color = RGBColor(31, 119, 180);
    chart
        .draw_series(
            hist.counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| {
                    let (a, b) = hist.edges(i);
                    Rectangle::new([(a, 0.0), (b, c as f64)], color.mix(0.8).filled())
                }),
        )
        .map_err(&e)?;
    root.present().map_err(&e)?;
    Ok(())
}

/// `m * 10^k` for every mantissa `m` and power `k` that falls in `[lo, hi]`. The log axis takes
/// its labelled lines at 1, 2 and 5 from here: plotters' own choice can leave out a whole
/// decade (only 100, 200 and 300 on a 15..350 axis).
fn log_key_points(lo: f64, hi: f64, mantissas: &[f64]) -> Vec<f64> {
    if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
        return Vec::new();
    }
    let mut v = Vec::new();
    for k in lo.log10().floor() as i32..=hi.log10().ceil() as i32 {
        for m in mantissas {
            let x = m * 10f64.powi(k);
            if x >= lo * (1.0 - 1e-9) && x <= hi * (1.0 + 1e-9) {
                v.push(x);
            }
        }
    }
    v.sort_by(f64::total_cmp);
    v
}

/// Short tick labels: plain for moderate values, scientific otherwise.
/// Labels on a log axis only at 1, 2 and 5 times a power of ten (the other grid lines stay
/// unlabelled, so the labels do not run into each other).
fn log_tick(v: f64) -> String {
    if v <= 0.0 || !v.is_finite() {
        return String::new();
    }
    let e = 10f64.powf(v.log10().floor());
    let m = v / e;
    if [1.0, 2.0, 5.0].iter().any(|n| (m - n).abs() < 1e-6 * n) {
        let decimals = (-v.log10().floor()).max(0.0) as usize;
        format!("{v:.decimals$}")
    } else {
        String::new()
    }
}

fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e4).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tick_tests {
    #[test]
    fn log_key_points_cover_every_decade_in_range() {
        let v = super::log_key_points(15.0, 350.0, &[1.0, 2.0, 5.0]);
        assert_eq!(v, vec![20.0, 50.0, 100.0, 200.0]);
        let v = super::log_key_points(0.004, 0.03, &[1.0, 2.0, 5.0]);
        assert_eq!(v.len(), 3, "{v:?}"); // 0.005, 0.01, 0.02 (0.03 is not 1-2-5)
        assert!(super::log_key_points(0.0, 1.0, &[1.0]).is_empty());
    }

    #[test]
    fn log_ticks_label_only_1_2_5() {
        assert_eq!(super::log_tick(10.0), "10");
        assert_eq!(super::log_tick(200.0), "200");
        assert_eq!(super::log_tick(0.05), "0.05");
        assert_eq!(super::log_tick(60.0), "");
        assert_eq!(super::log_tick(0.0), "");
    }
}
