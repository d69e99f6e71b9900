//! BLOOM (`model_type: "bloom"`), field for field as transformers' `BloomForCausalLM`.
//!
//! ```text
//! transformer.word_embeddings            Embedding [vocab, hidden]
//! transformer.word_embeddings_layernorm  LayerNorm
//! transformer.h.{i}.input_layernorm      LayerNorm
//! transformer.h.{i}.self_attention.query_key_value   Linear hidden → 3·hidden (q, k, v interleaved per head)
//! transformer.h.{i}.self_attention.dense             Linear hidden → hidden
//! transformer.h.{i}.post_attention_layernorm         LayerNorm
//! transformer.h.{i}.mlp.dense_h_to_4h    Linear hidden → 4·hidden
//! transformer.h.{i}.mlp.dense_4h_to_h    Linear 4·hidden → hidden
//! transformer.ln_f                       LayerNorm
//! lm_head                                tied to word_embeddings
//! ```
//!
//! Positions enter only through ALiBi: a per-head linear bias over key positions, where a key's
//! position is `cumsum(mask) - 1` over the full (past + current) attention mask, so left padding
//! does not move the real tokens.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Deserialize;

use peft_core::model::{MapEmbedding, MapLinear};
use peft_core::{
    AdaptableEmbedding, AdaptableLinear, CausalLm, KvCache, LayerAdapter, ModelInput, ModelSpec,
    ModuleInfo, ModuleKind, PeftError, Result, TensorStore,
};

use crate::layers::{
    LayerNorm, TiedHead, WeightLoader, attend, attend_packed, attention_allowed, check_input,
    extend_cache, full_mask, gelu_tanh, output_logits, output_loss, split_qkv,
};

/// BLOOM's `config.json` fields that the forward pass uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BloomConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width (`n_embed` in older configs).
    #[serde(alias = "n_embed")]
    pub hidden_size: usize,
    /// Number of blocks.
    #[serde(alias = "num_hidden_layers")]
    pub n_layer: usize,
    /// Attention heads.
    #[serde(alias = "num_attention_heads")]
    pub n_head: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    /// Residual taken after the LayerNorm instead of before it.
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (one id or a list in the file).
    #[serde(
        default,
        rename = "eos_token_id",
        deserialize_with = "peft_core::model::token_ids"
    )]
    pub eos_token_ids: Vec<u32>,
    /// Padding token.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// BLOOM ties `lm_head` to the input embeddings unless told otherwise.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

fn default_ln_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

impl BloomConfig {
    /// Checks sizes that the forward pass relies on.
    pub fn validate(&self, context: &str) -> Result<()> {
        if self.n_head == 0 || !self.hidden_size.is_multiple_of(self.n_head) {
            return Err(PeftError::config(
                context,
                "n_head",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.n_head, self.hidden_size
                ),
            ));
        }
        if self.vocab_size == 0 || self.n_layer == 0 {
            return Err(PeftError::config(
                context,
                "vocab_size/n_layer",
                "must be positive",
            ));
        }
        Ok(())
    }

    /// Sizes and special tokens.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            model_type: "bloom".into(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.n_layer,
            num_heads: self.n_head,
            num_kv_heads: self.n_head,
            head_dim: self.hidden_size / self.n_head,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_ids.clone(),
            pad_token_id: self.pad_token_id,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }
}

/// ALiBi slopes for `n_heads` heads (transformers' `build_alibi_tensor`).
pub fn alibi_slopes(n_heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - n_heads.leading_zeros());
    let base = 2f32.powf(-(2f32.powf(-((closest as f32).log2() - 3.0))));
    let mut slopes: Vec<f32> = (1..=closest).map(|p| base.powi(p as i32)).collect();
    if closest != n_heads {
        let extra_base = 2f32.powf(-(2f32.powf(-((2.0 * closest as f32).log2() - 3.0))));
        let remaining = closest.min(n_heads - closest);
        slopes.extend((0..remaining).map(|i| extra_base.powi((1 + 2 * i) as i32)));
    }
    slopes
}

/// Self-attention of one block.
#[derive(Module, Debug)]
pub struct BloomAttention<A: LayerAdapter> {
    /// Fused q/k/v projection; output viewed as `[.., heads, 3, head_dim]`.
    pub query_key_value: AdaptableLinear<A>,
    /// Output projection.
    pub dense: AdaptableLinear<A>,
}

/// Feed-forward of one block.
#[derive(Module, Debug)]
pub struct BloomMlp<A: LayerAdapter> {
    /// Up projection.
    pub dense_h_to_4h: AdaptableLinear<A>,
    /// Down projection.
    pub dense_4h_to_h: AdaptableLinear<A>,
}

/// One transformer block (`transformer.h.{i}`).
#[derive(Module, Debug)]
pub struct BloomBlock<A: LayerAdapter> {
    /// Norm before attention.
    pub input_layernorm: LayerNorm,
    /// Attention.
    pub self_attention: BloomAttention<A>,
    /// Norm before the MLP.
    pub post_attention_layernorm: LayerNorm,
    /// MLP.
    pub mlp: BloomMlp<A>,
}

/// `transformer`: embeddings and blocks.
#[derive(Module, Debug)]
pub struct BloomTransformer<A: LayerAdapter> {
    /// Token embeddings; its base table is also the (tied) output projection.
    pub word_embeddings: AdaptableEmbedding<A>,
    /// Norm applied right after the embedding lookup (to virtual tokens too).
    pub word_embeddings_layernorm: LayerNorm,
    /// The blocks.
    pub h: Vec<BloomBlock<A>>,
    /// Final norm.
    pub ln_f: LayerNorm,
}

/// `BloomForCausalLM`.
#[derive(Module, Debug)]
pub struct Bloom<A: LayerAdapter> {
    /// The transformer.
    pub transformer: BloomTransformer<A>,
    /// An untied `lm_head` (only when `tie_word_embeddings` is false).
    pub lm_head: Option<AdaptableLinear<A>>,
    /// How a tied projection computes (f32, or bf16 from the table's bf16 copy).
    #[module(skip)]
    pub tied_head: TiedHead,
    /// Sizes and special tokens.
    #[module(skip)]
    pub spec: ModelSpec,
    /// Residual after the LayerNorm (config flag).
    #[module(skip)]
    pub residual_post_layernorm: bool,
    /// One ALiBi slope per head.
    #[module(skip)]
    pub slopes: Vec<f32>,
}

impl<A: LayerAdapter> Bloom<A> {
    /// Loads the weights of `config` from `store` as `options` ask (4-bit linear layers, bf16
    /// compute; see [`WeightLoader`]).
    pub fn load(
        config: &BloomConfig,
        store: &TensorStore,
        device: &Device,
        options: &crate::LoadOptions,
    ) -> Result<Self> {
        let w = WeightLoader::new(store, device, options);
        let h = config.hidden_size;
        let eps = config.layer_norm_epsilon;
        // Checkpoints saved by BloomForCausalLM prefix everything with `transformer.`; those of a
        // bare BloomModel do not.
        let root = if store.contains("transformer.word_embeddings.weight") {
            "transformer."
        } else {
            ""
        };
        let blocks = (0..config.n_layer)
            .map(|i| {
                let p = format!("{root}h.{i}");
                Ok(BloomBlock {
                    input_layernorm: w.layer_norm(&format!("{p}.input_layernorm"), h, eps)?,
                    self_attention: BloomAttention {
                        query_key_value: w.adaptable(
                            &format!("{p}.self_attention.query_key_value"),
                            h,
                            3 * h,
                            true,
                        )?,
                        dense: w.adaptable(&format!("{p}.self_attention.dense"), h, h, true)?,
                    },
                    post_attention_layernorm: w.layer_norm(
                        &format!("{p}.post_attention_layernorm"),
                        h,
                        eps,
                    )?,
                    mlp: BloomMlp {
                        dense_h_to_4h: w.adaptable(
                            &format!("{p}.mlp.dense_h_to_4h"),
                            h,
                            4 * h,
                            true,
                        )?,
                        dense_4h_to_h: w.adaptable(
                            &format!("{p}.mlp.dense_4h_to_h"),
                            4 * h,
                            h,
                            true,
                        )?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (lm_head, tied_head) = w.output_head(
            config.tie_word_embeddings,
            &format!("{root}word_embeddings"),
            h,
            config.vocab_size,
        )?;
        Ok(Self {
            transformer: BloomTransformer {
                word_embeddings: AdaptableEmbedding::plain(w.embedding(
                    &format!("{root}word_embeddings"),
                    config.vocab_size,
                    h,
                )?),
                word_embeddings_layernorm: w.layer_norm(
                    &format!("{root}word_embeddings_layernorm"),
                    h,
                    eps,
                )?,
                h: blocks,
                ln_f: w.layer_norm(&format!("{root}ln_f"), h, eps)?,
            },
            lm_head,
            tied_head,
            spec: config.spec(),
            residual_post_layernorm: config.apply_residual_connection_post_layernorm,
            slopes: alibi_slopes(config.n_head),
        })
    }

    /// ALiBi bias `[batch, heads, 1, kv_len]` from the full attention mask.
    fn alibi(&self, full_mask: &Tensor<2, Int>) -> Tensor<4> {
        let [batch, kv_len] = full_mask.dims();
        let device = full_mask.device();
        let heads = self.slopes.len();
        let positions = ((full_mask.clone().cumsum(1) - 1) * full_mask.clone())
            .float()
            .reshape([batch, 1, 1, kv_len]);
        let slopes = Tensor::<1>::from_data(TensorData::new(self.slopes.clone(), [heads]), &device)
            .reshape([1, heads, 1, 1]);
        positions * slopes
    }
}

impl<A: LayerAdapter> BloomBlock<A> {
    fn forward(
        &self,
        x: Tensor<3>,
        spec: &ModelSpec,
        residual_post_layernorm: bool,
        alibi: &Tensor<4>,
        allowed: &Tensor<4, burn::tensor::Bool>,
        cache: Option<&mut Option<peft_core::LayerKv>>,
    ) -> Tensor<3> {
        let [b, s, hidden] = x.dims();
        let (heads, hd) = (spec.num_heads, spec.head_dim);

        let ln = self.input_layernorm.forward(x.clone());
        let residual = if residual_post_layernorm {
            ln.clone()
        } else {
            x
        };
        let qkv = self
            .self_attention
            .query_key_value
            .forward(ln)
            .reshape([b, s, heads, 3, hd]);
        let scale = 1.0 / (hd as f64).sqrt();
        let context = match cache {
            // Training and full forwards: the three parts read in place.
            None => attend_packed(qkv, scale, Some(alibi.clone()), allowed),
            Some(slot) => {
                let [q, k, v] = split_qkv(&qkv);
                let (k, v) = extend_cache(Some(slot), k, v);
                attend(q, k, v, scale, Some(alibi.clone()), allowed)
            }
        };
        let context = context.swap_dims(1, 2).reshape([b, s, hidden]);
        let attn_out = self.self_attention.dense.forward(context) + residual;

        let ln = self.post_attention_layernorm.forward(attn_out.clone());
        let residual = if residual_post_layernorm {
            ln.clone()
        } else {
            attn_out
        };
        let mlp = self
            .mlp
            .dense_4h_to_h
            .forward(gelu_tanh(self.mlp.dense_h_to_4h.forward(ln)));
        mlp + residual
    }
}

impl<A: LayerAdapter> CausalLm for Bloom<A> {
    type Adapter = A;
    type WithAdapter<B: LayerAdapter> = Bloom<B>;

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn modules(&self) -> Vec<ModuleInfo> {
        bloom_modules(&self.spec)
    }

    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.transformer.word_embeddings.forward(ids)
    }

    /// The final hidden states after `ln_f`, `[batch, n_virtual + seq, hidden]`.
    fn final_hidden(
        &self,
        input: ModelInput,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>> {
        let (_, _) = check_input(&input)?;
        let mut x = self.embed_tokens(input.input_ids);
        let n_virtual = match input.virtual_tokens {
            Some(v) => {
                let n = v.dims()[1];
                x = Tensor::cat(vec![v, x], 1);
                n
            }
            None => 0,
        };
        let mut x = self.transformer.word_embeddings_layernorm.forward(x);
        let q_len = x.dims()[1];
        let mask = full_mask(
            cache.as_ref().and_then(|c| c.mask.as_ref()),
            n_virtual,
            &input.attention_mask,
        );
        let alibi = self.alibi(&mask);
        let allowed = attention_allowed(&mask, q_len);
        if let Some(c) = cache.as_deref_mut()
            && c.layers.len() != self.transformer.h.len()
        {
            c.layers.resize(self.transformer.h.len(), None);
        }
        for (i, block) in self.transformer.h.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(
                x,
                &self.spec,
                self.residual_post_layernorm,
                &alibi,
                &allowed,
                slot,
            );
        }
        if let Some(c) = cache {
            c.mask = Some(mask);
        }
        Ok(self.transformer.ln_f.forward(x))
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        output_logits(
            hidden,
            self.lm_head.as_ref(),
            &self.transformer.word_embeddings,
            &self.tied_head,
        )
    }

    fn hidden_loss(&self, hidden: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
        output_loss(
            hidden,
            self.lm_head.as_ref(),
            &self.transformer.word_embeddings,
            &self.tied_head,
            labels,
            None,
        )
    }

    fn map_layers<B: LayerAdapter>(
        self,
        f: &mut MapLinear<'_, A, B>,
        embedding: &mut MapEmbedding<'_, A, B>,
    ) -> Result<Bloom<B>> {
        let t = self.transformer;
        let h = t
            .h
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let p = format!("transformer.h.{i}");
                Ok(BloomBlock {
                    input_layernorm: b.input_layernorm,
                    self_attention: BloomAttention {
                        query_key_value: f(
                            &format!("{p}.self_attention.query_key_value"),
                            b.self_attention.query_key_value,
                        )?,
                        dense: f(&format!("{p}.self_attention.dense"), b.self_attention.dense)?,
                    },
                    post_attention_layernorm: b.post_attention_layernorm,
                    mlp: BloomMlp {
                        dense_h_to_4h: f(&format!("{p}.mlp.dense_h_to_4h"), b.mlp.dense_h_to_4h)?,
                        dense_4h_to_h: f(&format!("{p}.mlp.dense_4h_to_h"), b.mlp.dense_4h_to_h)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Bloom {
            transformer: BloomTransformer {
                word_embeddings: embedding("transformer.word_embeddings", t.word_embeddings)?,
                word_embeddings_layernorm: t.word_embeddings_layernorm,
                h,
                ln_f: t.ln_f,
            },
            lm_head: self.lm_head.map(|l| f("lm_head", l)).transpose()?,
            tied_head: self.tied_head,
            spec: self.spec,
            residual_post_layernorm: self.residual_post_layernorm,
            slopes: self.slopes,
        })
    }

    fn untie_word_embeddings(mut self) -> Self {
        if self.lm_head.is_none() {
            let table = &self.transformer.word_embeddings.base.weight;
            self.lm_head = Some(crate::layers::untied_head(table, &self.tied_head));
            self.spec.tie_word_embeddings = false;
        }
        self
    }

    fn device(&self) -> Device {
        self.transformer.word_embeddings.base.weight.val().device()
    }
}

/// Every module of a BLOOM model with these sizes, by HF path (`lm_head` marked tied when
/// `spec.tie_word_embeddings`).
pub fn bloom_modules(spec: &ModelSpec) -> Vec<ModuleInfo> {
    let s = spec;
    let h = s.hidden_size;
    let linear = |path: String, i: usize, o: usize| ModuleInfo {
        path,
        kind: ModuleKind::Linear {
            in_features: i,
            out_features: o,
            bias: true,
        },
        tied: false,
    };
    let ln = |path: String| ModuleInfo {
        path,
        kind: ModuleKind::LayerNorm { dim: h },
        tied: false,
    };
    let mut m = vec![
        ModuleInfo {
            path: "transformer.word_embeddings".into(),
            kind: ModuleKind::Embedding {
                num_embeddings: s.vocab_size,
                dim: h,
            },
            tied: false,
        },
        ln("transformer.word_embeddings_layernorm".into()),
    ];
    for i in 0..s.num_layers {
        let p = format!("transformer.h.{i}");
        m.push(ln(format!("{p}.input_layernorm")));
        m.push(linear(
            format!("{p}.self_attention.query_key_value"),
            h,
            3 * h,
        ));
        m.push(linear(format!("{p}.self_attention.dense"), h, h));
        m.push(ln(format!("{p}.post_attention_layernorm")));
        m.push(linear(format!("{p}.mlp.dense_h_to_4h"), h, 4 * h));
        m.push(linear(format!("{p}.mlp.dense_4h_to_h"), 4 * h, h));
    }
    m.push(ln("transformer.ln_f".into()));
    m.push(ModuleInfo {
        path: "lm_head".into(),
        kind: ModuleKind::Linear {
            in_features: h,
            out_features: s.vocab_size,
            bias: false,
        },
        tied: s.tie_word_embeddings,
    });
    m
}

#[cfg(test)]
mod tests {
    use super::alibi_slopes;

    #[test]
    fn alibi_slopes_match_transformers() {
        // transformers' build_alibi_tensor: 4 heads → 2^-2, 2^-4, 2^-6, 2^-8.
        assert_eq!(alibi_slopes(4), vec![0.25, 0.0625, 0.015625, 0.00390625]);
        // 6 heads: 4 of base 2^-2, then 2 of base 2^-1 at odd powers.
        let s = alibi_slopes(6);
        assert_eq!(s.len(), 6);
        assert_eq!(&s[4..], &[0.5, 0.125]);
    }
}
