//! The methods this build knows, each once: its config and model types and the few things that
//! differ between methods. `adapter_methods!` (`src/dispatch.rs`) turns the list into
//! [`PeftConfig`], [`PeftModel`] and their operations; the [`crate::registry`] says how the
//! tools use each method. A new method is one entry here, one row there (docs/ADDING_A_METHOD.md).

use std::path::Path;

use burn::tensor::{Device, Tensor};
use peft_core::{
    AdapterModel, CausalLm, KvCache, MethodConfig, ModelInput, ModelSpec, ModuleInfo, PeftError,
    PeftType, Result, TrainableSummary,
};
use peft_models::{AnyModel, GenerateOptions, SaveOptions, Tokenizer};

use crate::dispatch::adapter_methods;
use crate::{AdapterVisitor, Base, ConfigOverrides, config_file, no_merge};

adapter_methods! {
    /// LoRA (and QLoRA, which saves LoRA folders): `peft_lora`.
    Lora {
        config: peft_lora::LoraConfig,
        model: peft_lora::LoraModel<AnyModel<peft_lora::LoraLinear>>,
        build: |base, config, _| peft_lora::get_peft_model(base, config),
        load: |base, dir, trainable| peft_lora::from_pretrained(base, dir, trainable),
        targeted: |m| m.targeted.clone(),
        saved: |m| m.saved_params.clone(),
        merge: |m| m.merge_and_unload(),
        overrides: |c, o| {
            c.r = o.r.unwrap_or(c.r);
            c.lora_alpha = o.lora_alpha.unwrap_or(c.lora_alpha);
            c.lora_dropout = o.lora_dropout.unwrap_or(c.lora_dropout);
            c.use_dora = o.use_dora.unwrap_or(c.use_dora);
            c.use_rslora = o.use_rslora.unwrap_or(c.use_rslora);
            if let Some(init) = &o.init_lora_weights {
                c.init_lora_weights = match init.as_str() {
                    "true" => peft_lora::InitLoraWeights::Flag(true),
                    "false" => peft_lora::InitLoraWeights::Flag(false),
                    name => peft_lora::InitLoraWeights::Method(name.to_string()),
                };
                // PEFT's LoftQConfig defaults, where the config has none.
                if init == "loftq" && c.loftq_config.is_empty() {
                    c.loftq_config.insert("loftq_bits".into(), 4.into());
                    c.loftq_config.insert("loftq_iter".into(), 1.into());
                }
            }
            if let Some(ids) = &o.trainable_token_indices {
                c.trainable_token_indices = Some(peft_core::tokens::TokenIndices::List(ids.clone()));
            }
            c.target_modules = o.target_modules.clone().or(c.target_modules.take());
        },
    }
    /// IA3: `peft_ia3`.
    Ia3 {
        config: peft_ia3::Ia3Config,
        model: peft_ia3::Ia3Model<AnyModel<peft_ia3::Ia3Linear>>,
        build: |base, config, _| peft_ia3::get_peft_model(base, config),
        load: |base, dir, trainable| peft_ia3::from_pretrained(base, dir, trainable),
        targeted: |m| m.targeted.clone(),
        saved: |m| m.saved_params.clone(),
        merge: |m| m.merge_and_unload(),
        overrides: |c, o| {
            c.target_modules = o.target_modules.clone().or(c.target_modules.take());
        },
    }
    /// LoHa: `peft_loha`.
    Loha {
        config: peft_loha::LohaConfig,
        model: peft_loha::LohaModel<AnyModel<peft_loha::LohaLinear>>,
        build: |base, config, _| peft_loha::get_peft_model(base, config),
        load: |base, dir, trainable| peft_loha::from_pretrained(base, dir, trainable),
        targeted: |m| m.targeted.clone(),
        saved: |m| m.saved_params.clone(),
        merge: |m| m.merge_and_unload(),
        overrides: |c, o| {
            c.r = o.r.unwrap_or(c.r);
            c.alpha = o.alpha.unwrap_or(c.alpha);
            c.rank_dropout = o.rank_dropout.unwrap_or(c.rank_dropout);
            c.module_dropout = o.module_dropout.unwrap_or(c.module_dropout);
            c.target_modules = o.target_modules.clone().or(c.target_modules.take());
        },
    }
    /// LoKr: `peft_lokr`.
    Lokr {
        config: peft_lokr::LokrConfig,
        model: peft_lokr::LokrModel<AnyModel<peft_lokr::LokrLinear>>,
        build: |base, config, _| peft_lokr::get_peft_model(base, config),
        load: |base, dir, trainable| peft_lokr::from_pretrained(base, dir, trainable),
        targeted: |m| m.targeted.clone(),
        saved: |m| m.saved_params.clone(),
        merge: |m| m.merge_and_unload(),
        overrides: |c, o| {
            c.r = o.r.unwrap_or(c.r);
            c.alpha = o.alpha.unwrap_or(c.alpha);
            c.rank_dropout = o.rank_dropout.unwrap_or(c.rank_dropout);
            c.module_dropout = o.module_dropout.unwrap_or(c.module_dropout);
            c.decompose_both = o.decompose_both.unwrap_or(c.decompose_both);
            c.decompose_factor = o.decompose_factor.unwrap_or(c.decompose_factor);
            c.rank_dropout_scale = o.rank_dropout_scale.unwrap_or(c.rank_dropout_scale);
            c.target_modules = o.target_modules.clone().or(c.target_modules.take());
        },
    }
    /// VeRA: `peft_vera`.
    Vera {
        config: peft_vera::VeraConfig,
        model: peft_vera::VeraModel<AnyModel<peft_vera::VeraLinear>>,
        build: |base, config, _| peft_vera::get_peft_model(base, config),
        load: |base, dir, trainable| peft_vera::from_pretrained(base, dir, trainable),
        targeted: |m| m.targeted.clone(),
        saved: |m| m.saved_params.clone(),
        merge: |m| m.merge_and_unload(),
        overrides: |c, o| {
            c.r = o.r.unwrap_or(c.r);
            c.projection_prng_key = o.projection_prng_key.unwrap_or(c.projection_prng_key);
            c.save_projection = o.save_projection.unwrap_or(c.save_projection);
            c.vera_dropout = o.vera_dropout.unwrap_or(c.vera_dropout);
            c.d_initial = o.d_initial.unwrap_or(c.d_initial);
            c.target_modules = o.target_modules.clone().or(c.target_modules.take());
        },
    }
    /// AdaLoRA: `peft_adalora`.
    AdaLora {
        config: peft_adalora::AdaLoraConfig,
        model: peft_adalora::AdaLoraModel<AnyModel<peft_adalora::SvdLinear>>,
        build: |base, config, _| peft_adalora::get_peft_model(base, config),
        load: |base, dir, trainable| peft_adalora::from_pretrained(base, dir, trainable),
        targeted: |m| m.targeted.clone(),
        saved: |m| m.saved_params.clone(),
        merge: |m| m.merge_and_unload(),
        overrides: |c, o| {
            // `--r` is the starting rank: PEFT's AdaLoRA ignores `r`.
            c.init_r = o.r.unwrap_or(c.init_r);
            c.target_r = o.target_r.unwrap_or(c.target_r);
            c.total_step = o.total_step.or(c.total_step);
            c.tinit = o.tinit.unwrap_or(c.tinit);
            c.tfinal = o.tfinal.unwrap_or(c.tfinal);
            c.lora_alpha = o.lora_alpha.unwrap_or(c.lora_alpha);
            c.lora_dropout = o.lora_dropout.unwrap_or(c.lora_dropout);
            c.target_modules = o.target_modules.clone().or(c.target_modules.take());
        },
    }
    /// Trainable tokens: `peft_trainable_tokens`.
    TrainableTokens {
        config: peft_trainable_tokens::TrainableTokensConfig,
        model: peft_trainable_tokens::TrainableTokensModel<Base>,
        build: |base, config, _| peft_trainable_tokens::get_peft_model(base, config),
        load: |base, dir, trainable| peft_trainable_tokens::from_pretrained(base, dir, trainable),
        targeted: |m| m.token_targets.iter().map(|t| t.path.clone()).collect(),
        saved: |_| Vec::new(),
        merge: |m| m.merge_and_unload(),
        overrides: |c, o| {
            if let Some(ids) = &o.trainable_token_indices {
                c.token_indices = ids.clone();
            }
        },
    }
    /// BitFit: `peft_bitfit`.
    BitFit {
        config: peft_bitfit::BitFitConfig,
        model: peft_bitfit::BitFitModel<Base>,
        build: |base, config, _| peft_bitfit::get_peft_model(base, config),
        load: |base, dir, trainable| peft_bitfit::from_pretrained(base, dir, trainable),
        targeted: |m| m.biases.clone(),
        saved: |_| Vec::new(),
        merge: |m| AdapterModel::merge_and_unload(m),
        overrides: |_, _| {},
    }
    /// Prompt tuning: `peft_prompt`.
    PromptTuning {
        config: peft_prompt::PromptTuningConfig,
        model: peft_prompt::PromptTuningModel<Base>,
        build: |base, config, tokenizer| match (tokenizer, &config.tokenizer_name_or_path) {
            // PEFT loads the tokenizer of a `TEXT` init from `tokenizer_name_or_path`.
            (None, Some(dir)) if config.prompt_tuning_init_text.is_some() => {
                let tokenizer = Tokenizer::from_dir(Path::new(dir))?;
                peft_prompt::get_peft_model(base, config, Some(&tokenizer))
            }
            (tokenizer, _) => peft_prompt::get_peft_model(base, config, tokenizer),
        },
        load: |base, dir, trainable| peft_prompt::from_pretrained(base, dir, trainable),
        targeted: |m| m.trainable_names(),
        saved: |_| Vec::new(),
        merge: |_| Err(no_merge("prompt tuning")),
        overrides: |c, o| {
            c.prompt.num_virtual_tokens = o.num_virtual_tokens.unwrap_or(c.prompt.num_virtual_tokens);
        },
    }
    /// Prefix tuning: `peft_prefix`.
    PrefixTuning {
        config: peft_prefix::PrefixTuningConfig,
        model: peft_prefix::PrefixTuningModel<Base>,
        build: |base, config, _| peft_prefix::get_peft_model(base, config),
        load: |base, dir, trainable| peft_prefix::from_pretrained(base, dir, trainable),
        targeted: |m| m.trainable_names(),
        saved: |_| Vec::new(),
        merge: |_| Err(no_merge("prefix tuning")),
        overrides: |c, o| {
            c.prompt.num_virtual_tokens = o.num_virtual_tokens.unwrap_or(c.prompt.num_virtual_tokens);
        },
    }
    /// P-tuning: `peft_ptuning`.
    PTuning {
        config: peft_ptuning::PromptEncoderConfig,
        model: peft_ptuning::PTuningModel<Base>,
        build: |base, config, _| peft_ptuning::get_peft_model(base, config),
        load: |base, dir, trainable| peft_ptuning::from_pretrained(base, dir, trainable),
        targeted: |m| m.trainable_names(),
        saved: |_| Vec::new(),
        merge: |_| Err(no_merge("P-tuning")),
        overrides: |c, o| {
            c.prompt.num_virtual_tokens = o.num_virtual_tokens.unwrap_or(c.prompt.num_virtual_tokens);
        },
    }
}

impl PeftModel {
    /// The registry row of its method (`lora` for LoRA adapters, QLoRA's included).
    pub fn method(&self) -> &'static crate::Method {
        crate::by_peft_type(self.peft_type())
    }

    /// The LoRA model inside, for LoRA's own operations (`merge_adapter`, `unload`, …).
    pub fn as_lora(&self) -> Option<&peft_lora::LoraModel<AnyModel<peft_lora::LoraLinear>>> {
        match self {
            Self::Lora(m) => Some(m),
            _ => None,
        }
    }

    /// The LoRA model inside, mutably.
    pub fn as_lora_mut(
        &mut self,
    ) -> Option<&mut peft_lora::LoraModel<AnyModel<peft_lora::LoraLinear>>> {
        match self {
            Self::Lora(m) => Some(m),
            _ => None,
        }
    }

    /// Method-specific lines `peft inspect` prints before the summary.
    pub fn notes(&self) -> Vec<String> {
        match self {
            Self::BitFit(m) => vec![format!("num_param: {}", m.num_param())],
            Self::Lora(m) => {
                let mut notes = Vec::new();
                if m.config.use_dora {
                    notes.push(
                        "use_dora: each targeted layer also trains a magnitude per output \
                         feature (lora_magnitude_vector)"
                            .into(),
                    );
                }
                for t in &m.token_targets {
                    notes.push(format!(
                        "trainable tokens: {} rows of {} train in full ({:?})",
                        t.ids.len(),
                        t.path,
                        t.ids
                    ));
                }
                notes
            }
            _ => Vec::new(),
        }
    }
}
