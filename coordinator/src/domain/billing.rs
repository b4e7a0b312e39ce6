//! Holds before a job, bills after it. The worker's counts are evidence, never
//! the bill: the coordinator bills what it can bound from what it saw itself.

use troop_ledger::fold::{FoldError, Schedule};
use troop_schemas::CreditsMicro;

/// Chat templates add role markers and separators around every message.
pub const TEMPLATE_TOKENS_PER_MESSAGE: u64 = 8;
/// And once per request: a default system prompt (SmolLM2's is 17 tokens), the
/// generation prompt. The most an inflating worker can add to a bill's input.
pub const TEMPLATE_TOKENS_PER_REQUEST: u64 = 64;

/// An upper bound on the prompt's tokens that needs no tokenizer: byte-level
/// BPE tokenizers (Llama, Qwen, Mistral, GPT) never make a token of less than
/// one byte, so a prompt has at most as many tokens as bytes, plus what the
/// chat template adds. Used both to size the hold and to cap what is billed.
pub fn prompt_tokens_bound(prompt_bytes: usize, messages: usize) -> u64 {
    (prompt_bytes as u64)
        .saturating_add((messages as u64).saturating_mul(TEMPLATE_TOKENS_PER_MESSAGE))
        .saturating_add(TEMPLATE_TOKENS_PER_REQUEST)
}

/// A prompt-token estimate for sizing the hold: about 3 bytes per token for
/// prose and code, rounded up. Holding the full byte bound would lock up far
/// more credit than requests use; the bill can exceed this estimate, but never
/// the hold.
pub fn prompt_tokens_estimate(prompt_bytes: usize, messages: usize) -> u64 {
    (prompt_bytes as u64)
        .div_ceil(3)
        .saturating_add((messages as u64).saturating_mul(TEMPLATE_TOKENS_PER_MESSAGE))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BillingError {
    #[error(transparent)]
    Price(#[from] FoldError),
    #[error("max_tokens {asked} is above this model's limit of {limit}")]
    MaxTokens { asked: u64, limit: u64 },
}

/// The hold for a request: the prompt estimate plus every token it may generate,
/// at the model's price.
pub fn hold_amount(
    schedule: &Schedule,
    model: &str,
    prompt_tokens_estimate: u64,
    max_tokens: u64,
    max_tokens_limit: u64,
) -> Result<CreditsMicro, BillingError> {
    if max_tokens > max_tokens_limit {
        return Err(BillingError::MaxTokens {
            asked: max_tokens,
            limit: max_tokens_limit,
        });
    }
    let micro = schedule.estimate(model, prompt_tokens_estimate, max_tokens)?;
    // At least one micro-credit: a hold of zero would be refused by the fold.
    Ok(CreditsMicro::new(micro.max(1)).unwrap_or(CreditsMicro::MAX))
}

/// What the coordinator saw of one job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Bound from [`prompt_tokens_bound`].
    pub prompt_tokens_bound: u64,
    /// Content deltas the coordinator streamed to the consumer.
    pub deltas: u64,
    /// Bytes of content it streamed.
    pub content_bytes: u64,
    /// Whether the engine streams at most one token per delta (llama.cpp and
    /// vLLM do by default); if so, deltas bound the output tokens tightly.
    pub one_token_per_delta: bool,
    /// Generation ended on a stop token, which engines count but do not stream.
    pub stopped: bool,
}

/// A worker's claim, from its signed receipt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Claimed {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bill {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The worker claimed more than the coordinator can account for: recorded
    /// against the worker (and, later, grounds for audit and escrow).
    pub overclaimed: bool,
}

/// Bills the smaller of what the worker claims and what the coordinator can
/// bound itself. A worker can under-claim (its loss) but never inflate.
pub fn bill(observed: &Observed, claimed: &Claimed) -> Bill {
    let output_bound = if observed.one_token_per_delta {
        observed.deltas + u64::from(observed.stopped)
    } else {
        // A token is at least one byte of output, however deltas are grouped.
        observed.content_bytes.max(observed.deltas)
    };
    let input_tokens = claimed.input_tokens.min(observed.prompt_tokens_bound);
    let output_tokens = claimed.output_tokens.min(output_bound);
    Bill {
        input_tokens,
        output_tokens,
        overclaimed: claimed.input_tokens > observed.prompt_tokens_bound
            || claimed.output_tokens > output_bound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use troop_ledger::fold::Price;

    fn schedule() -> Schedule {
        let mut prices = HashMap::new();
        prices.insert(
            "m".to_owned(),
            Price {
                input_micro_per_1k: 100,
                output_micro_per_1k: 200,
            },
        );
        Schedule {
            version: 1,
            fee_bps: 500,
            prices,
        }
    }

    #[test]
    fn holds_cover_the_estimate_and_every_possible_output_token() {
        let est = prompt_tokens_estimate(3_000, 2);
        assert_eq!(est, 1_016);
        // ⌈1016 × 100 / 1000⌉ + ⌈512 × 200 / 1000⌉ = 102 + 103
        assert_eq!(
            hold_amount(&schedule(), "m", est, 512, 4096),
            Ok(CreditsMicro::new(205).expect("small"))
        );
        assert_eq!(
            hold_amount(&schedule(), "m", 0, 0, 4096),
            Ok(CreditsMicro::new(1).expect("one"))
        );
        assert!(matches!(
            hold_amount(&schedule(), "x", 1, 1, 4096),
            Err(BillingError::Price(FoldError::UnknownModel(_)))
        ));
        assert_eq!(
            hold_amount(&schedule(), "m", 1, 5_000, 4096),
            Err(BillingError::MaxTokens {
                asked: 5_000,
                limit: 4096
            })
        );
    }

    #[test]
    fn an_inflating_worker_is_billed_what_was_streamed() {
        let seen = Observed {
            prompt_tokens_bound: prompt_tokens_bound(400, 1),
            deltas: 64,
            content_bytes: 250,
            one_token_per_delta: true,
            stopped: false,
        };
        let honest = bill(
            &seen,
            &Claimed {
                input_tokens: 120,
                output_tokens: 64,
            },
        );
        assert_eq!(
            honest,
            Bill {
                input_tokens: 120,
                output_tokens: 64,
                overclaimed: false
            }
        );
        let inflated = bill(
            &seen,
            &Claimed {
                input_tokens: 100_000,
                output_tokens: 6_400,
            },
        );
        assert_eq!(
            inflated,
            Bill {
                input_tokens: 472,
                output_tokens: 64,
                overclaimed: true
            }
        );
        // The stop token is generated and counted, never streamed.
        let stopped = Observed {
            stopped: true,
            ..seen
        };
        let with_stop = bill(
            &stopped,
            &Claimed {
                input_tokens: 10,
                output_tokens: 65,
            },
        );
        assert_eq!(
            with_stop,
            Bill {
                input_tokens: 10,
                output_tokens: 65,
                overclaimed: false
            }
        );
        let modest = bill(
            &seen,
            &Claimed {
                input_tokens: 10,
                output_tokens: 60,
            },
        );
        assert_eq!(
            modest,
            Bill {
                input_tokens: 10,
                output_tokens: 60,
                overclaimed: false
            }
        );
    }

    #[test]
    fn grouped_deltas_are_bounded_by_bytes() {
        let seen = Observed {
            prompt_tokens_bound: 100,
            deltas: 4,
            content_bytes: 90,
            one_token_per_delta: false,
            stopped: false,
        };
        assert_eq!(
            bill(
                &seen,
                &Claimed {
                    input_tokens: 50,
                    output_tokens: 30
                }
            )
            .output_tokens,
            30
        );
        assert!(
            bill(
                &seen,
                &Claimed {
                    input_tokens: 50,
                    output_tokens: 91
                }
            )
            .overclaimed
        );
    }
}
