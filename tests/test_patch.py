"""patches/openrlhf-0.11.2-sera.patch applies to the installed OpenRLHF sources and the patched CLI runs SeRA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ENV, REPO, base_flags

PATCH = os.path.join(REPO, "patches", "openrlhf-0.11.2-sera.patch")


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    import openrlhf

    root = tmp_path_factory.mktemp("patched_openrlhf")
    shutil.copytree(os.path.dirname(openrlhf.__file__), root / "openrlhf")
    proc = subprocess.run(["patch", "-p1", "-d", str(root), "-i", PATCH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout and "offset" not in proc.stdout, proc.stdout  # applies cleanly
    return root


def run(module, args, root, timeout=600):
    env = {**os.environ, **ENV, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


def test_patch_adds_example_script_and_flags(patched):
    assert (patched / "examples" / "scripts" / "train_dpo_sera_llama.sh").exists()
    proc = run("openrlhf.cli.train_dpo", ["--help"], patched)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--sera.enable" in proc.stdout and "--model.beta" in proc.stdout
    # our own entry point reads a patched CLI without registering --sera.* twice
    proc = run("sera_openrlhf.cli.train_dpo", ["--help"], patched)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("--sera.enable ") >= 1 and "fp32" in proc.stdout


@pytest.mark.slow
def test_patched_cli_runs_one_sera_iteration(patched, tiny_model, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    flags = base_flags(tiny_model, tiny_data, str(run_dir), "--sera.enable", "--sera.iterations", "1")
    flags[flags.index("fp32")] = "bf16"  # the patched stock parser keeps OpenRLHF's own dtype choices
    proc = run("openrlhf.cli.train_dpo", flags, patched)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert state["done"] == ["iter1/train"]
    assert (run_dir / "iter_1" / "policy" / "model.safetensors").exists()
    assert (run_dir / "report" / "report.md").exists()


@pytest.mark.slow
def test_patched_example_script_runs_on_cpu(patched, tiny_model, tiny_data, tmp_path):
    """The example launch script the patch adds, run for real (`bash`, the `deepspeed` launcher, the patched
    `openrlhf.cli.train_dpo` first on PYTHONPATH) with the substitutions of tests/test_launch_scripts.py: the tiny
    model, tiny chat-format data and tiny sizes, sdpa attention and HF generation (flash attention and vLLM need a
    GPU), one process and a free port."""
    from test_launch_scripts import (
        TINY_SIZES,
        chat_pairs,
        check_run,
        clean_env,
        free_port,
        run_script,
    )

    script = patched / "examples" / "scripts" / "train_dpo_sera_llama.sh"
    work = tmp_path / "cwd"
    work.mkdir()
    env = clean_env(MODEL=tiny_model, DATA=chat_pairs(tiny_data, tmp_path / "chat_pairs.jsonl"),
                    OUTPUT_DIR=str(tmp_path / "out"), **TINY_SIZES, ATTN_IMPL="sdpa", GENERATION_BACKEND="hf",
                    NUM_GPUS="1", LAUNCHER_ARGS=f"--master_port {free_port()}", PYTHONPATH=str(patched))
    proc = run_script(str(script), env, work)
    assert "'-m', 'openrlhf.cli.train_dpo'" in proc.stdout + proc.stderr  # the launcher ran the stock CLI (patched)
    check_run(tmp_path / "out", proc)
