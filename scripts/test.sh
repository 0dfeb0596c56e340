#!/usr/bin/env bash
# The test suite: bootstrap .venv, then pytest (offline; the slow end-to-end tests need -m slow).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/bootstrap.sh" | tail -n 1)"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
"$py" -m ruff check hfjax tests scripts experiments benchmarks
exec "$py" -m pytest "$@"
