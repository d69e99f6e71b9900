//! PEFT's `add_weighted_adapter`: one LoRA pair from several, per layer.
//!
//! All arithmetic is on host `f32` matrices in PyTorch's layout (`A: [r, in]`, `B: [out, r]`),
//! following PEFT 0.21.2's `LoraModel.add_weighted_adapter` and `peft.utils.merge_utils`
//! operation by operation:
//!
//! * `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` combine the A's and the B's
//!   separately (equal ranks), each adapter weighted by `√|w·s|` on both sides with the sign of
//!   `w·s` on A;
//! * `cat` stacks `w·s·Aᵢ` and `Bᵢ` (rank = the sum of ranks);
//! * the `*_svd` types combine the dense updates `ΔWᵢ = s·Bᵢ·Aᵢ`, weighted by `w`, and split the
//!   result by a truncated SVD: `B = U·diag(S)`, `A = Vᵀ` (rank `svd_rank`, default the largest
//!   rank). (PEFT's main branch after 0.21.2 weights them by `w·s`, scaling twice; we follow the
//!   pinned release.)
//!
//! The combined adapter has `lora_alpha = r`: its scaling is 1 (√r with rsLoRA, as PEFT copies
//! the first adapter's `use_rslora`). DARE's random masks come from a seeded generator here and
//! from torch's there, so they agree in distribution, not bit for bit (at `density ≥ 1` no value
//! is dropped and both are exact). An SVD's singular vectors are defined up to sign, so the
//! pairs may differ in sign from PEFT's while `B·A` agrees.

use std::str::FromStr;

use peft_core::{PeftError, Result};
use rand::{Rng, SeedableRng};

/// PEFT's `combination_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CombinationType {
    /// Weighted sum of the A's and of the B's.
    Linear,
    /// The pairs stacked: rank = Σ rᵢ, exact `Σ wᵢ·sᵢ·Bᵢ·Aᵢ`.
    Cat,
    /// Truncated SVD of `Σ wᵢ·sᵢ·ΔWᵢ`.
    Svd,
    /// TIES merging (trim by magnitude, elect a sign, disjoint mean) of the A's and the B's.
    Ties,
    /// TIES on the dense updates, then SVD.
    TiesSvd,
    /// DARE (random drop, rescale) then a weighted sum.
    DareLinear,
    /// DARE then TIES' sign election.
    DareTies,
    /// DARE on the dense updates, weighted sum, SVD.
    DareLinearSvd,
    /// DARE + TIES on the dense updates, SVD.
    DareTiesSvd,
    /// Magnitude pruning then a weighted sum.
    MagnitudePrune,
    /// Magnitude pruning on the dense updates, weighted sum, SVD.
    MagnitudePruneSvd,
}

/// Every combination type with PEFT's name for it.
pub const COMBINATION_TYPES: [(&str, CombinationType); 11] = [
    ("linear", CombinationType::Linear),
    ("cat", CombinationType::Cat),
    ("svd", CombinationType::Svd),
    ("ties", CombinationType::Ties),
    ("ties_svd", CombinationType::TiesSvd),
    ("dare_linear", CombinationType::DareLinear),
    ("dare_ties", CombinationType::DareTies),
    ("dare_linear_svd", CombinationType::DareLinearSvd),
    ("dare_ties_svd", CombinationType::DareTiesSvd),
    ("magnitude_prune", CombinationType::MagnitudePrune),
    ("magnitude_prune_svd", CombinationType::MagnitudePruneSvd),
];

impl FromStr for CombinationType {
    type Err = PeftError;
    fn from_str(s: &str) -> Result<Self> {
        COMBINATION_TYPES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let names: Vec<&str> = COMBINATION_TYPES.iter().map(|(n, _)| *n).collect();
                PeftError::config(
                    "add_weighted_adapter",
                    "combination_type",
                    format!("`{s}` is not one of {}", names.join(", ")),
                )
            })
    }
}

impl CombinationType {
    /// PEFT's name.
    pub fn name(self) -> &'static str {
        COMBINATION_TYPES
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("linear", |(n, _)| *n)
    }

    /// Whether the dense updates are combined and split by SVD.
    pub fn is_svd(self) -> bool {
        self.name().ends_with("_svd") || self == Self::Svd
    }

    /// Whether the adapters must share one rank (the A's and B's are combined elementwise).
    pub fn needs_equal_ranks(self) -> bool {
        !self.is_svd() && self != Self::Cat
    }

    /// Whether `density` is used.
    pub fn uses_density(self) -> bool {
        !matches!(self, Self::Linear | Self::Cat | Self::Svd)
    }
}

/// How TIES elects each element's sign (`majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// The sign of the sum of the values.
    #[default]
    Total,
    /// The sign held by more adapters.
    Frequency,
}

impl FromStr for MajoritySign {
    type Err = PeftError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            other => Err(PeftError::config(
                "add_weighted_adapter",
                "majority_sign_method",
                format!("`{other}` is not `total` or `frequency`"),
            )),
        }
    }
}

/// The options of `add_weighted_adapter`.
#[derive(Debug, Clone, PartialEq)]
pub struct Combination {
    /// How the adapters are combined.
    pub combination_type: CombinationType,
    /// Rank of an SVD-based result (default: the largest rank combined).
    pub svd_rank: Option<usize>,
    /// Fraction of values kept by the pruning types, in `[0, 1]`.
    pub density: Option<f64>,
    /// TIES' sign election.
    pub majority_sign_method: MajoritySign,
    /// Seed of DARE's random masks.
    pub seed: u64,
}

impl Combination {
    /// `combination_type` with PEFT's defaults for the rest.
    pub fn new(combination_type: CombinationType) -> Self {
        Self {
            combination_type,
            svd_rank: None,
            density: None,
            majority_sign_method: MajoritySign::Total,
            seed: 0,
        }
    }

    /// The density a pruning type needs, checked.
    fn density(&self) -> Result<f64> {
        let density = self.density.ok_or_else(|| {
            PeftError::config(
                "add_weighted_adapter",
                "density",
                format!("`{}` needs a density", self.combination_type.name()),
            )
        })?;
        if density.is_nan() || density < 0.0 {
            return Err(PeftError::config(
                "add_weighted_adapter",
                "density",
                format!("must be ≥ 0, got {density}"),
            ));
        }
        Ok(density)
    }
}

/// One adapter's pair on one layer, PyTorch layout, with its scaling and weight.
#[derive(Debug, Clone)]
pub struct WeightedPair {
    /// `[r, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, r]`, row-major.
    pub b: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// `α/r` (or `α/√r`).
    pub scaling: f64,
    /// The user's weight for this adapter.
    pub weight: f64,
}

/// Combines the pairs one layer holds (`[d_in → d_out]`) into one of rank `new_rank`:
/// `(A [new_rank, in], B [out, new_rank])`.
pub fn combine_layer(
    pairs: &[WeightedPair],
    (d_in, d_out): (usize, usize),
    new_rank: usize,
    options: &Combination,
    rng: &mut rand::rngs::StdRng,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if pairs.is_empty() {
        return Err(PeftError::InvalidInput(
            "add_weighted_adapter: no adapter to combine on a targeted layer".into(),
        ));
    }
    let kind = options.combination_type;
    if kind == CombinationType::Cat {
        let mut a = vec![0f32; new_rank * d_in];
        let mut b = vec![0f32; d_out * new_rank];
        let mut row = 0;
        for p in pairs {
            let factor = (p.weight * p.scaling) as f32;
            for (dst, src) in a[row * d_in..(row + p.r) * d_in].iter_mut().zip(&p.a) {
                *dst = src * factor;
            }
            for o in 0..d_out {
                b[o * new_rank + row..o * new_rank + row + p.r]
                    .copy_from_slice(&p.b[o * p.r..(o + 1) * p.r]);
            }
            row += p.r;
        }
        return Ok((a, b));
    }
    if kind.is_svd() {
        let deltas: Vec<Vec<f32>> = pairs.iter().map(|p| delta_weight(p, d_in, d_out)).collect();
        // PEFT 0.21.2 weights the dense updates (already scaled) by the user's weights alone.
        let weights: Vec<f32> = pairs.iter().map(|p| p.weight as f32).collect();
        let delta = merge_tasks(&deltas, &weights, options, rng)?;
        return truncated_svd(&delta, d_out, d_in, new_rank);
    }
    if let Some(p) = pairs.iter().find(|p| p.r != new_rank) {
        return Err(PeftError::config(
            "add_weighted_adapter",
            "adapters",
            format!(
                "`{}` combines pairs of one rank, but a layer holds ranks {} and {new_rank} \
                 (rank_pattern?)",
                kind.name(),
                p.r
            ),
        ));
    }
    let mut weights_a = Vec::with_capacity(pairs.len());
    let mut weights_b = Vec::with_capacity(pairs.len());
    for p in pairs {
        let w = p.weight * p.scaling;
        let root = w.abs().sqrt();
        weights_a.push((if w >= 0.0 { root } else { -root }) as f32);
        weights_b.push(root as f32);
    }
    let a_tasks: Vec<Vec<f32>> = pairs.iter().map(|p| p.a.clone()).collect();
    let b_tasks: Vec<Vec<f32>> = pairs.iter().map(|p| p.b.clone()).collect();
    let a = merge_tasks(&a_tasks, &weights_a, options, rng)?;
    let b = merge_tasks(&b_tasks, &weights_b, options, rng)?;
    Ok((a, b))
}

/// `s · B·A`, `[out, in]` (PEFT's `get_delta_weight`).
fn delta_weight(p: &WeightedPair, d_in: usize, d_out: usize) -> Vec<f32> {
    let mut out = vec![0f32; d_out * d_in];
    for o in 0..d_out {
        let row = &mut out[o * d_in..(o + 1) * d_in];
        for k in 0..p.r {
            let bk = p.b[o * p.r + k];
            for (dst, a) in row.iter_mut().zip(&p.a[k * d_in..(k + 1) * d_in]) {
                *dst += bk * a;
            }
        }
    }
    let s = p.scaling as f32;
    out.iter_mut().for_each(|v| *v *= s);
    out
}

/// The combination `kind` of equally shaped task tensors with per-task `weights`.
fn merge_tasks(
    tasks: &[Vec<f32>],
    weights: &[f32],
    options: &Combination,
    rng: &mut rand::rngs::StdRng,
) -> Result<Vec<f32>> {
    use CombinationType as C;
    let kind = options.combination_type;
    let pruned: Vec<Vec<f32>> = match kind {
        C::Linear | C::Svd => tasks.to_vec(),
        C::Ties | C::TiesSvd | C::MagnitudePrune | C::MagnitudePruneSvd => {
            let density = options.density()?;
            tasks.iter().map(|t| magnitude_prune(t, density)).collect()
        }
        C::DareLinear | C::DareTies | C::DareLinearSvd | C::DareTiesSvd => {
            let density = options.density()?;
            tasks
                .iter()
                .map(|t| random_prune(t, density, rng))
                .collect()
        }
        // `cat` stacks the pairs in `combine_layer` and never reaches here.
        C::Cat => tasks.to_vec(),
    };
    Ok(match kind {
        C::Ties | C::TiesSvd | C::DareTies | C::DareTiesSvd => {
            disjoint_merge(&pruned, weights, options.majority_sign_method)
        }
        _ => task_arithmetic(&pruned, weights),
    })
}

/// `Σ wᵢ·tᵢ`.
pub fn task_arithmetic(tasks: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; tasks[0].len()];
    for (t, &w) in tasks.iter().zip(weights) {
        for (o, v) in out.iter_mut().zip(t) {
            *o += v * w;
        }
    }
    out
}

/// Keeps the `⌊density · n⌋` values of largest magnitude, zeroes the rest (`density ≥ 1`: all).
pub fn magnitude_prune(t: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    let mut out = vec![0f32; t.len()];
    for &i in &order[..k] {
        out[i] = t[i];
    }
    out
}

/// Keeps each value with probability `density` and divides the kept ones by `density` (DARE;
/// `density ≥ 1`: all kept, unscaled).
pub fn random_prune(t: &[f32], density: f64, rng: &mut impl Rng) -> Vec<f32> {
    if density >= 1.0 {
        return t.to_vec();
    }
    let scale = density as f32;
    t.iter()
        .map(|&v| {
            if rng.random::<f64>() < density {
                v / scale
            } else {
                0.0
            }
        })
        .collect()
}

/// TIES' sign election and disjoint mean: per element, the weighted values whose sign agrees
/// with the elected one, averaged over how many agree (at least 1).
pub fn disjoint_merge(tasks: &[Vec<f32>], weights: &[f32], method: MajoritySign) -> Vec<f32> {
    let sign = |v: f32| {
        if v > 0.0 {
            1.0
        } else if v < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    (0..tasks[0].len())
        .map(|i| {
            let magnitude: f32 = match method {
                MajoritySign::Total => tasks.iter().map(|t| t[i]).sum(),
                MajoritySign::Frequency => tasks.iter().map(|t| sign(t[i])).sum(),
            };
            let elected = if magnitude >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut kept) = (0f32, 0f32);
            for (t, &w) in tasks.iter().zip(weights) {
                if sign(t[i]) == elected {
                    sum += t[i] * w;
                    kept += 1.0;
                }
            }
            sum / kept.max(1.0)
        })
        .collect()
}

/// `(A = Vᵀ[:r], B = U[:, :r]·diag(S[:r]))` of the `[rows, cols]` matrix `m`, singular values in
/// descending order (computed in f64). `r` is capped by `min(rows, cols)` (the rest of the
/// factors stays zero).
pub fn truncated_svd(
    m: &[f32],
    rows: usize,
    cols: usize,
    r: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let matrix = nalgebra::DMatrix::<f64>::from_fn(rows, cols, |i, j| m[i * cols + j] as f64);
    let svd = matrix.svd(true, true);
    let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
        return Err(PeftError::InvalidInput(
            "add_weighted_adapter: the SVD gave no singular vectors".into(),
        ));
    };
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let mut a = vec![0f32; r * cols];
    let mut b = vec![0f32; rows * r];
    for (k, &idx) in order.iter().take(r).enumerate() {
        let s = svd.singular_values[idx];
        for j in 0..cols {
            a[k * cols + j] = v_t[(idx, j)] as f32;
        }
        for i in 0..rows {
            b[i * r + k] = (u[(i, idx)] * s) as f32;
        }
    }
    Ok((a, b))
}

/// A generator for DARE's masks.
pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for (name, kind) in COMBINATION_TYPES {
            assert_eq!(name.parse::<CombinationType>().unwrap(), kind);
            assert_eq!(kind.name(), name);
        }
        let err = "average"
            .parse::<CombinationType>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`average` is not one of linear, cat, svd"),
            "{err}"
        );
        assert!("majority".parse::<MajoritySign>().is_err());
    }

    #[test]
    fn magnitude_prune_keeps_the_largest() {
        // ⌊0.5 · 5⌋ = 2 values kept: -4 and 3.
        assert_eq!(
            magnitude_prune(&[1.0, -4.0, 3.0, 0.5, -2.0], 0.5),
            vec![0.0, -4.0, 3.0, 0.0, 0.0]
        );
        assert_eq!(magnitude_prune(&[1.0, -2.0], 1.0), vec![1.0, -2.0]);
    }

    #[test]
    fn ties_elects_a_sign_and_averages_the_agreeing_values() {
        let tasks = vec![vec![2.0, -1.0, 0.0], vec![-1.0, -3.0, 0.0]];
        // Element 0: total 1 ≥ 0 → +: only task 0 agrees: 2·0.5 / 1 = 1.
        // Element 1: total -4 → -: both agree: (-1·0.5 + -3·2) / 2 = -3.25.
        // Element 2: zeros have no sign: 0 / max(0, 1) = 0.
        let out = disjoint_merge(&tasks, &[0.5, 2.0], MajoritySign::Total);
        assert_eq!(out, vec![1.0, -3.25, 0.0]);
        // Frequency: element 0 has one + and one - → sum 0 → +, the same; a 2-vs-1 split picks
        // the more frequent sign even against a larger magnitude.
        let tasks = vec![vec![1.0], vec![1.0], vec![-10.0]];
        let out = disjoint_merge(&tasks, &[1.0, 1.0, 1.0], MajoritySign::Frequency);
        assert_eq!(out, vec![1.0]);
        let out = disjoint_merge(&tasks, &[1.0, 1.0, 1.0], MajoritySign::Total);
        assert_eq!(out, vec![-10.0]);
    }

    #[test]
    fn random_prune_keeps_about_density_and_rescales() {
        let t = vec![1.0f32; 20_000];
        let out = random_prune(&t, 0.25, &mut rng(7));
        let kept: Vec<f32> = out.iter().copied().filter(|v| *v != 0.0).collect();
        let fraction = kept.len() as f64 / t.len() as f64;
        assert!((fraction - 0.25).abs() < 0.015, "kept {fraction}");
        assert!(kept.iter().all(|&v| v == 4.0));
        assert_eq!(random_prune(&t[..3], 1.0, &mut rng(7)), vec![1.0; 3]);
    }

    #[test]
    fn cat_is_the_exact_weighted_sum_of_updates() {
        // Two rank-1 pairs on a [2 → 2] layer: B·A of the result = Σ w·s·Bᵢ·Aᵢ.
        let pairs = [
            WeightedPair {
                a: vec![1.0, 2.0],
                b: vec![3.0, 4.0],
                r: 1,
                scaling: 2.0,
                weight: 0.5,
            },
            WeightedPair {
                a: vec![-1.0, 1.0],
                b: vec![1.0, 0.0],
                r: 1,
                scaling: 1.0,
                weight: -2.0,
            },
        ];
        let options = Combination::new(CombinationType::Cat);
        let (a, b) = combine_layer(&pairs, (2, 2), 2, &options, &mut rng(0)).unwrap();
        assert_eq!(a, vec![1.0, 2.0, 2.0, -2.0]);
        assert_eq!(b, vec![3.0, 1.0, 4.0, 0.0]);
    }

    #[test]
    fn svd_of_a_rank_one_matrix_reconstructs_it() {
        // [[3, 6], [4, 8]] = [3, 4]ᵀ·[1, 2]: one singular value, 5·√5.
        let m = [3.0f32, 6.0, 4.0, 8.0];
        let (a, b) = truncated_svd(&m, 2, 2, 1).unwrap();
        let rebuilt: Vec<f32> = (0..4).map(|i| b[i / 2] * a[i % 2]).collect();
        for (x, y) in rebuilt.iter().zip(m) {
            assert!((x - y).abs() < 1e-5, "{rebuilt:?}");
        }
        let norm_a = (a[0] * a[0] + a[1] * a[1]).sqrt();
        assert!((norm_a - 1.0).abs() < 1e-6);
    }

    #[test]
    fn linear_weights_a_with_the_sign_and_both_sides_with_the_root() {
        let pairs = [WeightedPair {
            a: vec![1.0],
            b: vec![1.0],
            r: 1,
            scaling: 2.0,
            weight: -2.0,
        }];
        let options = Combination::new(CombinationType::Linear);
        let (a, b) = combine_layer(&pairs, (1, 1), 1, &options, &mut rng(0)).unwrap();
        // w·s = -4: A · -2, B · 2, so B·A = -4.
        assert_eq!((a, b), (vec![-2.0], vec![2.0]));
        let options = Combination::new(CombinationType::Ties);
        let err = combine_layer(&pairs, (1, 1), 1, &options, &mut rng(0)).unwrap_err();
        assert!(err.to_string().contains("`ties` needs a density"), "{err}");
        // A layer whose pair has another rank than the combination's (a rank_pattern) is
        // refused, not combined element by element over mismatched shapes.
        let options = Combination::new(CombinationType::Linear);
        let err = combine_layer(&pairs, (1, 1), 2, &options, &mut rng(0)).unwrap_err();
        assert!(err.to_string().contains("ranks 1 and 2"), "{err}");
    }
}
