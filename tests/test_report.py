"""sera_openrlhf.report / cli.report on hand-built run directories (no training runs here)."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

from sera_openrlhf.cli.report import main as report_main
from sera_openrlhf.report import PLOTS, build_report, write_report

N_PAIRS = 60
WORST_ID = "p007"
WORST_PROMPT = "Tell me about the weather in WORSTPROMPT town"


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _train_log(rng, n_steps, start_loss):
    return [{"global_step": s, "epoch": 0, "loss": start_loss * (0.97 ** s) + rng.uniform(-0.02, 0.02),
             "acc": min(1.0, 0.5 + s / (2 * n_steps) + rng.choice([-0.125, 0, 0.125])),
             "chosen_reward": 0.01 * s, "reject_reward": -0.01 * s, "lr": 5e-7, "grad_norm": 1.0,
             "chosen_nll": 2.0} for s in range(1, n_steps + 1)]


def make_run(root, converge_at=None):
    """A 3-iteration run directory; with converge_at=3 iteration 3 has only its review. Returns the inputs."""
    rng = random.Random(0)
    run = str(root)
    offline = [{"id": f"p{i:03d}",
                "prompt": WORST_PROMPT if f"p{i:03d}" == WORST_ID else f"prompt number {i} | <q>",
                "chosen": f"a helpful answer {i} " * 3, "rejected": f"a rude answer {i}\nsecond line"}
               for i in range(N_PAIRS)]
    config = {"model": {"beta": 0.1, "ipo_enable": False},
              "data": {"prompt_key": "prompt", "chosen_key": "chosen", "rejected_key": "rejected"},
              "sera": {"enable": True, "iterations": 3, "loss": "dpo", "keep_ratio": 0.7, "select_mode": "top",
                       "selector": "irm", "select_direction": "high", "num_samples": 4, "ensemble_mode": "last_k",
                       "ensemble_k": 2, "ensemble_lambda": 0.5, "no_fluency_guard": False,
                       "fluency_floor": None, "fluency_quantile": 0.1, "converge_jaccard": 0.9,
                       "generated_share_max": 0.5, "crossfit_folds": 2, "bootstrap_nll_coef": 0.2}}
    iters, done, expect = {}, [], {}

    # iteration 1: train on everything (+ 2 cross-fit folds)
    _jsonl(f"{run}/iter_1/train_set.jsonl", offline)
    log = _train_log(rng, 12, 0.69)
    _jsonl(f"{run}/iter_1/policy/train_log.jsonl", log)
    iters["1"] = {"train": {"n_train_pairs": N_PAIRS, "n_prompt_too_long": 0, "steps": 12,
                            "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"], "acc_last": log[-1]["acc"],
                            "n_offline": N_PAIRS, "n_generated": 0, "generated_share": 0.0},
                  "crossfit_fold0": {"n_train_pairs": 30, "steps": 6, "loss_last": 0.6, "acc_last": 0.7},
                  "crossfit_fold1": {"n_train_pairs": 30, "steps": 6, "loss_last": 0.62, "acc_last": 0.65}}
    done += ["iter1/train", "iter1/crossfit_fold0", "iter1/crossfit_fold1"]
    expect[1] = {"pairs_trained": N_PAIRS, "offline_kept": N_PAIRS, "generated": 0,
                 "final_loss": log[-1]["loss"], "final_acc": log[-1]["acc"]}

    prev_kept = None
    for t in (2, 3):
        d = f"{run}/iter_{t}"
        irm = {r["id"]: rng.gauss(0.5 * t, 1.0) for r in offline}
        irm[WORST_ID] = -9.5 - t
        order = sorted(irm, key=lambda i: -irm[i])
        kept = set(order[: round(0.7 * N_PAIRS)])
        review = [{"id": r["id"], "irm": irm[r["id"]], "chosen_reward": irm[r["id"]] / 2,
                   "rejected_reward": -irm[r["id"]] / 2, "chosen_len": 12 + n % 5, "rejected_len": 8 + n % 3,
                   "fold": n % 2, "kept": r["id"] in kept, "weight": 1.0 if r["id"] in kept else 0.0}
                  for n, r in enumerate(offline)]
        _jsonl(f"{d}/review.jsonl", review)
        _jsonl(f"{d}/kept.jsonl", [r for r in offline if r["id"] in kept])
        kirm = [irm[i] for i in kept]
        jac = None if prev_kept is None else len(kept & prev_kept) / len(kept | prev_kept)
        rstats = {"n_pairs": N_PAIRS, "n_kept": len(kept), "kept_share": len(kept) / N_PAIRS,
                  "irm": {"all": {"p50": sorted(irm.values())[N_PAIRS // 2]}, "kept": None, "dropped": None},
                  "mean_irm_kept": sum(kirm) / len(kirm),
                  "mean_len": {g: {"chosen": 13.0 + (g == "kept"), "rejected": 9.0} for g in ("kept", "dropped")},
                  "jaccard_previous": jac, "n_negative_irm": sum(v < 0 for v in irm.values()),
                  "most_negative": [], "n_prompt_too_long": 0}
        iters[str(t)] = {"review": rstats}
        done.append(f"iter{t}/review")
        expect[t] = {"offline_kept": len(kept), "kept_share": len(kept) / N_PAIRS,
                     "mean_kept_irm": sum(kirm) / len(kirm), "jaccard": jac}
        prev_kept = kept
        if converge_at == t:
            break

        samples = [{"prompt_id": f"q{p}", "prompt": f"prompt {p}", "sample_index": j, "text": f"sample {p}.{j}",
                    "truncated": (p + j) % 7 == 0, "n_generated_tokens": 10 + j, "n_tokens": 10 + j}
                   for p in range(20) for j in range(4)]
        _jsonl(f"{d}/samples.jsonl", samples)
        trunc = sum(s["truncated"] for s in samples) / len(samples)
        boot = [{"id": f"boot{t}-q{p}", "prompt": f"prompt {p}", "chosen": f"sample {p}.1",
                 "rejected": f"sample {p}.2", "margin": 0.1 * t + rng.expovariate(2.0), "debiased_margin": 0.1,
                 "chosen_len": 11 + p % 4, "rejected_len": 12} for p in range(16)]
        boot.sort(key=lambda b: -b["margin"])
        _jsonl(f"{d}/bootstrapped.jsonl", boot)
        n_gen = 8 * (t - 1)
        train_set = [dict(r, weight=1.0) for r in offline if r["id"] in kept] + \
                    [{"id": b["id"], "prompt": b["prompt"], "chosen": b["chosen"], "rejected": b["rejected"],
                      "weight": 1.0, "nll_coef": 0.2} for b in boot[:n_gen]]
        _jsonl(f"{d}/train_set.jsonl", train_set)
        log = _train_log(rng, 10, 0.6 - 0.1 * t)
        _jsonl(f"{d}/policy/train_log.jsonl", log)
        guard = {"low_fluency": 7 + t, "degenerate_text": t, "kept": 80 - 7 - 2 * t}
        iters[str(t)].update({
            "generate": {"n_prompts": 20, "n_samples": 80, "truncated_share": trunc, "mean_generated_tokens": 11.5,
                         "generated_per_rank": [12, 8]},
            "score_samples": {"scored_under": ["init", "pi1", "ref1"], "scored_per_rank": [80, 80]},
            "pair": {"prompts": 20, "pairs": 16, "too_few_valid": 2, "duplicate_texts": 1, "below_min_margin": 1,
                     "top_fraction_cut": 0, "truncated_dropped": 5, "alpha": 0.0, "guard": guard,
                     "ensemble": {"policies": [1], "weights": [1.0]}, "n_pairs": 16,
                     "margins": [b["margin"] for b in boot],
                     "mean_len_chosen": sum(b["chosen_len"] for b in boot) / 16, "mean_len_rejected": 12.0},
            "train": {"n_train_pairs": len(train_set), "n_prompt_too_long": 0, "steps": 10,
                      "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"], "acc_last": log[-1]["acc"],
                      "n_offline": len(kept), "n_generated": n_gen, "generated_share": n_gen / len(train_set),
                      "generated_share_target": 0.25 * (t - 1)}})
        done += [f"iter{t}/{p}" for p in ("generate", "score_samples", "pair", "train")]
        expect[t].update({"pairs_trained": len(train_set), "generated": n_gen,
                          "generated_share": n_gen / len(train_set), "truncated_share": trunc,
                          "guard_dropped": 7 + 2 * t, "bootstrapped_pairs": 16,
                          "final_loss": log[-1]["loss"], "final_acc": log[-1]["acc"]})
        os.makedirs(f"{d}/policy", exist_ok=True)
    os.makedirs(f"{run}/iter_1/policy", exist_ok=True)
    final = 2 if converge_at == 3 else 3
    state = {"version": 1, "config": config, "done": done, "iterations": iters,
             "final_policy": f"{run}/iter_{final}/policy", "data": {"n_pairs": N_PAIRS, "skipped": {},
                                                                    "files": [{"path": "pairs.jsonl",
                                                                               "n_pairs": N_PAIRS,
                                                                               "format": "openrlhf"}]}}
    if converge_at:
        state["converged_at"] = converge_at
    state["seconds"] = {p: 10.0 + i for i, p in enumerate(done)}
    state["memory"] = {p: {"peak_rss_mb": 2000 + i, "rss_mb": 900} for i, p in enumerate(done)}
    state["precision"] = {"choice": "fp32", "reason": "no bf16 instructions on this CPU"}
    with open(f"{run}/sera_state.json", "w") as f:
        json.dump(state, f)
    return expect


def _read(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _check_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n", path
    assert os.path.getsize(path) > 1024, path


def _table_rows(md, heading):
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    expect = make_run(root)
    md_path = write_report(str(root))
    return root, expect, md_path


def test_full_report_files_and_numbers(full_run):
    root, expect, md_path = full_run
    out = os.path.join(root, "report")
    assert md_path == os.path.join(str(root), "report", "report.md")
    for name in PLOTS:
        _check_png(os.path.join(out, f"{name}.png"))
    rep = json.loads(_read(os.path.join(out, "report.json")))
    assert rep == json.loads(json.dumps(build_report(str(root)) | {"plots": rep["plots"]}))
    assert set(rep["plots"]) == set(PLOTS)
    by_t = {it["iteration"]: it for it in rep["iterations"]}
    assert sorted(by_t) == [1, 2, 3]
    for t, exp in expect.items():
        for key, value in exp.items():
            got = by_t[t][key]
            assert got == pytest.approx(value) if value is not None else got is None, (t, key, got, value)
    assert by_t[2]["jaccard"] is None
    assert all(it["status"] == "trained" for it in rep["iterations"])
    assert rep["config"]["keep ratio"] == 0.7 and rep["config"]["beta"] == 0.1 and rep["config"]["loss"] == "dpo"
    assert rep["final_policy"].endswith("iter_3/policy")
    assert rep["guard_totals"]["low_fluency"] == 9 + 10
    assert [f["fold"] for f in by_t[1]["crossfit"]] == [0, 1]
    sp = rep["suspicious_pairs"]
    assert sp["iteration"] == 3 and sp["pairs"][0]["id"] == WORST_ID
    assert sp["pairs"][0]["irm"] == pytest.approx(-12.5)
    assert sp["pairs"][0]["irm_by_iteration"] == {"2": pytest.approx(-11.5), "3": pytest.approx(-12.5)}
    assert len(sp["pairs"]) <= 10 and all(p["irm"] < 0 for p in sp["pairs"])
    assert [p["irm"] for p in sp["pairs"]] == sorted(p["irm"] for p in sp["pairs"])


def test_full_report_markdown(full_run):
    root, expect, md_path = full_run
    md = _read(md_path)
    rows = _table_rows(md, "Iterations")
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2", "3"]
    assert f"{expect[2]['kept_share']:.1%}" in rows[1]
    suspicious = _table_rows(md, "Most suspicious offline pairs")
    assert 1 <= len(suspicious) <= 10
    assert WORST_ID in suspicious[0] and WORST_PROMPT in suspicious[0]
    assert "&lt;q&gt;" in md and "\\|" in md  # prompts with | and <> do not break the tables
    for name in PLOTS:
        assert f"]({name}.png)" in md
    assert "`--sera.keep_ratio` | 0.7" in md
    phases = md.split("## Time and memory per phase\n", 1)[1].split("\n## ", 1)[0]
    assert "Precision: fp32 (no bf16 instructions on this CPU)" in phases
    assert "| iter1/train | 10 | 2000 |" in phases and "| iter3/train |" in phases
    # the work of each data-parallel rank, where the phase recorded it
    assert "| prompts generated per rank | sequences scored per rank |" in phases
    assert "| 12 / 8 | — |" in next(r for r in phases.splitlines() if r.startswith("| iter2/generate"))
    assert "| — | 80 / 80 |" in next(r for r in phases.splitlines() if r.startswith("| iter2/score_samples"))
    assert f"{root}/iter_3/policy" in md.split("## Final policy", 1)[1].split("##", 1)[0]


def test_early_converged_run(tmp_path):
    expect = make_run(tmp_path, converge_at=3)
    md = _read(write_report(str(tmp_path)))
    rep = json.loads(_read(tmp_path / "report" / "report.json"))
    it3 = rep["iterations"][2]
    assert it3["status"] == "converged (review only)"
    assert it3["jaccard"] == pytest.approx(expect[3]["jaccard"])
    assert it3["pairs_trained"] is None and it3["bootstrapped_pairs"] is None
    assert rep["converged_at"] == 3 and rep["final_policy"].endswith("iter_2/policy")
    assert len(_table_rows(md, "Iterations")) == 3
    assert "converged at iteration 3" in md
    assert rep["suspicious_pairs"]["iteration"] == 3
    for name in PLOTS:
        _check_png(str(tmp_path / "report" / f"{name}.png"))


def test_stats_recomputed_from_files(tmp_path):
    """With the state's per-phase statistics gone, the numbers come from the iteration files."""
    expect = make_run(tmp_path)
    state = json.loads(_read(tmp_path / "sera_state.json"))
    state["iterations"] = {}
    (tmp_path / "sera_state.json").write_text(json.dumps(state))
    by_t = {it["iteration"]: it for it in build_report(str(tmp_path))["iterations"]}
    for t in (2, 3):
        for key in ("offline_kept", "kept_share", "mean_kept_irm", "jaccard", "pairs_trained", "generated",
                    "truncated_share", "bootstrapped_pairs", "final_loss", "final_acc"):
            value = expect[t][key]
            assert by_t[t][key] == (pytest.approx(value) if value is not None else None), (t, key)


def test_first_iteration_only_skips_empty_plots(tmp_path):
    make_run(tmp_path)
    state = json.loads(_read(tmp_path / "sera_state.json"))
    state.update(done=["iter1/train"], iterations={"1": state["iterations"]["1"]}, final_policy=None)
    (tmp_path / "sera_state.json").write_text(json.dumps(state))
    for t in (2, 3):
        for name in os.listdir(tmp_path / f"iter_{t}"):
            p = tmp_path / f"iter_{t}" / name
            if p.is_file():
                p.unlink()
        os.remove(tmp_path / f"iter_{t}" / "policy" / "train_log.jsonl")
    # a stale plot from an earlier render must not survive
    os.makedirs(tmp_path / "report")
    (tmp_path / "report" / "irm_hist.png").write_bytes(b"stale")
    md = _read(write_report(str(tmp_path)))
    assert sorted(os.listdir(tmp_path / "report")) == ["report.json", "report.md", "training.png"]
    assert "](training.png)" in md and "irm_hist.png" not in md
    assert "No self-review has run yet" in md and "not finished" in md


def test_cli(tmp_path, capsys):
    assert report_main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such run directory" in err and str(tmp_path / "nope") in err and len(err.strip().splitlines()) == 1
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sera_state.json" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "sera_state.json").write_text(json.dumps({"config": {}, "done": [], "iterations": {},
                                                          "final_policy": None}))
    assert report_main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report" / "report.md")
    assert "No policy has been trained yet" in (tmp_path / "report" / "report.md").read_text()
