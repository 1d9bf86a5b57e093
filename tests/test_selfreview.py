"""SeRA-SS on a tiny model: after one DPO epoch on pairs with flipped labels, the implicit reward margin ranks
the flipped pairs low, and the kept set holds fewer of them than the input."""

from __future__ import annotations

import pytest
from conftest import base_flags, read_jsonl, run_cli

import tiny
from sera_openrlhf.selection import auroc


@pytest.mark.slow
def test_flipped_pairs_rank_low_and_are_dropped(tiny_model, tmp_path):
    rows = tiny.preference_pairs(128, flip_share=0.25, seed=3)
    data = tiny.write_jsonl(str(tmp_path / "noisy.jsonl"), rows)
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


@pytest.mark.slow
def test_crossfitted_review_scores_each_fold_with_the_other_folds_policy(tiny_model, tmp_path):
    """--sera.crossfit_folds 2: two fold policies are trained in iteration 1, each without its fold, and the
    review scores every pair with the policy that never saw it. Per-iteration metrics reach TensorBoard."""
    from conftest import tb_scalars

    rows = tiny.preference_pairs(64, flip_share=0.25, seed=4)
    data = tiny.write_jsonl(str(tmp_path / "noisy.jsonl"), rows)
    run_dir, tb = tmp_path / "run", tmp_path / "tb"
    run_cli(base_flags(tiny_model, data, str(run_dir), "--adam.lr", "5e-4", "--sera.enable", "--sera.iterations",
                       "2", "--sera.generated_share_max", "0", "--sera.crossfit_folds", "2",
                       "--logger.tensorboard_dir", str(tb)))
    state = __import__("json").loads((run_dir / "sera_state.json").read_text())
    assert {"iter1/crossfit_fold0", "iter1/crossfit_fold1"} <= set(state["done"])
    for k in (0, 1):
        fold = read_jsonl(run_dir / "iter_1" / f"fold_{k}" / "policy" / "train_log.jsonl")
        assert fold, k
    review = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    folds = [r["fold"] for r in review]
    assert set(folds) == {0, 1} and abs(folds.count(0) - folds.count(1)) <= 1
    # each fold policy trained on the other fold only: 32 pairs = 4 optimizer steps of batch 8
    assert state["iterations"]["1"]["crossfit_fold0"]["n_train_pairs"] == 32
    flipped = {r["id"]: r["flipped"] for r in rows}
    score = auroc([-r["irm"] for r in review], [flipped[r["id"]] for r in review])
    assert score > 0.5, score  # out-of-fold IRM still ranks flipped pairs low
    kept_share = tb_scalars(str(tb), "sera/review/kept_share", pattern="*_sera*")
    assert kept_share == [pytest.approx(0.703125)]
    # the out-of-fold signal test is recorded and matches the review table
    signal = state["iterations"]["2"]["review"]["signal"]
    agreement = sum((r["irm"] > 0) + 0.5 * (r["irm"] == 0) for r in review) / len(review)
    assert signal["out_of_fold"] and signal["n"] == 64
    assert signal["label_agreement"] == pytest.approx(agreement)
    assert signal["lower_bound"] < agreement
    assert signal["action"] == ("select" if signal["lower_bound"] >= 0.55 else "warned")


@pytest.mark.slow
def test_review_without_signal_keeps_every_pair_when_asked(tiny_model, tmp_path):
    """--sera.no_signal keep_all: a cross-fitted review whose out-of-fold agreement is below
    --sera.review_min_agreement (forced here with an unreachable 100 %) warns and trains on every offline pair
    instead of a random subset."""
    rows = tiny.preference_pairs(32, flip_share=0.25, seed=5)
    data = tiny.write_jsonl(str(tmp_path / "noisy.jsonl"), rows)
    run_dir = tmp_path / "run"
    proc = run_cli(base_flags(tiny_model, data, str(run_dir), "--sera.enable", "--sera.iterations", "2",
                              "--sera.generated_share_max", "0", "--sera.crossfit_folds", "2",
                              "--sera.review_min_agreement", "1.0", "--sera.no_signal", "keep_all"))
    assert "self-review has no signal at iteration 2" in proc.stdout + proc.stderr
    review = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    assert len(review) == 32 and all(r["kept"] for r in review)
    assert len(read_jsonl(run_dir / "iter_2" / "train_set.jsonl")) == 32
    state = __import__("json").loads((run_dir / "sera_state.json").read_text())
    assert state["iterations"]["2"]["review"]["signal"]["action"] == "keep_all"
    assert "no signal" in (run_dir / "report" / "report.md").read_text()


@pytest.mark.slow
def test_first_pass_review_policy(tiny_model, tiny_data, tmp_path):
    """--sera.review_policy first_pass: every review uses iteration 1's policy, so the IRMs repeat exactly."""
    run_dir = tmp_path / "run"
    run_cli(base_flags(tiny_model, tiny_data, str(run_dir), "--sera.enable", "--sera.iterations", "3",
                       "--sera.generated_share_max", "0", "--sera.review_policy", "first_pass"))
    irm2 = {r["id"]: r["irm"] for r in read_jsonl(run_dir / "iter_2" / "review.jsonl")}
    irm3 = {r["id"]: r["irm"] for r in read_jsonl(run_dir / "iter_3" / "review.jsonl")}
    assert irm2 == irm3
