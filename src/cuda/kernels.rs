//! The kernel registry: one [`KernelId`] per `cuda/<stem>.cu`, its embedded source and the
//! entry points it defines (`<stem>[_<variant>]_<dtype>`), and NVRTC compilation.
//!
//! Every source is compiled as `common.cuh` followed by the stem's file, with flush-to-zero
//! off, precise division and square root and no fast math (the entmax threshold search must
//! not flush small `u = s − τ`). Compilation needs only `libnvrtc` (no GPU).

use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The shared header, prepended to every kernel source.
pub const COMMON: &str = include_str!("../../cuda/common.cuh");

/// One CUDA source file (`cuda/<stem>.cu`), compiled as one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelId {
    /// `softmax_rows.cu`
    SoftmaxRows,
    /// `entmax_rows.cu` (also the threshold pass of entmax attention)
    EntmaxRows,
    /// `qk_logits.cu` (also the logits pass of entmax attention)
    QkLogits,
    /// `topk_rows.cu`
    TopkRows,
    /// `count_above.cu`
    CountAbove,
    /// `gather_rows.cu`
    GatherRows,
    /// `scatter_rows.cu` (also phase 2 of `compact_rows`, whose phase 1 is `gather_rows`)
    ScatterRows,
    /// `merge_rows.cu`
    MergeRows,
    /// `decode_attention.cu` (also the engine of prefill attention, and the decode evidence)
    DecodeAttention,
    /// `entmax_prefill.cu` (tile liveness and the backward)
    EntmaxPrefill,
    /// `prefill_attention.cu` (the prefill evidence pass; the attention runs on
    /// `decode_attention.cu`)
    PrefillAttention,
    /// `value_distances.cu`
    ValueDistances,
}

/// Entry points indexed by dtype (`f32`, `f16`, `bf16`, the order of [`DType::ALL`]).
pub(crate) type PerDtype = [&'static str; 3];

macro_rules! per_dtype {
    ($name:ident, $base:literal) => {
        pub(crate) const $name: PerDtype = [
            concat!($base, "_f32"),
            concat!($base, "_f16"),
            concat!($base, "_bf16"),
        ];
    };
}

per_dtype!(QK_VEC_H4, "qk_logits_vec_h4");
per_dtype!(QK_VEC_H8, "qk_logits_vec_h8");
per_dtype!(QK_SCALAR_H4, "qk_logits_scalar_h4");
per_dtype!(QK_SCALAR_H8, "qk_logits_scalar_h8");
per_dtype!(ATTN_SPLIT_VEC_H4, "decode_attention_split_vec_h4");
per_dtype!(ATTN_SPLIT_VEC_H8, "decode_attention_split_vec_h8");
per_dtype!(ATTN_SPLIT_SCALAR_H4, "decode_attention_split_scalar_h4");
per_dtype!(ATTN_SPLIT_SCALAR_H8, "decode_attention_split_scalar_h8");
per_dtype!(ATTN_SPLIT_EV_VEC_H4, "decode_attention_split_ev_vec_h4");
per_dtype!(ATTN_SPLIT_EV_VEC_H8, "decode_attention_split_ev_vec_h8");
per_dtype!(
    ATTN_SPLIT_EV_SCALAR_H4,
    "decode_attention_split_ev_scalar_h4"
);
per_dtype!(
    ATTN_SPLIT_EV_SCALAR_H8,
    "decode_attention_split_ev_scalar_h8"
);
per_dtype!(ATTN_PV_VEC_H4, "decode_attention_pv_vec_h4");
per_dtype!(ATTN_PV_VEC_H8, "decode_attention_pv_vec_h8");
per_dtype!(ATTN_PV_SCALAR_H4, "decode_attention_pv_scalar_h4");
per_dtype!(ATTN_PV_SCALAR_H8, "decode_attention_pv_scalar_h8");
per_dtype!(ATTN_COMBINE, "decode_attention_combine");
per_dtype!(PREFILL_EV_VEC, "prefill_attention_evidence_vec");
per_dtype!(PREFILL_EV_SCALAR, "prefill_attention_evidence_scalar");
per_dtype!(VALUE_DISTANCES, "value_distances");
per_dtype!(GATHER, "gather_rows");
per_dtype!(SCATTER, "scatter_rows");
per_dtype!(MERGE, "merge_rows");
per_dtype!(BWD_ROWS_VEC, "entmax_prefill_bwd_rows_vec");
per_dtype!(BWD_ROWS_SCALAR, "entmax_prefill_bwd_rows_scalar");
per_dtype!(BWD_KEYS_VEC, "entmax_prefill_bwd_keys_vec");
per_dtype!(BWD_KEYS_SCALAR, "entmax_prefill_bwd_keys_scalar");

pub(crate) const SOFTMAX_ROWS: &str = "softmax_rows_f32";
pub(crate) const ENTMAX_ROWS: &str = "entmax_rows_f32";
pub(crate) const TOPK_ROWS: &str = "topk_rows_f32";
pub(crate) const COUNT_ABOVE: &str = "count_above_f32";
pub(crate) const ENTMAX_TILES: &str = "entmax_prefill_tiles_f32";
pub(crate) const DECODE_EVIDENCE: &str = "decode_attention_evidence_f32";

/// Attention-like kernels: the table for (vector path?, at most 4 heads per CTA?).
pub(crate) fn pick4(tables: [&'static PerDtype; 4], vec: bool, h4: bool) -> &'static PerDtype {
    tables[usize::from(!vec) * 2 + usize::from(!h4)]
}

/// The entry of `table` for dtype `d`.
pub(crate) fn entry(table: &PerDtype, d: DType) -> &'static str {
    match d {
        DType::F32 => table[0],
        DType::F16 => table[1],
        DType::BF16 => table[2],
    }
}

/// Entry points whose register spills fail the compile test (the decode hot path).
pub const HOT_PREFIXES: [&str; 4] = [
    "decode_attention",
    "qk_logits",
    "softmax_rows",
    "entmax_rows",
];

impl KernelId {
    /// Every kernel source, in a fixed order.
    pub const ALL: [KernelId; 12] = [
        KernelId::SoftmaxRows,
        KernelId::EntmaxRows,
        KernelId::QkLogits,
        KernelId::TopkRows,
        KernelId::CountAbove,
        KernelId::GatherRows,
        KernelId::ScatterRows,
        KernelId::MergeRows,
        KernelId::DecodeAttention,
        KernelId::EntmaxPrefill,
        KernelId::PrefillAttention,
        KernelId::ValueDistances,
    ];

    /// Position in [`KernelId::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// File stem (`cuda/<stem>.cu`).
    pub fn stem(self) -> &'static str {
        match self {
            KernelId::SoftmaxRows => "softmax_rows",
            KernelId::EntmaxRows => "entmax_rows",
            KernelId::QkLogits => "qk_logits",
            KernelId::TopkRows => "topk_rows",
            KernelId::CountAbove => "count_above",
            KernelId::GatherRows => "gather_rows",
            KernelId::ScatterRows => "scatter_rows",
            KernelId::MergeRows => "merge_rows",
            KernelId::DecodeAttention => "decode_attention",
            KernelId::EntmaxPrefill => "entmax_prefill",
            KernelId::PrefillAttention => "prefill_attention",
            KernelId::ValueDistances => "value_distances",
        }
    }

    /// The stem's source file (without `common.cuh`).
    pub fn source(self) -> &'static str {
        match self {
            KernelId::SoftmaxRows => include_str!("../../cuda/softmax_rows.cu"),
            KernelId::EntmaxRows => include_str!("../../cuda/entmax_rows.cu"),
            KernelId::QkLogits => include_str!("../../cuda/qk_logits.cu"),
            KernelId::TopkRows => include_str!("../../cuda/topk_rows.cu"),
            KernelId::CountAbove => include_str!("../../cuda/count_above.cu"),
            KernelId::GatherRows => include_str!("../../cuda/gather_rows.cu"),
            KernelId::ScatterRows => include_str!("../../cuda/scatter_rows.cu"),
            KernelId::MergeRows => include_str!("../../cuda/merge_rows.cu"),
            KernelId::DecodeAttention => include_str!("../../cuda/decode_attention.cu"),
            KernelId::EntmaxPrefill => include_str!("../../cuda/entmax_prefill.cu"),
            KernelId::PrefillAttention => include_str!("../../cuda/prefill_attention.cu"),
            KernelId::ValueDistances => include_str!("../../cuda/value_distances.cu"),
        }
    }

    /// Every entry point the source defines.
    pub fn entries(self) -> Vec<&'static str> {
        let tables: &[&PerDtype] = match self {
            KernelId::SoftmaxRows => return vec![SOFTMAX_ROWS],
            KernelId::EntmaxRows => return vec![ENTMAX_ROWS],
            KernelId::TopkRows => return vec![TOPK_ROWS],
            KernelId::CountAbove => return vec![COUNT_ABOVE],
            KernelId::QkLogits => &[&QK_VEC_H4, &QK_VEC_H8, &QK_SCALAR_H4, &QK_SCALAR_H8],
            KernelId::GatherRows => &[&GATHER],
            KernelId::ScatterRows => &[&SCATTER],
            KernelId::MergeRows => &[&MERGE],
            KernelId::PrefillAttention => &[&PREFILL_EV_VEC, &PREFILL_EV_SCALAR],
            KernelId::ValueDistances => &[&VALUE_DISTANCES],
            KernelId::EntmaxPrefill => {
                let mut v = vec![ENTMAX_TILES];
                for t in [
                    &BWD_ROWS_VEC,
                    &BWD_ROWS_SCALAR,
                    &BWD_KEYS_VEC,
                    &BWD_KEYS_SCALAR,
                ] {
                    v.extend_from_slice(t);
                }
                return v;
            }
            KernelId::DecodeAttention => {
                let mut v = vec![DECODE_EVIDENCE];
                for t in [
                    &ATTN_SPLIT_VEC_H4,
                    &ATTN_SPLIT_VEC_H8,
                    &ATTN_SPLIT_SCALAR_H4,
                    &ATTN_SPLIT_SCALAR_H8,
                    &ATTN_SPLIT_EV_VEC_H4,
                    &ATTN_SPLIT_EV_VEC_H8,
                    &ATTN_SPLIT_EV_SCALAR_H4,
                    &ATTN_SPLIT_EV_SCALAR_H8,
                    &ATTN_PV_VEC_H4,
                    &ATTN_PV_VEC_H8,
                    &ATTN_PV_SCALAR_H4,
                    &ATTN_PV_SCALAR_H8,
                    &ATTN_COMBINE,
                ] {
                    v.extend_from_slice(t);
                }
                return v;
            }
        };
        tables.iter().flat_map(|t| t.iter().copied()).collect()
    }

    /// `common.cuh` followed by the stem's source (with a `#line` so NVRTC messages name the
    /// stem's file and line).
    pub fn full_source(self) -> String {
        format!(
            "{COMMON}\n#line 1 \"{}.cu\"\n{}",
            self.stem(),
            self.source()
        )
    }
}

/// True when `libnvrtc` can be loaded (searched by the dynamic loader: `LD_LIBRARY_PATH`).
pub fn nvrtc_available() -> bool {
    // SAFETY: `is_culib_present` only tries `dlopen` on the candidate library names and
    // drops the handles; it touches no other state and needs no invariant from us.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles one kernel source with NVRTC for `arch` (a virtual architecture such as
/// `compute_90`) and returns its PTX. Needs no GPU.
///
/// Errors: [`Error::NoDevice`] when `libnvrtc` cannot be loaded, [`Error::Device`] with the
/// NVRTC log when compilation fails.
pub fn compile_ptx(id: KernelId, arch: &str) -> Result<String> {
    Ok(compile(id, arch)?.to_src())
}

pub(crate) fn compile(id: KernelId, arch: &str) -> Result<Ptx> {
    if !nvrtc_available() {
        return Err(Error::NoDevice {
            backend: "cuda",
            reason: "libnvrtc could not be loaded (install the `nvidia-cuda-nvrtc-cu12` wheel \
                     and put its lib/ folder on LD_LIBRARY_PATH)"
                .into(),
        });
    }
    let opts = CompileOptions {
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        fmad: Some(true),
        use_fast_math: Some(false),
        options: vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".to_string(),
        ],
        name: Some(format!("{}.cu", id.stem())),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(id.full_source(), opts).map_err(|e| Error::Device {
        backend: "cuda",
        reason: format!("NVRTC failed to compile {}.cu for {arch}: {e}", id.stem()),
    })
}
