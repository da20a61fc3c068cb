//! The runnable examples of `docs/policies/*.md`, verbatim between the
//! `// example:` and `// end` markers (the docs pages copy these blocks).

use kvsieve::attention::*;
use kvsieve::policy::*;
use kvsieve::reference::Reference;
use kvsieve::{HeadGeometry, Ragged};

/// Deterministic pseudo-random inputs in [-1, 1).
fn inputs(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// Runs one layer through a 64-token prompt and 8 decode steps; returns the
/// session (GQA: 4 query heads on 2 KV heads, D = 8).
fn drive(policy: Box<dyn KvPolicy<Reference, f32>>) -> kvsieve::Result<Session<Reference, f32>> {
    let geom = HeadGeometry::new(4, 2, 8)?;
    let mut s = Session::new(Reference, geom, 1, 1, policy, SessionConfig::default())?;
    let (q, k, v) = (
        inputs(64 * 4 * 8, 1),
        inputs(64 * 2 * 8, 2),
        inputs(64 * 2 * 8, 3),
    );
    s.prefill(
        &Ragged::from_lens(&[64])?,
        &[LayerInput {
            q: &q,
            k: &k,
            v: &v,
        }],
    )?;
    for step in 0..8 {
        let (q, k, v) = (
            inputs(4 * 8, 10 + step),
            inputs(2 * 8, 20 + step),
            inputs(2 * 8, 30 + step),
        );
        s.decode(&[LayerInput {
            q: &q,
            k: &k,
            v: &v,
        }])?;
    }
    Ok(s)
}

#[test]
fn example_full() -> kvsieve::Result<()> {
    // example: full
    let s = drive(Box::new(Full))?;
    // Nothing is evicted: 64 prompt tokens + 8 decode tokens per KV head.
    assert_eq!(s.cache().layer(0)?.segments().lens(), &[72, 72]);
    // end
    Ok(())
}

#[test]
fn example_streaming_llm() -> kvsieve::Result<()> {
    // example: streaming_llm
    let policy = StreamingLlm::new(StreamingLlmConfig {
        sink: 4,
        recent: 12,
    })?;
    let s = drive(Box::new(policy))?;
    let layer = s.cache().layer(0)?;
    // Sinks 0..4 and the 12 most recent of the 72 tokens seen (the recent
    // window is a ring: rows are not in position order).
    let mut kept = layer.positions(0).to_vec();
    kept.sort_unstable();
    let want: Vec<u32> = (0..4).chain(60..72).collect();
    assert_eq!(kept, want);
    // end
    Ok(())
}

#[test]
fn example_h2o() -> kvsieve::Result<()> {
    // example: h2o
    let policy = H2O::new(H2oConfig {
        budget: Budget::tokens(16).with_recent(8),
        ..H2oConfig::default()
    })?;
    let s = drive(Box::new(policy))?;
    let layer = s.cache().layer(0)?;
    assert_eq!(layer.segments().lens(), &[16, 16]);
    // The recent window is protected.
    let mut kept = layer.positions(1).to_vec();
    kept.sort_unstable();
    assert!(kept.ends_with(&[64, 65, 66, 67, 68, 69, 70, 71]));
    // end
    Ok(())
}

#[test]
fn example_tova() -> kvsieve::Result<()> {
    // example: tova
    let policy = Tova::new(TovaConfig {
        budget: Budget::tokens(16),
        ..TovaConfig::default()
    })?;
    let s = drive(Box::new(policy))?;
    assert_eq!(s.cache().layer(0)?.segments().lens(), &[16, 16]);
    // Each KV head chose its own tokens (head-wise budgets).
    let layer = s.cache().layer(0)?;
    let sorted = |s: usize| {
        let mut p = layer.positions(s).to_vec();
        p.sort_unstable();
        p
    };
    assert_ne!(sorted(0), sorted(1));
    // end
    Ok(())
}

#[test]
fn example_snapkv() -> kvsieve::Result<()> {
    // example: snapkv
    let policy = SnapKv::new(SnapKvConfig {
        budget: Budget::tokens(24),
        window: 8,
        ..SnapKvConfig::default()
    })?;
    let s = drive(Box::new(policy))?;
    let layer = s.cache().layer(0)?;
    // Prompt compressed to 24 at prefill end (window 56..64 kept), then 8 decode tokens.
    assert_eq!(layer.segments().lens(), &[32, 32]);
    let mut kept = layer.positions(0).to_vec();
    kept.sort_unstable();
    assert!(kept.ends_with(&[
        56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71
    ]));
    // end
    Ok(())
}

#[test]
fn example_morph_kv() -> kvsieve::Result<()> {
    // example: morph_kv
    let cfg = MorphKvConfig {
        window: 4,
        capacity: 16,
        fusion: Fusion::Max,
        ..MorphKvConfig::default()
    };
    let s = drive(Box::new(MorphKv::new(cfg)?))?;
    let layer = s.cache().layer(0)?;
    // Constant size C = 16 after every decode step (attention sees C + 1);
    // the last W tokens are kept.
    assert_eq!(layer.segments().lens(), &[16, 16]);
    let mut kept = layer.positions(0).to_vec();
    kept.sort_unstable();
    assert!(kept.ends_with(&[68, 69, 70, 71]));
    // end
    Ok(())
}

#[test]
fn example_caote() -> kvsieve::Result<()> {
    // example: caote
    // CAOTE over H2O, and FastCAOTE over TOVA; any `Scorer` works.
    let cfg = CaoteConfig {
        budget: Budget::tokens(16).with_sink(1),
        block: 32,
        ..CaoteConfig::default()
    };
    let caote = Caote::new(cfg.clone(), H2oScorer::default())?;
    let fast = Caote::new(CaoteConfig { fast: true, ..cfg }, TovaScorer)?;
    for policy in [
        Box::new(caote) as Box<dyn KvPolicy<Reference, f32>>,
        Box::new(fast),
    ] {
        let s = drive(policy)?;
        let layer = s.cache().layer(0)?;
        assert_eq!(layer.segments().lens(), &[16, 16]);
        assert_eq!(layer.positions(0)[0], 0, "the sink is protected");
    }
    // end
    Ok(())
}

#[test]
fn example_ems() -> kvsieve::Result<()> {
    // example: ems
    let cfg = EmsConfig {
        budget: Budget::tokens(24),
        window: 8,
        theta: 0.2,
        ..EmsConfig::default()
    };
    let s = drive(Box::new(Ems::new(cfg)?))?;
    let layer = s.cache().layer(0)?;
    // 24 slots per head after prefill (centres hold merged tokens), then 8 decode tokens.
    assert_eq!(layer.segments().lens(), &[32, 32]);
    assert_eq!(layer.bytes_of(0), 32 * 2 * 8 * 4);
    // end
    Ok(())
}

/// Every `docs/policies/<name>.md` page shows this file's helpers and its
/// `<name>` example as one `fn main` program, character for character.
#[test]
fn docs_pages_copy_the_examples() {
    let src = include_str!("policy_examples.rs");
    let head_start = src.find("use kvsieve").unwrap();
    let head_end = src.find("#[test]").unwrap();
    let head = format!("{}\n", src[head_start..head_end].trim_end());
    let mut rest = src;
    let mut pages = 0;
    while let Some(i) = rest.find("\n    // example: ") {
        let after = &rest[i + "\n    // example: ".len()..];
        let name_end = after.find('\n').unwrap();
        let name = &after[..name_end];
        let body_start = name_end + 1;
        let body_end = after.find("    // end\n").unwrap();
        let body = &after[body_start..body_end];
        let code = format!(
            "```rust\n{head}\nfn main() -> kvsieve::Result<()> {{\n{body}    Ok(())\n}}\n```"
        );
        let path = format!("{}/docs/policies/{name}.md", env!("CARGO_MANIFEST_DIR"));
        let page = std::fs::read_to_string(&path).unwrap();
        assert!(
            page.contains(&code),
            "{path} does not show the example `{name}` of tests/policy_examples.rs \
             (regenerate the page's code block from the test)"
        );
        pages += 1;
        rest = &after[body_end..];
    }
    assert_eq!(pages, 8);
}
