//! Prefix tuning's optional projection MLP (`prefix_projection`, PEFT's `embedding` and
//! `transform.0/.2`) and its weights under PEFT's names.

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::{PeftError, Result, TensorStore};
use std::path::Path;

/// The projection MLP of `prefix_projection` (PEFT's `embedding` and `transform.0/.2`).
#[derive(Module, Debug)]
pub struct PrefixProjection {
    /// `[n, token_dim]` input embedding.
    pub embedding: Embedding,
    /// `token_dim → encoder_hidden_size`.
    pub transform_0: Linear,
    /// `encoder_hidden_size → layers · 2 · kv_dim`.
    pub transform_2: Linear,
}

impl PrefixProjection {
    /// The table `[n, layers · 2 · kv_dim]`.
    pub fn table(&self) -> Tensor<2> {
        let [n, _] = self.embedding.weight.shape().dims();
        let device = self.embedding.weight.val().device();
        let ids = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, n]);
        let x = self.embedding.forward(ids);
        let x = self.transform_0.forward(x).tanh();
        let x = self.transform_2.forward(x);
        let [_, n, w] = x.dims();
        x.reshape([n, w])
    }
}

/// Loads PEFT's projection weights (`embedding.weight`, `transform.0.*`, `transform.2.*`).
pub fn load_projection(path: &Path, device: &Device) -> Result<PrefixProjection> {
    let store = TensorStore::open(path)?;
    let matrix = |key: &str| -> Result<Tensor<2>> {
        let (v, s) = store.f32(key)?;
        if s.len() != 2 {
            return Err(PeftError::ShapeMismatch {
                path: path.into(),
                key: key.into(),
                expected: vec![0, 0],
                found: s,
            });
        }
        Ok(Tensor::from_data(TensorData::new(v, [s[0], s[1]]), device))
    };
    let vector = |key: &str| -> Result<Param<Tensor<1>>> {
        let (v, s) = store.f32(key)?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(v, [s.iter().product::<usize>()]),
            device,
        )))
    };
    Ok(PrefixProjection {
        embedding: Embedding {
            weight: Param::from_tensor(matrix("embedding.weight")?),
        },
        transform_0: Linear {
            weight: Param::from_tensor(matrix("transform.0.weight")?.transpose()),
            bias: Some(vector("transform.0.bias")?),
        },
        transform_2: Linear {
            weight: Param::from_tensor(matrix("transform.2.weight")?.transpose()),
            bias: Some(vector("transform.2.bias")?),
        },
    })
}
