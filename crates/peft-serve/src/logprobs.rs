//! Log-probabilities of tokens (OpenAI's `logprobs`, vLLM's defaults): the log-softmax of the
//! model's raw logits at f32 — before penalties, biases and temperature, as vLLM's default
//! `logprobs_mode` (`raw_logprobs`) — of the chosen token and of the `k` most likely, and
//! their JSON in OpenAI's two response shapes.
//!
//! A token's text is the token decoded alone (a token holding part of a character shows
//! U+FFFD, and chat's `bytes` are that text's UTF-8, as vLLM's).

use peft_models::Tokenizer;
use serde_json::{Map, Value, json};

/// One token's log-probability and the `k` most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token (chosen by the sampler, or the prompt's).
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (ties: lower id
    /// first); as many as asked.
    pub top: Vec<(u32, f32)>,
}

/// The log-normaliser `ln Σ exp(x)` of `logits` as `(max, ln Σ exp(x - max))`, the sum in f64
/// (a vocabulary of 150,000 terms would lose digits in f32). Kept apart so that a
/// log-probability is `(x - max) - ln Σ`: folding `max` in first would round it to f32 at the
/// logits' scale (a step of 6e-5 near 1,000).
fn log_normaliser(logits: &[f32]) -> (f32, f64) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return (max, 0.0);
    }
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    (max, sum.ln())
}

/// `token`'s log-probability under `logits` (`[vocab]`), and the `top` most likely tokens.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let (max, ln_sum) = log_normaliser(logits);
    let logprob = |x: f32| (f64::from(x - max) - ln_sum) as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        // One pass keeping the `top` largest, sorted (most likely first, lower id on ties).
        for (id, &x) in logits.iter().enumerate() {
            if best.len() == top && x <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, y)| y >= x);
            best.insert(at, (id as u32, x));
            best.truncate(top);
        }
    }
    TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&x| logprob(x)),
        top: best.into_iter().map(|(id, x)| (id, logprob(x))).collect(),
    }
}

/// The text of token `id` alone.
fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id]).unwrap_or_default()
}

/// OpenAI's completions `logprobs` object (`tokens`, `token_logprobs`, `top_logprobs`,
/// `text_offset`) for `entries`; `None` is a token without a log-probability (a prompt's first,
/// under `echo`), given as `null`s. Each `top_logprobs` dictionary holds the `k` most likely
/// tokens and the chosen one (so up to `k + 1`, as vLLM's). Text offsets count characters from
/// `offset`, which is advanced past these tokens.
pub fn completion_json(
    tokenizer: &Tokenizer,
    entries: &[(u32, Option<TokenLogprob>)],
    offset: &mut usize,
) -> Value {
    let (mut tokens, mut values, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (id, entry) in entries {
        let text = token_text(tokenizer, *id);
        offsets.push(*offset);
        *offset += text.chars().count();
        tokens.push(text);
        match entry {
            None => {
                values.push(Value::Null);
                tops.push(Value::Null);
            }
            Some(lp) => {
                values.push(json!(lp.logprob));
                let mut top = Map::new();
                for &(t, v) in lp.top.iter().chain([(lp.token, lp.logprob)].iter()) {
                    top.entry(token_text(tokenizer, t)).or_insert(json!(v));
                }
                tops.push(Value::Object(top));
            }
        }
    }
    json!({"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
           "text_offset": offsets})
}

/// OpenAI's chat `logprobs` object: `{"content": [{"token", "logprob", "bytes",
/// "top_logprobs": [{"token", "logprob", "bytes"}, …]}, …]}`, `top_logprobs` the `k` most
/// likely.
pub fn chat_json(tokenizer: &Tokenizer, entries: &[TokenLogprob]) -> Value {
    let item = |id: u32, logprob: f32| {
        let text = token_text(tokenizer, id);
        let bytes: Vec<u8> = text.as_bytes().to_vec();
        json!({"token": text, "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Value> = entries
        .iter()
        .map(|lp| {
            let mut entry = item(lp.token, lp.logprob);
            entry["top_logprobs"] = lp.top.iter().map(|&(t, v)| item(t, v)).collect();
            entry
        })
        .collect();
    json!({"content": content})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_top_k_by_hand() {
        // ln(e^2 + e^1 + e^1 + e^0) = 2 + ln(1 + 2/e + 1/e²).
        let logits = [1.0f32, 2.0, 0.0, 1.0];
        let norm = 2.0 + (1.0 + 2.0 / std::f32::consts::E + (-2.0f32).exp()).ln();
        let lp = token_logprob(&logits, 2, 3);
        assert!((lp.logprob - (0.0 - norm)).abs() < 1e-6);
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            [1, 0, 3],
            "most likely first; the tie of 0 and 3 in id order"
        );
        assert!((lp.top[0].1 - (2.0 - norm)).abs() < 1e-6);
        let total: f32 = logits.iter().map(|x| (x - norm).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(token_logprob(&logits, 2, 0).top.is_empty());
        // Huge logits do not overflow.
        let lp = token_logprob(&[1000.0, 1000.0], 0, 1);
        assert!((lp.logprob - (-std::f32::consts::LN_2)).abs() < 1e-6);
    }
}
