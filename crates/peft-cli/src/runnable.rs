//! What the commands run, behind [`Runnable`]: the base model alone, one adapter of any method
//! ([`peft::PeftModel`], its method chosen by the registry in the `peft` crate), or several
//! named LoRA adapters. No command matches on a method.

use std::path::Path;

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor};
use peft::PeftModel;
use peft_core::{CausalLm, ModelInput, ModelSpec, ModuleInfo, NoAdapter, TrainableSummary};
use peft_models::{AnyModel, GenerateOptions, SaveOptions};

/// A base model with an adapter of any method (or none): what `logits`, `generate`, `merge`
/// and `inspect` run.
pub(crate) trait Runnable {
    /// Sizes and special tokens.
    fn spec(&self) -> &ModelSpec;
    /// Every module by its HF path.
    fn modules(&self) -> Vec<ModuleInfo>;
    /// The device the weights live on.
    fn device(&self) -> Device;
    /// Logits `[batch, seq, vocab]`.
    fn forward(&self, input: ModelInput) -> Result<Tensor<3>>;
    /// KV-cached generation of a left-padded batch (see [`peft_models::generate()`]).
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>>;
    /// Writes the model with its adapter merged as an HF checkpoint, layer by layer.
    fn save_merged(&self, base_dir: &Path, out: &Path, options: &SaveOptions) -> Result<()>;
    /// The plain model with the adapter merged into its weights.
    fn merge_and_unload(self: Box<Self>) -> Result<AnyModel<NoAdapter>>;
    /// One adapter per batch row (several named LoRA adapters only).
    fn set_row_adapters(&mut self, rows: &[&str]) -> Result<()>;
}

/// What [`Runnable`] needs of a model run directly (the base, several LoRA adapters): the model
/// inside, and how it merges.
trait Loaded {
    type Model: CausalLm;
    /// The model to run.
    fn inner(&self) -> &Self::Model;
    /// The plain model with the adapter merged.
    fn unload(self) -> peft_core::Result<AnyModel<NoAdapter>>;
    /// One adapter per row, where the type holds several.
    fn set_rows(&mut self, _rows: &[&str]) -> Result<()> {
        bail!("--adapter-names needs LoRA adapters (--adapter NAME=DIR)")
    }
}

impl<T: Loaded> Runnable for T {
    fn spec(&self) -> &ModelSpec {
        self.inner().spec()
    }
    fn modules(&self) -> Vec<ModuleInfo> {
        self.inner().modules()
    }
    fn device(&self) -> Device {
        self.inner().device()
    }
    fn forward(&self, input: ModelInput) -> Result<Tensor<3>> {
        Ok(self.inner().forward(input, None)?)
    }
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        Ok(peft_models::generate(
            self.inner(),
            prompts,
            options,
            on_token,
        )?)
    }
    fn save_merged(&self, base_dir: &Path, out: &Path, options: &SaveOptions) -> Result<()> {
        Ok(peft_models::save_merged_with(
            self.inner(),
            base_dir,
            out,
            options,
        )?)
    }
    fn merge_and_unload(self: Box<Self>) -> Result<AnyModel<NoAdapter>> {
        Ok(self.unload()?)
    }
    fn set_row_adapters(&mut self, rows: &[&str]) -> Result<()> {
        self.set_rows(rows)
    }
}

impl Loaded for AnyModel<NoAdapter> {
    type Model = Self;
    fn inner(&self) -> &Self {
        self
    }
    fn unload(self) -> peft_core::Result<AnyModel<NoAdapter>> {
        Ok(self)
    }
}

impl Loaded for peft_lora::MultiLoraModel<AnyModel<peft_lora::LoraSet>> {
    type Model = AnyModel<peft_lora::LoraSet>;
    fn inner(&self) -> &Self::Model {
        &self.model
    }
    fn unload(self) -> peft_core::Result<AnyModel<NoAdapter>> {
        self.merge_and_unload()
    }
    fn set_rows(&mut self, rows: &[&str]) -> Result<()> {
        Ok(self.set_row_adapters(Some(rows))?)
    }
}

/// One adapter of any method: the `peft` crate's model does the dispatch.
impl Runnable for PeftModel {
    fn spec(&self) -> &ModelSpec {
        PeftModel::spec(self)
    }
    fn modules(&self) -> Vec<ModuleInfo> {
        PeftModel::modules(self)
    }
    fn device(&self) -> Device {
        PeftModel::device(self)
    }
    fn forward(&self, input: ModelInput) -> Result<Tensor<3>> {
        Ok(PeftModel::forward(self, input, None)?)
    }
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        options: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        Ok(PeftModel::generate(self, prompts, options, on_token)?)
    }
    fn save_merged(&self, base_dir: &Path, out: &Path, options: &SaveOptions) -> Result<()> {
        Ok(PeftModel::save_merged(self, base_dir, out, options)?)
    }
    fn merge_and_unload(self: Box<Self>) -> Result<AnyModel<NoAdapter>> {
        PeftModel::merge_and_unload(*self).map_err(|e| anyhow::anyhow!("--merge: {e}"))
    }
    fn set_row_adapters(&mut self, _rows: &[&str]) -> Result<()> {
        bail!("--adapter-names needs LoRA adapters (--adapter NAME=DIR)")
    }
}

/// What `peft inspect` shows of an adapter config on a model.
pub(crate) struct Inspected {
    /// The model with the (fresh) adapter.
    pub model: Box<dyn Runnable>,
    /// The modules or parameters the method targets.
    pub targeted: Vec<String>,
    /// Base parameters trained in full.
    pub saved: Vec<String>,
    /// Method-specific lines printed before the summary.
    pub notes: Vec<String>,
    /// PEFT's trainable-parameters numbers.
    pub summary: TrainableSummary,
}

impl Inspected {
    /// A fresh adapter of `method` from `config` (an `adapter_config.json`) or the method's
    /// default, on `base`; `tokenizer` for prompt tuning's text init.
    pub(crate) fn new(
        base: AnyModel<NoAdapter>,
        method: &peft::Method,
        config: Option<&Path>,
        tokenizer: Option<&peft_models::Tokenizer>,
    ) -> Result<Self> {
        let model = PeftModel::new(base, method.config(config)?, tokenizer)?;
        Ok(Self {
            targeted: model.targeted(),
            saved: model.saved_params(),
            notes: model.notes(),
            summary: model.trainable_summary(),
            model: Box::new(model),
        })
    }
}
