//! The embedded WGSL sources (`shaders/*.wgsl`) and how a module is assembled.
//!
//! A module is plain text: the storage prelude of its [`StorageVariant`]
//! (which defines the word type `TW`, `T_EPW` elements per word and the
//! `t_get` / `t_pack2` conversions), then `common.wgsl`, then the shared
//! libraries the op needs (`common_norm.wgsl`, `common_attend.wgsl`), then the
//! op's own file. Everything else — workgroup size, iteration counts, the
//! restriction kind, the normaliser and the α fast paths — is specialised with
//! pipeline-overridable constants, not with text.

use crate::dtype::DType;

const COMMON: &str = include_str!("../../shaders/common.wgsl");
const NORM: &str = include_str!("../../shaders/common_norm.wgsl");
const ATTEND: &str = include_str!("../../shaders/common_attend.wgsl");

/// One WGSL file per op stem (plus the storage conversions `pack` / `widen`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShaderId {
    /// `shaders/softmax_rows.wgsl`.
    SoftmaxRows,
    /// `shaders/entmax_rows.wgsl`.
    EntmaxRows,
    /// `shaders/qk_logits.wgsl`.
    QkLogits,
    /// `shaders/value_distances.wgsl`.
    ValueDistances,
    /// `shaders/topk_rows.wgsl`.
    TopkRows,
    /// `shaders/count_above.wgsl`.
    CountAbove,
    /// `shaders/gather_rows.wgsl`.
    GatherRows,
    /// `shaders/compact_rows.wgsl` (two entry points: in place by words, widened).
    CompactRows,
    /// `shaders/scatter_rows.wgsl` (two entry points: in place by words, widened).
    ScatterRows,
    /// `shaders/merge_rows.wgsl`.
    MergeRows,
    /// `shaders/decode_attention.wgsl` (the attention, its split path, evidence).
    DecodeAttention,
    /// `shaders/prefill_attention.wgsl` (the attention, its split path, evidence).
    PrefillAttention,
    /// `shaders/entmax_prefill.wgsl`.
    EntmaxPrefill,
    /// `shaders/entmax_prefill_backward.wgsl` (two entry points).
    EntmaxPrefillBackward,
    /// `shaders/pack.wgsl`: f32 results to 16-bit storage words.
    Pack,
    /// `shaders/widen.wgsl`: storage to f32.
    Widen,
}

impl ShaderId {
    /// Every shader, in a fixed order.
    pub const ALL: [ShaderId; 16] = [
        ShaderId::SoftmaxRows,
        ShaderId::EntmaxRows,
        ShaderId::QkLogits,
        ShaderId::ValueDistances,
        ShaderId::TopkRows,
        ShaderId::CountAbove,
        ShaderId::GatherRows,
        ShaderId::CompactRows,
        ShaderId::ScatterRows,
        ShaderId::MergeRows,
        ShaderId::DecodeAttention,
        ShaderId::PrefillAttention,
        ShaderId::EntmaxPrefill,
        ShaderId::EntmaxPrefillBackward,
        ShaderId::Pack,
        ShaderId::Widen,
    ];

    /// File stem, which is also the entry point's name.
    pub const fn stem(self) -> &'static str {
        match self {
            ShaderId::SoftmaxRows => "softmax_rows",
            ShaderId::EntmaxRows => "entmax_rows",
            ShaderId::QkLogits => "qk_logits",
            ShaderId::ValueDistances => "value_distances",
            ShaderId::TopkRows => "topk_rows",
            ShaderId::CountAbove => "count_above",
            ShaderId::GatherRows => "gather_rows",
            ShaderId::CompactRows => "compact_rows",
            ShaderId::ScatterRows => "scatter_rows",
            ShaderId::MergeRows => "merge_rows",
            ShaderId::DecodeAttention => "decode_attention",
            ShaderId::PrefillAttention => "prefill_attention",
            ShaderId::EntmaxPrefill => "entmax_prefill",
            ShaderId::EntmaxPrefillBackward => "entmax_prefill_backward",
            ShaderId::Pack => "pack",
            ShaderId::Widen => "widen",
        }
    }

    /// Entry point of the compute pipeline (the stem; see [`ShaderId::entries`]
    /// for shaders with several).
    pub const fn entry(self) -> &'static str {
        self.stem()
    }

    /// Every compute entry point of the shader.
    pub const fn entries(self) -> &'static [&'static str] {
        match self {
            ShaderId::EntmaxPrefillBackward => &[
                "entmax_prefill_backward_rows",
                "entmax_prefill_backward_keys",
            ],
            ShaderId::SoftmaxRows => &["softmax_rows"],
            ShaderId::EntmaxRows => &["entmax_rows"],
            ShaderId::QkLogits => &["qk_logits"],
            ShaderId::ValueDistances => &["value_distances"],
            ShaderId::TopkRows => &["topk_rows"],
            ShaderId::CountAbove => &["count_above"],
            ShaderId::GatherRows => &["gather_rows"],
            ShaderId::CompactRows => &["compact_rows", "compact_rows_words"],
            ShaderId::ScatterRows => &["scatter_rows", "scatter_rows_words"],
            ShaderId::MergeRows => &["merge_rows"],
            ShaderId::DecodeAttention => &[
                "decode_attention",
                "decode_attention_logits",
                "decode_attention_norm",
                "decode_attention_pv",
                "decode_attention_reduce",
                "decode_attention_ev_probs",
                "decode_attention_ev_logits",
            ],
            ShaderId::PrefillAttention => &[
                "prefill_attention",
                "prefill_attention_logits",
                "prefill_attention_norm",
                "prefill_attention_pv",
                "prefill_attention_reduce",
                "prefill_attention_evidence",
            ],
            ShaderId::EntmaxPrefill => &["entmax_prefill"],
            ShaderId::Pack => &["pack"],
            ShaderId::Widen => &["widen"],
        }
    }

    /// The op's own file.
    pub const fn body(self) -> &'static str {
        match self {
            ShaderId::SoftmaxRows => include_str!("../../shaders/softmax_rows.wgsl"),
            ShaderId::EntmaxRows => include_str!("../../shaders/entmax_rows.wgsl"),
            ShaderId::QkLogits => include_str!("../../shaders/qk_logits.wgsl"),
            ShaderId::ValueDistances => include_str!("../../shaders/value_distances.wgsl"),
            ShaderId::TopkRows => include_str!("../../shaders/topk_rows.wgsl"),
            ShaderId::CountAbove => include_str!("../../shaders/count_above.wgsl"),
            ShaderId::GatherRows => include_str!("../../shaders/gather_rows.wgsl"),
            ShaderId::CompactRows => include_str!("../../shaders/compact_rows.wgsl"),
            ShaderId::ScatterRows => include_str!("../../shaders/scatter_rows.wgsl"),
            ShaderId::MergeRows => include_str!("../../shaders/merge_rows.wgsl"),
            ShaderId::DecodeAttention => include_str!("../../shaders/decode_attention.wgsl"),
            ShaderId::PrefillAttention => include_str!("../../shaders/prefill_attention.wgsl"),
            ShaderId::EntmaxPrefill => include_str!("../../shaders/entmax_prefill.wgsl"),
            ShaderId::EntmaxPrefillBackward => {
                include_str!("../../shaders/entmax_prefill_backward.wgsl")
            }
            ShaderId::Pack => include_str!("../../shaders/pack.wgsl"),
            ShaderId::Widen => include_str!("../../shaders/widen.wgsl"),
        }
    }

    /// Shared libraries included before the body.
    const fn libraries(self) -> &'static [&'static str] {
        match self {
            ShaderId::SoftmaxRows | ShaderId::EntmaxRows => &[NORM],
            ShaderId::DecodeAttention | ShaderId::PrefillAttention | ShaderId::EntmaxPrefill => {
                &[NORM, ATTEND]
            }
            _ => &[],
        }
    }

    /// Whether the shader reads storage of the op's dtype (otherwise it only
    /// touches f32 / u32 buffers and is compiled once, as [`StorageVariant::F32`]).
    pub const fn reads_storage(self) -> bool {
        !matches!(
            self,
            ShaderId::SoftmaxRows
                | ShaderId::EntmaxRows
                | ShaderId::TopkRows
                | ShaderId::CountAbove
        )
    }
}

/// How elements of a storage dtype are read in WGSL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StorageVariant {
    /// `array<f32>`.
    F32,
    /// `array<vec2<f16>>` with `enable f16;` (needs the `shader-f16` feature).
    F16,
    /// f16 pairs in `u32` words, decoded with `unpack2x16float` (no feature needed).
    F16Words,
    /// bf16 pairs in `u32` words, decoded by shifting into the f32 high half.
    Bf16,
}

impl StorageVariant {
    /// Every variant.
    pub const ALL: [StorageVariant; 4] = [
        StorageVariant::F32,
        StorageVariant::F16,
        StorageVariant::F16Words,
        StorageVariant::Bf16,
    ];

    /// The variant used for `dtype` (`native_f16`: the device has `shader-f16`).
    pub const fn for_dtype(dtype: DType, native_f16: bool) -> Self {
        match dtype {
            DType::F32 => StorageVariant::F32,
            DType::F16 if native_f16 => StorageVariant::F16,
            DType::F16 => StorageVariant::F16Words,
            DType::BF16 => StorageVariant::Bf16,
        }
    }

    /// Short name (used in pipeline labels).
    pub const fn name(self) -> &'static str {
        match self {
            StorageVariant::F32 => "f32",
            StorageVariant::F16 => "f16",
            StorageVariant::F16Words => "f16_words",
            StorageVariant::Bf16 => "bf16",
        }
    }

    /// The storage prelude (`shaders/dtype_<name>.wgsl`).
    pub const fn prelude(self) -> &'static str {
        match self {
            StorageVariant::F32 => include_str!("../../shaders/dtype_f32.wgsl"),
            StorageVariant::F16 => include_str!("../../shaders/dtype_f16.wgsl"),
            StorageVariant::F16Words => include_str!("../../shaders/dtype_f16_words.wgsl"),
            StorageVariant::Bf16 => include_str!("../../shaders/dtype_bf16.wgsl"),
        }
    }
}

/// The full WGSL text of `id` for `variant`.
pub fn source(id: ShaderId, variant: StorageVariant) -> String {
    let mut s = String::with_capacity(16 * 1024);
    s.push_str(variant.prelude());
    s.push('\n');
    s.push_str(COMMON);
    for lib in id.libraries() {
        s.push('\n');
        s.push_str(lib);
    }
    s.push('\n');
    s.push_str(id.body());
    s
}
