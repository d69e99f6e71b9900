//! vLLM's logit adjustments of a request, applied to a row's next-token logits before the
//! token is chosen: `min_tokens`, `logit_bias`, then the repetition, frequency and presence
//! penalties — vLLM's sampler order (its "non-argmax-invariant logits processors", then
//! `apply_penalties`), with vLLM's definitions:
//!
//! * `min_tokens`: while fewer tokens than that have been generated, the row's stop tokens
//!   (end-of-sequence unless `ignore_eos`, and `stop_token_ids`) get `-∞`;
//! * `logit_bias`: `logits[t] += bias` (OpenAI's field; biases clamped to `[-100, 100]` as vLLM
//!   clamps them);
//! * `repetition_penalty` `ρ` on every token seen in the prompt or the output: a positive logit
//!   divided by `ρ`, any other multiplied by it;
//! * `frequency_penalty` `f` and `presence_penalty` `p` on the output's tokens:
//!   `logits[t] -= f · count(t)`, then `logits[t] -= p`.

use std::collections::{HashMap, HashSet};

/// What a request asks of its logits (vLLM's `SamplingParams` fields of the same names).
#[derive(Debug, Clone, PartialEq)]
pub struct LogitAdjustments {
    /// Subtracted once from every token the output holds (OpenAI's `presence_penalty`).
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output (OpenAI's `frequency_penalty`).
    pub frequency_penalty: f32,
    /// vLLM's `repetition_penalty` (1: none), over prompt and output tokens.
    pub repetition_penalty: f32,
    /// `(token, bias)` added to the logits (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// Stop tokens are impossible until this many tokens have been generated.
    pub min_tokens: usize,
    /// Tokens that end the output like end-of-sequence does (not sent).
    pub stop_token_ids: Vec<u32>,
}

impl Default for LogitAdjustments {
    fn default() -> Self {
        Self {
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            stop_token_ids: Vec::new(),
        }
    }
}

impl LogitAdjustments {
    /// Whether the logits are used as the model gives them (no copy, no bookkeeping).
    pub fn leaves_logits(&self) -> bool {
        self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.repetition_penalty == 1.0
            && self.logit_bias.is_empty()
            && self.min_tokens == 0
    }

    /// Whether the penalties need the tokens seen so far.
    fn counts_tokens(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }
}

/// One row's token history for the penalties: the prompt's tokens and the output's counts.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    /// Tokens of the prompt (kept only for the repetition penalty).
    prompt: HashSet<u32>,
    /// How often each token occurs in the output.
    output: HashMap<u32, u32>,
    /// Tokens generated so far.
    generated: usize,
}

impl TokenHistory {
    /// The history of a row with `prompt`, for `adjust`.
    pub fn new(prompt: &[u32], adjust: &LogitAdjustments) -> Self {
        let prompt = if adjust.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        Self {
            prompt,
            output: HashMap::new(),
            generated: 0,
        }
    }

    /// Records a generated token.
    pub fn push(&mut self, token: u32, adjust: &LogitAdjustments) {
        self.generated += 1;
        if adjust.counts_tokens() {
            *self.output.entry(token).or_insert(0) += 1;
        }
    }

    /// `logits` adjusted for the next token, in vLLM's order; `stop_ids` are the row's stop
    /// tokens (for `min_tokens`). Token ids beyond `logits` are ignored (the request's ids were
    /// checked against the vocabulary).
    pub fn apply(&self, adjust: &LogitAdjustments, logits: &mut [f32], stop_ids: &[u32]) {
        if self.generated < adjust.min_tokens {
            for &t in stop_ids {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        for &(t, bias) in &adjust.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        let rho = adjust.repetition_penalty;
        if rho != 1.0 {
            let output_only = self.output.keys().filter(|t| !self.prompt.contains(t));
            for &t in self.prompt.iter().chain(output_only) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rho } else { *l * rho };
                }
            }
        }
        for (&t, &count) in &self.output {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= adjust.frequency_penalty * count as f32;
                *l -= adjust.presence_penalty;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(prompt: &[u32], output: &[u32], adjust: &LogitAdjustments) -> TokenHistory {
        let mut h = TokenHistory::new(prompt, adjust);
        for &t in output {
            h.push(t, adjust);
        }
        h
    }

    #[test]
    fn penalties_follow_vllms_definitions() {
        let adjust = LogitAdjustments {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Prompt [0, 1]; output [1, 2, 2].
        let h = history(&[0, 1], &[1, 2, 2], &adjust);
        let mut logits = vec![3.0, -1.0, 4.0, 5.0];
        h.apply(&adjust, &mut logits, &[]);
        // 0: prompt only → 3 / 2 = 1.5.
        // 1: prompt and output once → −1 · 2 = −2, − 0.25·1 − 0.5 = −2.75.
        // 2: output twice → 4 / 2 = 2, − 0.25·2 − 0.5 = 1.
        // 3: unseen → 5.
        assert_eq!(logits, vec![1.5, -2.75, 1.0, 5.0]);
    }

    #[test]
    fn bias_comes_before_the_repetition_penalty_and_min_tokens_blocks_stops() {
        let adjust = LogitAdjustments {
            repetition_penalty: 4.0,
            logit_bias: vec![(1, 2.0), (3, -100.0)],
            min_tokens: 2,
            ..Default::default()
        };
        let mut h = history(&[1], &[], &adjust);
        let mut logits = vec![0.5, -1.0, 0.0, 7.0];
        h.apply(&adjust, &mut logits, &[0]);
        // 0: a stop token before min_tokens; 1: −1 + 2 = 1, in the prompt → 1 / 4.
        assert_eq!(logits, vec![f32::NEG_INFINITY, 0.25, 0.0, -93.0]);
        h.push(2, &adjust);
        h.push(2, &adjust);
        let mut logits = vec![0.5, -1.0, 0.0, 7.0];
        h.apply(&adjust, &mut logits, &[0]);
        // Two tokens generated: the stop token is possible again; 2 is now seen: 0 · 4 = 0.
        assert_eq!(logits, vec![0.5, 0.25, 0.0, -93.0]);
    }

    #[test]
    fn defaults_leave_the_logits_alone() {
        let adjust = LogitAdjustments::default();
        assert!(adjust.leaves_logits());
        let h = history(&[0, 1], &[1], &adjust);
        let mut logits = vec![1.0, 2.0, 3.0];
        h.apply(&adjust, &mut logits, &[1]);
        assert_eq!(logits, vec![1.0, 2.0, 3.0]);
        // Stop tokens alone do not touch the logits either.
        let stops = LogitAdjustments {
            stop_token_ids: vec![2],
            ..Default::default()
        };
        assert!(stops.leaves_logits());
    }
}
