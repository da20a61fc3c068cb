// entmax_prefill: α-entmax attention, one workgroup per (query row, query head)
// with item index = row * Hq + head. Writes τ (scaled space, +inf for a row
// with no visible key) and one bit per live key block (some weight > 0).

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> q_buf: array<TW>;
@group(0) @binding(2) var<storage, read> k_buf: array<TW>;
@group(0) @binding(3) var<storage, read> v_buf: array<TW>;
@group(0) @binding(4) var<storage, read_write> lg: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> tau_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> live: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn entmax_prefill(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let item = wg_index(wid, nwg);
    if item >= params[0] {
        return;
    }
    let e = attn_item(item);
    let r = attend_item(lid, item, e);
    if lid == 0u {
        tau_out[item] = entmax_tau(r, e.alpha);
    }
    let bk = params[3];
    let live_off = item * params[4];
    for (var t = lid; t < e.n_cand; t += WG) {
        if lg[e.lg_off + t] > 0.0 {
            let kb = t / bk;
            atomicOr(&live[live_off + kb / 32u], 1u << (kb % 32u));
        }
    }
}
