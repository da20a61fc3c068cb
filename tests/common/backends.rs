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
//! GPU backends that find no device print `SKIPPED(<backend>): <reason>`;
//! with `KVSIEVE_REQUIRE=<backend>[,<backend>]` a skip is a failure. The `cuda`
//! arm runs on the CPU SIMT simulator (feature `cuda-sim`) when there is no GPU,
//! or always under `KVSIEVE_REQUIRE=cuda-sim`.

/// True when the environment demands that `backend` runs.
pub fn required(backend: &str) -> bool {
    std::env::var("KVSIEVE_REQUIRE")
        .map(|v| v.split(',').any(|b| b.trim() == backend))
        .unwrap_or(false)
}

/// Reports a skip loudly, or panics when the backend is required (the `cuda` arm is also
/// required by `cuda-sim`, the CUDA backend on its CPU simulator).
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
