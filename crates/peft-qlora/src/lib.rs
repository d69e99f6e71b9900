//! # peft-qlora
//!
//! QLoRA: LoRA adapters over a frozen base whose linear layers are held in 4-bit (NF4 by
//! default, bitsandbytes' exact layout), de-quantised layer by layer at each forward pass.
//!
//! * [`load_4bit`] quantises a Hugging Face model while loading it (every linear except
//!   `lm_head`), or reads a folder that transformers saved in 4-bit as it is;
//! * [`qlora_preset`] is the QLoRA paper's recipe (r = 64, α = 16, all linear layers, dropout
//!   0.05); any [`LoraConfig`] works;
//! * the rest is peft-lora: [`get_peft_model`] / [`from_pretrained`] attach the adapter, saving
//!   writes a standard PEFT LoRA adapter, and merging de-quantises the base exactly and gives a
//!   dense model (no re-quantisation rounding).
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_qlora::{Load4bit, load_4bit, qlora_preset, get_peft_model};
//!
//! let device = Device::flex();
//! let base = load_4bit("tests/fixtures/models/bloom-tiny", &device, &Load4bit::default())?;
//! let qlora = get_peft_model(base, qlora_preset())?;
//! println!("{}", qlora.trainable_summary());
//! # Ok::<(), peft_core::PeftError>(())
//! ```

use std::path::Path;

use burn::tensor::Device;
use peft_core::{NoAdapter, PeftError, Result, TargetModules};
pub use peft_lora::{LoraConfig, LoraModel, from_pretrained, get_peft_model};
use peft_models::AnyModel;
pub use peft_quant::{QuantConfig, QuantType};

/// The dtype the de-quantised weights are computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDtype {
    /// f32 (the only one implemented: peft-rs computes in f32 on every backend today).
    F32,
    /// bf16 (refused with a clear error until bf16 compute lands).
    Bf16,
}

impl std::str::FromStr for ComputeDtype {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float32" | "f32" => Ok(ComputeDtype::F32),
            "bfloat16" | "bf16" => Ok(ComputeDtype::Bf16),
            other => Err(PeftError::config(
                "load_4bit",
                "compute_dtype",
                format!("`{other}` (expected float32 or bfloat16)"),
            )),
        }
    }
}

/// Options of [`load_4bit`], mirroring `BitsAndBytesConfig(load_in_4bit=True, …)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load4bit {
    /// `bnb_4bit_quant_type`.
    pub quant_type: QuantType,
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// Elements per absmax block (bitsandbytes' 64).
    pub blocksize: usize,
    /// `bnb_4bit_compute_dtype`.
    pub compute_dtype: ComputeDtype,
}

impl Default for Load4bit {
    /// NF4 with double quantisation, blocksize 64, f32 compute.
    fn default() -> Self {
        Self {
            quant_type: QuantType::Nf4,
            double_quant: true,
            blocksize: 64,
            compute_dtype: ComputeDtype::F32,
        }
    }
}

impl Load4bit {
    /// The quantisation settings.
    pub fn quant_config(&self) -> QuantConfig {
        QuantConfig {
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            double_quant: self.double_quant,
        }
    }
}

/// Loads `model_dir` with its linear layers (except `lm_head`) in 4-bit. Weights are quantised
/// one at a time as they are read; a checkpoint already stored in 4-bit is read without change
/// (its own quant type and block size win, as in transformers).
pub fn load_4bit(
    model_dir: impl AsRef<Path>,
    device: &Device,
    options: &Load4bit,
) -> Result<AnyModel<NoAdapter>> {
    if options.compute_dtype == ComputeDtype::Bf16 {
        return Err(PeftError::Unsupported(
            "compute_dtype bfloat16: peft-rs computes in float32 for now; use float32".into(),
        ));
    }
    peft_models::load_4bit(model_dir, device, options.quant_config())
}

/// The QLoRA paper's adapter: r = 64, α = 16, dropout 0.05, every linear layer except `lm_head`
/// (PEFT's `"all-linear"`).
pub fn qlora_preset() -> LoraConfig {
    LoraConfig {
        r: 64,
        lora_alpha: 16.0,
        lora_dropout: 0.05,
        target_modules: Some(TargetModules::Pattern("all-linear".into())),
        ..LoraConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_is_the_papers_recipe() {
        let c = qlora_preset();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (64, 16.0, 0.05));
        assert_eq!(c.scaling(64, 16.0), 0.25);
    }

    #[test]
    fn bf16_compute_is_refused_clearly() {
        let err = load_4bit(
            "does-not-matter",
            &Device::flex(),
            &Load4bit {
                compute_dtype: ComputeDtype::Bf16,
                ..Load4bit::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bfloat16"), "{err}");
        assert!("fp8".parse::<ComputeDtype>().is_err());
    }
}
