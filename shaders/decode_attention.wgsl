// decode_attention: one workgroup per (sequence, query head); the candidate
// list is the whole segment, an index list, or a bit mask (RESTRICT).

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> q_buf: array<TW>;
@group(0) @binding(2) var<storage, read> k_buf: array<TW>;
@group(0) @binding(3) var<storage, read> v_buf: array<TW>;
@group(0) @binding(4) var<storage, read_write> lg: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn decode_attention(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let item = wg_index(wid, nwg);
    if item >= params[0] {
        return;
    }
    let e = attn_item(item);
    _ = attend_item(lid, item, e);
}

// Split path for long rows (see common_attend.wgsl).
@compute @workgroup_size(WG)
fn decode_attention_logits(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    split_logits(wg_index(wid, nwg), lid);
}

@compute @workgroup_size(WG)
fn decode_attention_norm(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let item = wg_index(wid, nwg);
    if item >= params[0] {
        return;
    }
    split_norm(item, lid);
}

@compute @workgroup_size(WG)
fn decode_attention_pv(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    split_pv(wg_index(wid, nwg), lid);
}

@compute @workgroup_size(WG)
fn decode_attention_reduce(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    split_reduce(wg_index(wid, nwg) * WG + lid);
}

// ------------------------------------------------------------------ evidence
// After the attention pass (weights in lg, raw logits and statistics beside
// them, see common_attend.wgsl): one invocation per entry of an evidence
// block, O(rows) reads of `lg` and no read of K or V. A table (header [10]
// for the weights, [11] for the logits) holds [0] chunks, [1] how the block's
// heads are folded (0 one head, 1 sum, 2 mean, 3 max), [2] heads per block,
// [3] where in `lg` the values are (0: the weights; else the raw logits,
// `-inf` where not attended), then per chunk of WG tokens: first item, block
// length (the segment's), output offset of the block, first token.

const NO_CAND: u32 = 0xffffffffu;

// Candidate of token j of the row, or NO_CAND when the restriction leaves it out.
fn token_cand(e: AttnItem, j: u32) -> u32 {
    if RESTRICT != 1u {
        return select(NO_CAND, j, j < e.n_cand);
    }
    // Index lists are sorted and unique: binary search.
    var lo = 0u;
    var hi = e.n_cand;
    while lo < hi {
        let mid = (lo + hi) / 2u;
        if params[e.aux_start + mid] < j {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    if lo < e.n_cand && params[e.aux_start + lo] == j {
        return lo;
    }
    return NO_CAND;
}

fn decode_evidence(tab: u32, chunk: u32, lid: u32) {
    if chunk >= params[tab] {
        return;
    }
    let c = tab + 4u + 4u * chunk;
    let first = params[c];
    let len = params[c + 1u];
    let out_off = params[c + 2u];
    let j = params[c + 3u] + lid;
    if j >= len {
        return;
    }
    let mode = params[tab + 1u];
    let nh = params[tab + 2u];
    let src = params[tab + 3u];
    var acc = 0.0;
    for (var hh = 0u; hh < nh; hh++) {
        let e = attn_item(first + hh);
        let t = token_cand(e, j);
        var x = 0.0;
        if src != 0u {
            x = f_neg_inf();
            if t != NO_CAND {
                x = lg[src + e.lg_off + t];
            }
        } else if t != NO_CAND {
            x = lg[e.lg_off + t];
        }
        if hh == 0u {
            acc = x;
        } else if mode == 3u {
            acc = max(acc, x);
        } else {
            acc += x;
        }
    }
    if mode == 2u {
        acc = acc / f32(nh);
    }
    out[out_off + j] = acc;
}

// Attention weights per token (per query head or folded over the group).
@compute @workgroup_size(WG)
fn decode_attention_ev_probs(@builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    decode_evidence(params[10], wg_index(wid, nwg), lid);
}

// Logits per query head (`-inf` where not attended).
@compute @workgroup_size(WG)
fn decode_attention_ev_logits(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    decode_evidence(params[11], wg_index(wid, nwg), lid);
}
