//! The engine's continuous batching leaves results unchanged: every greedy request produces
//! the same tokens alone as in a mixed batch that sequences join and leave mid-flight.

use std::path::PathBuf;
use std::sync::Arc;

use burn::tensor::Device;
use peft_lora::MultiLoraModel;
use peft_models::Decoding;
use peft_serve::engine::{Command, Engine, EngineLimits, Event, FinishReason, Job, ServedModel};
use peft_serve::metrics::Shared;
use tokio::sync::mpsc;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// `arch`-tiny with the three adapters of the multi-adapter fixture: `a` (its default), `b`, `c`.
fn model(arch: &str) -> ServedModel {
    let base = peft_models::load(
        fixtures().join(format!("models/{arch}-tiny")),
        &Device::flex(),
    )
    .unwrap();
    let dir = fixtures().join(format!("adapters/multi-{arch}"));
    let mut model = MultiLoraModel::new(base).unwrap();
    model.load_adapter("a", &dir).unwrap();
    model.load_adapter("b", dir.join("b")).unwrap();
    model.load_adapter("c", dir.join("c")).unwrap();
    model
}

struct Request {
    adapter: Option<&'static str>,
    prompt: Vec<u32>,
    max_tokens: usize,
    decoding: Decoding,
}

/// Runs `requests` through one engine, all queued before it starts, `max_batch` rows at a
/// time; each request's events.
fn run(model: ServedModel, requests: &[Request], max_batch: usize) -> Vec<Vec<Event>> {
    let shared = Arc::new(Shared::new("base"));
    let mut engine = Engine::new(model, shared.clone(), EngineLimits { max_batch });
    let (commands, receiver) = std::sync::mpsc::channel();
    let mut outputs = Vec::new();
    for r in requests {
        let (events, output) = mpsc::unbounded_channel();
        assert!(shared.try_enqueue(usize::MAX));
        commands
            .send(Command::Generate(Job {
                adapter: r.adapter.map(str::to_string),
                prompt: r.prompt.clone(),
                max_tokens: r.max_tokens,
                decoding: r.decoding,
                ignore_eos: false,
                events,
            }))
            .unwrap();
        outputs.push(output);
    }
    drop(commands);
    engine.run(&receiver);
    assert_eq!(shared.queue_len(), 0);
    outputs
        .into_iter()
        .map(|mut rx| {
            let mut events = Vec::new();
            while let Ok(e) = rx.try_recv() {
                events.push(e);
            }
            events
        })
        .collect()
}

fn requests() -> Vec<Request> {
    let adapters = [
        Some("a"),
        Some("b"),
        None,
        Some("c"),
        Some("a"),
        Some("b"),
        None,
        Some("c"),
    ];
    adapters
        .iter()
        .enumerate()
        .map(|(i, &adapter)| Request {
            adapter,
            // Prompts of 1 to 15 tokens: the batch pads them differently.
            prompt: (0..1 + 2 * i as u32)
                .map(|t| 5 + (t * 37 + i as u32 * 11) % 200)
                .collect(),
            // Different lengths: sequences leave at different steps and others join.
            max_tokens: 3 + (i * 5) % 11,
            decoding: if i == 5 {
                Decoding::Sample {
                    temperature: 0.8,
                    top_p: 0.9,
                    seed: 42,
                }
            } else {
                Decoding::Greedy
            },
        })
        .collect()
}

fn batching_leaves_results_unchanged(arch: &str) {
    let requests = requests();
    let alone: Vec<Vec<Event>> = requests
        .iter()
        .map(|r| {
            let single = [Request {
                adapter: r.adapter,
                prompt: r.prompt.clone(),
                max_tokens: r.max_tokens,
                decoding: r.decoding,
            }];
            run(model(arch), &single, 1).remove(0)
        })
        .collect();
    // Three rows at a time: eight requests join as others leave.
    let batched = run(model(arch), &requests, 3);
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a, b, "{arch}: request {i} differs alone and batched");
        let tokens = a.iter().filter(|e| matches!(e, Event::Token(_))).count();
        match a.last() {
            Some(Event::Finished {
                reason: FinishReason::Length,
                generated,
            }) => {
                assert_eq!(*generated, requests[i].max_tokens);
                assert_eq!(tokens, requests[i].max_tokens);
            }
            Some(Event::Finished {
                reason: FinishReason::Stop,
                generated,
            }) => assert_eq!(*generated, tokens + 1, "the EOS token is counted"),
            other => panic!("{arch}: request {i} ended with {other:?}"),
        }
    }
    // The adapters matter: the same prompt gives other tokens under another adapter.
    let same_prompt: Vec<Request> = [Some("a"), Some("b"), None]
        .into_iter()
        .map(|adapter| Request {
            adapter,
            prompt: vec![7, 8, 9, 10],
            max_tokens: 8,
            decoding: Decoding::Greedy,
        })
        .collect();
    let out = run(model(arch), &same_prompt, 3);
    assert!(
        out[0] != out[1] || out[0] != out[2],
        "{arch}: adapters changed nothing"
    );
}

#[test]
fn llama_batching_leaves_results_unchanged() {
    batching_leaves_results_unchanged("llama");
}

#[test]
fn bloom_batching_leaves_results_unchanged() {
    batching_leaves_results_unchanged("bloom");
}

#[test]
fn a_closed_request_leaves_the_batch_and_others_continue() {
    let requests = requests();
    let shared = Arc::new(Shared::new("base"));
    let mut engine = Engine::new(
        model("llama"),
        shared.clone(),
        EngineLimits { max_batch: 4 },
    );
    let (commands, receiver) = std::sync::mpsc::channel();
    let (events, gone) = mpsc::unbounded_channel();
    drop(gone);
    commands
        .send(Command::Generate(Job {
            adapter: None,
            prompt: vec![5, 6],
            max_tokens: 50,
            decoding: Decoding::Greedy,
            ignore_eos: false,
            events,
        }))
        .unwrap();
    let (events, mut kept) = mpsc::unbounded_channel();
    commands
        .send(Command::Generate(Job {
            adapter: Some("b".into()),
            prompt: requests[3].prompt.clone(),
            max_tokens: 4,
            decoding: Decoding::Greedy,
            ignore_eos: false,
            events,
        }))
        .unwrap();
    drop(commands);
    engine.run(&receiver);
    let mut n = 0;
    while let Ok(e) = kept.try_recv() {
        n += 1;
        if let Event::Failed(m) = e {
            panic!("{m}");
        }
    }
    assert!(n >= 2);
    // The abandoned request was never admitted: nothing was generated for the base.
    assert_eq!(shared.counts("base").generated_tokens, 0);
}
