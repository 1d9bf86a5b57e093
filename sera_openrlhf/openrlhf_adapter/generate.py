"""Self-generation for SeRA-PB from a saved policy checkpoint.

Rank 0 generates (HF `generate`, or vLLM on GPU) and broadcasts the samples, so every rank holds the same
set. The policy is re-loaded from the iteration's HF checkpoint, which is also what a vLLM engine needs.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist

from sera_openrlhf.generation import GenerationConfig, build_generator

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def format_prompt(args, tokenizer, prompt) -> str:
    """The prompt text exactly as training sees it: OpenRLHF's own preprocessing (chat template with a generation
    prompt, or --data.input_template), so samples continue the same string their pairs will be trained on."""
    from openrlhf.datasets.reward_dataset import preprocess_data

    if args.data.apply_chat_template and args.data.tokenizer_chat_template:
        tokenizer.chat_template = args.data.tokenizer_chat_template
    empty = [] if isinstance(prompt, list) else ""
    text, _, _, _ = preprocess_data(
        {"prompt": prompt, "chosen": empty, "rejected": empty}, args.data.input_template, "prompt", "chosen",
        "rejected", tokenizer.apply_chat_template if args.data.apply_chat_template else None, is_dpo=True,
    )
    return text


def load_hf_tokenizer(args, path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.sera.trust_remote_code,
                                              use_fast=not args.data.disable_fast_tokenizer)
    if tokenizer.pad_token is None:  # as OpenRLHF's get_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def generate_samples(args, strategy, model_path: str, prompts: list, cfg: GenerationConfig, keys: list[str]):
    """P lists of S `Sample`s for the given prompts (strings, or chat-message lists with
    --data.apply_chat_template); `keys` (prompt ids) seed vLLM's requests."""
    samples = None
    if strategy.is_rank_0():
        from transformers import AutoModelForCausalLM

        tokenizer = load_hf_tokenizer(args, model_path)
        prompts = [format_prompt(args, tokenizer, p) for p in prompts]
        if args.sera.generation_backend == "vllm":
            gen = build_generator("vllm", tokenizer, cfg, model_path=model_path,
                                  tensor_parallel_size=args.sera.vllm_tensor_parallel_size,
                                  gpu_memory_utilization=args.sera.vllm_gpu_memory_utilization)
            samples = gen.generate(prompts, keys)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=_DTYPES[args.ds.param_dtype], trust_remote_code=args.sera.trust_remote_code,
                attn_implementation=args.ds.attn_implementation,
            )
            if torch.cuda.is_available():
                model = model.to(torch.cuda.current_device())
            samples = build_generator("hf", tokenizer, cfg, model=model).generate(prompts, keys)
            del model
            gc.collect()
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [samples]
        dist.broadcast_object_list(box, src=0)
        samples = box[0]
    return samples
