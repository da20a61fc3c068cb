//! Line plots of the `eval` example (synthetic and real-model runs): ticks
//! exactly at the x values run, labelled with them; the legend in its own
//! column right of the plot, so it never covers data; series told apart by
//! colour, marker shape and line width.

use std::path::Path;

use plotters::coord::combinators::BindKeyPoints;
use plotters::prelude::*;

/// One line: its name and its `(x, y)` points in data units.
pub type Series = Vec<(String, Vec<(f64, f64)>)>;

/// An axis: data range, log or linear, and (x only) the tick positions.
pub struct Axis<'a> {
    pub desc: &'a str,
    pub log: bool,
    /// Tick positions with their labels (in data units). Empty: automatic.
    pub ticks: Vec<(f64, String)>,
    /// `(lo, hi)` in data units; `None`: the data's range, padded.
    pub range: Option<(f64, f64)>,
}

/// Thirteen colours that stay apart on white (Tableau 10 and three more).
const COLORS: [(u8, u8, u8); 13] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 0),
    (0, 0, 128),
    (128, 128, 0),
];

fn to_axis(log: bool, v: f64) -> f64 {
    if log { v.max(1e-300).log10() } else { v }
}

/// A short label of `v`: `0.001`, `0.25`, `12`, `3e-5`.
pub fn short(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.0e}");
        return s.replace("e0", "").replace("e-0", "e-");
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Draws `series` into an SVG at `path`. Log axes are drawn by plotting
/// `log10` of the data on a linear axis and labelling ticks with the data
/// values, so ticks sit exactly where asked.
pub fn line_plot(
    path: &Path,
    title: &str,
    x: &Axis,
    y: &Axis,
    series: &Series,
) -> Result<(), Box<dyn std::error::Error>> {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| to_axis(x.log, p.0)))
        .chain(x.ticks.iter().map(|t| to_axis(x.log, t.0)))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| to_axis(y.log, p.1)))
        .collect();
    if xs.is_empty() || ys.is_empty() {
        return Err("nothing to plot".into());
    }
    let span = |v: &[f64], r: Option<(f64, f64)>, log: bool| {
        let (lo, hi) = match r {
            Some((a, b)) => (to_axis(log, a), to_axis(log, b)),
            None => (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ),
        };
        let pad = ((hi - lo) * 0.06).max(if log { 0.05 } else { 0.01 });
        if r.is_some() {
            (lo, hi)
        } else {
            (lo - pad, hi + pad)
        }
    };
    let (x0, x1) = span(&xs, x.range, x.log);
    let (y0, y1) = span(&ys, y.range, y.log);

    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, legend) = root.split_horizontally(790);
    let x_ticks: Vec<(f64, String)> = x
        .ticks
        .iter()
        .map(|(v, l)| (to_axis(x.log, *v), l.clone()))
        .collect();
    // x in integer milli-units of the axis (plotters formats custom key
    // points of integer axes only).
    let milli = |v: f64| (v * 1000.0).round() as i64;
    let key: Vec<i64> = x_ticks.iter().map(|t| milli(t.0)).collect();
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((milli(x0)..milli(x1)).with_key_points(key), y0..y1)?;
    let (xlog, ylog) = (x.log, y.log);
    let x_fmt = move |v: &i64| {
        x_ticks
            .iter()
            .find(|t| milli(t.0) == *v)
            .map(|t| t.1.clone())
            .unwrap_or_else(|| {
                let v = *v as f64 / 1000.0;
                short(if xlog { 10f64.powf(v) } else { v })
            })
    };
    let y_fmt = move |v: &f64| short(if ylog { 10f64.powf(*v) } else { *v });
    chart
        .configure_mesh()
        .x_desc(x.desc)
        .y_desc(y.desc)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let (r, g, b) = COLORS[i % COLORS.len()];
        let color = RGBColor(r, g, b).mix(0.9);
        let style = if i % 2 == 0 {
            color.stroke_width(2)
        } else {
            color.stroke_width(1)
        };
        let pts: Vec<(i64, f64)> = pts
            .iter()
            .map(|&(a, b)| (milli(to_axis(xlog, a)), to_axis(ylog, b)))
            .collect();
        chart.draw_series(LineSeries::new(pts.clone(), style))?;
        // Alternate markers so overlapping series stay distinguishable.
        let marker = i % 3;
        match marker {
            0 => {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            }
            1 => {
                chart.draw_series(
                    pts.iter()
                        .map(|&p| TriangleMarker::new(p, 5, color.filled())),
                )?;
            }
            _ => {
                chart.draw_series(pts.iter().map(|&p| Cross::new(p, 4, color.stroke_width(2))))?;
            }
        }
        // The legend column: line, marker and name.
        let ly = 30 + 22 * i as i32;
        legend.draw(&PathElement::new(vec![(5, ly), (35, ly)], style))?;
        match marker {
            0 => legend.draw(&Circle::new((20, ly), 4, color.filled()))?,
            1 => legend.draw(&TriangleMarker::new((20, ly), 5, color.filled()))?,
            _ => legend.draw(&Cross::new((20, ly), 4, color.stroke_width(2)))?,
        }
        legend.draw(&Text::new(name.clone(), (42, ly - 7), ("sans-serif", 14)))?;
    }
    root.present()?;
    Ok(())
}
