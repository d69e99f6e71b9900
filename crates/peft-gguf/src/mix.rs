//! `llama-quantize`'s per-tensor type choices (llama.cpp's `llama_tensor_get_type`, without an
//! importance matrix or user overrides) for the file types `peft export-gguf` writes directly:
//! `Q4_0`, `Q4_K_M`, `Q5_K_M` and `Q6_K`.
//!
//! A `_M` mix spends more bits where quantisation hurts most: the output projection (and a tied
//! token embedding, which is the output projection) in `Q6_K`; the attention value projection
//! (BLOOM's fused QKV counts as one) and the FFN down projection in `Q6_K` on a fixed pattern of
//! layers ([`use_more_bits`]). A tensor whose rows do not split into the type's blocks falls
//! back to a type with 32-value blocks, then to f16 (`tensor_type_fallback`).
//!
//! llama.cpp counts the value projections and FFN down projections in the order it visits the
//! tensors (by block, then by name); with one of each per block, as in every architecture
//! exported here, that count is the block's index.

use crate::quant::GgmlType;

/// A quantised file type (`LLAMA_FTYPE_MOSTLY_*`).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMix {
    /// Every matrix `Q4_0`, the output projection `Q6_K`.
    Q4_0,
    /// `Q4_K`, with `Q6_K` / `Q5_K` where quantisation hurts most.
    Q4_K_M,
    /// `Q5_K`, with `Q6_K` where quantisation hurts most.
    Q5_K_M,
    /// Every matrix `Q6_K`.
    Q6_K,
}

/// What `llama-quantize` knows of the model when it picks a tensor's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelFacts {
    /// Transformer blocks (`block_count`).
    pub n_layers: usize,
    /// No `output.weight`: the token embedding is the output projection and is quantised as
    /// one.
    pub tied_embeddings: bool,
    /// llama.cpp takes the model for a 70B (Llama-family with grouped-query attention, or
    /// Qwen2, at 80 blocks), whose value projection it stores one type up.
    pub is_70b: bool,
}

/// llama.cpp's layers that get more bits in a `_M` mix: the first and last eighth, and every
/// third layer between.
pub fn use_more_bits(layer: usize, n_layers: usize) -> bool {
    let (layer, n) = (layer as i64, n_layers as i64);
    layer < n / 8 || layer >= 7 * n / 8 || (layer - n / 8) % 3 == 2
}

/// The block index in a GGUF tensor name (`blk.N.…`).
fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

impl QuantMix {
    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    pub fn file_type(self) -> u32 {
        match self {
            Self::Q4_0 => 2,
            Self::Q4_K_M => 15,
            Self::Q5_K_M => 17,
            Self::Q6_K => 18,
        }
    }

    /// The type of most matrices.
    pub fn default_type(self) -> GgmlType {
        match self {
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_K_M => GgmlType::Q4_K,
            Self::Q5_K_M => GgmlType::Q5_K,
            Self::Q6_K => GgmlType::Q6_K,
        }
    }

    /// Whether `llama-quantize` quantises the tensor at all: matrices whose name ends in
    /// `weight`, but norms and the few kinds it keeps (`tensor_allows_quantization`); the rest
    /// stay f32.
    fn quantises(name: &str, dims: usize) -> bool {
        dims >= 2
            && name.ends_with("weight")
            && !name.contains("_norm.weight")
            && name != "position_embd.weight"
            && name != "token_types.weight"
    }

    /// The storage of the tensor `name` (GGUF name, `dims` dimensions, rows `row` values long)
    /// in this mix.
    pub fn tensor_type(self, name: &str, dims: usize, row: usize, model: &ModelFacts) -> GgmlType {
        if !Self::quantises(name, dims) {
            return GgmlType::F32;
        }
        let default = self.default_type();
        let more_bits =
            |layer: Option<usize>| layer.is_some_and(|layer| use_more_bits(layer, model.n_layers));
        let is_output =
            name == "output.weight" || (model.tied_embeddings && name == "token_embd.weight");
        let chosen = if is_output {
            if !row.is_multiple_of(default.block_size()) {
                GgmlType::Q8_0
            } else {
                GgmlType::Q6_K
            }
        } else if name.contains("attn_v.weight") || name.contains("attn_qkv.weight") {
            // A fused QKV counts as a value projection: llama.cpp's value branch comes first,
            // so its later QKV branch (Q5_K / Q6_K) is never reached.
            let mut t = match self {
                Self::Q4_K_M | Self::Q5_K_M if more_bits(block_index(name)) => GgmlType::Q6_K,
                _ => default,
            };
            if model.is_70b && t == GgmlType::Q4_K {
                t = GgmlType::Q5_K;
            }
            t
        } else if name.contains("ffn_down") {
            match self {
                Self::Q4_K_M | Self::Q5_K_M if more_bits(block_index(name)) => GgmlType::Q6_K,
                _ => default,
            }
        } else {
            default
        };
        fallback(chosen, row)
    }
}

/// `tensor_type_fallback`: a type whose blocks do not divide the rows gives way to one with
/// 32-value blocks, and that to f16.
fn fallback(t: GgmlType, row: usize) -> GgmlType {
    if row.is_multiple_of(t.block_size()) {
        return t;
    }
    let smaller = match t {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if row.is_multiple_of(smaller.block_size()) {
        smaller
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FACTS: ModelFacts = ModelFacts {
        n_layers: 16,
        tied_embeddings: false,
        is_70b: false,
    };

    #[test]
    fn more_bits_for_the_ends_and_every_third_layer_between() {
        // 16 layers: n/8 = 2, 7n/8 = 14; between, (i - 2) % 3 == 2 → 4, 7, 10, 13.
        let picked: Vec<usize> = (0..16).filter(|&i| use_more_bits(i, 16)).collect();
        assert_eq!(picked, [0, 1, 4, 7, 10, 13, 14, 15]);
    }

    #[test]
    fn q4_k_m_by_tensor() {
        let m = QuantMix::Q4_K_M;
        let t = |name: &str, row: usize| m.tensor_type(name, 2, row, &FACTS);
        assert_eq!(t("blk.0.attn_v.weight", 256), GgmlType::Q6_K);
        assert_eq!(t("blk.2.attn_v.weight", 256), GgmlType::Q4_K);
        assert_eq!(t("blk.4.ffn_down.weight", 512), GgmlType::Q6_K);
        assert_eq!(t("blk.5.ffn_down.weight", 512), GgmlType::Q4_K);
        assert_eq!(t("blk.5.attn_q.weight", 256), GgmlType::Q4_K);
        assert_eq!(t("blk.5.attn_qkv.weight", 256), GgmlType::Q4_K);
        assert_eq!(t("blk.4.attn_qkv.weight", 256), GgmlType::Q6_K);
        assert_eq!(t("output.weight", 256), GgmlType::Q6_K);
        // An untied embedding is an ordinary matrix; a tied one is the output projection.
        assert_eq!(t("token_embd.weight", 256), GgmlType::Q4_K);
        let tied = ModelFacts {
            tied_embeddings: true,
            ..FACTS
        };
        assert_eq!(
            m.tensor_type("token_embd.weight", 2, 256, &tied),
            GgmlType::Q6_K
        );
        // Rows of 64: Q4_K → Q5_0, Q6_K → Q8_0; the output projection → Q8_0; rows of 48 → f16.
        assert_eq!(t("blk.5.attn_q.weight", 64), GgmlType::Q5_0);
        assert_eq!(t("blk.0.attn_v.weight", 64), GgmlType::Q8_0);
        assert_eq!(t("output.weight", 64), GgmlType::Q8_0);
        assert_eq!(t("blk.5.attn_q.weight", 48), GgmlType::F16);
        // Vectors and norms stay f32.
        assert_eq!(
            m.tensor_type("blk.0.attn_norm.weight", 1, 256, &FACTS),
            GgmlType::F32
        );
        assert_eq!(
            m.tensor_type("blk.0.attn_q.bias", 1, 256, &FACTS),
            GgmlType::F32
        );
        // A 70B's value projections one type up.
        let big = ModelFacts {
            n_layers: 80,
            is_70b: true,
            ..FACTS
        };
        assert_eq!(
            m.tensor_type("blk.20.attn_v.weight", 2, 8192, &big),
            GgmlType::Q5_K
        );
    }

    #[test]
    fn q5_k_m_q6_k_and_q4_0() {
        let t = |m: QuantMix, name: &str, row: usize| m.tensor_type(name, 2, row, &FACTS);
        assert_eq!(
            t(QuantMix::Q5_K_M, "blk.0.attn_v.weight", 256),
            GgmlType::Q6_K
        );
        assert_eq!(
            t(QuantMix::Q5_K_M, "blk.2.attn_v.weight", 256),
            GgmlType::Q5_K
        );
        assert_eq!(
            t(QuantMix::Q5_K_M, "blk.2.attn_qkv.weight", 256),
            GgmlType::Q5_K
        );
        assert_eq!(
            t(QuantMix::Q5_K_M, "blk.2.attn_q.weight", 64),
            GgmlType::Q5_1
        );
        assert_eq!(
            t(QuantMix::Q6_K, "blk.0.attn_v.weight", 256),
            GgmlType::Q6_K
        );
        assert_eq!(t(QuantMix::Q6_K, "blk.0.attn_v.weight", 64), GgmlType::Q8_0);
        assert_eq!(t(QuantMix::Q4_0, "blk.0.attn_v.weight", 64), GgmlType::Q4_0);
        assert_eq!(t(QuantMix::Q4_0, "output.weight", 256), GgmlType::Q6_K);
        // Rows of 64 split into Q4_0's blocks, so Q6_K is chosen, then falls back to Q8_0.
        assert_eq!(t(QuantMix::Q4_0, "output.weight", 64), GgmlType::Q8_0);
    }
}
