//! `get_peft_model`, `PeftModel.from_pretrained`, `save_pretrained` and merging for trainable
//! tokens: the core's [`TunedModel`] with no layer adapter, only trained rows.

use std::path::Path;

use peft_core::tokens::{TokenIndices, TokenKeys};
use peft_core::tuner::{LayerTuner, NewLayer, Target, TunedModel, TunerConfig};
use peft_core::{CausalLm, HostTensor, ModuleInfo, NoAdapter, PeftError, Result, TensorStore};

use crate::config::TrainableTokensConfig;

/// A model whose chosen embedding rows train (PEFT's `TrainableTokensModel`): the core's
/// [`TunedModel`] for [`TrainableTokens`], with `save_pretrained`, `merge_adapter` /
/// `unmerge_adapter`, `merge_and_unload`, `unload` and `trainable_summary`.
pub type TrainableTokensModel<M> = TunedModel<TrainableTokens, M>;

/// Trainable tokens as a method of the core's tuner: no layer adapter; the rows are the core's
/// [`TokenRows`](peft_core::TokenRows), saved under PEFT's `<path>.trainable_tokens_delta`.
#[derive(Debug, Clone, Copy)]
pub struct TrainableTokens;

impl TunerConfig for TrainableTokensConfig {
    fn modules_to_save(&self) -> Option<&[String]> {
        None
    }

    fn trainable_tokens(
        &self,
        modules: &[ModuleInfo],
    ) -> Result<Option<(TokenIndices, &'static str)>> {
        Ok(Some((self.indices(modules)?, "token_indices")))
    }

    fn token_keys(&self) -> TokenKeys {
        TokenKeys::Standalone
    }
}

impl LayerTuner for TrainableTokens {
    type Config = TrainableTokensConfig;
    type Layer = NoAdapter;

    /// No layer is adapted: the rows are the tables' ([`TunerConfig::trainable_tokens`]).
    fn select<'m>(
        _config: &TrainableTokensConfig,
        _model_type: &str,
        _modules: &'m [ModuleInfo],
    ) -> Result<Vec<&'m ModuleInfo>> {
        Ok(Vec::new())
    }

    fn make_layer(
        _config: &TrainableTokensConfig,
        _model_type: &str,
        target: Target<'_>,
        _store: Option<&TensorStore>,
        _device: &burn::tensor::Device,
    ) -> Result<NewLayer<NoAdapter>> {
        Err(PeftError::Unsupported(format!(
            "trainable tokens adapt no layer, yet `{}` was selected",
            target.path
        )))
    }

    fn module_of_key(_key: &str) -> Option<&str> {
        None
    }

    fn file_tensor(
        _config: &TrainableTokensConfig,
        _model_type: &str,
        path: &str,
        _is_embedding: bool,
        param: &str,
        _value: HostTensor,
    ) -> Result<(String, HostTensor)> {
        Err(PeftError::Unsupported(format!(
            "trainable tokens have no layer tensor `{param}` (at `{path}`)"
        )))
    }
}

/// PEFT's `get_peft_model(model, TrainableTokensConfig(...))`: freezes the base and makes the
/// chosen rows of the input embedding (and of the output layer tied to it, or of the tables
/// `target_modules` names) trainable, starting at their values.
pub fn get_peft_model<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    config: TrainableTokensConfig,
) -> Result<TrainableTokensModel<B::WithAdapter<NoAdapter>>> {
    if !config.init_weights {
        return Err(PeftError::Unsupported(
            "TrainableTokensConfig: init_weights = false starts the rows at random values \
             (PEFT's testing option); start from the table's rows (true)"
                .into(),
        ));
    }
    TrainableTokensModel::get_peft_model(base, config)
}

/// PEFT's `PeftModel.from_pretrained(model, adapter_dir)` for a trainable-tokens folder.
pub fn from_pretrained<B: CausalLm<Adapter = NoAdapter>>(
    base: B,
    adapter_dir: impl AsRef<Path>,
    trainable: bool,
) -> Result<TrainableTokensModel<B::WithAdapter<NoAdapter>>> {
    TrainableTokensModel::from_pretrained(base, adapter_dir, trainable)
}
