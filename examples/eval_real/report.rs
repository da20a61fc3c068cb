//! Tables (stdout), CSV, JSON and SVG plots of the real-text results.

use std::fmt::Write as _;
use std::path::Path;

use super::tasks::{PasskeyRow, PplRow};

/// Policies in first-seen order.
fn policies<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for n in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

pub fn ppl_table(rows: &[PplRow], budgets: &[usize], header: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{header}");
    let _ = write!(s, "| policy |");
    for b in budgets {
        let _ = write!(s, " {b} |");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|{}", "---|".repeat(budgets.len()));
    for p in policies(rows.iter().map(|r| r.spec.policy.as_str())) {
        let _ = write!(s, "| {p} |");
        for &b in budgets {
            let r = rows
                .iter()
                .find(|r| r.spec.policy == p && r.spec.budget.is_none_or(|x| x == b));
            match r {
                Some(r) => {
                    let _ = write!(s, " {:.4} ({:.0}) |", r.ratio, r.kv_tokens);
                }
                None => {
                    let _ = write!(s, " – |");
                }
            }
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "cells: perplexity / perplexity of the full cache (mean KV tokens per head while scoring); columns: budget in tokens per KV head"
    );
    s
}

pub fn passkey_table(rows: &[PasskeyRow], lengths: &[usize]) -> String {
    let mut s = String::new();
    let _ = write!(s, "| policy | budget |");
    for l in lengths {
        let _ = write!(s, " {l} |");
    }
    let _ = writeln!(s, " all |");
    let _ = writeln!(s, "|---|---|{}---|", "---|".repeat(lengths.len()));
    let mut keys: Vec<(String, Option<usize>)> = Vec::new();
    for r in rows {
        let k = (r.spec.policy.clone(), r.spec.budget);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    for (p, b) in keys {
        let sel: Vec<&PasskeyRow> = rows
            .iter()
            .filter(|r| r.spec.policy == p && r.spec.budget == b)
            .collect();
        let acc = |f: &dyn Fn(&PasskeyRow) -> bool| {
            let v: Vec<&&PasskeyRow> = sel.iter().filter(|r| f(r)).collect();
            let ok = v.iter().filter(|r| r.correct).count();
            format!("{ok}/{}", v.len())
        };
        let _ = write!(
            s,
            "| {p} | {} |",
            b.map_or("–".to_string(), |b| b.to_string())
        );
        for &l in lengths {
            let _ = write!(s, " {} |", acc(&|r| r.length == l));
        }
        let _ = writeln!(s, " {} |", acc(&|_| true));
    }
    let _ = writeln!(
        s,
        "cells: passkeys retrieved / trials (every depth); columns: prompt length in tokens"
    );
    s
}

fn budget_str(b: Option<usize>) -> String {
    b.map_or(String::new(), |b| b.to_string())
}

fn json_str(s: &str) -> String {
    let mut o = String::from('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn csv_str(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `ppl.csv`, `passkey.csv`, `results.json`.
pub fn write_files(
    dir: &Path,
    ppl: &[PplRow],
    passkey: &[PasskeyRow],
    meta: &[(&str, String)],
) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut js = String::from("{\n  \"meta\": {");
    for (i, (k, v)) in meta.iter().enumerate() {
        let _ = write!(
            js,
            "{}\n    {}: {}",
            if i > 0 { "," } else { "" },
            json_str(k),
            json_str(v)
        );
    }
    js.push_str("\n  },\n  \"perplexity\": [");
    if !ppl.is_empty() {
        let mut csv = String::from("policy,budget,ppl,ppl_ratio,kv_tokens,scored_tokens\n");
        for (i, r) in ppl.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{}",
                r.spec.policy,
                budget_str(r.spec.budget),
                r.ppl,
                r.ratio,
                r.kv_tokens,
                r.scored
            );
            let _ = write!(
                js,
                "{}\n    {{\"policy\": {}, \"budget\": {}, \"ppl\": {}, \"ppl_ratio\": {}, \"kv_tokens\": {}, \"scored_tokens\": {}}}",
                if i > 0 { "," } else { "" },
                json_str(&r.spec.policy),
                r.spec.budget.map_or("null".to_string(), |b| b.to_string()),
                r.ppl,
                r.ratio,
                r.kv_tokens,
                r.scored
            );
        }
        std::fs::write(dir.join("ppl.csv"), csv)?;
        written.push("ppl.csv".to_string());
    }
    js.push_str("\n  ],\n  \"passkey\": [");
    if !passkey.is_empty() {
        let mut csv = String::from(
            "policy,budget,length,depth_percent,trial,passkey,answer,correct,kv_tokens\n",
        );
        for (i, r) in passkey.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{}",
                r.spec.policy,
                budget_str(r.spec.budget),
                r.length,
                r.depth,
                r.trial,
                r.passkey,
                csv_str(&r.answer),
                r.correct,
                r.kv_tokens
            );
            let _ = write!(
                js,
                "{}\n    {{\"policy\": {}, \"budget\": {}, \"length\": {}, \"depth_percent\": {}, \"trial\": {}, \"passkey\": {}, \"answer\": {}, \"correct\": {}, \"kv_tokens\": {}}}",
                if i > 0 { "," } else { "" },
                json_str(&r.spec.policy),
                r.spec.budget.map_or("null".to_string(), |b| b.to_string()),
                r.length,
                r.depth,
                r.trial,
                r.passkey,
                json_str(&r.answer),
                r.correct,
                r.kv_tokens
            );
        }
        std::fs::write(dir.join("passkey.csv"), csv)?;
        written.push("passkey.csv".to_string());
    }
    js.push_str("\n  ]\n}\n");
    std::fs::write(dir.join("results.json"), js)?;
    written.push("results.json".to_string());
    Ok(written)
}

type Series = Vec<(String, Vec<(f64, f64)>)>;

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

/// One line per series over categorical x positions `xs` (labelled
/// `x_labels`), legend to the right of the plot area.
#[allow(clippy::too_many_arguments)]
fn line_plot(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    x_labels: &[String],
    y_range: (f64, f64),
    series: &Series,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (plot, legend) = root.split_horizontally(780);
    let n = x_labels.len().max(1);
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.3f64..(n as f64 - 0.7), y_range.0..y_range.1)?;
    let labels = x_labels.to_vec();
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(n)
        .x_label_formatter(&move |x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let (r, g, b) = COLORS[i % COLORS.len()];
        let color = RGBColor(r, g, b).mix(0.9);
        let style = if i % 2 == 0 {
            color.stroke_width(2)
        } else {
            color.stroke_width(1)
        };
        chart.draw_series(LineSeries::new(pts.clone(), style))?;
        // Alternate markers so overlapping series stay distinguishable.
        match i % 3 {
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
        let y = 30 + 22 * i as i32;
        legend.draw(&PathElement::new(vec![(5, y), (30, y)], style))?;
        legend.draw(&Text::new(name.clone(), (36, y - 7), ("sans-serif", 14)))?;
    }
    root.present()?;
    Ok(())
}

/// `ppl_ratio_vs_budget.svg`.
pub fn plot_ppl(
    dir: &Path,
    rows: &[PplRow],
    budgets: &[usize],
) -> Result<String, Box<dyn std::error::Error>> {
    let mut series: Series = Vec::new();
    for p in policies(rows.iter().map(|r| r.spec.policy.as_str())) {
        let pts: Vec<(f64, f64)> = budgets
            .iter()
            .enumerate()
            .filter_map(|(i, &b)| {
                rows.iter()
                    .find(|r| r.spec.policy == p && r.spec.budget.is_none_or(|x| x == b))
                    .map(|r| (i as f64, r.ratio))
            })
            .collect();
        series.push((p.to_string(), pts));
    }
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .collect();
    let hi = ys.iter().copied().fold(1.0, f64::max);
    let lo = ys.iter().copied().fold(1.0, f64::min);
    let pad = ((hi - lo) * 0.08).max(0.01);
    let name = "ppl_ratio_vs_budget.svg";
    line_plot(
        &dir.join(name),
        "real-text perplexity vs KV budget (ratio to the full cache)",
        "budget (tokens per KV head)",
        "perplexity / full-cache perplexity",
        &budgets.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        (lo - pad, hi + pad),
        &series,
    )?;
    Ok(name.to_string())
}

/// `passkey_vs_depth_b<B>.svg` for each passkey budget: accuracy over every
/// length and trial at each depth, one line per policy (full included).
pub fn plot_passkey(
    dir: &Path,
    rows: &[PasskeyRow],
    depths: &[usize],
    budgets: &[usize],
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut names = Vec::new();
    for &b in budgets {
        let mut series: Series = Vec::new();
        for p in policies(rows.iter().map(|r| r.spec.policy.as_str())) {
            let pts: Vec<(f64, f64)> = depths
                .iter()
                .enumerate()
                .filter_map(|(i, &d)| {
                    let sel: Vec<&PasskeyRow> = rows
                        .iter()
                        .filter(|r| {
                            r.spec.policy == p
                                && r.spec.budget.is_none_or(|x| x == b)
                                && r.depth == d
                        })
                        .collect();
                    (!sel.is_empty()).then(|| {
                        let ok = sel.iter().filter(|r| r.correct).count();
                        // A small per-series offset keeps equal accuracies apart.
                        let nudge = 0.006 * (series.len() as f64 - 6.0);
                        (i as f64, ok as f64 / sel.len() as f64 + nudge)
                    })
                })
                .collect();
            series.push((p.to_string(), pts));
        }
        let name = format!("passkey_vs_depth_b{b}.svg");
        line_plot(
            &dir.join(&name),
            &format!(
                "passkey retrieval vs depth, budget {b} (all lengths; lines offset by ±0.04 to stay visible)"
            ),
            "depth of the key in the filler (%)",
            "accuracy",
            &depths.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            (-0.05, 1.05),
            &series,
        )?;
        names.push(name);
    }
    Ok(names)
}
