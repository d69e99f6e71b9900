//! `peft train`: fine-tune a model on a data file with any implemented method, with a progress
//! bar, checkpoints, metrics, a loss plot and a before/after comparison.
//!
//! With no `--model` / `--data`, the bundled tiny model and data set are used (no download).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::{AdapterModel, CausalLm, NoAdapter, TargetModules};
use peft_models::{AnyModel, GenerateOptions, Tokenizer};
use peft_train::{Event, Resume, Schedule, Tokenized, TrainConfig};

use crate::DeviceArg;

/// The bundled default: a tiny BLOOM pretrained on general text (`cargo xtask pretrain-tiny`,
/// docs/PRETRAINED.md) and a Chinese + English chat data set.
const BUNDLED_MODEL: [(&str, &[u8]); 5] = [
    (
        "config.json",
        include_bytes!("../../../data/bloom-tiny-pretrained/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../data/bloom-tiny-pretrained/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../data/bloom-tiny-pretrained/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../../data/bloom-tiny-pretrained/tokenizer_config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../../../data/bloom-tiny-pretrained/generation_config.json"),
    ),
];
const BUNDLED_DATA: &[u8] = include_bytes!("../../../data/demo.jsonl");

/// `peft train` arguments.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Hugging Face model folder; default: the bundled tiny BLOOM.
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Training data (.jsonl or .json: alpaca, chat `messages`, or `text` records); default: the
    /// bundled demo set.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Method: lora, ia3, bitfit, prompt, ptuning, prefix or qlora (LoRA over a 4-bit base:
    /// NF4 with double quantisation unless --load-4bit says otherwise; the QLoRA paper's
    /// r=64, alpha=16, all-linear, dropout 0.05 unless flags say otherwise).
    #[arg(long, default_value = "lora")]
    method: String,
    #[command(flatten)]
    load: crate::LoadArgs,
    /// An adapter_config.json to start from (its method must match --method).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// An adapter folder to continue training (PEFT's `PeftModel.from_pretrained(…,
    /// is_trainable=True)`, e.g. from SFT to the next run): any method, its config kept (the
    /// folder's method is the run's; flags that set config values are refused).
    #[arg(long, conflicts_with = "config")]
    pub(crate) adapter: Option<PathBuf>,
    /// Output folder: checkpoints, adapter/, merged/, metrics.jsonl, loss.png, summary.json.
    #[arg(long, default_value = "out/peft-train")]
    output: PathBuf,
    /// Do not write merged/ (the base with the adapter folded in): the adapter alone is the
    /// result, as with PEFT's save_pretrained. merged/ is a full copy of the model.
    #[arg(long)]
    no_merged: bool,
    #[command(flatten)]
    save: crate::SaveArgs,
    #[command(flatten)]
    device: DeviceArg,
    /// Rank (LoRA, LoHa, LoKr, VeRA).
    #[arg(long)]
    pub(crate) r: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    pub(crate) lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long)]
    pub(crate) lora_dropout: Option<f64>,
    /// LoHa's and LoKr's alpha: the update is scaled by alpha/r (PEFT's `alpha`).
    #[arg(long)]
    pub(crate) alpha: Option<f64>,
    /// LoHa, LoKr: probability of dropping each output row of the update in training.
    #[arg(long)]
    pub(crate) rank_dropout: Option<f64>,
    /// LoHa, LoKr: probability of skipping a layer's adapter in a training pass.
    #[arg(long)]
    pub(crate) module_dropout: Option<f64>,
    /// LoKr: decompose the left Kronecker factor too (PEFT's `decompose_both`).
    #[arg(long)]
    pub(crate) decompose_both: bool,
    /// LoKr: the divider of the dimensions' factorisation (PEFT's `decompose_factor`; -1, the
    /// default, factors near the square root).
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) decompose_factor: Option<i64>,
    /// LoKr: rescale the rows rank dropout keeps by the share kept (`rank_dropout_scale`).
    #[arg(long)]
    pub(crate) rank_dropout_scale: bool,
    /// VeRA: the seed its shared projections are drawn from (`projection_prng_key`).
    #[arg(long)]
    pub(crate) projection_prng_key: Option<u64>,
    /// VeRA: leave the projections out of the saved folder (`save_projection: false`; they
    /// are drawn again from the key when it is loaded).
    #[arg(long)]
    pub(crate) no_save_projection: bool,
    /// VeRA: dropout on the layer's input (`vera_dropout`).
    #[arg(long)]
    pub(crate) vera_dropout: Option<f64>,
    /// VeRA: the starting value of `vera_lambda_d` (`d_initial`).
    #[arg(long)]
    pub(crate) d_initial: Option<f64>,
    /// AdaLoRA: the average rank the allocator's budget ends at (`target_r`; `--r` is the
    /// starting rank, `init_r`).
    #[arg(long)]
    pub(crate) target_r: Option<usize>,
    /// AdaLoRA: the length of the rank schedule (`total_step`); default: the run's optimizer
    /// steps (unless `--config` gives one).
    #[arg(long)]
    pub(crate) total_step: Option<usize>,
    /// AdaLoRA: steps before the budget starts to shrink (`tinit`).
    #[arg(long)]
    pub(crate) tinit: Option<usize>,
    /// AdaLoRA: steps at the end with the ranks fixed (`tfinal`).
    #[arg(long)]
    pub(crate) tfinal: Option<usize>,
    /// DoRA: train a magnitude per output feature beside LoRA's pair (PEFT's `use_dora`).
    #[arg(long)]
    pub(crate) use_dora: bool,
    /// rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r (PEFT's `use_rslora`).
    #[arg(long)]
    pub(crate) use_rslora: bool,
    /// How LoRA's pair starts (PEFT's `init_lora_weights`): true, false, gaussian, pissa, olora
    /// or loftq. PiSSA and OLoRA start from the base weight's principal part and change the
    /// base; adapter/ is then written as plain LoRA over the original base. LoftQ (4-bit, one
    /// iteration unless --config sets loftq_config) replaces the base by its NF4 quantisation and
    /// starts the pair from the quantisation error; adapter/ is for that quantised base.
    #[arg(long)]
    pub(crate) init_lora_weights: Option<String>,
    /// Token ids whose embedding rows train in full beside LoRA's pairs (PEFT's
    /// `trainable_token_indices`, comma-separated): new or re-purposed tokens; a tied output
    /// layer's rows follow.
    #[arg(long, value_delimiter = ',')]
    pub(crate) trainable_token_indices: Option<Vec<usize>>,
    /// Virtual tokens (prompt tuning, P-tuning, prefix tuning).
    #[arg(long)]
    pub(crate) num_virtual_tokens: Option<usize>,
    /// Modules to adapt (comma-separated names, or `all-linear`).
    #[arg(long, value_delimiter = ',')]
    pub(crate) target_modules: Option<Vec<String>>,
    /// Peak learning rate (default 5e-3; 1e-2 for the bundled demo).
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Passes over the training data (default 3; 30 for the bundled demo).
    #[arg(long)]
    epochs: Option<usize>,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Warm-up steps.
    #[arg(long, default_value_t = 5)]
    warmup_steps: usize,
    /// constant, linear or cosine.
    #[arg(long, default_value = "linear")]
    lr_scheduler: String,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Longest example in tokens (longer ones are truncated, with a warning).
    #[arg(long, default_value_t = 256)]
    max_length: usize,
    /// Share of the examples held out for evaluation.
    #[arg(long, default_value_t = 0.15)]
    eval_fraction: f64,
    /// Seed of the split, the data order and the adapter init.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Checkpoint every N steps.
    #[arg(long)]
    save_steps: Option<usize>,
    /// Keep at most N checkpoints.
    #[arg(long)]
    save_total_limit: Option<usize>,
    /// Resume from `latest` (the newest checkpoint in --output) or a checkpoint folder.
    #[arg(long)]
    resume: Option<String>,
    /// Skip the exact-match evaluation (generation) before and after training.
    #[arg(long)]
    no_exact_match: bool,
    /// Recompute cheap activations in the backward pass instead of keeping them (burn's
    /// balanced gradient checkpointing), same results: element-wise operations, the MLP
    /// activation among them (its `[tokens, intermediate]` output, kept for an adapted down
    /// projection otherwise), are computed again; products and attention stay kept.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Data parallelism across processes: `mpi` (one rank of an `mpirun` job; chosen by itself
    /// when mpirun starts several ranks) or `none`. --batch-size is per rank: a global batch is
    /// ranks × batch size × --grad-accum. Needs a peft built with `--features mpi`.
    #[arg(long)]
    distributed: Option<String>,
    /// Data parallelism across devices in one process: `cuda:0,cuda:1` (or `wgpu:0,wgpu:1`,
    /// `cpu,cpu`); each device holds a copy of the model and takes its share of every global
    /// batch (--batch-size is per device).
    #[arg(long)]
    devices: Option<String>,
    /// Seconds a rank waits for the others at a gradient all-reduce before aborting the job (a
    /// rank died or hangs).
    #[arg(long, default_value_t = 600)]
    distributed_timeout: u64,
}

fn write_bundled(output: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = output.join("bundled");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).with_context(|| format!("creating {}", model.display()))?;
    for (name, bytes) in BUNDLED_MODEL {
        peft_tensors::write_atomic(model.join(name), bytes)?;
    }
    let data = dir.join("demo.jsonl");
    peft_tensors::write_atomic(&data, BUNDLED_DATA)?;
    Ok((model, data))
}

/// Held-out numbers before or after training.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Scores {
    loss: f32,
    perplexity: f32,
    exact_match: Option<(usize, usize)>,
}

/// Greedy answers to the held-out prompts compared with the references.
fn exact_match<M: CausalLm>(
    model: &M,
    tokenizer: &Tokenizer,
    eval: &[peft_train::Example],
) -> Result<(usize, usize)> {
    let mut hits = 0;
    for example in eval {
        let prompt = example.generation_prompt(tokenizer)?;
        let want = tokenizer.encode(&example.response)?.len() + 1;
        let options = GenerateOptions::greedy(want, model.spec());
        let new = peft_models::generate(model, &[prompt], &options, |_, _| {})?;
        let text = tokenizer.decode(&new[0])?;
        hits += (text.trim() == example.response.trim()) as usize;
    }
    Ok((hits, eval.len()))
}

fn scores<M: CausalLm>(
    model: &M,
    tokenizer: &Tokenizer,
    eval_tokens: &[Tokenized],
    eval: &[peft_train::Example],
    pad: u32,
    with_exact_match: bool,
) -> Result<Scores> {
    let loss = peft_train::evaluate(model, eval_tokens, 8, pad)?;
    Ok(Scores {
        loss,
        perplexity: loss.exp(),
        exact_match: if with_exact_match {
            Some(exact_match(model, tokenizer, eval)?)
        } else {
            None
        },
    })
}

/// Everything a run needs besides the adapter: the same for every method.
pub(crate) struct RunContext<'a> {
    pub(crate) method: &'static peft::Method,
    pub(crate) args: &'a TrainArgs,
    pub(crate) model_dir: &'a Path,
    pub(crate) tokenizer: &'a Tokenizer,
    train_tokens: &'a [Tokenized],
    eval_tokens: &'a [Tokenized],
    eval: &'a [peft_train::Example],
    config: &'a TrainConfig,
    group: &'a dyn peft_train::Collective,
    /// Opened once the adapter is drawn (rank 0 of `--devices`).
    drawn: Option<&'a Latch>,
}

impl RunContext<'_> {
    /// `--target-modules` as PEFT's `target_modules` (`all-linear` alone is the shorthand).
    fn targets(&self) -> Option<TargetModules> {
        self.args
            .target_modules
            .clone()
            .map(|t| match t.as_slice() {
                [one] if one == "all-linear" => TargetModules::Pattern(one.clone()),
                _ => TargetModules::List(t),
            })
    }
}

/// The method's adapter on `base`: its config from `--config` or the method's default, with
/// the flags that set its values (`--r`, `--lora-alpha`, `--lora-dropout`, `--use-dora`,
/// `--use-rslora`, `--alpha`, `--rank-dropout`, `--module-dropout`, `--decompose-both`,
/// `--decompose-factor`, `--rank-dropout-scale`, `--projection-prng-key`,
/// `--no-save-projection`, `--vera-dropout`, `--d-initial`, `--target-r`, `--total-step`,
/// `--tinit`, `--tfinal`, `--trainable-token-indices`, `--target-modules`,
/// `--num-virtual-tokens`), then the run.
fn train_method(base: AnyModel<NoAdapter>, ctx: &RunContext<'_>) -> Result<()> {
    let args = ctx.args;
    let overrides = peft::ConfigOverrides {
        r: args.r,
        lora_alpha: args.lora_alpha,
        lora_dropout: args.lora_dropout,
        alpha: args.alpha,
        rank_dropout: args.rank_dropout,
        module_dropout: args.module_dropout,
        decompose_both: args.decompose_both.then_some(true),
        decompose_factor: args.decompose_factor,
        rank_dropout_scale: args.rank_dropout_scale.then_some(true),
        projection_prng_key: args.projection_prng_key,
        save_projection: args.no_save_projection.then_some(false),
        vera_dropout: args.vera_dropout,
        d_initial: args.d_initial,
        target_r: args.target_r,
        total_step: args.total_step,
        tinit: args.tinit,
        tfinal: args.tfinal,
        use_dora: args.use_dora.then_some(true),
        use_rslora: args.use_rslora.then_some(true),
        init_lora_weights: args.init_lora_weights.clone(),
        trainable_token_indices: args.trainable_token_indices.clone(),
        target_modules: ctx.targets(),
        num_virtual_tokens: args.num_virtual_tokens,
        base_model_name_or_path: Some(ctx.model_dir.display().to_string()),
    };
    if let Some(dir) = &args.adapter {
        let only_the_base = peft::ConfigOverrides {
            base_model_name_or_path: overrides.base_model_name_or_path.clone(),
            ..Default::default()
        };
        if overrides != only_the_base {
            bail!(
                "--adapter {}: the adapter keeps its config; drop the flags that set config \
                 values (--r, --lora-alpha, --target-modules, …)",
                dir.display()
            );
        }
        return peft::PeftModel::load(base, dir, true)?.visit(Run(ctx));
    }
    // AdaLoRA's schedule spans the run unless the flag or the config file says otherwise (PEFT
    // asks its user for `total_step`; here the run knows it).
    let run_steps = ctx
        .config
        .across_ranks(ctx.group.world_size())
        .total_steps(ctx.train_tokens.len());
    let overrides = peft::ConfigOverrides {
        total_step: overrides
            .total_step
            .or(args.config.is_none().then_some(run_steps)),
        ..overrides
    };
    let mut config = ctx.method.config(args.config.as_deref())?;
    config.apply(&overrides);
    peft::PeftModel::new(base, config, Some(ctx.tokenizer))?.visit(Run(ctx))
}

/// PiSSA and OLoRA change the base weight while training, so the adapter written for others is
/// the plain LoRA (rank 2r) that gives the trained model over the untouched base, as PEFT's
/// `save_pretrained(path_initial_model_for_weight_conversion=…)` writes it: the saved adapter is
/// read back onto the original base (which recomputes the same residual) and converted in
/// place. Returns the initialisation's name when it converted.
fn convert_if_base_changed(model_dir: &Path, adapter_dir: &Path) -> Result<Option<&'static str>> {
    let peft::PeftConfig::Lora(config) = peft::load_config(adapter_dir)? else {
        return Ok(None);
    };
    let Some(kind) = config.base_init().filter(|k| k.converts()) else {
        return Ok(None);
    };
    let base = peft_models::load(model_dir, &burn::tensor::Device::flex())
        .with_context(|| format!("loading {} to convert the adapter", model_dir.display()))?;
    let trained = peft_lora::from_pretrained(base, adapter_dir, false)?;
    peft_lora::save_pretrained_converted(&trained, adapter_dir)?;
    Ok(Some(kind.name()))
}

/// [`run`] as a visitor of the typed adapter inside a [`peft::PeftModel`].
struct Run<'a, 'b>(&'a RunContext<'b>);

impl peft::AdapterVisitor for Run<'_, '_> {
    type Output = Result<()>;
    fn visit<A>(self, adapter: A) -> Result<()>
    where
        A: AdapterModel + Into<peft::PeftModel> + 'static,
        <A::Model as CausalLm>::WithAdapter<NoAdapter>: CausalLm<Adapter = NoAdapter>,
    {
        run(adapter, self.0)
    }
}

/// The run after the method is chosen: identical for every method.
fn run<A: AdapterModel>(adapter: A, ctx: &RunContext<'_>) -> Result<()>
where
    <A::Model as CausalLm>::WithAdapter<NoAdapter>: CausalLm<Adapter = NoAdapter>,
{
    let RunContext {
        method,
        args,
        model_dir,
        tokenizer,
        train_tokens,
        eval_tokens,
        eval,
        config,
        group,
        drawn,
    } = *ctx;
    if let Some(latch) = drawn {
        latch.open();
    }
    // Rank 0 of a distributed run (or the only process) evaluates, reports and writes results;
    // the other ranks train and stop.
    let lead = group.rank() == 0;
    let spec = adapter.model().spec().clone();
    let pad = spec.pad_token_id.unwrap_or(0);
    let with_em = !args.no_exact_match && !eval.is_empty();
    let before = if lead {
        eprintln!("{}", adapter.trainable_summary());
        Some(scores(
            &adapter.model().valid(),
            tokenizer,
            eval_tokens,
            eval,
            pad,
            with_em,
        )?)
    } else {
        None
    };
    let ranks = group.world_size();
    let global = config.across_ranks(ranks);
    if lead && ranks > 1 {
        eprintln!(
            "data parallel: {ranks} ranks × batch {} × {} accumulation step(s) = {} examples per \
             optimizer step",
            config.per_device_train_batch_size,
            config.gradient_accumulation_steps,
            ranks * config.per_device_train_batch_size * config.gradient_accumulation_steps
        );
    }
    let total = global.total_steps(train_tokens.len());
    let bar = if lead {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
        )
        .expect("static template"),
    );
    let resume = match args.resume.as_deref() {
        None => Resume::No,
        Some("latest") => Resume::Latest,
        Some(path) => Resume::From(PathBuf::from(path)),
    };
    install_stop_handlers();
    let (trained, summary) = peft_train::train_distributed(
        adapter,
        train_tokens,
        pad,
        config,
        &args.output,
        resume,
        group,
        &mut |event| match event {
            Event::Step {
                step,
                loss,
                lr,
                tokens_per_s,
                ..
            } => {
                bar.set_position(*step as u64);
                bar.set_message(format!(
                    "loss {loss:.4}  lr {lr:.2e}  {tokens_per_s:.0} tok/s"
                ));
            }
            Event::Checkpoint(dir) => bar.println(format!("checkpoint: {}", dir.display())),
        },
    )?;
    bar.finish();
    if let Some(dir) = &summary.interrupted {
        return Err(Interrupted {
            step: summary.steps,
            checkpoint: dir.clone(),
        }
        .into());
    }
    let Some(before) = before else {
        return Ok(());
    };
    // The adapter is the result: saved before the held-out evaluation and the merge, so that a
    // failure in either (a bad record, a full disk) keeps it.
    let adapter_dir = args.output.join("adapter");
    trained.save_pretrained(&adapter_dir)?;
    let converted = convert_if_base_changed(model_dir, &adapter_dir)?;
    let after = scores(
        &trained.model().valid(),
        tokenizer,
        eval_tokens,
        eval,
        pad,
        with_em,
    )?;

    let merged_dir = args.output.join("merged");
    let save_options = args.save.options()?;
    let merged = if args.no_merged {
        eprintln!("no merged model: --no-merged");
        None
    } else if !method.merges {
        // Prompt learning has nothing to merge: the adapter is the result.
        eprintln!(
            "no merged model: {} keeps its virtual tokens outside the weights",
            method.name
        );
        None
    } else {
        // Merged layer by layer as the checkpoint is written: never a whole merged copy.
        peft_models::save_merged_with(
            &trained.model().valid(),
            model_dir,
            &merged_dir,
            &save_options,
        )?;
        Some(merged_dir)
    };
    let curve = peft_train::plot::curve(&summary.history, &global, total);
    peft_train::plot::write_loss_png(&args.output.join("loss.png"), &curve)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.output.join("loss.png").display()))?;
    let report = serde_json::json!({
        "method": method.name, "steps": summary.steps, "final_train_loss": summary.final_train_loss,
        "held_out": eval.len(), "before": before, "after": after,
    });
    peft_tensors::write_atomic(
        args.output.join("summary.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;

    let em = |s: &Scores| {
        s.exact_match.map_or("–".to_string(), |(h, n)| {
            format!("{h}/{n} ({:.0}%)", 100.0 * h as f64 / n.max(1) as f64)
        })
    };
    println!("\n{:<22} {:>14} {:>14}", "held-out", "before", "after");
    println!("{:<22} {:>14.4} {:>14.4}", "loss", before.loss, after.loss);
    println!(
        "{:<22} {:>14.2} {:>14.2}",
        "perplexity", before.perplexity, after.perplexity
    );
    println!(
        "{:<22} {:>14} {:>14}",
        "exact match",
        em(&before),
        em(&after)
    );
    println!("\nadapter: {}", adapter_dir.display());
    if let Some(init) = converted {
        println!(
            "  ({init} changed the base while training: adapter/ holds the plain LoRA of rank 2r \
             that gives the trained model over the original base, as PEFT's \
             path_initial_model_for_weight_conversion writes it; the checkpoints hold the \
             {init} adapter itself)"
        );
    }
    // Only a merged model that was written is named.
    if let Some(dir) = &merged {
        println!("merged model: {}", dir.display());
    }
    println!(
        "metrics: {}\nloss plot: {}",
        args.output.join("metrics.jsonl").display(),
        args.output.join("loss.png").display()
    );
    Ok(())
}

fn schedule(name: &str) -> Result<Schedule> {
    Ok(match name {
        "constant" => Schedule::Constant,
        "linear" => Schedule::Linear,
        "cosine" => Schedule::Cosine,
        other => bail!("--lr-scheduler: unknown `{other}` (constant, linear, cosine)"),
    })
}

/// Training stopped by Ctrl-C after writing a checkpoint (exit status 130).
#[derive(Debug)]
pub struct Interrupted {
    /// Optimizer steps done.
    pub step: usize,
    /// The checkpoint written at that step.
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted at step {}: checkpoint saved in {}; continue with --resume latest",
            self.step,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Interrupted {}

extern "C" fn on_sigint(signal: libc::c_int) {
    peft_train::request_stop();
    // A second Ctrl-C (or SIGTERM) kills at once.
    // SAFETY: signal() is async-signal-safe; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
    }
}

/// Ctrl-C or SIGTERM (a scheduler's, or `kill` on one rank of a distributed run) finishes the
/// current optimizer step on every rank, writes a checkpoint and exits with status 130.
fn install_stop_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: the handler only performs an atomic store and an async-signal-safe call.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// The run's method: with `--adapter`, the folder's (a LoRA folder keeps `--method qlora`'s
/// 4-bit preset), else `--method`.
fn run_method(args: &TrainArgs) -> Result<&'static peft::Method> {
    let named = peft::by_name(&args.method)?;
    let Some(dir) = &args.adapter else {
        return Ok(named);
    };
    let peft_type = peft::load_config(dir)?.peft_type();
    Ok(if named.peft_type == peft_type {
        named
    } else {
        peft::by_peft_type(peft_type)
    })
}

/// `peft train`.
pub fn train(args: TrainArgs) -> Result<()> {
    // Checked before anything is written or loaded.
    run_method(&args)?;
    schedule(&args.lr_scheduler)?;
    let timeout = std::time::Duration::from_secs(args.distributed_timeout);
    if let Some(list) = &args.devices {
        if args.distributed.as_deref() == Some("mpi")
            || crate::distributed::launched_ranks().is_some_and(|n| n > 1)
        {
            bail!(
                "--devices trains on several devices in one process; under MPI each rank takes \
                 one device (--device)"
            );
        }
        let devices = peft_ops::device::parse_devices(list)?;
        if devices.len() > 1 {
            return train_on_devices(args, devices, timeout);
        }
    }
    // First, so that a run that cannot join its group fails before loading anything.
    let group = crate::distributed::group(args.distributed.as_deref(), timeout)?;
    let device = match &args.devices {
        Some(list) => peft_ops::device::parse_device(list.trim())?,
        None => args.device.resolve()?,
    };
    let args = prepared(args, group.rank() == 0)?;
    train_on(&args, device, group.as_ref(), None)
}

/// burn's multi-device data parallelism in one process (`--devices cuda:0,cuda:1`), as
/// burn-train's multi-device strategy runs it: one worker thread per device, each with its own
/// copy of the model on its device, the gradients summed after every step (here through
/// [`peft_train::ThreadRanks`], the same all-reduce the MPI ranks use) and the same optimizer
/// step applied on every device. Rank 0 (the first device) reports and writes.
fn train_on_devices(
    args: TrainArgs,
    devices: Vec<burn::tensor::Device>,
    timeout: std::time::Duration,
) -> Result<()> {
    let args = prepared(args, true)?;
    let ranks = peft_train::ThreadRanks::group(devices.len(), timeout);
    // The other ranks start once rank 0 has drawn its adapter: ranks on one device (`cpu,cpu`)
    // share its random generator, and rank 0's draws must be a single process's draws. (Every
    // rank then starts from rank 0's values anyway.)
    let drawn = Latch::default();
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let workers: Vec<_> = ranks
            .iter()
            .zip(devices)
            .map(|(rank, device)| {
                let (args, drawn) = (&args, &drawn);
                scope.spawn(move || {
                    let first = peft_train::Collective::rank(rank) == 0;
                    if !first {
                        drawn.wait();
                    }
                    let result = train_on(args, device, rank, first.then_some(drawn));
                    if first {
                        drawn.open();
                    }
                    if let Err(e) = &result
                        && e.downcast_ref::<Interrupted>().is_none()
                    {
                        rank.abandon(&format!("{e:#}"));
                    }
                    result
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a training thread panicked")))
            })
            .collect()
    });
    // The error a rank met first, not the others' "rank N failed" that follows from it.
    let mut errors: Vec<anyhow::Error> = results.into_iter().filter_map(Result::err).collect();
    let own = errors.iter().position(|e| {
        !matches!(
            e.downcast_ref::<peft_train::TrainError>(),
            Some(peft_train::TrainError::Distributed(_))
        )
    });
    match own {
        Some(i) => Err(errors.swap_remove(i)),
        None => errors.into_iter().next().map_or(Ok(()), Err),
    }
}

/// A one-way gate: [`Latch::wait`] returns once [`Latch::open`] was called.
#[derive(Default)]
pub(crate) struct Latch {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Latch {
    pub(crate) fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// `args` with the bundled model and data written out where none were given (and the demo
/// preset's defaults); `lead` prints the note.
fn prepared(mut args: TrainArgs, lead: bool) -> Result<TrainArgs> {
    let demo = args.model.is_none() && args.data.is_none();
    if args.model.is_none() || args.data.is_none() {
        let (bm, bd) = write_bundled(&args.output)?;
        args.model = args.model.or(Some(bm));
        args.data = args.data.or(Some(bd));
    }
    if demo {
        // The demo preset: the bundled model is tiny, so it gets a wider adapter and more epochs
        // than PEFT's defaults (flags given explicitly still win).
        if lead {
            eprintln!(
                "no --model/--data: fine-tuning the bundled pretrained tiny BLOOM on the bundled demo \
                 set ({}30 epochs, lr 1e-2)",
                if args.adapter.is_some() {
                    "the adapter's own config, "
                } else {
                    "LoRA r=16, alpha=32 on all linear layers, "
                }
            );
        }
        // An adapter being continued keeps its config.
        if args.adapter.is_none() {
            args.r = args.r.or(Some(16));
            args.lora_alpha = args.lora_alpha.or(Some(32.0));
            args.target_modules = args.target_modules.or(Some(vec!["all-linear".into()]));
        }
        args.epochs = args.epochs.or(Some(30));
        args.learning_rate = args.learning_rate.or(Some(1e-2));
    }
    Ok(args)
}

/// One rank's run (the only one outside distributed training) on `device`.
fn train_on(
    args: &TrainArgs,
    device: burn::tensor::Device,
    group: &dyn peft_train::Collective,
    drawn: Option<&Latch>,
) -> Result<()> {
    // Notes are printed once, by rank 0, in a distributed run.
    let lead = group.rank() == 0;
    let method = run_method(args)?;
    let lr_schedule = schedule(&args.lr_scheduler)?;
    let (Some(model_dir), Some(data_path)) = (args.model.clone(), args.data.clone()) else {
        bail!("no model or data after preparing the run");
    };
    let device = if args.gradient_checkpointing {
        if lead && peft_ops::device::runs_cpu_kernels(&device) {
            eprintln!(
                "note: --gradient-checkpointing on the CPU backend recomputes the MLP \
                 activations (less memory where the down projection is adapted, as with \
                 all-linear) but keeps every product's output; with PEFT's default targets it \
                 keeps more memory, not less (docs/BENCHMARKS.md)"
            );
        }
        device.autodiff().gradient_checkpointing()
    } else {
        device.autodiff()
    };
    // The QLoRA preset computes in bf16 unless told otherwise; on a CPU with bf16 units that
    // is also faster per step (docs/methods/qlora.md has the figures).
    let dtype_default = if method.trains_on_4bit_base {
        crate::DtypeDefault::Bfloat16WhereAvailable
    } else {
        crate::DtypeDefault::Float32
    };
    let mut options = args.load.options(&model_dir, &device, dtype_default)?;
    // Checked before hours of training, not after.
    args.save.options()?;
    if options.quantize.is_none() && method.trains_on_4bit_base {
        options.quantize = Some(peft_quant::QuantConfig::default());
    }
    if lead
        && method.trains_on_4bit_base
        && args.load.compute_dtype.is_none()
        && options.compute_dtype == peft_ops::precision::ComputeDtype::F32
    {
        eprintln!("note: {device:?} has no bf16: the QLoRA preset computes in float32");
    }
    let base = peft_models::load_with(&model_dir, &device, &options)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    if lead && options.compute_dtype != peft_ops::precision::ComputeDtype::F32 {
        eprintln!(
            "linear layers compute in {} (--compute-dtype float32 for f32)",
            options.compute_dtype
        );
    }
    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    let spec = base.spec().clone();
    let examples = peft_train::read_examples(&data_path)?;
    let (train_ex, eval_ex) = peft_train::split(&examples, args.eval_fraction, args.seed);
    let tokens = |ex: &[peft_train::Example]| {
        peft_train::tokenize_all(
            &data_path,
            ex,
            &tokenizer,
            spec.eos_token_id(),
            args.max_length,
        )
    };
    let train_tokens = tokens(&train_ex)?;
    let eval_tokens = if eval_ex.is_empty() {
        Vec::new()
    } else {
        tokens(&eval_ex)?
    };
    if lead {
        eprintln!(
            "{}: {} training examples, {} held out",
            data_path.display(),
            train_tokens.len(),
            eval_tokens.len()
        );
    }
    let config = TrainConfig {
        learning_rate: args.learning_rate.unwrap_or(5e-3),
        num_train_epochs: args.epochs.unwrap_or(3),
        max_steps: args.max_steps,
        per_device_train_batch_size: args.batch_size,
        gradient_accumulation_steps: args.grad_accum,
        warmup_steps: args.warmup_steps,
        lr_scheduler_type: lr_schedule,
        weight_decay: args.weight_decay,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        seed: args.seed,
        save_steps: args.save_steps,
        save_total_limit: args.save_total_limit,
        // What a resume compares: the base model's config.json and the data file.
        sources: peft_train::RunSources {
            base_model: Some(peft_train::fingerprint_file(
                &model_dir.join("config.json"),
            )?),
            data: Some(peft_train::DataFingerprint::of(&data_path)?),
        },
        ..TrainConfig::default()
    };
    device.seed(args.seed);
    let ctx = RunContext {
        method,
        args,
        model_dir: &model_dir,
        tokenizer: &tokenizer,
        train_tokens: &train_tokens,
        eval_tokens: &eval_tokens,
        eval: &eval_ex,
        config: &config,
        group,
        drawn,
    };
    train_method(base, &ctx)
}
