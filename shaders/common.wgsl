// Shared helpers, prepended (after the dtype prelude) to every kvsieve shader.
//
// Special values are handled through their bit patterns: WGSL implementations
// may assume that floating-point values are finite, so `x != x` or `x == inf`
// tests are not reliable.

// Threads per workgroup; must be a power of two, at most MAX_WG.
override WG: u32 = 256u;
const MAX_WG: u32 = 256u;

const NEG_INF_BITS: u32 = 0xff800000u;
const POS_INF_BITS: u32 = 0x7f800000u;
const QNAN_BITS: u32 = 0x7fc00000u;
const FLT_LOWEST: f32 = -3.4028235e38;

fn f_neg_inf() -> f32 { var b = NEG_INF_BITS; return bitcast<f32>(b); }
fn f_pos_inf() -> f32 { var b = POS_INF_BITS; return bitcast<f32>(b); }
fn f_nan() -> f32 { var b = QNAN_BITS; return bitcast<f32>(b); }
fn is_neg_inf(x: f32) -> bool { return bitcast<u32>(x) == NEG_INF_BITS; }
// NaN or +inf: a row containing one becomes NaN.
fn is_bad(x: f32) -> bool {
    let b = bitcast<u32>(x);
    return (b & 0x7f800000u) == 0x7f800000u && b != NEG_INF_BITS;
}

// Monotone u32 key of a float: larger value, larger key; NaN gets 0 (below
// -inf); -0 and +0 share a key (they compare equal).
fn order_key(x: f32) -> u32 {
    var b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u { return 0u; }
    if (b & 0x7fffffffu) == 0u { b = 0u; }
    if (b & 0x80000000u) != 0u { return ~b; }
    return b | 0x80000000u;
}

// f32 -> f16 bits, round to nearest even (matches `half::f16::from_f32`).
fn f32_to_f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let e = (b >> 23u) & 0xffu;
    let m = b & 0x7fffffu;
    if e == 255u {
        return sign | 0x7c00u | select(0u, 0x200u | (m >> 13u), m != 0u);
    }
    let ee = i32(e) - 112;
    if ee >= 31 { return sign | 0x7c00u; }
    if ee <= 0 {
        if ee < -10 { return sign; }
        let mm = m | 0x800000u;
        let shift = u32(14 - ee);
        var h = mm >> shift;
        let rem = mm & ((1u << shift) - 1u);
        let half_ulp = 1u << (shift - 1u);
        if rem > half_ulp || (rem == half_ulp && (h & 1u) == 1u) { h += 1u; }
        return sign | h;
    }
    var h = (u32(ee) << 10u) | (m >> 13u);
    let rem = m & 0x1fffu;
    if rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u) { h += 1u; }
    return sign | h;
}

// f32 -> bf16 bits, round to nearest even (matches `half::bf16::from_f32`).
fn f32_to_bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if (b & 0x7fffffffu) > 0x7f800000u { return (b >> 16u) | 0x40u; }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// Linear workgroup index of a (possibly 2-D) dispatch.
fn wg_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 { return wid.x + wid.y * nwg.x; }

// ---------------------------------------------------------------- reductions
// Workgroup-collective: every invocation must call them (uniform control flow).

var<workgroup> red_a: array<f32, MAX_WG>;
var<workgroup> red_b: array<f32, MAX_WG>;
var<workgroup> red_c: array<f32, MAX_WG>;
var<workgroup> red_u: array<u32, MAX_WG>;
var<workgroup> red_v: array<u32, MAX_WG>;
var<workgroup> wg_flag: u32;

fn wg_sum3(lid: u32, a: f32, b: f32, c: f32) -> vec3<f32> {
    red_a[lid] = a;
    red_b[lid] = b;
    red_c[lid] = c;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            red_a[lid] += red_a[lid + s];
            red_b[lid] += red_b[lid + s];
            red_c[lid] += red_c[lid + s];
        }
        workgroupBarrier();
    }
    let r = vec3<f32>(red_a[0], red_b[0], red_c[0]);
    workgroupBarrier();
    return r;
}

fn wg_sum(lid: u32, a: f32) -> f32 {
    return wg_sum3(lid, a, 0.0, 0.0).x;
}

fn wg_sum_u(lid: u32, a: u32) -> u32 {
    red_u[lid] = a;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s { red_u[lid] += red_u[lid + s]; }
        workgroupBarrier();
    }
    let r = red_u[0];
    workgroupBarrier();
    return r;
}

// Exclusive prefix sum of one u32 per invocation (in invocation order).
fn wg_exclusive_scan(lid: u32, a: u32) -> u32 {
    red_u[lid] = a;
    workgroupBarrier();
    if lid == 0u {
        var acc = 0u;
        for (var i = 0u; i < WG; i++) {
            let v = red_u[i];
            red_u[i] = acc;
            acc += v;
        }
    }
    workgroupBarrier();
    let r = red_u[lid];
    workgroupBarrier();
    return r;
}

// Storage writes of this workgroup become visible to all its invocations.
fn sync_all() {
    storageBarrier();
    workgroupBarrier();
}
