"""Stock OpenRLHF flags under --sera.enable: --eval.dataset every iteration, one logger run per training phase,
DeepSpeed checkpoints per phase (a killed iteration resumes alone), LoRA across iterations."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import base_flags, read_jsonl, run_cli, tb_scalars
from safetensors.torch import load_file
from tiny import preference_pairs, write_jsonl


def state_of(run_dir) -> dict:
    return json.loads((run_dir / "sera_state.json").read_text())


@pytest.mark.slow
def test_eval_logger_runs_and_per_phase_checkpoints_resume_only_the_killed_phase(tiny_model, tiny_data, tmp_path):
    eval_data = write_jsonl(str(tmp_path / "eval.jsonl"), preference_pairs(16, seed=7))
    run_dir, tb, ckpt = tmp_path / "run", tmp_path / "tb", tmp_path / "ckpt"
    flags = base_flags(tiny_model, tiny_data, str(run_dir), "--sera.enable", "--sera.iterations", "2",
                       "--sera.generated_share_max", "0", "--eval.dataset", eval_data,
                       "--logger.tensorboard_dir", str(tb), "--logger.wandb.run_name", "exp",
                       "--ckpt.load_enable", "--ckpt.save_steps", "2", "--ckpt.path", str(ckpt))
    killed = run_cli(flags, env={"SERA_FAULT_KILL_AT": "iter2/train:step3"}, check=False)
    assert killed.returncode != 0 and "iter2/train" not in state_of(run_dir)["done"]
    assert sorted(os.listdir(ckpt)) == ["iter1", "iter2"]  # one DeepSpeed checkpoint directory per phase
    run_cli(flags)
    state = state_of(run_dir)
    it1, it2 = state["iterations"]["1"]["train"], state["iterations"]["2"]["train"]
    assert it1["resumed_from_samples"] == 0 and it1["steps"] == 8  # 64 pairs / batch 8
    # iteration 2 (45 kept pairs: 5 steps) restored its own checkpoint of step 2 (16 samples), trained the rest
    assert it2["resumed_from_samples"] == 16 and it2["steps"] == 3
    assert [r["global_step"] for r in read_jsonl(run_dir / "iter_2" / "policy" / "train_log.jsonl")] == [3, 4, 5]
    p1 = load_file(run_dir / "iter_1" / "policy" / "model.safetensors")
    p2 = load_file(run_dir / "iter_2" / "policy" / "model.safetensors")
    assert any(not torch.equal(p1[k], p2[k]) for k in p1)  # π_2 is not π_1 saved again
    # --eval.dataset after each iteration's training, in the stats and the report
    for e in (it1["eval"], it2["eval"]):
        assert set(e) == {"eval_loss", "acc_mean", "margin", "n", "n_prompt_too_long"} and 0.0 <= e["acc_mean"] <= 1.0
        assert e["n"] + e["n_prompt_too_long"] == 16
    assert "Evaluation on `--eval.dataset`" in (run_dir / "report" / "report.md").read_text()
    # one TensorBoard run per training phase, each counting its own steps from 1
    assert sorted(d for d in os.listdir(tb) if not d.endswith("_sera")) == ["exp_iter1", "exp_iter2"]
    assert len(tb_scalars(str(tb), "train/loss_mean", pattern="exp_iter1")) == 8
    assert len(tb_scalars(str(tb), "train/loss_mean", pattern="exp_iter2")) >= 3


@pytest.mark.slow
def test_lora_survives_iterations(tiny_model, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(base_flags(tiny_model, tiny_data, str(run_dir), "--ds.lora.rank", "4", "--ds.lora.alpha", "8",
                       "--sera.enable", "--sera.iterations", "2", "--sera.num_samples", "2",
                       "--sera.max_new_tokens", "8", "--sera.num_prompts", "4", "--sera.fluency_floor", "-50"))
    state = state_of(run_dir)
    base = load_file(os.path.join(tiny_model, "model.safetensors"))
    for t in (1, 2):
        lora = state["iterations"][str(t)]["train"]["lora"]
        assert lora["adapter"] == str(run_dir / f"iter_{t}" / "adapter")
        assert (run_dir / f"iter_{t}" / "adapter" / "adapter_config.json").exists()
        merged = run_dir / f"iter_{t}" / "policy"
        assert not (merged / "adapter_config.json").exists()  # a plain checkpoint: base + adapter merged
        weights = load_file(merged / "model.safetensors")
        assert set(weights) == set(base) and any(not torch.equal(weights[k], base[k]) for k in base)
    # iteration 2 reviewed, sampled and trained from the merged π_1 against the base as reference
    assert {"iter2/review", "iter2/generate", "iter2/train"} <= set(state["done"])
    assert "LoRA: each iteration saved its adapter" in (run_dir / "report" / "report.md").read_text()
