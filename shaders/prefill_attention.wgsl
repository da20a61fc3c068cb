// prefill_attention: one workgroup per (query row, query head); candidates are
// the keys of the segment up to the causal limit, optionally filtered by the
// row's bit mask (RESTRICT = 2).

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> q_buf: array<TW>;
@group(0) @binding(2) var<storage, read> k_buf: array<TW>;
@group(0) @binding(3) var<storage, read> v_buf: array<TW>;
@group(0) @binding(4) var<storage, read_write> lg: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
// Window evidence (the evidence pass binds the column sums as `out`).
@group(0) @binding(6) var<storage, read_write> win_out: array<f32>;

@compute @workgroup_size(WG)
fn prefill_attention(@builtin(workgroup_id) wid: vec3<u32>,
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

// ------------------------------------------------------------------ evidence
// After the attention pass left each row's normaliser statistics in `lg`
// (common_attend.wgsl): one invocation per key j of a segment loops over the
// chunk's queries of every query head of the group, recomputes q · k_j and
// the weight from the row's statistics, and accumulates in a fixed order
// (queries in order, then heads): column sums into `out`, the last queries'
// weights (rows or summed) into `win_out`. Memory O(rows), no atomics.
//
// Table at header [10]: [0] chunks, [1] flags (1 column sums, 2 window,
// 4 window rows), [2] column-sum fold, [3] window fold (0 one block per head,
// 1 sum, 2 mean, 3 max), [4] W, [5] G, [6] Hq, [7] 0; then per chunk of WG
// keys (8 words): Hq · first query row of the sequence, queries, segment
// length, first query head of the group, column-sum block offset, window
// block offset, first key, 0.

fn fold_heads(mode: u32, acc: f32, x: f32, first: bool) -> f32 {
    if first {
        return x;
    }
    if mode == 3u {
        return max(acc, x);
    }
    return acc + x;
}

@compute @workgroup_size(WG)
fn prefill_attention_evidence(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let tab = params[10];
    let chunk = wg_index(wid, nwg);
    if chunk >= params[tab] {
        return;
    }
    let c = tab + 8u + 8u * chunk;
    let item0 = params[c];
    let nq = params[c + 1u];
    let len = params[c + 2u];
    let h0 = params[c + 3u];
    let col_off = params[c + 4u];
    let win_off = params[c + 5u];
    let j = params[c + 6u] + lid;
    if j >= len {
        return;
    }
    let flags = params[tab + 1u];
    let col_mode = params[tab + 2u];
    let win_mode = params[tab + 3u];
    let g = params[tab + 5u];
    let has_col = (flags & 1u) != 0u;
    let has_win = (flags & 2u) != 0u;
    let rows = (flags & 4u) != 0u;
    let wr = min(params[tab + 4u], nq);
    let lo = nq - wr;
    var i0 = lo;
    if has_col {
        i0 = 0u;
    }
    var col = 0.0;
    var win = 0.0;
    for (var hh = 0u; hh < g; hh++) {
        let items = item0 + (h0 + hh) * nq;
        var cs = 0.0;
        var ws = 0.0;
        for (var i = i0; i < nq; i++) {
            let p = item_weight(items + i, attn_item(items + i), j);
            cs += p;
            if has_win && i >= lo {
                if !rows {
                    ws += p;
                } else if win_mode == 0u {
                    win_out[win_off + (hh * wr + i - lo) * len + j] = p;
                } else {
                    let at = win_off + (i - lo) * len + j;
                    win_out[at] = fold_heads(win_mode, win_out[at], p, hh == 0u);
                }
            }
        }
        if has_col {
            if col_mode == 0u {
                out[col_off + hh * len + j] = cs;
            } else {
                col = fold_heads(col_mode, col, cs, hh == 0u);
            }
        }
        if has_win && !rows {
            if win_mode == 0u {
                win_out[win_off + hh * len + j] = ws;
            } else {
                win = fold_heads(win_mode, win, ws, hh == 0u);
            }
        }
    }
    let gf = f32(g);
    if has_col && col_mode != 0u {
        if col_mode == 2u {
            col = col / gf;
        }
        out[col_off + j] = col;
    }
    if has_win && win_mode != 0u {
        if !rows {
            if win_mode == 2u {
                win = win / gf;
            }
            win_out[win_off + j] = win;
        } else if win_mode == 2u {
            for (var r = 0u; r < wr; r++) {
                let at = win_off + r * len + j;
                win_out[at] = win_out[at] / gf;
            }
        }
    }
}
