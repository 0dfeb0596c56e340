#!/usr/bin/env bash
# The test suite (what CI runs, .ci/run): bootstrap .venv, ruff, then the whole pytest suite
# offline, the `slow` end-to-end run of the embedded model included. Arguments go to pytest
# (e.g. -m 'not slow' to leave that run out, -m slow for it alone).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/bootstrap.sh" | tail -n 1)"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
"$py" -m ruff check hfjax tests scripts experiments benchmarks
exec "$py" -m pytest "$@"
