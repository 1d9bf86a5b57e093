"""Shared fixtures: a tiny pretrained Llama with its tokenizer, tiny preference data, and a CLI runner.

The model is built once per session (seconds) from a config: no downloads anywhere in the suite.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
for k, v in ENV.items():
    os.environ.setdefault(k, v)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    return tiny.build_tiny_llama(path, pretrain_steps=120)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_data") / "pairs.jsonl"
    return tiny.write_jsonl(str(path), tiny.preference_pairs(64, seed=1))


def base_flags(model: str, data: str, out: str, *extra: str) -> list[str]:
    return [
        "--model.model_name_or_path", model, "--data.dataset", data, "--data.prompt_key", "prompt",
        "--data.max_len", "64", "--train.batch_size", "8", "--train.micro_batch_size", "4",
        "--train.max_epochs", "1", "--ds.zero_stage", "2", "--ds.param_dtype", "fp32", "--adam.lr", "1e-3",
        "--ckpt.output_dir", out, *extra,
    ]


def run_cli(args, launcher=None, timeout=600, env=None, check=True) -> subprocess.CompletedProcess:
    """Run `python -m sera_openrlhf.cli.train_dpo ARGS` (or under `launcher`, e.g. torchrun) in a subprocess; with
    SERA_FAULT_KILL_AT in `env`, the entry point with fault injection (tests/fault_cli.py) instead."""
    if "SERA_FAULT_KILL_AT" in (env or {}):
        cmd = (launcher or [sys.executable]) + [os.path.join(REPO, "tests", "fault_cli.py"), *args]
    else:
        cmd = (launcher or [sys.executable, "-m"]) + ["sera_openrlhf.cli.train_dpo", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def tb_scalars(logdir: str, tag: str, pattern: str = "*") -> list[float]:
    """Values of `tag` across every TensorBoard event file under logdir/pattern, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(logdir, pattern, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard events under {logdir}/{pattern}"
    events = []
    for f in files:
        acc = EventAccumulator(f)
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            events += acc.Scalars(tag)
    return [e.value for e in sorted(events, key=lambda e: (e.step, e.wall_time))]


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA exists and are reported as skipped elsewhere (never silently dropped)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
