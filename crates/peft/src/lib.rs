#![doc = include_str!("../README.md")]

mod dispatch;
mod methods;
pub mod mixed;
pub mod registry;

use std::path::{Path, PathBuf};

pub use peft_adalora as adalora;
pub use peft_bitfit as bitfit;
pub use peft_ia3 as ia3;
pub use peft_loha as loha;
pub use peft_lokr as lokr;
pub use peft_lora as lora;
pub use peft_models as models;
pub use peft_prefix as prefix;
pub use peft_prompt as prompt;
pub use peft_ptuning as ptuning;
pub use peft_qlora as qlora;
pub use peft_quant as quant;
#[cfg(feature = "train")]
pub use peft_train as train;
pub use peft_trainable_tokens as trainable_tokens;
pub use peft_vera as vera;

pub use methods::{PeftConfig, PeftModel};
pub use peft_adalora::AdaLoraConfig;
pub use peft_bitfit::BitFitConfig;
pub use peft_core::{
    AdapterModel, CausalLm, ComputeDtype, MethodConfig, NoAdapter, PeftError, PeftType, Result,
    TargetModules, TrainableSummary,
};
pub use peft_ia3::Ia3Config;
pub use peft_loha::LohaConfig;
pub use peft_lokr::LokrConfig;
pub use peft_lora::LoraConfig;
pub use peft_models::{AnyModel, LoadOptions, Tokenizer};
pub use peft_prefix::PrefixTuningConfig;
pub use peft_prompt::{PromptLearningConfig, PromptTuningConfig, PromptTuningInit};
pub use peft_ptuning::{EncoderType, PromptEncoderConfig};
pub use peft_trainable_tokens::TrainableTokensConfig;
pub use peft_vera::VeraConfig;
pub use registry::{METHODS, Method, Serving, by_name, by_peft_type};

/// The model every method adapts: a loaded base of any architecture, without adapter.
pub type Base = AnyModel<NoAdapter>;

/// A fresh adapter of `config`'s method on `model` (PEFT's `get_peft_model`): only the
/// adapter's parameters train.
pub fn get_peft_model(model: Base, config: impl Into<PeftConfig>) -> Result<PeftModel> {
    PeftModel::new(model, config.into(), None)
}

/// The config of the adapter folder `dir` (or of the `adapter_config.json` file `dir` names),
/// of whichever method it is (PEFT's `PeftConfig.from_pretrained`).
pub fn load_config(dir: impl AsRef<Path>) -> Result<PeftConfig> {
    PeftConfig::from_file(dir)
}

impl PeftModel {
    /// The adapter folder `dir` on `model`, for inference (PEFT's `PeftModel.from_pretrained`):
    /// its method is the one its `adapter_config.json` names.
    pub fn from_pretrained(model: Base, dir: impl AsRef<Path>) -> Result<Self> {
        Self::load(model, dir, false)
    }

    #[cfg(feature = "train")]
    /// Trains the adapter with the single-process trainer ([`train::train`]): AdamW, the
    /// schedule and checkpoints of `config`, checkpoints under `output_dir`.
    pub fn train(
        self,
        data: &[train::Tokenized],
        pad_id: u32,
        config: &train::TrainConfig,
        output_dir: impl AsRef<Path>,
        resume: train::Resume,
    ) -> std::result::Result<(Self, train::TrainSummary), train::TrainError> {
        struct Train<'a> {
            data: &'a [train::Tokenized],
            pad_id: u32,
            config: &'a train::TrainConfig,
            output_dir: &'a Path,
            resume: train::Resume,
        }
        impl AdapterVisitor for Train<'_> {
            type Output = std::result::Result<(PeftModel, train::TrainSummary), train::TrainError>;
            fn visit<A>(self, adapter: A) -> Self::Output
            where
                A: AdapterModel + Into<PeftModel> + 'static,
                <A::Model as CausalLm>::WithAdapter<NoAdapter>: CausalLm<Adapter = NoAdapter>,
            {
                let (trained, summary) = train::train(
                    adapter,
                    self.data,
                    self.pad_id,
                    self.config,
                    self.output_dir,
                    self.resume,
                    &mut |_| {},
                )?;
                Ok((trained.into(), summary))
            }
        }
        self.visit(Train {
            data,
            pad_id,
            config,
            output_dir: output_dir.as_ref(),
            resume,
        })
    }
}

impl PeftConfig {
    /// The config with the keys of the JSON object `values` set over it, as PEFT's
    /// `LoraConfig(**kwargs)` sets them (`{"r": 16, "target_modules": ["q_proj"]}`); an
    /// unknown key is kept as unknown keys of a file are, a wrong type is an error.
    pub fn with_values(self, values: serde_json::Value) -> Result<Self> {
        let mut json = self.to_json()?;
        let (Some(obj), serde_json::Value::Object(values)) = (json.as_object_mut(), values) else {
            return Err(PeftError::InvalidInput(
                "config values must be a JSON object".into(),
            ));
        };
        obj.extend(values);
        Self::from_json(json, "config values")
    }
}

/// Generic code over the typed adapter model inside a [`PeftModel`] ([`PeftModel::visit`]):
/// a training loop or a benchmark written once for every method.
pub trait AdapterVisitor {
    /// What the visit returns.
    type Output;
    /// Runs on the method's own model type `A`; `A: Into<PeftModel>` wraps it back.
    fn visit<A>(self, adapter: A) -> Self::Output
    where
        A: AdapterModel + Into<PeftModel> + 'static,
        <A::Model as CausalLm>::WithAdapter<NoAdapter>: CausalLm<Adapter = NoAdapter>;
}

/// Values a caller (`peft train`'s flags) sets over a method's config; each applies to the
/// methods whose config has the key of that name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigOverrides {
    /// LoRA's `r`.
    pub r: Option<usize>,
    /// LoRA's `lora_alpha`.
    pub lora_alpha: Option<f64>,
    /// LoRA's `lora_dropout`.
    pub lora_dropout: Option<f64>,
    /// LoRA's `use_dora` (DoRA).
    pub use_dora: Option<bool>,
    /// LoRA's `use_rslora` (scale `α/√r`).
    pub use_rslora: Option<bool>,
    /// LoRA's `init_lora_weights`: `"true"`, `"false"` or an initialisation's name.
    pub init_lora_weights: Option<String>,
    /// LoRA's `trainable_token_indices` (the list form: rows of the input embedding, and of a
    /// tied output layer), or the trainable-tokens method's `token_indices`.
    pub trainable_token_indices: Option<Vec<usize>>,
    /// LoHa's and LoKr's `alpha` (the scale numerator: the update is multiplied by
    /// `alpha / r`).
    pub alpha: Option<f64>,
    /// LoHa's and LoKr's `rank_dropout`.
    pub rank_dropout: Option<f64>,
    /// LoHa's and LoKr's `module_dropout`.
    pub module_dropout: Option<f64>,
    /// LoKr's `decompose_both` (decompose the left Kronecker factor too).
    pub decompose_both: Option<bool>,
    /// LoKr's `decompose_factor` (the dimensions' factorisation divider; -1 = near the square
    /// root).
    pub decompose_factor: Option<i64>,
    /// LoKr's `rank_dropout_scale` (rescale the rows `rank_dropout` keeps).
    pub rank_dropout_scale: Option<bool>,
    /// VeRA's `projection_prng_key` (the seed its shared projections are drawn from).
    pub projection_prng_key: Option<u64>,
    /// VeRA's `save_projection` (write the projections into the folder).
    pub save_projection: Option<bool>,
    /// VeRA's `vera_dropout`.
    pub vera_dropout: Option<f64>,
    /// VeRA's `d_initial` (the starting value of `vera_lambda_d`).
    pub d_initial: Option<f64>,
    /// AdaLoRA's `target_r` (the average rank the budget ends at).
    pub target_r: Option<usize>,
    /// AdaLoRA's `total_step` (the schedule's length; `peft train` sets the run's steps).
    pub total_step: Option<usize>,
    /// AdaLoRA's `tinit` (steps before the budget shrinks).
    pub tinit: Option<usize>,
    /// AdaLoRA's `tfinal` (steps at the end with the ranks fixed).
    pub tfinal: Option<usize>,
    /// `target_modules` (LoRA, IA3, LoHa, LoKr, VeRA, AdaLoRA).
    pub target_modules: Option<TargetModules>,
    /// `num_virtual_tokens` (prompt tuning, P-tuning, prefix tuning).
    pub num_virtual_tokens: Option<usize>,
    /// `base_model_name_or_path`, recorded in every config.
    pub base_model_name_or_path: Option<String>,
}

/// `path` itself where it names a file, else its `adapter_config.json`.
fn config_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(peft_core::adapter_files::CONFIG_NAME)
    } else {
        path.to_path_buf()
    }
}

/// The error of a method whose adapter lives outside the weights.
fn no_merge(label: &str) -> PeftError {
    PeftError::Unsupported(format!(
        "{label} has no weights to merge: keep the adapter and load it with --adapter"
    ))
}
