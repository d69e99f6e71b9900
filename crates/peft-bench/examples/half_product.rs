//! Times one frozen-layer product three ways (f32 weight, 16-bit weight widened whole,
//! 16-bit weight widened per block) at a real layer's shape: what holding weights as stored costs.
//!
//! `cargo run --release -p peft-bench --example half_product -- [rows] [in] [out]`

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use peft_core::PackedWeight;
use peft_ops::half::HalfWeight;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (rows, d_in, d_out) = match args.as_slice() {
        [r, i, o] => (*r, *i, *o),
        _ => (256, 2048, 8192),
    };
    let device = Device::flex();
    let values: Vec<f32> = (0..d_in * d_out)
        .map(|i| ((i % 97) as f32 - 48.0) / 2000.0)
        .collect();
    let half = HalfWeight::bf16_from_f32([d_out, d_in], &values).unwrap();
    let weight: Arc<dyn PackedWeight> = Arc::new(half.clone());
    let w = peft_tensors::layout::burn_linear_weight(&half.dequantize(), [d_out, d_in], &device);
    let x = Tensor::<3>::random([1, rows, d_in], Distribution::Default, &device);
    let time = |name: &str, f: &dyn Fn() -> Tensor<3>| {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let out = f();
            let _ = out.into_data();
            best = best.min(t.elapsed().as_secs_f64());
        }
        let gflop = 2.0 * (rows * d_in * d_out) as f64 / 1e9;
        println!(
            "{name:>28}: {:.2} ms, {:.0} GFLOP/s",
            best * 1e3,
            gflop / best
        );
    };
    time("f32 weight (blas::linear)", &|| {
        peft_ops::matmul::linear(x.clone(), w.clone(), None)
    });
    time("bf16 held, packed op", &|| {
        peft_ops::packed_op::packed_linear(x.clone(), &weight, None)
    });
    time("dot products (direct)", &|| {
        let xs = x
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        let out = half.matmul_rows_direct(&xs, rows).unwrap_or_default();
        Tensor::<3>::from_data(TensorData::new(out, [1, rows, d_out]), &device)
    });
    time("widen whole + matmul", &|| {
        let dense =
            Tensor::<2>::from_data(TensorData::new(half.dequantize(), [d_out, d_in]), &device);
        peft_ops::matmul::linear(x.clone(), dense.transpose(), None)
    });
    // Forward and backward (∂x) through autodiff, as in a training step.
    let ad = device.clone().autodiff();
    let xa = Tensor::<3>::random([1, rows, d_in], Distribution::Default, &ad).require_grad();
    let wa = Tensor::<2>::from_data(w.to_data(), &ad);
    let train = |name: &str, f: &dyn Fn() -> Tensor<3>| {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let g = xa.grad(&f().sum().backward()).unwrap();
            let _ = g.into_data();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("{name:>28}: {:.2} ms forward + backward", best * 1e3);
    };
    train("f32 weight", &|| {
        peft_ops::matmul::linear(xa.clone(), wa.clone(), None)
    });
    train("bf16 held", &|| {
        peft_ops::packed_op::packed_linear(xa.clone(), &weight, None)
    });
    let t = Instant::now();
    for _ in 0..5 {
        let _ = half.dequantize();
    }
    println!(
        "{:>28}: {:.2} ms",
        "widen whole only",
        t.elapsed().as_secs_f64() * 200.0
    );
}
