set -x
# SeRA on one node with 8 GPUs through the DeepSpeed launcher (OpenRLHF's examples/scripts style).
# Iteration 1: DPO on all pairs; iterations 2-3: self-review (keep 70 % by implicit reward margin) + pairs
# bootstrapped from 8 samples per prompt, scored by an implicit reward ensembled over the last two policies.

read -r -d '' training_commands <<EOF
sera_openrlhf.cli.train_dpo \
   --ckpt.output_dir ./checkpoint/llama3-8b-sera \
   --ckpt.save_hf \
   --logger.logging_steps 1 \
   --eval.steps -1 \
   --train.batch_size 256 \
   --train.micro_batch_size 1 \
   --model.model_name_or_path OpenRLHF/Llama-3-8b-sft-mixture \
   --ds.param_dtype bf16 \
   --train.max_epochs 1 \
   --data.max_len 4096 \
   --ds.zero_stage 3 \
   --adam.lr 5e-7 \
   --model.beta 0.1 \
   --data.dataset OpenRLHF/preference_dataset_mixture2_and_safe_pku \
   --data.apply_chat_template \
   --data.chosen_key chosen \
   --data.rejected_key rejected \
   --ds.attn_implementation flash_attention_2 \
   --model.gradient_checkpointing_enable \
   --sera.enable \
   --sera.iterations 3 \
   --sera.keep_ratio 0.7 \
   --sera.num_samples 8 \
   --sera.num_prompts 4096 \
   --sera.max_new_tokens 1024 \
   --sera.generation_batch_size 64 \
   --logger.tensorboard_dir ./logs/llama3-8b-sera
EOF

if [[ ${1} != "slurm" ]]; then
    deepspeed --module $training_commands
fi
