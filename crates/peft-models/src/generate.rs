//! Text generation with a KV cache: greedy, or sampled with temperature and nucleus (top-p).

use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use peft_core::{CausalLm, KvCache, ModelInput, PeftError, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// The most likely token (ties go to the lowest id, as `argmax` in PyTorch).
    Greedy,
    /// A token drawn from the temperature-scaled distribution, restricted to the smallest set of
    /// tokens whose probability reaches `top_p`.
    Sample {
        /// Divides the logits; must be positive.
        temperature: f32,
        /// Nucleus mass in `(0, 1]`.
        top_p: f32,
        /// Seed of the random generator.
        seed: u64,
    },
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Upper bound on generated tokens per sequence.
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub decoding: Decoding,
    /// A sequence stops after producing any of these tokens (it is included in the output).
    pub eos_token_ids: Vec<u32>,
    /// Fills the left padding of shorter prompts.
    pub pad_token_id: u32,
}

impl GenerateOptions {
    /// Greedy decoding that stops at the model's EOS token.
    pub fn greedy(max_new_tokens: usize, spec: &peft_core::ModelSpec) -> Self {
        Self {
            max_new_tokens,
            decoding: Decoding::Greedy,
            eos_token_ids: spec.eos_token_ids.clone(),
            pad_token_id: spec.pad_token_id.unwrap_or(0),
        }
    }
}

/// Generates continuations of `prompts` (a left-padded batch); returns the new ids of each
/// prompt. `on_token(row, id)` sees each token as it is chosen, for streaming.
pub fn generate<M: CausalLm>(
    model: &M,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(PeftError::InvalidInput(
            "every prompt needs at least one token".into(),
        ));
    }
    if let Decoding::Sample {
        temperature, top_p, ..
    } = options.decoding
        && (temperature.is_nan()
            || temperature <= 0.0
            || top_p.is_nan()
            || top_p <= 0.0
            || top_p > 1.0)
    {
        return Err(PeftError::InvalidInput(format!(
            "temperature must be > 0 and top_p in (0, 1], got {temperature} and {top_p}"
        )));
    }
    let vocab = model.spec().vocab_size;
    if let Some(bad) = prompts.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(PeftError::InvalidInput(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let device = model.device();
    let batch = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch * width);
    let mut mask = Vec::with_capacity(batch * width);
    for p in prompts {
        let pad = width - p.len();
        ids.extend(std::iter::repeat_n(options.pad_token_id as i64, pad));
        ids.extend(p.iter().map(|&t| t as i64));
        mask.extend(std::iter::repeat_n(0i64, pad));
        mask.extend(std::iter::repeat_n(1i64, p.len()));
    }
    let mut input = ModelInput::with_mask(
        Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, width]), &device),
        Tensor::<2, Int>::from_data(TensorData::new(mask, [batch, width]), &device),
    );
    let mut cache = KvCache::new(model.spec().num_layers);
    let mut rng = match options.decoding {
        Decoding::Sample { seed, .. } => StdRng::seed_from_u64(seed),
        Decoding::Greedy => StdRng::seed_from_u64(0),
    };
    let mut out = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    for _ in 0..options.max_new_tokens {
        let logits = model.forward(input, Some(&mut cache))?;
        let [_, seq, _] = logits.dims();
        let last: Vec<f32> = logits
            .slice_dim(1, seq - 1..seq)
            .reshape([batch, vocab])
            .into_data()
            .try_to_vec_as::<f32>()
            .map_err(|e| PeftError::InvalidInput(format!("reading logits: {e:?}")))?;
        let mut next = Vec::with_capacity(batch);
        for (row, row_logits) in last.chunks(vocab).enumerate() {
            let token = if done[row] {
                options.pad_token_id
            } else {
                let t = choose(row_logits, options.decoding, &mut rng);
                out[row].push(t);
                on_token(row, t);
                if options.eos_token_ids.contains(&t) {
                    done[row] = true;
                }
                t
            };
            next.push(token as i64);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = ModelInput::with_mask(
            Tensor::<2, Int>::from_data(TensorData::new(next, [batch, 1]), &device),
            Tensor::<2, Int>::ones([batch, 1], &device),
        );
    }
    Ok(out)
}

/// The next token from one row of logits `[vocab]`, as `decoding` asks (`rng` draws the sampled
/// ones; greedy decoding does not touch it).
pub fn choose(logits: &[f32], decoding: Decoding, rng: &mut StdRng) -> u32 {
    match decoding {
        Decoding::Greedy => argmax(logits),
        Decoding::Sample {
            temperature, top_p, ..
        } => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut probs: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
                .collect();
            let total: f32 = probs.iter().map(|p| p.1).sum();
            probs.iter_mut().for_each(|p| p.1 /= total);
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut kept = 0;
            let mut mass = 0.0;
            for p in &probs {
                kept += 1;
                mass += p.1;
                if mass >= top_p {
                    break;
                }
            }
            let nucleus = &probs[..kept];
            let mut draw = rng.random::<f32>() * mass;
            for p in nucleus {
                if draw < p.1 {
                    return p.0;
                }
                draw -= p.1;
            }
            nucleus[kept - 1].0
        }
    }
}

/// Index of the largest value, the first one on ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_prefers_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 0.5, 0.5, -1.0]), 1);
    }

    #[test]
    fn tiny_top_p_is_greedy_and_sampling_is_seeded() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let mut rng = StdRng::seed_from_u64(7);
        let d = Decoding::Sample {
            temperature: 1.0,
            top_p: 1e-6,
            seed: 7,
        };
        for _ in 0..20 {
            assert_eq!(choose(&logits, d, &mut rng), 1);
        }
        let wide = Decoding::Sample {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
        };
        let a: Vec<u32> = {
            let mut r = StdRng::seed_from_u64(3);
            (0..50).map(|_| choose(&logits, wide, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = StdRng::seed_from_u64(3);
            (0..50).map(|_| choose(&logits, wide, &mut r)).collect()
        };
        assert_eq!(a, b);
        // With the full distribution, more than one token shows up.
        assert!(a.iter().any(|&t| t != a[0]));
    }
}
