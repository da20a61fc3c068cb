// topk_rows: one workgroup per row. A 4-pass radix select (8 bits per pass) on
// order keys finds the k-th largest key K; the row keeps every entry above K
// and the lowest-index entries equal to K (ties go to the lower index). The
// kept positions are written in ascending order.
// params: [0] rows, [1] k, then per row r at params[2 + 3 r ..]: start, len, out_start.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> picks: array<u32>;

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> sel_prefix: u32;
var<workgroup> sel_rem: u32;

@compute @workgroup_size(WG)
fn topk_rows(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let r = wg_index(wid, nwg);
    if r >= params[0] {
        return;
    }
    let b = 2u + 3u * r;
    let start = params[b];
    let n = params[b + 1u];
    let out_start = params[b + 2u];
    let kk = min(params[1], n);
    if lid == 0u {
        sel_prefix = 0u;
        sel_rem = kk;
    }
    var mask = 0u;
    for (var pass_i = 0u; pass_i < 4u; pass_i++) {
        let shift = 24u - 8u * pass_i;
        for (var i = lid; i < 256u; i += WG) {
            atomicStore(&hist[i], 0u);
        }
        workgroupBarrier();
        let prefix = sel_prefix;
        for (var i = lid; i < n; i += WG) {
            let key = order_key(x[start + i]);
            if (key & mask) == prefix {
                atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
        }
        workgroupBarrier();
        if lid == 0u && kk > 0u {
            var rem = sel_rem;
            var bin = 255u;
            loop {
                let h = atomicLoad(&hist[bin]);
                if h >= rem || bin == 0u {
                    break;
                }
                rem -= h;
                bin -= 1u;
            }
            sel_rem = rem;
            sel_prefix = prefix | (bin << shift);
        }
        mask = mask | (255u << shift);
        workgroupBarrier();
    }
    let kth = sel_prefix;
    let take_eq = select(0u, sel_rem, kk > 0u);
    // Contiguous chunk per invocation, so ranks follow positions.
    let chunk = (n + WG - 1u) / WG;
    let lo = min(lid * chunk, n);
    let hi = min(lo + chunk, n);
    var eq = 0u;
    for (var i = lo; i < hi; i++) {
        if order_key(x[start + i]) == kth {
            eq += 1u;
        }
    }
    let eq_base = wg_exclusive_scan(lid, eq);
    var cnt = 0u;
    var eq_seen = eq_base;
    for (var i = lo; i < hi; i++) {
        let key = order_key(x[start + i]);
        if key > kth {
            cnt += 1u;
        } else if key == kth {
            if eq_seen < take_eq {
                cnt += 1u;
            }
            eq_seen += 1u;
        }
    }
    var pos = wg_exclusive_scan(lid, cnt);
    if kk == 0u {
        return;
    }
    eq_seen = eq_base;
    for (var i = lo; i < hi; i++) {
        let key = order_key(x[start + i]);
        var keep = key > kth;
        if key == kth {
            keep = eq_seen < take_eq;
            eq_seen += 1u;
        }
        if keep {
            picks[out_start + pos] = i;
            pos += 1u;
        }
    }
}
