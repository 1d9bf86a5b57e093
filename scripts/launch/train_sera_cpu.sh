set -x
# SeRA on CPU (no GPU needed), with explicit flags: what `bash scripts/demo.sh` runs, minus the set-up step.
# Model: the embedded SmolLM2-135M-Instruct (built by scripts/setup.sh); data: the packaged HH-RLHF subset.
#
# Environment variables (the defaults are this script's real run; tests/test_launch_scripts.py substitutes a tiny
# model, tiny data and tiny sizes through them):
#   MODEL             --model.model_name_or_path   (.cache/sera/models/SmolLM2-135M-Instruct in the repo)
#   DATA              --data.dataset               (the packaged HH-RLHF harmless-base pairs.jsonl)
#   PROMPTS           --sera.prompts               (the packaged prompts.jsonl; empty: the pairs' own prompts)
#   OUTPUT_DIR        --ckpt.output_dir, the run directory (runs/cpu-sera in the repo)
#   ITERATIONS        --sera.iterations 3          NUM_PROMPTS      --sera.num_prompts 12
#   NUM_SAMPLES       --sera.num_samples 4         MAX_NEW_TOKENS   --sera.max_new_tokens 40
#   MAX_SAMPLES       --data.max_samples 64        MAX_LEN          --data.max_len 192
#   BATCH_SIZE        --train.batch_size 8         MICRO_BATCH_SIZE --train.micro_batch_size 1
#   PYTHON            the interpreter (the repo's .venv/bin/python, built by scripts/setup.sh)
#   OMP_NUM_THREADS   torch threads (default: every core; on a busy machine set 1)
# Precision: --sera.precision auto picks bf16 only where the CPU has amx_bf16/avx512_bf16 and a short matmul probe
# measures it faster, else fp32 (logged as "[sera-openrlhf] precision ..."); set fp32 or bf16 below to force one.
# CPU memory and speed: ZeRO-0 (one process has nothing to shard; ZeRO-2 only adds a flat fp32 copy and buckets),
# micro batch 1, and --sera.packed_train (a pair's prompt runs once, the LM head on response tokens only).

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RES=$REPO/sera_openrlhf/resources/hh_rlhf_harmless_base
MODEL=${MODEL:-$REPO/.cache/sera/models/SmolLM2-135M-Instruct}
DATA=${DATA:-$RES/pairs.jsonl}
PROMPTS=${PROMPTS-$RES/prompts.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-$REPO/runs/cpu-sera}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}

read -r -d '' training_commands <<EOF
sera_openrlhf.cli.train_dpo \
   --model.model_name_or_path $MODEL \
   --data.dataset $DATA \
   --data.prompt_key prompt \
   --data.max_samples ${MAX_SAMPLES:-64} \
   --data.max_len ${MAX_LEN:-192} \
   --train.batch_size ${BATCH_SIZE:-8} \
   --train.micro_batch_size ${MICRO_BATCH_SIZE:-1} \
   --train.max_epochs 1 \
   --ds.zero_stage 0 \
   --sera.precision auto \
   --sera.packed_train \
   --adam.lr 5e-6 \
   --model.beta 0.1 \
   --ckpt.output_dir $OUTPUT_DIR \
   --sera.enable \
   --sera.iterations ${ITERATIONS:-3} \
   ${PROMPTS:+--sera.prompts $PROMPTS} \
   --sera.num_prompts ${NUM_PROMPTS:-12} \
   --sera.num_samples ${NUM_SAMPLES:-4} \
   --sera.max_new_tokens ${MAX_NEW_TOKENS:-40}
EOF

OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} "$PYTHON" -m $training_commands
