//! Query-aware selection and masks: TokenSelect, TidalDecode, DAM.
//! Worked examples of the spec, metamorphic identities (budget ≥ length ⇒
//! `Full`, bit for bit), needle retrieval at 2 % budgets over 16K tokens,
//! the Selection Cache, serialisation and bad input. Reference backend.

use kvsieve::attention::*;
use kvsieve::cache::KvCache;
use kvsieve::ops::{self, DecodeParams, PrefillParams};
use kvsieve::policy::*;
use kvsieve::reference::Reference;
use kvsieve::{Error, HeadGeometry, IndexList, Normalizer, Ragged, Restrict, Scope, Segments};

// ------------------------------------------------------------------ helpers

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Roughly standard normal.
    fn normal(&mut self) -> f32 {
        ((0..4).map(|_| self.uniform()).sum::<f64>() - 2.0) as f32 * 1.73
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

fn geom(hq: usize, hkv: usize, d: usize) -> HeadGeometry {
    HeadGeometry::new(hq, hkv, d).unwrap()
}

/// A cache of `layers` layers holding `k` (`[n, Hkv, D]`) for one sequence
/// (values = keys).
fn cache_with(g: HeadGeometry, layers: usize, k: &[f32]) -> KvCache<Reference, f32> {
    let mut c = KvCache::new(&Reference, g, 1, layers).unwrap();
    let n = k.len() / (g.num_kv_heads() * g.head_dim());
    let t = Ragged::from_lens(&[n as u32]).unwrap();
    for l in 0..layers {
        c.append(&Reference, l, &t, &k.to_vec(), &k.to_vec(), None)
            .unwrap();
    }
    c
}

fn ctx<'a>(
    c: &'a KvCache<Reference, f32>,
    layer: usize,
    q: &'a Vec<f32>,
    q_rows: &'a Ragged,
    step: usize,
) -> StepCtx<'a, Reference, f32> {
    StepCtx {
        backend: &Reference,
        layer,
        num_layers: c.num_layers(),
        kv: c.layer(layer).unwrap(),
        queries: q,
        q_rows,
        step,
        phase: Phase::Select,
        scale: None,
        evidence: Evidence::default(),
    }
}

fn select(p: &mut dyn KvPolicy<Reference, f32>, cx: &StepCtx<'_, Reference, f32>) -> Plan {
    p.select_for_attention(cx).unwrap()
}

/// One decode step of `layer` as the driver runs it: `select_for_attention`,
/// attention (restricted by its plan) with the evidence `p.needs` asks for,
/// then `on_decode_step`. Returns the selection plan.
fn step(
    p: &mut dyn KvPolicy<Reference, f32>,
    c: &KvCache<Reference, f32>,
    layer: usize,
    q: &Vec<f32>,
    rows: &Ragged,
    step: usize,
) -> Plan {
    use kvsieve::backend::{DecodeEvidence, Heads, evidence_blocks};
    let plan = select(p, &ctx(c, layer, q, rows, step));
    let l = c.layer(layer).unwrap();
    let g = *l.geom();
    let needs = p.needs(layer);
    let ones = vec![1; l.batch()];
    let n = |h| evidence_blocks(&g, l.segments(), h, &ones).unwrap().total();
    let mut probs = needs.decode_probs.map(|h| (h, vec![0.0f32; n(h)]));
    let mut logits = needs.decode_logits.then(|| vec![0.0f32; n(Heads::PerHead)]);
    let mut out = vec![0.0f32; q.len()];
    let restrict = match &plan {
        Plan::Select(list) => Restrict::Indices(list),
        _ => Restrict::Dense,
    };
    let dp = DecodeParams {
        geom: g,
        segments: l.segments(),
        scale: None,
        normalizer: &Normalizer::Softmax,
        restrict,
    };
    ops::decode_attention_with(
        &Reference,
        &dp,
        q,
        l.k(),
        l.v(),
        &mut out,
        DecodeEvidence {
            probs: probs.as_mut().map(|(h, b)| (*h, b)),
            logits: logits.as_mut(),
            stats: None,
            output: None,
        },
    )
    .unwrap();
    let cx = StepCtx {
        phase: Phase::Decode,
        evidence: Evidence {
            probs: probs.as_ref().map(|(h, b)| (*h, b)),
            logits: logits.as_ref(),
            output: None,
            col_sums: None,
            window: None,
        },
        ..ctx(c, layer, q, rows, step)
    };
    assert_eq!(p.on_decode_step(&cx).unwrap(), Plan::KeepAll);
    plan
}

fn selected(plan: Plan) -> IndexList {
    match plan {
        Plan::Select(l) => l,
        other => panic!("expected a selection, got {other:?}"),
    }
}

fn decode_out(
    g: HeadGeometry,
    c: &KvCache<Reference, f32>,
    layer: usize,
    q: &Vec<f32>,
    r: Restrict<'_>,
) -> Vec<f32> {
    let l = c.layer(layer).unwrap();
    let mut out = vec![0.0f32; q.len()];
    let p = DecodeParams {
        geom: g,
        segments: l.segments(),
        scale: None,
        normalizer: &Normalizer::Softmax,
        restrict: r,
    };
    ops::decode_attention(&Reference, &p, q, l.k(), l.v(), &mut out).unwrap();
    out
}

// ------------------------------------------------------- TokenSelect (§3.4)

/// Keys `e_0 .. e_4` (D = 5) make `q_h · k_j = q_h[j]`, so the queries are
/// the spec's logits.
fn worked_example() -> (HeadGeometry, KvCache<Reference, f32>, Vec<f32>) {
    let g = geom(2, 1, 5);
    let mut k = vec![0.0f32; 25];
    for j in 0..5 {
        k[j * 5 + j] = 1.0;
    }
    let q = vec![4.0, 1.0, 0.0, 0.0, 3.0, 0.0, 2.0, 5.0, 0.0, 1.0];
    (g, cache_with(g, 1, &k), q)
}

#[test]
fn token_select_worked_example_soft_vote() {
    let (_, c, q) = worked_example();
    let cfg = TokenSelectConfig {
        n_init: 0,
        k: 2,
        n_local: 0,
        scaled: false,
        ..TokenSelectConfig::default()
    };
    let mut ts = TokenSelect::new(cfg).unwrap();
    let rows = Ragged::uniform(1, 1).unwrap();
    let cx = ctx(&c, 0, &q, &rows, 0);
    let vote = ts.candidate_scores(&cx).unwrap();
    let want = [0.6938, 0.0803, 0.9372, 0.0188, 0.2699];
    assert_eq!(vote[0].len(), 5);
    for (v, w) in vote[0].iter().zip(want) {
        assert!((v - w).abs() < 1e-4, "{:?}", vote[0]);
    }
    let list = selected(select(&mut ts, &cx));
    assert_eq!(list.scope(), Scope::KvHead);
    assert_eq!(list.list(0), &[0, 2]);
    // Summing raw logits instead ties tokens 0 and 4 for second place.
    let summed: Vec<f32> = (0..5).map(|j| q[j] + q[5 + j]).collect();
    assert_eq!(summed, vec![4.0, 3.0, 5.0, 0.0, 4.0]);
    assert_eq!(summed[0], summed[4]);
}

#[test]
fn token_select_pooling_and_gqa_mapping() {
    // 4 query heads on 2 KV heads: heads 0, 1 read KV head 0 (floor(h / 2)).
    let g = geom(4, 2, 2);
    let n = 12;
    let mut k = vec![0.0f32; n * 2 * 2];
    // KV head 0: token 5 points along x; KV head 1: token 9 points along x.
    k[(5 * 2) * 2] = 10.0;
    k[(9 * 2 + 1) * 2] = 10.0;
    let c = cache_with(g, 1, &k);
    // Only heads 0 and 1 (KV head 0) look along x: token 5 must win.
    let q = vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    let rows = Ragged::uniform(1, 1).unwrap();
    let cfg = TokenSelectConfig {
        n_init: 0,
        k: 1,
        n_local: 0,
        ..TokenSelectConfig::default()
    };
    let mut ts = TokenSelect::new(cfg.clone()).unwrap();
    let list = selected(select(&mut ts, &ctx(&c, 0, &q, &rows, 0)));
    assert_eq!(list.list(0), &[5]);
    assert_eq!(list.list(1), &[5], "one selection shared by every KV head");
    // The release's `h mod Hkv` mapping pairs heads 0 and 2 with KV head 0
    // and head 1 with KV head 1: token 9 then gets head 1's vote too.
    let mut compat = TokenSelect::new(TokenSelectConfig {
        gqa_modulo: true,
        ..cfg.clone()
    })
    .unwrap();
    let q_mod = vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    assert_eq!(
        selected(select(&mut compat, &ctx(&c, 0, &q_mod, &rows, 0))).list(0),
        &[9]
    );
    assert_eq!(
        selected(select(&mut ts, &ctx(&c, 0, &q_mod, &rows, 0))).list(0),
        &[5]
    );
    // Max pooling (kernel 3, "same" padding) spreads the peak to 4, 5, 6;
    // ties go to the lower index.
    let mut ts = TokenSelect::new(TokenSelectConfig {
        pool_kernel: Some(3),
        ..cfg
    })
    .unwrap();
    let cx = ctx(&c, 0, &q, &rows, 0);
    let v = ts.candidate_scores(&cx).unwrap();
    assert_eq!(v[0][4], v[0][5]);
    assert_eq!(v[0][6], v[0][5]);
    assert_eq!(selected(select(&mut ts, &cx)).list(0), &[4]);
}

#[test]
fn token_select_windows_and_positions() {
    let g = geom(2, 1, 4);
    let mut r = Rng::new(3);
    let c = cache_with(g, 1, &r.vec(40 * 4));
    let q = r.vec(8);
    let rows = Ragged::uniform(1, 1).unwrap();
    let cfg = TokenSelectConfig {
        n_init: 3,
        k: 5,
        n_local: 4,
        ..TokenSelectConfig::default()
    };
    let mut ts = TokenSelect::new(cfg).unwrap();
    let list = selected(select(&mut ts, &ctx(&c, 0, &q, &rows, 0)));
    let l = list.list(0);
    assert_eq!(l.len(), 12);
    assert_eq!(&l[..3], &[0, 1, 2]);
    assert_eq!(&l[8..], &[36, 37, 38, 39]);
    assert_eq!(ts.last_selection(0), Some(&list));
    let layer = c.layer(0).unwrap();
    let rank = selection_positions(layer, Some(&list), RopePositions::Rank).unwrap();
    assert_eq!(rank[0], (0..12).collect::<Vec<u32>>());
    let orig = selection_positions(layer, Some(&list), RopePositions::Original).unwrap();
    assert_eq!(orig[0], l.to_vec());
    assert_eq!(ts.rope_positions(layer, Some(&list)).unwrap(), rank);
    // The list goes straight into sparse decode attention.
    let out = decode_out(g, &c, 0, &q, Restrict::Indices(&list));
    assert!(out.iter().all(|x| x.is_finite()));
}

#[test]
fn token_select_prefill_chunk_mask() {
    let g = geom(2, 1, 4);
    let mut r = Rng::new(5);
    let c = cache_with(g, 1, &r.vec(30 * 4));
    let q = r.vec(4 * 8); // the last 4 tokens are the chunk
    let rows = Ragged::from_lens(&[4]).unwrap();
    let cfg = TokenSelectConfig {
        n_init: 2,
        k: 3,
        n_local: 4,
        ..TokenSelectConfig::default()
    };
    let mut ts = TokenSelect::new(cfg).unwrap();
    let cx = StepCtx {
        phase: Phase::PrefillSelect,
        ..ctx(&c, 0, &q, &rows, 0)
    };
    let list = selected(ts.before_prefill_chunk(&cx).unwrap());
    assert_eq!(list.list(0).len(), 9);
    let layer = c.layer(0).unwrap();
    let mask = selection_prefill_mask(&list, &g, &rows, layer.segments()).unwrap();
    assert_eq!(mask.shape_of(0), (4, 30));
    let mut out = vec![0.0f32; q.len()];
    let p = PrefillParams {
        geom: g,
        q_rows: &rows,
        segments: layer.segments(),
        causal: true,
        mask: Some(&mask),
        scale: None,
        normalizer: &Normalizer::Softmax,
    };
    ops::prefill_attention(&Reference, &p, &q, layer.k(), layer.v(), &mut out).unwrap();
    // The chunk's last query equals sparse decode attention over the list.
    let dec = decode_out(g, &c, 0, &q[3 * 8..].to_vec(), Restrict::Indices(&list));
    assert_eq!(&out[3 * 8..], &dec[..]);
}

#[test]
fn ragged_batch_mixes_dense_and_sparse_sequences() {
    let g = geom(4, 2, 4);
    let mut r = Rng::new(17);
    let mut c = KvCache::<Reference, f32>::new(&Reference, g, 2, 3).unwrap();
    let t = Ragged::from_lens(&[10, 40]).unwrap();
    let k = r.vec(50 * 2 * 4);
    for l in 0..3 {
        c.append(&Reference, l, &t, &k, &k, None).unwrap();
    }
    let q = r.vec(2 * 16);
    let rows = Ragged::uniform(2, 1).unwrap();
    let mut ts = TokenSelect::new(TokenSelectConfig {
        n_init: 2,
        k: 6,
        n_local: 4,
        ..TokenSelectConfig::default()
    })
    .unwrap();
    let list = selected(select(&mut ts, &ctx(&c, 0, &q, &rows, 0)));
    assert_eq!(list.num_lists(), 4);
    assert_eq!(
        list.list(0),
        (0..10).collect::<Vec<u32>>().as_slice(),
        "short sequence: dense"
    );
    assert_eq!(list.list(2).len(), 12);
    assert_eq!(list.list(2), list.list(3));
    assert_eq!(
        ts.cache_stats(0).lookups,
        1,
        "only the sparse sequence looks up"
    );
    let out = decode_out(g, &c, 0, &q, Restrict::Indices(&list));
    assert!(out.iter().all(|x| x.is_finite()));
    let mut td = TidalDecode::new(TidalDecodeConfig {
        k: 12,
        sparse_layer_start: 1,
        reselect_layers: vec![],
        ..TidalDecodeConfig::default()
    })
    .unwrap();
    step(&mut td, &c, 1, &q, &rows, 0);
    let list = selected(step(&mut td, &c, 2, &q, &rows, 0));
    assert_eq!(list.num_lists(), 8);
    assert_eq!(list.list(0).len(), 10);
    assert_eq!(list.list(5).len(), 12);
    assert_eq!(*list.list(5).last().unwrap(), 39);
    let out = decode_out(g, &c, 2, &q, Restrict::Indices(&list));
    assert!(out.iter().all(|x| x.is_finite()));
    // Wrong query length and an out-of-range layer are errors, not panics.
    let short = vec![0.0f32; 5];
    assert!(
        ts.select_for_attention(&ctx(&c, 0, &short, &rows, 0))
            .is_err()
    );
    // A selection layer's decode hook without its logits evidence.
    let no_evidence = StepCtx {
        phase: Phase::Decode,
        ..ctx(&c, 1, &short, &rows, 1)
    };
    assert!(td.on_decode_step(&no_evidence).is_err());
    let far = StepCtx {
        layer: usize::MAX,
        ..ctx(&c, 0, &q, &rows, 0)
    };
    assert!(ts.select_for_attention(&far).is_err());
}

// ------------------------------------------------------- Selection Cache

#[test]
fn selection_cache_hits_and_misses() {
    let g = geom(2, 1, 4);
    let mut r = Rng::new(11);
    let mut c = KvCache::<Reference, f32>::new(&Reference, g, 1, 2).unwrap();
    let t = Ragged::from_lens(&[40]).unwrap();
    let k0 = r.vec(40 * 4);
    for l in 0..2 {
        c.append(&Reference, l, &t, &k0, &k0, None).unwrap();
    }
    let cfg = TokenSelectConfig {
        n_init: 2,
        k: 4,
        n_local: 2,
        ..TokenSelectConfig::default()
    };
    let mut ts = TokenSelect::new(cfg).unwrap();
    let rows = Ragged::uniform(1, 1).unwrap();
    let same = r.vec(8);
    let one = Ragged::from_lens(&[1]).unwrap();
    let steps = 6;
    for s in 0..steps {
        let kn = r.vec(4);
        for l in 0..2 {
            c.append(&Reference, l, &one, &kn, &kn, None).unwrap();
        }
        // Layer 0: identical queries. Layer 1: e_{s mod 4} in both heads
        // (consecutive fingerprints are orthogonal).
        let mut orth = vec![0.0f32; 8];
        orth[s % 4] = 1.0;
        orth[4 + s % 4] = 1.0;
        let l0 = selected(select(&mut ts, &ctx(&c, 0, &same, &rows, s)));
        let n = 41 + s as u32;
        assert!(
            l0.list(0).contains(&(n - 1)),
            "the newest token is always attended"
        );
        selected(select(&mut ts, &ctx(&c, 1, &orth, &rows, s)));
    }
    let s0 = ts.cache_stats(0);
    assert_eq!((s0.hits, s0.lookups), (steps as u64 - 1, steps as u64));
    assert_eq!(ts.hit_rate(1), Some(0.0));
    assert_eq!(ts.cache_stats(1).lookups, steps as u64);
    let total = ts.total_cache_stats();
    assert_eq!((total.hits, total.lookups), (5, 12));
    assert!((ts.total_hit_rate().unwrap() - 5.0 / 12.0).abs() < 1e-12);
    // θ = 0: orthogonal fingerprints (cosine 0) hit; the cache off: always miss.
    for (theta, on, hits) in [(0.0, true, steps as u64 - 1), (0.9, false, 0)] {
        let mut t2 = TokenSelect::new(TokenSelectConfig {
            n_init: 2,
            k: 4,
            n_local: 2,
            theta,
            selection_cache: on,
            ..TokenSelectConfig::default()
        })
        .unwrap();
        for s in 0..steps {
            let mut orth = vec![0.0f32; 8];
            orth[s % 4] = 1.0;
            let q = if on { orth } else { same.clone() };
            selected(select(&mut t2, &ctx(&c, 1, &q, &rows, s)));
        }
        assert_eq!(t2.cache_stats(1).hits, hits, "theta {theta}, cache {on}");
    }
    // After reset the first query selects again (a miss).
    KvPolicy::<Reference, f32>::reset(&mut ts);
    selected(select(&mut ts, &ctx(&c, 0, &same, &rows, 0)));
    assert_eq!(ts.cache_stats(0).hits, 5);
    assert_eq!(ts.cache_stats(0).lookups, 7);
}

// ---------------------------------------------------------------- TidalDecode

#[test]
fn tidal_decode_layer_roles_and_persistence() {
    let g = geom(4, 2, 4);
    let mut r = Rng::new(21);
    let layers = 6;
    let c = cache_with(g, layers, &r.vec(50 * 2 * 4));
    let cfg = TidalDecodeConfig {
        k: 8,
        sparse_layer_start: 2,
        reselect_layers: vec![4],
        ..TidalDecodeConfig::default()
    };
    let mut td = TidalDecode::for_layers(cfg, layers).unwrap();
    assert_eq!(td.role(0), LayerRole::Full);
    assert_eq!(td.role(2), LayerRole::Selection);
    assert_eq!(td.role(3), LayerRole::Sparse);
    assert_eq!(td.role(4), LayerRole::Selection);
    let rows = Ragged::uniform(1, 1).unwrap();
    let qs: Vec<Vec<f32>> = (0..layers).map(|_| r.vec(16)).collect();
    let mut lists = Vec::new();
    for (l, q) in qs.iter().enumerate() {
        lists.push(step(&mut td, &c, l, q, &rows, 0));
    }
    assert_eq!(lists[0], Plan::KeepAll);
    assert_eq!(lists[2], Plan::KeepAll, "selection layers attend densely");
    let l3 = selected(lists[3].clone());
    assert_eq!(l3.scope(), Scope::QueryHead);
    for h in 0..4 {
        assert_eq!(l3.list(h).len(), 8);
        assert_eq!(*l3.list(h).last().unwrap(), 49, "current token attended");
    }
    // Layer 3 uses exactly layer 2's per-head top-(k-1) of the logits.
    let layer2 = c.layer(2).unwrap();
    for h in 0..4 {
        let kv = g.kv_head(h);
        let mut z: Vec<(f32, u32)> = (0..49)
            .map(|j| {
                let row = layer2.segments().offset(kv) + j;
                let key = &layer2.k()[row * 4..row * 4 + 4];
                (
                    key.iter()
                        .zip(&qs[2][h * 4..h * 4 + 4])
                        .map(|(a, b)| a * b)
                        .sum(),
                    j as u32,
                )
            })
            .collect();
        z.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut want: Vec<u32> = z[..7].iter().map(|x| x.1).collect();
        want.push(49);
        want.sort_unstable();
        assert_eq!(l3.list(h), &want[..]);
    }
    // Layer 5 follows the re-selection of layer 4.
    assert_ne!(lists[5], lists[3]);
    assert_eq!(td.current_selection(), Some(&selected(lists[5].clone())));
    // Summed-GQA variant: one list per KV head.
    let mut tds = TidalDecode::new(TidalDecodeConfig {
        k: 8,
        gqa: GqaMode::PerKvHeadSummed,
        reselect_layers: vec![],
        ..TidalDecodeConfig::default()
    })
    .unwrap();
    step(&mut tds, &c, 2, &qs[2], &rows, 0);
    let l = selected(step(&mut tds, &c, 3, &qs[3], &rows, 0));
    assert_eq!(l.scope(), Scope::KvHead);
    assert_eq!(l.num_lists(), 2);
    let out = decode_out(g, &c, 3, &qs[3], Restrict::Indices(&l));
    assert!(out.iter().all(|x| x.is_finite()));
    // A sparse layer before any selection layer of the step is an error.
    let mut fresh = TidalDecode::new(TidalDecodeConfig::default()).unwrap();
    let bad = fresh.select_for_attention(&ctx(&c, 3, &qs[3], &rows, 0));
    assert!(matches!(bad, Err(Error::InvalidConfig { .. })), "{bad:?}");
}

#[test]
fn tidal_decode_correction_hook() {
    let td = TidalDecode::new(TidalDecodeConfig::default()).unwrap();
    assert!(!(0..100).any(|s| td.correction_due(s)), "off by default");
    let td = TidalDecode::new(TidalDecodeConfig {
        correction_interval: Some(4),
        ..TidalDecodeConfig::default()
    })
    .unwrap();
    let due: Vec<usize> = (0..12).filter(|&s| td.correction_due(s)).collect();
    assert_eq!(due, vec![3, 7, 11]);
    assert_eq!(td.correction_window(7), Some(4..8));
    assert_eq!(td.correction_window(6), None);
}

// --------------------------------------------------------- needle (2 %, 16K)

#[test]
fn needle_is_selected_at_two_percent_over_16k() {
    let (n, d) = (16_384usize, 16usize);
    let g = geom(4, 2, d);
    let mut r = Rng::new(99);
    let q = r.vec(4 * d);
    let mut k = r.vec(n * 2 * d);
    let needle = 7_777usize;
    for kv in 0..2 {
        let row = &mut k[(needle * 2 + kv) * d..(needle * 2 + kv + 1) * d];
        for (i, x) in row.iter_mut().enumerate() {
            // Aligned with both query heads of the group.
            *x = 3.0 * (q[(2 * kv) * d + i] + q[(2 * kv + 1) * d + i]);
        }
    }
    let c = cache_with(g, 2, &k);
    let rows = Ragged::uniform(1, 1).unwrap();
    let budget = n / 50; // 327 tokens = 2 %

    let mut ts = TokenSelect::new(TokenSelectConfig {
        n_init: 16,
        k: budget - 16 - 48,
        n_local: 48,
        ..TokenSelectConfig::default()
    })
    .unwrap();
    let list = selected(select(&mut ts, &ctx(&c, 0, &q, &rows, 0)));
    for kv in 0..2 {
        assert_eq!(list.list(kv).len(), budget);
        assert!(list.list(kv).binary_search(&(needle as u32)).is_ok());
    }

    for gqa in [GqaMode::PerQueryHead, GqaMode::PerKvHeadSummed] {
        let mut td = TidalDecode::new(TidalDecodeConfig {
            k: budget,
            sparse_layer_start: 0,
            reselect_layers: vec![],
            gqa,
            ..TidalDecodeConfig::default()
        })
        .unwrap();
        assert_eq!(step(&mut td, &c, 0, &q, &rows, 0), Plan::KeepAll);
        let list = selected(step(&mut td, &c, 1, &q, &rows, 0));
        for i in 0..list.num_lists() {
            assert_eq!(list.list(i).len(), budget);
            assert!(
                list.list(i).binary_search(&(needle as u32)).is_ok(),
                "{gqa:?} list {i}"
            );
            assert_eq!(*list.list(i).last().unwrap(), n as u32 - 1);
        }
        // The list goes straight into sparse decode attention.
        let sparse = decode_out(g, &c, 1, &q, Restrict::Indices(&list));
        assert!(sparse.iter().all(|x| x.is_finite()));
    }
}

// ------------------------------------------------------------------------ DAM

const PCL: usize = 64;

/// A causal map: faint background, a band of width 3 (diagonals 0, 1, 2) and
/// two bright columns (0 and 10).
fn synthetic_map() -> Vec<f32> {
    let mut m = vec![0.0f32; PCL * PCL];
    for i in 0..PCL {
        for j in 0..=i {
            m[i * PCL + j] = if i - j < 3 || j == 0 || j == 10 {
                0.2
            } else {
                0.001
            };
        }
    }
    m
}

fn dam_cfg() -> DamConfig {
    DamConfig {
        pcl: PCL,
        ..DamConfig::default()
    }
}

#[test]
fn dam_synthetic_map_and_extension() {
    let map = synthetic_map();
    let dam = Dam::calibrate(&dam_cfg(), &[vec![&map[..], &map[..]]]).unwrap();
    let p = dam.pattern(0, 1).unwrap();
    assert_eq!(p.diagonals, vec![0, 1, 2]);
    assert_eq!(p.verticals, vec![0, 10]);
    // The paper's exact rule (no support guard) also matches edge artefacts.
    let raw = Dam::calibrate(
        &DamConfig {
            min_support: 1,
            ..dam_cfg()
        },
        &[vec![&map[..]]],
    )
    .unwrap();
    assert!(
        raw.pattern(0, 0)
            .unwrap()
            .verticals
            .contains(&(PCL as u32 - 1))
    );
    // Percentile threshold: 90 % of the causal cells are faint.
    let pct = Dam::calibrate(
        &DamConfig {
            threshold: DamThreshold::Percentile(95.0),
            ..dam_cfg()
        },
        &[vec![&map[..]]],
    )
    .unwrap();
    assert_eq!(pct.pattern(0, 0), Some(p));

    // Extension to 4x the calibration length keeps exactly these patterns.
    let n = 4 * PCL;
    let g = geom(2, 1, 4);
    let segs = Segments::uniform(1, 1, n).unwrap();
    let rows = Ragged::from_lens(&[n as u32]).unwrap();
    let mask = dam.prefill_mask(0, &g, &rows, &segs).unwrap();
    for i in 0..n {
        for j in 0..n {
            let want = j <= i && (i - j < 3 || j == 0 || j == 10);
            assert_eq!(mask.get(1, i, j), want, "({i}, {j})");
        }
    }
    let idx = dam.decode_indices(0, &g, &segs).unwrap();
    assert_eq!(
        idx.list(0),
        &[0, 10, n as u32 - 3, n as u32 - 2, n as u32 - 1]
    );
}

#[test]
fn dam_masks_drive_prefill_and_decode_attention() {
    let map = synthetic_map();
    let dam = Dam::calibrate(&dam_cfg(), &[vec![&map[..], &map[..]]]).unwrap();
    let g = geom(2, 1, 4);
    let mut r = Rng::new(7);
    let n = 100;
    let kv = r.vec(n * 4);
    let q = r.vec(n * 8);
    let c = cache_with(g, 1, &kv);
    let l = c.layer(0).unwrap();
    let rows = Ragged::from_lens(&[n as u32]).unwrap();
    let prefill = |mask| {
        let mut out = vec![0.0f32; q.len()];
        let p = PrefillParams {
            geom: g,
            q_rows: &rows,
            segments: l.segments(),
            causal: true,
            mask,
            scale: None,
            normalizer: &Normalizer::Softmax,
        };
        ops::prefill_attention(&Reference, &p, &q, l.k(), l.v(), &mut out).unwrap();
        out
    };
    // Masked prefill: the last row equals decode with the mask and with the
    // policy's index list.
    let mask = dam.prefill_mask(0, &g, &rows, l.segments()).unwrap();
    let pre = prefill(Some(&mask));
    let last = q[(n - 1) * 8..].to_vec();
    let dm = dam.decode_mask(0, &g, l.segments()).unwrap();
    let by_mask = decode_out(g, &c, 0, &last, Restrict::Mask(&dm));
    let mut pol = dam.clone();
    let list = selected(select(
        &mut pol,
        &ctx(&c, 0, &last, &Ragged::uniform(1, 1).unwrap(), 0),
    ));
    assert_eq!(list.scope(), Scope::QueryHead);
    let by_list = decode_out(g, &c, 0, &last, Restrict::Indices(&list));
    assert_eq!(by_mask, by_list);
    assert_eq!(&pre[(n - 1) * 8..], &by_mask[..]);
    // It differs from dense attention (the mask is sparse).
    assert_ne!(prefill(None), pre);
    // An all-causal mask equals dense causal attention, bit for bit.
    let all = HeadPattern {
        diagonals: (0..n as u32).collect(),
        verticals: vec![],
    };
    let full = Dam::from_patterns(1, 2, PCL, vec![all.clone(), all]).unwrap();
    let fm = full.prefill_mask(0, &g, &rows, l.segments()).unwrap();
    assert_eq!(prefill(Some(&fm)), prefill(None));
}

#[test]
fn dam_bytes_round_trip_and_corruption() {
    let map = synthetic_map();
    let dam = Dam::calibrate(&dam_cfg(), &[vec![&map[..]], vec![&map[..]]]).unwrap();
    let bytes = dam.to_bytes();
    assert_eq!(&bytes[..8], b"KVSVDAM\0");
    assert_eq!(Dam::from_bytes(&bytes).unwrap(), dam);
    for cut in 0..bytes.len() {
        assert!(
            matches!(Dam::from_bytes(&bytes[..cut]), Err(Error::Shape { .. })),
            "prefix {cut}"
        );
    }
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x5a;
        assert!(Dam::from_bytes(&b).is_err(), "flipped byte {i}");
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(Dam::from_bytes(&long).is_err());
    assert!(Dam::from_bytes(&[]).is_err());
    let e = Dam::from_bytes(&[0xff; 64]).unwrap_err();
    assert!(e.to_string().contains("magic"), "{e}");
}

// ------------------------------------------------ budget ≥ length ⇒ Full

fn run_session(policy: Box<dyn KvPolicy<Reference, f32>>, seed: u64) -> Vec<Vec<Vec<f32>>> {
    let g = geom(4, 2, 8);
    let layers = 4;
    let prompt = 20usize;
    let mut r = Rng::new(seed);
    let cfg = SessionConfig {
        prefill_chunk: Some(8),
        ..SessionConfig::default()
    };
    let mut s = Session::new(Reference, g, 1, layers, policy, cfg).unwrap();
    let pre: Vec<[Vec<f32>; 3]> = (0..layers)
        .map(|_| [r.vec(prompt * 32), r.vec(prompt * 16), r.vec(prompt * 16)])
        .collect();
    let inputs: Vec<LayerInput<'_, Reference, f32>> = pre
        .iter()
        .map(|x| LayerInput {
            q: &x[0],
            k: &x[1],
            v: &x[2],
        })
        .collect();
    let mut outs = vec![
        s.prefill(&Ragged::from_lens(&[prompt as u32]).unwrap(), &inputs)
            .unwrap(),
    ];
    for _ in 0..6 {
        let st: Vec<[Vec<f32>; 3]> = (0..layers)
            .map(|_| [r.vec(32), r.vec(16), r.vec(16)])
            .collect();
        let inputs: Vec<LayerInput<'_, Reference, f32>> = st
            .iter()
            .map(|x| LayerInput {
                q: &x[0],
                k: &x[1],
                v: &x[2],
            })
            .collect();
        outs.push(s.decode(&inputs).unwrap());
    }
    outs
}

#[test]
fn budget_at_or_above_length_equals_full() {
    let full = run_session(Box::new(Full), 1);
    let ts = TokenSelect::new(TokenSelectConfig {
        n_init: 4,
        k: 26,
        n_local: 4,
        ..TokenSelectConfig::default()
    })
    .unwrap();
    assert_eq!(run_session(Box::new(ts), 1), full, "TokenSelect");
    for gqa in [GqaMode::PerQueryHead, GqaMode::PerKvHeadSummed] {
        let td = TidalDecode::for_layers(
            TidalDecodeConfig {
                k: 26,
                sparse_layer_start: 1,
                reselect_layers: vec![3],
                gqa,
                ..TidalDecodeConfig::default()
            },
            4,
        )
        .unwrap();
        assert_eq!(run_session(Box::new(td), 1), full, "TidalDecode {gqa:?}");
    }
    let all = HeadPattern {
        diagonals: (0..64).collect(),
        verticals: vec![],
    };
    let dam = Dam::from_patterns(4, 4, 64, vec![all; 16]).unwrap();
    assert_eq!(run_session(Box::new(dam), 1), full, "DAM (all-causal)");
    // Small budgets run through the session too, and differ from Full.
    let ts = TokenSelect::new(TokenSelectConfig {
        n_init: 2,
        k: 4,
        n_local: 2,
        ..TokenSelectConfig::default()
    })
    .unwrap();
    assert_ne!(run_session(Box::new(ts), 1), full);
    let td = TidalDecode::new(TidalDecodeConfig {
        k: 5,
        sparse_layer_start: 1,
        reselect_layers: vec![],
        ..TidalDecodeConfig::default()
    })
    .unwrap();
    assert_ne!(run_session(Box::new(td), 1), full);
}

// ------------------------------------------------------------------ bad input

#[test]
fn bad_input_is_a_clear_error() {
    let e = TokenSelect::new(TokenSelectConfig {
        k: 0,
        ..TokenSelectConfig::default()
    })
    .unwrap_err();
    assert!(matches!(e, Error::Budget { .. }), "{e}");
    let e = TokenSelect::new(TokenSelectConfig {
        pool_kernel: Some(4),
        ..TokenSelectConfig::default()
    })
    .unwrap_err();
    assert!(
        matches!(e, Error::InvalidConfig { .. }) && e.to_string().contains("odd"),
        "{e}"
    );
    for theta in [1.5, -1.1, f32::NAN, f32::INFINITY] {
        let e = TokenSelect::new(TokenSelectConfig {
            theta,
            ..TokenSelectConfig::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("theta"), "{e}");
    }
    assert!(
        TokenSelect::new(TokenSelectConfig {
            theta: -1.0,
            ..TokenSelectConfig::default()
        })
        .is_ok()
    );

    assert!(matches!(
        TidalDecode::new(TidalDecodeConfig {
            k: 0,
            ..TidalDecodeConfig::default()
        }),
        Err(Error::Budget { .. })
    ));
    let e = TidalDecode::for_layers(TidalDecodeConfig::default(), 8).unwrap_err();
    assert!(e.to_string().contains("selection layer 13"), "{e}");
    assert!(TidalDecode::for_layers(TidalDecodeConfig::default(), 32).is_ok());
    assert!(
        TidalDecode::new(TidalDecodeConfig {
            reselect_layers: vec![1],
            ..TidalDecodeConfig::default()
        })
        .is_err()
    );
    // Checked against the model at the first hook too.
    let g = geom(2, 1, 4);
    let c = cache_with(g, 4, &[0.5; 40]);
    let mut td = TidalDecode::new(TidalDecodeConfig::default()).unwrap();
    let q = vec![1.0f32; 8];
    let rows = Ragged::uniform(1, 1).unwrap();
    assert!(matches!(
        td.select_for_attention(&ctx(&c, 0, &q, &rows, 0)),
        Err(Error::InvalidConfig { .. })
    ));

    let e = Dam::from_bytes(b"KVSVDAM\0garbage-garbage-garbage").unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let bad_len = [0.0f32; 10];
    assert!(Dam::calibrate(&dam_cfg(), &[vec![&bad_len[..]]]).is_err());
    let mut nan = synthetic_map();
    nan[5] = f32::NAN;
    assert!(matches!(
        Dam::calibrate(&dam_cfg(), &[vec![&nan[..]]]),
        Err(Error::NonFinite { .. })
    ));
    for cfg in [
        DamConfig {
            mu: 0.0,
            ..dam_cfg()
        },
        DamConfig {
            pcl: 0,
            ..dam_cfg()
        },
        DamConfig {
            threshold: DamThreshold::Percentile(101.0),
            ..dam_cfg()
        },
        DamConfig {
            lambda: f32::NAN,
            ..dam_cfg()
        },
    ] {
        assert!(matches!(
            Dam::calibrate(&cfg, &[vec![&synthetic_map()[..]]]),
            Err(Error::InvalidConfig { .. })
        ));
    }
    let map = synthetic_map();
    let dam = Dam::calibrate(&dam_cfg(), &[vec![&map[..], &map[..]]]).unwrap();
    let segs = Segments::uniform(1, 1, 5).unwrap();
    assert!(
        dam.decode_indices(1, &g, &segs).is_err(),
        "layer out of range"
    );
    assert!(
        dam.decode_indices(0, &geom(4, 1, 4), &segs).is_err(),
        "head count mismatch"
    );
    assert!(
        Dam::from_patterns(1, 1, 8, vec![HeadPattern::default()]).is_err(),
        "diagonal 0 missing"
    );
}

// ------------------------------------------- selections restrict prefill chunks

/// DAM through `Session::prefill` (chunked: DAM's own 512-token blocks, or
/// 16 here) equals one `prefill_attention` with DAM's prefill mask over the
/// whole prompt: the chunk hook's masks take effect.
#[test]
fn dam_prefill_through_session_equals_masked_prefill() {
    let map = synthetic_map();
    let dam = Dam::calibrate(&dam_cfg(), &[vec![&map[..], &map[..]]]).unwrap();
    let g = geom(2, 1, 4);
    let mut r = Rng::new(8);
    let n = 90;
    let (q, k, v) = (r.vec(n * 8), r.vec(n * 4), r.vec(n * 4));
    let rows = Ragged::from_lens(&[n as u32]).unwrap();
    let cfg = SessionConfig {
        prefill_chunk: Some(16),
        ..SessionConfig::default()
    };
    let mut s = Session::new(Reference, g, 1, 1, Box::new(dam.clone()), cfg).unwrap();
    let got = s
        .prefill(
            &rows,
            &[LayerInput {
                q: &q,
                k: &k,
                v: &v,
            }],
        )
        .unwrap()
        .remove(0);
    let c = s.cache().layer(0).unwrap();
    let mask = dam.prefill_mask(0, &g, &rows, c.segments()).unwrap();
    let mut want = vec![0.0f32; q.len()];
    let p = PrefillParams {
        geom: g,
        q_rows: &rows,
        segments: c.segments(),
        causal: true,
        mask: Some(&mask),
        scale: None,
        normalizer: &Normalizer::Softmax,
    };
    ops::prefill_attention(&Reference, &p, &q, c.k(), c.v(), &mut want).unwrap();
    assert_eq!(got, want);
    let mut dense = vec![0.0f32; q.len()];
    let p = PrefillParams { mask: None, ..p };
    ops::prefill_attention(&Reference, &p, &q, c.k(), c.v(), &mut dense).unwrap();
    assert_ne!(got, dense, "the mask is sparse: it must change the output");
}

/// TokenSelect through `Session::prefill_chunk_layer`: each chunk's output
/// equals `prefill_attention` with `selection_prefill_mask` of the selection
/// TokenSelect makes for that chunk (recomputed by a twin policy on a twin
/// cache).
#[test]
fn token_select_prefill_through_session_equals_masked_prefill() {
    let g = geom(2, 1, 4);
    let mut r = Rng::new(9);
    let (chunk, chunks) = (12usize, 5usize);
    let n = chunk * chunks;
    let (q, k) = (r.vec(n * 8), r.vec(n * 4));
    let cfg = TokenSelectConfig {
        n_init: 2,
        k: 5,
        n_local: 3,
        chunk,
        ..TokenSelectConfig::default()
    };
    let mut s = Session::new(
        Reference,
        g,
        1,
        1,
        Box::new(TokenSelect::new(cfg.clone()).unwrap()),
        SessionConfig::default(),
    )
    .unwrap();
    let mut twin = TokenSelect::new(cfg).unwrap();
    let mut tc = KvCache::<Reference, f32>::new(&Reference, g, 1, 1).unwrap();
    let rows = Ragged::from_lens(&[chunk as u32]).unwrap();
    let mut sparse_chunks = 0;
    for c in 0..chunks {
        let qc = q[c * chunk * 8..(c + 1) * chunk * 8].to_vec();
        let kc = k[c * chunk * 4..(c + 1) * chunk * 4].to_vec();
        let got = s
            .prefill_chunk_layer(
                0,
                &rows,
                &LayerInput {
                    q: &qc,
                    k: &kc,
                    v: &kc,
                },
                c + 1 == chunks,
            )
            .unwrap();
        s.end_prefill_chunk();
        tc.append(&Reference, 0, &rows, &kc, &kc, None).unwrap();
        let cx = StepCtx {
            phase: Phase::PrefillSelect,
            ..ctx(&tc, 0, &qc, &rows, c)
        };
        let l = tc.layer(0).unwrap();
        let mask = match twin.before_prefill_chunk(&cx).unwrap() {
            Plan::Select(list) => {
                sparse_chunks += 1;
                Some(selection_prefill_mask(&list, &g, &rows, l.segments()).unwrap())
            }
            _ => None,
        };
        let mut want = vec![0.0f32; qc.len()];
        let p = PrefillParams {
            geom: g,
            q_rows: &rows,
            segments: l.segments(),
            causal: true,
            mask: mask.as_ref(),
            scale: None,
            normalizer: &Normalizer::Softmax,
        };
        ops::prefill_attention(&Reference, &p, &qc, l.k(), l.v(), &mut want).unwrap();
        assert_eq!(got, want, "chunk {c}");
    }
    assert!(sparse_chunks >= 3, "later chunks select ({sparse_chunks})");
}
