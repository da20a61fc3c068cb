// Storage dtype prelude: f32 (one element per word).
alias TW = f32;
const T_EPW: u32 = 1u;
fn t_get(w: TW, lane: u32) -> f32 { return w; }
fn t_pack2(lo: f32, hi: f32) -> u32 { return bitcast<u32>(lo); }
