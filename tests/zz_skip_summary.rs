//! The last integration test of `cargo test`: lists every backend that a test
//! of this run skipped, and why (`docs/testing.md`, "Skipped backends").
//!
//! libtest shows the output of a passing test only with `--nocapture`, so
//! `common::backends::skip` records each skip in a registry under
//! `target/tmp/kvsieve-skips/<run>/` (one directory per `cargo test`
//! process) and this binary, built without the libtest harness so that its
//! output is never captured, prints the registry at the end of the run and
//! clears it. Cargo runs the integration tests in name order, hence the
//! `zz_` prefix; only the doc tests come after it.

mod common;

use std::collections::BTreeMap;

use common::backends::{run_id, skip_registry, skip_registry_root};

fn main() {
    let dir = skip_registry();
    // backend -> reason -> test binaries
    let mut skips: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let binary = f
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.rsplit_once('-'))
                .map_or_else(String::new, |(name, _pid)| name.to_string());
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            for line in text.lines() {
                if let Some((backend, reason)) = line.split_once('\t') {
                    let bins = skips
                        .entry(backend.to_string())
                        .or_default()
                        .entry(reason.to_string())
                        .or_default();
                    if !bins.contains(&binary) {
                        bins.push(binary.clone());
                    }
                }
            }
        }
    }
    println!();
    if skips.is_empty() {
        println!("kvsieve: no backend was skipped by the tests of this run.");
    } else {
        println!(
            "kvsieve: backends skipped by the tests of this run (KVSIEVE_REQUIRE=<backend> \
             makes a skip fail; see docs/testing.md):"
        );
        for (backend, reasons) in &skips {
            for (reason, bins) in reasons {
                println!("SKIPPED({backend}): {reason} [{}]", bins.join(", "));
            }
        }
    }
    println!();
    clear(&dir);
}

/// Removes this run's registry and those of runs whose cargo process is gone.
fn clear(dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir);
    let Ok(entries) = std::fs::read_dir(skip_registry_root()) else {
        return;
    };
    let me = run_id();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let alive = cfg!(target_os = "linux") && std::path::Path::new("/proc").join(&name).exists();
        if name != me && !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
