//! Every KV policy through `Session` (prefill in fuzzed chunks, then decode
//! steps) on the reference or the CPU backend, with fuzzed geometry, prompt
//! lengths, chunk sizes, budgets (also absurd) and hand-built configs with
//! fuzzed windows, sinks and capacities.
//!
//! Invariants: a config is accepted or rejected with an error (never a
//! panic or abort); every accepted run keeps, after every step and in every
//! layer and segment, distinct positions and distinct arrivals below `seen`
//! (rows are not in position order: eviction fills holes from the tail), lengths within the segment's capacity, one
//! token of growth at most per decode step (StreamingLLM: at most its
//! windows); policies that only select never drop a token; attention outputs
//! are finite.
#![no_main]

use kvsieve::attention::{LayerInput, Session, SessionConfig};
use kvsieve::backend::Ops;
use kvsieve::eval::policies::{POLICIES, make_policy_for};
use kvsieve::policy::*;
use kvsieve::reference::Reference;
use kvsieve::*;
use kvsieve_fuzz::*;
use libfuzzer_sys::fuzz_target;

/// A policy by name with a fuzzed budget, or a hand-built config with fuzzed
/// fields (sizes possibly absurd). Returns the policy, its token budget and,
/// for a hand-built StreamingLLM, its `(sink, recent)`.
type Made<B> = (Box<dyn KvPolicy<B, f32>>, usize, Option<(usize, usize)>);

fn policy<B: Ops + 'static>(u: &mut Unstructured<'_>, layers: usize) -> Res<Option<Made<B>>> {
    let budget = size(u, 48)?;
    let mut streaming = None;
    let made: kvsieve::Result<Box<dyn KvPolicy<B, f32>>> = match u.int_in_range(0u8..=4)? {
        0 => {
            let name = POLICIES[u.choose_index(POLICIES.len())?];
            make_policy_for(name, budget, layers)
        }
        1 => H2O::new(H2oConfig {
            budget: Budget::tokens(budget).with_sink(size(u, 8)?).with_recent(size(u, 8)?),
            ..H2oConfig::default()
        })
        .map(|p| Box::new(p) as _),
        2 => SnapKv::new(SnapKvConfig {
            budget: Budget::tokens(budget).with_sink(size(u, 4)?),
            window: size(u, 16)?,
            kernel: 2 * u.int_in_range(0..=3usize)? + 1,
            ..SnapKvConfig::default()
        })
        .map(|p| Box::new(p) as _),
        3 => {
            let (sink, recent) = (size(u, 8)?, size(u, 32)?);
            streaming = Some((sink, recent));
            StreamingLlm::new(StreamingLlmConfig { sink, recent }).map(|p| Box::new(p) as _)
        }
        _ => MorphKv::new(MorphKvConfig {
            window: size(u, 16)?,
            capacity: budget,
            scoring: if u.arbitrary()? {
                MorphScoring::Rescore
            } else {
                MorphScoring::Evidence
            },
            ..MorphKvConfig::default()
        })
        .map(|p| Box::new(p) as _),
    };
    Ok(made.ok().map(|p| (p, budget, streaming)))
}

/// Checks every segment of every layer; returns the longest segment.
/// `limit`: the most tokens a segment may hold now (growth by at most one
/// token per decode step; StreamingLLM exactly its windows).
fn check<B: Ops>(s: &Session<B, f32>, selects_only: bool, limit: usize, ctx: &dyn Fn() -> String) -> usize {
    let cache = s.cache();
    let mut longest = 0;
    for l in 0..cache.num_layers() {
        let kv = cache.layer(l).expect("layer in range");
        let segs = kv.segments();
        for seg in 0..segs.num_segments() {
            let b = seg / kv.geom().num_kv_heads();
            let seen = kv.seen(b);
            let (pos, arr) = (kv.positions(seg), kv.arrivals(seg));
            let len = kv.len_of(seg);
            longest = longest.max(len);
            let at = || format!("{} layer {l} seg {seg}", ctx());
            assert_eq!((pos.len(), arr.len()), (len, len), "{}", at());
            // Eviction fills holes with rows from the segment's tail
            // (`cache::compaction_moves`), so rows are not in position
            // order: positions (and arrivals) are distinct, not sorted.
            let mut sorted = pos.to_vec();
            sorted.sort_unstable();
            assert!(sorted.windows(2).all(|w| w[0] < w[1]), "{} positions {pos:?}", at());
            let mut sorted = arr.to_vec();
            sorted.sort_unstable();
            assert!(sorted.windows(2).all(|w| w[0] < w[1]), "{} arrivals {arr:?}", at());
            assert!(arr.iter().all(|&a| (a as usize) < seen), "{} arrivals {arr:?} seen {seen}", at());
            assert!(len <= kv.capacity_of(seg), "{} len {len} over capacity", at());
            assert!(len <= limit, "{} len {len} over {limit}", at());
            if selects_only {
                assert_eq!(len, seen, "{} a selecting policy dropped tokens", at());
            }
        }
    }
    longest
}

fn run_on<B: Ops + 'static>(be: B, u: &mut Unstructured<'_>) -> Res<()> {
    let kvh = u.int_in_range(1..=2usize)?;
    let hq = kvh * u.int_in_range(1..=3usize)?;
    let d = *u.choose(&[1usize, 4, 8, 16])?;
    let layers = u.int_in_range(1..=3usize)?;
    let batch = u.int_in_range(1..=2usize)?;
    let Some((policy, budget, streaming)) = policy::<B>(u, layers)? else {
        return Ok(());
    };
    let caps = policy.capabilities();
    let selects_only = !caps.evicts && !caps.merges;
    let name = policy.name();
    let windows = streaming.map(|(a, b)| a.saturating_add(b));
    let geom = HeadGeometry::new(hq, kvh, d).expect("small geometry");
    let cfg = SessionConfig {
        normalizer: if u.ratio(1, 4)? {
            Normalizer::Entmax { alpha: alpha(u)? }
        } else {
            Normalizer::Softmax
        },
        prefill_chunk: if u.arbitrary()? { Some(size(u, 40)?) } else { None },
        ..SessionConfig::default()
    };
    let Ok(mut s) = Session::new(be, geom, batch, layers, policy, cfg.clone()) else {
        return Ok(());
    };
    let lens: Vec<u32> = (0..batch).map(|_| u.int_in_range(1..=80u32)).collect::<Res<_>>()?;
    let tokens = Ragged::from_lens(&lens).expect("small lens");
    let steps = u.int_in_range(0..=6usize)?;
    let ctx = || format!("{name} budget {budget} geom {hq}/{kvh}/{d} layers {layers} lens {lens:?} cfg {cfg:?}");
    let values = |u: &mut Unstructured<'_>, n: usize| -> Res<Vec<f32>> { (0..n).map(|_| tame(u)).collect() };
    let n = tokens.total();
    let mut bufs = Vec::new();
    for _ in 0..layers {
        let (q, k, v) = (values(u, n * hq * d)?, values(u, n * kvh * d)?, values(u, n * kvh * d)?);
        bufs.push((s.backend().upload(&q).unwrap(), s.backend().upload(&k).unwrap(), s.backend().upload(&v).unwrap()));
    }
    let inputs: Vec<LayerInput<'_, B, f32>> = bufs.iter().map(|(q, k, v)| LayerInput { q, k, v }).collect();
    let outs = match s.prefill(&tokens, &inputs) {
        Ok(o) => o,
        // Rejections (e.g. a chunk shorter than the policy's window) are
        // errors by construction here; what matters is that nothing panics.
        Err(_) => return Ok(()),
    };
    for o in &outs {
        let o = s.backend().download(o).unwrap();
        assert!(o.iter().all(|x| x.is_finite()), "{} prefill output", ctx());
    }
    let max_len = *lens.iter().max().unwrap() as usize;
    let mut longest = check(&s, selects_only, windows.unwrap_or(max_len).min(max_len), &ctx);
    for step in 0..steps {
        let mut bufs = Vec::new();
        for _ in 0..layers {
            let (q, k, v) = (values(u, batch * hq * d)?, values(u, batch * kvh * d)?, values(u, batch * kvh * d)?);
            bufs.push((s.backend().upload(&q).unwrap(), s.backend().upload(&k).unwrap(), s.backend().upload(&v).unwrap()));
        }
        let inputs: Vec<LayerInput<'_, B, f32>> = bufs.iter().map(|(q, k, v)| LayerInput { q, k, v }).collect();
        let outs = s.decode(&inputs).unwrap_or_else(|e| panic!("{} decode step {step}: {e}", ctx()));
        for o in &outs {
            let o = s.backend().download(o).unwrap();
            assert!(o.iter().all(|x| x.is_finite()), "{} decode output", ctx());
        }
        let limit = windows.unwrap_or(usize::MAX).min(longest + 1);
        longest = check(&s, selects_only, limit, &ctx);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = if u.ratio(1, 2).unwrap_or(true) {
        run_on(Reference, &mut u)
    } else {
        match cpu(&mut u) {
            Ok(c) => run_on(c, &mut u),
            Err(e) => Err(e),
        }
    };
});
