set -x
# SeRA on several nodes. Either the DeepSpeed launcher with a hostfile:
#     bash scripts/launch/train_sera_multinode.sh            (hostfile: one "node-N slots=8" line per node)
# or SLURM, one torchrun per node (submit with: sbatch --nodes 4 --gres gpu:8 --ntasks-per-node 1 this-script slurm)

read -r -d '' training_commands <<EOF
sera_openrlhf.cli.train_dpo \
   --ckpt.output_dir /shared/checkpoint/llama3-70b-sera \
   --ckpt.save_hf \
   --train.batch_size 512 \
   --train.micro_batch_size 1 \
   --model.model_name_or_path /shared/models/Llama-3-70b-sft \
   --ds.param_dtype bf16 \
   --ds.zero_stage 3 \
   --ds.adam_offload \
   --train.max_epochs 1 \
   --data.max_len 4096 \
   --adam.lr 5e-7 \
   --model.beta 0.1 \
   --data.dataset /shared/data/preferences.jsonl \
   --data.prompt_key prompt \
   --ds.attn_implementation flash_attention_2 \
   --model.gradient_checkpointing_enable \
   --sera.enable \
   --sera.iterations 3 \
   --sera.run_dir /shared/runs/llama3-70b-sera \
   --sera.num_samples 8 \
   --sera.max_new_tokens 1024 \
   --sera.generation_backend vllm \
   --sera.vllm_tensor_parallel_size 8
EOF

if [[ ${1} == "slurm" ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 --rdzv_id "$SLURM_JOB_ID" \
        --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:29500" -m $training_commands
else
    deepspeed --hostfile hostfile --master_port 29500 --module $training_commands
fi
