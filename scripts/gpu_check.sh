#!/usr/bin/env bash
# GPU check: at most 6 minutes on one CUDA GPU; writes $OUT/gpu_check.json (scripts/gpu_check.py says what is in it:
# versions, train step time and tokens/s, scoring and generation throughput, peak GPU memory, the GPU-marked tests,
# a 2-iteration SeRA loop on SmolLM2-135M in bf16, and which parts were skipped and why) plus its logs.
#
# Here, once, with network access (nothing can be fetched on the device machine):
#     bash scripts/gpu_check.sh prepare            (SKIP_WHEELS=1: only the model files)
#   copies SmolLM2-135M-Instruct's config and tokenizer (not its 517 MB of weights: the device tool carries at most
#   64 MiB, so the check runs the architecture with seeded random weights, which gives the same speed and memory)
#   into .gpu_check/model, and downloads the wheels the lent image lacks (it has torch and transformers, not
#   deepspeed, openrlhf or ray; vllm's wheel is too large to carry, so the vLLM paths stay untested there) into
#   .whl, at this virtual environment's versions. Both folders are git-ignored.
# On the device machine (the device tool's run, with carry [".whl", ".gpu_check"], timeout_s 420):
#     bash scripts/gpu_check.sh
#
# Environment variables:
#   OUT       where the JSON and logs go (the device tool sets it; default ./gpu_check_out)
#   PYTHON    the interpreter with CUDA torch (python3)
#   BUDGET_S  seconds for the whole check, install included (360)
#   MODEL     an HF checkpoint directory to use instead of .gpu_check/model
#   SKIP_WHEELS  prepare: set to 1 to copy the model files only
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}

if [[ ${1:-} == "prepare" ]]; then
    src=.cache/sera/models/SmolLM2-135M-Instruct
    [[ -f $src/config.json ]] || .venv/bin/python -m sera_openrlhf.assets --ensure-model || exit 1
    mkdir -p .gpu_check/model
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json \
             chat_template.jinja; do
        [[ -f $src/$f ]] && cp "$src/$f" .gpu_check/model/
    done
    [[ ${SKIP_WHEELS:-0} == 1 ]] && { echo "gpu_check: model files in .gpu_check/model"; exit 0; }
    mkdir -p .whl
    pins=$(.venv/bin/python - <<'EOF'
from importlib.metadata import version
names = ["openrlhf", "datasets", "dill", "multiprocess", "torchdata", "pylatexenc", "pydantic", "pydantic_core",
         "annotated_types", "typing_inspection", "hjson"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
)
    for pin in $pins; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$pin" || exit 1
    done
    # deepspeed is an sdist: build it here as a pure-python wheel (no compiled ops)
    DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w .whl "deepspeed==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')" || exit 1
    du -sh .whl .gpu_check
    exit 0
fi

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
start=$(date +%s)
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >"$OUT/install.log" 2>&1 || echo "gpu_check: wheel install failed (see install.log)"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
used=$(( $(date +%s) - start ))
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >"$OUT/nvidia_smi.csv" 2>&1
$PY scripts/gpu_check.py --out "$OUT/gpu_check.json" ${MODEL:+--model "$MODEL"} \
    --budget-s $(( ${BUDGET_S:-360} - used - 15 ))
rc=$?
cat "$OUT/gpu_check.json"
exit $rc
