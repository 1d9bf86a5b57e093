#!/usr/bin/env bash
# The main job: a full SeRA loop (3 iterations) on the embedded SmolLM2-135M-Instruct and the packaged
# HH-RLHF harmless-base pairs, on CPU. Extra arguments go to `python -m sera_openrlhf.cli.demo`.
# It uses every core (OMP_NUM_THREADS=nproc): on a machine busy with other work, set OMP_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       WANDB_MODE=${WANDB_MODE:-disabled} TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
exec .venv/bin/python -m sera_openrlhf.cli.demo "$@"
