//! The initialisations that start from the base weight: PiSSA (`init_lora_weights="pissa"`,
//! PEFT's `pissa_init`), OLoRA (`"olora"`, `olora_init`) and LoftQ (`"loftq"`, `loftq_init`).
//!
//! Both factor the frozen weight `W: [out, in]` (PyTorch's layout), take `r` components as the
//! initial pair `(A₀, B₀)` and leave the residual `W − s·B₀A₀` as the base the layer runs over,
//! so that the model is unchanged at the start while the adapter holds `W`'s principal part:
//!
//! * PiSSA: `W = U·diag(S)·Vᵀ`, `A₀ = diag(√(S_r/s))·Vᵀ_r`, `B₀ = U_r·diag(√(S_r/s))`;
//! * OLoRA: `W = Q·R`, `A₀ = R_r` (the first `r` rows), `B₀ = Q_r` (the first `r` columns).
//!
//! LoftQ instead leaves the weight as NF4 quantises it (bitsandbytes' blocks of 64, no double
//! quantisation, de-quantised back to f32 — peft-quant, bit for bit) and starts the pair at the
//! top-`r` SVD factors of the quantisation error `W − Q(W)` (`A₀ = √S_r·Vᵀ_r`, `B₀ = U_r·√S_r`,
//! no scaling), so that `Q(W) + B₀A₀ ≈ W`; with `loftq_iter` > 1 it re-quantises `W − B₀A₀` and
//! factors the new error, alternating.
//!
//! Factors are computed in f64 with nalgebra (already peft-lora's dependency for
//! `add_weighted_adapter`'s SVD; its SVD and QR are exact, PEFT's `torch.linalg` calls are f32).
//! Singular vectors and QR factors have free signs, so two implementations agree on the products
//! `B₀A₀` and the residual, not on `A₀` and `B₀` themselves.

use peft_core::{PeftError, Result};

/// An initialisation that changes the base weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseInit {
    /// PiSSA: the top `r` singular components.
    Pissa,
    /// OLoRA: the first `r` columns of `Q` and rows of `R` of `W = QR`.
    Olora,
    /// LoftQ: the NF4-quantised weight as the base, the pair from the quantisation error
    /// (`loftq_iter` alternations).
    Loftq {
        /// PEFT's `loftq_config["loftq_iter"]`.
        iterations: usize,
    },
}

impl BaseInit {
    /// The `init_lora_weights` string.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pissa => "pissa",
            Self::Olora => "olora",
            Self::Loftq { .. } => "loftq",
        }
    }

    /// Whether PEFT converts an adapter of this initialisation to plain LoRA over the original
    /// base (`path_initial_model_for_weight_conversion`): PiSSA and OLoRA; a LoftQ adapter is
    /// meant for the quantised base.
    pub fn converts(self) -> bool {
        matches!(self, Self::Pissa | Self::Olora)
    }

    /// `(A₀: [r, in], B₀: [out, r], the new base weight [out, in])` for `w: [out, in]`
    /// (row-major, PyTorch's layout) and the layer's `scaling` (PiSSA divides the singular
    /// values by it): the residual `W − s·B₀A₀` for PiSSA and OLoRA, the de-quantised weight
    /// for LoftQ.
    pub fn initialise(
        self,
        w: &[f32],
        [out, d_in]: [usize; 2],
        r: usize,
        scaling: f64,
        path: &str,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let k = out.min(d_in);
        if r > k {
            return Err(PeftError::InvalidInput(format!(
                "{} on `{path}`: rank {r} exceeds the weight's {k} components ([{out}, {d_in}])",
                self.name()
            )));
        }
        let (a, b) = match self {
            Self::Loftq { iterations } => return loftq(w, [out, d_in], r, iterations, path),
            Self::Pissa => pissa(matrix(w, [out, d_in]), r, scaling, path)?,
            Self::Olora => olora(matrix(w, [out, d_in]), r),
        };
        let res = residual(w, [out, d_in], (&a, &b), r, scaling);
        Ok((a, b, res))
    }
}

/// `w: [out, in]` (row-major) as an f64 matrix.
fn matrix(w: &[f32], [out, d_in]: [usize; 2]) -> nalgebra::DMatrix<f64> {
    nalgebra::DMatrix::<f64>::from_fn(out, d_in, |i, j| w[i * d_in + j] as f64)
}

/// PEFT's `loftq_init` with 4 bits: `res = W`; each iteration quantises `res` to NF4 (blocks of
/// 64, no double quantisation), takes the top-`r` SVD factors of `W − Q(res)`, and (but for
/// the last) sets `res = W − B₀A₀`. Returns `(A₀, B₀, Q(res))` of the last iteration; `r` is
/// within the weight's rank ([`BaseInit::initialise`] checks).
fn loftq(
    w: &[f32],
    [out, d_in]: [usize; 2],
    r: usize,
    iterations: usize,
    path: &str,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let config = peft_quant::QuantConfig {
        quant_type: peft_quant::QuantType::Nf4,
        blocksize: 64,
        double_quant: false,
    };
    let mut res = w.to_vec();
    for i in 0..iterations.max(1) {
        let quantized = peft_quant::Quantized4bit::quantize(
            &res,
            &[out, d_in],
            peft_quant::SourceDtype::F32,
            config,
        )
        .map_err(|e| PeftError::InvalidInput(format!("loftq on `{path}`: {e}")))?;
        let dequantized = quantized.dequantize_f32();
        let error: Vec<f32> = w.iter().zip(&dequantized).map(|(w, q)| w - q).collect();
        let (a, b) = pissa(matrix(&error, [out, d_in]), r, 1.0, path)?;
        if i + 1 >= iterations {
            return Ok((a, b, dequantized));
        }
        res = residual(w, [out, d_in], (&a, &b), r, 1.0);
    }
    unreachable!("the loop returns on its last iteration")
}

fn pissa(
    matrix: nalgebra::DMatrix<f64>,
    r: usize,
    scaling: f64,
    path: &str,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (out, d_in) = matrix.shape();
    let svd = matrix.svd(true, true);
    let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
        return Err(PeftError::InvalidInput(format!(
            "pissa on `{path}`: the SVD gave no singular vectors"
        )));
    };
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&i, &j| svd.singular_values[j].total_cmp(&svd.singular_values[i]));
    let mut a = vec![0f32; r * d_in];
    let mut b = vec![0f32; out * r];
    for (k, &idx) in order.iter().take(r).enumerate() {
        let root = (svd.singular_values[idx] / scaling).sqrt();
        for j in 0..d_in {
            a[k * d_in + j] = (root * v_t[(idx, j)]) as f32;
        }
        for i in 0..out {
            b[i * r + k] = (u[(i, idx)] * root) as f32;
        }
    }
    Ok((a, b))
}

fn olora(matrix: nalgebra::DMatrix<f64>, r: usize) -> (Vec<f32>, Vec<f32>) {
    let (out, d_in) = matrix.shape();
    let qr = matrix.qr();
    let (q, rm) = (qr.q(), qr.r());
    let a = (0..r)
        .flat_map(|k| (0..d_in).map(move |j| (k, j)))
        .map(|(k, j)| rm[(k, j)] as f32)
        .collect();
    let b = (0..out)
        .flat_map(|i| (0..r).map(move |k| (i, k)))
        .map(|(i, k)| q[(i, k)] as f32)
        .collect();
    (a, b)
}

/// `W − s·B₀A₀`, `[out, in]`.
pub fn residual(
    w: &[f32],
    [out, d_in]: [usize; 2],
    (a, b): (&[f32], &[f32]),
    r: usize,
    scaling: f64,
) -> Vec<f32> {
    let mut res = w.to_vec();
    for i in 0..out {
        for j in 0..d_in {
            let product: f64 = (0..r)
                .map(|k| b[i * r + k] as f64 * a[k * d_in + j] as f64)
                .sum();
            res[i * d_in + j] = (w[i * d_in + j] as f64 - scaling * product) as f32;
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3 × 2 matrix: PiSSA's product at full rank is `W / s` (the residual vanishes); OLoRA's
    /// is `W` itself; at rank 1 PiSSA keeps the top singular component.
    #[test]
    fn full_rank_factors_reconstruct_the_weight() {
        let w = [3.0f32, 1.0, 1.0, 3.0, 0.0, 2.0];
        for init in [BaseInit::Pissa, BaseInit::Olora] {
            let (_, _, res) = init.initialise(&w, [3, 2], 2, 2.0, "t").unwrap();
            let expected_scale = match init {
                BaseInit::Olora => -1.0,
                _ => 0.0,
            };
            for (r, w) in res.iter().zip(w) {
                assert!((r - expected_scale * w).abs() < 1e-5, "{init:?}: {res:?}");
            }
        }
        // Rank 1: the residual is orthogonal to the kept direction, so its norm is the second
        // singular value (W's singular values: √(14 ± √52)... checked against the Frobenius norm).
        let (a, b, res) = BaseInit::Pissa.initialise(&w, [3, 2], 1, 1.0, "t").unwrap();
        let frob2: f32 = w.iter().map(|v| v * v).sum();
        let res2: f32 = res.iter().map(|v| v * v).sum();
        let top2: f32 = a.iter().map(|v| v * v).sum::<f32>() * b.iter().map(|v| v * v).sum::<f32>();
        assert!((frob2 - res2 - top2).abs() < 1e-4, "{frob2} {res2} {top2}");
        assert!(res2 < top2);
        let err = BaseInit::Olora
            .initialise(&w, [3, 2], 3, 1.0, "x.q_proj")
            .unwrap_err()
            .to_string();
        assert!(err.contains("olora on `x.q_proj`: rank 3 exceeds"), "{err}");
    }

    /// LoftQ with one iteration at full rank: the base is W's NF4 round trip (quantising it again
    /// changes nothing) and the pair holds the whole quantisation error, so `Q(W) + B₀A₀ = W`.
    #[test]
    fn loftq_splits_the_weight_into_its_nf4_part_and_the_error() {
        let (out, d_in) = (4, 32);
        let w: Vec<f32> = (0..out * d_in)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let init = BaseInit::Loftq { iterations: 1 };
        let (a, b, base) = init.initialise(&w, [out, d_in], 4, 2.0, "t").unwrap();
        let again = loftq(&base, [out, d_in], 1, 1, "t").unwrap().2;
        assert_eq!(again, base, "NF4 of a de-quantised weight is itself");
        let back = residual(&w, [out, d_in], (&a, &b), 4, 1.0);
        for (r, q) in back.iter().zip(&base) {
            assert!((r - q).abs() < 1e-5, "W − B₀A₀ should be Q(W): {r} vs {q}");
        }
        assert!(
            base.iter().zip(&w).any(|(q, w)| (q - w).abs() > 1e-3),
            "NF4 is lossy here"
        );
        assert!(!init.converts() && BaseInit::Pissa.converts());
    }
}
