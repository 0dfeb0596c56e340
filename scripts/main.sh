#!/usr/bin/env bash
# The main job (offline): the quick preset of the experiment pipeline on the embedded SmolLM2 --
# alignment, the harmful fine-tuning attack at p = 0.1 without a defense and with Lisa, and the
# HS / FA table. Arguments are passed to the binary (e.g. --run_dir=runs/other).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/bootstrap.sh" | tail -n 1)"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec "$py" -m experiments.sweep --flagfile=experiments/presets/quick.cfg "$@"
