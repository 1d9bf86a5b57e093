"""Training with cached reference log-probs gives the same per-step losses as stock OpenRLHF, which runs the
reference model every step (fp32, same seed)."""

from __future__ import annotations

import pytest
from conftest import base_flags, read_jsonl, run_cli, tb_scalars


@pytest.mark.slow
def test_cached_reference_matches_stock_losses(tiny_model, tiny_data, tmp_path):
    stock = tmp_path / "stock"  # no --sera flag: OpenRLHF's own train() through our entry point and CPU layer
    proc = run_cli(base_flags(tiny_model, tiny_data, str(stock), "--logger.tensorboard_dir", str(tmp_path / "tb")))
    assert "model saved to" in proc.stdout and (stock / "model.safetensors").exists()
    stock_losses = tb_scalars(str(tmp_path / "tb"), "train/loss_mean")
    assert sum(stock_losses[-3:]) / 3 < sum(stock_losses[:3]) / 3 - 0.05  # stock training works: loss falls

    cached, uncached = tmp_path / "cached", tmp_path / "uncached"
    run_cli(base_flags(tiny_model, tiny_data, str(cached), "--sera.loss", "dpo", "--sera.ref_cache", "on"))
    run_cli(base_flags(tiny_model, tiny_data, str(uncached), "--sera.loss", "dpo", "--sera.ref_cache", "off"))
    with_cache = [r["loss_mean"] for r in read_jsonl(cached / "train_log.jsonl")]
    without = [r["loss_mean"] for r in read_jsonl(uncached / "train_log.jsonl")]
    assert len(with_cache) == len(without) == len(stock_losses) == 8
    assert with_cache == pytest.approx(without, abs=1e-5)
    assert with_cache == pytest.approx(stock_losses, abs=1e-5)
    assert list((cached / "cache").glob("ref_logps-*.pt"))
    assert not (uncached / "cache").exists()
