//! Several named adapters on one layer: PEFT's `lora_A["name"]`, `active_adapters` and
//! `adapter_names` per batch row.
//!
//! An [`AdapterSet<A>`] is itself a [`LayerAdapter`], so a model holding named adapters is the
//! same architecture with `AdapterSet<A>` as its adapter type
//! (`M::WithAdapter<AdapterSet<LoraLinear>>`); the frozen base and every model file stay as they
//! are. The forward pass follows PEFT's `LoraLayer.forward`:
//!
//! * one active adapter: that adapter's own forward pass (its fused CPU paths included);
//! * several: `base(x) + Σ Δₐ(x)` in activation order;
//! * none (disabled): `base(x)`;
//! * a row assignment ([`AdapterSet::rows`], PEFT's `adapter_names`): `base(x)` for the whole
//!   batch, then each adapter's term computed once over the rows that name it; the terms are
//!   stacked, put back in row order by one gather and added once (PEFT's `_mixed_batch_forward`
//!   adds them group by group; the sums are the same); rows naming [`BASE_ADAPTER`] get the base
//!   alone.
//!
//! Several active adapters and row assignments need additive adapters
//! ([`LayerAdapter::is_additive`]); the model-level API checks that before setting them.

use std::sync::Arc;

use burn::module::Module;
use burn::nn::{Embedding, Linear};
use burn::tensor::{Int, Tensor, TensorData};

use crate::adapter::{BaseLinear, LayerAdapter};
use crate::error::Result;

/// The row name that means "no adapter" in a mixed batch (PEFT's `"__base__"`).
pub const BASE_ADAPTER: &str = "__base__";

/// The adapter each batch row uses (`None`: the base model), shared by every layer of a model.
pub type RowAdapters = Arc<Vec<Option<String>>>;

/// Named adapters of one layer, with the ones in use.
#[derive(Module, Debug)]
pub struct AdapterSet<A: LayerAdapter> {
    /// The adapters, in the order they were added.
    pub adapters: Vec<A>,
    /// `names[i]` names `adapters[i]`.
    #[module(skip)]
    pub names: Vec<String>,
    /// Indices into `adapters` of the active ones, in activation order.
    #[module(skip)]
    pub active: Vec<usize>,
    /// The adapter of each batch row, when a mixed batch is being run; overrides `active`.
    #[module(skip)]
    pub rows: Option<RowAdapters>,
}

impl<A: LayerAdapter> Default for AdapterSet<A> {
    fn default() -> Self {
        Self {
            adapters: Vec::new(),
            names: Vec::new(),
            active: Vec::new(),
            rows: None,
        }
    }
}

impl<A: LayerAdapter> AdapterSet<A> {
    /// The position of adapter `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The adapter called `name`.
    pub fn get(&self, name: &str) -> Option<&A> {
        self.index(name).map(|i| &self.adapters[i])
    }

    /// Adds `adapter` as `name`, or replaces the adapter of that name in place (hot-swap); the
    /// active set is unchanged.
    pub fn insert(&mut self, name: &str, adapter: A) {
        match self.index(name) {
            Some(i) => self.adapters[i] = adapter,
            None => {
                self.names.push(name.to_string());
                self.adapters.push(adapter);
            }
        }
    }

    /// Drops adapter `name` (and its place in the active set); `None` if it is not here.
    pub fn remove(&mut self, name: &str) -> Option<A> {
        let i = self.index(name)?;
        self.names.remove(i);
        self.active.retain(|&a| a != i);
        for a in &mut self.active {
            if *a > i {
                *a -= 1;
            }
        }
        Some(self.adapters.remove(i))
    }

    /// Makes the adapters of `names` that this layer holds active, in that order (names it does
    /// not hold are skipped: PEFT activates an adapter only where it was injected).
    pub fn set_active(&mut self, names: &[String]) {
        self.active = names.iter().filter_map(|n| self.index(n)).collect();
    }

    /// Names of the active adapters, in order.
    pub fn active_names(&self) -> Vec<&str> {
        self.active
            .iter()
            .map(|&i| self.names[i].as_str())
            .collect()
    }

    /// `(index of the adapter, [rows that use it])` for each adapter of this layer that some row
    /// names.
    fn row_groups(&self, rows: &[Option<String>]) -> Vec<(usize, Vec<i64>)> {
        self.names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let picked: Vec<i64> = rows
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.as_deref() == Some(name.as_str()))
                    .map(|(row, _)| row as i64)
                    .collect();
                (!picked.is_empty()).then_some((i, picked))
            })
            .collect()
    }

    /// `out` plus, for each adapter some row names, that adapter's term computed over its rows
    /// only (`delta(adapter, row indices)`) and added to those rows.
    fn add_row_terms(
        &self,
        out: Tensor<3>,
        rows: &[Option<String>],
        delta: impl Fn(&A, Option<Tensor<1, Int>>) -> Option<Tensor<3>>,
    ) -> Tensor<3> {
        let [batch, seq, width] = out.dims();
        let device = out.device();
        let groups = self.row_groups(rows);
        if let [(i, picked)] = groups.as_slice()
            && picked.len() == batch
        {
            return match delta(&self.adapters[*i], None) {
                Some(d) => out + d,
                None => out,
            };
        }
        // Each group's term over its rows, stacked in group order, then put back in row order
        // by one gather and added once (rows of no adapter get zeros).
        let mut parts = Vec::with_capacity(groups.len() + 1);
        let mut order: Vec<usize> = Vec::with_capacity(batch);
        for (i, picked) in groups {
            let n = picked.len();
            let index = Tensor::<1, Int>::from_data(TensorData::new(picked.clone(), [n]), &device);
            if let Some(d) = delta(&self.adapters[i], Some(index)) {
                parts.push(d);
                order.extend(picked.iter().map(|&r| r as usize));
            }
        }
        if parts.is_empty() {
            return out;
        }
        let mut covered = vec![false; batch];
        order.iter().for_each(|&r| covered[r] = true);
        let rest: Vec<usize> = (0..batch).filter(|&r| !covered[r]).collect();
        if !rest.is_empty() {
            parts.push(Tensor::zeros([rest.len(), seq, width], &device));
            order.extend(rest);
        }
        let mut position = vec![0i64; batch];
        for (k, &row) in order.iter().enumerate() {
            position[row] = k as i64;
        }
        let position = Tensor::<1, Int>::from_data(TensorData::new(position, [batch]), &device);
        out + Tensor::cat(parts, 0).select(0, position)
    }
}

impl<A: LayerAdapter> AdapterSet<A> {
    /// The sum of the active adapters' terms, each given the output so far (`result` plus the
    /// terms before it), as the forward pass adds them; `None` when no adapter has a term.
    fn sum_of_terms(
        &self,
        result: &Tensor<3>,
        term: impl Fn(&A, &Tensor<3>) -> Option<Tensor<3>>,
    ) -> Option<Tensor<3>> {
        let mut sum: Option<Tensor<3>> = None;
        for &i in &self.active {
            let so_far = match &sum {
                Some(s) => result.clone() + s.clone(),
                None => result.clone(),
            };
            if let Some(d) = term(&self.adapters[i], &so_far) {
                sum = Some(match sum {
                    Some(s) => s + d,
                    None => d,
                });
            }
        }
        sum
    }

    /// The layer's output: `base(input)` plus the terms of the adapters in use (see the module
    /// docs), where `own` is one adapter's whole forward pass and `delta(adapter, input,
    /// result)` its term given the output so far, both on `input` or on its rows `index`.
    fn forward_with<I: Clone>(
        &self,
        input: I,
        base: impl Fn(I) -> Tensor<3>,
        own: impl Fn(&A, I) -> Tensor<3>,
        delta: impl Fn(&A, I, &Tensor<3>) -> Option<Tensor<3>>,
        rows_of: impl Fn(I, Tensor<1, Int>) -> I,
    ) -> Tensor<3> {
        if let Some(rows) = &self.rows {
            // The base product once for the whole batch; each adapter's term from its rows.
            let out = base(input.clone());
            let base_out = out.clone();
            return self.add_row_terms(out, rows, |a, index| match index {
                Some(index) => delta(
                    a,
                    rows_of(input.clone(), index.clone()),
                    &base_out.clone().select(0, index),
                ),
                None => delta(a, input.clone(), &base_out),
            });
        }
        match self.active.as_slice() {
            [] => base(input),
            [one] => own(&self.adapters[*one], input),
            many => {
                let mut out = base(input.clone());
                for &i in many {
                    if let Some(d) = delta(&self.adapters[i], input.clone(), &out) {
                        out = out + d;
                    }
                }
                out
            }
        }
    }
}

impl<A: LayerAdapter> LayerAdapter for AdapterSet<A> {
    fn forward_linear(&self, base: &BaseLinear, x: Tensor<3>) -> Tensor<3> {
        self.forward_with(
            x,
            |x| base.forward(x),
            |a, x| a.forward_linear(base, x),
            |a, x, result| a.delta_linear(base, x, result),
            |x, index| x.select(0, index),
        )
    }

    fn forward_embedding(&self, base: &Embedding, ids: Tensor<2, Int>) -> Tensor<3> {
        self.forward_with(
            ids,
            |ids| base.forward(ids),
            |a, ids| a.forward_embedding(base, ids),
            |a, ids, result| a.delta_embedding(base, ids, result),
            |ids, index| ids.select(0, index),
        )
    }

    fn delta_linear(
        &self,
        base: &BaseLinear,
        x: Tensor<3>,
        result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        self.sum_of_terms(result, |a, so_far| a.delta_linear(base, x.clone(), so_far))
    }

    fn delta_embedding(
        &self,
        base: &Embedding,
        ids: Tensor<2, Int>,
        result: &Tensor<3>,
    ) -> Option<Tensor<3>> {
        self.sum_of_terms(result, |a, so_far| {
            a.delta_embedding(base, ids.clone(), so_far)
        })
    }

    fn is_additive(&self) -> bool {
        self.adapters.iter().all(|a| a.is_additive())
    }

    /// Folds the active adapters into the base, in activation order.
    fn merge_linear(&mut self, mut base: Linear) -> Result<Linear> {
        for &i in &self.active {
            base = self.adapters[i].merge_linear(base)?;
        }
        Ok(base)
    }

    /// Removes the active adapters from the base, in reverse order.
    fn unmerge_linear(&mut self, mut base: Linear) -> Result<Linear> {
        for &i in self.active.iter().rev() {
            base = self.adapters[i].unmerge_linear(base)?;
        }
        Ok(base)
    }

    fn merge_embedding(&mut self, mut base: Embedding) -> Result<Embedding> {
        for &i in &self.active {
            base = self.adapters[i].merge_embedding(base)?;
        }
        Ok(base)
    }

    fn unmerge_embedding(&mut self, mut base: Embedding) -> Result<Embedding> {
        for &i in self.active.iter().rev() {
            base = self.adapters[i].unmerge_embedding(base)?;
        }
        Ok(base)
    }
}
