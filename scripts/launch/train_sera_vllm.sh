set -x
# SeRA with vLLM generation (GPU only): samples come from an offline vllm.LLM on each iteration's saved checkpoint.
# Iteration 1: DPO on all pairs; iterations 2-3: self-review (keep 70 % by implicit reward margin) + pairs
# bootstrapped from 8 samples per prompt, scored by an implicit reward ensembled over the last two policies.
#
# Environment variables (the defaults are the real run; tests/test_launch_scripts.py runs this script on CPU with a
# tiny model, tiny chat-format data, tiny sizes and GENERATION_BACKEND=hf through them):
#   MODEL             --model.model_name_or_path   (OpenRLHF/Llama-3-8b-sft-mixture)
#   DATA              --data.dataset               (OpenRLHF/preference_dataset_mixture2_and_safe_pku; chat lists)
#   OUTPUT_DIR        --ckpt.output_dir, the run directory (./checkpoint/llama3-8b-sera-vllm)
#   ITERATIONS        --sera.iterations 3          NUM_PROMPTS      --sera.num_prompts 4096
#   NUM_SAMPLES       --sera.num_samples 8         MAX_NEW_TOKENS   --sera.max_new_tokens 1024
#   MAX_SAMPLES       --data.max_samples (unset: every pair)
#   MAX_LEN           --data.max_len 4096
#   BATCH_SIZE        --train.batch_size 256       MICRO_BATCH_SIZE --train.micro_batch_size 1
#   GENERATION_BACKEND --sera.generation_backend vllm (hf: transformers generate, which also runs on CPU)
#   ATTN_IMPL         --ds.attn_implementation flash_attention_2 (needs CUDA; sdpa or eager on CPU)
#   NUM_GPUS          deepspeed --num_gpus (unset: every visible GPU; without CUDA DeepSpeed's CPU accelerator
#                     runs one process per NUMA node unless this is set)
#   LAUNCHER_ARGS     more `deepspeed` launcher options, e.g. "--master_port 29600 --include localhost:0,1"

read -r -d '' training_commands <<EOF
sera_openrlhf.cli.train_dpo \
   --ckpt.output_dir ${OUTPUT_DIR:-./checkpoint/llama3-8b-sera-vllm} \
   --ckpt.save_hf \
   --logger.logging_steps 1 \
   --eval.steps -1 \
   --train.batch_size ${BATCH_SIZE:-256} \
   --train.micro_batch_size ${MICRO_BATCH_SIZE:-1} \
   --model.model_name_or_path ${MODEL:-OpenRLHF/Llama-3-8b-sft-mixture} \
   --ds.param_dtype bf16 \
   --train.max_epochs 1 \
   --data.max_len ${MAX_LEN:-4096} \
   ${MAX_SAMPLES:+--data.max_samples $MAX_SAMPLES} \
   --ds.zero_stage 3 \
   --adam.lr 5e-7 \
   --model.beta 0.1 \
   --data.dataset ${DATA:-OpenRLHF/preference_dataset_mixture2_and_safe_pku} \
   --data.apply_chat_template \
   --data.chosen_key chosen \
   --data.rejected_key rejected \
   --ds.attn_implementation ${ATTN_IMPL:-flash_attention_2} \
   --model.gradient_checkpointing_enable \
   --sera.enable \
   --sera.iterations ${ITERATIONS:-3} \
   --sera.keep_ratio 0.7 \
   --sera.num_samples ${NUM_SAMPLES:-8} \
   --sera.num_prompts ${NUM_PROMPTS:-4096} \
   --sera.max_new_tokens ${MAX_NEW_TOKENS:-1024} \
   --sera.generation_backend ${GENERATION_BACKEND:-vllm} \
   --sera.vllm_tensor_parallel_size 1 \
   --sera.vllm_gpu_memory_utilization 0.4 \
   --logger.tensorboard_dir ./logs/llama3-8b-sera-vllm
EOF

if [[ ${1} != "slurm" ]]; then
    deepspeed ${NUM_GPUS:+--num_gpus $NUM_GPUS} $LAUNCHER_ARGS --module $training_commands
fi
