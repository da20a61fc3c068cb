// Storage dtype prelude: f16 unpacked from u32 words (fallback without `shader-f16`).
alias TW = u32;
const T_EPW: u32 = 2u;
fn t_get(w: TW, lane: u32) -> f32 { return unpack2x16float(w)[lane]; }
fn t_pack2(lo: f32, hi: f32) -> u32 { return f32_to_f16_bits(lo) | (f32_to_f16_bits(hi) << 16u); }
