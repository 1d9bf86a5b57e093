"""The SeRA loop end to end on a tiny model: artefacts, report, kill/resume parity, locks and state checks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import base_flags, read_jsonl, run_cli

# lr 3e-4 (not base_flags' 1e-3): at 1e-3 the tiny policy drifts so far from π0 in two iterations that most of its
# samples fail the fluency floor, and whether any prompt keeps two valid samples is up to the draw
LOOP = ["--sera.enable", "--sera.num_samples", "4", "--sera.max_new_tokens", "12", "--sera.temperature", "1.0",
        "--sera.fluency_quantile", "0.1", "--sera.keep_ratio", "0.7", "--sera.generated_share_max", "0.5",
        "--adam.lr", "3e-4"]


def loop_flags(model, data, run_dir, iterations=3, *extra):
    return base_flags(model, data, str(run_dir), *LOOP, "--sera.iterations", str(iterations), *extra)


def outcome(run_dir):
    """What must be identical between an interrupted-and-resumed run and an uninterrupted one."""
    state = json.loads((run_dir / "sera_state.json").read_text())
    # scored_per_rank is work, not a result: a resumed phase finds the reference log-probs its killed attempt cached
    stats = {t: {phase: {k: v for k, v in st.items() if k != "scored_per_rank"} if isinstance(st, dict) else st
                 for phase, st in it.items()} for t, it in state["iterations"].items()}
    out = {"stats": stats, "final": os.path.basename(os.path.dirname(state["final_policy"]))}
    for t in (2, 3):
        d = run_dir / f"iter_{t}"
        for name in ("kept.jsonl", "bootstrapped.jsonl", "train_set.jsonl"):
            if (d / name).exists():
                out[f"{t}/{name}"] = read_jsonl(d / name)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("loop") / "run"
    proc = run_cli(loop_flags(tiny_model, tiny_data, run_dir))
    return run_dir, proc


@pytest.mark.slow
def test_three_iterations_produce_every_artefact(uninterrupted):
    run_dir, proc = uninterrupted
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert state["done"][0] == "iter1/train"
    # every phase's peak memory is recorded, and the precision the run resolved to is the one it trained in
    assert set(state["memory"]) == set(state["done"]) and all(m["peak_rss_mb"] > 0 for m in state["memory"].values())
    assert state["precision"]["choice"] == state["config"]["ds"]["param_dtype"]
    for t in (2, 3):
        for phase in ("review", "generate", "score_samples", "pair", "train"):
            assert f"iter{t}/{phase}" in state["done"]
        d = run_dir / f"iter_{t}"
        review = read_jsonl(d / "review.jsonl")
        kept = read_jsonl(d / "kept.jsonl")
        assert len(review) == 64 and sum(r["kept"] for r in review) == len(kept) == round(0.7 * 64)
        assert {r["id"] for r in kept} == {r["id"] for r in review if r["kept"]}
        assert set(kept[0]) >= {"id", "prompt", "chosen", "rejected"}  # the input's keys
        boot = read_jsonl(d / "bootstrapped.jsonl")
        assert boot and all(b["chosen"] != b["rejected"] and b["margin"] >= 0 for b in boot)
        train = read_jsonl(d / "train_set.jsonl")
        n_gen = sum(r["id"].startswith("boot") for r in train)
        assert state["iterations"][str(t)]["train"]["n_generated"] == n_gen
        assert (d / "policy" / "model.safetensors").exists()
    # the generated share grows: 0.25 then 0.5 of the mix (capped by the pairs available)
    share2 = state["iterations"]["2"]["train"]["generated_share_target"]
    share3 = state["iterations"]["3"]["train"]["generated_share_target"]
    assert share2 == pytest.approx(0.25) and share3 == pytest.approx(0.5)
    assert state["final_policy"].endswith(os.path.join("iter_3", "policy"))
    report = run_dir / "report" / "report.md"
    assert report.exists() and str(report) in proc.stdout
    assert list((run_dir / "report").glob("*.png"))


@pytest.mark.slow
def test_kill_at_every_phase_resumes_to_the_same_result(uninterrupted, tiny_model, tiny_data, tmp_path):
    """SIGKILL (and a SIGTERM) during scoring, generation and training, and between a phase's write and its
    mark: each rerun continues, and the final sets and statistics equal the uninterrupted run's."""
    run_dir = tmp_path / "run"
    flags = loop_flags(tiny_model, tiny_data, run_dir)
    for point, sig in (("iter2/review:start", "KILL"), ("iter2/generate:end", "TERM"),
                       ("iter2/train:step3", "KILL"), ("iter3/score_samples:end", "KILL")):
        proc = run_cli(flags, env={"SERA_FAULT_KILL_AT": point, "SERA_FAULT_SIGNAL": sig}, check=False)
        assert proc.returncode == (-15 if sig == "TERM" else -9), (point, proc.returncode, proc.stderr[-2000:])
    run_cli(flags)
    assert outcome(run_dir) == outcome(uninterrupted[0])


@pytest.mark.slow
def test_changed_configuration_is_refused_unless_forced(uninterrupted, tiny_model, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    flags = loop_flags(tiny_model, tiny_data, run_dir, 2)
    run_cli(flags, env={"SERA_FAULT_KILL_AT": "iter2/review:start"}, check=False)
    proc = run_cli(flags + ["--sera.keep_ratio", "0.5"], check=False)
    assert proc.returncode == 2 and "--sera.keep_ratio 0.7 -> 0.5" in proc.stderr
    proc = run_cli(flags + ["--sera.keep_ratio", "0.5", "--sera.force_resume"], check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_chat_format_data_bootstraps_in_chat_form(tiny_model, tmp_path):
    """With --data.apply_chat_template, prompts are generated from the chat template exactly as training
    formats them, and bootstrapped pairs are written back as chat messages."""
    import tiny

    rows = [{"id": r["id"], "prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]}
            for r in tiny.preference_pairs(64, seed=5)]
    data = tiny.write_jsonl(str(tmp_path / "chat.jsonl"), rows)
    run_dir = tmp_path / "run"
    run_cli(base_flags(tiny_model, data, str(run_dir), "--data.apply_chat_template", *LOOP, "--sera.iterations", "2",
                       "--sera.keep_truncated", "--sera.no_fluency_guard"))
    samples = read_jsonl(run_dir / "iter_2" / "samples.jsonl")
    assert all(isinstance(s["prompt"], list) for s in samples)
    boot = read_jsonl(run_dir / "iter_2" / "bootstrapped.jsonl")
    assert boot and all(b["chosen"][0]["role"] == "assistant" for b in boot)
    train = read_jsonl(run_dir / "iter_2" / "train_set.jsonl")
    assert any(r["id"].startswith("boot") for r in train)


def test_generation_prompt_is_the_training_prompt(tiny_model):
    """format_prompt gives exactly the prefix RewardDataset puts before the response."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from sera_openrlhf.openrlhf_adapter import compat

    compat.apply()
    from openrlhf.datasets.reward_dataset import preprocess_data

    from sera_openrlhf.openrlhf_adapter.generate import format_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model)
    args = SimpleNamespace(data=SimpleNamespace(apply_chat_template=True, tokenizer_chat_template=None,
                                                input_template=None))
    messages = [{"role": "user", "content": "tell me about the dog :"}]
    prompt = format_prompt(args, tok, messages)
    assert prompt.endswith("<|assistant|>")
    full, chosen, _, _ = preprocess_data(
        {"prompt": messages, "chosen": [{"role": "assistant", "content": " kind"}], "rejected": []},
        None, "prompt", "chosen", "rejected", tok.apply_chat_template, is_dpo=True)
    assert full == prompt and chosen.startswith(" kind")


@pytest.mark.slow
def test_the_robust_review_and_judge_flags_run_together_through_the_cli(tiny_model, tiny_data, tmp_path):
    """Soft review on the IRM averaged over two reviews, a pessimistic unanimous judge and the adaptive share (which
    needs an out-of-sample review: two cross-fitted folds), in one 3-iteration run: each leaves its trace in the
    state and the run files."""
    run_dir = tmp_path / "run"
    proc = run_cli(loop_flags(tiny_model, tiny_data, run_dir, 3, "--sera.review_refit", "crossfit",
                              "--sera.crossfit_folds", "2", "--sera.select_mode", "soft",
                              "--model.label_smoothing", "0.1", "--sera.review_average", "2", "--sera.judge_lambda",
                              "1.0", "--sera.judge_unanimous", "--sera.share_min_auroc", "0.6",
                              "--sera.generated_share_step", "0.25"))
    state = json.loads((run_dir / "sera_state.json").read_text())
    its = state["iterations"]
    assert [r["confidence"] for r in read_jsonl(run_dir / "iter_1" / "train_set.jsonl")] == [0.9] * 64
    assert "irm_averaged" not in read_jsonl(run_dir / "iter_2" / "review.jsonl")[0]
    review3 = read_jsonl(run_dir / "iter_3" / "review.jsonl")
    irm2 = {r["id"]: r["irm"] for r in read_jsonl(run_dir / "iter_2" / "review.jsonl")}
    assert all(r["irm_averaged"] == pytest.approx((r["irm"] + irm2[r["id"]]) / 2) for r in review3)
    assert its["3"]["review"]["calibration"]["reviews_averaged"] == 2
    assert "soft review calibrated on in-sample margins" not in proc.stdout  # out of fold
    assert its["2"]["review"]["calibration"]["previous_review_correlation"] is None  # no earlier review
    ids = [r["id"] for r in review3]
    expect = torch.corrcoef(torch.tensor([[r["irm"] for r in review3], [irm2[i] for i in ids]], dtype=torch.float64))
    assert its["3"]["review"]["calibration"]["previous_review_correlation"] == pytest.approx(float(expect[0, 1]))
    report = (run_dir / "report" / "report.md").read_text()
    assert f"correlation with the previous review {float(expect[0, 1]):.4g}" in report
    share = 0.0
    for t in ("2", "3"):
        cal = its[t]["review"]["calibration"]
        up = cal["has_signal"] and cal["est_flip_auroc"] >= 0.6  # an unidentified flip rate keeps its estimate
        share = min(0.5, max(0.0, share + (0.25 if up else -0.25)))
        assert its[t]["train"]["generated_share_target"] == share, (t, cal)
        if share > 0:
            assert "not_unanimous" in its[t]["pair"]
    assert len(read_jsonl(run_dir / "iter_3" / "train_set.jsonl")) > 0


@pytest.mark.slow
def test_prequential_review_through_the_cli(tiny_model, tiny_data, tmp_path):
    """--sera.review_refit prequential: review 2 ranks every pair by its margin in the iteration-1 training forward
    that first trained on it (read from train_margins.jsonl); the pairs iteration 1 left out (--sera.train_pairs 60
    of 64) are scored by π_1; the review counts as out of sample."""
    run_dir = tmp_path / "run"
    run_cli(loop_flags(tiny_model, tiny_data, run_dir, 2, "--sera.review_refit", "prequential",
                       "--sera.generated_share_max", "0", "--sera.keep_ratio", "0.5", "--sera.train_pairs", "60"))
    first = {}
    for m in read_jsonl(run_dir / "iter_1" / "policy" / "train_margins.jsonl"):
        first.setdefault(m["id"], m["chosen_reward"] - m["rejected_reward"])
    review = read_jsonl(run_dir / "iter_2" / "review.jsonl")
    assert len(review) == 64 and len(first) == 60  # iteration 1 trained 60 of the 64
    assert all(r["irm"] == pytest.approx(first[r["id"]], abs=1e-9) for r in review if r["id"] in first)
    kept = sorted((r for r in review), key=lambda r: -r["irm"])[:32]
    assert {r["id"] for r in review if r["kept"]} == {r["id"] for r in kept}
    state = json.loads((run_dir / "sera_state.json").read_text())
    stats = state["iterations"]["2"]["review"]
    assert stats["calibration"]["out_of_fold"] is True and stats["n_prequential_unseen"] == 4
    assert sum(stats["scored_per_rank"]) == 2 * 2 * 4  # the 4 unseen pairs only: π_1 and the reference, 2 sides
