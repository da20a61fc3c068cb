// Storage dtype prelude: bf16 unpacked from u32 words (WGSL has no bf16 type).
alias TW = u32;
const T_EPW: u32 = 2u;
fn t_get(w: TW, lane: u32) -> f32 {
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, lane == 1u));
}
fn t_pack2(lo: f32, hi: f32) -> u32 { return f32_to_bf16_bits(lo) | (f32_to_bf16_bits(hi) << 16u); }
