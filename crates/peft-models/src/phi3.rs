//! Phi-3 (`model_type: "phi3"`), field for field as transformers' `Phi3ForCausalLM`:
//!
//! ```text
//! model.embed_tokens                       Embedding [vocab, hidden]
//! model.layers.{i}.input_layernorm         RMSNorm
//! model.layers.{i}.self_attn.qkv_proj      Linear hidden → (heads + 2·kv_heads)·head_dim  (q | k | v)
//! model.layers.{i}.self_attn.o_proj        Linear heads·head_dim → hidden
//! model.layers.{i}.post_attention_layernorm  RMSNorm
//! model.layers.{i}.mlp.gate_up_proj        Linear hidden → 2·intermediate  (gate | up)
//! model.layers.{i}.mlp.down_proj           Linear intermediate → hidden
//! model.norm                               RMSNorm
//! lm_head                                  Linear hidden → vocab (untied)
//! ```
//!
//! The fused projections are single linear layers, so PEFT (and peft-rs) adapt them by the names
//! `qkv_proj` and `gate_up_proj`; PEFT has no default `target_modules` for Phi-3. RoPE rotates the
//! first `head_dim · partial_rotary_factor` columns of each head; `sliding_window`, where set,
//! windows every layer. LongRoPE (`rope_type` `longrope`, or `su` / `yarn`, which transformers
//! maps to it for Phi-3) is refused.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Bool, Device, Int, Tensor};
use serde::Deserialize;

use peft_core::model::{MapEmbedding, MapLinear};
use peft_core::{
    AdaptableEmbedding, AdaptableLinear, CausalLm, KvCache, LayerAdapter, LayerKv, ModelInput,
    ModelSpec, ModuleInfo, ModuleKind, PeftError, Result, TensorStore,
};

use crate::layers::{
    RmsNorm, TiedHead, WeightLoader, attend, check_input, decoder_pass, extend_cache,
    output_logits, output_loss, untied_head,
};
use crate::rope::{RopeTables, Rotary, apply_rope};

/// `config.json` fields of a Phi-3 model that the forward pass uses (transformers' defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct Phi3Config {
    /// `phi3`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width (`gate_up_proj` is twice this).
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads; defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Activation; only `silu` is implemented.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Window of every layer's attention, if any.
    #[serde(default)]
    pub sliding_window: Option<usize>,
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
    /// Whether `lm_head` is the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// RoPE settings, filled in by [`Phi3Config::from_value`].
    #[serde(skip)]
    pub rotary: Option<Rotary>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "silu".into()
}

impl Phi3Config {
    /// Parses and checks a Phi-3 `config.json`; `context` names the file in errors.
    pub fn from_value(value: &serde_json::Value, context: &str) -> Result<Self> {
        let mut config: Self = serde_json::from_value(value.clone())
            .map_err(|e| PeftError::config(context, "config.json", e.to_string()))?;
        let bad = |field: &str, reason: String| Err(PeftError::config(context, field, reason));
        let nq = config.num_attention_heads;
        if nq == 0 || !config.hidden_size.is_multiple_of(nq) {
            return bad(
                "num_attention_heads",
                format!(
                    "{nq} heads do not divide hidden_size {}",
                    config.hidden_size
                ),
            );
        }
        let nkv = config.kv_heads();
        if nkv == 0 || !nq.is_multiple_of(nkv) {
            return bad(
                "num_key_value_heads",
                format!("{nkv} key/value heads do not divide {nq} attention heads"),
            );
        }
        if config.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("`{}` is not supported (only `silu`)", config.hidden_act),
            );
        }
        if config.vocab_size == 0 || config.num_hidden_layers == 0 {
            return bad("vocab_size/num_hidden_layers", "must be positive".into());
        }
        if config.sliding_window == Some(0) {
            return bad("sliding_window", "must be positive".into());
        }
        let scaling = value
            .get("rope_parameters")
            .or_else(|| value.get("rope_scaling"))
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(|t| t.as_str());
        if let Some(kind @ ("longrope" | "su" | "yarn")) = scaling {
            return bad(
                "rope_scaling",
                format!("`{kind}` (LongRoPE for Phi-3) is not supported"),
            );
        }
        config.rotary = Some(Rotary::from_config(value, config.head_dim(), context)?);
        Ok(config)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Sizes and special tokens.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            model_type: self.model_type.clone(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.kv_heads(),
            head_dim: self.head_dim(),
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_ids.clone(),
            pad_token_id: self.pad_token_id,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }
}

/// Attention of one layer.
#[derive(Module, Debug)]
pub struct Phi3Attention<A: LayerAdapter> {
    /// Queries, keys and values in one projection (`q | k | v` along the output).
    pub qkv_proj: AdaptableLinear<A>,
    /// Output projection.
    pub o_proj: AdaptableLinear<A>,
}

/// Gated feed-forward with one fused input projection: `down(up · silu(gate))`.
#[derive(Module, Debug)]
pub struct Phi3Mlp<A: LayerAdapter> {
    /// Gate and up projections in one (`gate | up` along the output).
    pub gate_up_proj: AdaptableLinear<A>,
    /// Down projection.
    pub down_proj: AdaptableLinear<A>,
}

/// One decoder layer (`model.layers.{i}`).
#[derive(Module, Debug)]
pub struct Phi3Layer<A: LayerAdapter> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Phi3Attention<A>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: Phi3Mlp<A>,
}

/// `model`: embeddings, layers, final norm.
#[derive(Module, Debug)]
pub struct Phi3Model<A: LayerAdapter> {
    /// Token embeddings.
    pub embed_tokens: AdaptableEmbedding<A>,
    /// The layers.
    pub layers: Vec<Phi3Layer<A>>,
    /// Final norm.
    pub norm: RmsNorm,
}

/// `Phi3ForCausalLM`.
#[derive(Module, Debug)]
pub struct Phi3<A: LayerAdapter> {
    /// The decoder.
    pub model: Phi3Model<A>,
    /// Output projection; `None` when tied to `embed_tokens`.
    pub lm_head: Option<AdaptableLinear<A>>,
    /// How a tied projection computes (f32, or bf16 from the table's bf16 copy).
    #[module(skip)]
    pub tied_head: TiedHead,
    /// Sizes and special tokens.
    #[module(skip)]
    pub spec: ModelSpec,
    /// RoPE settings (rotated width included).
    #[module(skip)]
    pub rotary: Rotary,
    /// Each layer's sliding window.
    #[module(skip)]
    pub windows: Vec<Option<usize>>,
    /// MLP width.
    #[module(skip)]
    pub intermediate_size: usize,
}

impl<A: LayerAdapter> Phi3<A> {
    /// Loads the weights of `config` from `store`.
    pub fn load(
        config: &Phi3Config,
        store: &TensorStore,
        device: &Device,
        options: &crate::LoadOptions,
    ) -> Result<Self> {
        let w = WeightLoader::new(store, device, options);
        let (h, hd, im) = (
            config.hidden_size,
            config.head_dim(),
            config.intermediate_size,
        );
        let (nq, nkv, eps) = (
            config.num_attention_heads,
            config.kv_heads(),
            config.rms_norm_eps,
        );
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Phi3Layer {
                    input_layernorm: w.rms_norm(&format!("{p}.input_layernorm"), h, eps)?,
                    self_attn: Phi3Attention {
                        qkv_proj: w.adaptable(
                            &format!("{p}.self_attn.qkv_proj"),
                            h,
                            (nq + 2 * nkv) * hd,
                            false,
                        )?,
                        o_proj: w.adaptable(&format!("{p}.self_attn.o_proj"), nq * hd, h, false)?,
                    },
                    post_attention_layernorm: w.rms_norm(
                        &format!("{p}.post_attention_layernorm"),
                        h,
                        eps,
                    )?,
                    mlp: Phi3Mlp {
                        gate_up_proj: w.adaptable(
                            &format!("{p}.mlp.gate_up_proj"),
                            h,
                            2 * im,
                            false,
                        )?,
                        down_proj: w.adaptable(&format!("{p}.mlp.down_proj"), im, h, false)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (lm_head, tied_head) = w.output_head(
            config.tie_word_embeddings,
            "model.embed_tokens",
            h,
            config.vocab_size,
        )?;
        Ok(Self {
            model: Phi3Model {
                embed_tokens: AdaptableEmbedding::plain(w.embedding(
                    "model.embed_tokens",
                    config.vocab_size,
                    h,
                )?),
                layers,
                norm: w.rms_norm("model.norm", h, eps)?,
            },
            lm_head,
            tied_head,
            spec: config.spec(),
            rotary: config
                .rotary
                .clone()
                .unwrap_or_else(|| Rotary::plain(10000.0, hd)),
            windows: vec![config.sliding_window; config.num_hidden_layers],
            intermediate_size: im,
        })
    }
}

impl<A: LayerAdapter> Phi3Layer<A> {
    fn forward(
        &self,
        x: Tensor<3>,
        spec: &ModelSpec,
        rope: &RopeTables,
        allowed: &Tensor<4, Bool>,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let (nq, nkv, hd) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let ln = self.input_layernorm.forward(x.clone());
        let qkv = self.self_attn.qkv_proj.forward(ln);
        let heads = |start: usize, n: usize| {
            qkv.clone()
                .narrow(2, start * hd, n * hd)
                .reshape([b, s, n, hd])
                .swap_dims(1, 2)
        };
        let q = apply_rope(heads(0, nq), rope);
        let k = apply_rope(heads(nq, nkv), rope);
        let v = heads(nq + nkv, nkv);
        let (k, v) = extend_cache(cache, k, v);
        let context = attend(q, k, v, 1.0 / (hd as f64).sqrt(), None, allowed)
            .swap_dims(1, 2)
            .reshape([b, s, nq * hd]);
        let x = x + self.self_attn.o_proj.forward(context);
        let ln = self.post_attention_layernorm.forward(x.clone());
        let gate_up = self.mlp.gate_up_proj.forward(ln);
        let im = gate_up.dims()[2] / 2;
        let (gate, up) = (gate_up.clone().narrow(2, 0, im), gate_up.narrow(2, im, im));
        let gated =
            peft_ops::fused::silu_mul(gate.clone(), up.clone()).unwrap_or_else(|| silu(gate) * up);
        x + self.mlp.down_proj.forward(gated)
    }
}

impl<A: LayerAdapter> CausalLm for Phi3<A> {
    type Adapter = A;
    type WithAdapter<B: LayerAdapter> = Phi3<B>;

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn modules(&self) -> Vec<ModuleInfo> {
        phi3_modules(&self.spec, self.intermediate_size)
    }

    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.model.embed_tokens.forward(ids)
    }

    /// The normed final hidden states `[batch, n_virtual + seq, hidden]`, before `lm_head`.
    fn final_hidden(&self, input: ModelInput, cache: Option<&mut KvCache>) -> Result<Tensor<3>> {
        check_input(&input)?;
        let x = decoder_pass(
            self.embed_tokens(input.input_ids.clone()),
            input,
            cache,
            &self.windows,
            &self.rotary,
            |i, x, rope, allowed, slot| {
                self.model.layers[i].forward(x, &self.spec, rope, allowed, slot)
            },
        );
        Ok(self.model.norm.forward(x))
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        output_logits(
            hidden,
            self.lm_head.as_ref(),
            &self.model.embed_tokens,
            &self.tied_head,
        )
    }

    fn hidden_loss(&self, hidden: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
        output_loss(
            hidden,
            self.lm_head.as_ref(),
            &self.model.embed_tokens,
            &self.tied_head,
            labels,
            None,
        )
    }

    fn map_layers<B: LayerAdapter>(
        self,
        f: &mut MapLinear<'_, A, B>,
        embedding: &mut MapEmbedding<'_, A, B>,
    ) -> Result<Phi3<B>> {
        let layers = self
            .model
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let p = format!("model.layers.{i}");
                Ok(Phi3Layer {
                    input_layernorm: l.input_layernorm,
                    self_attn: Phi3Attention {
                        qkv_proj: f(&format!("{p}.self_attn.qkv_proj"), l.self_attn.qkv_proj)?,
                        o_proj: f(&format!("{p}.self_attn.o_proj"), l.self_attn.o_proj)?,
                    },
                    post_attention_layernorm: l.post_attention_layernorm,
                    mlp: Phi3Mlp {
                        gate_up_proj: f(&format!("{p}.mlp.gate_up_proj"), l.mlp.gate_up_proj)?,
                        down_proj: f(&format!("{p}.mlp.down_proj"), l.mlp.down_proj)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Phi3 {
            model: Phi3Model {
                embed_tokens: embedding("model.embed_tokens", self.model.embed_tokens)?,
                layers,
                norm: self.model.norm,
            },
            lm_head: self.lm_head.map(|l| f("lm_head", l)).transpose()?,
            tied_head: self.tied_head,
            spec: self.spec,
            rotary: self.rotary,
            windows: self.windows,
            intermediate_size: self.intermediate_size,
        })
    }

    fn untie_word_embeddings(mut self) -> Self {
        if self.lm_head.is_none() {
            self.lm_head = Some(untied_head(
                &self.model.embed_tokens.base.weight,
                &self.tied_head,
            ));
            self.spec.tie_word_embeddings = false;
        }
        self
    }

    fn device(&self) -> Device {
        self.model.embed_tokens.base.weight.val().device()
    }
}

/// Every module of a Phi-3 model with these sizes, by HF path.
pub fn phi3_modules(spec: &ModelSpec, intermediate_size: usize) -> Vec<ModuleInfo> {
    let s = spec;
    let (h, hd, im) = (s.hidden_size, s.head_dim, intermediate_size);
    let linear = |path: String, i: usize, o: usize| ModuleInfo {
        path,
        kind: ModuleKind::Linear {
            in_features: i,
            out_features: o,
            bias: false,
        },
        tied: false,
    };
    let norm = |path: String| ModuleInfo {
        path,
        kind: ModuleKind::RmsNorm { dim: h },
        tied: false,
    };
    let mut m = vec![ModuleInfo {
        path: "model.embed_tokens".into(),
        kind: ModuleKind::Embedding {
            num_embeddings: s.vocab_size,
            dim: h,
        },
        tied: false,
    }];
    for i in 0..s.num_layers {
        let p = format!("model.layers.{i}");
        m.push(norm(format!("{p}.input_layernorm")));
        m.push(linear(
            format!("{p}.self_attn.qkv_proj"),
            h,
            (s.num_heads + 2 * s.num_kv_heads) * hd,
        ));
        m.push(linear(format!("{p}.self_attn.o_proj"), s.num_heads * hd, h));
        m.push(norm(format!("{p}.post_attention_layernorm")));
        m.push(linear(format!("{p}.mlp.gate_up_proj"), h, 2 * im));
        m.push(linear(format!("{p}.mlp.down_proj"), im, h));
    }
    m.push(norm("model.norm".into()));
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
    use super::*;

    #[test]
    fn longrope_is_refused_by_name() {
        let err = Phi3Config::from_value(
            &serde_json::json!({"model_type": "phi3", "vocab_size": 8, "hidden_size": 8,
                "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                "rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}}),
            "config.json",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`su` (LongRoPE for Phi-3) is not supported"),
            "{err}"
        );
    }
}
