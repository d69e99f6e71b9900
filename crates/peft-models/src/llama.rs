//! Llama (`model_type: "llama"`), field for field as transformers' `LlamaForCausalLM`; Qwen2
//! is the same network with q/k/v biases (see [`crate::qwen2`]).
//!
//! ```text
//! model.embed_tokens                     Embedding [vocab, hidden]
//! model.layers.{i}.input_layernorm       RMSNorm
//! model.layers.{i}.self_attn.q_proj      Linear hidden → heads·head_dim
//! model.layers.{i}.self_attn.k_proj      Linear hidden → kv_heads·head_dim   (GQA: kv_heads ≤ heads)
//! model.layers.{i}.self_attn.v_proj      Linear hidden → kv_heads·head_dim
//! model.layers.{i}.self_attn.o_proj      Linear heads·head_dim → hidden
//! model.layers.{i}.post_attention_layernorm  RMSNorm
//! model.layers.{i}.mlp.gate_proj / up_proj   Linear hidden → intermediate
//! model.layers.{i}.mlp.down_proj         Linear intermediate → hidden
//! model.norm                             RMSNorm
//! lm_head                                Linear hidden → vocab, or tied to embed_tokens
//! ```
//!
//! Positions are `past_len .. past_len + seq` whatever the padding (transformers 5 when no
//! `position_ids` are passed); RoPE is relative, so left padding leaves the real tokens' logits
//! unchanged.

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

/// Llama-family `config.json` fields that the forward pass uses.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2` or `qwen3`.
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
    /// Key/value heads; defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4: RoPE base at the top level.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// The RoPE settings of either config layout (`rope_theta` + `rope_scaling`, or
    /// `rope_parameters`), filled in by [`LlamaConfig::from_value`]; plain RoPE over
    /// [`Self::rope_theta`] when a config was built otherwise.
    #[serde(skip)]
    pub rotary: Option<Rotary>,
    /// Biases on q/k/v/o (Llama's `attention_bias`).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation; only `silu` is implemented.
    #[serde(default = "default_act")]
    pub hidden_act: String,
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
    /// Qwen2/Qwen3: whether `sliding_window` applies at all.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Keys further back than this many positions are not attended to (Mistral; Qwen2/Qwen3
    /// with `use_sliding_window`).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: layers below this index attend to everything.
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers 5: `full_attention` or `sliding_attention` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// RMSNorm over each head's queries and keys before RoPE (Qwen3's `q_norm`, `k_norm`).
    #[serde(skip)]
    pub qk_norm: bool,
    /// Biases on q/k/v whatever `attention_bias` says (Qwen2 has them, not on o_proj).
    #[serde(skip)]
    pub qkv_bias: bool,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// Parses a Llama-family `config.json` (the RoPE settings from either layout) and checks it.
    /// `context` names the file in errors.
    pub fn from_value(value: &serde_json::Value, context: &str) -> Result<Self> {
        let mut config: Self = serde_json::from_value(value.clone())
            .map_err(|e| PeftError::config(context, "config.json", e.to_string()))?;
        // transformers' defaults where the key is absent (Mistral v0.1 configs rely on 4096).
        if matches!(config.model_type.as_str(), "mistral" | "qwen2" | "qwen3")
            && value.get("sliding_window").is_none()
        {
            config.sliding_window = Some(4096);
        }
        if value.get("max_window_layers").is_none() {
            config.max_window_layers = Some(28);
        }
        config.validate(context)?;
        config.rotary = Some(Rotary::from_config(value, config.head_dim(), context)?);
        config.qk_norm = config.model_type == "qwen3";
        config.qkv_bias = config.model_type == "qwen2";
        Ok(config)
    }

    /// The RoPE settings.
    pub fn rotary(&self) -> Rotary {
        self.rotary
            .clone()
            .unwrap_or_else(|| Rotary::plain(self.rope_theta(), self.head_dim()))
    }

    /// The sliding window of each layer (`None`: full attention), as transformers 5 decides:
    /// `layer_types` where the config lists them; else Mistral windows every layer when
    /// `sliding_window` is set, and Qwen2/Qwen3 the layers from `max_window_layers` on when
    /// `use_sliding_window` is set.
    pub fn layer_windows(&self) -> Vec<Option<usize>> {
        let qwen = matches!(self.model_type.as_str(), "qwen2" | "qwen3");
        let window = if qwen && !self.use_sliding_window {
            None
        } else {
            self.sliding_window
        };
        (0..self.num_hidden_layers)
            .map(|i| {
                let sliding = match &self.layer_types {
                    Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
                    None if qwen => i >= self.max_window_layers.unwrap_or(0),
                    None => true,
                };
                window.filter(|_| sliding)
            })
            .collect()
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The RoPE base from either config layout (transformers 5 `rope_parameters` first).
    pub fn rope_theta(&self) -> f64 {
        self.rotary
            .as_ref()
            .map(|r| r.theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// Checks sizes and refuses settings that are not implemented rather than ignoring them.
    pub fn validate(&self, context: &str) -> Result<()> {
        let bad = |field: &str, reason: String| Err(PeftError::config(context, field, reason));
        if self.num_attention_heads == 0 {
            return bad("num_attention_heads", "must be positive".into());
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{kv} key/value heads do not divide {} attention heads",
                    self.num_attention_heads
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad("head_dim", "RoPE needs an even head_dim".into());
        }
        if self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("`{}` is not supported (only `silu`)", self.hidden_act),
            );
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window", "must be positive".into());
        }
        if self.vocab_size == 0 || self.num_hidden_layers == 0 {
            return bad("vocab_size/num_hidden_layers", "must be positive".into());
        }
        Ok(())
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
pub struct LlamaAttention<A: LayerAdapter> {
    /// Query projection.
    pub q_proj: AdaptableLinear<A>,
    /// Key projection.
    pub k_proj: AdaptableLinear<A>,
    /// Value projection.
    pub v_proj: AdaptableLinear<A>,
    /// Output projection.
    pub o_proj: AdaptableLinear<A>,
    /// Qwen3: RMSNorm over each query head (`[head_dim]`), before RoPE.
    pub q_norm: Option<RmsNorm>,
    /// Qwen3: RMSNorm over each key head (`[head_dim]`), before RoPE.
    pub k_norm: Option<RmsNorm>,
}

/// SwiGLU feed-forward: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp<A: LayerAdapter> {
    /// Gate projection.
    pub gate_proj: AdaptableLinear<A>,
    /// Up projection.
    pub up_proj: AdaptableLinear<A>,
    /// Down projection.
    pub down_proj: AdaptableLinear<A>,
}

/// One decoder layer (`model.layers.{i}`).
#[derive(Module, Debug)]
pub struct LlamaLayer<A: LayerAdapter> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: LlamaAttention<A>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: LlamaMlp<A>,
}

/// `model`: embeddings, layers, final norm.
#[derive(Module, Debug)]
pub struct LlamaModel<A: LayerAdapter> {
    /// Token embeddings.
    pub embed_tokens: AdaptableEmbedding<A>,
    /// The layers.
    pub layers: Vec<LlamaLayer<A>>,
    /// Final norm.
    pub norm: RmsNorm,
}

/// `LlamaForCausalLM` / `Qwen2ForCausalLM`.
#[derive(Module, Debug)]
pub struct Llama<A: LayerAdapter> {
    /// The decoder.
    pub model: LlamaModel<A>,
    /// Output projection; `None` when tied to `embed_tokens`.
    pub lm_head: Option<AdaptableLinear<A>>,
    /// How a tied projection computes (f32, or bf16 from the table's bf16 copy).
    #[module(skip)]
    pub tied_head: TiedHead,
    /// Sizes and special tokens.
    #[module(skip)]
    pub spec: ModelSpec,
    /// RoPE settings (base, rotated width, scaling variant).
    #[module(skip)]
    pub rotary: Rotary,
    /// Each layer's sliding window (`None`: attends to every earlier position).
    #[module(skip)]
    pub windows: Vec<Option<usize>>,
    /// Whether q/k/v/o carry biases (for [`CausalLm::modules`]).
    #[module(skip)]
    pub attention_bias: [bool; 2],
    /// Whether the MLP projections carry biases.
    #[module(skip)]
    pub mlp_bias: bool,
    /// MLP width.
    #[module(skip)]
    pub intermediate_size: usize,
}

impl<A: LayerAdapter> Llama<A> {
    /// Loads the weights of `config` from `store` (with Qwen2's q/k/v biases where
    /// `config.qkv_bias`, Qwen3's per-head query/key norms where `config.qk_norm`).
    pub fn load(
        config: &LlamaConfig,
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
        let (nq, nkv) = (config.num_attention_heads, config.kv_heads());
        let (qkv_b, o_b) = (
            config.attention_bias || config.qkv_bias,
            config.attention_bias,
        );
        let eps = config.rms_norm_eps;
        let rotary = config.rotary();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let a = format!("{p}.self_attn");
                let m = format!("{p}.mlp");
                let head_norm = |name: &str| {
                    config
                        .qk_norm
                        .then(|| w.rms_norm(&format!("{a}.{name}"), hd, eps))
                        .transpose()
                };
                Ok(LlamaLayer {
                    input_layernorm: w.rms_norm(&format!("{p}.input_layernorm"), h, eps)?,
                    self_attn: LlamaAttention {
                        q_proj: w.adaptable(&format!("{a}.q_proj"), h, nq * hd, qkv_b)?,
                        k_proj: w.adaptable(&format!("{a}.k_proj"), h, nkv * hd, qkv_b)?,
                        v_proj: w.adaptable(&format!("{a}.v_proj"), h, nkv * hd, qkv_b)?,
                        o_proj: w.adaptable(&format!("{a}.o_proj"), nq * hd, h, o_b)?,
                        q_norm: head_norm("q_norm")?,
                        k_norm: head_norm("k_norm")?,
                    },
                    post_attention_layernorm: w.rms_norm(
                        &format!("{p}.post_attention_layernorm"),
                        h,
                        eps,
                    )?,
                    mlp: LlamaMlp {
                        gate_proj: w.adaptable(
                            &format!("{m}.gate_proj"),
                            h,
                            im,
                            config.mlp_bias,
                        )?,
                        up_proj: w.adaptable(&format!("{m}.up_proj"), h, im, config.mlp_bias)?,
                        down_proj: w.adaptable(
                            &format!("{m}.down_proj"),
                            im,
                            h,
                            config.mlp_bias,
                        )?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Some tied checkpoints still carry an `lm_head.weight` copy; tied means it is ignored.
        let (lm_head, tied_head) = w.output_head(
            config.tie_word_embeddings,
            "model.embed_tokens",
            h,
            config.vocab_size,
        )?;
        Ok(Self {
            model: LlamaModel {
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
            rotary,
            windows: config.layer_windows(),
            attention_bias: [qkv_b, o_b],
            mlp_bias: config.mlp_bias,
            intermediate_size: im,
        })
    }
}

impl<A: LayerAdapter> LlamaLayer<A> {
    #[allow(clippy::too_many_arguments)]
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
        // `[b, s, n·hd]` → `[b, n, s, hd]`, through the per-head norm where the model has one.
        let heads = |t: Tensor<3>, n: usize, norm: Option<&RmsNorm>| {
            let t = t.reshape([b, s, n, hd]);
            let t = match norm {
                Some(norm) => norm.forward(t),
                None => t,
            };
            t.swap_dims(1, 2)
        };
        let attn = &self.self_attn;
        let q = heads(attn.q_proj.forward(ln.clone()), nq, attn.q_norm.as_ref());
        let k = heads(attn.k_proj.forward(ln.clone()), nkv, attn.k_norm.as_ref());
        let v = heads(attn.v_proj.forward(ln), nkv, None);
        let q = apply_rope(q, rope);
        let k = apply_rope(k, rope);
        let (k, v) = extend_cache(cache, k, v);
        let context = attend(q, k, v, 1.0 / (hd as f64).sqrt(), None, allowed)
            .swap_dims(1, 2)
            .reshape([b, s, nq * hd]);
        let x = x + self.self_attn.o_proj.forward(context);
        let ln = self.post_attention_layernorm.forward(x.clone());
        let (gate, up) = (
            self.mlp.gate_proj.forward(ln.clone()),
            self.mlp.up_proj.forward(ln),
        );
        let gated =
            peft_ops::fused::silu_mul(gate.clone(), up.clone()).unwrap_or_else(|| silu(gate) * up);
        x + self.mlp.down_proj.forward(gated)
    }
}

impl<A: LayerAdapter> CausalLm for Llama<A> {
    type Adapter = A;
    type WithAdapter<B: LayerAdapter> = Llama<B>;

    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn modules(&self) -> Vec<ModuleInfo> {
        let qk_norm = self
            .model
            .layers
            .first()
            .is_some_and(|l| l.self_attn.q_norm.is_some());
        llama_modules(
            &self.spec,
            self.intermediate_size,
            self.attention_bias,
            self.mlp_bias,
            qk_norm,
        )
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
    ) -> Result<Llama<B>> {
        let layers = self
            .model
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let p = format!("model.layers.{i}");
                let a = l.self_attn;
                let m = l.mlp;
                Ok(LlamaLayer {
                    input_layernorm: l.input_layernorm,
                    self_attn: LlamaAttention {
                        q_proj: f(&format!("{p}.self_attn.q_proj"), a.q_proj)?,
                        k_proj: f(&format!("{p}.self_attn.k_proj"), a.k_proj)?,
                        v_proj: f(&format!("{p}.self_attn.v_proj"), a.v_proj)?,
                        o_proj: f(&format!("{p}.self_attn.o_proj"), a.o_proj)?,
                        q_norm: a.q_norm,
                        k_norm: a.k_norm,
                    },
                    post_attention_layernorm: l.post_attention_layernorm,
                    mlp: LlamaMlp {
                        gate_proj: f(&format!("{p}.mlp.gate_proj"), m.gate_proj)?,
                        up_proj: f(&format!("{p}.mlp.up_proj"), m.up_proj)?,
                        down_proj: f(&format!("{p}.mlp.down_proj"), m.down_proj)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Llama {
            model: LlamaModel {
                embed_tokens: embedding("model.embed_tokens", self.model.embed_tokens)?,
                layers,
                norm: self.model.norm,
            },
            lm_head: self.lm_head.map(|l| f("lm_head", l)).transpose()?,
            tied_head: self.tied_head,
            spec: self.spec,
            rotary: self.rotary,
            windows: self.windows,
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
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

/// Every module of a Llama-family model with these sizes, by HF path. `attention_bias` is
/// `[q/k/v, o]`; `qk_norm` adds Qwen3's per-head `q_norm` / `k_norm`.
pub fn llama_modules(
    spec: &ModelSpec,
    intermediate_size: usize,
    attention_bias: [bool; 2],
    mlp_bias: bool,
    qk_norm: bool,
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
    let [qkv_b, o_b] = attention_bias;
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
            format!("{p}.self_attn.q_proj"),
            h,
            s.num_heads * hd,
            qkv_b,
        ));
        m.push(linear(
            format!("{p}.self_attn.k_proj"),
            h,
            s.num_kv_heads * hd,
            qkv_b,
        ));
        m.push(linear(
            format!("{p}.self_attn.v_proj"),
            h,
            s.num_kv_heads * hd,
            qkv_b,
        ));
        m.push(linear(
            format!("{p}.self_attn.o_proj"),
            s.num_heads * hd,
            h,
            o_b,
        ));
        if qk_norm {
            for name in ["q_norm", "k_norm"] {
                m.push(ModuleInfo {
                    path: format!("{p}.self_attn.{name}"),
                    kind: ModuleKind::RmsNorm { dim: hd },
                    tied: false,
                });
            }
        }
        m.push(norm(format!("{p}.post_attention_layernorm")));
        m.push(linear(format!("{p}.mlp.gate_proj"), h, im, mlp_bias));
        m.push(linear(format!("{p}.mlp.up_proj"), h, im, mlp_bias));
        m.push(linear(format!("{p}.mlp.down_proj"), im, h, mlp_bias));
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

    fn parse(json: &str) -> LlamaConfig {
        LlamaConfig::from_value(&serde_json::from_str(json).unwrap(), "config.json").unwrap()
    }

    #[test]
    fn rope_theta_is_read_from_both_config_layouts() {
        let v4 = parse(
            r#"{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":2,"rope_theta":500000.0}"#,
        );
        assert_eq!(v4.rope_theta(), 500000.0);
        let v5 = parse(
            r#"{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":2,
                "rope_parameters":{"rope_theta":1000.0,"rope_type":"default"}}"#,
        );
        assert_eq!(v5.rope_theta(), 1000.0);
        assert_eq!(v5.kv_heads(), 2);
        assert_eq!(v5.head_dim(), 4);
    }

    #[test]
    fn inconsistent_sizes_are_refused() {
        let cfg: LlamaConfig = serde_json::from_str(
            r#"{"model_type":"llama","vocab_size":8,"hidden_size":10,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":4}"#,
        )
        .unwrap();
        let err = cfg.validate("config.json").unwrap_err().to_string();
        assert!(
            err.contains("4 heads do not divide hidden_size 10"),
            "{err}"
        );
        let gqa: LlamaConfig = serde_json::from_str(
            r#"{"model_type":"llama","vocab_size":8,"hidden_size":8,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":3}"#,
        )
        .unwrap();
        let err = gqa.validate("config.json").unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }
}
