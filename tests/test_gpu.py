"""The GPU path: DeepSpeed on CUDA with bf16 and ZeRO-3, and vLLM generation. Skipped without CUDA."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import base_flags, read_jsonl, run_cli

GPU_FLAGS = ["--ds.zero_stage", "3", "--ds.param_dtype", "bf16", "--ds.attn_implementation", "sdpa",
             "--sera.enable", "--sera.iterations", "2", "--sera.num_samples", "4", "--sera.max_new_tokens", "12"]


def _flags(model, data, run_dir, *extra):
    flags = base_flags(model, data, str(run_dir), *GPU_FLAGS, *extra)
    flags[flags.index("fp32")] = "bf16"
    return flags


@pytest.mark.gpu
def test_loop_on_cuda_zero3_bf16(tiny_model, tiny_data, tmp_path):
    run_cli(_flags(tiny_model, tiny_data, tmp_path / "run"))
    state = json.loads((tmp_path / "run" / "sera_state.json").read_text())
    assert "iter2/train" in state["done"]
    assert read_jsonl(tmp_path / "run" / "iter_2" / "bootstrapped.jsonl")


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_loop_with_vllm_generation(tiny_model, tiny_data, tmp_path):
    run_cli(_flags(tiny_model, tiny_data, tmp_path / "run", "--sera.generation_backend", "vllm",
                   "--sera.vllm_gpu_memory_utilization", "0.3"))
    samples = read_jsonl(tmp_path / "run" / "iter_2" / "samples.jsonl")
    assert samples and all("text" in s for s in samples)
