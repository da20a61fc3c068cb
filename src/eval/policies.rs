//! Every policy by name, with budget conventions shared by the `eval` and
//! `llama2c` examples and the tests.
//!
//! | name | policy | how the budget `B` is split |
//! |---|---|---|
//! | `full` | [`Full`] | everything kept |
//! | `streaming_llm` | [`StreamingLlm`] | 4 sinks + `B − 4` recent |
//! | `h2o` | [`H2O`] | heavy hitters + `B/4` recent |
//! | `tova` | [`Tova`] | `B` by the current query's attention |
//! | `snapkv` | [`SnapKv`] | window `min(32, B/2)`, avg-pool 5 |
//! | `morph_kv` | [`MorphKv`] | capacity `B` (attention sees `B + 1`), window `min(32, B/2)`, sum fusion |
//! | `caote_h2o`, `caote_tova`, `caote_snapkv` | [`Caote`] over that scorer | as the base policy |
//! | `fastcaote_h2o` | [`Caote`] with the mean value | as H2O |
//! | `ems` | [`Ems`] | window `min(32, B/2)`, B8 defaults |
//! | `token_select` | [`TokenSelect`] (selection only, cache kept) | 4 sinks + `B/8` local + top-k of the rest; prefill chunks of `B/8` tokens |
//! | `tidal_decode` | [`TidalDecode`] (selection only) | top-`B` per query head; with [`make_policy_for`] and 3+ layers the paper's roles (dense layers 0–1, selection at 2, reused by every later layer), else selected at layer 0 |

use crate::backend::Ops;
use crate::dtype::Element;
use crate::error::{Result, budget as budget_err, config};
use crate::policy::*;

/// Names accepted by [`make_policy`], in table order.
pub const POLICIES: &[&str] = &[
    "full",
    "streaming_llm",
    "h2o",
    "tova",
    "snapkv",
    "morph_kv",
    "caote_h2o",
    "caote_tova",
    "caote_snapkv",
    "fastcaote_h2o",
    "ems",
    "token_select",
    "tidal_decode",
];

/// Smallest budget the conventions above accept.
pub const MIN_BUDGET: usize = 8;

/// Builds policy `name` with a per-head budget of `budget` tokens for a
/// model of `num_layers` layers (TidalDecode's layer roles depend on it).
pub fn make_policy_for<B: Ops + 'static, T: Element>(
    name: &str,
    budget: usize,
    num_layers: usize,
) -> Result<Box<dyn KvPolicy<B, T>>> {
    if name == "tidal_decode" && num_layers >= 3 {
        if budget < MIN_BUDGET {
            return Err(budget_err(
                "make_policy",
                format!("budget {budget} < {MIN_BUDGET}"),
            ));
        }
        return Ok(Box::new(TidalDecode::for_layers(
            TidalDecodeConfig {
                k: budget,
                sparse_layer_start: 2,
                reselect_layers: Vec::new(),
                ..TidalDecodeConfig::default()
            },
            num_layers,
        )?));
    }
    make_policy(name, budget)
}

/// Builds policy `name` with a per-head budget of `budget` tokens.
pub fn make_policy<B: Ops + 'static, T: Element>(
    name: &str,
    budget: usize,
) -> Result<Box<dyn KvPolicy<B, T>>> {
    if budget < MIN_BUDGET {
        return Err(budget_err(
            "make_policy",
            format!("budget {budget} < {MIN_BUDGET}"),
        ));
    }
    let window = 32.min(budget / 2);
    let h2o = || H2oConfig {
        budget: Budget::tokens(budget).with_sink(4).with_recent(budget / 4),
        ..H2oConfig::default()
    };
    let tova = || TovaConfig {
        budget: Budget::tokens(budget),
        ..TovaConfig::default()
    };
    let snap = || SnapKvConfig {
        budget: Budget::tokens(budget),
        window,
        ..SnapKvConfig::default()
    };
    let caote = |fast| CaoteConfig {
        budget: Budget::tokens(budget).with_sink(4).with_recent(budget / 4),
        fast,
        ..CaoteConfig::default()
    };
    Ok(match name {
        "full" => Box::new(Full),
        "streaming_llm" => Box::new(StreamingLlm::new(StreamingLlmConfig {
            sink: 4,
            recent: budget - 4,
        })?),
        "h2o" => Box::new(H2O::new(h2o())?),
        "tova" => Box::new(Tova::new(tova())?),
        "snapkv" => Box::new(SnapKv::new(snap())?),
        "morph_kv" => Box::new(MorphKv::new(MorphKvConfig {
            window,
            capacity: budget,
            ..MorphKvConfig::default()
        })?),
        "caote_h2o" => Box::new(Caote::new(caote(false), H2oScorer::default())?),
        "caote_tova" => Box::new(Caote::new(
            CaoteConfig {
                budget: Budget::tokens(budget),
                ..caote(false)
            },
            TovaScorer,
        )?),
        "caote_snapkv" => Box::new(Caote::new(
            CaoteConfig {
                budget: Budget::tokens(budget),
                ..caote(false)
            },
            SnapKvScorer {
                window,
                ..SnapKvScorer::default()
            },
        )?),
        "fastcaote_h2o" => Box::new(Caote::new(caote(true), H2oScorer::default())?),
        "ems" => Box::new(Ems::new(EmsConfig {
            budget: Budget::tokens(budget),
            window,
            ..EmsConfig::default()
        })?),
        "token_select" => {
            let n_local = (budget / 8).max(1);
            Box::new(TokenSelect::new(TokenSelectConfig {
                n_init: 4,
                n_local,
                k: budget - 4 - n_local,
                // Prefill chunks (the policy's `prefill_block`) no longer
                // than the local window, as in the paper (both 512): a
                // longer chunk would hide most of a chunk's own earlier
                // tokens from its queries.
                chunk: n_local,
                ..TokenSelectConfig::default()
            })?)
        }
        "tidal_decode" => Box::new(TidalDecode::new(TidalDecodeConfig {
            k: budget,
            sparse_layer_start: 0,
            reselect_layers: Vec::new(),
            ..TidalDecodeConfig::default()
        })?),
        other => {
            return Err(config(
                "make_policy",
                format!("unknown policy `{other}` (known: {})", POLICIES.join(", ")),
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Reference;

    #[test]
    fn every_name_builds_and_bad_names_fail() {
        for name in POLICIES {
            let p = make_policy::<Reference, f32>(name, 64).unwrap();
            assert!(!p.name().is_empty());
        }
        assert!(make_policy::<Reference, f32>("nope", 64).is_err());
        assert!(make_policy::<Reference, f32>("h2o", 2).is_err());
    }
}
