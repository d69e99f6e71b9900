//! Architectures as llama.cpp's converter (`convert_hf_to_gguf.py`, llama-cpp-python 0.3.36's
//! llama.cpp) writes them: the GGUF architecture name, its metadata keys from `config.json`, the
//! Hugging Face → GGUF tensor names, and the row re-orderings the converter applies.
//!
//! | `architectures[0]`        | GGUF arch | re-ordering |
//! |---------------------------|-----------|-------------|
//! | `LlamaForCausalLM`        | `llama`   | Q/K rows permuted (llama.cpp's rotary pairs) |
//! | `MistralForCausalLM`      | `llama`   | as Llama; the sliding window is not written (llama.cpp's `llama` has none) |
//! | `Qwen2ForCausalLM`        | `qwen2`   | none |
//! | `Qwen3ForCausalLM`        | `qwen3`   | none |
//! | `BloomForCausalLM`        | `bloom`   | the fused QKV from per-head `[q,k,v]` to `[all q, all k, all v]` |
//! | `Phi3ForCausalLM`         | `phi3`    | none (fused QKV and gate-up kept); LongRoPE as `rope_factors_long` / `_short` |
//!
//! Gemma-2 is refused until the sentencepiece vocabulary (`tokenizer.model`) is written: the
//! converter reads its vocabulary from that file alone. Phi-3 is written with a byte-level BPE
//! vocabulary (Phi-4's, `tokenizer_class: GPT2Tokenizer`, which the converter also reads that
//! way); a sentencepiece Phi-3 (Phi-3-mini) is refused by the vocabulary writer.

use std::path::Path;

use serde_json::Value as Json;

use crate::error::{GgufError, Result};
use crate::format::Value;

/// An architecture the exporter writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama and Mistral (GGUF `llama`).
    Llama,
    /// Qwen2 (GGUF `qwen2`).
    Qwen2,
    /// Qwen3 (GGUF `qwen3`).
    Qwen3,
    /// BLOOM (GGUF `bloom`).
    Bloom,
    /// Phi-3 and Phi-4 (GGUF `phi3`).
    Phi3,
}

/// A row re-ordering applied to a weight (and to its bias, and to a LoRA `B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOrder {
    /// Rows kept as they are.
    Keep,
    /// llama.cpp's rotary layout: within each of `heads` heads, rows `[0..d/2 | d/2..d]` are
    /// interleaved (`permute` in the converter).
    RotaryPairs {
        /// Heads the rows split into.
        heads: usize,
    },
    /// BLOOM's fused QKV: per-head `[q, k, v]` blocks regrouped as all q, all k, all v.
    BloomQkv {
        /// Attention heads.
        heads: usize,
    },
}

impl RowOrder {
    /// For each output row, the input row it takes; `None` where the rows cannot split so.
    pub fn source_rows(self, rows: usize) -> Option<Vec<usize>> {
        match self {
            Self::Keep => Some((0..rows).collect()),
            Self::RotaryPairs { heads } => {
                if heads == 0 || !rows.is_multiple_of(heads * 2) {
                    return None;
                }
                let dim = rows / heads;
                let half = dim / 2;
                Some(
                    (0..rows)
                        .map(|r| {
                            let (h, within) = (r / dim, r % dim);
                            let (i, j) = (within / 2, within % 2);
                            h * dim + j * half + i
                        })
                        .collect(),
                )
            }
            Self::BloomQkv { heads } => {
                if heads == 0 || !rows.is_multiple_of(heads * 3) {
                    return None;
                }
                let hd = rows / heads / 3;
                let embed = heads * hd;
                Some(
                    (0..rows)
                        .map(|r| {
                            let (k, rest) = (r / embed, r % embed);
                            let (h, x) = (rest / hd, rest % hd);
                            h * 3 * hd + k * hd + x
                        })
                        .collect(),
                )
            }
        }
    }

    /// The source rows and the row length of a `[rows, cols]` matrix, `None` for `Keep`.
    fn plan(self, values: &[f32], rows: usize, name: &str) -> Result<Option<(Vec<usize>, usize)>> {
        if self == Self::Keep {
            return Ok(None);
        }
        let source = self.source_rows(rows).ok_or_else(|| {
            GgufError::tensor(name, format!("{rows} rows do not split as {self:?}"))
        })?;
        Ok(Some((source, values.len() / rows.max(1))))
    }

    /// Re-orders the rows of a row-major `[rows, cols]` matrix (a bias: `cols` = 1); `Keep`
    /// returns `values` as they are, without a copy.
    pub fn apply(self, values: Vec<f32>, rows: usize, name: &str) -> Result<Vec<f32>> {
        let Some((source, cols)) = self.plan(&values, rows, name)? else {
            return Ok(values);
        };
        let mut out = Vec::with_capacity(values.len());
        for r in source {
            out.extend_from_slice(&values[r * cols..(r + 1) * cols]);
        }
        Ok(out)
    }

    /// Undoes [`RowOrder::apply`]: rows in GGUF order back to the checkpoint's.
    pub fn undo(self, values: Vec<f32>, rows: usize, name: &str) -> Result<Vec<f32>> {
        let Some((source, cols)) = self.plan(&values, rows, name)? else {
            return Ok(values);
        };
        let mut out = vec![0f32; values.len()];
        for (r, s) in source.into_iter().enumerate() {
            out[s * cols..(s + 1) * cols].copy_from_slice(&values[r * cols..(r + 1) * cols]);
        }
        Ok(out)
    }
}

/// Where a checkpoint tensor goes in the GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The GGUF name (`blk.3.attn_q.weight`).
    pub name: String,
    /// The re-ordering of its rows.
    pub rows: RowOrder,
}

/// Llama 3's RoPE scaling (`rope_type: llama3`): its frequencies divided by `factor` beyond
/// `original_context / low_freq_factor` wavelengths, kept below `original_context /
/// high_freq_factor`, and blended between.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    /// The division of the long wavelengths' frequencies.
    pub factor: f32,
    /// Wavelengths past `original_context / low_freq_factor` are divided in full.
    pub low_freq_factor: f32,
    /// Wavelengths below `original_context / high_freq_factor` are kept.
    pub high_freq_factor: f32,
    /// `original_max_position_embeddings`.
    pub original_context: f32,
}

impl Llama3Rope {
    /// The wavelength of each rotary pair of a head `dim` wide, RoPE base `base`, in f32 (the
    /// converter's arithmetic is torch's on 0-d f32 tensors).
    fn wavelengths(base: f32, dim: usize) -> impl Iterator<Item = f32> {
        (0..dim).step_by(2).map(move |i| {
            let freq = 1.0f32 / base.powf(i as f32 / dim as f32);
            2.0 * std::f32::consts::PI / freq
        })
    }

    /// The per-pair divisions of the frequencies (`rope_freqs.weight`, `[dim / 2]`), as the
    /// converter computes them.
    pub fn factors(&self, base: f32, dim: usize) -> Vec<f32> {
        let (low, high, old) = (
            self.low_freq_factor,
            self.high_freq_factor,
            self.original_context,
        );
        let (low_wavelen, high_wavelen) = (old / low, old / high);
        Self::wavelengths(base, dim)
            .map(|wavelen| {
                if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    self.factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                }
            })
            .collect()
    }

    /// The parameters behind a file's `rope_freqs.weight`, for a GGUF import. The factors
    /// carry the scaling `factor` (the longest wavelength's) but only the ratios of the other
    /// three; every Llama 3.x model uses `low_freq_factor = 1` and `high_freq_factor = 4`, so
    /// those are taken and `original_max_position_embeddings` is solved from a blended pair
    /// (or, with none, chosen between the kept and the divided wavelengths), rounded to an
    /// integer. `None` unless recomputing the factors from the result gives the file's values
    /// (within 1e-6 of each).
    pub fn from_factors(factors: &[f32], base: f32, dim: usize) -> Option<Self> {
        let factor = *factors.last()?;
        if factors.len() != dim / 2 || factor.is_nan() || factor <= 1.0 {
            return None;
        }
        let wavelengths: Vec<f32> = Self::wavelengths(base, dim).collect();
        let (low, high) = (1.0f32, 4.0f32);
        // A blended pair: 1/v = (1 - s)/factor + s, and s = (old/wavelen - low) / (high - low).
        let blended = factors
            .iter()
            .zip(&wavelengths)
            .find(|(v, _)| **v > 1.0 && **v < factor);
        let old = match blended {
            Some((v, w)) => {
                let s = (1.0 / v - 1.0 / factor) / (1.0 - 1.0 / factor);
                w * (low + s * (high - low))
            }
            None => {
                // Kept pairs need old < high·w, divided ones old > low·w (with low = 1):
                // halfway between the bounds.
                let kept = wavelengths.iter().zip(factors).filter(|(_, v)| **v == 1.0);
                let upper = kept.map(|(w, _)| high * w).fold(f32::INFINITY, f32::min);
                let divided = wavelengths
                    .iter()
                    .zip(factors)
                    .filter(|(_, v)| **v == factor);
                let lower = divided.map(|(w, _)| low * w).fold(0.0, f32::max);
                if upper.is_finite() {
                    (upper + lower) / 2.0
                } else {
                    lower * 2.0
                }
            }
        };
        let scaling = Self {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_context: old.round(),
        };
        let again = scaling.factors(base, dim);
        let same = again
            .iter()
            .zip(factors)
            .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs());
        same.then_some(scaling)
    }
}

/// The model's `config.json`, with the converter's look-ups.
#[derive(Debug)]
pub struct HParams<'a> {
    json: &'a Json,
    path: &'a Path,
}

impl<'a> HParams<'a> {
    /// Wraps a parsed `config.json`; `path` names it in errors.
    pub fn new(json: &'a Json, path: &'a Path) -> Self {
        Self { json, path }
    }

    fn find(&self, keys: &[&str]) -> Option<&'a Json> {
        keys.iter()
            .find_map(|k| self.json.get(*k).filter(|v| !v.is_null()))
    }

    fn uint(&self, keys: &[&str]) -> Result<Option<u32>> {
        match self.find(keys) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    GgufError::config(self.path, format!("`{}` is not an integer", keys[0]))
                }),
        }
    }

    fn need_uint(&self, keys: &[&str]) -> Result<u32> {
        self.uint(keys)?
            .ok_or_else(|| GgufError::config(self.path, format!("missing `{}`", keys[0])))
    }

    fn float(&self, keys: &[&str]) -> Result<Option<f32>> {
        match self.find(keys) {
            None => Ok(None),
            Some(v) => v.as_f64().map(|f| Some(f as f32)).ok_or_else(|| {
                GgufError::config(self.path, format!("`{}` is not a number", keys[0]))
            }),
        }
    }

    /// The RoPE parameters as the converter gathers them: `rope_parameters` (or the older
    /// `rope_scaling`) with a top-level `rope_theta` and the old `type` key folded in.
    fn rope(&self) -> serde_json::Map<String, Json> {
        let mut rope = self
            .find(&["rope_parameters", "rope_scaling"])
            .and_then(Json::as_object)
            .cloned()
            .unwrap_or_default();
        if !rope.contains_key("rope_theta")
            && let Some(theta) = self.find(&["rope_theta"])
        {
            rope.insert("rope_theta".into(), theta.clone());
        }
        if !rope.contains_key("rope_type")
            && let Some(t) = rope.get("type").cloned()
        {
            rope.insert("rope_type".into(), t);
        }
        if !rope.contains_key("original_max_position_embeddings")
            && let Some(n) = self.find(&["original_max_position_embeddings"])
        {
            rope.insert("original_max_position_embeddings".into(), n.clone());
        }
        rope
    }

    /// Decoder layers.
    pub fn block_count(&self) -> Result<u32> {
        self.need_uint(&["n_layers", "num_hidden_layers", "n_layer", "num_layers"])
    }

    /// Attention heads.
    pub fn heads(&self) -> Result<u32> {
        self.need_uint(&["num_attention_heads", "n_head", "n_heads"])
    }

    /// Key/value heads (the attention heads where the config has none).
    pub fn kv_heads(&self) -> Result<u32> {
        match self.uint(&["num_key_value_heads", "n_kv_heads"])? {
            Some(n) => Ok(n),
            None => self.heads(),
        }
    }

    /// The vocabulary size, if the config states it.
    pub fn vocab_size(&self) -> Result<Option<u32>> {
        self.uint(&["vocab_size"])
    }
}

impl Arch {
    /// The architecture of the model whose `config.json` is `json`.
    pub fn detect(json: &Json, path: &Path) -> Result<Self> {
        let name = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Json::as_str)
            .ok_or_else(|| GgufError::config(path, "missing `architectures`"))?;
        Ok(match name {
            "LlamaForCausalLM" | "MistralForCausalLM" => Self::Llama,
            "Qwen2ForCausalLM" => Self::Qwen2,
            "Qwen3ForCausalLM" => Self::Qwen3,
            "BloomForCausalLM" => Self::Bloom,
            "Phi3ForCausalLM" => Self::Phi3,
            "Gemma2ForCausalLM" => {
                return Err(GgufError::Unsupported(format!(
                    "{name}: GGUF export needs the sentencepiece vocabulary (tokenizer.model), \
                     which this exporter does not write yet; llama, mistral, qwen2, qwen3, \
                     bloom and phi3 are exported"
                )));
            }
            other => {
                return Err(GgufError::Unsupported(format!(
                    "{other}: no GGUF export for this architecture (llama, mistral, qwen2, \
                     qwen3, bloom and phi3 are exported)"
                )));
            }
        })
    }

    /// `general.architecture`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Bloom => "bloom",
            Self::Phi3 => "phi3",
        }
    }

    /// The architecture's hyper-parameter keys, in the converter's order, up to and including
    /// `general.file_type` (`file_type` being llama.cpp's `LLAMA_FTYPE_*` number).
    pub fn metadata(self, hp: &HParams, file_type: u32) -> Result<Vec<(String, Value)>> {
        let a = self.gguf_name();
        let mut out: Vec<(String, Value)> = Vec::new();
        let mut put = |key: &str, value: Value| out.push((format!("{a}.{key}"), value));
        if self == Self::Bloom {
            let embed = hp.need_uint(&["hidden_size", "n_embed"])?;
            let heads = hp.heads()?;
            put(
                "context_length",
                Value::U32(hp.uint(&["seq_length"])?.unwrap_or(embed)),
            );
            put("embedding_length", Value::U32(embed));
            put("feed_forward_length", Value::U32(4 * embed));
            put("block_count", Value::U32(hp.block_count()?));
            put("attention.head_count", Value::U32(heads));
            put("attention.head_count_kv", Value::U32(heads));
            let eps = hp
                .float(&["layer_norm_epsilon"])?
                .ok_or_else(|| GgufError::config(hp.path, "missing `layer_norm_epsilon`"))?;
            put("attention.layer_norm_epsilon", Value::F32(eps));
            out.push(("general.file_type".into(), Value::U32(file_type)));
            return Ok(out);
        }
        if self == Self::Phi3 {
            return self.phi3_metadata(hp, file_type);
        }
        put("block_count", Value::U32(hp.block_count()?));
        let ctx_keys = [
            "max_position_embeddings",
            "n_ctx",
            "n_positions",
            "max_length",
            "max_sequence_length",
            "model_max_length",
        ];
        if let Some(n) = hp.uint(&ctx_keys)? {
            put("context_length", Value::U32(n));
        }
        if let Some(n) = hp.uint(&["hidden_size", "n_embd", "dim"])? {
            put("embedding_length", Value::U32(n));
        }
        if let Some(n) = hp.uint(&["intermediate_size", "n_inner", "hidden_dim"])? {
            put("feed_forward_length", Value::U32(n));
        }
        put("attention.head_count", Value::U32(hp.heads()?));
        if let Some(n) = hp.uint(&["num_key_value_heads", "n_kv_heads"])? {
            put("attention.head_count_kv", Value::U32(n));
        }
        let rope = hp.rope();
        let rope_f32 = |key: &str| rope.get(key).and_then(Json::as_f64).map(|f| f as f32);
        match rope.get("rope_type").and_then(Json::as_str) {
            Some("linear") if rope_f32("factor").is_some() => {
                put("rope.scaling.type", Value::String("linear".into()));
                put(
                    "rope.scaling.factor",
                    Value::F32(rope_f32("factor").unwrap_or(1.0)),
                );
            }
            Some("yarn") if rope_f32("factor").is_some() => {
                put("rope.scaling.type", Value::String("yarn".into()));
                put(
                    "rope.scaling.factor",
                    Value::F32(rope_f32("factor").unwrap_or(1.0)),
                );
                let orig = rope
                    .get("original_max_position_embeddings")
                    .and_then(Json::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        GgufError::config(
                            hp.path,
                            "yarn RoPE without `original_max_position_embeddings`",
                        )
                    })?;
                put("rope.scaling.original_context_length", Value::U32(orig));
                for (hf, key) in [
                    ("extrapolation_factor", "rope.scaling.yarn_ext_factor"),
                    ("attention_factor", "rope.scaling.yarn_attn_factor"),
                    ("beta_fast", "rope.scaling.yarn_beta_fast"),
                    ("beta_slow", "rope.scaling.yarn_beta_slow"),
                ] {
                    if let Some(v) = rope_f32(hf) {
                        put(key, Value::F32(v));
                    }
                }
            }
            Some("su" | "longrope") => {
                put("rope.scaling.type", Value::String("longrope".into()));
            }
            _ => {}
        }
        if let Some(theta) = rope_f32("rope_theta") {
            put("rope.freq_base", Value::F32(theta));
        }
        if let Some(eps) = hp.float(&["rms_norm_eps", "norm_eps"])? {
            put("attention.layer_norm_rms_epsilon", Value::F32(eps));
        }
        if let Some(eps) = hp.float(&["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])? {
            put("attention.layer_norm_epsilon", Value::F32(eps));
        }
        let head_dim = hp.uint(&["head_dim"])?;
        if let Some(d) = head_dim {
            put("attention.key_length", Value::U32(d));
            put("attention.value_length", Value::U32(d));
        }
        out.push(("general.file_type".into(), Value::U32(file_type)));
        if self == Self::Llama {
            let vocab = hp
                .vocab_size()?
                .ok_or_else(|| GgufError::config(hp.path, "missing `vocab_size`"))?;
            out.push(("llama.vocab_size".into(), Value::U32(vocab)));
            let rope_dim = match head_dim {
                Some(d) => d,
                None => hp.need_uint(&["hidden_size"])? / hp.heads()?.max(1),
            };
            out.push(("llama.rope.dimension_count".into(), Value::U32(rope_dim)));
        }
        Ok(out)
    }

    /// Phi-3's keys, as the converter's `Phi3MiniModel` writes them (its own list, not the
    /// generic one): the rotary dimensions are `partial_rotary_factor · hidden / heads`, the
    /// sliding window 0 where the config has none (how llama.cpp tells Phi-4 apart), and
    /// LongRoPE's attention factor where the config scales.
    fn phi3_metadata(self, hp: &HParams, file_type: u32) -> Result<Vec<(String, Value)>> {
        let a = self.gguf_name();
        let mut out: Vec<(String, Value)> = Vec::new();
        let mut put = |key: &str, value: Value| out.push((format!("{a}.{key}"), value));
        let embed = hp.need_uint(&["hidden_size", "n_embd"])?;
        let heads = hp.heads()?;
        let rope = hp.rope();
        let context = hp.need_uint(&["n_positions", "max_position_embeddings"])?;
        let original = rope
            .get("original_max_position_embeddings")
            .and_then(Json::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                GgufError::config(hp.path, "missing `original_max_position_embeddings`")
            })?;
        let rotary = rope
            .get("partial_rotary_factor")
            .and_then(Json::as_f64)
            .or(hp.float(&["partial_rotary_factor"])?.map(f64::from))
            .unwrap_or(1.0);
        put("context_length", Value::U32(context));
        put("rope.scaling.original_context_length", Value::U32(original));
        put("embedding_length", Value::U32(embed));
        put(
            "feed_forward_length",
            Value::U32(hp.need_uint(&["intermediate_size"])?),
        );
        put("block_count", Value::U32(hp.block_count()?));
        put("attention.head_count", Value::U32(heads));
        put("attention.head_count_kv", Value::U32(hp.kv_heads()?));
        let eps = hp
            .float(&["rms_norm_eps"])?
            .ok_or_else(|| GgufError::config(hp.path, "missing `rms_norm_eps`"))?;
        put("attention.layer_norm_rms_epsilon", Value::F32(eps));
        let rope_dims = (rotary * f64::from(embed)) as u32 / heads.max(1);
        put("rope.dimension_count", Value::U32(rope_dims));
        let theta = rope
            .get("rope_theta")
            .and_then(Json::as_f64)
            .unwrap_or(10000.0);
        put("rope.freq_base", Value::F32(theta as f32));
        out.push(("general.file_type".into(), Value::U32(file_type)));
        let window = hp.uint(&["sliding_window"])?.unwrap_or(0);
        out.push((format!("{a}.attention.sliding_window"), Value::U32(window)));
        if let Some(factor) = phi3_attn_factor(&rope, context, original, hp)? {
            out.push((format!("{a}.rope.scaling.attn_factor"), Value::F32(factor)));
        }
        Ok(out)
    }

    /// Tensors the converter adds that the checkpoint does not hold: Llama 3's RoPE frequency
    /// factors (`rope_freqs.weight`, `[head_dim / 2]`), computed as the converter computes them,
    /// and Phi-3's LongRoPE factors (`rope_factors_long` / `rope_factors_short`).
    pub fn extra_tensors(self, hp: &HParams) -> Result<Vec<(String, Vec<f32>)>> {
        if self == Self::Phi3 {
            return phi3_rope_factors(&hp.rope(), hp);
        }
        if self != Self::Llama {
            return Ok(Vec::new());
        }
        let rope = hp.rope();
        let rope_type = rope.get("rope_type").and_then(Json::as_str).unwrap_or("");
        if !rope_type.eq_ignore_ascii_case("llama3") {
            return Ok(Vec::new());
        }
        let get = |k: &str, d: f64| rope.get(k).and_then(Json::as_f64).unwrap_or(d);
        let base = get("rope_theta", 10000.0);
        let dim = match hp.uint(&["head_dim"])? {
            Some(d) => d as usize,
            None => (hp.need_uint(&["hidden_size"])? / hp.heads()?.max(1)) as usize,
        };
        let scaling = Llama3Rope {
            factor: get("factor", 8.0) as f32,
            low_freq_factor: get("low_freq_factor", 1.0) as f32,
            high_freq_factor: get("high_freq_factor", 4.0) as f32,
            original_context: get("original_max_position_embeddings", 8192.0) as f32,
        };
        Ok(vec![(
            "rope_freqs.weight".into(),
            scaling.factors(base as f32, dim),
        )])
    }

    /// The Hugging Face prefix of a decoder layer (`model.layers.` / `transformer.h.`).
    fn layer_prefix(self) -> &'static str {
        match self {
            Self::Bloom => "transformer.h.",
            _ => "model.layers.",
        }
    }

    /// Whole-model tensors: (Hugging Face name, GGUF name).
    fn global_names(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Bloom => &[
                ("transformer.word_embeddings.weight", "token_embd.weight"),
                (
                    "transformer.word_embeddings_layernorm.weight",
                    "token_embd_norm.weight",
                ),
                (
                    "transformer.word_embeddings_layernorm.bias",
                    "token_embd_norm.bias",
                ),
                ("transformer.ln_f.weight", "output_norm.weight"),
                ("transformer.ln_f.bias", "output_norm.bias"),
                ("lm_head.weight", "output.weight"),
            ],
            _ => &[
                ("model.embed_tokens.weight", "token_embd.weight"),
                ("model.norm.weight", "output_norm.weight"),
                ("lm_head.weight", "output.weight"),
            ],
        }
    }

    /// A decoder layer's modules: (Hugging Face module, GGUF module).
    fn layer_modules(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Phi3 => Self::PHI3_MODULES,
            Self::Bloom => &[
                ("input_layernorm", "attn_norm"),
                ("self_attention.query_key_value", "attn_qkv"),
                ("self_attention.dense", "attn_output"),
                ("post_attention_layernorm", "ffn_norm"),
                ("mlp.dense_h_to_4h", "ffn_up"),
                ("mlp.dense_4h_to_h", "ffn_down"),
            ],
            _ => &[
                ("input_layernorm", "attn_norm"),
                ("post_attention_layernorm", "ffn_norm"),
                ("self_attn.q_proj", "attn_q"),
                ("self_attn.k_proj", "attn_k"),
                ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"),
                ("self_attn.q_norm", "attn_q_norm"),
                ("self_attn.k_norm", "attn_k_norm"),
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ],
        }
    }

    /// Phi-3's decoder-layer modules (fused QKV and gate-up, as llama.cpp reads them).
    const PHI3_MODULES: &'static [(&'static str, &'static str)] = &[
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.qkv_proj", "attn_qkv"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];

    /// The row order of a layer's GGUF module.
    fn rows_of(self, gguf_module: &str, hp: &HParams) -> Result<RowOrder> {
        Ok(match (self, gguf_module) {
            (Self::Llama, "attn_q") => RowOrder::RotaryPairs {
                heads: hp.heads()? as usize,
            },
            (Self::Llama, "attn_k") => RowOrder::RotaryPairs {
                heads: hp.kv_heads()? as usize,
            },
            (Self::Bloom, "attn_qkv") => RowOrder::BloomQkv {
                heads: hp.heads()? as usize,
            },
            _ => RowOrder::Keep,
        })
    }

    /// Where the checkpoint tensor `hf` goes: `Ok(None)` for tensors the converter drops
    /// (rotary caches), an error for one it cannot map.
    pub fn map(self, hf: &str, hp: &HParams) -> Result<Option<Mapped>> {
        if hf.ends_with(".rotary_emb.inv_freq")
            || hf.ends_with(".attention.masked_bias")
            || hf.ends_with(".attention.bias")
        {
            return Ok(None);
        }
        // BLOOM checkpoints are saved with and without the `transformer.` prefix.
        let prefixed;
        let hf_full =
            if self == Self::Bloom && !hf.starts_with("transformer.") && hf != "lm_head.weight" {
                prefixed = format!("transformer.{hf}");
                prefixed.as_str()
            } else {
                hf
            };
        if let Some((_, g)) = self.global_names().iter().find(|(h, _)| *h == hf_full) {
            return Ok(Some(Mapped {
                name: (*g).to_string(),
                rows: RowOrder::Keep,
            }));
        }
        let unknown = || {
            GgufError::tensor(
                hf,
                format!(
                    "no GGUF name for it in the `{}` architecture",
                    self.gguf_name()
                ),
            )
        };
        let (block, rest) = split_block(hf_full, self.layer_prefix()).ok_or_else(unknown)?;
        let (module, kind) = rest.rsplit_once('.').ok_or_else(unknown)?;
        let (_, target) = self
            .layer_modules()
            .iter()
            .find(|(h, _)| *h == module)
            .ok_or_else(unknown)?;
        Ok(Some(Mapped {
            name: format!("blk.{block}.{target}.{kind}"),
            rows: self.rows_of(target, hp)?,
        }))
    }

    /// The inverse of [`Arch::map`]: the Hugging Face name of the GGUF tensor `gguf` and the
    /// row order its rows are in (to be undone), or `None` for a tensor with no checkpoint
    /// counterpart.
    pub fn unmap(self, gguf: &str, hp: &HParams) -> Result<Option<(String, RowOrder)>> {
        if let Some((h, _)) = self.global_names().iter().find(|(_, g)| *g == gguf) {
            return Ok(Some(((*h).to_string(), RowOrder::Keep)));
        }
        let Some((block, rest)) = split_block(gguf, "blk.") else {
            return Ok(None);
        };
        let Some((module, kind)) = rest.rsplit_once('.') else {
            return Ok(None);
        };
        let Some((hf_module, _)) = self.layer_modules().iter().find(|(_, g)| *g == module) else {
            return Ok(None);
        };
        Ok(Some((
            format!("{}{block}.{hf_module}.{kind}", self.layer_prefix()),
            self.rows_of(module, hp)?,
        )))
    }
}

/// Phi-3's LongRoPE scaling, if its config scales (`long_factor` present): the type's
/// attention factor as the converter computes it (`su` / `longrope`: `√(1 + ln s / ln n₀)`;
/// `yarn`: `0.1 ln s + 1`; 1 where the context is not stretched, `s = n / n₀`).
fn phi3_attn_factor(
    rope: &serde_json::Map<String, Json>,
    context: u32,
    original: u32,
    hp: &HParams,
) -> Result<Option<f32>> {
    if rope.get("long_factor").is_none_or(Json::is_null) {
        return Ok(None);
    }
    let scale = f64::from(context) / f64::from(original);
    let kind = rope
        .get("rope_type")
        .and_then(Json::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    let factor = match kind.as_str() {
        _ if scale <= 1.0 => 1.0,
        "su" | "longrope" => (1.0 + scale.ln() / f64::from(original).ln()).sqrt(),
        "yarn" => 0.1 * scale.ln() + 1.0,
        other => {
            return Err(GgufError::config(
                hp.path,
                format!("Phi-3 RoPE scaling `{other}` (longrope, su and yarn are written)"),
            ));
        }
    };
    Ok(Some(factor as f32))
}

/// Phi-3's LongRoPE factors (`rope_factors_long.weight`, `rope_factors_short.weight`, one per
/// rotary pair), where the config has them.
fn phi3_rope_factors(
    rope: &serde_json::Map<String, Json>,
    hp: &HParams,
) -> Result<Vec<(String, Vec<f32>)>> {
    let list = |key: &str| -> Option<Vec<f32>> {
        rope.get(key)?
            .as_array()?
            .iter()
            .map(|v| v.as_f64().map(|f| f as f32))
            .collect()
    };
    let (Some(long), short) = (list("long_factor"), list("short_factor")) else {
        return Ok(Vec::new());
    };
    let short = short.ok_or_else(|| {
        GgufError::config(hp.path, "LongRoPE `long_factor` without `short_factor`")
    })?;
    if long.len() != short.len() {
        return Err(GgufError::config(
            hp.path,
            format!(
                "LongRoPE factors of {} and {} entries: one per rotary pair each",
                long.len(),
                short.len()
            ),
        ));
    }
    Ok(vec![
        ("rope_factors_long.weight".into(), long),
        ("rope_factors_short.weight".into(), short),
    ])
}

/// `prefix` `N.` `rest` → (`N`, `rest`).
fn split_block<'s>(name: &'s str, prefix: &str) -> Option<(usize, &'s str)> {
    let tail = name.strip_prefix(prefix)?;
    let (index, rest) = tail.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3.1 8B's and 3.2 1B's scalings (factor 8 and 32, low 1, high 4, original context
    /// 8192, base 500,000, heads 128 and 64 wide) come back from their factors exactly; a
    /// scaling whose original context leaves no blended pair is recovered as one that gives
    /// the same factors.
    #[test]
    fn llama3_scaling_is_recovered_from_its_factors() {
        for (factor, dim) in [(8.0, 128), (32.0, 64)] {
            let scaling = Llama3Rope {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192.0,
            };
            let factors = scaling.factors(500_000.0, dim);
            assert!(factors.iter().any(|v| *v > 1.0 && *v < factor));
            assert_eq!(
                Llama3Rope::from_factors(&factors, 500_000.0, dim),
                Some(scaling)
            );
        }
        let narrow = Llama3Rope {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 100.0,
        };
        let factors = narrow.factors(10_000.0, 8);
        let back = Llama3Rope::from_factors(&factors, 10_000.0, 8).unwrap();
        assert_eq!(back.factors(10_000.0, 8), factors);
        // Not a scaling at all (every factor 1), or the wrong count: refused.
        assert_eq!(Llama3Rope::from_factors(&[1.0; 4], 10_000.0, 8), None);
        assert_eq!(Llama3Rope::from_factors(&factors[..3], 10_000.0, 8), None);
    }

    #[test]
    fn rotary_pairs_interleave_each_heads_halves() {
        // Two heads of four rows: [a0 a1 | a2 a3] → [a0 a2 a1 a3], per head.
        let order = RowOrder::RotaryPairs { heads: 2 };
        assert_eq!(order.source_rows(8).unwrap(), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert!(order.source_rows(6).is_none());
    }

    #[test]
    fn bloom_qkv_regroups_per_head_blocks() {
        // Two heads of head_dim 1: rows [q0 k0 v0 q1 k1 v1] → [q0 q1 k0 k1 v0 v1].
        let order = RowOrder::BloomQkv { heads: 2 };
        assert_eq!(order.source_rows(6).unwrap(), vec![0, 3, 1, 4, 2, 5]);
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let out = order.apply(values, 6, "qkv").unwrap();
        assert_eq!(out[..4], [0.0, 1.0, 6.0, 7.0]);
    }

    #[test]
    fn unknown_architectures_and_tensors_are_named_in_the_error() {
        let path = Path::new("config.json");
        let cfg = serde_json::json!({"architectures": ["GPTNeoXForCausalLM"]});
        let err = Arch::detect(&cfg, path).unwrap_err().to_string();
        assert!(err.contains("GPTNeoXForCausalLM"), "{err}");
        let cfg = serde_json::json!({"num_attention_heads": 4});
        let hp = HParams::new(&cfg, path);
        let err = Arch::Llama
            .map("model.layers.0.extra.weight", &hp)
            .unwrap_err();
        assert!(
            err.to_string().contains("model.layers.0.extra.weight"),
            "{err}"
        );
        assert_eq!(
            Arch::Llama
                .map("model.layers.0.self_attn.rotary_emb.inv_freq", &hp)
                .unwrap(),
            None
        );
    }
}
