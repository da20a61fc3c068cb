// Workgroup-collective row normalisers over `lg[start .. start + n]`, in place.
// The including shader declares `lg: array<f32>` (read_write storage).
//
// Every invocation touches only the entries `start + lid + k * WG`, so the
// passes below need no storage barrier between them.

// Update cap of the threshold search (each update costs one sweep of the row).
override ENTMAX_ITERS: u32 = 48u;
// α fast path: 0 = generic `pow`, 1 = α = 1.5 (p = u²), 2 = α = 2 (p = u).
override ALPHA_MODE: u32 = 0u;

// Halley acceptance margin (`kvsieve::entmax::HALLEY_EPS`).
const HALLEY_EPS: f32 = 1e-6;
// Floor of u in the derivative sums (AdaSplash kernels).
const DERIV_U_FLOOR: f32 = 1e-6;

struct RowStats {
    m: f32,   // largest finite entry (FLT_LOWEST if none)
    cnt: u32, // number of finite entries
    bad: u32, // 1 if the row holds NaN or +inf
}

// What a normaliser leaves behind: enough to recompute any weight of the row
// from its entry x (softmax p = exp(x - m) / tot; entmax
// p = [(α-1)(x - m) - tau]_+^{1/(α-1)} / tot). tot = 0: no finite entry (all
// weights 0); tot < 0: a NaN / +inf row (all weights NaN).
struct RowNorm {
    m: f32,
    tau: f32,
    tot: f32,
}

fn row_norm(st: RowStats, tau: f32, tot: f32) -> RowNorm {
    if st.bad != 0u {
        return RowNorm(st.m, tau, -1.0);
    }
    if st.cnt == 0u {
        return RowNorm(st.m, tau, 0.0);
    }
    return RowNorm(st.m, tau, tot);
}

fn wg_row_stats(lid: u32, start: u32, n: u32) -> RowStats {
    var m = FLT_LOWEST;
    var cnt = 0u;
    var bad = 0u;
    for (var i = lid; i < n; i += WG) {
        let x = lg[start + i];
        if is_bad(x) {
            bad = 1u;
        } else if !is_neg_inf(x) {
            m = max(m, x);
            cnt += 1u;
        }
    }
    red_a[lid] = m;
    red_u[lid] = cnt;
    red_v[lid] = bad;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            red_a[lid] = max(red_a[lid], red_a[lid + s]);
            red_u[lid] += red_u[lid + s];
            red_v[lid] = max(red_v[lid], red_v[lid + s]);
        }
        workgroupBarrier();
    }
    let r = RowStats(red_a[0], red_u[0], red_v[0]);
    workgroupBarrier();
    return r;
}

// softmax: exp(x - max) / Σ; -inf -> 0; no finite entry -> zeros; NaN/+inf -> NaN row.
fn wg_softmax(lid: u32, start: u32, n: u32) -> RowNorm {
    let st = wg_row_stats(lid, start, n);
    var s = 0.0;
    for (var i = lid; i < n; i += WG) {
        let x = lg[start + i];
        var e = 0.0;
        if st.bad == 0u && !is_neg_inf(x) {
            e = exp(x - st.m);
        }
        lg[start + i] = e;
        s += e;
    }
    let tot = wg_sum(lid, s);
    for (var i = lid; i < n; i += WG) {
        var p = 0.0;
        if st.bad != 0u {
            p = f_nan();
        } else if st.cnt > 0u {
            p = lg[start + i] / tot;
        }
        lg[start + i] = p;
    }
    return row_norm(st, 0.0, tot);
}

// (u^c0, u^(c0-1), u^(c0-2)) for u > 0; derivative terms use u floored.
fn entmax_terms(u: f32, c0: f32) -> vec3<f32> {
    if ALPHA_MODE == 1u {
        return vec3<f32>(u * u, u, 1.0);
    }
    if ALPHA_MODE == 2u {
        return vec3<f32>(u, 1.0, 0.0);
    }
    let ud = max(u, DERIV_U_FLOOR);
    return vec3<f32>(pow(u, c0), pow(ud, c0 - 1.0), pow(ud, c0 - 2.0));
}

// α-entmax of the row by the hybrid Halley–bisection of `kvsieve::entmax::TauBracket`
// (f32, bracket [-1, -n^(1-α)] on the max-shifted scaled row), then exact zeros at or
// below τ and a final renormalisation (see `entmax_tau` for τ itself).
fn wg_entmax(lid: u32, start: u32, n: u32, alpha: f32) -> RowNorm {
    let st = wg_row_stats(lid, start, n);
    let am1 = alpha - 1.0;
    let c0 = 1.0 / am1;
    var lo = -1.0;
    var hi = -pow(f32(max(st.cnt, 1u)), -am1);
    var tau = 0.5 * (lo + hi);
    var abs_f0 = 3.0e38;
    var abs_f1 = 3.0e38;
    for (var it = 0u; it < ENTMAX_ITERS; it++) {
        var f = 0.0;
        var df = 0.0;
        var ddf = 0.0;
        for (var i = lid; i < n; i += WG) {
            let x = lg[start + i];
            if !is_neg_inf(x) {
                let u = am1 * (x - st.m) - tau;
                if u > 0.0 {
                    let t = entmax_terms(u, c0);
                    f += t.x;
                    df += t.y;
                    ddf += t.z;
                }
            }
        }
        let r = wg_sum3(lid, f, df, ddf);
        let ff = r.x - 1.0;
        let dff = -c0 * r.y;
        let ddff = c0 * (c0 - 1.0) * r.z;
        let in_bracket = lo <= tau && tau <= hi;
        if ff > 0.0 {
            lo = max(lo, tau);
        } else if ff < 0.0 {
            hi = min(hi, tau);
        }
        let progress = in_bracket && abs(ff) <= 0.5 * abs_f1;
        abs_f1 = abs_f0;
        abs_f0 = abs(ff);
        var next = 0.5 * (lo + hi);
        if progress {
            let cand = tau - 2.0 * ff * dff / (2.0 * dff * dff - ff * ddff);
            if cand > lo - HALLEY_EPS && cand < hi + HALLEY_EPS {
                next = cand;
            }
        }
        let done = next == tau || ff == 0.0 || lo == hi;
        tau = next;
        if lid == 0u {
            wg_flag = select(0u, 1u, done);
        }
        if workgroupUniformLoad(&wg_flag) != 0u {
            break;
        }
    }
    tau = clamp(tau, lo, hi);
    var s = 0.0;
    for (var i = lid; i < n; i += WG) {
        let x = lg[start + i];
        var p = 0.0;
        if !is_neg_inf(x) {
            let u = am1 * (x - st.m) - tau;
            if u > 0.0 {
                p = entmax_terms(u, c0).x;
            }
        }
        lg[start + i] = p;
        s += p;
    }
    let tot = wg_sum(lid, s);
    for (var i = lid; i < n; i += WG) {
        var p = 0.0;
        if st.bad != 0u {
            p = f_nan();
        } else if st.cnt > 0u {
            p = lg[start + i] / tot;
        }
        lg[start + i] = p;
    }
    return row_norm(st, tau, tot);
}

// τ of an entmax row in the scaled space (α-1)·x of the unshifted row:
// +inf for a row with no finite entry, NaN for a NaN/+inf row.
fn entmax_tau(r: RowNorm, alpha: f32) -> f32 {
    if r.tot < 0.0 {
        return f_nan();
    }
    if r.tot == 0.0 {
        return f_pos_inf();
    }
    return r.tau + (alpha - 1.0) * r.m;
}

// Weight of entry x of a row from what its normaliser left (`RowNorm`);
// `entmax`: α-entmax with `alpha`, else softmax. Same arithmetic as the
// normalisers above, so it reproduces their weights.
fn row_weight(r: RowNorm, x: f32, entmax: bool, alpha: f32) -> f32 {
    if r.tot < 0.0 {
        return f_nan();
    }
    if r.tot == 0.0 || is_neg_inf(x) {
        return 0.0;
    }
    if !entmax {
        return exp(x - r.m) / r.tot;
    }
    let am1 = alpha - 1.0;
    let u = am1 * (x - r.m) - r.tau;
    if u > 0.0 {
        return entmax_terms(u, 1.0 / am1).x / r.tot;
    }
    return 0.0;
}
