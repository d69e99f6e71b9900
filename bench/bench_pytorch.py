#!/usr/bin/env python3
"""The PyTorch + PEFT side of `cargo xtask bench --vs-pytorch`: the same cases as peft-bench,
one per process, printed as one JSON line with the same fields.

    python bench/bench_pytorch.py <case> [--threads N] [--quick]
"""

import json
import resource
import sys
import time

import torch
import transformers

from rss import peak_rss, reset_peak_rss

ARGS = sys.argv[1:]
CASE = ARGS[0]
# `burn-lora-train` is burn's own LoRA on our side; PyTorch's side of it is plain lora-train.
# `llama-<method>-train` is `<method>-train` on the Llama.
ARCH = next((a for a in ("llama", "mistral", "qwen3", "gemma2", "phi3") if CASE.startswith(a + "-")), None)
METHOD = {"burn-lora-train": "lora-train"}.get(CASE, CASE.removeprefix(f"{ARCH}-") if ARCH else CASE)
# `-gc`: gradient checkpointing (transformers' gradient_checkpointing_enable()).
CHECKPOINTING = METHOD.endswith("-gc")
METHOD = METHOD.removesuffix("-gc")
QUICK = "--quick" in ARGS
THREADS = int(ARGS[ARGS.index("--threads") + 1]) if "--threads" in ARGS else torch.get_num_threads()
torch.set_num_threads(THREADS)
BATCH, SEQ, WARMUP, REPS = (1, 32, 1, 2) if QUICK else (4, 128, 2, 10)


def base_model():
    config = transformers.BloomConfig(
        vocab_size=8000, hidden_size=512, n_layer=4, n_head=8, bos_token_id=1, eos_token_id=2, pad_token_id=3
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


ARCH_EXTRA = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": 64}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 64}),
    "gemma2": (transformers.Gemma2Config, {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 64}),
    "phi3": (transformers.Phi3Config, {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                           "partial_rotary_factor": 0.5}}),
}


def arch_model(arch):
    """A model of the BLOOM case's size with grouped-query attention (8 heads, 2 KV heads) on
    `arch` (crates/peft-bench builds the same configs)."""
    cls, extra = ARCH_EXTRA[arch]
    config = cls(
        vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3, **extra,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def four_bit_model(tmp, compute_dtype=torch.float32):
    """The base model loaded as transformers does for QLoRA: NF4 + double quant."""
    (arch_model(ARCH) if ARCH else base_model()).save_pretrained(tmp)
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        tmp, quantization_config=config, dtype=torch.float32, attn_implementation="eager",
        device_map="cpu",
    )


def timed(step):
    times = []
    for i in range(WARMUP + REPS):
        start = time.perf_counter()
        step()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return times


def main():
    import peft

    ids = torch.randint(4, 8000, (BATCH, SEQ))
    mask = torch.ones_like(ids)
    extra = {}
    if CASE == "quantize-nf4":
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        n = 1024 if QUICK else 4096
        w = torch.randn(n, n) * 0.02
        times = timed(lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
        s = sorted(times)
        extra["input_bytes"] = n * n * 4
        extra["gb_per_s"] = n * n * 4 / 1e9 / s[len(s) // 2]
        extra["bitsandbytes"] = bnb.__version__
    elif CASE == "gemm":
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        times = timed(lambda: a @ b)
    elif CASE == "forward":
        model = base_model().eval()
        with torch.no_grad():
            times = timed(lambda: model(input_ids=ids, attention_mask=mask))
    elif CASE.startswith("lora-forward") or CASE == "lora-merge":
        model = peft.get_peft_model(base_model(), peft.LoraConfig(r=8, init_lora_weights=False)).eval()
        if CASE == "lora-merge":
            def merge_unmerge():
                model.merge_adapter()
                model.unmerge_adapter()
            times = [t / 2 for t in timed(merge_unmerge)]
        elif CASE == "lora-forward-mixed":
            # Four adapters, one per row (cycled over the batch): PEFT's adapter_names.
            names = ["default"]
            for i in range(1, 4):
                model.add_adapter(f"a{i}", peft.LoraConfig(r=8, init_lora_weights=False))
                names.append(f"a{i}")
            rows = [names[i % 4] for i in range(BATCH)]
            with torch.no_grad():
                times = timed(lambda: model(input_ids=ids, attention_mask=mask, adapter_names=rows))
        else:
            if CASE == "lora-forward-merged":
                model.merge_adapter()
            with torch.no_grad():
                times = timed(lambda: model(input_ids=ids, attention_mask=mask))
    elif "-train" in CASE:
        if METHOD in ("qlora-train", "qlora-train-bf16"):
            import tempfile

            tmp = tempfile.mkdtemp()
            dtype = torch.bfloat16 if METHOD.endswith("-bf16") else torch.float32
            model = four_bit_model(tmp, dtype)
            model = peft.get_peft_model(model, peft.LoraConfig(r=8))
        else:
            model = arch_model(ARCH) if ARCH else base_model()
        if METHOD in ("qlora-train", "qlora-train-bf16"):
            pass
        elif METHOD in ("lora-train", "lora-train-bf16"):
            # Phi-3 has no PEFT default: its fused attention projection, as crates/peft-bench.
            targets = ["qkv_proj"] if ARCH == "phi3" else None
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=targets))
        elif METHOD == "dora-train":
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, use_dora=True))
        elif METHOD == "tokens-train":
            model = peft.get_peft_model(
                model, peft.TrainableTokensConfig(token_indices=list(range(1, 17))))
        elif METHOD == "loha-train":
            model = peft.get_peft_model(model, peft.LoHaConfig())
        elif METHOD == "lokr-train":
            model = peft.get_peft_model(model, peft.LoKrConfig())
        elif METHOD == "vera-train":
            model = peft.get_peft_model(model, peft.VeraConfig())
        elif METHOD == "adalora-train":
            # PEFT requires total_step; 1000 keeps the timed steps in the budgeting phase.
            model = peft.get_peft_model(model, peft.AdaLoraConfig(total_step=1000))
        elif METHOD == "ia3-train":
            model = peft.get_peft_model(model, peft.IA3Config())
        elif METHOD == "prompt-train":
            model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
        elif METHOD in ("ptuning-train", "ptuning-lstm-train"):
            kind = "MLP" if METHOD == "ptuning-train" else "LSTM"
            model = peft.get_peft_model(model, peft.PromptEncoderConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=8, encoder_reparameterization_type=kind, encoder_hidden_size=128))
        elif METHOD in ("prefix-train", "prefix-proj-train"):
            model = peft.get_peft_model(model, peft.PrefixTuningConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=8, prefix_projection=METHOD == "prefix-proj-train",
                encoder_hidden_size=128))
        elif METHOD == "bitfit-train":
            for name, p in model.named_parameters():
                p.requires_grad = "bias" in name
        else:
            print(f"unknown case {CASE}", file=sys.stderr)
            return 2
        if CHECKPOINTING:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        extra["trainable_params"] = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4)

        # lora-train-bf16: the Trainer's bf16=True, i.e. autocast (linear layers and matmuls in
        # bf16, parameters and optimizer in f32) — peft-rs' bf16 compute in the linear layers.
        autocast = METHOD == "lora-train-bf16"

        global_step = [0]

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            opt.step()
            if METHOD == "adalora-train":
                # AdaLoRA's allocator, where PEFT's docstring puts it (before zero_grad).
                global_step[0] += 1
                model.base_model.update_and_allocate(global_step[0])
            opt.zero_grad()

        reset_peak_rss()
        times = timed(step)
        extra["step_peak_rss_bytes"] = peak_rss()
    elif CASE.startswith("serve-generate-"):
        # `peft serve`'s engine generating for 16 requests over N adapters: transformers'
        # generate of the same batch with PEFT's adapter_names (greedy, fixed length).
        n = int(CASE.rsplit("-", 1)[1])
        rows, prompt_len, new = (16, 8, 4) if QUICK else (16, 32, 32)
        model = peft.get_peft_model(base_model(), peft.LoraConfig(r=8, init_lora_weights=False),
                                    adapter_name="a0")
        for i in range(1, n):
            model.add_adapter(f"a{i}", peft.LoraConfig(r=8, init_lora_weights=False))
        model.eval()
        names = [f"a{r % n}" for r in range(rows)]
        prompts = torch.tensor([[4 + (r * 131 + t * 17) % 7990 for t in range(prompt_len)]
                                for r in range(rows)])
        with torch.no_grad():
            times = timed(lambda: model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), adapter_names=names,
                max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=3))
        extra.update({"batch": rows, "seq": new, "adapters": n, "tokens_per_s": 0})
    elif CASE == "serve-load":
        print("serve-load has no PyTorch side (PEFT has no server)", file=sys.stderr)
        return 2
    else:
        print(f"unknown case {CASE}", file=sys.stderr)
        return 2
    s = sorted(times)
    out = {
        "case": CASE,
        "impl": "pytorch+peft",
        "batch": BATCH,
        "seq": SEQ,
        "times_s": times,
        "median_s": s[len(s) // 2],
        "min_s": s[0],
        "max_s": s[-1],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": THREADS,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        **extra,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
