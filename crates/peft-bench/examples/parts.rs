use burn::tensor::{Device, Distribution, Int, Tensor, activation::softmax};
use peft_core::loss::causal_lm_loss;
use std::time::Instant;

fn t(name: &str, mut f: impl FnMut()) {
    for _ in 0..2 {
        f();
    }
    let mut v = vec![];
    for _ in 0..8 {
        let s = Instant::now();
        f();
        v.push(s.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("{name:30} median {:.2} ms  min {:.2}", v[4], v[0]);
}

fn main() {
    unsafe { peft_core::process::prepare() };
    if std::env::args().nth(1).as_deref() == Some("gemm") {
        let d = Device::flex();
        for (m, k, n, reps) in [
            (512, 512, 1536, 4),
            (512, 512, 512, 1),
            (512, 512, 2048, 1),
            (512, 2048, 512, 1),
            (512, 512, 8000, 1),
            (512, 8000, 512, 1),
        ] {
            let a = Tensor::<2>::random([m, k], Distribution::Default, &d);
            let b = Tensor::<2>::random([k, n], Distribution::Default, &d);
            let bt = Tensor::<2>::random([n, k], Distribution::Default, &d);
            t(&format!("{m}x{k}x{n}"), || {
                let _ = peft_core::blas::matmul(a.clone(), b.clone());
            });
            t(&format!("{m}x{k}x{n} (rhs T)"), || {
                let _ = peft_core::blas::matmul(a.clone(), bt.clone().transpose());
            });
            let _ = reps;
        }
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("step") {
        step_split();
        return;
    }
    let d = Device::flex().autodiff();
    let logits = Tensor::<3>::random([4, 128, 8000], Distribution::Default, &d).require_grad();
    let labels = Tensor::<2, Int>::random([4, 128], Distribution::Uniform(4.0, 7999.0), &d);
    t("loss fwd", || {
        let _ = causal_lm_loss(logits.clone(), labels.clone()).into_scalar::<f32>();
    });
    t("loss fwd+bwd", || {
        let l = causal_lm_loss(logits.clone(), labels.clone());
        let g = l.backward();
        let _ = logits.grad(&g).unwrap().into_data();
    });
    let x = Tensor::<3>::random([4, 128, 2048], Distribution::Default, &d).require_grad();
    t("gelu fwd+bwd (1 layer)", || {
        let y = peft_models::layers::gelu_tanh(x.clone());
        let g = y.sum().backward();
        let _ = x.grad(&g).unwrap().into_data();
    });
    let s = Tensor::<4>::random([4, 8, 128, 128], Distribution::Default, &d).require_grad();
    t("softmax fwd+bwd (1 layer)", || {
        let y = softmax(s.clone(), 3);
        let g = (y * s.clone()).sum().backward();
        let _ = s.grad(&g).unwrap().into_data();
    });
    let h = Tensor::<3>::random([4, 128, 512], Distribution::Default, &d).require_grad();
    let table = Tensor::<2>::random([8000, 512], Distribution::Default, &d);
    t("tied logits fwd+bwd", || {
        let y = peft_models::layers::tied_logits(h.clone(), table.clone());
        let g = y.sum().backward();
        let _ = h.grad(&g).unwrap().into_data();
    });
    t("tied+loss fwd+bwd", || {
        let y = peft_models::layers::tied_logits(h.clone(), table.clone());
        let g = causal_lm_loss(y, labels.clone()).backward();
        let _ = h.grad(&g).unwrap().into_data();
    });

    {
        let qkv = Tensor::<5>::random([4, 128, 8, 3, 64], Distribution::Default, &d).require_grad();
        let mask = Tensor::<2, Int>::ones([4, 128], &d);
        let allowed = peft_models::layers::attention_allowed(&mask, 128);
        let bias = Tensor::<4>::random([4, 8, 1, 128], Distribution::Default, &d);
        t("attention fwd+bwd (1 layer)", || {
            let pick = |i: usize| {
                qkv.clone()
                    .slice_dim(3, i..i + 1)
                    .reshape([4, 128, 8, 64])
                    .swap_dims(1, 2)
            };
            let out = peft_models::layers::attend(
                pick(0),
                pick(1),
                pick(2),
                0.125,
                Some(bias.clone()),
                &allowed,
            );
            let g = out.sum().backward();
            let _ = qkv.grad(&g).unwrap().into_data();
        });
    }
    let x = Tensor::<3>::random([4, 128, 512], Distribution::Default, &d).require_grad();
    let w = Tensor::<1>::random([512], Distribution::Default, &d).require_grad();
    let bb = Tensor::<1>::random([512], Distribution::Default, &d).require_grad();
    t("layernorm fwd+bwd (1)", || {
        let (var, mean) = x.clone().var_mean_bias(2);
        let normed = (x.clone() - mean).div((var + 1e-5).sqrt());
        let y = normed * w.clone().unsqueeze() + bb.clone().unsqueeze();
        let g = y.sum().backward();
        let _ = x.grad(&g).unwrap().into_data();
    });
    t("rmsnorm fwd+bwd (1)", || {
        let ms = x.clone().square().mean_dim(2);
        let y = x.clone() * (ms + 1e-5).sqrt().recip() * w.clone().unsqueeze();
        let g = y.sum().backward();
        let _ = x.grad(&g).unwrap().into_data();
    });
    let a = Tensor::<3>::random([4, 128, 1408], Distribution::Default, &d).require_grad();
    let u = Tensor::<3>::random([4, 128, 1408], Distribution::Default, &d).require_grad();
    t("silu*up fwd+bwd (1)", || {
        let y = burn::tensor::activation::silu(a.clone()) * u.clone();
        let g = y.sum().backward();
        let _ = a.grad(&g).unwrap().into_data();
    });
    let r = Tensor::<3>::random([4, 128, 512], Distribution::Default, &d).require_grad();
    t("residual add fwd+bwd (1)", || {
        let y = r.clone() + x.clone();
        let g = y.sum().backward();
        let _ = r.grad(&g).unwrap().into_data();
    });
}

#[allow(dead_code)]
pub fn step_split() {
    use burn::optim::{AdamWConfig, GradientsParams};
    use peft_core::{CausalLm, ModelInput};
    let d = Device::flex().autodiff();
    let config = peft_models::HfConfig::Bloom(
        serde_json::from_value(serde_json::json!({
        "model_type": "bloom", "vocab_size": 8000, "hidden_size": 512, "n_layer": 4,
        "n_head": 8, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}))
        .unwrap(),
    );
    let store = peft_models::random_checkpoint(&config, 0).unwrap();
    let base = peft_models::load_from_with(&config, &store, &d, &Default::default()).unwrap();
    let mut model = Some(
        peft_lora::get_peft_model(base, peft_lora::LoraConfig::default())
            .unwrap()
            .model,
    );
    let ids = Tensor::<2, Int>::random([4, 128], Distribution::Uniform(4.0, 7999.0), &d);
    let mask = Tensor::<2, Int>::ones([4, 128], &d);
    let mut optim = AdamWConfig::new().init();
    let (mut tf, mut tb, mut to) = (vec![], vec![], vec![]);
    for _ in 0..12 {
        let m = model.take().unwrap();
        let s = Instant::now();
        let logits = m
            .forward(ModelInput::with_mask(ids.clone(), mask.clone()), None)
            .unwrap();
        let loss = causal_lm_loss(logits, ids.clone());
        let _ = loss.clone().into_scalar::<f32>();
        tf.push(s.elapsed().as_secs_f64() * 1e3);
        let s = Instant::now();
        let grads = loss.backward();
        tb.push(s.elapsed().as_secs_f64() * 1e3);
        let s = Instant::now();
        let grads = GradientsParams::from_grads(grads, &m);
        model = Some(optim.step(1e-4, m, grads));
        to.push(s.elapsed().as_secs_f64() * 1e3);
    }
    for (n, mut v) in [("forward+loss", tf), ("backward", tb), ("optimizer", to)] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{n:20} median {:.1} ms", v[6]);
    }
}
