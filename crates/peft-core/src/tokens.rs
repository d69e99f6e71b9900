//! PEFT's trainable tokens: a few rows of the embedding table trained in full, the rest frozen
//! (`LoraConfig(trainable_token_indices=…)` and the stand-alone `TrainableTokensConfig`).
//!
//! PEFT's `TrainableTokensLayer` keeps the chosen rows' values — under the name
//! `trainable_tokens_delta`, though they are the rows themselves, not a difference — and
//! computes with the table whose rows are replaced by them (`index_copy`). On an output layer
//! (a tied `lm_head`, or an untied one named in the dict form) the same replacement changes the
//! logits of those tokens: `logits[…, id] = x · row`. [`TokenRows`] computes both without
//! copying the table: the embedding output and the logits are computed from the frozen base as
//! before, and the chosen positions / columns are overwritten exactly.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::modules::{ModuleInfo, ModuleKind};
use crate::{PeftError, Result};

/// PEFT's `trainable_token_indices` (LoRA) / `token_indices` (the stand-alone method): the ids
/// whose rows train.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIndices {
    /// Rows of the input embedding (and of the output layer tied to it).
    List(Vec<usize>),
    /// Layer name (`embed_tokens`, an untied `lm_head`) → its rows.
    ByLayer(BTreeMap<String, Vec<usize>>),
}

/// How trained rows are named in an adapter file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKeys {
    /// Beside another method's adapter (LoRA's `trainable_token_indices`, PEFT's
    /// `TrainableTokensWrapper`): `<path>.token_adapter.trainable_tokens_delta`; a tied output
    /// layer's rows are not written (they are the embedding's).
    Wrapped,
    /// PEFT's `TRAINABLE_TOKENS` method: `<path>.trainable_tokens_delta`, and the tied output
    /// layer's rows written again under its own path, as PEFT's state dict has them.
    Standalone,
}

impl TokenKeys {
    /// The file key (without PEFT's `base_model.model.` prefix) of the rows of `path`.
    pub fn key(self, path: &str) -> String {
        match self {
            Self::Wrapped => format!("{path}{TOKEN_PARAM}"),
            Self::Standalone => format!("{path}.{TOKEN_KEY_SUFFIX}"),
        }
    }
}

/// The file key suffix of trained rows, both namings.
pub const TOKEN_KEY_SUFFIX: &str = "trainable_tokens_delta";

/// The rows' parameter under a table's path: `<path>.token_adapter.trainable_tokens_delta`, the
/// name burn's field names give it and PEFT's key inside another method's adapter.
pub const TOKEN_PARAM: &str = ".token_adapter.trainable_tokens_delta";

/// The model's input embedding among `modules` (the first embedding table: the models have one).
pub fn input_embedding(modules: &[ModuleInfo]) -> Option<&ModuleInfo> {
    modules
        .iter()
        .find(|m| matches!(m.kind, ModuleKind::Embedding { .. }))
}

/// One table whose rows train, resolved against a model's modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTarget {
    /// The module's HF path (`model.embed_tokens`, `lm_head`).
    pub path: String,
    /// The ids whose rows train.
    pub ids: Vec<usize>,
}

/// The tables `indices` names among `modules`, checked: a list means the input embedding; a
/// dict names embeddings or untied output layers (a module whose path is the name or ends with
/// `.name`). A tied output layer follows the embedding (PEFT ties their rows): naming it with
/// the embedding's ids is accepted and adds nothing; with other ids it is refused, since the
/// tied model has one table. `context` and `field` name the config key in errors.
pub fn resolve_token_targets(
    indices: &TokenIndices,
    modules: &[ModuleInfo],
    context: &str,
    field: &str,
) -> Result<Vec<TokenTarget>> {
    let invalid = |reason: String| PeftError::InvalidConfig {
        context: context.to_string(),
        field: field.to_string(),
        reason,
    };
    let embedding = input_embedding(modules)
        .ok_or_else(|| invalid("the model has no input embedding".into()))?;
    let named: Vec<(&ModuleInfo, &Vec<usize>)> = match indices {
        TokenIndices::List(ids) => vec![(embedding, ids)],
        TokenIndices::ByLayer(map) => map
            .iter()
            .map(|(name, ids)| {
                let found = modules
                    .iter()
                    .find(|m| m.path == *name || m.path.ends_with(&format!(".{name}")))
                    .ok_or_else(|| PeftError::TargetModulesNotFound {
                        targets: format!("{field} {{{name:?}: …}}"),
                        available: modules.iter().map(|m| m.path.clone()).collect(),
                    })?;
                Ok((found, ids))
            })
            .collect::<Result<_>>()?,
    };
    let embedding_ids = named
        .iter()
        .find(|(m, _)| m.path == embedding.path)
        .map(|(_, ids)| *ids);
    let mut out = Vec::new();
    for (module, ids) in named {
        let rows = match module.kind {
            ModuleKind::Embedding { num_embeddings, .. } => num_embeddings,
            ModuleKind::Linear { .. } if module.tied => {
                if embedding_ids == Some(ids) {
                    continue;
                }
                return Err(invalid(format!(
                    "`{}` is tied to the input embedding `{}`: give it the embedding's indices \
                     (its rows follow the embedding's) or leave it out",
                    module.path, embedding.path
                )));
            }
            ModuleKind::Linear { out_features, .. } => out_features,
            _ => {
                return Err(invalid(format!(
                    "`{}` is neither an embedding nor a linear layer",
                    module.path
                )));
            }
        };
        check_ids(ids, rows, context, field)?;
        out.push(TokenTarget {
            path: module.path.clone(),
            ids: ids.clone(),
        });
    }
    Ok(out)
}

/// The trained rows of one table (PEFT's `TrainableTokensLayer` for one adapter).
#[derive(Module, Debug)]
pub struct TokenRows {
    /// The rows' values, `[n, dim]` in the order of [`ids`](Self::ids) (PEFT's
    /// `trainable_tokens_delta`: the rows themselves).
    pub trainable_tokens_delta: Param<Tensor<2>>,
    /// The base table's rows at creation, `[n, dim]`: what unmerging restores (PEFT's
    /// `trainable_tokens_original`).
    #[module(skip)]
    pub original: Tensor<2>,
    /// The token ids whose rows train, distinct and below the vocabulary size.
    #[module(skip)]
    pub ids: Vec<usize>,
}

impl TokenRows {
    /// Rows `ids` of `table: [vocab, dim]` (PyTorch's layout) made trainable, starting at their
    /// base values (PEFT's `init_weights=True`): a no-op until trained.
    pub fn from_table(ids: &[usize], table: Tensor<2>, context: &str, field: &str) -> Result<Self> {
        let [vocab, _] = table.dims();
        check_ids(ids, vocab, context, field)?;
        let device = table.device();
        let rows = table.detach().select(0, index_tensor(ids, &device));
        Ok(Self::with_values(ids, rows.clone(), rows))
    }

    /// Rows `ids` with the given `values: [n, dim]` over a table whose rows were `original`.
    pub fn with_values(ids: &[usize], values: Tensor<2>, original: Tensor<2>) -> Self {
        Self {
            trainable_tokens_delta: Param::from_tensor(values),
            original,
            ids: ids.to_vec(),
        }
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no row trains.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The embedding output with the chosen tokens' rows: `base: [batch, seq, dim]` is the base
    /// table's output for `ids: [batch, seq]`; positions holding a chosen token get its row.
    pub fn embed(&self, base: Tensor<3>, ids: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq, dim] = base.dims();
        let n = self.len();
        let values = self.trainable_tokens_delta.val();
        let device = base.device();
        let flat = ids.reshape([batch * seq, 1]).expand([batch * seq, n]);
        let chosen = index_tensor(&self.ids, &device)
            .reshape([1, n])
            .expand([batch * seq, n]);
        // One-hot rows select a value row exactly (x·1 + 0·others); `hit` is 1 where a chosen
        // token sits.
        let one_hot = flat.equal(chosen).float().cast(values.dtype());
        let hit = one_hot.clone().sum_dim(1);
        let rows = one_hot.matmul(values);
        let base = base.reshape([batch * seq, dim]);
        let kept = base.clone() * (hit.neg() + 1.0).cast(base.dtype());
        (kept + rows.cast(base.dtype())).reshape([batch, seq, dim])
    }

    /// The logits with the chosen tokens' columns recomputed from their rows:
    /// `logits: [batch, seq, vocab]` of the base output layer for `hidden: [batch, seq, dim]`;
    /// column `ids[i]` becomes `hidden · rows[i]` (PEFT's `F.linear` with the replaced table,
    /// no bias).
    pub fn project(&self, logits: Tensor<3>, hidden: Tensor<3>) -> Tensor<3> {
        let [batch, seq, vocab] = logits.dims();
        let device = logits.device();
        let values = self.trainable_tokens_delta.val();
        let columns = peft_ops::matmul::linear(hidden, values.transpose(), None);
        let index = index_tensor(&self.ids, &device);
        let mut mask = vec![1.0f32; vocab];
        for &id in &self.ids {
            mask[id] = 0.0;
        }
        let keep = Tensor::<1>::from_data(TensorData::new(mask, [vocab]), &device)
            .cast(logits.dtype())
            .reshape([1, 1, vocab]);
        // Zeros plus the new columns is exact; so is the masked base.
        let placed = Tensor::<3>::zeros([batch, seq, vocab], &device)
            .cast(logits.dtype())
            .select_assign(
                2,
                index,
                columns.cast(logits.dtype()),
                burn::tensor::IndexingUpdateOp::Add,
            );
        logits * keep + placed
    }

    /// `table: [vocab, dim]` with the chosen rows replaced by `rows: [n, dim]` (PEFT's
    /// `index_copy`), on the host: exact, and merging is not on a hot path.
    pub fn replace_rows(&self, table: Tensor<2>, rows: Tensor<2>) -> Result<Tensor<2>> {
        let [vocab, dim] = table.dims();
        let device = table.device();
        let dtype = table.dtype();
        let mut data = host_f32(table)?;
        let rows = host_f32(rows)?;
        for (i, &id) in self.ids.iter().enumerate() {
            if id >= vocab {
                return Err(PeftError::InvalidInput(format!(
                    "trainable token {id} is outside the table of {vocab} rows"
                )));
            }
            data[id * dim..(id + 1) * dim].copy_from_slice(&rows[i * dim..(i + 1) * dim]);
        }
        Ok(Tensor::<2>::from_data(TensorData::new(data, [vocab, dim]), &device).cast(dtype))
    }

    /// The rows as they train now, `[n, dim]`.
    pub fn values(&self) -> Tensor<2> {
        self.trainable_tokens_delta.val()
    }
}

/// Checks PEFT's token indices for a table of `vocab` rows: each below `vocab`, none repeated
/// (PEFT's `index_copy` with a repeated index keeps one of the rows unpredictably; peft-rs
/// refuses), not empty. `context` and `field` name the config and key in the message.
pub fn check_ids(ids: &[usize], vocab: usize, context: &str, field: &str) -> Result<()> {
    let invalid = |reason: String| PeftError::InvalidConfig {
        context: context.to_string(),
        field: field.to_string(),
        reason,
    };
    if ids.is_empty() {
        return Err(invalid("the list of token indices is empty".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for &id in ids {
        if id >= vocab {
            return Err(invalid(format!(
                "token index {id} is outside the vocabulary of {vocab} tokens"
            )));
        }
        if !seen.insert(id) {
            return Err(invalid(format!("token index {id} is listed twice")));
        }
    }
    Ok(())
}

fn index_tensor(ids: &[usize], device: &burn::tensor::Device) -> Tensor<1, Int> {
    let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let n = ids.len();
    Tensor::<1, Int>::from_data(TensorData::new(ids, [n]), device)
}

fn host_f32(t: Tensor<2>) -> Result<Vec<f32>> {
    t.cast(burn::tensor::DType::F32)
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| {
            PeftError::InvalidInput(format!("reading a table back from the device: {e:?}"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> burn::tensor::Device {
        burn::tensor::Device::default()
    }

    fn table() -> Tensor<2> {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        Tensor::from_data(TensorData::new(data, [4, 3]), &device())
    }

    #[test]
    fn embedding_rows_are_replaced_exactly_where_the_token_sits() {
        let base = table();
        let values = Tensor::<2>::from_data(
            TensorData::new(vec![100.0f32, 101.0, 102.0, -1.0, -2.0, -3.0], [2, 3]),
            &device(),
        );
        let rows = TokenRows::with_values(
            &[2, 0],
            values,
            base.clone().select(0, index_tensor(&[2, 0], &device())),
        );
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 2], [2, 2]), &device());
        let out = rows.embed(
            base.clone()
                .select(0, ids.clone().reshape([4]))
                .reshape([2, 2, 3]),
            ids,
        );
        let got = out.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(
            got,
            vec![
                -1.0, -2.0, -3.0, 3.0, 4.0, 5.0, 100.0, 101.0, 102.0, 100.0, 101.0, 102.0
            ]
        );
    }

    #[test]
    fn logits_columns_are_recomputed_from_the_rows() {
        let base = table();
        let rows = TokenRows::with_values(
            &[1],
            Tensor::from_data(TensorData::new(vec![1.0f32, 0.0, 2.0], [1, 3]), &device()),
            base.clone().select(0, index_tensor(&[1], &device())),
        );
        // hidden [1, 1, 3] = (1, 1, 1); base logits = table · hidden = (3, 12, 21, 30).
        let hidden = Tensor::<3>::ones([1, 1, 3], &device());
        let logits = peft_ops::matmul::linear(hidden.clone(), base.transpose(), None);
        let got = rows
            .project(logits, hidden)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(got, vec![3.0, 3.0, 21.0, 30.0]);
    }

    #[test]
    fn merge_replaces_the_rows_and_unmerge_restores_them() {
        let rows = TokenRows::from_table(&[3, 1], table(), "test", "ids").unwrap();
        let merged = rows
            .replace_rows(table(), Tensor::<2>::zeros([2, 3], &device()))
            .unwrap();
        let got = merged.clone().into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(&got[3..6], &[0.0, 0.0, 0.0]);
        assert_eq!(&got[9..12], &[0.0, 0.0, 0.0]);
        assert_eq!(&got[0..3], &[0.0, 1.0, 2.0]);
        let back = rows.replace_rows(merged, rows.original.clone()).unwrap();
        assert_eq!(
            back.into_data().try_to_vec::<f32>().unwrap(),
            (0..12).map(|v| v as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_indices_are_refused_with_the_index() {
        let err = check_ids(&[1, 9], 4, "LoraConfig", "trainable_token_indices").unwrap_err();
        assert_eq!(
            err.to_string(),
            "LoraConfig: invalid `trainable_token_indices`: token index 9 is outside the \
             vocabulary of 4 tokens"
        );
        let err = check_ids(&[1, 1], 4, "c", "token_indices").unwrap_err();
        assert!(
            err.to_string().ends_with("token index 1 is listed twice"),
            "{err}"
        );
        let err = check_ids(&[], 4, "c", "x").unwrap_err();
        assert!(
            err.to_string()
                .ends_with("the list of token indices is empty"),
            "{err}"
        );
    }
}
