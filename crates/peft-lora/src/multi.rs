//! Several named LoRA adapters on one base model, as PEFT's `PeftModel` holds them:
//! `load_adapter(dir, adapter_name)`, `set_adapter`, `delete_adapter`, `disable_adapter()`,
//! `add_weighted_adapter`, `adapter_names` per batch row, `hotswap_adapter`, and a multi-adapter
//! `save_pretrained` (the adapter called `default` at the top of the folder, every other one in
//! a subfolder of its name).
//!
//! Each adapted layer holds an [`AdapterSet`] of [`LoraLinear`] pairs; the base stays frozen and
//! shared. This model is for inference and serving: adapters train one at a time through
//! [`LoraModel`](crate::LoraModel) (as PEFT trains the active adapter), and an adapter with
//! `modules_to_save` or trained biases is refused here (its full-size copies would not be
//! shared by the other adapters).
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_lora::MultiLoraModel;
//!
//! let base = peft_models::load("tests/fixtures/models/bloom-tiny", &Device::flex()).unwrap();
//! let mut model = MultiLoraModel::new(base).unwrap();
//! model.load_adapter("a", "adapters/a").unwrap();
//! model.load_adapter("b", "adapters/b").unwrap();
//! model.set_adapter(&["a"]).unwrap();
//! // One batch, one adapter per row ("__base__": no adapter).
//! model.set_row_adapters(Some(&["a", "b", "__base__"])).unwrap();
//! ```

use peft_core::MethodConfig;
use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Tensor;
use peft_core::adapter_files::{CONFIG_NAME, WEIGHTS_NAME, save_adapter};
use peft_core::params::{ParamUpdate, map_params};
use peft_core::tuner::Target;
use peft_core::{
    AdaptableEmbedding, AdaptableLinear, AdapterSet, BASE_ADAPTER, BaseLinear, CausalLm,
    HostTensor, ModelInput, NoAdapter, PeftError, Result, TargetModules, TensorStore,
};
use peft_tensors::layout::burn_linear_weight;

use crate::combine::{Combination, CombinationType, WeightedPair, combine_layer};
use crate::config::{LoraBias, LoraConfig};
use crate::layer::LoraLinear;
use crate::model::{
    LoraBase, Source, init_of, magnitude_key, make_pair, peft_keys, select_targets, torch_layout,
};

/// The adapter type of every layer of a [`MultiLoraModel`].
pub type LoraSet = AdapterSet<LoraLinear>;

/// The name PEFT gives the first adapter, and the one saved at the top of a folder.
pub const DEFAULT_ADAPTER: &str = "default";

/// What a [`MultiLoraModel`] needs of its model: any architecture holding [`LoraSet`]s.
pub trait MultiLoraBase: CausalLm<Adapter = LoraSet, WithAdapter<LoraSet> = Self> {}
impl<M: CausalLm<Adapter = LoraSet, WithAdapter<LoraSet> = M>> MultiLoraBase for M {}

/// One adapter of a [`MultiLoraModel`]: its config and where it sits.
#[derive(Debug, Clone)]
pub struct NamedAdapter {
    /// The name it is held under.
    pub name: String,
    /// Its config (as loaded, or as made by `add_weighted_adapter`).
    pub config: LoraConfig,
    /// HF paths of the layers it adapts.
    pub targeted: Vec<String>,
    /// The embeddings among them.
    pub embedding_targets: Vec<String>,
}

/// A base model with any number of named LoRA adapters.
#[derive(Debug)]
pub struct MultiLoraModel<M> {
    /// The model; every adapted layer holds a [`LoraSet`].
    pub model: M,
    adapters: Vec<NamedAdapter>,
    active: Vec<String>,
    rows: Option<Vec<Option<String>>>,
    /// Whether the active adapters are folded into the base (`merge_adapter`).
    merged: bool,
}

impl MultiLoraModel<()> {
    /// A frozen `base` ready to take adapters (none loaded, none active).
    pub fn new<B: LoraBase>(base: B) -> Result<MultiLoraModel<B::WithAdapter<LoraSet>>> {
        let base = map_params(base, |_, _| ParamUpdate::Trainable(false));
        let model = base.map_layers(
            &mut |_, layer: AdaptableLinear<NoAdapter>| Ok(layer.with_adapter(None)),
            &mut |_, layer: AdaptableEmbedding<NoAdapter>| Ok(layer.with_adapter(None)),
        )?;
        Ok(MultiLoraModel {
            model,
            adapters: Vec::new(),
            active: Vec::new(),
            rows: None,
            merged: false,
        })
    }

    /// A model holding a PEFT multi-adapter folder: `dir` itself as `default` (when it holds an
    /// adapter) and every subfolder holding an `adapter_config.json` under the subfolder's name,
    /// in name order; `default` (or else the first) is active.
    pub fn from_pretrained_folder<B: LoraBase>(
        base: B,
        dir: impl AsRef<Path>,
    ) -> Result<MultiLoraModel<B::WithAdapter<LoraSet>>>
    where
        B::WithAdapter<LoraSet>: MultiLoraBase,
    {
        let dir = dir.as_ref();
        let mut model = MultiLoraModel::new(base)?;
        if dir.join(CONFIG_NAME).is_file() {
            model.load_adapter(DEFAULT_ADAPTER, dir)?;
        }
        let mut subfolders: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| PeftError::io(dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.join(CONFIG_NAME).is_file())
            .collect();
        subfolders.sort();
        for sub in subfolders {
            let name = sub
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            model.load_adapter(&name, &sub)?;
        }
        if model.adapters.is_empty() {
            return Err(PeftError::io(
                dir.join(CONFIG_NAME),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no adapter in this folder"),
            ));
        }
        let first = model.adapters[0].name.clone();
        model.set_adapter(&[first.as_str()])?;
        Ok(model)
    }
}

impl<M: MultiLoraBase> MultiLoraModel<M> {
    /// Names of the adapters held, in the order they were added.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|a| a.name.as_str()).collect()
    }

    /// The adapter called `name`.
    pub fn adapter(&self, name: &str) -> Result<&NamedAdapter> {
        self.adapters
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| self.unknown(name))
    }

    /// Names of the active adapters, in activation order (PEFT's `active_adapters`).
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    fn unknown(&self, name: &str) -> PeftError {
        PeftError::UnknownAdapter {
            name: name.to_string(),
            loaded: if self.adapters.is_empty() {
                "none".into()
            } else {
                self.adapter_names().join(", ")
            },
        }
    }

    /// Loads the PEFT LoRA folder `dir` as adapter `name` (PEFT's `load_adapter(dir,
    /// adapter_name=name)`); not activated. Replaces nothing: a name already held is refused
    /// (see [`hotswap_adapter`](Self::hotswap_adapter)). The model is unchanged on error.
    pub fn load_adapter(&mut self, name: &str, dir: impl AsRef<Path>) -> Result<()> {
        self.check_new_name(name)?;
        let (entry, pairs) = self.read_adapter(name, dir.as_ref())?;
        self.install(entry, pairs)
    }

    /// Adds a freshly initialised adapter `name` from `config` (PEFT's `add_adapter`).
    pub fn add_adapter(&mut self, name: &str, config: LoraConfig) -> Result<()> {
        self.check_new_name(name)?;
        let entry = self.entry(name, config)?;
        let source = Source::Init(init_of(&entry.config)?);
        let pairs = self.make_pairs(&entry, &source)?;
        self.install(entry, pairs)
    }

    /// Replaces the weights of the loaded adapter `name` with those of the folder `dir` in
    /// place, without rebuilding the model (PEFT's `hotswap_adapter`): the new adapter must
    /// target the same layers with the same ranks. Its scaling (`lora_alpha`) may differ.
    pub fn hotswap_adapter(&mut self, name: &str, dir: impl AsRef<Path>) -> Result<()> {
        self.check_unmerged("hot-swap an adapter")?;
        let dir = dir.as_ref();
        let old = self.adapter(name)?.clone();
        let (entry, pairs) = self.read_adapter(name, dir)?;
        if entry.targeted != old.targeted {
            return Err(PeftError::AdapterMismatch(format!(
                "{}: hot-swapping `{name}` needs the same target layers ({} before, {} now)",
                dir.display(),
                old.targeted.len(),
                entry.targeted.len()
            )));
        }
        let ranks = self.ranks(name)?;
        for (path, pair) in &pairs {
            if ranks.get(path) != Some(&pair.rank()) {
                return Err(PeftError::AdapterMismatch(format!(
                    "{}: hot-swapping `{name}` needs the same ranks; `{path}` has rank {} here \
                     and {} in the new adapter",
                    dir.display(),
                    ranks.get(path).copied().unwrap_or(0),
                    pair.rank()
                )));
            }
        }
        let slot = self.adapters.iter().position(|a| a.name == name);
        let mut pairs = pairs;
        self.update_layers(|path, set| {
            if let Some(pair) = pairs.remove(path) {
                set.get_or_insert_with(LoraSet::default).insert(name, pair);
            }
        })?;
        if let Some(i) = slot {
            self.adapters[i] = entry;
        }
        Ok(())
    }

    /// Drops adapter `name` everywhere (PEFT's `delete_adapter`); it leaves the active set.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.check_unmerged("delete an adapter")?;
        self.adapter(name)?;
        self.update_layers(|_, set| {
            if let Some(s) = set {
                s.remove(name);
                if s.adapters.is_empty() {
                    *set = None;
                }
            }
        })?;
        self.adapters.retain(|a| a.name != name);
        self.active.retain(|a| a != name);
        // Rows that used it fall back to the base model, in every layer alike.
        let rows = self
            .rows
            .take()
            .map(|rows| rows.into_iter().map(|r| r.filter(|n| n != name)).collect());
        self.apply_rows(rows)
    }

    /// Makes `names` the active adapters, in that order (PEFT's `set_adapter`; several active
    /// adapters add their updates). Every name must be held.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        self.check_unmerged("change the active adapters")?;
        for name in names {
            self.adapter(name)?;
        }
        self.apply_active(names.iter().map(|n| n.to_string()).collect())
    }

    /// Runs `f` with every adapter switched off, then restores the active set and any row
    /// assignment (PEFT's `with model.disable_adapter():`).
    pub fn with_adapters_disabled<R>(&mut self, f: impl FnOnce(&M) -> R) -> Result<R> {
        self.check_unmerged("disable the adapters")?;
        let active = std::mem::take(&mut self.active);
        let rows = self.rows.take();
        self.apply_rows(None)?;
        self.apply_active(Vec::new())?;
        let out = f(&self.model);
        self.apply_active(active)?;
        self.apply_rows(rows)?;
        Ok(out)
    }

    /// Makes `names` (all held) the active set, in every layer.
    fn apply_active(&mut self, names: Vec<String>) -> Result<()> {
        self.update_layers(|_, set| {
            if let Some(s) = set {
                s.set_active(&names);
            }
        })?;
        self.active = names;
        Ok(())
    }

    /// Makes `rows` (names all held) the row assignment, in every layer.
    fn apply_rows(&mut self, rows: Option<Vec<Option<String>>>) -> Result<()> {
        let shared = rows.clone().map(std::sync::Arc::new);
        self.update_layers(|_, set| {
            if let Some(s) = set {
                s.rows = shared.clone();
            }
        })?;
        self.rows = rows;
        Ok(())
    }

    /// Assigns an adapter to each batch row for the following forward passes (PEFT's
    /// `adapter_names=`; [`BASE_ADAPTER`] = no adapter), or clears the assignment (`None`:
    /// the active adapters again). Every batch run must then have `rows.len()` rows.
    pub fn set_row_adapters(&mut self, rows: Option<&[&str]>) -> Result<()> {
        if rows.is_some() {
            self.check_unmerged("assign adapters per row")?;
        }
        let rows: Option<Vec<Option<String>>> = match rows {
            None => None,
            Some(rows) => Some(
                rows.iter()
                    .map(|&n| {
                        if n == BASE_ADAPTER {
                            Ok(None)
                        } else {
                            self.adapter(n).map(|_| Some(n.to_string()))
                        }
                    })
                    .collect::<Result<_>>()?,
            ),
        };
        self.apply_rows(rows)
    }

    /// The row assignment set by [`set_row_adapters`](Self::set_row_adapters).
    pub fn row_adapters(&self) -> Option<&[Option<String>]> {
        self.rows.as_deref()
    }

    /// Logits `[batch, seq, vocab]` with adapter `rows[i]` on row `i` (PEFT's
    /// `model(..., adapter_names=rows)`); the assignment is cleared afterwards.
    pub fn forward_rows(&mut self, input: ModelInput, rows: &[&str]) -> Result<Tensor<3>> {
        let batch = input.input_ids.dims()[0];
        if rows.len() != batch {
            return Err(PeftError::InvalidInput(format!(
                "{} adapter names for a batch of {batch} rows",
                rows.len()
            )));
        }
        self.set_row_adapters(Some(rows))?;
        let out = self.model.forward(input, None);
        self.set_row_adapters(None)?;
        out
    }

    /// Folds the active adapters into the base weights (PEFT's `merge_adapter`); the forward
    /// pass then computes the base alone until [`unmerge_adapter`](Self::unmerge_adapter).
    pub fn merge_adapter(&mut self) -> Result<()> {
        self.check_unmerged("merge again")?;
        // On a clone: the model is unchanged if a layer fails the finiteness check.
        self.model = peft_core::tuner::merge_layers(self.model.clone())?;
        self.merged = true;
        Ok(())
    }

    /// Undoes [`merge_adapter`](Self::merge_adapter) (with the same adapters active).
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        self.model = peft_core::tuner::unmerge_layers(self.model.clone())?;
        self.merged = false;
        Ok(())
    }

    /// Folds the active adapters into the base and drops every adapter (PEFT's
    /// `merge_and_unload()` after `set_adapter(names)`).
    pub fn merge_and_unload(self) -> Result<M::WithAdapter<NoAdapter>> {
        peft_core::tuner::merge_and_unload(self.model)
    }

    /// Adapter `name`'s tensors under PEFT's file keys and layout (`lora_A.weight: [r, in]`,
    /// `lora_B.weight: [out, r]`; `lora_embedding_A: [r, num]`, `lora_embedding_B: [dim, r]`).
    pub fn adapter_tensors(&self, name: &str) -> Result<BTreeMap<String, HostTensor>> {
        let entry = self.adapter(name)?;
        let mut out = BTreeMap::new();
        for (path, pair) in self.pairs_of(name)? {
            let is_embedding = entry.embedding_targets.contains(&path);
            let (a_key, b_key) = peft_keys(&path, is_embedding);
            let (a, a_shape) = torch_layout(pair.lora_a.val());
            let (b, b_shape) = torch_layout(pair.lora_b.val());
            out.insert(a_key, HostTensor::from_f32(a_shape.to_vec(), &a));
            out.insert(b_key, HostTensor::from_f32(b_shape.to_vec(), &b));
            if let Some(dora) = &pair.dora {
                let m = dora.magnitude.val();
                let values = m
                    .to_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .map_err(|e| {
                        PeftError::InvalidInput(format!("magnitude of `{path}`: {e:?}"))
                    })?;
                out.insert(
                    magnitude_key(&path),
                    HostTensor::from_f32(vec![values.len()], &values),
                );
            }
        }
        Ok(out)
    }

    /// PEFT's `save_pretrained(dir)` for several adapters: `default` in `dir`, every other
    /// adapter in `dir/<name>/` (each folder written atomically). `names` picks which (PEFT's
    /// `selected_adapters`); `None` saves all.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>, names: Option<&[&str]>) -> Result<()> {
        let dir = dir.as_ref();
        let chosen: Vec<&str> = match names {
            Some(n) => n.to_vec(),
            None => self.adapter_names(),
        };
        for name in chosen {
            let folder = if name == DEFAULT_ADAPTER {
                dir.to_path_buf()
            } else {
                dir.join(name)
            };
            self.save_adapter_folder(name, &folder)?;
        }
        Ok(())
    }

    /// Writes adapter `name` alone as a PEFT adapter folder `dir` (config and weights, each
    /// written atomically).
    pub fn save_adapter_folder(&self, name: &str, dir: impl AsRef<Path>) -> Result<()> {
        let entry = self.adapter(name)?;
        save_adapter(dir.as_ref(), &entry.config, &self.adapter_tensors(name)?)
    }

    /// PEFT's `add_weighted_adapter(adapters, weights, adapter_name, combination_type, ...)`:
    /// a new adapter `name` combining `adapters` with `weights` (see [`crate::combine`]),
    /// targeting every layer any of them targets; not activated.
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        options: &Combination,
    ) -> Result<()> {
        self.check_new_name(name)?;
        if adapters.is_empty() || adapters.len() != weights.len() {
            return Err(PeftError::InvalidInput(format!(
                "add_weighted_adapter: {} adapters and {} weights (one weight per adapter, at \
                 least one)",
                adapters.len(),
                weights.len()
            )));
        }
        let entries: Vec<NamedAdapter> = adapters
            .iter()
            .map(|n| self.adapter(n).cloned())
            .collect::<Result<_>>()?;
        if let Some(dora) = entries.iter().find(|e| e.config.use_dora) {
            // PEFT 0.21.2 combines the pairs and gives the new adapter a fresh magnitude
            // (‖W‖, computed before the combined pairs are written): not what was trained.
            return Err(PeftError::Unsupported(format!(
                "add_weighted_adapter: `{}` is a DoRA adapter; its magnitudes cannot be \
                 combined with the low-rank pairs (merge it into the base instead)",
                dora.name
            )));
        }
        if options.svd_rank == Some(0) {
            return Err(PeftError::config(
                "add_weighted_adapter",
                "svd_rank",
                "must be at least 1",
            ));
        }
        let mut options = options.clone();
        if adapters.len() == 1 {
            // PEFT: one adapter can only be combined linearly.
            options.combination_type = CombinationType::Linear;
        }
        let kind = options.combination_type;
        // The largest rank each adapter uses anywhere (PEFT allocates by it).
        let max_ranks: Vec<usize> = entries
            .iter()
            .map(|e| {
                e.config
                    .rank_pattern
                    .values()
                    .fold(e.config.r, |m, &r| m.max(r))
            })
            .collect();
        let new_rank = if kind == CombinationType::Cat {
            max_ranks.iter().sum()
        } else if kind.is_svd() {
            options
                .svd_rank
                .unwrap_or_else(|| max_ranks.iter().copied().max().unwrap_or(1))
        } else {
            if max_ranks.iter().any(|&r| r != max_ranks[0]) {
                return Err(PeftError::config(
                    "add_weighted_adapter",
                    "adapters",
                    format!(
                        "`{}` needs adapters of one rank; got ranks {max_ranks:?}",
                        kind.name()
                    ),
                ));
            }
            max_ranks[0]
        };
        let target_modules = union_targets(&entries, &self.model.spec().model_type)?;
        let config = LoraConfig {
            r: new_rank,
            lora_alpha: new_rank as f64,
            target_modules: Some(target_modules),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            ..entries[0].config.clone()
        };
        let entry = self.entry(name, config)?;

        let all_pairs: Vec<BTreeMap<String, LoraLinear>> = adapters
            .iter()
            .map(|n| self.pairs_of(n))
            .collect::<Result<_>>()?;
        let scaling = entry.config.scaling(new_rank, new_rank as f64);
        let device = self.model.device();
        let mut rng = crate::combine::rng(options.seed);
        let mut pairs = BTreeMap::new();
        for path in &entry.targeted {
            let mut weighted = Vec::new();
            let mut dims = None;
            for (pairs_of, weight) in all_pairs.iter().zip(weights) {
                let Some(pair) = pairs_of.get(path) else {
                    continue;
                };
                let (a, [r, d_in]) = torch_layout(pair.lora_a.val());
                let (b, [d_out, _]) = torch_layout(pair.lora_b.val());
                dims = Some((d_in, d_out));
                weighted.push(WeightedPair {
                    a,
                    b,
                    r,
                    scaling: pair.scaling,
                    weight: *weight,
                });
            }
            let Some((d_in, d_out)) = dims else {
                return Err(PeftError::InvalidInput(format!(
                    "add_weighted_adapter: no adapter of {adapters:?} holds `{path}`"
                )));
            };
            let (a, b) = combine_layer(&weighted, (d_in, d_out), new_rank, &options, &mut rng)?;
            let a = burn_linear_weight(&a, [new_rank, d_in], &device);
            let b = burn_linear_weight(&b, [d_out, new_rank], &device);
            pairs.insert(path.clone(), LoraLinear::new(a, b, scaling, 0.0));
        }
        self.install(entry, pairs)
    }

    /// Refuses `what` while adapters are merged: unmerging subtracts the adapters that are active
    /// then, so the set must not change in between (PEFT warns and unmerges the merged ones).
    fn check_unmerged(&self, what: &str) -> Result<()> {
        if self.merged {
            return Err(PeftError::InvalidInput(format!(
                "cannot {what} while adapters are merged into the base (unmerge_adapter first)"
            )));
        }
        Ok(())
    }

    fn check_new_name(&self, name: &str) -> Result<()> {
        if name.is_empty() || name == BASE_ADAPTER || name.contains(['/', '\\']) || name == ".." {
            return Err(PeftError::InvalidInput(format!(
                "`{name}` cannot name an adapter (empty, `{BASE_ADAPTER}`, or a path)"
            )));
        }
        if self.adapters.iter().any(|a| a.name == name) {
            return Err(PeftError::InvalidInput(format!(
                "an adapter named `{name}` is already loaded (delete it or hot-swap it)"
            )));
        }
        Ok(())
    }

    /// The bookkeeping of adapter `name` with `config` on this model, refusing what a shared
    /// multi-adapter model cannot hold.
    fn entry(&self, name: &str, config: LoraConfig) -> Result<NamedAdapter> {
        config.validate("LoraConfig")?;
        if let Some(kind) = config.base_init() {
            // PEFT refuses it too: PiSSA/OLoRA change the base the other adapters share.
            return Err(PeftError::Unsupported(format!(
                "adapter `{name}` was initialised with {}, which changes the base weight that \
                 several adapters share; convert it to plain LoRA \
                 (peft_lora::save_pretrained_converted, or PEFT's \
                 path_initial_model_for_weight_conversion) or load it alone",
                kind.name()
            )));
        }
        if config
            .modules_to_save
            .as_ref()
            .is_some_and(|m| !m.is_empty())
            || config.bias != LoraBias::None
        {
            return Err(PeftError::Unsupported(format!(
                "adapter `{name}`: modules_to_save and trained biases replace base weights, \
                 which a model holding several adapters shares; load it alone \
                 (peft_lora::from_pretrained) or merge it"
            )));
        }
        if config.trainable_token_indices.is_some() {
            return Err(PeftError::Unsupported(format!(
                "adapter `{name}` trains token rows (trainable_token_indices), which replace \
                 rows of the embedding table that several adapters share here; load it alone \
                 (peft_lora::from_pretrained) or merge it (peft merge) and serve the merged model"
            )));
        }
        let (targeted, embedding_targets) = select_targets(
            &config,
            &self.model.spec().model_type,
            &self.model.modules(),
        )?;
        Ok(NamedAdapter {
            name: name.to_string(),
            config,
            targeted,
            embedding_targets,
        })
    }

    /// Reads the folder `dir` as adapter `name`: its bookkeeping and one pair per layer, every
    /// key of the file accounted for.
    fn read_adapter(
        &self,
        name: &str,
        dir: &Path,
    ) -> Result<(NamedAdapter, BTreeMap<String, LoraLinear>)> {
        let config = LoraConfig::from_file(dir.join(CONFIG_NAME))?;
        let entry = self.entry(name, config)?;
        let weights = dir.join(WEIGHTS_NAME);
        let store = TensorStore::open(&weights)?;
        let pairs = self.make_pairs(&entry, &Source::File(&store))?;
        let mut expected: Vec<String> = Vec::new();
        for path in &entry.targeted {
            let is_embedding = entry.embedding_targets.contains(path);
            let (a, b) = peft_keys(path, is_embedding);
            expected.extend([a, b]);
            if entry.config.use_dora && !is_embedding {
                expected.push(magnitude_key(path));
            }
            if is_embedding {
                // PEFT saves a targeted embedding's base table beside the pair.
                expected.push(format!(
                    "{}{path}.base_layer.weight",
                    peft_core::adapter_files::KEY_PREFIX
                ));
            }
        }
        if let Some(stray) = store.keys().find(|k| !expected.iter().any(|e| e == k)) {
            return Err(PeftError::AdapterMismatch(format!(
                "{}: `{stray}` is not a LoRA pair of a layer the config targets in this {} \
                 model (adapter for another architecture, or trained with modules_to_save?)",
                weights.display(),
                self.model.spec().model_type
            )));
        }
        Ok((entry, pairs))
    }

    fn make_pairs(
        &self,
        entry: &NamedAdapter,
        source: &Source<'_>,
    ) -> Result<BTreeMap<String, LoraLinear>> {
        let device = self.model.device();
        let bases = if entry.config.use_dora {
            self.bases()?
        } else {
            BTreeMap::new()
        };
        let dims: BTreeMap<String, (usize, usize)> = self
            .model
            .modules()
            .into_iter()
            .filter_map(|m| m.adapted_dims().map(|d| (m.path, d)))
            .collect();
        entry
            .targeted
            .iter()
            .map(|path| {
                let is_embedding = entry.embedding_targets.contains(path);
                let d = dims.get(path).copied().ok_or_else(|| {
                    PeftError::Unsupported(format!(
                        "LoRA on `{path}`: only linear layers and embeddings can be adapted"
                    ))
                })?;
                let target = Target {
                    path,
                    dims: d,
                    is_embedding,
                    base: match bases.get(path) {
                        Some(Base::Linear(b)) => Some(b),
                        _ => None,
                    },
                    embedding: match bases.get(path) {
                        Some(Base::Embedding(e)) => Some(e),
                        _ => None,
                    },
                    shared: &peft_core::tuner::NO_SHARED,
                };
                let pair = make_pair(&entry.config, source, target, &device)?.adapter;
                Ok((path.clone(), pair.no_dropout()))
            })
            .collect()
    }

    /// Puts `pairs` into the layers as adapter `entry.name` (cannot fail half-way: the layers
    /// change only once everything is read).
    fn install(
        &mut self,
        entry: NamedAdapter,
        mut pairs: BTreeMap<String, LoraLinear>,
    ) -> Result<()> {
        let name = entry.name.clone();
        let active = self.active.clone();
        let rows = self.rows.clone().map(std::sync::Arc::new);
        self.update_layers(|path, set| {
            if let Some(pair) = pairs.remove(path) {
                let s = set.get_or_insert_with(LoraSet::default);
                s.insert(&name, pair);
                s.set_active(&active);
                s.rows = rows.clone();
            }
        })?;
        self.adapters.push(entry);
        Ok(())
    }

    /// The rank of adapter `name` per layer.
    fn ranks(&self, name: &str) -> Result<BTreeMap<String, usize>> {
        Ok(self
            .pairs_of(name)?
            .into_iter()
            .map(|(p, pair)| (p, pair.rank()))
            .collect())
    }

    /// Adapter `name`'s pair on every layer it adapts (handles on the same tensors).
    fn pairs_of(&self, name: &str) -> Result<BTreeMap<String, LoraLinear>> {
        self.adapter(name)?;
        let found = std::cell::RefCell::new(BTreeMap::new());
        let take = |path: &str, set: &Option<LoraSet>| {
            if let Some(pair) = set.as_ref().and_then(|s| s.get(name)) {
                found.borrow_mut().insert(path.to_string(), pair.clone());
            }
        };
        self.model.clone().map_layers(
            &mut |path, layer: AdaptableLinear<LoraSet>| {
                take(path, &layer.adapter);
                Ok(layer)
            },
            &mut |path, layer: AdaptableEmbedding<LoraSet>| {
                take(path, &layer.adapter);
                Ok(layer)
            },
        )?;
        Ok(found.into_inner())
    }

    /// Every layer's frozen base, by path (handles on the same weights): what DoRA's magnitudes
    /// are computed against.
    fn bases(&self) -> Result<BTreeMap<String, Base>> {
        let found = std::cell::RefCell::new(BTreeMap::new());
        self.model.clone().map_layers(
            &mut |path, layer: AdaptableLinear<LoraSet>| {
                found
                    .borrow_mut()
                    .insert(path.to_string(), Base::Linear(layer.base.clone()));
                Ok(layer)
            },
            &mut |path, layer: AdaptableEmbedding<LoraSet>| {
                found
                    .borrow_mut()
                    .insert(path.to_string(), Base::Embedding(layer.base.clone()));
                Ok(layer)
            },
        )?;
        Ok(found.into_inner())
    }

    /// Applies `f` to every layer's adapter set (linear layers and embeddings alike).
    fn update_layers(&mut self, f: impl FnMut(&str, &mut Option<LoraSet>)) -> Result<()> {
        // Both callbacks of `map_layers` call `f`: shared through a RefCell (never re-entered).
        let f = std::cell::RefCell::new(f);
        self.model = self.model.clone().map_layers(
            &mut |path, mut layer: AdaptableLinear<LoraSet>| {
                (f.borrow_mut())(path, &mut layer.adapter);
                Ok(layer)
            },
            &mut |path, mut layer: AdaptableEmbedding<LoraSet>| {
                (f.borrow_mut())(path, &mut layer.adapter);
                Ok(layer)
            },
        )?;
        Ok(())
    }
}

/// The union of the adapters' targets (PEFT's rule: lists are united, regexes joined as
/// `(a)|(b)`; the two kinds cannot be mixed).
fn union_targets(entries: &[NamedAdapter], model_type: &str) -> Result<TargetModules> {
    let targets: Vec<TargetModules> = entries
        .iter()
        .map(|e| e.config.targets(model_type))
        .collect::<Result<_>>()?;
    if targets.iter().all(|t| matches!(t, TargetModules::List(_))) {
        let mut names: Vec<String> = targets
            .into_iter()
            .flat_map(|t| match t {
                TargetModules::List(l) => l,
                TargetModules::Pattern(_) => Vec::new(),
            })
            .collect();
        names.sort();
        names.dedup();
        return Ok(TargetModules::List(names));
    }
    if targets
        .iter()
        .all(|t| matches!(t, TargetModules::Pattern(_)))
    {
        let joined: Vec<String> = targets
            .iter()
            .map(|t| match t {
                TargetModules::Pattern(p) => format!("({p})"),
                TargetModules::List(_) => String::new(),
            })
            .collect();
        return Ok(TargetModules::Pattern(joined.join("|")));
    }
    Err(PeftError::config(
        "add_weighted_adapter",
        "target_modules",
        "the adapters mix lists and regexes of target modules (PEFT refuses this too)",
    ))
}

/// A layer's frozen base, linear or embedding.
enum Base {
    Linear(BaseLinear),
    Embedding(burn::nn::Embedding),
}
