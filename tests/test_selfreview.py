"""SeRA-SS on a tiny model: after one DPO epoch on pairs with flipped labels, the implicit reward margin ranks
the flipped pairs low, and the kept set holds fewer of them than the input."""

from __future__ import annotations

import pytest
from conftest import base_flags, read_jsonl, run_cli

from sera_openrlhf import testing
from sera_openrlhf.selection import auroc


@pytest.mark.slow
def test_flipped_pairs_rank_low_and_are_dropped(tiny_model, tmp_path):
    rows = testing.preference_pairs(128, flip_share=0.25, seed=3)
    data = testing.write_jsonl(str(tmp_path / "noisy.jsonl"), rows)
    run_dir = tmp_path / "run"
    run_cli(base_flags(tiny_model, data, str(run_dir), "--adam.lr", "5e-4", "--sera.enable", "--sera.iterations",
                       "2", "--sera.generated_share_max", "0", "--sera.keep_ratio", "0.7"))
    flipped = {r["id"]: r["flipped"] for r in rows}
    review = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    assert len(review) == 128 and not (run_dir / "iter_2" / "samples.jsonl").exists()
    score = auroc([-r["irm"] for r in review], [flipped[r["id"]] for r in review])
    assert score >= 0.8, score
    kept = [r for r in review if r["kept"]]
    share_in = sum(flipped.values()) / len(rows)
    share_kept = sum(flipped[r["id"]] for r in kept) / len(kept)
    assert share_kept < share_in / 2, (share_in, share_kept)
    # the kept set is exactly what iteration 2 trained on
    train = read_jsonl(run_dir / "iter_2" / "train_set.jsonl")
    assert {r["id"] for r in train} == {r["id"] for r in kept}
