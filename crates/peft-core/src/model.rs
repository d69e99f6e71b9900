//! What every causal language model offers to adapters and to the training loop.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::adapter::{AdaptableEmbedding, AdaptableLinear, LayerAdapter, NoAdapter};
use crate::error::{PeftError, Result};
use crate::modules::ModuleInfo;

/// The sizes and special tokens of a model, read from its `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// `model_type` as in config.json (`bloom`, `llama`, `qwen2`).
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (equal to `num_heads` without grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens; generation stops at any of them. `config.json` writes one id or
    /// a list (Llama 3); `generation_config.json`, where present, overrides it as in
    /// transformers' `generate`.
    pub eos_token_ids: Vec<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
    /// Whether `lm_head` shares the input embedding matrix.
    pub tie_word_embeddings: bool,
}

impl ModelSpec {
    /// The first end-of-sequence token: the one appended to training responses (the
    /// tokenizer's `eos_token` in transformers is the first id of the config's list).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_ids.first().copied()
    }
}

/// Deserialises a token-id field that `config.json` / `generation_config.json` write as
/// `null`, one id or a list of ids (Llama 3's `eos_token_id`), into a list. For
/// `#[serde(default, deserialize_with = "peft_core::model::token_ids")]`.
pub fn token_ids<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Vec<u32>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
    }
    Ok(
        match <Option<OneOrMany> as serde::Deserialize>::deserialize(deserializer)? {
            None => Vec::new(),
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
        },
    )
}

/// One layer's keys and values: `[batch, kv_heads, len, head_dim]` each.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// Keys, as they enter the attention product (after RoPE for Llama-family models).
    pub key: Tensor<4>,
    /// Values.
    pub value: Tensor<4>,
}

/// Keys and values of earlier positions, one entry per layer, with the attention mask over them.
///
/// Generation fills it step by step; prefix tuning starts from a cache pre-filled with its learned
/// prefix (mask all ones), as `past_key_values` in transformers.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer, `None` until the first forward pass.
    pub layers: Vec<Option<LayerKv>>,
    /// `[batch, past_len]`: 1 for real positions, 0 for padding.
    pub mask: Option<Tensor<2, Int>>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            mask: None,
        }
    }

    /// A cache holding a prefix: `layers[l]` are layer `l`'s prefix keys and values, every prefix
    /// position visible (mask of ones).
    pub fn from_prefix(layers: Vec<LayerKv>) -> Self {
        let mask = layers.first().map(|kv| {
            let [batch, _, len, _] = kv.key.dims();
            Tensor::<2, Int>::ones([batch, len], &kv.key.device())
        });
        Self {
            layers: layers.into_iter().map(Some).collect(),
            mask,
        }
    }

    /// Number of cached positions.
    pub fn past_len(&self) -> usize {
        self.mask.as_ref().map_or(0, |m| m.dims()[1])
    }

    /// Number of batch rows held (0 for an empty cache).
    pub fn batch(&self) -> usize {
        self.mask.as_ref().map_or(0, |m| m.dims()[0])
    }

    /// The cache of batch rows `rows`, in that order (a continuous batch dropping finished
    /// sequences).
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        let batch = self.batch();
        if let Some(&bad) = rows.iter().find(|&&r| r >= batch) {
            return Err(PeftError::InvalidInput(format!(
                "cache row {bad} of a cache of {batch} rows"
            )));
        }
        let Some(mask) = &self.mask else {
            return Ok(self.clone());
        };
        let device = mask.device();
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
            &device,
        );
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|layer| {
                    layer.as_ref().map(|kv| LayerKv {
                        key: kv.key.clone().select(0, index.clone()),
                        value: kv.value.clone().select(0, index.clone()),
                    })
                })
                .collect(),
            mask: Some(mask.clone().select(0, index)),
        })
    }

    /// One cache holding the rows of `caches` in order, each left-padded to the longest with
    /// masked (zero) positions: sequences of different lengths sharing one batch. Every cache
    /// must be filled (one forward pass done) for the same layers.
    pub fn concat_rows(caches: Vec<KvCache>) -> Result<Self> {
        let width = caches.iter().map(KvCache::past_len).max().unwrap_or(0);
        let num_layers = caches.first().map_or(0, |c| c.layers.len());
        let mut masks = Vec::with_capacity(caches.len());
        let mut keys: Vec<Vec<Tensor<4>>> = vec![Vec::new(); num_layers];
        let mut values: Vec<Vec<Tensor<4>>> = vec![Vec::new(); num_layers];
        for cache in caches {
            let (Some(mask), true) = (cache.mask, cache.layers.len() == num_layers) else {
                return Err(PeftError::InvalidInput(
                    "joining caches that are empty or of different layer counts".into(),
                ));
            };
            let [rows, len] = mask.dims();
            let pad = width - len;
            let device = mask.device();
            masks.push(if pad == 0 {
                mask
            } else {
                Tensor::cat(vec![Tensor::<2, Int>::zeros([rows, pad], &device), mask], 1)
            });
            for (l, layer) in cache.layers.into_iter().enumerate() {
                let Some(kv) = layer else {
                    return Err(PeftError::InvalidInput(format!(
                        "joining caches: layer {l} of a cache is empty"
                    )));
                };
                let left_pad = |t: Tensor<4>| {
                    if pad == 0 {
                        return t;
                    }
                    let [b, h, _, d] = t.dims();
                    let zeros = Tensor::<4>::zeros([b, h, pad, d], &t.device()).cast(t.dtype());
                    Tensor::cat(vec![zeros, t], 2)
                };
                keys[l].push(left_pad(kv.key));
                values[l].push(left_pad(kv.value));
            }
        }
        if masks.is_empty() {
            return Ok(Self::new(0));
        }
        Ok(Self {
            layers: keys
                .into_iter()
                .zip(values)
                .map(|(k, v)| {
                    Some(LayerKv {
                        key: Tensor::cat(k, 0),
                        value: Tensor::cat(v, 0),
                    })
                })
                .collect(),
            mask: Some(Tensor::cat(masks, 0)),
        })
    }

    /// Drops the leading positions that every row has masked (padding left behind by sequences
    /// that left the batch), so the cache is as long as its longest row.
    pub fn trim_padding(&mut self) -> Result<()> {
        let Some(mask) = &self.mask else {
            return Ok(());
        };
        let [rows, len] = mask.dims();
        let values = mask
            .clone()
            .into_data()
            .try_to_vec_as::<i64>()
            .map_err(|e| PeftError::InvalidInput(format!("reading the cache mask: {e:?}")))?;
        let first_used = (0..len)
            .find(|&c| (0..rows).any(|r| values[r * len + c] != 0))
            .unwrap_or(len);
        if first_used == 0 {
            return Ok(());
        }
        self.mask = Some(mask.clone().narrow(1, first_used, len - first_used));
        for kv in self.layers.iter_mut().flatten() {
            kv.key = kv.key.clone().narrow(2, first_used, len - first_used);
            kv.value = kv.value.clone().narrow(2, first_used, len - first_used);
        }
        Ok(())
    }
}

/// The inputs of one forward pass.
#[derive(Debug, Clone)]
pub struct ModelInput {
    /// `[batch, seq]` token ids.
    pub input_ids: Tensor<2, Int>,
    /// `[batch, seq]`: 1 for real tokens, 0 for (left) padding.
    pub attention_mask: Tensor<2, Int>,
    /// `[batch, n_virtual, hidden]` embeddings put before the tokens' embeddings (prompt tuning,
    /// P-tuning). Their positions are always attended to, and the logits include them.
    pub virtual_tokens: Option<Tensor<3>>,
    /// `[batch, seq]` rotary positions of the tokens (transformers' `position_ids`); `None`:
    /// `past_len .. past_len + seq` for every row. A server that batches sequences of different
    /// lengths into one padded cache passes each row's own positions, so a row's rotary
    /// embeddings are those it would get alone. Models with ALiBi (BLOOM) take positions from
    /// the attention mask and ignore this.
    pub position_ids: Option<Tensor<2, Int>>,
}

impl ModelInput {
    /// Token ids with a mask of ones.
    pub fn new(input_ids: Tensor<2, Int>) -> Self {
        let attention_mask = input_ids.ones_like();
        Self {
            input_ids,
            attention_mask,
            virtual_tokens: None,
            position_ids: None,
        }
    }

    /// Token ids with their attention mask.
    pub fn with_mask(input_ids: Tensor<2, Int>, attention_mask: Tensor<2, Int>) -> Self {
        Self {
            input_ids,
            attention_mask,
            virtual_tokens: None,
            position_ids: None,
        }
    }
}

/// The callback of [`CausalLm::map_layers`]: a layer's HF path and the layer with adapter `A`
/// in, the layer with adapter `B` out.
pub type MapLinear<'a, A, B> =
    dyn FnMut(&str, AdaptableLinear<A>) -> Result<AdaptableLinear<B>> + 'a;

/// The embedding callback of [`CausalLm::map_layers`].
pub type MapEmbedding<'a, A, B> =
    dyn FnMut(&str, AdaptableEmbedding<A>) -> Result<AdaptableEmbedding<B>> + 'a;

/// A causal language model whose linear layers and input embedding can carry adapters of type
/// `Self::Adapter`.
pub trait CausalLm: Module + burn::module::ModuleDisplay + Sized {
    /// The adapter type every linear layer of this model may hold.
    type Adapter: LayerAdapter;
    /// The same architecture holding adapters of type `B`.
    type WithAdapter<B: LayerAdapter>: CausalLm<Adapter = B>;

    /// Sizes and special tokens.
    fn spec(&self) -> &ModelSpec;

    /// Every module by its Hugging Face path, in the order of the checkpoint.
    fn modules(&self) -> Vec<ModuleInfo>;

    /// The decoder's final hidden states `[batch, n_virtual + seq, hidden]` (after the last
    /// norm, before the output projection) for the input; `cache` (when given) supplies earlier
    /// keys and values and receives this pass' ones. What differs between architectures and
    /// between the wrappers of prompt learning (which add virtual tokens or a key/value prefix
    /// here); [`Self::forward`] and [`Self::forward_loss`] are written once on top of it.
    fn final_hidden(&self, input: ModelInput, cache: Option<&mut KvCache>) -> Result<Tensor<3>>;

    /// The logits `[batch, seq, vocab]` of final hidden states `[batch, seq, hidden]`.
    fn logits(&self, hidden: Tensor<3>) -> Tensor<3>;

    /// The mean next-token cross-entropy of final hidden states against `labels`
    /// (`[batch, seq]`, [`IGNORE_INDEX`](peft_ops::loss::IGNORE_INDEX) skipped; see
    /// [`causal_lm_loss`](peft_ops::loss::causal_lm_loss)), a one-element tensor. The models
    /// compute it without whole `[tokens, vocab]` logits where the output projection is frozen
    /// ([`peft_ops::chunked_loss`]); this default computes the logits.
    fn hidden_loss(&self, hidden: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
        peft_ops::loss::causal_lm_loss(self.logits(hidden), labels)
    }

    /// Logits `[batch, n_virtual + seq, vocab]` for the input; `cache` as in
    /// [`Self::final_hidden`].
    fn forward(&self, input: ModelInput, cache: Option<&mut KvCache>) -> Result<Tensor<3>> {
        Ok(self.logits(self.final_hidden(input, cache)?))
    }

    /// The mean next-token cross-entropy of the input against `labels` ([`Self::hidden_loss`]
    /// of [`Self::final_hidden`]).
    fn forward_loss(
        &self,
        input: ModelInput,
        cache: Option<&mut KvCache>,
        labels: Tensor<2, Int>,
    ) -> Result<Tensor<1>> {
        Ok(self.hidden_loss(self.final_hidden(input, cache)?, labels))
    }

    /// The input embeddings of `ids` (`[batch, seq]` → `[batch, seq, hidden]`), before any
    /// embedding LayerNorm.
    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3>;

    /// Rebuilds the model with each linear layer passed through `linear` and the input
    /// embedding through `embedding`; each receives the Hugging Face path and returns the layer
    /// with a new adapter (or none).
    fn map_layers<B: LayerAdapter>(
        self,
        linear: &mut MapLinear<'_, Self::Adapter, B>,
        embedding: &mut MapEmbedding<'_, Self::Adapter, B>,
    ) -> Result<Self::WithAdapter<B>>;

    /// The device the weights live on.
    fn device(&self) -> Device;

    /// Gives a tied `lm_head` its own (frozen) copy of the embedding matrix, so that the input
    /// embeddings can be trained alone — PEFT's `modules_to_save` on a tied embedding. A no-op for
    /// an untied model.
    fn untie_word_embeddings(self) -> Self;
}

/// A model wrapped by a PEFT method (LoRA, IA3, BitFit, ...): what the training loop and the
/// command line need, whichever method it is.
pub trait AdapterModel: Sized {
    /// The wrapped model.
    type Model: CausalLm;

    /// The model, for forward passes.
    fn model(&self) -> &Self::Model;

    /// Replaces the model (after an optimizer step), keeping the method's bookkeeping.
    fn with_model(self, model: Self::Model) -> Self;

    /// Hugging Face names (see [`crate::params`]) of the parameters that train.
    fn trainable_names(&self) -> Vec<String>;

    /// PEFT's trainable-parameters numbers.
    fn trainable_summary(&self) -> crate::summary::TrainableSummary;

    /// The adapter's config as `adapter_config.json` holds it (`peft_type` included): what a
    /// resumed run compares with its checkpoint's.
    fn config_json(&self) -> Result<serde_json::Value>;

    /// Writes the adapter folder in PEFT's format.
    fn save_pretrained(&self, dir: &std::path::Path) -> Result<()>;

    /// Folds the adapter into the base weights and returns the plain model.
    fn merge_and_unload(self) -> Result<<Self::Model as CausalLm>::WithAdapter<NoAdapter>>;

    /// A term the method adds to every training pass' loss, a one-element tensor in the
    /// autodiff graph (AdaLoRA's orthogonality penalty, which PEFT adds to `outputs.loss`);
    /// `None` for most methods.
    fn regularization(&self) -> Result<Option<Tensor<1>>> {
        Ok(None)
    }

    /// The gradients of an optimizer step the method needs once the step is taken (AdaLoRA's
    /// rank allocator scores `|p · ∂L/∂p|` with the updated `p`): a copy of those in `grads`
    /// (the step's, clipped as the optimizer receives them), or `None` when it needs none.
    fn keep_gradients(&self, _grads: &GradientsParams) -> Option<GradientsParams> {
        None
    }

    /// Called after optimizer step `step` (1-based, the run's count, HF Trainer's
    /// `global_step`) with what [`Self::keep_gradients`] kept: AdaLoRA's
    /// `update_and_allocate`. The identity for most methods.
    fn after_optimizer_step(self, _step: usize, _kept: Option<GradientsParams>) -> Result<Self> {
        Ok(self)
    }
}
