// value_distances: one workgroup per KV segment, for the `gh` blocks over it
// (the group's query heads with Heads::PerHead, else one), reading the
// segment's V rows for all of them:
//   1. o_h = Σ_j w_{h,j} v_j (fast: (1/L) Σ_j v_j, one o for every block),
//      accumulated in f32 (idle invocations split the tokens into lanes whose
//      partial sums are added in lane order);
//   2. d_{h,j} = ‖o_h − v_j‖₂ from the differences (never the expanded form,
//      which cancels when v_j ≈ o_h).
// params: [0] segments, [1] D, [2] gh, [3] fast; segment s at 8 + 4 s:
//   first V row, length L, offset of its first block in `w` / `dist` (the gh
//   blocks follow each other, L entries each), offset of its o_h in `o`.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> v_buf: array<TW>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> o: array<f32>;
@group(0) @binding(4) var<storage, read_write> dist: array<f32>;

fn ld_v(i: u32) -> f32 { return t_get(v_buf[i / T_EPW], i % T_EPW); }

@compute @workgroup_size(WG)
fn value_distances(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let s = wg_index(wid, nwg);
    if s >= params[0] {
        return;
    }
    let d = params[1];
    let gh = params[2];
    let fast = params[3] != 0u;
    let b = 8u + 4u * s;
    let row0 = params[b];
    let len = params[b + 1u];
    let w_off = params[b + 2u];
    let o_off = params[b + 3u];
    let nh = select(gh, 1u, fast);
    let n_out = nh * d;
    if len == 0u || d == 0u {
        // An empty segment's o is zero (as in the reference).
        for (var idx = lid; idx < n_out; idx += WG) {
            o[o_off + idx] = 0.0;
        }
        return;
    }
    let inv_len = 1.0 / f32(len);
    let lanes = max(1u, WG / n_out);
    if lanes == 1u {
        for (var idx = lid; idx < n_out; idx += WG) {
            let hh = idx / d;
            let c = idx % d;
            var acc = 0.0;
            for (var j = 0u; j < len; j++) {
                var wj = inv_len;
                if !fast {
                    wj = w[w_off + hh * len + j];
                }
                acc += wj * ld_v((row0 + j) * d + c);
            }
            o[o_off + idx] = acc;
        }
    } else {
        var acc = 0.0;
        if lid < lanes * n_out {
            let idx = lid % n_out;
            let hh = idx / d;
            let c = idx % d;
            for (var j = lid / n_out; j < len; j += lanes) {
                var wj = inv_len;
                if !fast {
                    wj = w[w_off + hh * len + j];
                }
                acc += wj * ld_v((row0 + j) * d + c);
            }
        }
        red_a[lid] = acc;
        workgroupBarrier();
        if lid < n_out {
            var sum = 0.0;
            for (var l = 0u; l < lanes; l++) {
                sum += red_a[l * n_out + lid];
            }
            o[o_off + lid] = sum;
        }
    }
    sync_all();
    for (var j = lid; j < len; j += WG) {
        let vr = (row0 + j) * d;
        for (var hh = 0u; hh < gh; hh++) {
            let oh = o_off + select(hh * d, 0u, fast);
            var d2 = 0.0;
            for (var c = 0u; c < d; c++) {
                let diff = o[oh + c] - ld_v(vr + c);
                d2 += diff * diff;
            }
            dist[w_off + hh * len + j] = sqrt(d2);
        }
    }
}
