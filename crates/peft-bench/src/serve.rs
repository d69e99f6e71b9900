//! The serving cases.
//!
//! * `serve-generate-<N>` (N = 1, 4, 16): the continuous-batching engine of `peft serve`
//!   generating for 16 requests at once (prompts of 32 tokens, 32 new tokens each, greedy, end
//!   of sequence ignored) on the BLOOM bench model, the rows spread over N LoRA adapters (r = 8,
//!   PEFT's default targets, random B). The PyTorch side is transformers' `generate` of the same
//!   batch with PEFT's `adapter_names`.
//! * `serve-load`: the HTTP server on 127.0.0.1 with bloom-tiny and four adapters, driven by
//!   32 clients × 50 requests (4 × 5 with `--quick`) over the four adapters, a queue smaller than
//!   the clients (429s are retried after `Retry-After`); every greedy answer is compared with the
//!   same request sent alone. Reports p50/p99 latency, throughput and the 429 count; any other
//!   error or any differing answer fails the case.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use peft_models::Decoding;
use peft_serve::engine::{Command, Engine, EngineLimits, Job};
use peft_serve::metrics::Shared;
use serde_json::{Value, json};

/// Requests generated together.
const ROWS: usize = 16;

/// `serve-generate-<adapters>`.
pub fn generate(adapters: usize, quick: bool, device: &Device) -> Result<Value, String> {
    let (prompt_len, new_tokens, reps) = if quick { (8, 4, 1) } else { (32, 32, 3) };
    let shared = Arc::new(Shared::new("base"));
    let limits = EngineLimits {
        max_batch: ROWS,
        max_loras: 64,
        max_model_len: usize::MAX,
    };
    let mut engine =
        Engine::new(crate::base_model(device), shared, limits).map_err(|e| e.to_string())?;
    let names: Vec<String> = (0..adapters).map(|i| format!("a{i}")).collect();
    for name in &names {
        let config = peft_lora::LoraConfig {
            init_lora_weights: peft_lora::InitLoraWeights::Flag(false),
            ..peft_lora::LoraConfig::default()
        };
        engine
            .add_lora_adapter(name, config)
            .map_err(|e| e.to_string())?;
    }
    let prompts: Vec<Vec<u32>> = (0..ROWS)
        .map(|r| {
            (0..prompt_len)
                .map(|t| 4 + ((r * 131 + t * 17) % 7990) as u32)
                .collect()
        })
        .collect();
    let mut run_once = || -> Result<f64, String> {
        let (commands, receiver) = std::sync::mpsc::channel();
        let mut outputs = Vec::new();
        for (r, prompt) in prompts.iter().enumerate() {
            let (events, output) = tokio::sync::mpsc::unbounded_channel();
            commands
                .send(Command::Generate(Job {
                    ignore_eos: true,
                    ..Job::new(
                        Some(names[r % names.len()].clone()),
                        prompt.clone(),
                        new_tokens,
                        Decoding::Greedy,
                        events,
                    )
                }))
                .map_err(|e| e.to_string())?;
            outputs.push(output);
        }
        drop(commands);
        let started = Instant::now();
        engine.run(&receiver);
        let took = started.elapsed().as_secs_f64();
        for mut output in outputs {
            let mut tokens = 0;
            while let Ok(event) = output.try_recv() {
                match event {
                    peft_serve::engine::Event::Token(_) => tokens += 1,
                    peft_serve::engine::Event::Failed(e)
                    | peft_serve::engine::Event::Refused { message: e, .. } => return Err(e),
                    peft_serve::engine::Event::Finished { .. }
                    | peft_serve::engine::Event::Logprob(_)
                    | peft_serve::engine::Event::PromptLogprobs(_) => {}
                }
            }
            if tokens != new_tokens {
                return Err(format!("{tokens} tokens instead of {new_tokens}"));
            }
        }
        Ok(took)
    };
    run_once()?;
    let times = (0..reps)
        .map(|_| run_once())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json!({
        "case": format!("serve-generate-{adapters}"),
        "times_s": times,
        "batch": ROWS,
        "seq": new_tokens,
        "prompt_tokens": prompt_len,
        "adapters": adapters,
        "tokens_per_s": 0.0,
        "peak_rss_bytes": crate::peak_rss_bytes(),
    }))
}

pub fn fixtures(root: &Path) -> PathBuf {
    root.join("tests/fixtures")
}

/// A running `peft serve` for the load cases: stopped and joined by [`RunningServer::stop`].
pub struct RunningServer {
    /// Where it listens (127.0.0.1, a free port).
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<(), peft_serve::ServeError>>,
}

impl RunningServer {
    /// Shuts the server down gracefully and returns its result.
    pub fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        self.thread
            .join()
            .map_err(|_| "the server thread panicked".to_string())?
            .map_err(|e| e.to_string())
    }
}

/// The load cases' adapters, by name.
pub const ADAPTERS: [&str; 4] = ["a", "b", "c", "d"];

/// bloom-tiny served on 127.0.0.1 with four adapters ([`ADAPTERS`]: the multi-adapter fixture's
/// three and their linear combination, written into `work`), configured further by `configure`.
pub fn four_adapter_server(
    root: &Path,
    work: &Path,
    configure: impl FnOnce(&mut peft_serve::ServeOptions),
) -> Result<RunningServer, String> {
    let adapters_dir = fixtures(root).join("adapters/multi-bloom");
    let model_dir = fixtures(root).join("models/bloom-tiny");
    let base = peft_models::load(&model_dir, &Device::flex()).map_err(|e| e.to_string())?;
    let mut multi = peft_lora::MultiLoraModel::new(base).map_err(|e| e.to_string())?;
    multi
        .load_adapter("a", &adapters_dir)
        .and_then(|()| multi.load_adapter("b", adapters_dir.join("b")))
        .and_then(|()| {
            multi.add_weighted_adapter(
                &["a", "b"],
                &[0.5, 0.5],
                "d",
                &peft_lora::combine::Combination::new(peft_lora::combine::CombinationType::Linear),
            )
        })
        .and_then(|()| multi.save_adapter_folder("d", work.join("d")))
        .map_err(|e| e.to_string())?;
    let mut options = peft_serve::ServeOptions::new(&model_dir, Device::flex());
    options.adapters = vec![
        ("a".into(), adapters_dir.clone()),
        ("b".into(), adapters_dir.join("b")),
        ("c".into(), adapters_dir.join("c")),
        ("d".into(), work.join("d")),
    ];
    options.port = 0;
    configure(&mut options);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, address) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        peft_serve::serve_until(
            options,
            async move {
                let _ = stopped.await;
            },
            move |addr| {
                let _ = ready.send(addr);
            },
        )
    });
    let addr: SocketAddr = address
        .recv_timeout(Duration::from_secs(120))
        .map_err(|_| "the server did not start".to_string())?;
    Ok(RunningServer { addr, stop, thread })
}

/// `serve-load`.
pub fn load_test(quick: bool, root: &Path) -> Result<Value, String> {
    let (clients, per_client) = if quick { (4, 5) } else { (32, 50) };
    let work = tempfile_dir("load")?;
    const NAMES: [&str; 4] = ADAPTERS;
    const PROMPTS: [&str; 5] = ["你好", "hello", "the weather", "one two three", "x"];
    let names = NAMES;
    let server = four_adapter_server(root, &work, |options| {
        options.max_batch = 8;
        options.max_queue = 8;
    })?;
    let addr = server.addr;
    let body = |i: usize| {
        json!({"model": NAMES[i % NAMES.len()], "prompt": PROMPTS[i % PROMPTS.len()],
               "max_tokens": 16, "temperature": 0})
        .to_string()
    };
    // Every distinct request alone, first: the answers the loaded server must give.
    let distinct = NAMES.len() * PROMPTS.len();
    let mut alone = Vec::new();
    for i in 0..distinct {
        let r = peft_serve::client::request(addr, "POST", "/v1/completions", None, &body(i))
            .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("alone: status {}: {}", r.status, r.body));
        }
        alone.push(r.json()["choices"][0]["text"].clone());
    }
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let rejected = Arc::new(Mutex::new(0usize));
    let tokens = Arc::new(Mutex::new(0u64));
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (latencies, problems, rejected, tokens) = (
                latencies.clone(),
                problems.clone(),
                rejected.clone(),
                tokens.clone(),
            );
            let alone = alone.clone();
            std::thread::spawn(move || {
                for k in 0..per_client {
                    let i = (c * 7 + k) % distinct;
                    let sent = Instant::now();
                    loop {
                        let r = peft_serve::client::request(
                            addr,
                            "POST",
                            "/v1/completions",
                            None,
                            &body(i),
                        );
                        let lock = |m: &Mutex<Vec<String>>, s: String| {
                            m.lock().unwrap_or_else(|p| p.into_inner()).push(s)
                        };
                        match r {
                            Ok(r) if r.status == 429 => {
                                *rejected.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            Ok(r) if r.status == 200 => {
                                let json = r.json();
                                if json["choices"][0]["text"] != alone[i] {
                                    lock(&problems, format!("request {i} differs under load"));
                                }
                                *tokens.lock().unwrap_or_else(|p| p.into_inner()) +=
                                    json["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                                latencies
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(sent.elapsed().as_secs_f64());
                                break;
                            }
                            Ok(r) => {
                                lock(&problems, format!("status {}: {}", r.status, r.body));
                                break;
                            }
                            Err(e) => {
                                lock(&problems, e.to_string());
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| "a client thread panicked".to_string())?;
    }
    let wall = started.elapsed().as_secs_f64();
    server.stop()?;
    let problems = problems.lock().map_err(|e| e.to_string())?.clone();
    if !problems.is_empty() {
        return Err(format!(
            "{} problems under load, first: {}",
            problems.len(),
            problems[0]
        ));
    }
    let mut latencies = latencies.lock().map_err(|e| e.to_string())?.clone();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let requests = latencies.len();
    let generated = *tokens.lock().map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(json!({
        "case": "serve-load",
        "times_s": [wall],
        "clients": clients,
        "requests": requests,
        "adapters": names.len(),
        "rejected_429": *rejected.lock().map_err(|e| e.to_string())?,
        "answers_equal_alone": requests,
        "latency_p50_s": pct(0.5),
        "latency_p99_s": pct(0.99),
        "requests_per_s": requests as f64 / wall,
        "generated_tokens_per_s": generated as f64 / wall,
        "peak_rss_bytes": crate::peak_rss_bytes(),
    }))
}

/// A fresh folder for one case's files.
pub fn tempfile_dir(case: &str) -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("peft-serve-{case}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}
