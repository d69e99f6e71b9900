//! The adapter methods the command line knows, in one registry ([`METHODS`]): how each loads a
//! saved adapter, shows what a config targets, and trains from `peft train`'s flags. Commands
//! look a method up by PEFT type or by name and then run whatever it loaded through
//! [`Runnable`], so no command matches on method names. A new method is one entry here.

use peft_core::MethodConfig;
use std::path::Path;

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor};
use peft_core::{
    AdapterModel, CausalLm, ModelInput, ModelSpec, ModuleInfo, NoAdapter, PeftType, TargetModules,
    TrainableSummary,
};
use peft_models::{AnyModel, GenerateOptions, SaveOptions, Tokenizer};

use crate::train::{RunContext, run};

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

/// What [`Runnable`] needs of each loaded type: the model inside, and how it merges.
trait Loaded {
    type Model: CausalLm;
    /// The model to run.
    fn inner(&self) -> &Self::Model;
    /// The method's name where its adapter cannot be merged (it lives outside the weights).
    const NO_MERGE: Option<&'static str> = None;
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
        if let Some(method) = T::NO_MERGE {
            bail!("{method} has no weights to merge (run with --adapter alone)");
        }
        Ok(peft_models::save_merged_with(
            self.inner(),
            base_dir,
            out,
            options,
        )?)
    }
    fn merge_and_unload(self: Box<Self>) -> Result<AnyModel<NoAdapter>> {
        if let Some(method) = T::NO_MERGE {
            bail!("--merge: {method} has no weights to merge (run with --adapter alone)");
        }
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

/// A method's model type on the CLI's models, loaded through [`AdapterModel`]; `no_merge`
/// names a method whose adapter stays outside the weights.
macro_rules! loaded_adapter {
    ($ty:ty) => {
        impl Loaded for $ty {
            type Model = <$ty as AdapterModel>::Model;
            fn inner(&self) -> &Self::Model {
                AdapterModel::model(self)
            }
            fn unload(self) -> peft_core::Result<AnyModel<NoAdapter>> {
                AdapterModel::merge_and_unload(self)
            }
        }
    };
    ($ty:ty, no_merge = $name:literal) => {
        impl Loaded for $ty {
            type Model = <$ty as AdapterModel>::Model;
            fn inner(&self) -> &Self::Model {
                AdapterModel::model(self)
            }
            const NO_MERGE: Option<&'static str> = Some($name);
            fn unload(self) -> peft_core::Result<AnyModel<NoAdapter>> {
                Err(peft_core::PeftError::Unsupported(format!(
                    "{} has no weights to merge",
                    $name
                )))
            }
        }
    };
}

loaded_adapter!(peft_lora::LoraModel<AnyModel<peft_lora::LoraLinear>>);
loaded_adapter!(peft_ia3::Ia3Model<AnyModel<peft_ia3::Ia3Linear>>);
loaded_adapter!(peft_bitfit::BitFitModel<AnyModel<NoAdapter>>);
loaded_adapter!(
    peft_prompt::PromptTuningModel<AnyModel<NoAdapter>>,
    no_merge = "prompt tuning"
);
loaded_adapter!(
    peft_prefix::PrefixTuningModel<AnyModel<NoAdapter>>,
    no_merge = "prefix tuning"
);
loaded_adapter!(
    peft_ptuning::PTuningModel<AnyModel<NoAdapter>>,
    no_merge = "P-tuning"
);

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

/// The base model the commands load.
type Base = AnyModel<NoAdapter>;

/// Loads a saved adapter folder onto a base, for inference.
type LoadFn = fn(Base, &Path) -> peft_core::Result<Box<dyn Runnable>>;

/// A fresh adapter from an optional `adapter_config.json` (and a tokenizer for text inits).
type InspectFn = fn(Base, Option<&Path>, Option<&Tokenizer>) -> Result<Inspected>;

/// One adapter method of the command line.
pub(crate) struct Method {
    /// `--method` name (`peft train`, `peft inspect`).
    pub name: &'static str,
    /// The `peft_type` of the adapter folders it writes and reads.
    pub peft_type: PeftType,
    /// A saved adapter folder onto `base`, for inference.
    pub load: LoadFn,
    /// A fresh adapter from an `adapter_config.json` (or the method's default config).
    pub inspect: InspectFn,
    /// `peft train` with this method.
    pub train: fn(Base, &RunContext<'_>) -> Result<()>,
    /// Whether training writes a merged model (prompt learning keeps its tokens outside).
    pub merges: bool,
    /// Whether training quantises the base to 4-bit by default (QLoRA: NF4 unless
    /// `--load-4bit` says otherwise).
    pub loads_4bit: bool,
}

/// Every method, `lora` first (a LoRA folder loads as `lora`; `qlora` trains the paper's preset
/// over a 4-bit base and saves a LoRA folder).
pub(crate) const METHODS: [Method; 7] = [
    Method {
        name: "lora",
        peft_type: PeftType::Lora,
        load: |base, dir| Ok(Box::new(peft_lora::from_pretrained(base, dir, false)?)),
        inspect: |base, config, _| inspect_lora(base, lora_config(config, false)?),
        train: |base, ctx| train_lora(base, ctx, false),
        merges: true,
        loads_4bit: false,
    },
    Method {
        name: "qlora",
        peft_type: PeftType::Lora,
        load: |base, dir| Ok(Box::new(peft_lora::from_pretrained(base, dir, false)?)),
        inspect: |base, config, _| inspect_lora(base, lora_config(config, true)?),
        train: |base, ctx| train_lora(base, ctx, true),
        merges: true,
        loads_4bit: true,
    },
    Method {
        name: "ia3",
        peft_type: PeftType::Ia3,
        load: |base, dir| Ok(Box::new(peft_ia3::from_pretrained(base, dir, false)?)),
        inspect: |base, config, _| {
            let ia3 = peft_ia3::get_peft_model(
                base,
                config_or_default(config, |p| peft_ia3::Ia3Config::from_file(p))?,
            )?;
            Ok(Inspected {
                targeted: ia3.targeted.clone(),
                saved: ia3.saved_params.clone(),
                notes: Vec::new(),
                summary: ia3.trainable_summary(),
                model: Box::new(ia3),
            })
        },
        train: |base, ctx| {
            let mut config = config_or_default(ctx.args.config.as_deref(), |p| {
                peft_ia3::Ia3Config::from_file(p)
            })?;
            config.target_modules = ctx.targets().or(config.target_modules);
            config.header.base_model_name_or_path = Some(ctx.model_dir.display().to_string());
            run(peft_ia3::get_peft_model(base, config)?, ctx)
        },
        merges: true,
        loads_4bit: false,
    },
    Method {
        name: "bitfit",
        peft_type: PeftType::BitFit,
        load: |base, dir| {
            let bitfit = peft_bitfit::from_pretrained(base, dir, false)?;
            Ok(Box::new(bitfit.merge_and_unload()))
        },
        inspect: |base, config, _| {
            let bitfit = peft_bitfit::get_peft_model(
                base,
                config_or_default(config, |p| {
                    peft_core::config::read_config::<peft_bitfit::BitFitConfig>(p)
                })?,
            )?;
            Ok(Inspected {
                targeted: bitfit.biases.clone(),
                saved: Vec::new(),
                notes: vec![format!("num_param: {}", bitfit.num_param())],
                summary: bitfit.trainable_summary(),
                model: Box::new(bitfit),
            })
        },
        train: |base, ctx| {
            let mut config = config_or_default(ctx.args.config.as_deref(), |p| {
                peft_core::config::read_config::<peft_bitfit::BitFitConfig>(p)
            })?;
            config.header.base_model_name_or_path = Some(ctx.model_dir.display().to_string());
            run(peft_bitfit::get_peft_model(base, config)?, ctx)
        },
        merges: true,
        loads_4bit: false,
    },
    Method {
        name: "prompt",
        peft_type: PeftType::PromptTuning,
        load: |base, dir| Ok(Box::new(peft_prompt::from_pretrained(base, dir, false)?)),
        inspect: |base, config, tokenizer| {
            let config =
                config_or_default(config, |p| peft_prompt::PromptTuningConfig::from_file(p))?;
            inspected(peft_prompt::get_peft_model(base, config, tokenizer)?)
        },
        train: |base, ctx| {
            let mut config = config_or_default(ctx.args.config.as_deref(), |p| {
                peft_prompt::PromptTuningConfig::from_file(p)
            })?;
            if let Some(n) = ctx.args.num_virtual_tokens {
                config.prompt.num_virtual_tokens = n;
            }
            config.header.base_model_name_or_path = Some(ctx.model_dir.display().to_string());
            run(
                peft_prompt::get_peft_model(base, config, Some(ctx.tokenizer))?,
                ctx,
            )
        },
        merges: false,
        loads_4bit: false,
    },
    Method {
        name: "prefix",
        peft_type: PeftType::PrefixTuning,
        load: |base, dir| Ok(Box::new(peft_prefix::from_pretrained(base, dir, false)?)),
        inspect: |base, config, _| {
            let config =
                config_or_default(config, |p| peft_prefix::PrefixTuningConfig::from_file(p))?;
            inspected(peft_prefix::get_peft_model(base, config)?)
        },
        train: |base, ctx| {
            let mut config = config_or_default(ctx.args.config.as_deref(), |p| {
                peft_prefix::PrefixTuningConfig::from_file(p)
            })?;
            if let Some(n) = ctx.args.num_virtual_tokens {
                config.prompt.num_virtual_tokens = n;
            }
            config.header.base_model_name_or_path = Some(ctx.model_dir.display().to_string());
            run(peft_prefix::get_peft_model(base, config)?, ctx)
        },
        merges: false,
        loads_4bit: false,
    },
    Method {
        name: "ptuning",
        peft_type: PeftType::PTuning,
        load: |base, dir| Ok(Box::new(peft_ptuning::from_pretrained(base, dir, false)?)),
        inspect: |base, config, _| {
            let config =
                config_or_default(config, |p| peft_ptuning::PromptEncoderConfig::from_file(p))?;
            inspected(peft_ptuning::get_peft_model(base, config)?)
        },
        train: |base, ctx| {
            let mut config = config_or_default(ctx.args.config.as_deref(), |p| {
                peft_ptuning::PromptEncoderConfig::from_file(p)
            })?;
            if let Some(n) = ctx.args.num_virtual_tokens {
                config.prompt.num_virtual_tokens = n;
            }
            config.header.base_model_name_or_path = Some(ctx.model_dir.display().to_string());
            run(peft_ptuning::get_peft_model(base, config)?, ctx)
        },
        merges: false,
        loads_4bit: false,
    },
];

/// The method called `name` (`--method`), or an error listing them.
pub(crate) fn by_name(name: &str) -> Result<&'static Method> {
    METHODS.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
        anyhow::anyhow!(
            "--method {name}: unknown method (expected one of {})",
            names.join(", ")
        )
    })
}

/// The method that reads adapter folders of `peft_type`.
pub(crate) fn by_peft_type(peft_type: PeftType) -> &'static Method {
    METHODS
        .iter()
        .find(|m| m.peft_type == peft_type)
        .unwrap_or(&METHODS[0])
}

/// A prompt-learning model's inspection: it trains its own parameters, no base module.
fn inspected<A: AdapterModel + Runnable + 'static>(adapter: A) -> Result<Inspected> {
    Ok(Inspected {
        targeted: adapter.trainable_names(),
        saved: Vec::new(),
        notes: Vec::new(),
        summary: adapter.trainable_summary(),
        model: Box::new(adapter),
    })
}

/// The LoRA config of `--config`, or PEFT's default (QLoRA: the paper's preset).
fn lora_config(path: Option<&Path>, qlora: bool) -> Result<peft_lora::LoraConfig> {
    match path {
        None if qlora => Ok(peft_qlora::qlora_preset()),
        _ => config_or_default(path, |p| peft_lora::LoraConfig::from_file(p)),
    }
}

/// The config `--config` names, read by `read`, or the method's default.
fn config_or_default<C: Default>(
    path: Option<&Path>,
    read: impl FnOnce(&Path) -> peft_core::Result<C>,
) -> Result<C> {
    Ok(match path {
        Some(p) => read(p)?,
        None => C::default(),
    })
}

fn inspect_lora(base: AnyModel<NoAdapter>, config: peft_lora::LoraConfig) -> Result<Inspected> {
    let lora = peft_lora::get_peft_model(base, config)?;
    Ok(Inspected {
        targeted: lora.targeted.clone(),
        saved: lora.saved_params.clone(),
        notes: Vec::new(),
        summary: lora.trainable_summary(),
        model: Box::new(lora),
    })
}

/// LoRA (or QLoRA's preset) with `peft train`'s `--r`, `--lora-alpha`, `--lora-dropout` and
/// `--target-modules` over the config.
fn train_lora(base: AnyModel<NoAdapter>, ctx: &RunContext<'_>, qlora: bool) -> Result<()> {
    let args = ctx.args;
    let mut config = lora_config(args.config.as_deref(), qlora)?;
    config.r = args.r.unwrap_or(config.r);
    config.lora_alpha = args.lora_alpha.unwrap_or(config.lora_alpha);
    config.lora_dropout = args.lora_dropout.unwrap_or(config.lora_dropout);
    config.target_modules = ctx.targets().or(config.target_modules);
    config.header.base_model_name_or_path = Some(ctx.model_dir.display().to_string());
    run(peft_lora::get_peft_model(base, config)?, ctx)
}

impl RunContext<'_> {
    /// `--target-modules` as PEFT's `target_modules` (`all-linear` alone is the shorthand).
    pub(crate) fn targets(&self) -> Option<TargetModules> {
        self.args
            .target_modules
            .clone()
            .map(|t| match t.as_slice() {
                [one] if one == "all-linear" => TargetModules::Pattern(one.clone()),
                _ => TargetModules::List(t),
            })
    }
}
