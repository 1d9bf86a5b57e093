"""Self-generation for SeRA-PB from a saved policy checkpoint, sharded over data-parallel ranks.

Every DP rank generates whole blocks of prompts (`generation.shard_prompts`), each request with its own seed, and
all ranks gather the samples, so every rank holds the same set and it equals what one process would generate.
Ranks of one ring-attention / tensor-parallel group share a DP rank: only the first of them generates.

Backends:
- hf: transformers `generate` on the policy re-loaded from the iteration's HF checkpoint.
- vllm, in process (`--sera.vllm_engines 0`): an engine per phase, built from the checkpoint after the
  previous phase's memory went back, with the GPU memory that is free, and destroyed when the phase ends. With
  --sera.vllm_tensor_parallel_size 1 every DP rank builds one on its own GPU; with TP > 1, DP rank 0 generates
  everything (its engine spans several GPUs).
- vllm with `--sera.vllm_engines N`: OpenRLHF's Ray-managed engines (`vllm_engines.py`), driven by global rank 0.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist

from sera_openrlhf import memory
from sera_openrlhf.errors import ConfigError
from sera_openrlhf.generation import GenerationConfig, build_generator, shard_prompts
from sera_openrlhf.openrlhf_adapter.train import dp_layout

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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


def free_gpu_share() -> float:
    """Share of this GPU's memory that is free now."""
    free, total = torch.cuda.mem_get_info()
    return free / total


def vllm_memory_share(cap: float, free_share: float) -> float:
    """The engine's gpu_memory_utilization: --sera.vllm_gpu_memory_utilization, lowered to 90 % of what is free
    (vLLM refuses to start when it asks for more than is free)."""
    share = min(cap, 0.9 * free_share)
    if share < 0.05:
        raise ConfigError(f"only {free_share:.0%} of the GPU's memory is free before building the vLLM engine "
                          f"(--sera.vllm_gpu_memory_utilization {cap}): another process holds it, or lower "
                          "--data.max_len / use --sera.vllm_engines on separate GPUs")
    return share


def _local_device_id() -> str:
    """The physical id of this process's GPU, for the engine's worker process (it inherits the environment)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return ids[torch.cuda.current_device()]


@contextmanager
def local_vllm(args, model_path: str, seed: int, one_per_rank: bool):
    """An in-process `vllm.LLM` for one phase: memory released first, built with the memory that is free,
    destroyed on exit (engine shut down, vLLM's model-parallel groups destroyed, garbage collected, CUDA cache
    emptied) so the next training phase gets its memory back."""
    memory.release()  # the previous phase's models (DeepSpeed engines included) are freed: give their cache back
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vLLM generation backend needs the vllm package: install vllm (GPU only) or use "
                          "--sera.generation_backend hf") from e
    s = args.sera
    share = vllm_memory_share(s.vllm_gpu_memory_utilization, free_gpu_share())
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    pin = one_per_rank and dist.is_initialized() and dist.get_world_size() > 1
    if pin:
        os.environ["CUDA_VISIBLE_DEVICES"] = _local_device_id()  # this rank's GPU only, for the engine's workers
    try:
        llm = vllm.LLM(model=model_path, tensor_parallel_size=s.vllm_tensor_parallel_size,
                       gpu_memory_utilization=share, seed=seed, dtype=_VLLM_DTYPES[args.ds.param_dtype],
                       trust_remote_code=s.trust_remote_code, max_model_len=args.data.max_len + s.max_new_tokens)
    finally:
        if pin and saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        elif pin:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    try:
        yield llm
    finally:
        destroy_vllm(llm)
        del llm
        memory.release()


def destroy_vllm(llm) -> None:
    """Shut an offline engine down and destroy vLLM's model-parallel groups (not torch's default group, which
    DeepSpeed owns)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if hasattr(core, "shutdown"):
        core.shutdown()
    try:
        from vllm.distributed.parallel_state import destroy_model_parallel
    except ImportError:
        return
    destroy_model_parallel()
    gc.collect()


def _generate_local(args, model_path, tokenizer, cfg, prompts, keys, one_per_rank):
    if args.sera.generation_backend == "vllm":
        with local_vllm(args, model_path, cfg.seed, one_per_rank) as llm:
            return build_generator("vllm", tokenizer, cfg, model_path=model_path, engine=llm).generate(prompts, keys)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=_DTYPES[args.ds.param_dtype], trust_remote_code=args.sera.trust_remote_code,
        attn_implementation=args.ds.attn_implementation,
    )
    if torch.cuda.is_available():
        model = model.to(torch.cuda.current_device())
    samples = build_generator("hf", tokenizer, cfg, model=model).generate(prompts, keys)
    del model
    gc.collect()
    return samples


def generate_samples(args, strategy, model_path: str, prompts: list, cfg: GenerationConfig, keys: list[str],
                     engines=None):
    """(P lists of S `Sample`s for the given prompts, prompts generated per DP rank). Prompts are strings, or
    chat-message lists with --data.apply_chat_template; `keys` (prompt ids) seed every request. `engines`: the
    run's `RayVLLMEngines` (--sera.vllm_engines), else None."""
    dp_rank, dp_size, dp_of = dp_layout(strategy)
    world = len(dp_of)
    me = dist.get_rank() if world > 1 else 0
    s = args.sera
    single = engines is not None or (s.generation_backend == "vllm" and s.vllm_tensor_parallel_size > 1)
    if single:
        mine = list(range(len(prompts))) if dp_rank == 0 else []
    else:
        mine = shard_prompts(len(prompts), cfg.num_samples, cfg.batch_size, dp_rank, dp_size)
    if dp_of.index(dp_rank) != me:
        mine = []  # another rank of this DP rank's sp/tp group generates its share
    local = {}
    if mine:
        tokenizer = load_hf_tokenizer(args, model_path)
        texts = [format_prompt(args, tokenizer, prompts[i]) for i in mine]
        sub_keys = [keys[i] for i in mine]
        if engines is not None:
            out = engines.generate(model_path, tokenizer, cfg, texts, sub_keys)
        else:
            out = _generate_local(args, model_path, tokenizer, cfg, texts, sub_keys, one_per_rank=not single)
        local = {i: [replace(smp, prompt_index=i) for smp in group] for i, group in zip(mine, out)}
    parts = [local]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    samples, per_rank = [None] * len(prompts), [0] * dp_size
    for g, part in enumerate(parts):
        for i, group in part.items():
            samples[i] = group
        per_rank[dp_of[g]] += len(part)
    missing = [i for i, smp in enumerate(samples) if smp is None]
    if missing:
        raise RuntimeError(f"no rank generated {len(missing)} of {len(prompts)} prompts (first: {keys[missing[0]]})")
    return samples, per_rank
