#!/usr/bin/env python3
"""llama.cpp itself runs what `peft export-gguf` writes, with the reference's logits.

    ../pyref/bin/python clients/llama_cpp_check.py target/debug/peft

Needs llama-cpp-python 0.3.36 and gguf-py (clients/requirements-llama-cpp.txt; the former
builds llama.cpp from source) beside transformers and PEFT (fixtures/requirements.txt).

For each fixture model it exports a GGUF with the `peft` binary and evaluates a token sequence in
llama.cpp (`Llama.eval`, every position's logits), then compares with transformers (and PEFT for
adapters) on the same sequence:
- f32 model GGUFs (llama, mistral, qwen2, qwen3, phi3, Llama 3 RoPE): max |Δ| ≤ 1e-4; BLOOM ≤ 2e-3
  (llama.cpp's GELU goes through an f16 table, see BLOOM_TOLERANCE);
- f16 GGUFs: max |Δ| ≤ F16_TOLERANCE (f16 weights; the measured figure is printed);
- LoRA GGUFs over the f32 base GGUF (`Llama(lora_path=...)`): PEFT's logits ≤ 1e-4, including
  `lora-llama` (rsLoRA, alpha and rank patterns: the scaling folded into lora_b);
- the merged GGUF (`--adapter --merge`): PEFT's logits ≤ 1e-4;
- greedy generation, 20 tokens, through llama.cpp equals transformers' greedy `generate`;
- q8_0: llama.cpp's own quantiser (`llama_model_quantize`, f32 GGUF → Q8_0) writes the same
  bytes as `peft export-gguf --outtype q8_0` for every tensor it stores as Q8_0;
- q4_0, q4_k_m, q5_k_m, q6_k: every tensor of `peft export-gguf --outtype …` has the type and
  bytes `llama_model_quantize` gives it from the f32 export (a 256-wide, 8-block Llama made
  here, and the 64-wide fixtures, whose rows take the fallback types).
"""

import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import peft
import torch
import transformers

import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

F32_TOLERANCE = 1e-4
F32 = 0  # GGML_TYPE_F32
# BLOOM's GELU runs through ggml's f16 table (GeluThroughF16Table below reproduces it), but an
# input within float noise of an f16 rounding boundary still lands one f16 step away: measured
# 1.1e-3 at worst over the 12 positions (2e-6 at others), against logits up to 6.9.
BLOOM_TOLERANCE = 2e-3


def f32_tolerance(model: str) -> float:
    return BLOOM_TOLERANCE if model.startswith("bloom") else F32_TOLERANCE
# f16 weights, and llama.cpp rounds each product's activations to f16 too (ggml's vec_dot type
# for f16 weights): measured against a reference whose weights are rounded to f16 the same way,
# relative to the largest logit.
F16_RELATIVE_TOLERANCE = 1e-2
Q8_0_RELATIVE_TOLERANCE = 5e-2

# (model, sequence length): Mistral's fixture has a sliding window of 4, which GGUF's `llama`
# does not carry (docs/EXPORT.md), so its sequence stays within the window.
MODELS = [
    ("llama-tiny", 12),
    ("mistral-tiny", 4),
    ("qwen2-tiny", 12),
    ("qwen3-tiny", 12),
    ("bloom-tiny", 12),
    ("llama-rope-llama3", 12),
    # Phi-3 (written as Phi-4 is: byte-level BPE vocabulary): its sliding window is 6, past
    # which llama.cpp's logits part from transformers' (docs/EXPORT.md), so the sequence stays
    # within it.
    ("phi3-tiny", 6),
]
ADAPTERS = [
    ("lora-llama", "llama-tiny"),
    ("lora-bloom", "bloom-tiny"),
    ("lora-qwen3", "qwen3-tiny"),
]


def export(peft_bin: str, out: Path, model: str | Path, *extra: str) -> Path:
    """`peft export-gguf` of a fixture model (by name) or of a model folder (a path)."""
    folder = model if isinstance(model, Path) else FIXTURES / "models" / model
    if model == "phi3-tiny":
        # llama.cpp marks Phi-3's special tokens by `general.name` (containing "phi3") and then
        # looks up `<|endoftext|>`, which the tiny vocabulary lacks: another name here.
        extra = (*extra, "--name", "Tiny")
    subprocess.run(
        [peft_bin, "export-gguf", "--model", str(folder), "--output",
         str(out), *extra],
        check=True,
    )
    return out


def tokens(n: int) -> list[int]:
    # Ordinary ids of the 512-token vocabulary (not the four special ones), fixed.
    return [int(5 + (i * 37) % 500) for i in range(n)]


def llama_cpp_logits(path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    kwargs = {"lora_path": str(lora)} if lora else {}
    # The KV cache in f32 (llama.cpp's default is f16, which alone moves logits by ~1e-2).
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True,
                          n_threads=2, verbose=False, type_k=F32, type_v=F32, **kwargs)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_greedy(path: Path, ids: list[int], n: int) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False,
                          type_k=F32, type_v=F32)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            break
    return out


class GeluThroughF16Table(torch.nn.Module):
    """ggml's CPU GELU (GGML_GELU_FP16, on by default): the input rounded to f16, looked up in a
    table of f16 results; 0 below -10, the input itself above 10."""

    def forward(self, x):
        h = x.half().float()
        y = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * h * (1.0 + 0.044715 * h * h)))
        y = y.half().float()
        return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


def hf_model(model: str, adapter: str | None = None):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        FIXTURES / "models" / model, dtype=torch.float32, attn_implementation="eager")
    for module in m.modules():
        # BLOOM's GELU as llama.cpp computes it, so the comparison isolates the file's contents.
        if hasattr(module, "gelu_impl"):
            module.gelu_impl = GeluThroughF16Table()
    if adapter:
        m = peft.PeftModel.from_pretrained(m, FIXTURES / "adapters" / adapter)
    return m.eval()


def hf_logits(m, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float().numpy()


def hf_model_f16_weights(model: str):
    """The f32 model with every matrix the f16 GGUF stores as f16 rounded to f16."""
    m = hf_model(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1 and "norm" not in name:
                p.copy_(p.half().float())
    return m


def check_relative(label: str, ours: np.ndarray, ref: np.ndarray, tolerance: float) -> float:
    diff = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    status = "ok" if diff <= tolerance * scale else "FAIL"
    print(f"{status:4} {label}: max |Δ| = {diff:.2e} = {diff / scale:.1e} of max |logit| "
          f"{scale:.1f} (≤ {tolerance:g})")
    if diff > tolerance * scale:
        raise SystemExit(f"{label}: llama.cpp's logits differ from the reference by {diff}")
    return diff


def check(label: str, ours: np.ndarray, ref: np.ndarray, tolerance: float) -> float:
    diff = float(np.abs(ours - ref).max())
    status = "ok" if diff <= tolerance else "FAIL"
    print(f"{status:4} {label}: max |Δ| = {diff:.2e} (≤ {tolerance:g})")
    if diff > tolerance:
        raise SystemExit(f"{label}: llama.cpp's logits differ from the reference by {diff}")
    return diff


def llama_quantize(f32: Path, out: Path, ftype: str) -> Path:
    """llama.cpp's quantiser (`llama-quantize`'s library call), no importance matrix."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {ftype} failed ({rc})")
    return out


def wide_llama(tmp: Path) -> Path:
    """A Llama whose rows are 256 and 512 wide (k-quant super-blocks are 256 values; the tiny
    fixtures' 64-wide rows only reach the fallback types), 8 blocks (the `_M` mixes give more
    bits to blocks 0, 3, 6 and 7 of 8) and an untied output, seeded random weights."""
    src = FIXTURES / "models" / "llama-tiny"
    cfg = transformers.AutoConfig.from_pretrained(src)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 256, 512, 8
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 64
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    out = tmp / "llama-wide"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    return out


def quantised_mixes_match(peft_bin: str, tmp: Path) -> None:
    """`peft export-gguf --outtype q4_0 | q4_k_m | q5_k_m | q6_k` writes, tensor for tensor, the
    types and bytes `llama_model_quantize` writes from the f32 export: the per-tensor choices of
    each mix (more bits for value / FFN-down projections on some blocks, Q6_K output, the
    fallbacks of rows that do not split into 256-value blocks) and the encoders."""
    from gguf import GGUFReader  # llama.cpp's own reader (gguf-py)

    wide = wide_llama(tmp)
    cases = [(wide, "q4_0"), (wide, "q4_k_m"), (wide, "q5_k_m"), (wide, "q6_k"),
             ("llama-tiny", "q4_k_m"), ("bloom-tiny", "q4_k_m"), ("qwen2-tiny", "q5_k_m")]
    for model, outtype in cases:
        label = model if isinstance(model, str) else model.name
        f32 = export(peft_bin, tmp / f"mix-{label}-f32.gguf", model, "--outtype", "f32")
        ours = export(peft_bin, tmp / f"mix-{label}-{outtype}.gguf", model, "--outtype", outtype)
        theirs = llama_quantize(f32, tmp / f"mix-{label}-{outtype}-llama.gguf", outtype.upper())
        a, b = GGUFReader(ours), GGUFReader(theirs)
        ours_by_name = {t.name: t for t in a.tensors}
        if sorted(ours_by_name) != sorted(t.name for t in b.tensors):
            raise SystemExit(f"{label} {outtype}: the tensor names differ")
        types: dict[str, int] = {}
        for t in b.tensors:
            mine = ours_by_name[t.name]
            if mine.tensor_type != t.tensor_type or bytes(mine.data) != bytes(t.data):
                raise SystemExit(f"{label} {outtype}: {t.name} is {mine.tensor_type.name} here, "
                                 f"{t.tensor_type.name} in llama-quantize's file (or the bytes "
                                 "differ)")
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        file_type = [int(b.fields["general.file_type"].parts[-1][0]),
                     int(a.fields["general.file_type"].parts[-1][0])]
        if file_type[0] != file_type[1]:
            raise SystemExit(f"{label} {outtype}: general.file_type {file_type}")
        mix = ", ".join(f"{n} {k}" for k, n in sorted(types.items()))
        print(f"ok   {label} {outtype}: {len(b.tensors)} tensors identical to llama-quantize's "
              f"({mix})")


def q8_0_bytes_match(peft_bin: str, tmp: Path) -> None:
    f32 = export(peft_bin, tmp / "q-f32.gguf", "llama-tiny", "--outtype", "f32")
    ours = export(peft_bin, tmp / "q-ours.gguf", "llama-tiny", "--outtype", "q8_0")
    theirs = llama_quantize(f32, tmp / "q-llama.gguf", "Q8_0")
    from gguf import GGUFReader  # llama.cpp's own reader (gguf-py)

    a, b = GGUFReader(ours), GGUFReader(theirs)
    by_name = {t.name: t for t in b.tensors}
    same = compared = 0
    for t in a.tensors:
        other = by_name[t.name]
        if t.tensor_type.name != "Q8_0" or other.tensor_type.name != "Q8_0":
            continue
        compared += 1
        same += int(bytes(t.data) == bytes(other.data))
    print(f"q8_0: {same} of {compared} Q8_0 tensors byte-identical to llama_model_quantize")
    if compared == 0 or same != compared:
        raise SystemExit("q8_0 bytes differ from llama.cpp's quantiser")


def peft_logits(peft_bin: str, model: Path, ids: list[int], tmp: Path) -> np.ndarray:
    """`peft logits --model FILE.gguf` (imported into a cache under `tmp`) on one sequence."""
    from safetensors.numpy import load_file, save_file

    inputs, output = tmp / "ids.safetensors", tmp / "logits.safetensors"
    save_file({"input_ids": np.array([ids], dtype=np.int64)}, str(inputs))
    subprocess.run([peft_bin, "logits", "--model", str(model), "--inputs", str(inputs),
                    "--output", str(output)], check=True,
                   env={**os.environ, "PEFT_GGUF_CACHE": str(tmp / "gguf-cache")})
    return load_file(str(output))["logits"][0]


def quantised_file_loads(peft_bin: str, tmp: Path) -> None:
    """A Q8_0 GGUF written by llama.cpp's quantiser, imported by peft-rs (`--model FILE.gguf`),
    gives llama.cpp's logits on the same weights: llama.cpp runs the de-quantised weights that
    peft-rs imported (re-exported as f32) within 1e-4 of `peft logits` on the Q8_0 file. On the
    Q8_0 file itself llama.cpp also rounds each product's activations to 8 bits (Q8_0's
    dot-product type); that difference is printed, bounded relative to the largest logit."""
    ids = tokens(12)
    quantised = tmp / "q-llama.gguf"
    ours = peft_logits(peft_bin, quantised, ids, tmp)
    dequantised = tmp / "q-dequantised-f32.gguf"
    subprocess.run([peft_bin, "export-gguf", "--model", str(quantised), "--output",
                    str(dequantised), "--outtype", "f32"], check=True,
                   env={**os.environ, "PEFT_GGUF_CACHE": str(tmp / "gguf-cache")})
    check("llama.cpp's Q8_0 file imported by peft-rs (its weights in llama.cpp, f32)",
          llama_cpp_logits(dequantised, ids), ours, F32_TOLERANCE)
    check_relative("     the Q8_0 file run by llama.cpp (8-bit activations) vs peft-rs",
                   llama_cpp_logits(quantised, ids), ours, Q8_0_RELATIVE_TOLERANCE)


def main() -> int:
    peft_bin = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model, n in MODELS:
            ids = tokens(n)
            ref = hf_logits(hf_model(model), ids)
            f32 = export(peft_bin, tmp / f"{model}-f32.gguf", model, "--outtype", "f32")
            check(f"{model} f32", llama_cpp_logits(f32, ids), ref,
                                            f32_tolerance(model))
            f16 = export(peft_bin, tmp / f"{model}-f16.gguf", model, "--outtype", "f16")
            got = llama_cpp_logits(f16, ids)
            ref16 = hf_logits(hf_model_f16_weights(model), ids)
            check_relative(
                f"{model} f16 (vs f16-rounded weights)", got, ref16, F16_RELATIVE_TOLERANCE)
            print(f"     {model} f16 vs the f32 model: max |Δ| = "
                  f"{float(np.abs(got - ref).max()):.2e}")
        for adapter, model in ADAPTERS:
            ids = tokens(12)
            ref_model = hf_model(model, adapter)
            ref = hf_logits(ref_model, ids)
            base = tmp / f"{model}-f32.gguf"
            adapter_dir = str(FIXTURES / "adapters" / adapter)
            lora = export(peft_bin, tmp / f"{adapter}.gguf", model, "--adapter", adapter_dir,
                          "--outtype", "f32")
            check(f"{adapter} (LoRA GGUF over the base GGUF)",
                  llama_cpp_logits(base, ids, lora=lora), ref, f32_tolerance(model))
            merged = export(peft_bin, tmp / f"{adapter}-merged.gguf", model, "--adapter",
                            adapter_dir, "--merge", "--outtype", "f32")
            check(f"{adapter} (merged GGUF)", llama_cpp_logits(merged, ids), ref,
                  f32_tolerance(model))
        for model in ("llama-tiny", "qwen2-tiny", "bloom-tiny"):
            ids = tokens(6)
            m = hf_model(model)
            with torch.no_grad():
                out = m.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                 min_new_tokens=20, pad_token_id=3)
            expected = out[0, len(ids):].tolist()
            got = llama_cpp_greedy(tmp / f"{model}-f32.gguf", ids, 20)
            status = "ok" if got == expected else "FAIL"
            print(f"{status:4} {model}: 20 greedy tokens through llama.cpp = transformers'")
            if got != expected:
                raise SystemExit(f"{model}: llama.cpp {got} vs transformers {expected}")
        q8_0_bytes_match(peft_bin, tmp)
        quantised_mixes_match(peft_bin, tmp)
        quantised_file_loads(peft_bin, tmp)
    print("llama.cpp check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
