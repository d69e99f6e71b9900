//! # peft-models
//!
//! Hugging Face causal language models on burn, loaded from an HF folder (`config.json`,
//! `model.safetensors` or a sharded index, `tokenizer.json`):
//!
//! * [`bloom`] — BLOOM (fused `query_key_value`, ALiBi, embedding LayerNorm, tied `lm_head`);
//! * [`llama`] — Llama (RoPE with its scaling variants in [`rope`], RMSNorm, SwiGLU,
//!   grouped-query attention);
//! * [`mistral`] — Mistral (Llama with sliding-window attention);
//! * [`qwen2`] — Qwen2 (Llama with q/k/v biases, optional sliding windows);
//! * [`qwen3`] — Qwen3 (Llama with per-head query/key RMSNorm);
//! * [`gemma2`] — Gemma 2 ((1 + w) norms around each block, scaled embeddings, soft-capping,
//!   alternating sliding windows);
//! * [`phi3`] — Phi-3 (fused `qkv_proj` and `gate_up_proj`, partial rotary embeddings).
//!
//! A new architecture is one file here plus one line in [`ARCHITECTURES`].
//!
//! Every linear layer is an [`AdaptableLinear`](peft_core::AdaptableLinear), reachable by its HF
//! path, so peft-rs' method crates can attach adapters the way PEFT's `target_modules` does.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_core::CausalLm;
//!
//! let device = Device::flex();
//! let model = peft_models::load("tests/fixtures/models/bloom-tiny", &device).unwrap();
//! let tokenizer = peft_models::Tokenizer::from_dir("tests/fixtures/models/bloom-tiny").unwrap();
//! let prompt = tokenizer.encode("Human: 你好").unwrap();
//! let options = peft_models::GenerateOptions::greedy(8, model.spec());
//! let new = peft_models::generate(&model, &[prompt], &options, |_, _| {}).unwrap();
//! println!("{}", tokenizer.decode(&new[0]).unwrap());
//! ```

pub mod bloom;
pub mod chat;
pub mod gemma2;
pub mod generate;
pub mod hub;
pub mod layers;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod rope;
pub mod save;
pub mod tokenizer;

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use peft_core::model::{MapEmbedding, MapLinear};
use peft_core::{
    CausalLm, ComputeDtype, KvCache, LayerAdapter, ModelInput, ModelSpec, ModuleInfo, NoAdapter,
    PeftError, Result, TensorStore,
};

pub use bloom::{Bloom, BloomConfig};
pub use gemma2::{Gemma2, Gemma2Config};
pub use generate::{Decoding, GenerateOptions, generate};
pub use llama::{Llama, LlamaConfig};
pub use phi3::{Phi3, Phi3Config};
pub use save::{SaveOptions, save_merged_with, save_pretrained, save_pretrained_with};
pub use tokenizer::Tokenizer;

/// The network a `model_type` runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// [`bloom`].
    Bloom,
    /// [`llama`] and the architectures that are Llama with options.
    Llama,
    /// [`gemma2`].
    Gemma2,
    /// [`phi3`].
    Phi3,
}

/// Every `model_type` peft-rs implements, with the network it runs on: the one place a new
/// architecture is registered.
pub const ARCHITECTURES: [(&str, Family); 7] = [
    ("bloom", Family::Bloom),
    ("gemma2", Family::Gemma2),
    ("llama", Family::Llama),
    ("mistral", Family::Llama),
    ("phi3", Family::Phi3),
    ("qwen2", Family::Llama),
    ("qwen3", Family::Llama),
];

/// The model types peft-rs implements: the names of [`ARCHITECTURES`], in its order.
pub const SUPPORTED_MODEL_TYPES: [&str; ARCHITECTURES.len()] = {
    let mut names = [""; ARCHITECTURES.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = ARCHITECTURES[i].0;
        i += 1;
    }
    names
};

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub enum HfConfig {
    /// `model_type: "bloom"`.
    Bloom(BloomConfig),
    /// `model_type: "llama"`, `"mistral"`, `"qwen2"` or `"qwen3"`.
    Llama(LlamaConfig),
    /// `model_type: "gemma2"`.
    Gemma2(Gemma2Config),
    /// `model_type: "phi3"`.
    Phi3(Phi3Config),
}

/// Reads and validates `config.json` of a model folder.
pub fn read_config(dir: impl AsRef<Path>) -> Result<HfConfig> {
    let path = dir.as_ref().join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PeftError::json(&path, e))?;
    // transformers' `generate` stops at generation_config.json's EOS ids where the file sets
    // them (Llama 3 Instruct lists `<|eot_id|>` there and not in config.json).
    let gen_path = dir.as_ref().join("generation_config.json");
    if gen_path.is_file() {
        let text = std::fs::read_to_string(&gen_path).map_err(|e| PeftError::io(&gen_path, e))?;
        let generation: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| PeftError::json(&gen_path, e))?;
        if let (Some(eos), Some(obj)) = (generation.get("eos_token_id"), value.as_object_mut())
            && !eos.is_null()
        {
            obj.insert("eos_token_id".into(), eos.clone());
        }
    }
    config_from_value(value, &path)
}

/// Parses a `config.json` already read as JSON (`path` names it in errors), dispatching on
/// `model_type` through [`ARCHITECTURES`].
pub fn config_from_value(value: serde_json::Value, path: &Path) -> Result<HfConfig> {
    let model_type = value
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| PeftError::config(path.display().to_string(), "model_type", "missing"))?
        .to_string();
    let context = path.display().to_string();
    let family = ARCHITECTURES
        .iter()
        .find(|(name, _)| *name == model_type)
        .map(|(_, family)| *family);
    let config = match family {
        Some(Family::Bloom) => {
            let c: BloomConfig =
                serde_json::from_value(value).map_err(|e| PeftError::json(path, e))?;
            c.validate(&context)?;
            HfConfig::Bloom(c)
        }
        Some(Family::Llama) => HfConfig::Llama(LlamaConfig::from_value(&value, &context)?),
        Some(Family::Gemma2) => HfConfig::Gemma2(Gemma2Config::from_value(&value, &context)?),
        Some(Family::Phi3) => HfConfig::Phi3(Phi3Config::from_value(&value, &context)?),
        None => {
            return Err(PeftError::UnsupportedModel {
                path: path.to_path_buf(),
                model_type,
                supported: SUPPORTED_MODEL_TYPES.join(", "),
            });
        }
    };
    Ok(config)
}

/// Any supported network, holding adapters of type `A`.
// The variants differ in size only by their config fields; a model is built once and then moved
// by value rarely, so boxing would buy nothing (and burn's derive does not see through `Box`).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum AnyModel<A: LayerAdapter> {
    /// BLOOM.
    Bloom(Bloom<A>),
    /// Llama, Mistral, Qwen2 or Qwen3.
    Llama(Llama<A>),
    /// Gemma 2.
    Gemma2(Gemma2<A>),
    /// Phi-3.
    Phi3(Phi3<A>),
}

/// How to load a model: in full precision (the default), with linear layers quantised to
/// 4-bit as they are read, and/or computing the linear layers in bf16.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Quantise every linear layer except `lm_head` to 4-bit (transformers' `load_in_4bit`).
    pub quantize: Option<peft_quant::QuantConfig>,
    /// The dtype of the linear layers' products (see [`peft_ops::precision`]).
    pub compute_dtype: ComputeDtype,
    /// Hold the frozen linear weights of a bf16/f16 checkpoint widened to f32 (twice the memory)
    /// instead of as stored. Off by default: on the CPU backend they stay in their 2 bytes and
    /// are widened, exactly, inside each product, so results are the same either way.
    pub widen_half: bool,
    /// Under bf16 compute, compute `lm_head` (or a tied model's projection through its
    /// embedding table) in bf16 as well — `torch.autocast`'s layout and that of a model loaded in
    /// bf16 — instead of f32 (the default: the layout after `prepare_model_for_kbit_training`,
    /// and what the QLoRA recipe trains with). The logits and the loss's gradient are then
    /// rounded to bf16; the loss itself is still computed in f32. No effect under f32 compute.
    /// See docs/PRECISION.md.
    pub bf16_lm_head: bool,
}

/// The compute dtype of transformers' default `dtype="auto"` for the checkpoint in `dir` on
/// `device`: bf16 for a checkpoint stored in bf16 where bf16 products run on the CPU's bf16 units
/// (oneDNN, [`peft_ops::onednn`]), else f32 — f32 over a bf16 checkpoint is exact widening, bf16
/// without bf16 units would only be slower, and f16 rounded to bf16 would lose bits. What `peft
/// generate` and `peft serve` use unless told otherwise (docs/PRECISION.md).
pub fn auto_compute_dtype(dir: impl AsRef<Path>, device: &Device) -> ComputeDtype {
    let dir = dir.as_ref();
    let config = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(serde_json::Value::Null);
    let bf16_checkpoint = save::checkpoint_dtype(dir, &config) == safetensors::Dtype::BF16;
    if bf16_checkpoint
        && peft_ops::device::runs_cpu_kernels(device)
        && peft_ops::onednn::onednn().is_some()
    {
        ComputeDtype::Bf16
    } else {
        ComputeDtype::F32
    }
}

/// Loads a Hugging Face model folder onto `device`.
pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<AnyModel<NoAdapter>> {
    load_with(dir, device, &LoadOptions::default())
}

/// Loads a Hugging Face model folder onto `device` as `options` ask.
pub fn load_with(
    dir: impl AsRef<Path>,
    device: &Device,
    options: &LoadOptions,
) -> Result<AnyModel<NoAdapter>> {
    let dir = dir.as_ref();
    let config = read_config(dir)?;
    let store = TensorStore::open_model_dir(dir)?;
    load_from_with(&config, &store, device, options)
}

/// Every module a model with `config` has, by HF path, without loading any weight.
pub fn config_modules(config: &HfConfig) -> Vec<ModuleInfo> {
    match config {
        HfConfig::Bloom(c) => bloom::bloom_modules(&c.spec()),
        HfConfig::Llama(c) => llama::llama_modules(
            &c.spec(),
            c.intermediate_size,
            [c.attention_bias || c.qkv_bias, c.attention_bias],
            c.mlp_bias,
            c.qk_norm,
        ),
        HfConfig::Gemma2(c) => {
            gemma2::gemma2_modules(&c.spec(), c.intermediate_size, c.attention_bias)
        }
        HfConfig::Phi3(c) => phi3::phi3_modules(&c.spec(), c.intermediate_size),
    }
}

/// Loads a Hugging Face model folder with every linear layer except `lm_head` quantised to 4-bit
/// as it is read (transformers' `load_in_4bit`): the dense weights never reside together.
/// A folder that already holds a 4-bit checkpoint loads with [`load`] as well.
pub fn load_4bit(
    dir: impl AsRef<Path>,
    device: &Device,
    quantize: peft_quant::QuantConfig,
) -> Result<AnyModel<NoAdapter>> {
    let options = LoadOptions {
        quantize: Some(quantize),
        ..LoadOptions::default()
    };
    load_with(dir, device, &options)
}

/// Builds a model from an already parsed config and checkpoint.
pub fn load_from<A: LayerAdapter>(
    config: &HfConfig,
    store: &TensorStore,
    device: &Device,
) -> Result<AnyModel<A>> {
    load_from_with(config, store, device, &LoadOptions::default())
}

/// [`load_from`] as `options` ask (4-bit linear layers, bf16 compute).
pub fn load_from_with<A: LayerAdapter>(
    config: &HfConfig,
    store: &TensorStore,
    device: &Device,
    options: &LoadOptions,
) -> Result<AnyModel<A>> {
    if let Some(q) = &options.quantize {
        q.validate()?;
    }
    options.compute_dtype.check_device(device)?;
    Ok(match config {
        HfConfig::Bloom(c) => AnyModel::Bloom(Bloom::load(c, store, device, options)?),
        // Mistral, Qwen2 and Qwen3 are Llama with the options their configs set.
        HfConfig::Llama(c) => AnyModel::Llama(Llama::load(c, store, device, options)?),
        HfConfig::Gemma2(c) => AnyModel::Gemma2(Gemma2::load(c, store, device, options)?),
        HfConfig::Phi3(c) => AnyModel::Phi3(Phi3::load(c, store, device, options)?),
    })
}

impl<A: LayerAdapter> CausalLm for AnyModel<A> {
    type Adapter = A;
    type WithAdapter<B: LayerAdapter> = AnyModel<B>;

    fn spec(&self) -> &ModelSpec {
        match self {
            Self::Bloom(m) => m.spec(),
            Self::Llama(m) => m.spec(),
            Self::Gemma2(m) => m.spec(),
            Self::Phi3(m) => m.spec(),
        }
    }

    fn modules(&self) -> Vec<ModuleInfo> {
        match self {
            Self::Bloom(m) => m.modules(),
            Self::Llama(m) => m.modules(),
            Self::Gemma2(m) => m.modules(),
            Self::Phi3(m) => m.modules(),
        }
    }

    fn final_hidden(&self, input: ModelInput, cache: Option<&mut KvCache>) -> Result<Tensor<3>> {
        match self {
            Self::Bloom(m) => m.final_hidden(input, cache),
            Self::Llama(m) => m.final_hidden(input, cache),
            Self::Gemma2(m) => m.final_hidden(input, cache),
            Self::Phi3(m) => m.final_hidden(input, cache),
        }
    }

    fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match self {
            Self::Bloom(m) => m.logits(hidden),
            Self::Llama(m) => m.logits(hidden),
            Self::Gemma2(m) => m.logits(hidden),
            Self::Phi3(m) => m.logits(hidden),
        }
    }

    fn hidden_loss(&self, hidden: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
        match self {
            Self::Bloom(m) => m.hidden_loss(hidden, labels),
            Self::Llama(m) => m.hidden_loss(hidden, labels),
            Self::Gemma2(m) => m.hidden_loss(hidden, labels),
            Self::Phi3(m) => m.hidden_loss(hidden, labels),
        }
    }

    fn embed_tokens(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        match self {
            Self::Bloom(m) => m.embed_tokens(ids),
            Self::Llama(m) => m.embed_tokens(ids),
            Self::Gemma2(m) => m.embed_tokens(ids),
            Self::Phi3(m) => m.embed_tokens(ids),
        }
    }

    fn map_layers<B: LayerAdapter>(
        self,
        f: &mut MapLinear<'_, A, B>,
        embedding: &mut MapEmbedding<'_, A, B>,
    ) -> Result<AnyModel<B>> {
        Ok(match self {
            Self::Bloom(m) => AnyModel::Bloom(m.map_layers(f, embedding)?),
            Self::Llama(m) => AnyModel::Llama(m.map_layers(f, embedding)?),
            Self::Gemma2(m) => AnyModel::Gemma2(m.map_layers(f, embedding)?),
            Self::Phi3(m) => AnyModel::Phi3(m.map_layers(f, embedding)?),
        })
    }

    fn untie_word_embeddings(self) -> Self {
        match self {
            Self::Bloom(m) => Self::Bloom(m.untie_word_embeddings()),
            Self::Llama(m) => Self::Llama(m.untie_word_embeddings()),
            Self::Gemma2(m) => Self::Gemma2(m.untie_word_embeddings()),
            Self::Phi3(m) => Self::Phi3(m.untie_word_embeddings()),
        }
    }

    fn device(&self) -> Device {
        match self {
            Self::Bloom(m) => CausalLm::device(m),
            Self::Llama(m) => CausalLm::device(m),
            Self::Gemma2(m) => CausalLm::device(m),
            Self::Phi3(m) => CausalLm::device(m),
        }
    }
}

/// A checkpoint of random weights for `config`, in memory: matrices uniform in ±0.035 (std
/// ≈ 0.02, transformers' usual init), norm weights 1, biases 0. For benchmarks and tests that
/// need a model of a given size without a file.
pub fn random_checkpoint(config: &HfConfig, seed: u64) -> Result<TensorStore> {
    use rand::{Rng, SeedableRng};

    let modules = config_modules(config);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = std::collections::BTreeMap::new();
    for m in modules.iter().filter(|m| !m.tied) {
        let is_norm = matches!(
            m.kind,
            peft_core::ModuleKind::LayerNorm { .. } | peft_core::ModuleKind::RmsNorm { .. }
        );
        for (name, shape) in m.params() {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = match (name, is_norm) {
                ("weight", true) => vec![1.0; n],
                ("bias", _) => vec![0.0; n],
                _ => (0..n).map(|_| rng.random_range(-0.035f32..0.035)).collect(),
            };
            tensors.insert(
                format!("{}.{name}", m.path),
                peft_core::HostTensor::from_f32(shape, &values),
            );
        }
    }
    let bytes = peft_tensors::serialize(&tensors, None)?;
    TensorStore::from_bytes("<random checkpoint>", bytes)
}
