//! AdaLoRA's training-time parts, as PEFT 0.21.2 computes them: the orthogonality penalty
//! `AdaLoraModel.forward` adds to the loss, and the `RankAllocator` that
//! `update_and_allocate(global_step)` runs after each optimizer step.
//!
//! The allocator scores every parameter element by `s = Ī · Ū`, where `I = |p · ∂L/∂p|` (the
//! updated `p`, the step's gradient), `Ī` its EMA with `beta1` and `Ū` the EMA with `beta2` of
//! `|I − Ī|`. A singular value's score is its `E` entry's plus the means of its row of `A` and
//! its column of `B`. The budget (total kept ranks) falls from the sum of the initial ranks to
//! `target_r` per layer on a cubic schedule between `tinit` and `total_step − tfinal`; every
//! `deltaT` steps the scores at or below the `(initial − budget)`-th smallest zero their `E`
//! entries, and the kept flags become the config's `rank_pattern`. At `total_step − tfinal` the
//! final mask is forced and the scores dropped; after it the pattern is re-applied every step
//! (the optimizer moves masked entries again).
//!
//! The scores live in each layer ([`SvdLinear::importance`]); they are not saved in checkpoints,
//! so a resumed run starts them again from zero. A model loaded cut to its pattern (a folder
//! saved after a mask) keeps its ranks: the allocator leaves it as it is.

use std::collections::BTreeMap;

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::{Bool, Tensor};

use peft_core::{AdaptableLinear, CausalLm, PeftError, Result};

use crate::config::AdaLoraConfig;
use crate::layer::{Ema, Importance, SvdLinear};

/// Every adapted layer's adapter, by path, in model order (clones: tensors are shared).
fn layers<M: CausalLm<Adapter = SvdLinear>>(model: &M) -> Result<Vec<(String, SvdLinear)>> {
    let mut found = Vec::new();
    model.clone().map_layers::<SvdLinear>(
        &mut |path: &str, layer: AdaptableLinear<SvdLinear>| {
            if let Some(adapter) = &layer.adapter {
                found.push((path.to_string(), adapter.clone()));
            }
            Ok(layer)
        },
        &mut |_: &str, embedding| Ok(embedding),
    )?;
    Ok(found)
}

/// The model with `change` applied to the adapter of every layer `changes` names.
fn rebuild<M>(model: M, mut changes: BTreeMap<String, SvdLinear>) -> Result<M>
where
    M: CausalLm<Adapter = SvdLinear, WithAdapter<SvdLinear> = M>,
{
    model.map_layers::<SvdLinear>(
        &mut |path: &str, mut layer: AdaptableLinear<SvdLinear>| {
            if let Some(changed) = changes.remove(path) {
                layer.adapter = Some(changed);
            }
            Ok(layer)
        },
        &mut |_: &str, embedding| Ok(embedding),
    )
}

/// PEFT's orthogonality penalty: `orth_reg_weight` times the mean over every `A` and `B` of
/// `‖A·Aᵀ − I‖_F` / `‖Bᵀ·B − I‖_F`; `None` with a zero weight or no layer.
pub fn orthogonality_penalty<M: CausalLm<Adapter = SvdLinear>>(
    config: &AdaLoraConfig,
    model: &M,
) -> Result<Option<Tensor<1>>> {
    if config.orth_reg_weight == 0.0 {
        return Ok(None);
    }
    let layers = layers(model)?;
    if layers.is_empty() {
        return Ok(None);
    }
    let mut sum: Option<Tensor<1>> = None;
    let mut count = 0usize;
    for (_, layer) in &layers {
        let a = layer.lora_a.val();
        let b = layer.lora_b.val();
        for cov in [
            a.clone().matmul(a.transpose()),
            b.clone().transpose().matmul(b),
        ] {
            count += 1;
            let r = cov.dims()[0];
            if r == 0 {
                continue;
            }
            let eye = Tensor::<2>::eye(r, &cov.device());
            let norm = (cov - eye).square().sum().sqrt();
            sum = Some(match sum {
                None => norm,
                Some(s) => s + norm,
            });
        }
    }
    Ok(sum.map(|s| s / count as f64 * config.orth_reg_weight))
}

/// The step's gradients of every layer's `A`, `E` and `B` (what the allocator scores).
pub fn keep_gradients<M: CausalLm<Adapter = SvdLinear>>(
    model: &M,
    grads: &GradientsParams,
) -> Option<GradientsParams> {
    let layers = layers(model).ok()?;
    let mut kept = GradientsParams::new();
    for (_, layer) in &layers {
        for id in layer.param_ids() {
            if let Some(g) = grads.get::<2>(id) {
                kept.register(id, g);
            }
        }
    }
    Some(kept)
}

/// PEFT's `budget_schedule(step)`: the budget and whether this step masks.
pub fn budget_schedule(
    config: &AdaLoraConfig,
    step: usize,
    initial: usize,
    target: usize,
) -> (usize, bool) {
    let total = config.total_step.unwrap_or(0);
    let (tinit, tfinal) = (config.tinit, config.tfinal);
    if step <= tinit {
        (initial, false)
    } else if step + tfinal > total {
        (target, true)
    } else {
        let span = total.saturating_sub(tfinal + tinit).max(1) as f64;
        let mul = 1.0 - (step - tinit) as f64 / span;
        // Python's `int(...)` of a positive float, `**3` as C's pow.
        let budget = (initial as f64 - target as f64) * mul.powf(3.0) + target as f64;
        (
            budget.max(0.0) as usize,
            step.is_multiple_of(config.delta_t.max(1)),
        )
    }
}

/// PEFT's `update_and_allocate(global_step)` after optimizer step `step`, over `model`'s
/// layers; sets `config.rank_pattern` when it masks.
pub fn after_optimizer_step<M>(
    config: &mut AdaLoraConfig,
    model: M,
    step: usize,
    kept: Option<GradientsParams>,
) -> Result<M>
where
    M: CausalLm<Adapter = SvdLinear, WithAdapter<SvdLinear> = M>,
{
    let boundary = config.total_step.unwrap_or(0).saturating_sub(config.tfinal);
    let mut layers = layers(&model)?;
    // A folder saved after a mask loads cut to its pattern (a trained Hub adapter, a checkpoint
    // of a run): its ranks stay as they are. Allocating over cut layers would write a pattern
    // with fewer flags than `init_r`, which neither PEFT nor peft-rs can load.
    if layers.is_empty() || layers.iter().any(|(_, l)| l.rank() != config.init_r) {
        return Ok(model);
    }
    let initial: usize = layers.iter().map(|(_, l)| l.rank()).sum();
    let target = config.target_r * layers.len();
    if step < boundary {
        let kept = kept.unwrap_or_default();
        for (_, layer) in &mut layers {
            update_importance(config, layer, &kept);
        }
        let (budget, masks) = budget_schedule(config, step, initial, target);
        if masks {
            config.rank_pattern = Some(mask_to_budget(&mut layers, initial, budget, step)?);
        }
    } else if step == boundary {
        config.rank_pattern = Some(mask_to_budget(&mut layers, initial, target, step)?);
        for (_, layer) in &mut layers {
            layer.importance = None;
        }
    } else if let Some(pattern) = &config.rank_pattern {
        for (path, layer) in &mut layers {
            let Some(flags) = pattern.get(&format!("{path}.lora_E")) else {
                continue;
            };
            if flags.len() == layer.rank() {
                let dropped: Vec<bool> = flags.iter().map(|keep| !keep).collect();
                mask_e(layer, &dropped);
            }
        }
    }
    rebuild(model, layers.into_iter().collect())
}

/// PEFT's `update_ipt` for one layer: `I = |p · g|`, `Ī ← β₁Ī + (1−β₁)I`,
/// `Ū ← β₂Ū + (1−β₂)|I − Ī|` for each of `A`, `E`, `B`.
fn update_importance(config: &AdaLoraConfig, layer: &mut SvdLinear, grads: &GradientsParams) {
    let (b1, b2) = (config.beta1 as f32, config.beta2 as f32);
    let (c1, c2) = ((1.0 - config.beta1) as f32, (1.0 - config.beta2) as f32);
    let values = [layer.lora_a.val(), layer.lora_e.val(), layer.lora_b.val()];
    let previous = layer.importance.take();
    let mut next = Vec::with_capacity(3);
    for (i, (id, p)) in layer.param_ids().into_iter().zip(values).enumerate() {
        let p = p.inner();
        let old = previous.as_ref().map(|imp| imp.part(i).clone());
        let Some(g) = grads.get::<2>(id) else {
            // No gradient (a rank-0 layer): the scores stay as they were.
            next.push(old.unwrap_or_else(|| Ema::zeros(&p)));
            continue;
        };
        let ipt = (p.clone() * g.inner()).abs();
        let old = old.unwrap_or_else(|| Ema::zeros(&p));
        let mean = old.mean * b1 + ipt.clone() * c1;
        let spread = old.spread * b2 + (ipt - mean.clone()).abs() * c2;
        next.push(Ema { mean, spread });
    }
    let [a, e, b]: [Ema; 3] = next.try_into().expect("three parts");
    layer.importance = Some(Importance { a, e, b });
}

/// PEFT's `mask_to_budget`: zeroes the `E` entries whose score is at or below the
/// `(initial − budget)`-th smallest and returns every layer's kept flags (`<path>.lora_E`).
fn mask_to_budget(
    layers: &mut [(String, SvdLinear)],
    initial: usize,
    budget: usize,
    step: usize,
) -> Result<BTreeMap<String, Vec<bool>>> {
    let mut scores = Vec::with_capacity(layers.len());
    for (path, layer) in layers.iter() {
        let Some(importance) = &layer.importance else {
            return Err(PeftError::InvalidInput(format!(
                "AdaLoRA's rank allocator has no scores for `{path}` at step {step}: the \
                 budgeting phase (after tinit, before total_step - tfinal) must come first"
            )));
        };
        scores.push(importance.rank_scores()?);
    }
    let mut all: Vec<f32> = scores.iter().flatten().copied().collect();
    all.sort_by(f32::total_cmp);
    // torch.kthvalue(k): the k-th smallest, 1-based. k = 0 (the budget is the whole initial
    // rank; PEFT's kthvalue raises there) masks nothing.
    let k = initial.saturating_sub(budget);
    let threshold = match k {
        0 => f32::NEG_INFINITY,
        k => all[k.min(all.len()) - 1],
    };
    let mut pattern = BTreeMap::new();
    for ((path, layer), scores) in layers.iter_mut().zip(&scores) {
        let dropped: Vec<bool> = scores.iter().map(|s| *s <= threshold).collect();
        mask_e(layer, &dropped);
        pattern.insert(
            format!("{path}.lora_E"),
            dropped.iter().map(|d| !d).collect(),
        );
    }
    Ok(pattern)
}

/// Zeroes `E`'s entries where `dropped` is true, keeping the parameter (its id, so the
/// optimizer's state for it, and whether it trains).
fn mask_e(layer: &mut SvdLinear, dropped: &[bool]) {
    if !dropped.iter().any(|d| *d) {
        return;
    }
    let device = layer.lora_e.val().device();
    let mask = Tensor::<1, Bool>::from_data(
        burn::tensor::TensorData::new(dropped.to_vec(), [dropped.len()]),
        &device,
    )
    .reshape([dropped.len(), 1]);
    // A clone of a parameter keeps its id; `map` keeps it too.
    layer.lora_e = layer.lora_e.clone().map(|t| {
        let trains = t.is_require_grad();
        let masked = t.mask_fill(mask, 0.0).detach();
        if trains {
            masked.require_grad()
        } else {
            masked
        }
    });
}

impl SvdLinear {
    /// The ids of `A`, `E` and `B`, in that order.
    fn param_ids(&self) -> [ParamId; 3] {
        [self.lora_a.id, self.lora_e.id, self.lora_b.id]
    }
}
