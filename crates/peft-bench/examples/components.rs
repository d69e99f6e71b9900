//! Where a training step's time goes, piece by piece, at the bench's shapes (BLOOM hidden 512,
//! 8 heads, vocab 8000, batch 4 × 128), to see what a change to one operation is worth before
//! timing whole steps with `peft-bench`.
//!
//! ```text
//! cargo run --release -p peft-bench --example components            # fused operations, fwd + bwd
//! cargo run --release -p peft-bench --example components -- gemm    # the step's product shapes
//! cargo run --release -p peft-bench --example components -- step    # forward / backward / optimizer
//! ```

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Int, Tensor};
use peft_core::{CausalLm, ModelInput};
use peft_models::layers::{LayerNorm, attend, attention_allowed, gelu_tanh, tied_logits};
use peft_ops::loss::causal_lm_loss;

/// Median and minimum of 8 timed runs of `f` after 2 warm-up runs, in milliseconds.
fn time(name: &str, mut f: impl FnMut()) {
    let mut ms: Vec<f64> = (0..10)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64() * 1e3
        })
        .skip(2)
        .collect();
    ms.sort_by(f64::total_cmp);
    println!("{name:34} median {:7.2} ms   min {:7.2} ms", ms[4], ms[0]);
}

/// The products of a BLOOM layer and the tied `lm_head`, forward shapes and with a transposed
/// right operand as the backward pass reads them.
fn products() {
    let device = Device::flex();
    for (m, k, n) in [
        (512, 512, 1536),
        (512, 512, 512),
        (512, 512, 2048),
        (512, 2048, 512),
        (512, 512, 8000),
        (512, 8000, 512),
    ] {
        let a = Tensor::<2>::random([m, k], Distribution::Default, &device);
        let b = Tensor::<2>::random([k, n], Distribution::Default, &device);
        let bt = Tensor::<2>::random([n, k], Distribution::Default, &device);
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        println!("{m} × {k} × {n}: {gflop:.2} GFLOP");
        time("  rhs [k, n]", || {
            let _ = peft_ops::matmul::matmul(a.clone(), b.clone());
        });
        time("  rhs [n, k]ᵀ", || {
            let _ = peft_ops::matmul::matmul(a.clone(), bt.clone().transpose());
        });
    }
}

/// One LoRA training step of the bench's BLOOM split into its phases.
fn step_phases() {
    let device = Device::flex().autodiff();
    let config = peft_models::HfConfig::Bloom(
        serde_json::from_value(serde_json::json!({
            "model_type": "bloom", "vocab_size": 8000, "hidden_size": 512, "n_layer": 4,
            "n_head": 8, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3
        }))
        .expect("static config"),
    );
    let store = peft_models::random_checkpoint(&config, 0).expect("random checkpoint");
    let base =
        peft_models::load_from_with(&config, &store, &device, &Default::default()).expect("model");
    let lora = peft_lora::get_peft_model(base, peft_lora::LoraConfig::default()).expect("LoRA");
    let mut model = Some(lora.model);
    let ids = Tensor::<2, Int>::random([4, 128], Distribution::Uniform(4.0, 7999.0), &device);
    let mask = Tensor::<2, Int>::ones([4, 128], &device);
    let mut optim = AdamWConfig::new().init();
    let mut phases: [(&str, Vec<f64>); 3] = [
        ("forward + loss", Vec::new()),
        ("backward", Vec::new()),
        ("optimizer", Vec::new()),
    ];
    for _ in 0..12 {
        let m = model.take().expect("model");
        let started = Instant::now();
        let logits = m
            .forward(ModelInput::with_mask(ids.clone(), mask.clone()), None)
            .expect("forward");
        let loss = causal_lm_loss(logits, ids.clone());
        let _ = loss.clone().into_scalar::<f32>();
        phases[0].1.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let grads = loss.backward();
        phases[1].1.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let grads = GradientsParams::from_grads(grads, &m);
        model = Some(optim.step(1e-4, m, grads));
        phases[2].1.push(started.elapsed().as_secs_f64() * 1e3);
    }
    for (name, mut ms) in phases {
        ms.drain(..2);
        ms.sort_by(f64::total_cmp);
        println!("{name:34} median {:7.2} ms", ms[ms.len() / 2]);
    }
}

/// The fused operations (forward and backward) at one layer's shapes, and the output layer.
fn fused_operations() {
    let device = Device::flex().autodiff();
    let logits = Tensor::<3>::random([4, 128, 8000], Distribution::Default, &device).require_grad();
    let labels = Tensor::<2, Int>::random([4, 128], Distribution::Uniform(4.0, 7999.0), &device);
    time("loss", || {
        let grads = causal_lm_loss(logits.clone(), labels.clone()).backward();
        let _ = logits.grad(&grads);
    });
    let h = Tensor::<3>::random([4, 128, 512], Distribution::Default, &device).require_grad();
    let table = Tensor::<2>::random([8000, 512], Distribution::Default, &device);
    time("tied lm_head + loss", || {
        let logits = tied_logits(h.clone(), table.clone());
        let grads = causal_lm_loss(logits, labels.clone()).backward();
        let _ = h.grad(&grads);
    });
    let x = Tensor::<3>::random([4, 128, 2048], Distribution::Default, &device).require_grad();
    time("GELU [4, 128, 2048]", || {
        let grads = gelu_tanh(x.clone()).sum().backward();
        let _ = x.grad(&grads);
    });
    let qkv =
        Tensor::<5>::random([4, 128, 8, 3, 64], Distribution::Default, &device).require_grad();
    let allowed = attention_allowed(&Tensor::<2, Int>::ones([4, 128], &device), 128);
    let alibi = Tensor::<4>::random([4, 8, 1, 128], Distribution::Default, &device);
    time("attention (one layer)", || {
        let head = |i: usize| {
            qkv.clone()
                .slice_dim(3, i..i + 1)
                .reshape([4, 128, 8, 64])
                .swap_dims(1, 2)
        };
        let out = attend(
            head(0),
            head(1),
            head(2),
            0.125,
            Some(alibi.clone()),
            &allowed,
        );
        let grads = out.sum().backward();
        let _ = qkv.grad(&grads);
    });
    let q = Tensor::<4>::random([4, 8, 128, 64], Distribution::Default, &device).require_grad();
    time("attention, separate q/k/v leaves", || {
        let out = attend(
            q.clone(),
            q.clone(),
            q.clone(),
            0.125,
            Some(alibi.clone()),
            &allowed,
        );
        let grads = out.sum().backward();
        let _ = q.grad(&grads);
    });
    let x = Tensor::<3>::random([4, 128, 512], Distribution::Default, &device).require_grad();
    let norm = LayerNorm {
        weight: burn::module::Param::from_tensor(Tensor::ones([512], &device)),
        bias: burn::module::Param::from_tensor(Tensor::zeros([512], &device)),
        eps: 1e-5,
    };
    time("LayerNorm [4, 128, 512]", || {
        let grads = norm.forward(x.clone()).sum().backward();
        let _ = x.grad(&grads);
    });
}

fn main() {
    // SAFETY: first statement of `main`, before any thread is started.
    unsafe { peft_ops::process::prepare() };
    match std::env::args().nth(1).as_deref() {
        Some("gemm") => products(),
        Some("step") => step_phases(),
        _ => fused_operations(),
    }
}
