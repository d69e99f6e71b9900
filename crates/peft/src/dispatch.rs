//! The one `match` over methods. [`adapter_methods!`] takes the list of methods in
//! `src/methods.rs` (each method's config type, model type, and the few things that differ
//! between methods) and writes [`crate::PeftConfig`], [`crate::PeftModel`] and every
//! operation on them, so no other code matches on a method.

/// Writes [`crate::PeftConfig`] and [`crate::PeftModel`] with one variant per listed method,
/// and their operations. Each entry:
///
/// * `config` / `model`: the method crate's config type and its model over [`crate::Base`];
/// * `build(base, config, tokenizer)`: a fresh adapter (`get_peft_model`);
/// * `load(base, dir, is_trainable)`: a saved adapter folder (`from_pretrained`);
/// * `targeted(model)` / `saved(model)`: the modules it adapts and the base parameters it
///   trains in full, for `peft inspect`;
/// * `merge(model)`: the plain model with the adapter folded in, or the error saying why not;
/// * `overrides(config, overrides)`: sets the values of [`crate::ConfigOverrides`] the
///   method's config has.
macro_rules! adapter_methods {
    ($(
        $(#[$doc:meta])*
        $variant:ident {
            config: $config:ty,
            model: $model:ty,
            build: $build:expr,
            load: $load:expr,
            targeted: $targeted:expr,
            saved: $saved:expr,
            merge: $merge:expr,
            overrides: $overrides:expr $(,)?
        }
    )*) => {
        /// Any method's adapter config (PEFT's `PeftConfig`): a variant per method, each
        /// holding that method crate's config type.
        #[derive(Debug, Clone)]
        pub enum PeftConfig {
            $( $(#[$doc])* $variant($config), )*
        }

        $(
            impl From<$config> for PeftConfig {
                fn from(config: $config) -> Self {
                    Self::$variant(config)
                }
            }
        )*

        impl PeftConfig {
            /// The `peft_type` its folders carry.
            pub fn peft_type(&self) -> PeftType {
                match self {
                    $( Self::$variant(_) => <$config as MethodConfig>::PEFT_TYPE, )*
                }
            }

            /// The config as `adapter_config.json` holds it.
            pub fn to_json(&self) -> Result<serde_json::Value> {
                match self {
                    $( Self::$variant(c) => serde_json::to_value(c)
                        .map_err(|e| PeftError::json(<$config as MethodConfig>::NAME, e)), )*
                }
            }

            /// Checks the values, as loading a folder does; `context` names the config.
            pub fn validate(&self, context: &str) -> Result<()> {
                match self {
                    $( Self::$variant(c) => c.validate(context), )*
                }
            }

            /// Sets each value of `overrides` that this method's config has; the others are
            /// left as they are.
            pub fn apply(&mut self, overrides: &ConfigOverrides) {
                match self {
                    $( Self::$variant(c) => {
                        let apply: fn(&mut $config, &ConfigOverrides) = $overrides;
                        apply(c, overrides);
                        if let Some(name) = &overrides.base_model_name_or_path {
                            c.header.base_model_name_or_path = Some(name.clone());
                        }
                    } )*
                }
            }

            /// Parses and validates a config of any method from its JSON (`peft_type` chooses
            /// the type); `context` names it in errors.
            pub fn from_json(value: serde_json::Value, context: &str) -> Result<Self> {
                let peft_type: PeftType = value
                    .get("peft_type")
                    .cloned()
                    .ok_or_else(|| PeftError::config(context, "peft_type", "missing"))
                    .and_then(|t| serde_json::from_value(t).map_err(|e| PeftError::json(context, e)))?;
                $(
                    if peft_type == <$config as MethodConfig>::PEFT_TYPE {
                        let config: $config = serde_json::from_value(value)
                            .map_err(|e| PeftError::json(context, e))?;
                        config.validate(context)?;
                        return Ok(Self::$variant(config));
                    }
                )*
                Err(PeftError::Unsupported(format!(
                    "{context}: no method of this build reads peft_type {peft_type:?}"
                )))
            }

            /// Reads and validates an `adapter_config.json` of any method (`path` is the file or
            /// the adapter folder), choosing the type by its `peft_type`.
            pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
                let path = config_file(path.as_ref());
                let peft_type = peft_core::config::read_peft_type(&path)?;
                $(
                    if peft_type == <$config as MethodConfig>::PEFT_TYPE {
                        return Ok(Self::$variant(<$config as MethodConfig>::from_file(&path)?));
                    }
                )*
                Err(PeftError::Unsupported(format!(
                    "{}: no method of this build reads peft_type {peft_type:?}",
                    path.display()
                )))
            }
        }

        /// A base model with an adapter of any method (PEFT's `PeftModel`): a variant per
        /// method, each holding that method crate's model, so a caller may also take the
        /// typed model out ([`PeftModel::as_lora`]) for the method's own operations.
        // Every variant is a whole model's handles (1.6–1.9 KB); the enum moves a few times a
        // run, so boxing would only add an indirection.
        #[allow(clippy::large_enum_variant)]
        pub enum PeftModel {
            $( $(#[$doc])* $variant($model), )*
        }

        $(
            impl From<$model> for PeftModel {
                fn from(model: $model) -> Self {
                    Self::$variant(model)
                }
            }
        )*

        impl PeftModel {
            /// A fresh adapter of `config`'s method on `base` (PEFT's `get_peft_model`);
            /// `tokenizer` serves prompt tuning's `TEXT` init where the config names none.
            pub fn new(base: Base, config: PeftConfig, tokenizer: Option<&Tokenizer>) -> Result<Self> {
                match config {
                    $( PeftConfig::$variant(config) => {
                        let build: fn(Base, $config, Option<&Tokenizer>) -> Result<$model> = $build;
                        Ok(Self::$variant(build(base, config, tokenizer)?))
                    } )*
                }
            }

            /// The adapter folder `dir` on `base`, its method chosen by its
            /// `adapter_config.json` (PEFT's `PeftModel.from_pretrained`); `is_trainable`
            /// keeps its parameters trainable, as PEFT's argument of that name.
            pub fn load(base: Base, dir: impl AsRef<Path>, is_trainable: bool) -> Result<Self> {
                let dir = dir.as_ref();
                let peft_type = peft_core::config::read_peft_type(config_file(dir))?;
                $(
                    if peft_type == <$config as MethodConfig>::PEFT_TYPE {
                        let load: fn(Base, &Path, bool) -> Result<$model> = $load;
                        return Ok(Self::$variant(load(base, dir, is_trainable)?));
                    }
                )*
                Err(PeftError::Unsupported(format!(
                    "{}: no method of this build reads peft_type {peft_type:?}",
                    dir.display()
                )))
            }

            /// The `peft_type` of its adapter.
            pub fn peft_type(&self) -> PeftType {
                match self {
                    $( Self::$variant(_) => <$config as MethodConfig>::PEFT_TYPE, )*
                }
            }

            /// Sizes and special tokens of the base.
            pub fn spec(&self) -> &ModelSpec {
                match self {
                    $( Self::$variant(m) => m.model().spec(), )*
                }
            }

            /// Every module of the model by its HF path.
            pub fn modules(&self) -> Vec<ModuleInfo> {
                match self {
                    $( Self::$variant(m) => m.model().modules(), )*
                }
            }

            /// The device the weights live on.
            pub fn device(&self) -> Device {
                match self {
                    $( Self::$variant(m) => m.model().device(), )*
                }
            }

            /// Logits `[batch, seq, vocab]` for `input`, continuing `cache` where given.
            pub fn forward(&self, input: ModelInput, cache: Option<&mut KvCache>) -> Result<Tensor<3>> {
                match self {
                    $( Self::$variant(m) => m.model().forward(input, cache), )*
                }
            }

            /// KV-cached generation of a left-padded batch (see [`peft_models::generate()`]);
            /// `on_token(row, token)` sees each token as it is chosen.
            pub fn generate(
                &self,
                prompts: &[Vec<u32>],
                options: &GenerateOptions,
                on_token: impl FnMut(usize, u32),
            ) -> Result<Vec<Vec<u32>>> {
                match self {
                    $( Self::$variant(m) => peft_models::generate(m.model(), prompts, options, on_token), )*
                }
            }

            /// Hugging Face names of the parameters that train.
            pub fn trainable_names(&self) -> Vec<String> {
                match self {
                    $( Self::$variant(m) => m.trainable_names(), )*
                }
            }

            /// PEFT's `print_trainable_parameters()` numbers.
            pub fn trainable_summary(&self) -> TrainableSummary {
                match self {
                    $( Self::$variant(m) => m.trainable_summary(), )*
                }
            }

            /// The adapter's config as `adapter_config.json` holds it.
            pub fn config_json(&self) -> Result<serde_json::Value> {
                match self {
                    $( Self::$variant(m) => m.config_json(), )*
                }
            }

            /// Writes the adapter folder in PEFT's format (PEFT's `save_pretrained`).
            pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
                match self {
                    $( Self::$variant(m) => m.save_pretrained(dir.as_ref()), )*
                }
            }

            /// The modules (or, for prompt learning, the parameters) the adapter trains.
            pub fn targeted(&self) -> Vec<String> {
                match self {
                    $( Self::$variant(m) => {
                        let targeted: fn(&$model) -> Vec<String> = $targeted;
                        targeted(m)
                    } )*
                }
            }

            /// Base parameters trained in full and saved with the adapter (`modules_to_save`).
            pub fn saved_params(&self) -> Vec<String> {
                match self {
                    $( Self::$variant(m) => {
                        let saved: fn(&$model) -> Vec<String> = $saved;
                        saved(m)
                    } )*
                }
            }

            /// The plain model with the adapter folded into its weights (PEFT's
            /// `merge_and_unload`); an error for methods that have nothing to merge.
            pub fn merge_and_unload(self) -> Result<Base> {
                match self {
                    $( Self::$variant(m) => {
                        let merge: fn($model) -> Result<Base> = $merge;
                        merge(m)
                    } )*
                }
            }

            /// Writes the model with its adapter merged as a Hugging Face checkpoint, layer by
            /// layer, reading the base's other files from `base_dir`.
            pub fn save_merged(&self, base_dir: &Path, out: &Path, options: &SaveOptions) -> Result<()> {
                let method = self.method();
                if !method.merges {
                    return Err(no_merge(method.label));
                }
                match self {
                    $( Self::$variant(m) => peft_models::save_merged_with(m.model(), base_dir, out, options), )*
                }
            }

            /// Runs `visitor` on the typed adapter model inside: how a generic routine (a
            /// training loop, a benchmark) takes any method.
            pub fn visit<V: AdapterVisitor>(self, visitor: V) -> V::Output {
                match self {
                    $( Self::$variant(m) => visitor.visit(m), )*
                }
            }
        }
    };
}

pub(crate) use adapter_methods;
