//! Gemma 2 (`model_type: "gemma2"`), field for field as transformers' `Gemma2ForCausalLM`:
//!
//! ```text
//! model.embed_tokens                        Embedding [vocab, hidden], output · √hidden
//! model.layers.{i}.input_layernorm          RMSNorm (1 + w)
//! model.layers.{i}.self_attn.q_proj         Linear hidden → heads·head_dim
//! model.layers.{i}.self_attn.k_proj / v_proj   Linear hidden → kv_heads·head_dim
//! model.layers.{i}.self_attn.o_proj         Linear heads·head_dim → hidden
//! model.layers.{i}.post_attention_layernorm RMSNorm (1 + w), on the attention output
//! model.layers.{i}.pre_feedforward_layernorm   RMSNorm (1 + w)
//! model.layers.{i}.mlp.gate_proj / up_proj  Linear hidden → intermediate
//! model.layers.{i}.mlp.down_proj            Linear intermediate → hidden
//! model.layers.{i}.post_feedforward_layernorm  RMSNorm (1 + w), on the MLP output
//! model.norm                                RMSNorm (1 + w)
//! lm_head                                   tied to embed_tokens (usually)
//! ```
//!
//! Differences from Llama: norms scale by `1 + weight`; each sub-block's output is normed again
//! before the residual add; embeddings are multiplied by `√hidden_size` (inside the embedding, so
//! prompt-learning's virtual tokens are not); the MLP uses `gelu_pytorch_tanh`; scores are scaled
//! by `query_pre_attn_scalar^-½` and soft-capped (`attn_logit_softcapping · tanh(s / cap)`) before
//! the mask; layers alternate sliding-window (even `i`) and full attention unless `layer_types`
//! says otherwise; the logits are soft-capped by `final_logit_softcapping`. RoPE is Llama's.

use burn::module::{Module, Param};
use burn::tensor::{Bool, Device, Int, Tensor};
use serde::Deserialize;

use peft_core::model::{MapEmbedding, MapLinear};
use peft_core::{
    AdaptableEmbedding, AdaptableLinear, CausalLm, KvCache, LayerAdapter, LayerKv, ModelInput,
    ModelSpec, ModuleInfo, ModuleKind, PeftError, Result, TensorStore,
};

use crate::layers::{
    TiedHead, WeightLoader, attend_softcapped, check_input, decoder_pass, extend_cache, gelu_tanh,
    output_logits, output_loss, untied_head,
};
use crate::rope::{RopeTables, Rotary, apply_rope};

/// `config.json` fields of a Gemma 2 model that the forward pass uses (transformers' defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma2Config {
    /// `gemma2`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Head width (transformers' default 256).
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Activation of the MLP; only `gelu_pytorch_tanh` is implemented.
    #[serde(default = "default_act")]
    pub hidden_activation: String,
    /// Scores are scaled by `query_pre_attn_scalar^-½` (not `head_dim^-½`).
    #[serde(default = "default_head_dim_f64")]
    pub query_pre_attn_scalar: f64,
    /// Window of the sliding-attention layers.
    #[serde(default = "default_window")]
    pub sliding_window: Option<usize>,
    /// `full_attention` / `sliding_attention` per layer (default: sliding on even layers).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Cap of the attention scores (`null`: none).
    #[serde(default = "default_attn_cap")]
    pub attn_logit_softcapping: Option<f64>,
    /// Cap of the output logits (`null`: none).
    #[serde(default = "default_final_cap")]
    pub final_logit_softcapping: Option<f64>,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
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
    /// Whether `lm_head` is the embedding matrix (Gemma 2 ties it).
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// RoPE settings, filled in by [`Gemma2Config::from_value`].
    #[serde(skip)]
    pub rotary: Option<Rotary>,
}

fn default_head_dim() -> usize {
    256
}
fn default_head_dim_f64() -> f64 {
    256.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_window() -> Option<usize> {
    Some(4096)
}
fn default_attn_cap() -> Option<f64> {
    Some(50.0)
}
fn default_final_cap() -> Option<f64> {
    Some(30.0)
}
fn yes() -> bool {
    true
}

impl Gemma2Config {
    /// Parses and checks a Gemma 2 `config.json`; `context` names the file in errors.
    pub fn from_value(value: &serde_json::Value, context: &str) -> Result<Self> {
        let mut config: Self = serde_json::from_value(value.clone())
            .map_err(|e| PeftError::config(context, "config.json", e.to_string()))?;
        let bad = |field: &str, reason: String| Err(PeftError::config(context, field, reason));
        let (nq, nkv) = (config.num_attention_heads, config.num_key_value_heads);
        if nq == 0 || nkv == 0 || !nq.is_multiple_of(nkv) {
            return bad(
                "num_key_value_heads",
                format!("{nkv} key/value heads do not divide {nq} attention heads"),
            );
        }
        if config.head_dim == 0 || !config.head_dim.is_multiple_of(2) {
            return bad("head_dim", "RoPE needs a positive, even head_dim".into());
        }
        if config.hidden_activation != "gelu_pytorch_tanh" {
            return bad(
                "hidden_activation",
                format!(
                    "`{}` is not supported (only `gelu_pytorch_tanh`)",
                    config.hidden_activation
                ),
            );
        }
        if config.vocab_size == 0 || config.num_hidden_layers == 0 {
            return bad("vocab_size/num_hidden_layers", "must be positive".into());
        }
        if config.sliding_window == Some(0) {
            return bad("sliding_window", "must be positive".into());
        }
        config.rotary = Some(Rotary::from_config(value, config.head_dim, context)?);
        Ok(config)
    }

    /// Sizes and special tokens.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            model_type: self.model_type.clone(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_ids.clone(),
            pad_token_id: self.pad_token_id,
            tie_word_embeddings: self.tie_word_embeddings,
        }
    }

    /// Each layer's sliding window: `layer_types` where listed, else even layers slide.
    pub fn layer_windows(&self) -> Vec<Option<usize>> {
        (0..self.num_hidden_layers)
            .map(|i| {
                let sliding = match &self.layer_types {
                    Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
                    None => i % 2 == 0,
                };
                self.sliding_window.filter(|_| sliding)
            })
            .collect()
    }
}

/// Gemma's RMSNorm: `x / sqrt(mean(x²) + eps) · (1 + weight)`, in f32.
#[derive(Module, Debug)]
pub struct GemmaRmsNorm {
    /// The offset scale `w` (the norm multiplies by `1 + w`), `[dim]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square.
    #[module(skip)]
    pub eps: f64,
}

impl GemmaRmsNorm {
    /// `[.., dim]` → `[.., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let scale = self.weight.val() + 1.0;
        if let Some(y) = peft_ops::fused::rms_norm(x.clone(), scale.clone(), self.eps) {
            return y;
        }
        let ms = x.clone().square().mean_dim(D - 1);
        x * (ms + self.eps).sqrt().recip() * scale.unsqueeze()
    }
}

/// Attention of one layer.
#[derive(Module, Debug)]
pub struct Gemma2Attention<A: LayerAdapter> {
    /// Query projection.
    pub q_proj: AdaptableLinear<A>,
    /// Key projection.
    pub k_proj: AdaptableLinear<A>,
    /// Value projection.
    pub v_proj: AdaptableLinear<A>,
    /// Output projection.
    pub o_proj: AdaptableLinear<A>,
}

/// GeGLU feed-forward: `down(gelu_tanh(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Gemma2Mlp<A: LayerAdapter> {
    /// Gate projection.
    pub gate_proj: AdaptableLinear<A>,
    /// Up projection.
    pub up_proj: AdaptableLinear<A>,
    /// Down projection.
    pub down_proj: AdaptableLinear<A>,
}

/// One decoder layer (`model.layers.{i}`).
#[derive(Module, Debug)]
pub struct Gemma2Layer<A: LayerAdapter> {
    /// Norm before attention.
    pub input_layernorm: GemmaRmsNorm,
    /// Attention.
    pub self_attn: Gemma2Attention<A>,
    /// Norm of the attention output.
    pub post_attention_layernorm: GemmaRmsNorm,
    /// Norm before the MLP.
    pub pre_feedforward_layernorm: GemmaRmsNorm,
    /// MLP.
    pub mlp: Gemma2Mlp<A>,
    /// Norm of the MLP output.
    pub post_feedforward_layernorm: GemmaRmsNorm,
}

/// `model`: embeddings, layers, final norm.
#[derive(Module, Debug)]
pub struct Gemma2Model<A: LayerAdapter> {
    /// Token embeddings (unscaled table; the model multiplies by √hidden).
    pub embed_tokens: AdaptableEmbedding<A>,
    /// The layers.
    pub layers: Vec<Gemma2Layer<A>>,
    /// Final norm.
    pub norm: GemmaRmsNorm,
}

/// `Gemma2ForCausalLM`.
#[derive(Module, Debug)]
pub struct Gemma2<A: LayerAdapter> {
    /// The decoder.
    pub model: Gemma2Model<A>,
    /// Output projection; `None` when tied to `embed_tokens`.
    pub lm_head: Option<AdaptableLinear<A>>,
    /// How a tied projection computes (f32, or bf16 from the table's bf16 copy).
    #[module(skip)]
    pub tied_head: TiedHead,
    /// Sizes and special tokens.
    #[module(skip)]
    pub spec: ModelSpec,
    /// RoPE settings.
    #[module(skip)]
    pub rotary: Rotary,
    /// Each layer's sliding window.
    #[module(skip)]
    pub windows: Vec<Option<usize>>,
    /// `query_pre_attn_scalar^-½`.
    #[module(skip)]
    pub attn_scale: f64,
    /// Cap of the attention scores.
    #[module(skip)]
    pub attn_softcap: Option<f64>,
    /// Cap of the logits.
    #[module(skip)]
    pub final_softcap: Option<f64>,
    /// Whether q/k/v/o carry biases.
    #[module(skip)]
    pub attention_bias: bool,
    /// MLP width.
    #[module(skip)]
    pub intermediate_size: usize,
}

impl<A: LayerAdapter> Gemma2<A> {
    /// Loads the weights of `config` from `store`.
    pub fn load(
        config: &Gemma2Config,
        store: &TensorStore,
        device: &Device,
        options: &crate::LoadOptions,
    ) -> Result<Self> {
        let w = WeightLoader::new(store, device, options);
        let (h, hd, im) = (
            config.hidden_size,
            config.head_dim,
            config.intermediate_size,
        );
        let (nq, nkv, bias) = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.attention_bias,
        );
        let norm = |path: &str| {
            let n = w.rms_norm(path, h, config.rms_norm_eps)?;
            Ok::<_, PeftError>(GemmaRmsNorm {
                weight: n.weight,
                eps: n.eps,
            })
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let (a, m) = (format!("{p}.self_attn"), format!("{p}.mlp"));
                Ok(Gemma2Layer {
                    input_layernorm: norm(&format!("{p}.input_layernorm"))?,
                    self_attn: Gemma2Attention {
                        q_proj: w.adaptable(&format!("{a}.q_proj"), h, nq * hd, bias)?,
                        k_proj: w.adaptable(&format!("{a}.k_proj"), h, nkv * hd, bias)?,
                        v_proj: w.adaptable(&format!("{a}.v_proj"), h, nkv * hd, bias)?,
                        o_proj: w.adaptable(&format!("{a}.o_proj"), nq * hd, h, bias)?,
                    },
                    post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm"))?,
                    pre_feedforward_layernorm: norm(&format!("{p}.pre_feedforward_layernorm"))?,
                    mlp: Gemma2Mlp {
                        gate_proj: w.adaptable(&format!("{m}.gate_proj"), h, im, false)?,
                        up_proj: w.adaptable(&format!("{m}.up_proj"), h, im, false)?,
                        down_proj: w.adaptable(&format!("{m}.down_proj"), im, h, false)?,
                    },
                    post_feedforward_layernorm: norm(&format!("{p}.post_feedforward_layernorm"))?,
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
            model: Gemma2Model {
                embed_tokens: AdaptableEmbedding::plain(w.embedding(
                    "model.embed_tokens",
                    config.vocab_size,
                    h,
                )?),
                layers,
                norm: norm("model.norm")?,
            },
            lm_head,
            tied_head,
            spec: config.spec(),
            rotary: config
                .rotary
                .clone()
                .unwrap_or_else(|| Rotary::plain(10000.0, hd)),
            windows: config.layer_windows(),
            attn_scale: config.query_pre_attn_scalar.powf(-0.5),
            attn_softcap: config.attn_logit_softcapping,
            final_softcap: config.final_logit_softcapping,
            attention_bias: bias,
            intermediate_size: im,
        })
    }
}

/// `cap · tanh(x / cap)`.
fn softcap<const D: usize>(x: Tensor<D>, cap: Option<f64>) -> Tensor<D> {
    match cap {
        Some(cap) => (x / cap).tanh() * cap,
        None => x,
    }
}

impl<A: LayerAdapter> Gemma2Layer<A> {
    fn forward(
        &self,
        x: Tensor<3>,
        model: &Gemma2<A>,
        rope: &RopeTables,
        allowed: &Tensor<4, Bool>,
        cache: Option<&mut Option<LayerKv>>,
    ) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let spec = &model.spec;
        let (nq, nkv, hd) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let ln = self.input_layernorm.forward(x.clone());
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        let attn = &self.self_attn;
        let q = apply_rope(heads(attn.q_proj.forward(ln.clone()), nq), rope);
        let k = apply_rope(heads(attn.k_proj.forward(ln.clone()), nkv), rope);
        let v = heads(attn.v_proj.forward(ln), nkv);
        let (k, v) = extend_cache(cache, k, v);
        let context = attend_softcapped(q, k, v, model.attn_scale, model.attn_softcap, allowed)
            .swap_dims(1, 2)
            .reshape([b, s, nq * hd]);
        let attended = self
            .post_attention_layernorm
            .forward(attn.o_proj.forward(context));
        let x = x + attended;
        let ln = self.pre_feedforward_layernorm.forward(x.clone());
        let gated =
            gelu_tanh(self.mlp.gate_proj.forward(ln.clone())) * self.mlp.up_proj.forward(ln);
        x + self
            .post_feedforward_layernorm
            .forward(self.mlp.down_proj.forward(gated))
    }
}

impl<A: LayerAdapter> CausalLm for Gemma2<A> {
    type Adapter = A;
    type WithAdapter<B: LayerAdapter> = Gemma2<B>;

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn modules(&self) -> Vec<ModuleInfo> {
        gemma2_modules(&self.spec, self.intermediate_size, self.attention_bias)
    }

    /// The embeddings times `√hidden_size` (transformers' `Gemma2TextScaledWordEmbedding`).
    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let scale = (self.spec.hidden_size as f64).sqrt() as f32;
        self.model.embed_tokens.forward(ids) * scale
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
            |i, x, rope, allowed, slot| self.model.layers[i].forward(x, self, rope, allowed, slot),
        );
        Ok(self.model.norm.forward(x))
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        softcap(
            output_logits(
                hidden,
                self.lm_head.as_ref(),
                &self.model.embed_tokens,
                &self.tied_head,
            ),
            self.final_softcap,
        )
    }

    fn hidden_loss(&self, hidden: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
        output_loss(
            hidden,
            self.lm_head.as_ref(),
            &self.model.embed_tokens,
            &self.tied_head,
            labels,
            self.final_softcap,
        )
    }

    fn map_layers<B: LayerAdapter>(
        self,
        f: &mut MapLinear<'_, A, B>,
        embedding: &mut MapEmbedding<'_, A, B>,
    ) -> Result<Gemma2<B>> {
        let layers = self
            .model
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let p = format!("model.layers.{i}");
                let (a, m) = (l.self_attn, l.mlp);
                Ok(Gemma2Layer {
                    input_layernorm: l.input_layernorm,
                    self_attn: Gemma2Attention {
                        q_proj: f(&format!("{p}.self_attn.q_proj"), a.q_proj)?,
                        k_proj: f(&format!("{p}.self_attn.k_proj"), a.k_proj)?,
                        v_proj: f(&format!("{p}.self_attn.v_proj"), a.v_proj)?,
                        o_proj: f(&format!("{p}.self_attn.o_proj"), a.o_proj)?,
                    },
                    post_attention_layernorm: l.post_attention_layernorm,
                    pre_feedforward_layernorm: l.pre_feedforward_layernorm,
                    mlp: Gemma2Mlp {
                        gate_proj: f(&format!("{p}.mlp.gate_proj"), m.gate_proj)?,
                        up_proj: f(&format!("{p}.mlp.up_proj"), m.up_proj)?,
                        down_proj: f(&format!("{p}.mlp.down_proj"), m.down_proj)?,
                    },
                    post_feedforward_layernorm: l.post_feedforward_layernorm,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Gemma2 {
            model: Gemma2Model {
                embed_tokens: embedding("model.embed_tokens", self.model.embed_tokens)?,
                layers,
                norm: self.model.norm,
            },
            lm_head: self.lm_head.map(|l| f("lm_head", l)).transpose()?,
            tied_head: self.tied_head,
            spec: self.spec,
            rotary: self.rotary,
            windows: self.windows,
            attn_scale: self.attn_scale,
            attn_softcap: self.attn_softcap,
            final_softcap: self.final_softcap,
            attention_bias: self.attention_bias,
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

/// Every module of a Gemma 2 model with these sizes, by HF path.
pub fn gemma2_modules(
    spec: &ModelSpec,
    intermediate_size: usize,
    attention_bias: bool,
) -> Vec<ModuleInfo> {
    let s = spec;
    let (h, hd, im) = (s.hidden_size, s.head_dim, intermediate_size);
    let linear = |path: String, i: usize, o: usize, bias: bool| ModuleInfo {
        path,
        kind: ModuleKind::Linear {
            in_features: i,
            out_features: o,
            bias,
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
        let a = format!("{p}.self_attn");
        m.push(norm(format!("{p}.input_layernorm")));
        m.push(linear(
            format!("{a}.q_proj"),
            h,
            s.num_heads * hd,
            attention_bias,
        ));
        m.push(linear(
            format!("{a}.k_proj"),
            h,
            s.num_kv_heads * hd,
            attention_bias,
        ));
        m.push(linear(
            format!("{a}.v_proj"),
            h,
            s.num_kv_heads * hd,
            attention_bias,
        ));
        m.push(linear(
            format!("{a}.o_proj"),
            s.num_heads * hd,
            h,
            attention_bias,
        ));
        m.push(norm(format!("{p}.post_attention_layernorm")));
        m.push(norm(format!("{p}.pre_feedforward_layernorm")));
        m.push(linear(format!("{p}.mlp.gate_proj"), h, im, false));
        m.push(linear(format!("{p}.mlp.up_proj"), h, im, false));
        m.push(linear(format!("{p}.mlp.down_proj"), im, h, false));
        m.push(norm(format!("{p}.post_feedforward_layernorm")));
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
    fn layers_alternate_sliding_and_full_attention_by_default() {
        let config = Gemma2Config::from_value(
            &serde_json::json!({"model_type": "gemma2", "vocab_size": 8, "hidden_size": 8,
                "intermediate_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 4, "sliding_window": 5}),
            "config.json",
        )
        .unwrap();
        assert_eq!(config.layer_windows(), vec![Some(5), None, Some(5)]);
        assert_eq!(config.attn_logit_softcapping, Some(50.0));
        assert_eq!(config.final_logit_softcapping, Some(30.0));
        assert!(config.tie_word_embeddings);
        let uncapped = Gemma2Config::from_value(
            &serde_json::json!({"model_type": "gemma2", "vocab_size": 8, "hidden_size": 8,
                "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 4, "final_logit_softcapping": null,
                "hidden_activation": "gelu"}),
            "config.json",
        )
        .unwrap_err()
        .to_string();
        assert!(uncapped.contains("`gelu` is not supported"), "{uncapped}");
    }
}
