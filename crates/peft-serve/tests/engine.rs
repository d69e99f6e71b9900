//! The engine's continuous batching leaves results unchanged: every greedy request produces
//! the same tokens alone as in a mixed batch that sequences join and leave mid-flight.

use peft_tests::fixtures;
use std::sync::Arc;

use burn::tensor::Device;
use peft_models::Decoding;
use peft_serve::engine::{Command, Engine, EngineLimits, Event, FinishReason, InjectedPanic, Job};
use peft_serve::metrics::Shared;
use tokio::sync::mpsc;

/// An engine over `arch`-tiny with the three adapters of the multi-adapter fixture: `a` (its
/// default), `b`, `c`.
fn engine(arch: &str, shared: Arc<Shared>, max_batch: usize) -> Engine {
    let base = peft_models::load(
        fixtures().join(format!("models/{arch}-tiny")),
        &Device::flex(),
    )
    .unwrap();
    let dir = fixtures().join(format!("adapters/multi-{arch}"));
    let limits = EngineLimits {
        max_batch,
        max_loras: 64,
        max_model_len: usize::MAX,
    };
    let mut engine = Engine::new(base, shared, limits).unwrap();
    engine.load_adapter("a", &dir).unwrap();
    engine.load_adapter("b", &dir.join("b")).unwrap();
    engine.load_adapter("c", &dir.join("c")).unwrap();
    engine
}

struct Request {
    adapter: Option<&'static str>,
    prompt: Vec<u32>,
    max_tokens: usize,
    decoding: Decoding,
}

/// Runs `requests` through one engine over `arch` with `max_batch` rows at a time.
fn run(arch: &str, requests: &[Request], max_batch: usize) -> Vec<Vec<Event>> {
    let shared = Arc::new(Shared::new("base"));
    let events = run_on(engine(arch, shared.clone(), max_batch), requests);
    assert_eq!(shared.queue_len(), 0);
    events
}

/// Runs `requests` through `engine`, all queued before it starts; each request's events.
fn run_on(mut engine: Engine, requests: &[Request]) -> Vec<Vec<Event>> {
    run_on_mut(&mut engine, requests)
}

/// [`run_on`] on an engine that is kept (and may run again).
fn run_on_mut(engine: &mut Engine, requests: &[Request]) -> Vec<Vec<Event>> {
    let (commands, receiver) = std::sync::mpsc::channel();
    let outputs: Vec<_> = requests
        .iter()
        .map(|r| {
            let (events, output) = mpsc::unbounded_channel();
            commands
                .send(Command::Generate(Job::new(
                    r.adapter.map(str::to_string),
                    r.prompt.clone(),
                    r.max_tokens,
                    r.decoding,
                    events,
                )))
                .unwrap();
            output
        })
        .collect();
    drop(commands);
    engine.run(&receiver);
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
            run(arch, &single, 1).remove(0)
        })
        .collect();
    // Three rows at a time: eight requests join as others leave.
    let batched = run(arch, &requests, 3);
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
    let out = run(arch, &same_prompt, 3);
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
    let mut engine = engine("llama", shared.clone(), 4);
    let (commands, receiver) = std::sync::mpsc::channel();
    let (events, gone) = mpsc::unbounded_channel();
    drop(gone);
    commands
        .send(Command::Generate(Job::new(
            None,
            vec![5, 6],
            50,
            Decoding::Greedy,
            events,
        )))
        .unwrap();
    let (events, mut kept) = mpsc::unbounded_channel();
    commands
        .send(Command::Generate(Job::new(
            Some("b".into()),
            requests[3].prompt.clone(),
            4,
            Decoding::Greedy,
            events,
        )))
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

/// A row ends at the model's context whatever its `max_tokens` says: a job asking for
/// `usize::MAX` tokens past end-of-sequence over a 3-token prompt in a 10-token context
/// generates exactly 7 and finishes with `length`.
#[test]
fn a_row_ends_at_the_context_whatever_max_tokens_says() {
    let base = peft_models::load(fixtures().join("models/llama-tiny"), &Device::flex()).unwrap();
    let shared = Arc::new(Shared::new("base"));
    let limits = EngineLimits {
        max_batch: 2,
        max_loras: 64,
        max_model_len: 10,
    };
    let mut engine = Engine::new(base, shared, limits).unwrap();
    let (commands, receiver) = std::sync::mpsc::channel();
    let (events, mut output) = mpsc::unbounded_channel();
    commands
        .send(Command::Generate(Job {
            ignore_eos: true,
            ..Job::new(None, vec![5, 6, 7], usize::MAX, Decoding::Greedy, events)
        }))
        .unwrap();
    drop(commands);
    engine.run(&receiver);
    let mut tokens = 0;
    let mut finished = None;
    while let Ok(e) = output.try_recv() {
        match e {
            Event::Token(_) => tokens += 1,
            Event::Finished { reason, generated } => finished = Some((reason, generated)),
            Event::Failed(m) => panic!("{m}"),
            Event::Refused { message, .. } => panic!("{message}"),
            Event::Logprob(_) | Event::PromptLogprobs(_) => panic!("not asked for"),
        }
    }
    assert_eq!(tokens, 7);
    assert_eq!(finished, Some((FinishReason::Length, 7)));
}

/// IA3, LoHa, LoKr, VeRA, prompt tuning, P-tuning and prefix tuning adapters are served beside LoRA, each in a
/// batch of its own over the shared base: every request equals itself alone and `peft_models::generate` on
/// that method's own model.
#[test]
fn other_methods_are_served_in_batches_of_their_own() {
    let adapters = fixtures().join("adapters");
    let others = [
        ("ia3", "ia3-llama"),
        ("loha", "loha-llama"),
        ("lokr", "lokr-llama"),
        ("vera", "vera-llama"),
        ("prompt", "prompt-llama-random"),
        ("prefix", "prefix-llama"),
        ("ptuning", "ptuning-llama-mlp"),
    ];
    let make = |max_batch: usize| {
        let mut engine = engine("llama", Arc::new(Shared::new("base")), max_batch);
        for (name, dir) in others {
            engine.load_adapter(name, &adapters.join(dir)).unwrap();
        }
        engine
    };
    let names = [
        Some("ptuning"),
        Some("ia3"),
        Some("a"),
        Some("prompt"),
        Some("prefix"),
        None,
        Some("loha"),
        Some("ia3"),
        Some("prefix"),
        Some("loha"),
        Some("lokr"),
        Some("ia3"),
        Some("vera"),
    ];
    let requests: Vec<Request> = names
        .iter()
        .enumerate()
        .map(|(i, &adapter)| Request {
            adapter,
            prompt: (0..2 + 3 * i as u32)
                .map(|t| 9 + (t * 29 + i as u32) % 150)
                .collect(),
            max_tokens: 4 + i % 5,
            decoding: Decoding::Greedy,
        })
        .collect();
    let together = run_on(make(8), &requests);
    let base = || peft_models::load(fixtures().join("models/llama-tiny"), &Device::flex()).unwrap();
    for (i, r) in requests.iter().enumerate() {
        let single = [Request {
            adapter: r.adapter,
            prompt: r.prompt.clone(),
            max_tokens: r.max_tokens,
            decoding: r.decoding,
        }];
        let alone = run_on(make(1), &single).remove(0);
        assert_eq!(together[i], alone, "request {i} ({:?})", r.adapter);
        assert!(
            matches!(alone.last(), Some(Event::Finished { .. })),
            "{alone:?}"
        );
        let tokens: Vec<u32> = alone
            .iter()
            .filter_map(|e| match e {
                Event::Token(t) => Some(*t),
                _ => None,
            })
            .collect();
        // The same prompt through the method's own model and `generate`.
        let dir = |name: &str| adapters.join(others.iter().find(|o| o.0 == name).unwrap().1);
        let (prompt, max) = (&r.prompt, r.max_tokens);
        let reference = match r.adapter {
            Some("ia3") => greedy(
                &peft::ia3::from_pretrained(base(), dir("ia3"), false)
                    .unwrap()
                    .model,
                prompt,
                max,
            ),
            Some("loha") => greedy(
                &peft::loha::from_pretrained(base(), dir("loha"), false)
                    .unwrap()
                    .model,
                prompt,
                max,
            ),
            Some("lokr") => greedy(
                &peft::lokr::from_pretrained(base(), dir("lokr"), false)
                    .unwrap()
                    .model,
                prompt,
                max,
            ),
            Some("vera") => greedy(
                &peft::vera::from_pretrained(base(), dir("vera"), false)
                    .unwrap()
                    .model,
                prompt,
                max,
            ),
            Some("prompt") => greedy(
                &peft::prompt::from_pretrained(base(), dir("prompt"), false)
                    .unwrap()
                    .model,
                prompt,
                max,
            ),
            Some("ptuning") => greedy(
                &peft::ptuning::from_pretrained(base(), dir("ptuning"), false)
                    .unwrap()
                    .model,
                prompt,
                max,
            ),
            Some("prefix") => greedy(
                &peft::prefix::from_pretrained(base(), dir("prefix"), false)
                    .unwrap()
                    .model,
                prompt,
                max,
            ),
            _ => continue,
        };
        let eos = peft_core::CausalLm::spec(&base()).eos_token_ids.clone();
        let reference: Vec<u32> = reference.into_iter().filter(|t| !eos.contains(t)).collect();
        assert_eq!(
            tokens, reference,
            "request {i} ({:?}) against generate",
            r.adapter
        );
    }
    // An adapter of another method is refused by name, BitFit with the reason.
    let mut engine = make(1);
    let bitfit = tempfile::tempdir().unwrap();
    std::fs::write(
        bitfit.path().join("adapter_config.json"),
        r#"{"peft_type": "BITFIT", "base_model_name_or_path": null}"#,
    )
    .unwrap();
    let (status, message) = engine.load_adapter("bf", bitfit.path()).unwrap_err();
    assert_eq!(status, 400);
    assert!(message.contains("BitFit"), "{message}");
    assert_eq!(
        engine
            .load_adapter("ia3", &adapters.join("ia3-llama"))
            .unwrap_err()
            .0,
        400
    );
}

/// `peft_models::generate`'s greedy tokens for `prompt` alone.
fn greedy<M: peft_core::CausalLm>(model: &M, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let options = peft_models::GenerateOptions::greedy(max_tokens, model.spec());
    peft_models::generate(model, &[prompt.to_vec()], &options, |_, _| {})
        .unwrap()
        .remove(0)
}

/// A panic in a decoding step, in a prefill or in an adapter load (injected) fails only the
/// request it hit, with a message naming it; the same engine then serves the same request
/// exactly as a fresh engine does, and loads the adapter.
#[test]
fn a_panic_fails_only_its_request_and_the_engine_goes_on() {
    let request = || Request {
        adapter: Some("b"),
        prompt: vec![5, 9, 14, 3],
        max_tokens: 6,
        decoding: Decoding::Greedy,
    };
    let fresh = run("llama", &[request()], 4);
    let shared = Arc::new(Shared::new("base"));
    let mut engine = engine("llama", shared.clone(), 4);
    for at in [InjectedPanic::Step, InjectedPanic::Prefill] {
        engine.inject_panic(at);
        let events = run_on_mut(&mut engine, &[request()]);
        let failed = events[0].iter().find_map(|e| match e {
            Event::Failed(m) => Some(m.clone()),
            _ => None,
        });
        let message = failed.unwrap_or_else(|| panic!("{at:?}: no failure in {:?}", events[0]));
        assert!(
            message.contains(&format!("injected panic ({at:?})")),
            "{message}"
        );
        assert!(message.contains("the server goes on"), "{message}");
        assert_eq!(
            run_on_mut(&mut engine, &[request()]),
            fresh,
            "{at:?}: after the panic"
        );
    }
    // An adapter load that panics answers 500 and leaves no half-loaded adapter behind.
    let dir = fixtures().join("adapters/multi-llama/c");
    let load = |engine: &mut Engine| {
        let (commands, receiver) = std::sync::mpsc::channel();
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        commands
            .send(Command::LoadAdapter {
                name: "d".into(),
                dir: dir.clone(),
                reply,
            })
            .unwrap();
        drop(commands);
        engine.run(&receiver);
        answer.try_recv().unwrap()
    };
    engine.inject_panic(InjectedPanic::LoadAdapter);
    let (status, message) = load(&mut engine).unwrap_err();
    assert_eq!(status, 500);
    assert!(
        message.contains("injected panic (LoadAdapter)"),
        "{message}"
    );
    assert!(!shared.has_adapter("d"));
    load(&mut engine).unwrap();
    assert!(shared.has_adapter("d"));
    assert!(
        shared.render().contains("peft_engine_panics_total 3"),
        "{}",
        shared.render()
    );
}

/// Runs one job per `adjust` over the base llama-tiny (12 greedy tokens of the same prompt),
/// all in one batch; each job's tokens and how it finished.
fn adjusted_runs(
    adjusts: Vec<peft_serve::penalties::LogitAdjustments>,
) -> Vec<(Vec<u32>, Option<FinishReason>)> {
    let base = peft_models::load(fixtures().join("models/llama-tiny"), &Device::flex()).unwrap();
    let limits = EngineLimits {
        max_batch: 8,
        max_loras: 64,
        max_model_len: 64,
    };
    let mut engine = Engine::new(base, Arc::new(Shared::new("base")), limits).unwrap();
    let (commands, receiver) = std::sync::mpsc::channel();
    let outputs: Vec<_> = adjusts
        .into_iter()
        .map(|adjust| {
            let (events, output) = mpsc::unbounded_channel();
            commands
                .send(Command::Generate(Job {
                    adjust,
                    ..Job::new(None, vec![5, 42, 7, 300, 11], 12, Decoding::Greedy, events)
                }))
                .unwrap();
            output
        })
        .collect();
    drop(commands);
    engine.run(&receiver);
    outputs
        .into_iter()
        .map(|mut rx| {
            let (mut tokens, mut finished) = (Vec::new(), None);
            while let Ok(e) = rx.try_recv() {
                match e {
                    Event::Token(t) => tokens.push(t),
                    Event::Finished { reason, .. } => finished = Some(reason),
                    Event::Failed(m) => panic!("{m}"),
                    Event::Refused { message, .. } => panic!("{message}"),
                    Event::Logprob(_) | Event::PromptLogprobs(_) => panic!("not asked for"),
                }
            }
            (tokens, finished)
        })
        .collect()
}

/// vLLM's adjustments through the engine, each against the plain greedy output in the same
/// batch: a stop token id ends the row before it (finish reason `stop`, the token not sent); a
/// +100 bias makes greedy pick that token every step; a smaller bias makes it win only while
/// the frequency penalty (2 per occurrence) has not worn it down; no adjustment leaves the
/// output as it was.
#[test]
fn penalties_biases_and_stop_token_ids_act_in_the_batch() {
    use peft_serve::penalties::LogitAdjustments;
    let plain = adjusted_runs(vec![LogitAdjustments::default()]).remove(0);
    assert_eq!(plain.0.len(), 12);
    assert_eq!(plain.1, Some(FinishReason::Length));
    let stop_at = plain.0[3];
    let first = plain.0.iter().position(|&t| t == stop_at).unwrap();
    let biased = |bias: f32, frequency_penalty: f32| LogitAdjustments {
        logit_bias: vec![(77, bias)],
        frequency_penalty,
        ..Default::default()
    };
    let runs = adjusted_runs(vec![
        LogitAdjustments::default(),
        LogitAdjustments {
            stop_token_ids: vec![stop_at],
            ..Default::default()
        },
        biased(100.0, 0.0),
        biased(100.0, 2.0),
        biased(8.0, 0.0),
        biased(8.0, 2.0),
    ]);
    let count = |tokens: &[u32]| tokens.iter().filter(|&&t| t == 77).count();
    assert_eq!(runs[0], plain);
    assert_eq!(runs[1].0, plain.0[..first].to_vec());
    assert_eq!(runs[1].1, Some(FinishReason::Stop));
    // 12 occurrences cost 24: a +100 bias still wins every step.
    assert_eq!(runs[2].0, vec![77; 12]);
    assert_eq!(runs[3].0, vec![77; 12]);
    // +8 wins most steps (9 of 12 on this model); with the penalty, fewer once it repeats.
    let (alone, worn) = (count(&runs[4].0), count(&runs[5].0));
    assert!(runs[4].0[0] == 77 && runs[5].0[0] == 77);
    assert!(alone > 6 && worn < alone, "{alone} vs {worn}: {runs:?}");
}

/// Log-probabilities (`logprobs`, `echo`) are the log-softmax of the model's own logits, to
/// 1e-5: the prompt's from its prefill, each generated token's from its decoding step, with the
/// most likely tokens in order; a request for the prompt alone (`max_tokens` 0) gets its
/// scores and no token.
#[test]
fn logprobs_are_the_log_softmax_of_the_models_logits() {
    use burn::tensor::{Int, Tensor, TensorData};
    use peft_core::{CausalLm, ModelInput};

    let shared = Arc::new(Shared::new("base"));
    let mut engine = engine("llama", shared, 4);
    let prompt = vec![5u32, 42, 7, 300, 11];
    let (commands, receiver) = std::sync::mpsc::channel();
    let job = |max_tokens, logprobs, prompt_logprobs, events| Job {
        ignore_eos: true,
        logprobs,
        prompt_logprobs,
        ..Job::new(None, prompt.clone(), max_tokens, Decoding::Greedy, events)
    };
    let (events, mut generated) = mpsc::unbounded_channel();
    let request = job(6, Some(3), Some(2), events);
    commands.send(Command::Generate(request)).unwrap();
    let (events, mut scored) = mpsc::unbounded_channel();
    let request = job(0, None, Some(0), events);
    commands.send(Command::Generate(request)).unwrap();
    drop(commands);
    engine.run(&receiver);

    let (mut prompt_entries, mut entries, mut tokens) = (None, Vec::new(), Vec::new());
    while let Ok(e) = generated.try_recv() {
        match e {
            Event::PromptLogprobs(p) => prompt_entries = Some(p),
            Event::Logprob(lp) => entries.push(lp),
            Event::Token(t) => {
                assert_eq!(
                    entries.len(),
                    tokens.len() + 1,
                    "a token's log-probability first"
                );
                tokens.push(t);
            }
            Event::Finished { .. } => {}
            Event::Failed(m) => panic!("{m}"),
            Event::Refused { message, .. } => panic!("{message}"),
        }
    }
    let prompt_entries = prompt_entries.expect("the prompt's log-probabilities");
    assert_eq!((prompt_entries.len(), tokens.len()), (5, 6));
    assert!(prompt_entries[0].is_none());

    // The reference: one forward pass over the prompt and the generated tokens.
    let model = peft_models::load(fixtures().join("models/llama-tiny"), &Device::flex()).unwrap();
    let ids: Vec<i64> = prompt
        .iter()
        .chain(&tokens[..5])
        .map(|&t| t as i64)
        .collect();
    let n = ids.len();
    let input = ModelInput::new(Tensor::<2, Int>::from_data(
        TensorData::new(ids, [1, n]),
        &Device::flex(),
    ));
    let logits = model.forward(input, None).unwrap();
    let vocab = logits.dims()[2];
    let logits = logits.into_data().try_to_vec::<f32>().unwrap();
    let log_softmax = |position: usize| -> Vec<f64> {
        let row = &logits[position * vocab..(position + 1) * vocab];
        let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
        let norm = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        row.iter().map(|&x| x as f64 - norm).collect()
    };
    let check = |position: usize, entry: &peft_serve::logprobs::TokenLogprob, token: u32| {
        let reference = log_softmax(position);
        assert_eq!(entry.token, token);
        let diff = (entry.logprob as f64 - reference[token as usize]).abs();
        assert!(
            diff <= 1e-5,
            "position {position}: {} vs {}",
            entry.logprob,
            reference[token as usize]
        );
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| reference[b].total_cmp(&reference[a]));
        let top: Vec<u32> = entry.top.iter().map(|t| t.0).collect();
        let expected: Vec<u32> = order[..top.len()].iter().map(|&i| i as u32).collect();
        assert_eq!(top, expected, "position {position}");
        for (id, lp) in &entry.top {
            assert!((*lp as f64 - reference[*id as usize]).abs() <= 1e-5);
        }
    };
    for (i, entry) in prompt_entries.iter().enumerate().skip(1) {
        let entry = entry.as_ref().unwrap();
        assert_eq!(entry.top.len(), 2);
        check(i - 1, entry, prompt[i]);
    }
    for (j, entry) in entries.iter().enumerate() {
        assert_eq!(entry.top.len(), 3);
        check(prompt.len() - 1 + j, entry, tokens[j]);
        // Greedy: the chosen token is the most likely.
        assert_eq!(entry.top[0].0, tokens[j]);
    }

    // The prompt alone: its scores, then the end, and no token.
    let mut events = Vec::new();
    while let Ok(e) = scored.try_recv() {
        events.push(e);
    }
    assert!(
        matches!(&events[0], Event::PromptLogprobs(p) if p.len() == 5 && p[1].as_ref().unwrap().top.is_empty())
    );
    assert_eq!(
        events[1..],
        [Event::Finished {
            reason: FinishReason::Length,
            generated: 0
        }]
    );
}

/// Events of one channel until it is empty.
fn drain(rx: &mut mpsc::UnboundedReceiver<Event>) -> Vec<Event> {
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    events
}

/// `n` choices (OpenAI's `n`, vLLM's child requests): one prefill, then choice `i` decodes with
/// the seed plus `i`, so its tokens equal a request of that seed alone; a greedy request's
/// choices are all the same; a choice whose client goes away leaves the others running.
#[test]
fn choices_equal_requests_of_the_seed_plus_their_index() {
    let prompt: Vec<u32> = vec![5, 42, 7, 300, 11, 9];
    let sampled = |seed| Decoding::Sample {
        temperature: 1.0,
        top_p: 1.0,
        seed,
    };
    let job = |decoding, events, more_choices| Job {
        ignore_eos: true,
        more_choices,
        ..Job::new(Some("b".into()), prompt.clone(), 8, decoding, events)
    };
    let tokens = |events: &[Event]| -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Token(t) => Some(*t),
                Event::Failed(m) => panic!("{m}"),
                Event::Refused { message, .. } => panic!("{message}"),
                _ => None,
            })
            .collect()
    };

    // Three seeds alone, then one request of n = 3 with the first seed.
    let shared = Arc::new(Shared::new("base"));
    let mut engine = engine("llama", shared.clone(), 4);
    let (commands, receiver) = std::sync::mpsc::channel();
    let mut alone = Vec::new();
    for seed in [1000u64, 1001, 1002] {
        let (events, rx) = mpsc::unbounded_channel();
        commands
            .send(Command::Generate(job(sampled(seed), events, Vec::new())))
            .unwrap();
        alone.push(rx);
    }
    let (channels, mut choices): (Vec<_>, Vec<_>) =
        (0..3).map(|_| mpsc::unbounded_channel()).unzip();
    let mut channels = channels.into_iter();
    let first = channels.next().unwrap();
    commands
        .send(Command::Generate(job(
            sampled(1000),
            first,
            channels.collect(),
        )))
        .unwrap();
    // Greedy, n = 2.
    let (channels, mut greedy): (Vec<_>, Vec<_>) =
        (0..2).map(|_| mpsc::unbounded_channel()).unzip();
    let mut channels = channels.into_iter();
    let first = channels.next().unwrap();
    commands
        .send(Command::Generate(job(
            Decoding::Greedy,
            first,
            channels.collect(),
        )))
        .unwrap();
    drop(commands);
    engine.run(&receiver);

    let alone: Vec<Vec<u32>> = alone.iter_mut().map(|rx| tokens(&drain(rx))).collect();
    let choices: Vec<Vec<u32>> = choices.iter_mut().map(|rx| tokens(&drain(rx))).collect();
    assert!(alone.iter().all(|t| t.len() == 8), "{alone:?}");
    assert_eq!(choices, alone);
    // Sampling at temperature 1 over a 512-token vocabulary: the seeds give different texts.
    assert_ne!(alone[0], alone[1]);
    let greedy: Vec<Vec<u32>> = greedy.iter_mut().map(|rx| tokens(&drain(rx))).collect();
    assert_eq!(greedy[0].len(), 8);
    assert_eq!(greedy[0], greedy[1]);
    // Five requests, each prompt counted once; every choice's tokens counted.
    let counts = shared.counts("b");
    assert_eq!(
        (
            counts.requests,
            counts.prompt_tokens,
            counts.generated_tokens
        ),
        (5, 5 * 6, 8 * 8)
    );
    assert_eq!(shared.queue_len(), 0);
}

/// A request of `n` choices needs `n` free rows: with `max_batch` 2 and one row running, the
/// n = 2 request waits for it to end (it is neither dropped nor stuck), and its rows decode as
/// alone.
#[test]
fn a_request_of_n_choices_waits_for_n_rows() {
    let prompt: Vec<u32> = vec![3, 14, 15, 92];
    let job = |max_tokens, events, more_choices| Job {
        ignore_eos: true,
        more_choices,
        ..Job::new(None, prompt.clone(), max_tokens, Decoding::Greedy, events)
    };
    let shared = Arc::new(Shared::new("base"));
    let mut engine = engine("bloom", shared.clone(), 2);
    let (commands, receiver) = std::sync::mpsc::channel();
    let (events, mut long) = mpsc::unbounded_channel();
    commands
        .send(Command::Generate(job(6, events, Vec::new())))
        .unwrap();
    let (a, mut first) = mpsc::unbounded_channel();
    let (b, mut second) = mpsc::unbounded_channel();
    commands
        .send(Command::Generate(job(3, a, vec![b])))
        .unwrap();
    drop(commands);
    engine.run(&receiver);
    let long = drain(&mut long);
    let (first, second) = (drain(&mut first), drain(&mut second));
    let tokens = |events: &[Event]| -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Token(t) => Some(*t),
                _ => None,
            })
            .collect()
    };
    assert_eq!(tokens(&long).len(), 6);
    // Greedy over the same prompt: the choices are the first three tokens of the long one.
    assert_eq!(tokens(&first), tokens(&long)[..3]);
    assert_eq!(tokens(&second), tokens(&first));
    assert_eq!(
        first.last(),
        Some(&Event::Finished {
            reason: FinishReason::Length,
            generated: 3
        })
    );
    assert_eq!(second.last(), first.last());
}
