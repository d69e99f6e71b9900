#!/usr/bin/env bash
# Data-parallel scaling of `peft train` on this machine (docs/DISTRIBUTED.md, "Measured"):
# one rank × 1 thread, two MPI ranks × 1 thread, and one rank × all cores, on the same global
# batch (2 examples of --max-length tokens per optimizer step), LoRA on PEFT's default targets.
# Prints step time, tokens/s and the all-reduce time per step (which includes waiting for the
# slower rank), and checks that the 1-rank and 2-rank adapters are the same file.
#
# Needs a release `peft` built with `--features mpi` and a model folder, e.g. the scale bench's
# 1.3B BLOOM: `target/release/peft-bench make-scale-model bloom-1b4 target/scale/bloom-1b4`.
#   bash bench/bench_distributed.sh target/scale/bloom-1b4 [steps] [max-length]
set -euo pipefail
model=${1:?model folder}
steps=${2:-4}
max_length=${3:-128}
peft=${PEFT:-target/release/peft}
out=$(mktemp -d)
python3 - "$out/long.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = ("the model learns a small update beside each frozen weight while the base stays fixed "
         "and the loss goes down over many steps of training on real text").split()
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(200))}) + "\n")
PY
args=(train --model "$model" --data "$out/long.jsonl" --max-steps "$steps" --batch-size 1
  --max-length "$max_length" --no-exact-match --no-merged --eval-fraction 0.02)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
RAYON_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 \
  "$peft" "${args[@]}" --grad-accum 2 --output "$out/one-rank-1-thread" >/dev/null 2>&1
mpirun -np 2 --oversubscribe --bind-to none "$peft" "${args[@]}" --output "$out/two-ranks" \
  >/dev/null 2>&1
"$peft" "${args[@]}" --grad-accum 2 --output "$out/one-rank-all-cores" >/dev/null 2>&1
for run in one-rank-1-thread two-ranks one-rank-all-cores; do
  python3 - "$run" "$out/$run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[2])][1:]  # the first step warms up
step = sum(r["step_s"] for r in rows) / len(rows)
tok = sum(r["tokens_per_s"] for r in rows) / len(rows)
ar = [r["allreduce_s"] for r in rows if "allreduce_s" in r]
ar = f"{sum(ar) / len(ar):.3f} s" if ar else "–"
print(f"{sys.argv[1]:<20} {step:7.2f} s/step  {1 / step:6.3f} steps/s  {tok:7.1f} tokens/s  all-reduce {ar}")
PY
done
cmp -s "$out/one-rank-1-thread/adapter/adapter_model.safetensors" \
  "$out/two-ranks/adapter/adapter_model.safetensors" \
  && echo "adapters: 2 ranks = 1 rank with 2 accumulation steps, byte for byte" \
  || { echo "adapters differ"; exit 1; }
rm -rf "$out"
