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
pub use peft_core::ComputeDtype;
use peft_core::{NoAdapter, Result, TargetModules};
pub use peft_lora::{LoraConfig, LoraModel, from_pretrained, get_peft_model};
use peft_models::AnyModel;
pub use peft_quant::{QuantConfig, QuantType};

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
    let load = peft_models::LoadOptions {
        quantize: Some(options.quant_config()),
        compute_dtype: options.compute_dtype,
        ..peft_models::LoadOptions::default()
    };
    peft_models::load_with(model_dir, device, &load)
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

    /// PEFT's QLoRA adapter, trained over bitsandbytes' NF4 checkpoint, gives PEFT's logits
    /// over ours and PEFT's parameter counts; the full suite (merging, training, FP4, bf16
    /// compute) is tests/tests/quant.rs.
    #[test]
    fn a_peft_qlora_adapter_over_an_nf4_checkpoint_gives_pefts_logits() {
        use peft_tests::{adapter_dir, device, model_dir, reference_json};
        let base = peft_models::load(model_dir("bloom-tiny-nf4"), &device()).unwrap();
        let qlora = from_pretrained(base, adapter_dir("qlora-bloom"), false).unwrap();
        peft_tests::assert_logits_match(&qlora.model, "qlora-bloom", 1e-4);
        let counts = reference_json("qlora-bloom");
        let summary = qlora.trainable_summary();
        assert_eq!(summary.all as u64, counts["all_params"].as_u64().unwrap());
    }

    #[test]
    fn preset_is_the_papers_recipe() {
        let c = qlora_preset();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (64, 16.0, 0.05));
        assert_eq!(c.scaling(64, 16.0), 0.25);
    }
}

/// The README's examples, compiled as doc tests (`cargo test -p <crate> --doc`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
