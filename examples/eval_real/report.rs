//! Tables (stdout), CSV, JSON and SVG plots of the real-text results.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::tasks::{PasskeyRow, PplRow};
use crate::plot::{Axis, Series, line_plot};

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

/// A perplexity row of `ppl.csv` / `results.json`.
#[derive(Serialize)]
struct PplRecord<'a> {
    policy: &'a str,
    /// `None` for the full cache.
    budget: Option<usize>,
    ppl: f64,
    ppl_ratio: f64,
    kv_tokens: f64,
    scored_tokens: usize,
}

/// A passkey row of `passkey.csv` / `results.json`.
#[derive(Serialize)]
struct PasskeyRecord<'a> {
    policy: &'a str,
    budget: Option<usize>,
    length: usize,
    depth_percent: usize,
    trial: usize,
    passkey: u32,
    answer: &'a str,
    correct: bool,
    kv_tokens: f64,
}

fn csv_file<R: Serialize>(path: &Path, rows: &[R]) -> Result<(), Box<dyn std::error::Error>> {
    let mut w = csv::Writer::from_path(path)?;
    for r in rows {
        w.serialize(r)?;
    }
    w.flush()?;
    Ok(())
}

/// `ppl.csv`, `passkey.csv` (the `csv` crate) and `results.json`
/// (`serde_json`: `{"meta": {...}, "perplexity": [...], "passkey": [...]}`).
pub fn write_files(
    dir: &Path,
    ppl: &[PplRow],
    passkey: &[PasskeyRow],
    meta: serde_json::Value,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let ppl: Vec<PplRecord> = ppl
        .iter()
        .map(|r| PplRecord {
            policy: &r.spec.policy,
            budget: r.spec.budget,
            ppl: r.ppl,
            ppl_ratio: r.ratio,
            kv_tokens: r.kv_tokens,
            scored_tokens: r.scored,
        })
        .collect();
    let passkey: Vec<PasskeyRecord> = passkey
        .iter()
        .map(|r| PasskeyRecord {
            policy: &r.spec.policy,
            budget: r.spec.budget,
            length: r.length,
            depth_percent: r.depth,
            trial: r.trial,
            passkey: r.passkey,
            answer: &r.answer,
            correct: r.correct,
            kv_tokens: r.kv_tokens,
        })
        .collect();
    if !ppl.is_empty() {
        csv_file(&dir.join("ppl.csv"), &ppl)?;
        written.push("ppl.csv".to_string());
    }
    if !passkey.is_empty() {
        csv_file(&dir.join("passkey.csv"), &passkey)?;
        written.push("passkey.csv".to_string());
    }
    let js = serde_json::json!({ "meta": meta, "perplexity": ppl, "passkey": passkey });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&js)? + "\n",
    )?;
    written.push("results.json".to_string());
    Ok(written)
}

/// `ppl_ratio_vs_budget.svg` (log-scale budgets, ticks at those run).
pub fn plot_ppl(
    dir: &Path,
    rows: &[PplRow],
    budgets: &[usize],
) -> Result<String, Box<dyn std::error::Error>> {
    let mut series: Series = Vec::new();
    for p in policies(rows.iter().map(|r| r.spec.policy.as_str())) {
        let pts: Vec<(f64, f64)> = budgets
            .iter()
            .filter_map(|&b| {
                rows.iter()
                    .find(|r| r.spec.policy == p && r.spec.budget.is_none_or(|x| x == b))
                    .map(|r| (b as f64, r.ratio))
            })
            .collect();
        series.push((p.to_string(), pts));
    }
    let name = "ppl_ratio_vs_budget.svg";
    line_plot(
        &dir.join(name),
        "real-text perplexity vs KV budget (ratio to the full cache)",
        &Axis {
            desc: "budget (tokens per KV head)",
            log: true,
            ticks: budgets.iter().map(|&b| (b as f64, b.to_string())).collect(),
            range: None,
        },
        &Axis {
            desc: "perplexity / full-cache perplexity",
            log: false,
            ticks: Vec::new(),
            range: None,
        },
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
                .filter_map(|&d| {
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
                        (d as f64, ok as f64 / sel.len() as f64 + nudge)
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
            &Axis {
                desc: "depth of the key in the filler (%)",
                log: false,
                ticks: depths.iter().map(|&d| (d as f64, d.to_string())).collect(),
                range: None,
            },
            &Axis {
                desc: "accuracy",
                log: false,
                ticks: Vec::new(),
                range: Some((-0.05, 1.05)),
            },
            &series,
        )?;
        names.push(name);
    }
    Ok(names)
}
