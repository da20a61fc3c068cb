//! `backend_suite!`: expands generic test bodies once per compiled backend.
//!
//! ```ignore
//! fn softmax_matches_reference<B: kvsieve::Ops>(b: &B) { ... }
//! backend_suite!(softmax_matches_reference);
//! ```
//!
//! expands to `reference::softmax_matches_reference`, and one module per
//! other backend compiled in, each with the same test names, so
//! `cargo test reference::` runs one backend. The `cpu` module runs each
//! body once per instruction set in [`cpu_isas`] (scalar first, then every
//! vector ISA the machine has; `KVSIEVE_ISA` narrows the list).
//!
//! GPU backends that find no device print `SKIPPED(<backend>): <reason>`
//! (shown without `--nocapture`, and listed again at the end of the run by
//! `tests/zz_skip_summary.rs`); with `KVSIEVE_REQUIRE=<backend>[,<backend>]`
//! a skip is a failure. The `cuda` arm runs on the CPU SIMT simulator (feature
//! `cuda-sim`) when there is no GPU, or always under `KVSIEVE_REQUIRE=cuda-sim`.

/// True when the environment demands that `backend` runs.
pub fn required(backend: &str) -> bool {
    std::env::var("KVSIEVE_REQUIRE")
        .map(|v| v.split(',').any(|b| b.trim() == backend))
        .unwrap_or(false)
}

/// Reports a skip loudly, or panics when the backend is required (the `cuda` arm is also
/// required by `cuda-sim`, the CUDA backend on its CPU simulator).
///
/// libtest captures `eprintln!` of a passing test, so a skip is also
/// recorded in the run's skip registry ([`skip_registry`]), which the last
/// integration test (`tests/zz_skip_summary.rs`) prints at the end of
/// `cargo test`, and announced once per test binary on the raw stderr (a
/// direct write, which the capture does not intercept).
pub fn skip(backend: &str, reason: &str) {
    assert!(
        !required(backend),
        "KVSIEVE_REQUIRE={backend} but the backend is unavailable: {reason}"
    );
    assert!(
        !(backend == "cuda" && required("cuda-sim")),
        "KVSIEVE_REQUIRE=cuda-sim but the CUDA simulator is unavailable: {reason}"
    );
    eprintln!("SKIPPED({backend}): {reason}");
    record_skip(backend, reason);
}

/// The skip registry of the current `cargo test` run: one directory per
/// cargo process (the parent of every test binary of one run), one file per
/// test binary, lines `backend<TAB>reason`.
pub fn skip_registry() -> std::path::PathBuf {
    skip_registry_root().join(run_id())
}

/// The directory of every run's skip registry.
pub fn skip_registry_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kvsieve-skips")
}

/// The id of this `cargo test` run: cargo's process id.
#[cfg(unix)]
pub fn run_id() -> String {
    std::os::unix::process::parent_id().to_string()
}

/// The id of this `cargo test` run (one shared registry where the parent
/// process id is not available).
#[cfg(not(unix))]
pub fn run_id() -> String {
    "run".to_string()
}

/// This test binary's name without cargo's hash suffix.
fn binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(|p| p.file_stem())
        .and_then(|s| s.to_str())
        .unwrap_or("unknown");
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
        _ => stem.to_string(),
    }
}

/// Appends a skip to the registry and announces it on the raw stderr, once
/// per (backend, reason) in this process.
fn record_skip(backend: &str, reason: &str) {
    use std::io::Write;
    use std::sync::Mutex;
    static SEEN: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    let key = (backend.to_string(), reason.to_string());
    {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(&key) {
            return;
        }
        seen.push(key);
    }
    let name = binary_name();
    // A direct write to the stderr handle: libtest's capture only intercepts
    // the print macros, so this line shows in a plain `cargo test`.
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED({backend}) in {name}: {reason}"
    );
    let dir = skip_registry();
    let line = format!("{backend}\t{}\n", reason.replace(['\t', '\n'], " "));
    let written = std::fs::create_dir_all(&dir).and_then(|_| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}-{}.txt", std::process::id())))?
            .write_all(line.as_bytes())
    });
    if let Err(e) = written {
        let _ = writeln!(
            std::io::stderr().lock(),
            "warning: cannot record the skip in {}: {e}",
            dir.display()
        );
    }
}

/// The shared CUDA backend of this test binary (opened once so kernels compile once), or
/// why it is unavailable: device 0; with the feature `cuda-sim`, the CPU simulator when
/// there is no device (unless `KVSIEVE_REQUIRE=cuda` demands a device) or when
/// `KVSIEVE_REQUIRE=cuda-sim` asks for it.
#[cfg(feature = "cuda")]
pub fn cuda() -> Result<&'static kvsieve::cuda::CudaBackend, String> {
    static DEV: std::sync::OnceLock<Result<kvsieve::cuda::CudaBackend, String>> =
        std::sync::OnceLock::new();
    DEV.get_or_init(open_cuda).as_ref().map_err(Clone::clone)
}

#[cfg(feature = "cuda")]
fn open_cuda() -> Result<kvsieve::cuda::CudaBackend, String> {
    use kvsieve::cuda::CudaBackend;
    #[cfg(feature = "cuda-sim")]
    if required("cuda-sim") {
        return CudaBackend::simulator().map_err(|e| e.to_string());
    }
    match CudaBackend::new(0) {
        Ok(b) => Ok(b),
        #[cfg(feature = "cuda-sim")]
        Err(e) if !required("cuda") => {
            let sim = CudaBackend::simulator().map_err(|s| format!("{e}; {s}"))?;
            eprintln!("cuda: no device ({e}): the CUDA arm runs on the SIMT simulator");
            Ok(sim)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The ISAs the `cpu` arm runs: every available one not above
/// [`kvsieve::cpu::isa::detected`] (so `KVSIEVE_ISA=scalar` runs scalar only).
pub fn cpu_isas() -> Vec<kvsieve::cpu::isa::Isa> {
    let top = kvsieve::cpu::isa::detected();
    kvsieve::cpu::isa::available()
        .into_iter()
        .filter(|&i| i <= top)
        .collect()
}

#[macro_export]
macro_rules! backend_suite {
    ($($body:ident),* $(,)?) => {
        mod reference {
            $(
                #[test]
                fn $body() {
                    super::$body(&kvsieve::reference::Reference);
                }
            )*
        }
        /// The CPU backend under every ISA this machine has (scalar first),
        /// narrowed by `KVSIEVE_ISA` when it is set.
        mod cpu {
            $(
                #[test]
                fn $body() {
                    for isa in $crate::common::backends::cpu_isas() {
                        eprintln!("cpu backend, isa = {isa}");
                        super::$body(&kvsieve::cpu::Cpu::with_isa(isa));
                    }
                }
            )*
        }
        #[cfg(feature = "wgpu")]
        mod wgpu {
            $(
                #[test]
                fn $body() {
                    if let Some(b) = $crate::common::backends::wgpu_device() {
                        super::$body(&b);
                    }
                }
            )*
        }
        #[cfg(feature = "cuda")]
        mod cuda {
            $(
                #[test]
                fn $body() {
                    match $crate::common::backends::cuda() {
                        Ok(b) => super::$body(b),
                        Err(reason) => $crate::common::backends::skip("cuda", &reason),
                    }
                }
            )*
        }
    };
}

/// The wgpu backend, opened once per test binary; `None` after a loud skip
/// (a failure under `KVSIEVE_REQUIRE=wgpu`).
#[cfg(feature = "wgpu")]
pub fn wgpu_device() -> Option<kvsieve::wgpu::Wgpu> {
    use std::sync::OnceLock;
    static DEVICE: OnceLock<Result<kvsieve::wgpu::Wgpu, String>> = OnceLock::new();
    match DEVICE.get_or_init(|| kvsieve::wgpu::Wgpu::new().map_err(|e| e.to_string())) {
        Ok(b) => Some(b.clone()),
        Err(reason) => {
            skip("wgpu", reason);
            None
        }
    }
}

/// True when `b` is the CUDA backend running on its CPU SIMT simulator.
pub fn on_simulator<B: kvsieve::backend::Backend + ?Sized>(b: &B) -> bool {
    #[cfg(feature = "cuda")]
    {
        b.name() == "cuda" && cuda().is_ok_and(|c| c.is_simulator())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = b;
        false
    }
}

/// Whether case `key` of one of the heaviest case loops runs on `b`: always,
/// except on the CUDA simulator (which checks every memory access of every
/// simulated thread, so a large prefill costs it seconds), where only the
/// keys divisible by `every` run, unless `KVSIEVE_SIM_FULL=1`. Callers pass
/// keys that rotate (case index + dtype index), so the simulator still runs
/// every shape and every dtype, only not every pairing of the two.
pub fn sim_runs<B: kvsieve::backend::Backend + ?Sized>(b: &B, key: usize, every: usize) -> bool {
    if !on_simulator(b) || std::env::var("KVSIEVE_SIM_FULL").is_ok_and(|v| v == "1") {
        return true;
    }
    key.is_multiple_of(every.max(1))
}
