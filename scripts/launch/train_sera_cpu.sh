set -x
# SeRA on CPU (no GPU needed), with explicit flags: what `bash scripts/demo.sh` runs, minus the set-up step.
# Model: the embedded SmolLM2-135M-Instruct (built by scripts/setup.sh); data: the packaged HH-RLHF subset.

MODEL=${MODEL:-.cache/sera/models/SmolLM2-135M-Instruct}
DATA=${DATA:-sera_openrlhf/resources/hh_rlhf_harmless_base}

read -r -d '' training_commands <<EOF
sera_openrlhf.cli.train_dpo \
   --model.model_name_or_path $MODEL \
   --data.dataset $DATA/pairs.jsonl \
   --data.prompt_key prompt \
   --data.max_samples 64 \
   --data.max_len 192 \
   --train.batch_size 8 \
   --train.micro_batch_size 2 \
   --train.max_epochs 1 \
   --ds.zero_stage 2 \
   --ds.param_dtype fp32 \
   --adam.lr 5e-6 \
   --model.beta 0.1 \
   --ckpt.output_dir runs/cpu-sera \
   --sera.enable \
   --sera.iterations 3 \
   --sera.prompts $DATA/prompts.jsonl \
   --sera.num_prompts 12 \
   --sera.num_samples 4 \
   --sera.max_new_tokens 40
EOF

OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} .venv/bin/python -m $training_commands
