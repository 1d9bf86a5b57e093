"""SeRA-SS on a tiny model: after one DPO epoch on pairs with flipped labels, the implicit reward margin ranks
the flipped pairs low, and the kept set holds fewer of them than the input.

Every number the CLI writes (IRMs, kept sets, the review signal) is checked against a reference computed here,
independently of the code under test: implicit rewards from a plain Hugging Face forward pass over the saved
checkpoints, AUROC by counting pairs, the Wilson bound by inverting the score test numerically, and kept sets
by hand from the keep ratio.
"""

from __future__ import annotations

import json
import math
import os
from statistics import NormalDist

import pytest
from conftest import base_flags, read_jsonl, run_cli

import tiny

BETA = 0.1  # passed as --model.beta below; the DPO implicit reward is beta * log(pi / pi_ref)
MAX_LEN = 64  # --data.max_len of base_flags


def hf_response_logps(model_dir: str, tokenizer, rows) -> dict:
    """{(id, "chosen" | "rejected"): (sum of response-token log-probs, number of response tokens)} under the
    checkpoint in model_dir, one unpadded sequence at a time, in float64 from the float32 logits.

    The sequence is what OpenRLHF's RewardDataset trains on (prompt + response, " " + EOS appended), and the
    scored tokens are those after the tokenised prompt (EOS included)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for r in rows:
            n_prompt = len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
            for side in ("chosen", "rejected"):
                text = (r["prompt"] + r[side]).rstrip("\n") + " " + tokenizer.eos_token
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                assert len(ids) < MAX_LEN and ids[-1] == tokenizer.eos_token_id  # nothing truncated
                logits = model(torch.tensor([ids])).logits[0].double()
                logps = torch.log_softmax(logits, dim=-1)
                # token t is predicted by position t - 1; score tokens n_prompt .. len(ids) - 1
                total = sum(float(logps[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
                out[(r["id"], side)] = (total, len(ids) - n_prompt)
    return out


def hf_review(policies: dict, reference_dir: str, rows) -> dict:
    """{id: (chosen_reward, rejected_reward, irm, chosen_len, rejected_len)}, each pair scored by the policy
    `policies[id]` against the reference: r = beta * (log pi(y|x) - log pi_ref(y|x)) (DPO, Rafailov et al. 2023,
    Eq. 5), IRM = r(x, y_w) - r(x, y_l) (SeRA, Ko et al. 2024)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    ref = hf_response_logps(reference_dir, tokenizer, rows)
    pol = {}
    for path in set(policies.values()):
        pol.update(hf_response_logps(path, tokenizer, [r for r in rows if policies[r["id"]] == path]))
    out = {}
    for r in rows:
        (pc, nc), (pr, nr) = pol[(r["id"], "chosen")], pol[(r["id"], "rejected")]
        rc, rr = ref[(r["id"], "chosen")][0], ref[(r["id"], "rejected")][0]
        cw, cl = BETA * (pc - rc), BETA * (pr - rr)
        out[r["id"]] = (cw, cl, cw - cl, nc, nr)
    return out


def assert_review_matches(review: list, expected: dict, tol: float = 1e-4) -> None:
    """review.jsonl rows against hf_review's numbers (tol absorbs fp32 batching and attention-kernel noise)."""
    assert {r["id"] for r in review} == set(expected)
    for r in review:
        cw, cl, irm, nc, nr = expected[r["id"]]
        got = (r["chosen_reward"], r["rejected_reward"], r["irm"])
        assert got == pytest.approx((cw, cl, irm), abs=tol), (r["id"], got, (cw, cl, irm))
        assert (r["chosen_len"], r["rejected_len"]) == (nc, nr), r["id"]


def pairwise_auroc(scores: list, positive: list) -> float:
    """P(score of a random positive > score of a random negative), ties counting half: the definition of the
    area under the ROC curve, counted over every (positive, negative) pair."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def wilson_lower_bound(successes: float, n: int, confidence: float = 0.95) -> float:
    """One-sided Wilson score bound: the smallest p that the score test (p_hat - p) / sqrt(p (1 - p) / n) <= z
    does not reject (Wilson 1927), found by bisection rather than by the closed form."""
    p_hat, z = successes / n, NormalDist().inv_cdf(confidence)
    lo, hi = 1e-12, p_hat
    for _ in range(200):
        mid = (lo + hi) / 2
        if (p_hat - mid) / math.sqrt(mid * (1 - mid) / n) > z:
            lo = mid
        else:
            hi = mid
    return hi


def check_top_selection(review: list, keep_ratio: float) -> list:
    """The built-in 'top' selector with default flags, by hand: round-half-up(keep_ratio * N) pairs kept, each
    with weight 1, none with a lower IRM than a dropped pair. Returns the kept rows."""
    k = math.floor(keep_ratio * len(review) + 0.5)
    kept = [r for r in review if r["kept"]]
    dropped = [r for r in review if not r["kept"]]
    assert len(kept) == k, (len(kept), k)
    assert all(r["weight"] == 1.0 for r in kept) and all(r["weight"] == 0.0 for r in dropped)
    assert min(r["irm"] for r in kept) >= max(r["irm"] for r in dropped)
    return kept


@pytest.mark.slow
def test_flipped_pairs_rank_low_and_are_dropped(tiny_model, tmp_path):
    rows = tiny.preference_pairs(128, flip_share=0.25, seed=3)
    data = tiny.write_jsonl(str(tmp_path / "noisy.jsonl"), rows)
    run_dir = tmp_path / "run"
    run_cli(base_flags(tiny_model, data, str(run_dir), "--adam.lr", "5e-4", "--model.beta", str(BETA),
                       "--sera.enable", "--sera.iterations", "2", "--sera.generated_share_max", "0",
                       "--sera.keep_ratio", "0.7"))
    flipped = {r["id"]: r["flipped"] for r in rows}
    review = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    assert len(review) == 128 and not (run_dir / "iter_2" / "samples.jsonl").exists()
    # review t = 2 scores with pi_1 against the initial model (the reference)
    policy_1 = str(run_dir / "iter_1" / "policy")
    assert_review_matches(review, hf_review({r["id"]: policy_1 for r in rows}, tiny_model, rows))
    score = pairwise_auroc([-r["irm"] for r in review], [flipped[r["id"]] for r in review])
    assert score >= 0.8, score
    kept = check_top_selection(review, 0.7)  # round(0.7 * 128 = 89.6) = 90 pairs
    assert len(kept) == 90
    share_in = sum(flipped.values()) / len(rows)
    share_kept = sum(flipped[r["id"]] for r in kept) / len(kept)
    assert share_kept < share_in / 2, (share_in, share_kept)
    # the kept set is exactly what iteration 2 trained on
    train = read_jsonl(run_dir / "iter_2" / "train_set.jsonl")
    assert {r["id"] for r in train} == {r["id"] for r in kept}


@pytest.mark.slow
@pytest.mark.parametrize("score_precision", ["fp32", "train"])
def test_review_scores_in_fp32_while_training_in_bf16(tiny_model, tmp_path, score_precision):
    """--sera.score_precision fp32 (default): a run that trains in bf16 still reviews in fp32, so its implicit
    rewards are the fp32 ones to 1e-4 (bf16 rounding moves a margin by about as much as training does); with
    `train` the review runs in bf16 and the rounding shows."""
    rows = tiny.preference_pairs(32, flip_share=0.25, seed=3)
    data = tiny.write_jsonl(str(tmp_path / "noisy.jsonl"), rows)
    run_dir = tmp_path / "run"
    flags = base_flags(tiny_model, data, str(run_dir), "--adam.lr", "5e-4", "--model.beta", str(BETA),
                       "--sera.enable", "--sera.iterations", "2", "--sera.generated_share_max", "0",
                       "--sera.score_precision", score_precision)
    flags[flags.index("--ds.param_dtype") + 1] = "bf16"
    run_cli(flags)
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert state["config"]["ds"]["param_dtype"] == "bf16" and state["precision"]["choice"] == "bf16"
    review = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    expected = hf_review({r["id"]: str(run_dir / "iter_1" / "policy") for r in rows}, tiny_model, rows)
    if score_precision == "fp32":
        assert_review_matches(review, expected)
    else:
        assert max(abs(r["irm"] - expected[r["id"]][2]) for r in review) > 1e-3


@pytest.mark.slow
def test_crossfitted_review_scores_each_fold_with_the_other_folds_policy(tiny_model, tmp_path):
    """--sera.crossfit_folds 2: two fold policies are trained in iteration 1, each without its fold, for
    --sera.fold_epochs 2 epochs, and the review scores every pair with the policy that never saw it. Per-iteration
    metrics reach TensorBoard."""
    from conftest import tb_scalars

    rows = tiny.preference_pairs(64, flip_share=0.25, seed=4)
    data = tiny.write_jsonl(str(tmp_path / "noisy.jsonl"), rows)
    run_dir, tb = tmp_path / "run", tmp_path / "tb"
    run_cli(base_flags(tiny_model, data, str(run_dir), "--adam.lr", "5e-4", "--model.beta", str(BETA),
                       "--sera.enable", "--sera.iterations", "2", "--sera.generated_share_max", "0",
                       "--sera.review_refit", "crossfit", "--sera.crossfit_folds", "2", "--sera.fold_epochs", "2",
                       "--logger.tensorboard_dir", str(tb)))
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert {"iter1/crossfit_fold0", "iter1/crossfit_fold1"} <= set(state["done"])
    for k in (0, 1):
        fold = read_jsonl(run_dir / "iter_1" / f"fold_{k}" / "policy" / "train_log.jsonl")
        assert fold, k
    review = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    folds = [r["fold"] for r in review]
    assert set(folds) == {0, 1} and abs(folds.count(0) - folds.count(1)) <= 1
    # each fold policy trained on the other fold only: 32 pairs = 4 optimizer steps of batch 8, twice (2 epochs),
    # while pi_1 trains its 64 pairs once (--train.max_epochs 1): 8 steps
    assert state["iterations"]["1"]["crossfit_fold0"]["n_train_pairs"] == 32
    last = {k: read_jsonl(run_dir / "iter_1" / k / "policy" / "train_log.jsonl")[-1] for k in ("fold_0", ".")}
    assert (last["fold_0"]["global_step"], last["fold_0"]["epoch"]) == (8, 1)  # epochs count from 0
    assert (last["."]["global_step"], last["."]["epoch"]) == (8, 0)
    # every pair's implicit rewards are those of ITS fold's policy (the one trained without it)
    fold_of = {r["id"]: r["fold"] for r in review}
    policies = {i: str(run_dir / "iter_1" / f"fold_{k}" / "policy") for i, k in fold_of.items()}
    expected = hf_review(policies, tiny_model, rows)
    assert_review_matches(review, expected)
    flipped = {r["id"]: r["flipped"] for r in rows}
    score = pairwise_auroc([-r["irm"] for r in review], [flipped[r["id"]] for r in review])
    assert score > 0.5, score  # out-of-fold IRM still ranks flipped pairs low
    check_top_selection(review, 0.7)  # round(0.7 * 64 = 44.8) = 45 pairs
    kept_share = tb_scalars(str(tb), "sera/review/kept_share", pattern="*_sera*")
    assert kept_share == [pytest.approx(45 / 64)]
    # the out-of-fold signal test is recorded, with numbers recomputed from the HF-scored IRMs
    signal = state["iterations"]["2"]["review"]["signal"]
    agree = sum(1 for v in expected.values() if v[2] > 0)  # no IRM of these pairs is exactly 0
    bound = wilson_lower_bound(agree, 64)
    assert signal["out_of_fold"] and signal["n"] == 64
    assert signal["label_agreement"] == pytest.approx(agree / 64, abs=1e-12)
    assert signal["lower_bound"] == pytest.approx(bound, abs=1e-4)  # z = 1.645 there, 1.64485 here
    assert signal["lower_bound"] < signal["label_agreement"]
    # --sera.review_min_agreement 0.55 (default): below it the review warns and selects anyway (--sera.no_signal warn)
    assert signal["action"] == ("select" if bound >= 0.55 else "warned"), (bound, signal)


@pytest.mark.slow
def test_review_without_signal_keeps_every_pair_when_asked(tiny_model, tmp_path):
    """--sera.no_signal keep_all: a cross-fitted review whose out-of-fold agreement is below
    --sera.review_min_agreement (forced here with an unreachable 100 %) warns and trains on every offline pair
    instead of a random subset."""
    rows = tiny.preference_pairs(32, flip_share=0.25, seed=5)
    data = tiny.write_jsonl(str(tmp_path / "noisy.jsonl"), rows)
    run_dir = tmp_path / "run"
    proc = run_cli(base_flags(tiny_model, data, str(run_dir), "--sera.enable", "--sera.iterations", "2",
                              "--sera.generated_share_max", "0", "--sera.review_refit", "crossfit",
                              "--sera.crossfit_folds", "2", "--sera.review_min_agreement", "1.0",
                              "--sera.no_signal", "keep_all"))
    assert "self-review has no signal at iteration 2" in proc.stdout + proc.stderr
    review = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    assert len(review) == 32 and all(r["kept"] and r["weight"] == 1.0 for r in review)
    assert len(read_jsonl(run_dir / "iter_2" / "train_set.jsonl")) == 32
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert state["iterations"]["2"]["review"]["signal"]["action"] == "keep_all"
    assert "no signal" in (run_dir / "report" / "report.md").read_text()


@pytest.mark.slow
def test_frozen_review_scores_with_the_first_pass_policy(tiny_model, tiny_data, tmp_path):
    """--sera.review_refit frozen (no folds): every review uses iteration 1's policy, so the IRMs repeat exactly,
    and they are pi_1's, not those of the policy trained just before the review."""
    rows = read_jsonl(tiny_data)
    run_dir = tmp_path / "run"
    run_cli(base_flags(tiny_model, tiny_data, str(run_dir), "--model.beta", str(BETA), "--sera.enable",
                       "--sera.iterations", "3", "--sera.generated_share_max", "0", "--sera.review_refit", "frozen"))
    review2 = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    review3 = read_jsonl(run_dir / "iter_3" / "review.jsonl")
    policy_1 = str(run_dir / "iter_1" / "policy")
    expected = hf_review({r["id"]: policy_1 for r in rows}, tiny_model, rows)
    assert_review_matches(review2, expected)
    assert_review_matches(review3, expected)
    assert {r["id"]: r["irm"] for r in review2} == {r["id"]: r["irm"] for r in review3}
    # scored once: review 3 reads review 2's scores back instead of loading pi_1 again
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert "scored_per_rank" in state["iterations"]["2"]["review"]
    assert "scored_per_rank" not in state["iterations"]["3"]["review"]
    # pi_2 (trained before review 3) scores differently, so review 3 really did not use it
    policy_2 = str(run_dir / "iter_2" / "policy")
    pi2 = hf_review({r["id"]: policy_2 for r in rows}, tiny_model, rows)
    assert max(abs(pi2[i][2] - expected[i][2]) for i in expected) > 1e-2


def safetensors_max_diff(a, b) -> tuple[float, float]:
    """(max abs difference, largest abs weight) between two saved checkpoints' tensors."""
    from safetensors.torch import load_file

    ta, tb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert ta.keys() == tb.keys()
    return (max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta),
            max(float(t.abs().max()) for t in ta.values()))


@pytest.mark.slow
def test_soft_review_without_signal_trains_exactly_like_cdpo(tiny_model, tmp_path):
    """--sera.select_mode soft whose cross-fitted review has no signal (forced with an unreachable 100 % agreement)
    gives every pair the confidence 1 - --model.label_smoothing, so both iterations train as cDPO on every pair:
    the same weights as a hard review that keeps every pair with the stock cDPO loss."""
    rows = tiny.preference_pairs(32, flip_share=0.25, seed=6)
    data = tiny.write_jsonl(str(tmp_path / "noisy.jsonl"), rows)
    common = ("--model.beta", str(BETA), "--model.label_smoothing", "0.2", "--sera.enable", "--sera.iterations", "2",
              "--sera.generated_share_max", "0", "--sera.review_refit", "crossfit", "--sera.crossfit_folds", "2",
              "--sera.review_min_agreement", "1.0")
    soft, cdpo = tmp_path / "soft", tmp_path / "cdpo"
    proc = run_cli(base_flags(tiny_model, data, str(soft), *common, "--sera.select_mode", "soft"))
    assert "Every pair gets the prior label confidence" in proc.stdout + proc.stderr
    run_cli(base_flags(tiny_model, data, str(cdpo), *common, "--sera.keep_ratio", "1.0"))
    for t in (1, 2):
        assert [r["confidence"] for r in read_jsonl(soft / f"iter_{t}" / "train_set.jsonl")] == [0.8] * 32
    review = read_jsonl(soft / "iter_2" / "review.jsonl")
    assert all(r["kept"] and r["confidence"] == 0.8 for r in review)
    state = json.loads((soft / "sera_state.json").read_text())
    assert state["iterations"]["2"]["review"]["signal"]["action"] == "prior"
    assert state["iterations"]["2"]["review"]["calibration"]["flip_rate"] == 0.2
    assert "iteration 2: cDPO weights (the out-of-fold agreement test failed)" in (soft / "report" / "report.md").read_text()
    diff, scale = safetensors_max_diff(str(soft / "iter_2" / "policy"), str(cdpo / "iter_2" / "policy"))
    moved, _ = safetensors_max_diff(str(soft / "iter_2" / "policy"), tiny_model)
    assert diff <= 1e-5 * scale and moved > 1e-3, (diff, moved, scale)


@pytest.mark.slow
def test_soft_review_gives_each_pair_a_calibrated_confidence(tiny_model, tmp_path):
    """--sera.select_mode soft with signal: every pair is kept and trained with its own confidence, rising with
    its IRM, whose mean shortfall (1 - w) is the estimated flip rate the state records."""
    rows = tiny.preference_pairs(64, flip_share=0.25, seed=4)
    data = tiny.write_jsonl(str(tmp_path / "noisy.jsonl"), rows)
    run_dir = tmp_path / "run"
    run_cli(base_flags(tiny_model, data, str(run_dir), "--adam.lr", "5e-4", "--model.beta", str(BETA),
                       "--model.label_smoothing", "0.1", "--sera.enable", "--sera.iterations", "2",
                       "--sera.generated_share_max", "0", "--sera.select_mode", "soft"))
    review = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    cal = json.loads((run_dir / "sera_state.json").read_text())["iterations"]["2"]["review"]["calibration"]
    assert cal["fallback"] is None, cal
    conf = [r["confidence"] for r in sorted(review, key=lambda r: r["irm"])]
    assert all(a <= b for a, b in zip(conf, conf[1:])) and conf[0] < 0.5 < conf[-1]
    assert sum(1 - c for c in conf) / 64 == pytest.approx(cal["flip_rate"], abs=1e-9)
    flipped = {r["id"]: r["flipped"] for r in rows}
    assert pairwise_auroc([-r["confidence"] for r in review], [flipped[r["id"]] for r in review]) > 0.5
    trained = {r["id"]: r["confidence"] for r in read_jsonl(run_dir / "iter_2" / "train_set.jsonl")}
    assert trained == {r["id"]: r["confidence"] for r in review}  # every pair, with its own confidence
    assert "estimated flip rate" in (run_dir / "report" / "report.md").read_text()
