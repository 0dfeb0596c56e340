#!/usr/bin/env bash
# The GPU measurements as one prepared run (BUILD_NOTES, "GPU check"): on a machine with one
# NVIDIA GPU, run from the repository root:
#
#     bash benchmarks/gpu_session.sh            # results as JSON under $OUT (default
#                                               # benchmarks/results/gpu)
#     GPU_SESSION_SMOKE=1 bash benchmarks/gpu_session.sh   # CPU smoke test: tiny sizes
#
# 1. gpu_mfu.py, Llama-3.2-1B (random weights), bf16, batch 8 x 2048, LoRA r 16 on all seven
#    projections: hfjax with --attention auto (cuDNN flash attention where it can run) and
#    PyTorch + PEFT (SDPA) on the same GPU.
# 2. gpu_mfu.py, hfjax only, --attention xla: what the cuDNN kernel is worth.
# 3. loop_overlap.py --tiny: host work hidden behind the device step.
# Each step has its own time limit and a failed step does not stop the next; the exit status is
# the number of failed steps. Needs no package beyond the device image's (jax, flax, optax,
# orbax, safetensors, absl, torch, transformers, peft): gpu_mfu and loop_overlap import neither
# `datasets` nor `gguf`. PY: the python to use (default python3, which holds torch there).
set -uo pipefail

OUT="${OUT:-benchmarks/results/gpu}"
PY="${PY:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

if [[ -n "${GPU_SESSION_SMOKE:-}" ]]; then
  SIZES=(--config tiny --batch 2 --seq 32 --steps 2 --warmup 1)
  LIMIT_MFU=300 LIMIT_LOOP=300 LOOP=(--tiny --steps 4 --rounds 1)
else
  SIZES=(--config llama-3.2-1b --batch 8 --seq 2048 --steps 10 --warmup 3)
  LIMIT_MFU=240 LIMIT_LOOP=90 LOOP=(--tiny --steps 200 --rounds 5)
fi
TORCH_PY="${TORCH_PY-$PY}"  # empty: hfjax only

failed=0
step() {  # step NAME LIMIT_S COMMAND...: stdout's last line -> $OUT/NAME.json, stderr -> NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"; then
    tail -n 1 "$OUT/$name.out" >"$OUT/$name.json.tmp" && mv "$OUT/$name.json.tmp" "$OUT/$name.json"
    echo "   ok in $((SECONDS - t0)) s"
  else
    echo "   FAILED (status $?) after $((SECONDS - t0)) s; last lines of $name.log:"
    tail -n 15 "$OUT/$name.log"
    failed=$((failed + 1))
  fi
  rm -f "$OUT/$name.out"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null \
    || echo "no nvidia-smi"; "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())'
} | tee "$OUT/device.txt"

step gpu_mfu_auto "$LIMIT_MFU" "$PY" benchmarks/gpu_mfu.py "${SIZES[@]}" --attention auto \
  --torch_python "$TORCH_PY" --json
step gpu_mfu_xla "$LIMIT_MFU" "$PY" benchmarks/gpu_mfu.py "${SIZES[@]}" --attention xla \
  --torch_python= --json
step loop_overlap "$LIMIT_LOOP" "$PY" benchmarks/loop_overlap.py "${LOOP[@]}" --json

echo "== done: $failed failed; files in $OUT"
exit "$failed"
