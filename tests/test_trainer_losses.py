"""Every DAA loss trains OpenRLHF's DPO trainer through the entry point; `dpo` equals OpenRLHF's DPOLoss."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_flags, read_jsonl, run_cli
from safetensors.torch import load_file

from sera_openrlhf.losses import LOSSES, PreferenceBatch, build_loss

BUILTINS = ["dpo", "ipo", "slic", "simpo", "rdpo", "robust"]


def test_registry_lists_every_builtin():
    assert set(BUILTINS) <= set(LOSSES.names())


@pytest.mark.slow
@pytest.mark.parametrize("loss", BUILTINS)
def test_every_loss_trains_through_entry_point(tiny_model, tiny_data, tmp_path, loss):
    out = tmp_path / "out"
    extra = ["--sera.loss", loss, "--train.max_epochs", "2"]
    if loss == "simpo":
        extra += ["--model.beta", "2.0"]
    if loss == "robust":  # rDPO's label-flip rate is the stock cDPO flag
        extra += ["--model.label_smoothing", "0.1"]
    proc = run_cli(base_flags(tiny_model, tiny_data, str(out), *extra))
    stats = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("[sera-openrlhf] {"))
                       .split(" ", 1)[1])
    log = read_jsonl(out / "train_log.jsonl")
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first, (loss, first, last)
    before, after = load_file(f"{tiny_model}/model.safetensors"), load_file(out / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, f"{loss}: only {len(changed)} tensors changed"
    if loss == "simpo":  # reference-free: no reference model loaded, nothing cached
        assert stats["reference_loaded"] is False
        assert not list((out / "cache").glob("*.pt")) if (out / "cache").exists() else True
    else:
        assert stats["reference_loaded"] is True


def test_unknown_loss_and_bad_parameter_are_clear_errors(tiny_model, tiny_data, tmp_path):
    for extra, needle in ((["--sera.loss", "nope"], "--sera.loss"),
                          (["--sera.loss", "simpo", "--sera.simpo_gamma", "-1"], "--sera.simpo_gamma"),
                          (["--model.beta", "0", "--sera.loss", "dpo"], "--model.beta")):
        proc = run_cli(base_flags(tiny_model, tiny_data, str(tmp_path / "o"), *extra), check=False)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("label_smoothing,ipo", [(0.0, False), (0.2, False), (0.0, True)])
def test_dpo_matches_openrlhf_dpoloss(label_smoothing, ipo):
    from sera_openrlhf.openrlhf_adapter import compat

    compat.apply()
    from openrlhf.models import DPOLoss

    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 20 - 50 for _ in range(4))
    stock_loss, stock_c, stock_r = DPOLoss(0.1, label_smoothing, ipo)(pc, pr, rc, rr)
    ours = build_loss("ipo" if ipo else "dpo", beta=0.1, label_smoothing=label_smoothing)
    out = ours(PreferenceBatch(pc, pr, rc, rr))
    torch.testing.assert_close(out.losses.mean(), stock_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, stock_c, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, stock_r, atol=1e-6, rtol=0)
