#!/usr/bin/env python3
"""The PyTorch + PEFT (+ bitsandbytes) side of `cargo xtask bench --scale --vs-pytorch`: the same
phases as peft-bench's scale cases on the same generated checkpoint, one JSON line.

    python bench/bench_scale_pytorch.py scale-lora|scale-qlora|scale-generate --model DIR
        [--steps N] [--threads N] [--autocast]

scale-lora: load in f32 → N LoRA steps (r=8, PEFT's default targets, AdamW, batch 1 × 256) →
merge_and_unload + save_pretrained (bf16, what transformers 5 writes for a bf16 base loaded with
its default dtype="auto"; loaded here in f32 to train in f32, so cast back before saving).
--autocast: the LoRA steps under torch.autocast("cpu", bfloat16) (the Trainer's bf16=True: linear
layers and matmuls in bf16), against peft-bench's `--compute-dtype bfloat16`.
scale-qlora: the same over load_in_4bit (NF4 + double quant, bf16 compute as the seed does).
scale-generate: transformers' default load (dtype="auto": bf16 for these checkpoints) → greedy
generate of 32 tokens.
"""

import json
import sys
import tempfile
import time

import torch
import transformers

from rss import peak_rss, reset_peak_rss

ARGS = sys.argv[1:]
CASE = ARGS[0]
MODEL = ARGS[ARGS.index("--model") + 1]
STEPS = int(ARGS[ARGS.index("--steps") + 1]) if "--steps" in ARGS else 3
AUTOCAST = "--autocast" in ARGS
THREADS = int(ARGS[ARGS.index("--threads") + 1]) if "--threads" in ARGS else torch.get_num_threads()
torch.set_num_threads(THREADS)
BATCH, SEQ, NEW_TOKENS = 1, 256, 32


def phase(seconds, **extra):
    return {"seconds": seconds, "peak_rss_bytes": peak_rss(), **extra}


def train(phases):
    import peft

    reset_peak_rss()
    start = time.perf_counter()
    if CASE == "scale-qlora":
        quant = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            MODEL, quantization_config=quant, dtype=torch.float32, device_map="cpu")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    phases["load"] = phase(time.perf_counter() - start)

    reset_peak_rss()
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, task_type="CAUSAL_LM"))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(4, 8000, (BATCH, SEQ))
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=AUTOCAST):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        times.append(time.perf_counter() - start)
    phases["train"] = phase(sum(times), step_times_s=times, median_step_s=sorted(times)[len(times) // 2])

    reset_peak_rss()
    start = time.perf_counter()
    merged = model.merge_and_unload()
    with tempfile.TemporaryDirectory() as out:
        merged.to(torch.bfloat16).save_pretrained(out)
    phases["merge_save"] = phase(time.perf_counter() - start)


def generate(phases):
    reset_peak_rss()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL)
    load_s = time.perf_counter() - start
    phases["load"] = phase(load_s)

    reset_peak_rss()
    prompt = torch.tensor([[100 + 37 * i for i in range(16)]])
    stamps = []

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter() - start)
            return scores

    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                   min_new_tokens=NEW_TOKENS, do_sample=False,
                   logits_processor=transformers.LogitsProcessorList([Stamp()]))
    total = time.perf_counter() - start
    first = stamps[0]
    per_token = (stamps[-1] - first) / max(len(stamps) - 1, 1)
    phases["generate"] = phase(total, first_token_s=first, load_plus_first_token_s=load_s + first,
                               per_token_s=per_token, tokens=len(stamps),
                               dtype=str(model.dtype))


def main():
    phases = {}
    if CASE in ("scale-lora", "scale-qlora"):
        train(phases)
    elif CASE == "scale-generate":
        generate(phases)
    else:
        print(f"unknown case {CASE}", file=sys.stderr)
        return 2
    print(json.dumps({
        "case": CASE,
        "impl": "pytorch+peft",
        "phases": phases,
        "peak_rss_bytes": max(p["peak_rss_bytes"] or 0 for p in phases.values()),
        "threads": THREADS,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
