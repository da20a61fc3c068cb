//! Compiles every CUDA kernel of every dtype with NVRTC for sm_80 and sm_90 (no GPU needed),
//! checks that every registered entry point exists, and runs `ptxas -v` to report registers
//! and spills per kernel. A spill in a hot kernel (decode attention, Q·K logits, the row
//! normalisers) fails the test.
//!
//! Needs `libnvrtc` on the loader path (the `nvidia-cuda-nvrtc-cu12` wheel) and `ptxas`
//! (the `nvidia-cuda-nvcc-cu12` wheel) on `PATH` or in `KVSIEVE_PTXAS`; `.ci/run` sets both.
//! Without them the test prints `SKIPPED(cuda-nvrtc)` / `SKIPPED(cuda-ptxas)`, and fails
//! under `KVSIEVE_REQUIRE=cuda`.
#![cfg(feature = "cuda")]

mod common;

use common::backends::{required, skip};
use kvsieve::cuda::KernelId;
use kvsieve::cuda::kernels::{self, HOT_PREFIXES};
use std::path::PathBuf;
use std::process::Command;

const ARCHS: [(&str, &str); 2] = [("compute_80", "sm_80"), ("compute_90", "sm_90")];

fn skip_nvrtc(what: &str, reason: &str) {
    // `cuda` in KVSIEVE_REQUIRE demands the compile check too.
    let backend = format!("cuda-{what}");
    if required("cuda") {
        panic!("KVSIEVE_REQUIRE=cuda but {backend} is unavailable: {reason}");
    }
    skip(&backend, reason);
}

/// Resources of one compiled entry point, from `ptxas -v`.
#[derive(Debug, Default, Clone)]
struct Resources {
    name: String,
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
    smem: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

fn parse_ptxas(log: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Resources {
                name,
                ..Default::default()
            });
        } else if let Some(r) = out.last_mut() {
            if line.contains("bytes spill stores") {
                r.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

fn find_ptxas() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KVSIEVE_PTXAS") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("ptxas"))
        .find(|p| p.is_file())
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !kernels::nvrtc_available() {
        skip_nvrtc(
            "nvrtc",
            "libnvrtc could not be loaded (pip install nvidia-cuda-nvrtc-cu12 and put its lib/ on LD_LIBRARY_PATH)",
        );
        return;
    }
    let ptxas = find_ptxas();
    if ptxas.is_none() {
        skip_nvrtc(
            "ptxas",
            "ptxas not found (pip install nvidia-cuda-nvcc-cu12; set KVSIEVE_PTXAS or PATH)",
        );
    }
    let dir = std::env::temp_dir().join(format!("kvsieve-cuda-compile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for (virt, sm) in ARCHS {
        for id in KernelId::ALL {
            let ptx = match kernels::compile_ptx(id, virt) {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("{}: {e}", id.stem()));
                    continue;
                }
            };
            for name in id.entries() {
                if !ptx.contains(&format!(".entry {name}(")) {
                    failures.push(format!(
                        "{virt}: entry {name} missing from {}.cu",
                        id.stem()
                    ));
                }
            }
            let Some(ptxas) = &ptxas else { continue };
            let src = dir.join(format!("{}_{sm}.ptx", id.stem()));
            std::fs::write(&src, &ptx).expect("write ptx");
            let run = Command::new(ptxas)
                .arg("-v")
                .arg(format!("-arch={sm}"))
                .arg(&src)
                .arg("-o")
                .arg(dir.join(format!("{}_{sm}.cubin", id.stem())))
                .output();
            let run = match run {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("running {}: {e}", ptxas.display()));
                    continue;
                }
            };
            let log = String::from_utf8_lossy(&run.stderr).to_string()
                + &String::from_utf8_lossy(&run.stdout);
            if !run.status.success() {
                failures.push(format!("ptxas {sm} {}.cu failed:\n{log}", id.stem()));
                continue;
            }
            let res = parse_ptxas(&log);
            for name in id.entries() {
                if !res.iter().any(|r| r.name == name) {
                    failures.push(format!("{sm}: ptxas reported nothing for {name}"));
                }
            }
            for r in res {
                let hot = HOT_PREFIXES.iter().any(|p| r.name.starts_with(p));
                if hot && (r.spill_stores > 0 || r.spill_loads > 0) {
                    failures.push(format!(
                        "{sm}: hot kernel {} spills ({} B stores, {} B loads)",
                        r.name, r.spill_stores, r.spill_loads
                    ));
                }
                table.push((sm, r, hot));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !table.is_empty() {
        println!(
            "| arch | kernel | hot | registers | spill stores (B) | spill loads (B) | stack (B) | smem (B) |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (sm, r, hot) in &table {
            println!(
                "| {sm} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                if *hot { "yes" } else { "" },
                r.registers,
                r.spill_stores,
                r.spill_loads,
                r.stack,
                r.smem
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ptxas_log_parser_reads_resources() {
    let log = "ptxas info    : Compiling entry function 'k_f32' for 'sm_90'\n\
               ptxas info    : Function properties for k_f32\n    \
               8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 31 registers, used 1 barriers, 1160 bytes smem\n";
    let r = parse_ptxas(log);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (
            r[0].registers,
            r[0].spill_stores,
            r[0].spill_loads,
            r[0].stack,
            r[0].smem
        ),
        (31, 4, 12, 8, 1160)
    );
}
