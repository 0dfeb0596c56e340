#!/usr/bin/env bash
# The test suite (what CI runs, .ci/run): bootstrap .venv, ruff, then the whole pytest suite
# offline, the `slow` end-to-end run of the embedded model included, in HFJAX_TEST_WORKERS
# processes (pytest-xdist, default 2, one test file per process at a time; 1: no workers).
# Arguments go to pytest (e.g. -m 'not slow' to leave that run out, -m slow for it alone).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/bootstrap.sh" | tail -n 1)"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
"$py" -m ruff check hfjax tests scripts experiments benchmarks
workers="${HFJAX_TEST_WORKERS:-2}"
if [ "$workers" -gt 1 ]; then
  exec "$py" -m pytest -n "$workers" --dist loadfile "$@"
fi
exec "$py" -m pytest "$@"
