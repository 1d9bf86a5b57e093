set -x
# SeRA on several nodes. Either the DeepSpeed launcher with a hostfile:
#     bash scripts/launch/train_sera_multinode.sh            (hostfile: one "node-N slots=8" line per node)
# or SLURM, one torchrun per node (submit with: sbatch --nodes 4 --gres gpu:8 --ntasks-per-node 1 this-script slurm)
#
# Environment variables (the defaults are the real run; tests/test_launch_scripts.py runs this script on CPU with a
# tiny model, tiny data, tiny sizes, GENERATION_BACKEND=hf and a one-node hostfile "localhost slots=2" through them):
#   MODEL             --model.model_name_or_path   (/shared/models/Llama-3-70b-sft)
#   DATA              --data.dataset               (/shared/data/preferences.jsonl; keys prompt/chosen/rejected)
#   OUTPUT_DIR        --ckpt.output_dir            (/shared/checkpoint/llama3-70b-sera)
#   RUN_DIR           --sera.run_dir               (/shared/runs/llama3-70b-sera)
#   ITERATIONS        --sera.iterations 3          NUM_PROMPTS      --sera.num_prompts (unset: every prompt)
#   NUM_SAMPLES       --sera.num_samples 8         MAX_NEW_TOKENS   --sera.max_new_tokens 1024
#   MAX_SAMPLES       --data.max_samples (unset: every pair)
#   MAX_LEN           --data.max_len 4096
#   BATCH_SIZE        --train.batch_size 512       MICRO_BATCH_SIZE --train.micro_batch_size 1
#   GENERATION_BACKEND --sera.generation_backend vllm (hf: transformers generate, which also runs on CPU)
#   VLLM_ENGINES      --sera.vllm_engines (unset: an in-process engine per generation phase on DP rank 0, TP 8);
#                     N: N of OpenRLHF's Ray-managed engines of TP 8 on the Ray cluster at RAY_ADDRESS, weights
#                     synced from the DeepSpeed model after each training phase
#   ATTN_IMPL         --ds.attn_implementation flash_attention_2 (needs CUDA; sdpa or eager on CPU)
#   HOSTFILE          deepspeed --hostfile (./hostfile)
#   MASTER_PORT       deepspeed --master_port / the torchrun rendezvous port (29500)
#   NUM_GPUS          processes per node: torchrun --nproc_per_node under SLURM (8); deepspeed takes the
#                     hostfile's slots, NUM_GPUS only narrows them (deepspeed --num_gpus)
#   LAUNCHER_ARGS     more `deepspeed` launcher options, e.g. "--no_ssh_check --master_addr 10.0.0.1"
#
# OUTPUT_DIR and RUN_DIR must be on a file system every node mounts: global rank 0 writes the checkpoints and sets,
# every rank reads them; the run stops at start-up, naming the node, if one cannot see RUN_DIR (docs/gpu.md).

read -r -d '' training_commands <<EOF
sera_openrlhf.cli.train_dpo \
   --ckpt.output_dir ${OUTPUT_DIR:-/shared/checkpoint/llama3-70b-sera} \
   --ckpt.save_hf \
   --train.batch_size ${BATCH_SIZE:-512} \
   --train.micro_batch_size ${MICRO_BATCH_SIZE:-1} \
   --model.model_name_or_path ${MODEL:-/shared/models/Llama-3-70b-sft} \
   --ds.param_dtype bf16 \
   --ds.zero_stage 3 \
   --ds.adam_offload \
   --train.max_epochs 1 \
   --data.max_len ${MAX_LEN:-4096} \
   ${MAX_SAMPLES:+--data.max_samples $MAX_SAMPLES} \
   --adam.lr 5e-7 \
   --model.beta 0.1 \
   --data.dataset ${DATA:-/shared/data/preferences.jsonl} \
   --data.prompt_key prompt \
   --ds.attn_implementation ${ATTN_IMPL:-flash_attention_2} \
   --model.gradient_checkpointing_enable \
   --sera.enable \
   --sera.iterations ${ITERATIONS:-3} \
   --sera.run_dir ${RUN_DIR:-/shared/runs/llama3-70b-sera} \
   ${NUM_PROMPTS:+--sera.num_prompts $NUM_PROMPTS} \
   --sera.num_samples ${NUM_SAMPLES:-8} \
   --sera.max_new_tokens ${MAX_NEW_TOKENS:-1024} \
   --sera.generation_backend ${GENERATION_BACKEND:-vllm} \
   --sera.vllm_tensor_parallel_size 8 \
   ${VLLM_ENGINES:+--sera.vllm_engines $VLLM_ENGINES}
EOF

if [[ ${1} == "slurm" ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node ${NUM_GPUS:-8} --rdzv_id "$SLURM_JOB_ID" \
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" -m $training_commands
else
    deepspeed --hostfile ${HOSTFILE:-hostfile} --master_port ${MASTER_PORT:-29500} ${NUM_GPUS:+--num_gpus $NUM_GPUS} \
        $LAUNCHER_ARGS --module $training_commands
fi
