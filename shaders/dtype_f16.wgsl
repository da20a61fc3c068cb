// Storage dtype prelude: f16 through the `shader-f16` feature (two elements per word).
enable f16;
alias TW = vec2<f16>;
const T_EPW: u32 = 2u;
fn t_get(w: TW, lane: u32) -> f32 { return f32(w[lane]); }
fn t_pack2(lo: f32, hi: f32) -> u32 { return f32_to_f16_bits(lo) | (f32_to_f16_bits(hi) << 16u); }
