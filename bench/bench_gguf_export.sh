#!/usr/bin/env bash
# GGUF export at real size (docs/BENCHMARKS.md, "GGUF export at real size"): `peft export-gguf`
# against llama.cpp's `convert_hf_to_gguf.py` (through fixtures/make_gguf_fixtures.py, which
# applies the fixtures' tokenizer-hash patch), f16 and q8_0, and q4_k_m against the converter's
# bf16 file quantised by llama-quantize, one after the other with the page
# cache dropped before each; wall time and peak RSS from `/usr/bin/time -v`, then the tensors of
# the two files compared byte for byte with llama.cpp's gguf-py.
#
# Needs a release `peft`, the reference venv (fixtures/requirements.txt), a llama.cpp source
# folder (the one llama-cpp-python 0.3.36 vendors) and a model, e.g. the scale bench's BLOOM:
# `target/release/peft-bench make-scale-model bloom-1b4 target/scale/bloom-1b4`.
#   bash bench/bench_gguf_export.sh target/scale/bloom-1b4 LLAMA_CPP_DIR [python]
set -euo pipefail
model=${1:?model folder}
lcpp=${2:?llama.cpp source folder}
python=${3:-../pyref/bin/python}
peft=${PEFT:-target/release/peft}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
run() { # label output command...
  local label=$1 file=$2
  shift 2
  sync
  echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -v "$@" >"$out/$label.log" 2>&1
  echo "$label: $(grep 'Elapsed (wall' "$out/$label.log" | awk '{print $NF}') wall," \
    "$(grep 'Maximum resident' "$out/$label.log" | awk '{print $NF}') KB peak RSS," \
    "$(stat -c %s "$file") bytes"
}
for t in f16 q8_0; do
  run "peft-$t" "$out/p-$t.gguf" "$peft" export-gguf --model "$model" --output "$out/p-$t.gguf" \
    --outtype "$t"
  run "convert-$t" "$out/c-$t.gguf" "$python" fixtures/make_gguf_fixtures.py "$lcpp" --convert \
    "$model" "$out/c-$t.gguf" "$t"
done
# q4_k_m: one pass here; there, the converter's bf16 file (exact for a bf16 checkpoint) then
# llama-quantize (llama-cpp-python's llama_model_quantize, 2 threads), timed one after the other.
run "peft-q4_k_m" "$out/p-q4_k_m.gguf" "$peft" export-gguf --model "$model" \
  --output "$out/p-q4_k_m.gguf" --outtype q4_k_m
run "convert-bf16" "$out/c-bf16.gguf" "$python" fixtures/make_gguf_fixtures.py "$lcpp" --convert \
  "$model" "$out/c-bf16.gguf" bf16
run "quantize-q4_k_m" "$out/c-q4_k_m.gguf" "$python" -c '
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(),
                                        ctypes.byref(p)))' "$out/c-bf16.gguf" "$out/c-q4_k_m.gguf"
rm -f "$out/c-bf16.gguf"
PYTHONPATH="$lcpp/gguf-py" "$python" - "$out" <<'PY'
import sys
from gguf import GGUFReader
out = sys.argv[1]
for t in ("f16", "q8_0", "q4_k_m"):
    a, b = GGUFReader(f"{out}/p-{t}.gguf"), GGUFReader(f"{out}/c-{t}.gguf")
    theirs = {x.name: x for x in b.tensors}
    same = sum(x.name in theirs and x.tensor_type == theirs[x.name].tensor_type
               and bytes(x.data) == bytes(theirs[x.name].data) for x in a.tensors)
    print(f"{t}: {same} of {len(a.tensors)} tensors byte-identical "
          f"({len(b.tensors)} in the converter's file)")
PY
