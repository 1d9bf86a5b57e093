"""The drop-in entry point runs OpenRLHF's real DPO trainer on CPU (issue: foundation)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
from conftest import ENV, REPO, base_flags, read_jsonl, run_cli


def test_help_lists_stock_and_sera_flags():
    proc = run_cli(["--help"])
    out = proc.stdout
    for flag in ("--model.beta", "--ds.zero_stage", "--data.prompt_key", "--ckpt.load_enable",
                 "--model.ipo_enable", "--adam.lr", "--sera.enable", "--sera.loss", "--sera.keep_ratio"):
        assert flag in out, flag
    assert "fp32" in out  # the dtype choice we add


def _check_margins(out, n_pairs: int):
    """train_margins.jsonl: every pair once per epoch (all ranks gathered), its implicit rewards under the policy
    before the step that trains on it: at the first step that policy is the reference, so every reward is 0."""
    rows = read_jsonl(out / "train_margins.jsonl")
    assert len(rows) == n_pairs and len({r["id"] for r in rows}) == n_pairs
    first = rows[:8]  # the first optimizer step's pairs (global batch 8, whatever the ranks and accumulation)
    assert all(abs(r["chosen_reward"]) < 1e-4 and abs(r["rejected_reward"]) < 1e-4 for r in first)
    assert max(abs(r["chosen_reward"] - r["rejected_reward"]) for r in rows[-8:]) > 1e-3  # the policy moved
    assert all(r["chosen_len"] > 0 and r["rejected_len"] > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_sera_trainer_zero_stages(tiny_model, tiny_data, tmp_path, stage):
    out = tmp_path / "out"
    run_cli(base_flags(tiny_model, tiny_data, str(out), "--ds.zero_stage", str(stage), "--sera.loss", "dpo"))
    log = read_jsonl(out / "train_log.jsonl")
    assert len(log) == 8
    assert log[-1]["loss"] < log[0]["loss"]
    assert (out / "model.safetensors").exists()
    _check_margins(out, 64)


@pytest.mark.slow
def test_torchrun_two_processes(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
                "-m"]
    proc = run_cli(base_flags(tiny_model, tiny_data, str(out), "--ds.zero_stage", "2", "--sera.loss", "dpo"),
                   launcher=launcher)
    log = read_jsonl(out / "train_log.jsonl")
    assert len(log) == 8  # global batch 8 over 2 ranks: same number of optimizer steps
    assert log[-1]["loss"] < log[0]["loss"]
    assert proc.stdout.count("model saved to") == 1  # rank 0 reports
    _check_margins(out, 64)


@pytest.mark.slow
def test_checkpoint_save_and_resume(tiny_model, tiny_data, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    flags = base_flags(tiny_model, tiny_data, str(out), "--ckpt.path", str(ckpt), "--ckpt.save_steps", "4",
                       "--train.max_epochs", "2")
    run_cli(flags)
    assert glob.glob(str(ckpt / "global_step*"))
    proc = run_cli(flags + ["--ckpt.load_enable"])
    assert "Loaded the checkpoint" in proc.stdout + proc.stderr


def _error_of(args, env=None) -> str:
    proc = run_cli(args, check=False, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_missing_model_is_a_clear_error(tiny_data, tmp_path):
    err = _error_of(base_flags(str(tmp_path / "nope"), tiny_data, str(tmp_path / "o")))
    assert "--model.model_name_or_path" in err and "no such model directory" in err


def test_packing_on_cpu_is_a_clear_error(tiny_model, tiny_data, tmp_path):
    err = _error_of(base_flags(tiny_model, tiny_data, str(tmp_path / "o"), "--ds.packing_samples"))
    assert "--ds.packing_samples" in err and "CUDA" in err


def test_flash_attention_on_cpu_is_a_clear_error(tiny_model, tiny_data, tmp_path):
    err = _error_of(base_flags(tiny_model, tiny_data, str(tmp_path / "o"), "--ds.attn_implementation",
                               "flash_attention_2"))
    assert "--ds.attn_implementation" in err and "sdpa" in err


def test_custom_code_model_needs_opt_in(tiny_model, tiny_data, tmp_path):
    import json
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (model / "config.json").write_text(json.dumps(cfg))
    err = _error_of(base_flags(str(model), tiny_data, str(tmp_path / "o")))
    assert "--sera.trust_remote_code" in err


def _hide_openrlhf_env(tmp_path, version=None):
    """A sitecustomize that makes importlib.metadata report OpenRLHF missing (or at `version`)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.metadata as m\n_v = m.version\n"
        "def version(name):\n"
        "    if name == 'openrlhf':\n"
        + ("        raise m.PackageNotFoundError(name)\n" if version is None else f"        return {version!r}\n")
        + "    return _v(name)\nm.version = version\n"
    )
    return {"PYTHONPATH": str(site)}


@pytest.mark.parametrize("version,needle", [(None, "not installed"), ("0.9.0", "supports openrlhf>=0.10.2,<0.12")])
def test_missing_or_unsupported_openrlhf(tmp_path, version, needle):
    proc = subprocess.run([sys.executable, "-m", "sera_openrlhf.cli.train_dpo", "--help"], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **ENV, **_hide_openrlhf_env(tmp_path, version)})
    assert proc.returncode == 2
    assert needle in proc.stderr and "pip install" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_core_modules_import_without_openrlhf():
    """Core math must not import OpenRLHF, DeepSpeed, vLLM or Ray."""
    code = ("import sys; import sera_openrlhf.losses, sera_openrlhf.selection, sera_openrlhf.bootstrap, "
            "sera_openrlhf.scoring, sera_openrlhf.refcache, sera_openrlhf.data, sera_openrlhf.registry; "
            "bad = [m for m in ('openrlhf', 'deepspeed', 'vllm', 'ray') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
