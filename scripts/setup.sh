#!/usr/bin/env bash
# Build the project's virtual environment (.venv) on a fresh machine: CPU torch, DeepSpeed without prebuilt ops,
# transformers, openrlhf==0.11.2 --no-deps, this package (editable), and the embedded default model.
# Idempotent: with unchanged requirements a second run only checks and prints the paths.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SERA_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.sera-setup-stamp"
want=$(cat requirements/cpu.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "setup: $VENV is up to date"
else
  start=$(date +%s)
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # DS_BUILD_OPS=0: DeepSpeed installs as pure python, nothing is compiled.
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements/cpu.txt 2>&1 | quiet
  # --no-deps: openrlhf pins flash-attn, which cannot build without CUDA (requirements/cpu.txt has the rest).
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "openrlhf==0.11.2" 2>&1 | quiet
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e . 2>&1 | quiet
  "$VENV/bin/python" -c "import torch, deepspeed, transformers, openrlhf, sera_openrlhf" 2>/dev/null \
    || { echo "setup: the environment does not import; see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
  echo "setup: built $VENV in $(( $(date +%s) - start )) s"
fi
if [ "${SERA_SKIP_MODEL:-0}" != "1" ]; then
  model=$("$VENV/bin/python" -m sera_openrlhf.assets --ensure-model)
  echo "setup: default model at $model"
fi
