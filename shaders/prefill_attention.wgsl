// prefill_attention: one workgroup per (query row, query head); candidates are
// the keys of the segment up to the causal limit, optionally filtered by the
// row's bit mask (RESTRICT = 2).

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> q_buf: array<TW>;
@group(0) @binding(2) var<storage, read> k_buf: array<TW>;
@group(0) @binding(3) var<storage, read> v_buf: array<TW>;
@group(0) @binding(4) var<storage, read_write> lg: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn prefill_attention(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let item = wg_index(wid, nwg);
    if item >= params[0] {
        return;
    }
    let e = attn_item(item);
    _ = attend_item(lid, e);
}

// Split path for long rows (see common_attend.wgsl).
@compute @workgroup_size(WG)
fn prefill_attention_logits(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    split_logits(wg_index(wid, nwg), lid);
}

@compute @workgroup_size(WG)
fn prefill_attention_norm(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let item = wg_index(wid, nwg);
    if item >= params[0] {
        return;
    }
    split_norm(item, lid);
}

@compute @workgroup_size(WG)
fn prefill_attention_pv(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    split_pv(wg_index(wid, nwg), lid);
}

@compute @workgroup_size(WG)
fn prefill_attention_reduce(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    split_reduce(wg_index(wid, nwg) * WG + lid);
}
