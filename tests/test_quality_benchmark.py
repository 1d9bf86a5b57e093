"""Pure parts of benchmarks/quality: callable loading, label corruption, metrics. No training here."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("quality_metrics", os.path.join(REPO, "benchmarks", "quality", "metrics.py"))
M = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(M)


def test_load_callable_from_file_and_module(tmp_path):
    f = tmp_path / "my_gold.py"
    f.write_text("def score(prompt, response):\n    return float(response.count('good'))\n")
    fn = M.load_callable(f"{f}:score")
    assert fn("p", "good good bad") == 2.0
    sys.path.insert(0, str(tmp_path))
    try:
        assert M.load_callable("my_gold:score")("p", "good") == 1.0
    finally:
        sys.path.remove(str(tmp_path))
    assert M.load_callable("os.path:join")("a", "b") == os.path.join("a", "b")
    for bad in ("no_colon", f"{f}:missing", str(tmp_path / "nope.py") + ":f"):
        with pytest.raises(ValueError):
            M.load_callable(bad)


def _gold(prompt, response):
    return float(response.count("+")) - float(response.count("-"))


def _items(n):
    # a has gold n % 5, b has gold 0 (+ one extra word so lengths differ); item 0 ties and is dropped
    return [{"id": f"i{k}", "prompt": "x", "a": "+" * (k % 5) or "z", "b": "w w"} for k in range(n)]


def test_label_pairs_exact_flips_and_flags():
    items = _items(100)
    never = lambda *a: None  # noqa: E731
    rows, info = M.label_pairs(items, _gold, never, flip_share=0.3, seed=0)
    ties = sum(1 for k in range(100) if k % 5 == 0)
    assert info["n_ties_dropped"] == ties and len(rows) == 100 - ties
    assert sum(r["flipped"] for r in rows) == round(0.3 * len(rows)) == info["n_flipped"]
    for r in rows:
        assert r["gold_wrong"] == r["flipped"]  # with no spurious rule only flips are wrong
        assert (r["gold_chosen"] < r["gold_rejected"]) == r["flipped"]
        assert not r["spurious"]
    again, _ = M.label_pairs(items, _gold, never, flip_share=0.3, seed=0)
    assert again == rows
    other, _ = M.label_pairs(items, _gold, never, flip_share=0.3, seed=1)
    assert [r["flipped"] for r in other] != [r["flipped"] for r in rows]
    with pytest.raises(ValueError):
        M.label_pairs(items, _gold, never, flip_share=1.5, seed=0)


def test_spurious_rule_prefers_longer_on_small_gap():
    assert M.prefer_longer("p", "a b c", "a", 0.50, 0.45) == 0
    assert M.prefer_longer("p", "a", "a b c", 0.50, 0.45) == 1
    assert M.prefer_longer("p", "a", "a b c", 0.90, 0.10) is None  # large gap: gold stands
    assert M.prefer_longer("p", "a b", "c d", 0.5, 0.45) is None  # equal length
    items = [{"id": "s", "prompt": "p", "a": "short", "b": "a much longer answer"},
             {"id": "g", "prompt": "p", "a": "x", "b": "a much longer answer"}]
    gold = {"short": 0.55, "a much longer answer": 0.5, "x": 0.9}
    rows, info = M.label_pairs(items, lambda p, r: gold[r], M.prefer_longer, flip_share=0.0, seed=0)
    by = {r["id"]: r for r in rows}
    assert by["s"]["spurious"] and by["s"]["gold_wrong"] and by["s"]["chosen"] == "a much longer answer"
    assert not by["g"]["spurious"] and by["g"]["chosen"] == "x"
    assert info["n_spurious"] == 1


def test_metrics_on_hand_made_inputs():
    assert M.guarded([0.5, 0.8, -0.2], [False, True, False]) == [0.5, 0.0, -0.2]
    assert M.guarded_gold([0.5, 0.8, -0.2], [False, True, False]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        M.guarded([1.0], [])
    assert M.win_rate([1, 2, 3, 0], [0, 2, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    with pytest.raises(ValueError):
        M.win_rate([1], [1, 2])
    m, lo, hi = M.mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6)
    assert hi - m == pytest.approx(4.303 * 0.1 / 3 ** 0.5)  # t(0.975, 2) * sd / sqrt(n)
    assert lo == pytest.approx(2 * m - hi)
    assert M.mean_ci([0.4]) == (0.4, None, None)
    lo, hi = M.bootstrap_ci([1.0] * 10)
    assert lo == hi == 1.0
    review = [{"id": "a", "kept": False}, {"id": "b", "kept": False}, {"id": "c", "kept": True}, {"id": "d", "kept": True}]
    flags = {"a": {"flipped": True, "spurious": False, "gold_wrong": True},
             "b": {"flipped": False, "spurious": True, "gold_wrong": True},
             "c": {"flipped": True, "spurious": False, "gold_wrong": True},
             "d": {"flipped": False, "spurious": False, "gold_wrong": False}}
    st = M.dropped_corruption(review, flags)
    assert st["flipped_share_dropped"] == 0.5 and st["gold_wrong_share_dropped"] == 1.0
    assert st["flipped_share_kept"] == 0.5 and st["n_dropped"] == 2 and st["flipped_share_all"] == 0.5


def test_gold_derived_pairs_for_the_reference_points(tmp_path):
    """dpo_oracle trains on the pairs whose label agrees with gold; dpo_clean on every pair with its gold label."""
    spec = importlib.util.spec_from_file_location("quality_run", os.path.join(REPO, "benchmarks", "quality", "run.py"))
    run = importlib.util.module_from_spec(spec)
    saved = dict(os.environ)
    try:
        spec.loader.exec_module(run)
    finally:  # run.py sets its subprocess defaults (OMP_NUM_THREADS=1, ...) at import: keep them out of the suite
        os.environ.clear()
        os.environ.update(saved)
    rows = [{"id": "ok", "prompt": "p", "chosen": "good", "rejected": "bad", "gold_chosen": 0.5, "gold_rejected": -0.5,
             "flipped": False, "spurious": False, "gold_wrong": False},
            {"id": "flip", "prompt": "p", "chosen": "awful", "rejected": "great", "gold_chosen": -0.6,
             "gold_rejected": 0.6, "flipped": True, "spurious": False, "gold_wrong": True}]
    run.write_jsonl(str(tmp_path / "pairs.jsonl"), rows)
    oracle = run.read_jsonl(run.gold_derived_pairs(str(tmp_path), "dpo_oracle"))
    assert [r["id"] for r in oracle] == ["ok"]
    clean = {r["id"]: r for r in run.read_jsonl(run.gold_derived_pairs(str(tmp_path), "dpo_clean"))}
    assert clean["ok"] == rows[0]
    assert (clean["flip"]["chosen"], clean["flip"]["rejected"]) == ("great", "awful")
    assert clean["flip"]["gold_chosen"] > clean["flip"]["gold_rejected"] and not clean["flip"]["gold_wrong"]
    cmd = run.method_command("dpo_clean", {"model_dir": "m"}, run.SIZES["small"], str(tmp_path), 0, "out")
    assert cmd[cmd.index("--data.dataset") + 1].endswith("pairs_clean.jsonl")
    assert cmd[cmd.index("--train.max_epochs") + 1] == "3" and "--sera.iterations" in cmd


def test_reward_agreement_and_pearson_hand_values():
    # one prompt, three responses: gold order c > b > a; reward order b > c > a
    group = [("p", "a", 0.0, 0.1), ("p", "bb", 0.5, 0.9), ("p", "ccc", 0.8, 0.5)]
    # gold pairs: (a,b) agree, (a,c) agree, (b,c) disagree -> 2/3
    longer = lambda p, a, b, ga, gb: 0 if len(a) > len(b) else 1  # noqa: E731
    out = M.reward_agreement([group], longer)
    assert out["gold"] == pytest.approx(2 / 3) and out["n_gold"] == 3
    # spurious picks the longer: (a,b)->b agree, (a,c)->c agree, (b,c)->c disagree
    assert out["spurious"] == pytest.approx(2 / 3) and out["n_spurious"] == 3
    tie = M.reward_agreement([[("p", "a", 0.0, 0.3), ("p", "b", 1.0, 0.3), ("p", "c", 1.0, 0.0)]])
    assert tie["gold"] == pytest.approx((0.5 + 0.0) / 2) and tie["n_gold"] == 2 and tie["spurious"] is None
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError):
        M.pearson([1], [1, 2])


# ------------------------------------------------------------------------------------------- SmolLM2 testbed


def _load(name):
    sys.path.insert(0, os.path.join(REPO, "benchmarks", "quality"))
    try:
        spec = importlib.util.spec_from_file_location(f"quality_{name}", os.path.join(REPO, "benchmarks", "quality",
                                                                                     f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks", "quality"))


V = _load("validity")


def _testbed(signal: bool, n=300, seed=0):
    """Synthetic testbed outputs: with signal, clean labels give higher gold, the implicit reward follows the gold
    gap and flipped pairs get lower out-of-fold margins; without (shuffled labels), all of it is noise."""
    import random

    rng = random.Random(seed)
    clean = [rng.gauss(0.5 if signal else 0.3, 0.3) for _ in range(n)]
    noisy = [rng.gauss(0.3, 0.3) for _ in range(n)]
    gaps = [rng.uniform(0.1, 1.5) for _ in range(n)]
    held = [rng.gauss(g if signal else 0.0, 0.8) for g in gaps]
    flipped = [rng.random() < 0.3 for _ in range(n)]
    oof = [rng.gauss(-0.5 if (f and signal) else 0.5 if signal else 0.0, 1.0) for f in flipped]
    return clean, noisy, held, gaps, oof, flipped


def test_validity_checks_pass_with_signal_and_fail_on_shuffled_labels():
    clean, noisy, held, gaps, oof, flipped = _testbed(signal=True)
    checks = {"label_noise_hurts": V.check_label_noise_hurts(clean, noisy),
              "reward_orders_heldout_pairs": V.check_reward_orders_pairs(held, gaps),
              "oof_flip_auroc": V.check_flip_detection(oof, flipped)}
    assert all(c["pass"] for c in checks.values()), checks
    assert checks["reward_orders_heldout_pairs"]["larger_gap_half"] > checks["reward_orders_heldout_pairs"]["smaller_gap_half"]
    assert checks["oof_flip_auroc"]["lo"] > 0.5 and V.verdict(checks)["has_signal"]
    clean, noisy, held, gaps, oof, flipped = _testbed(signal=False)
    checks = {"label_noise_hurts": V.check_label_noise_hurts(clean, noisy),
              "reward_orders_heldout_pairs": V.check_reward_orders_pairs(held, gaps),
              "oof_flip_auroc": V.check_flip_detection(oof, flipped)}
    assert not any(c["pass"] for c in checks.values()), checks
    assert checks["oof_flip_auroc"]["lo"] < 0.5 < checks["oof_flip_auroc"]["hi"]
    verdict = V.verdict(checks)
    assert not verdict["has_signal"] and "no signal" in verdict["message"] and len(verdict["failed"]) == 3


def test_validity_check_one_uses_seeds_when_there_are_several():
    # per-prompt values overlap heavily, but three seeds' means separate cleanly (and vice versa)
    out = V.check_label_noise_hurts([0.0, 1.0] * 5, [0.0, 1.0] * 5, [0.60, 0.61, 0.62], [0.40, 0.41, 0.42])
    assert out["pass"] and out["over"] == "seeds"
    out = V.check_label_noise_hurts([1.0] * 10, [0.0] * 10, [0.6, 0.1, 0.9], [0.4, 0.7, 0.2])
    assert not out["pass"]


def test_validity_auroc_matches_the_products():
    import random

    from sera_openrlhf.selection import auroc

    rng = random.Random(1)
    scores = [round(rng.gauss(0, 1), 1) for _ in range(200)]  # rounded: ties
    labels = [rng.random() < 0.4 for _ in scores]
    assert V.auroc(scores, labels) == pytest.approx(auroc(scores, labels))
    assert V.auroc([1.0, 2.0], [False, True]) == 1.0 and V.auroc([1.0], [True]) != V.auroc([1.0], [True])  # NaN


def test_independent_degenerate_rule_and_paired_difference():
    assert M.degenerate_kind("   ") == "empty"
    assert M.degenerate_kind("the cat sat " * 6) == "repetitive"
    assert M.degenerate_kind("a fine film with a strong cast") is None
    assert M.degenerate_kind("ééééé abc") == "non_ascii"
    assert M.degenerate_kind("a fine film", nll_init=9.0, nll_cap=5.0) == "implausible"
    assert M.degenerate_kind("a fine film", nll_init=4.0, nll_cap=5.0) is None
    assert M.repeated_ngram_share("a b c a b c") == pytest.approx(1 - 3 / 4)
    assert M.quantile([3, 1, 2, 4], 0.5) == pytest.approx(2.5)
    a, b = [1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]
    d = M.paired_difference(a, b)
    assert d["diff"] == pytest.approx(0.5) and d["win"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    assert d["lo"] <= d["diff"] <= d["hi"] and d["win_lo"] <= d["win"] <= d["win_hi"]
    same = M.paired_difference(a, a)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0  # paired: no spread when nothing differs


def test_random_selector_keeps_the_share_reproducibly():
    sel = _load("random_selector")
    from sera_openrlhf.selection import SelectionConfig

    table = {"id": [f"p{i}" for i in range(20)], "irm": [float(i) for i in range(20)]}
    cfg = SelectionConfig(keep_ratio=0.7)
    kept = sel.random_share(table, cfg)
    assert len(kept) == 14 and len(set(kept)) == 14 and kept == sel.random_share(table, cfg)
    assert sorted(kept, key=lambda x: int(x[1:])) != [f"p{i}" for i in range(6, 20)]  # not the top-IRM pairs


def _smoke_testbed(tmp_path):
    """(OUT with tiny stand-in snippets for the SmolLM2 testbed, a gold file): a keyword-sentiment gold reward."""
    import tiny

    out = tmp_path / "q"
    (out / "assets").mkdir(parents=True)
    lines = [f"{i}\t0.0\t{text} {text}" for i, text in enumerate(tiny.corpus(300, seed=3))]
    (out / "assets" / "movieReviewSnippets_GroundTruth.txt").write_text("\n".join(lines) + "\n")
    gold = tmp_path / "gold.py"
    gold.write_text("import tiny\n\ndef gold(prompt, response):\n    w = response.split()\n"
                    "    return sum((x in tiny.POSITIVE) - (x in tiny.NEGATIVE) for x in w) + 0.01 * len(w)\n")
    return out, gold


def test_smollm2_testbed_smoke_run_through_the_product(tiny_model, tmp_path):
    """`run.py --testbed smollm2 --size smoke` end to end (a tiny model stands in for SmolLM2 via --model): the
    validity block is computed and decides the exit code, every method trains on the same number of pairs, and
    a second invocation resumes from the cache without training again."""
    import subprocess

    out, gold = _smoke_testbed(tmp_path)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "quality", "run.py"), "--testbed", "smollm2", "--size",
           "smoke", "--model", tiny_model, "--out", str(out), "--methods", "dpo", "dpo_clean", "random", "sera_soft",
           "--threads",
           "1", "--precision", "fp32", "--gold", f"{gold}:gold"]
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "tests")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode in (0, 3), proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads((out / "results.json").read_text())["validity"]
    assert {"label_noise_hurts", "reward_orders_heldout_pairs", "oof_flip_auroc"} <= set(checks)
    assert checks["verdict"]["has_signal"] == (proc.returncode == 0) == all(
        checks[k]["pass"] for k in ("label_noise_hurts", "reward_orders_heldout_pairs", "oof_flip_auroc"))
    md = (out / "results.md").read_text()
    assert md.index("## Validity checks") < md.index("## Methods")
    if proc.returncode == 3:  # no signal: the other methods are not trained, and the report says why
        assert not (out / "seed_0" / "random").exists() and "not a ranking" in md
    states = {m: (out / "seed_0" / m / "sera_state.json").stat().st_mtime for m in ("dpo", "dpo_clean", "fold0")}
    again = subprocess.run(cmd + ["--rank-anyway"], capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert again.returncode == proc.returncode, again.stdout[-3000:] + again.stderr[-3000:]
    # resumed: what the first invocation trained is reused, not trained again
    assert {m: (out / "seed_0" / m / "sera_state.json").stat().st_mtime for m in states} == states
    res = json.loads((out / "results.json").read_text())
    summary = res["summary"]
    assert {"init", "dpo", "dpo_clean", "random", "sera_soft"} <= set(summary)
    pairs = {m: summary[m]["train_pairs"]["mean"] for m in ("dpo", "dpo_clean", "random")}
    n = res["per_seed"][0]["pairs"]["n_pairs"]
    assert set(pairs.values()) == {res["info"]["config"]["iterations"] * n}, pairs  # equal compute, exactly
    # the soft arm trains the same pairs plus its two iteration-1 fold twins (each on half of them)
    assert summary["sera_soft"]["train_pairs"]["mean"] == pairs["dpo"] + n, summary["sera_soft"]
    assert "vs_dpo" in summary["random"] and summary["random"]["review_auroc_first"] == summary["random"]["review_auroc_first"]
    assert "| random selection" in (out / "results.md").read_text() and (out / "results.png").exists()
    # the sweep's report on the run's own validity block and a weaker cell (a sweep run costs 4 more trainings)
    sm = _load("smollm2")
    weak = {**res["validity"], "oof_flip_auroc": {**V.check_flip_detection([0.0] * 4, [True, False] * 2)},
            "verdict": {"has_signal": False}}
    text = sm.write_sweep(str(out), [{"samples": 4, "n_prompts": 24, "n_pairs": n, "median_gold_gap": 0.5,
                                      "validity": res["per_seed"][0]["validity"]},
                                     {"samples": 2, "n_prompts": 24, "n_pairs": 4, "median_gold_gap": 0.1, "validity": weak}])
    assert "| 2 | 24 | 4 |" in text and "no signal |" in text and (out / "sweep.png").exists()


def test_smollm2_flip_share_makes_a_no_signal_set_and_guards_the_cache(tmp_path):
    """--flip-share 0.5 with --spurious metrics:no_spurious (the shuffled-label arm): exactly half the labels are
    flipped, nothing else overrides gold, so the labels carry no signal; the set records its share, and a cached
    set is refused under another share instead of being reused silently."""
    sm = _load("smollm2")
    seed_dir = tmp_path / "seed_0"
    seed_dir.mkdir()
    # cached samples (no model runs): gold = count("+") - count("-") always separates the best from the worst
    rows = [{"prompt": f"p{k}", "texts": ["+" * (k % 4 + 1), "-" * (k % 3 + 1), "x"], "token_ids": [[1], [2], [3]]}
            for k in range(21)]
    (seed_dir / "train_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"n_prompts": 21, "pair_samples": 3, "flip_share": 0.5}
    path, info = sm.build_pairs(str(seed_dir), "no-model", [r["prompt"] for r in rows], cfg, 0, _gold, M.no_spurious)
    pairs = [json.loads(line) for line in open(path)]
    assert len(pairs) == info["n_pairs"] == 21 and info["flip_share"] == 0.5
    assert sum(r["flipped"] for r in pairs) == info["n_flipped"] == round(0.5 * 21) and info["n_spurious"] == 0
    assert [r["gold_wrong"] for r in pairs] == [r["flipped"] for r in pairs]
    assert sm.build_pairs(str(seed_dir), "no-model", [], cfg, 0, _gold, M.no_spurious)[1] == info  # reused
    with pytest.raises(SystemExit, match=r"pairs_info\.json.*--flip-share 0\.5, not 0\.3"):
        sm.build_pairs(str(seed_dir), "no-model", [], {**cfg, "flip_share": 0.3}, 0, _gold, M.no_spurious)
    with pytest.raises(SystemExit, match=r"pairs_info\.json.*not 0\.3"):  # a cfg without the key: the default
        sm.build_pairs(str(seed_dir), "no-model", [], {"n_prompts": 21, "pair_samples": 3}, 0, _gold, M.no_spurious)


def test_smollm2_every_method_is_a_valid_product_command(tmp_path):
    """Each --methods arm's command parses and validates as the product's CLI would (flags, config checks, loss,
    selector) before any training: a bad flag in an arm would otherwise fail an hour into a benchmark seed."""
    from sera_openrlhf.cli.train_dpo import build_daa_loss, parse_args, sera_config

    sm = _load("smollm2")
    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n" * 10)
    for name in sm.METHODS:
        cmd = sm.command(name, "some/model", str(data), 10, sm.SIZES["smoke"], str(tmp_path), 0, str(tmp_path / name),
                         "fp32")
        argv = cmd[cmd.index("sera_openrlhf.cli.train_dpo") + 1:]
        args = parse_args(argv)
        build_daa_loss(args, sera_config(args))
        assert args.sera.enable and args.ckpt.output_dir == str(tmp_path / name), name
    assert "--sera.judge_consistency" in sm.command("sera_judge", "m", str(data), 10, sm.SIZES["smoke"], str(tmp_path),
                                                    0, "r", "fp32")


def test_review_information_on_hand_made_fold_scores(tmp_path, capsys):
    """review_information.py: uniform weights carry (sum s)^2 / N; a review that ranks every flip last makes the
    hard cut and the gold-calibrated weights beat uniform."""
    n, flips = 40, set(range(0, 40, 4))  # 10 of 40 flipped
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "flipped": i in flips}) + "\n"
                                                  for i in range(n)))
    cache = {}
    for k in (0, 1):
        ids = [i for i in range(n) if i % 2 == k]
        irm = [(-1.0 if i in flips else 1.0) * (1 + i / n) for i in ids]  # flipped pairs: negative IRM
        cache[f"fold{k}_policy"] = [[10 * v for v in irm], [0.0] * len(ids)]  # beta 0.1: IRM = 0.1 * 10 * v
        cache[f"fold{k}_init"] = [[0.0] * len(ids), [0.0] * len(ids)]
    (tmp_path / "measure_cache.json").write_text(json.dumps(cache))
    _load("review_information").main(str(tmp_path), keep=0.75)
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): float(line.split(" | ")[1]) for line in out.splitlines()
            if line.startswith("| ") and "information" not in line}
    assert "flip AUROC 1.000" in out
    assert rows["uniform: DPO, cDPO (any eps)"] == pytest.approx((30 - 10) ** 2 / 40, abs=0.05)
    assert rows["hard top 75% by IRM (SeRA-SS)"] == pytest.approx(30.0, abs=0.05)  # the 30 right labels only
    assert rows["soft, gold-calibrated logistic posterior (ceiling)"] > rows["uniform: DPO, cDPO (any eps)"]


def test_review_signal_margins_per_token_by_hand():
    rs = _load("review_signal")
    sums, lens = ([2.0, -1.0], [1.0, 1.0]), ([4, 2], [2, 1])
    assert rs.margins(sums, lens, per_token=False) == [1.0, -2.0]
    assert rs.margins(sums, lens, per_token=True) == [2 / 4 - 1 / 2, -1 / 2 - 1 / 1]


def test_review_signal_ablation_through_the_product(tiny_model, tmp_path):
    """review_signal.py end to end on the smoke size (a tiny model stands in for SmolLM2): one product run with a
    cross-fitted review gives all five review variants, each per token too; the out-of-fold ones are the
    product's own review.jsonl margins, the in-sample ones differ from them; a rerun reuses the run."""
    import subprocess

    out, gold = _smoke_testbed(tmp_path)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "quality", "review_signal.py"), "--size", "smoke",
           "--model", tiny_model, "--out", str(out), "--seeds", "0", "--threads", "1", "--precision", "fp32",
           "--gold", f"{gold}:gold"]
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "tests")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / "seed_0" / "review_signal"
    state = json.loads((run_dir / "sera_state.json").read_text())
    assert state["config"]["sera"]["review_refit"] == "crossfit" and state["final_policy"]
    res = json.loads((out / "review_signal.json").read_text())["0"]
    pairs = [json.loads(x) for x in (out / "seed_0" / "pairs.jsonl").read_text().splitlines()]
    assert res["n_pairs"] == len(pairs) and res["n_flipped"] == sum(r["flipped"] for r in pairs)
    rs = _load("review_signal")
    assert set(res["variants"]) == {f"{v}|{p}" for v in rs.variants(3) for p in (0, 1)} and len(rs.variants(3)) == 6
    for m in res["variants"].values():
        assert 0.0 <= m["auroc"] <= 1.0 and m["hard_top70"] > 0
    # the out-of-fold π1 variant is the product's t = 2 review, recomputed from its review.jsonl
    import torch

    review = {r["id"]: r for r in map(json.loads, (run_dir / "iter_2" / "review.jsonl").read_text().splitlines())}
    irm = [review[r["id"]]["irm"] for r in pairs]
    from sera_openrlhf.selection import auroc

    expect = auroc(-torch.tensor(irm), torch.tensor([r["flipped"] for r in pairs]))
    assert res["variants"]["out-of-fold π1 twins|0"]["auroc"] == pytest.approx(expect)
    # the out-of-fold test-retest correlation is the one the product itself records at t = 3
    product = state["iterations"]["3"]["review"]["calibration"]["previous_review_correlation"]
    assert res["checkpoint_correlation"]["out-of-fold π{} twins|0"] == pytest.approx(product, abs=1e-6)
    assert all(-1 <= c <= 1 for c in res["checkpoint_correlation"].values()) and len(res["checkpoint_correlation"]) == 4
    md = (out / "review_signal.md").read_text()
    assert md.count("| out-of-fold mean |") == 2 and md.count("| in-sample π1 |") == 2 and md.count("\n| ") == 1 + 12 + 1 + 4
    mtime = (run_dir / "sera_state.json").stat().st_mtime
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert again.returncode == 0 and (run_dir / "sera_state.json").stat().st_mtime == mtime
    assert json.loads((out / "review_signal.json").read_text())["0"] == res
    # three folds, one review: only pi_1 and its twins, in their own run directory and files
    k3 = subprocess.run(cmd + ["--folds", "3", "--iterations", "2"], capture_output=True, text=True, timeout=900,
                        cwd=REPO, env=env)
    assert k3.returncode == 0, k3.stdout[-3000:] + k3.stderr[-3000:]
    state = json.loads((out / "seed_0" / "review_signal_k3_t2" / "sera_state.json").read_text())
    assert state["config"]["sera"]["crossfit_folds"] == 3 and state["config"]["sera"]["iterations"] == 2
    res3 = json.loads((out / "review_signal_k3_t2.json").read_text())["0"]
    assert set(res3["variants"]) == {f"{v}|{p}" for v in ("in-sample π1", "out-of-fold π1 twins") for p in (0, 1)}
    assert {r["fold"] for r in map(json.loads, (out / "seed_0" / "review_signal_k3_t2" / "iter_2" /
                                                "review.jsonl").read_text().splitlines())} == {0, 1, 2}


def test_training_margins_review_variants_by_hand(tmp_path, capsys):
    """training_margins.py: the first forward of each pair is the prequential review (a copy `<id>#2` counts for
    its pair), later epochs and their mean are the in-sample / AUM variants, the fold runs each cover their half;
    a run that misses a pair is an error naming it."""
    tm = _load("training_margins")
    assert tm.local_rank([0.0, 1.0, 2.0, 3.0], window=2) == [0.0, 1.0, 1.0, 1.0]
    assert tm.local_rank([3.0, 2.0, 1.0], window=3) == [1.0, 0.5, 0.0]
    seed_dir = tmp_path / "seed_0"
    n, flips = 40, set(range(0, 40, 4))
    (seed_dir).mkdir()
    (seed_dir / "pairs.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "flipped": i in flips}) + "\n"
                                                  for i in range(n)))

    def write(run, rows):
        d = seed_dir / run / "iter_1" / "policy"
        d.mkdir(parents=True)
        (d / "train_margins.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def fwd(i, epoch, step, margin, copy=""):
        return {"id": f"p{i}{copy}", "epoch": epoch, "micro_step": step, "chosen_reward": margin,
                "rejected_reward": 0.0, "chosen_len": 1, "rejected_len": 1}

    # epoch 1: flipped pairs below every right one (AUROC 1); epoch 2: memorised, flipped pairs on top (AUROC 0)
    rows = [fwd(i, 0, i + 1, (-1.0 if i in flips else 1.0) * (1 + i / n)) for i in range(n)]
    rows += [fwd(i, 1, n + i + 1, (5.0 if i in flips else 2.0)) for i in range(n)]
    rows.insert(0, fwd(3, 0, 0, -9.0, copy="#2"))  # p3's first forward is its copy's (a right label scored low)
    write("dpo", rows)
    write("fold0", [fwd(i, 0, i, (-1.0 if i in flips else 1.0)) for i in range(0, n, 2)])
    write("fold1", [fwd(i, 0, i, (-1.0 if i in flips else 1.0)) for i in range(1, n, 2)])
    res = tm.seed_table(str(seed_dir), 0)["rows"]
    pre = res["offline DPO, 3 epochs: prequential"]["auroc"]
    assert pre == pytest.approx(1 - 10 / (30 * 10))  # one right label (p3) ranked below all 10 flips
    assert res["offline DPO, 3 epochs: epoch 2"]["auroc"] == 0.0
    assert res["offline DPO, 3 epochs: mean over epochs"]["auroc"] < pre
    assert res["fold twins, 3 epochs on one half each: prequential"]["auroc"] == 1.0
    assert "SeRA iteration 1: prequential" not in res  # no sera run here
    tm.main(["--seeds", "0", "--out", str(tmp_path)])
    assert "| fold twins, 3 epochs on one half each: prequential | 40 | 1.000" in capsys.readouterr().out
    (seed_dir / "fold1" / "iter_1" / "policy" / "train_margins.jsonl").write_text(
        json.dumps(fwd(1, 0, 0, 1.0)) + "\n")
    with pytest.raises(SystemExit, match="fold twins, 3 epochs on one half each: prequential covers 21 of 40 pairs"):
        tm.seed_table(str(seed_dir), 0)


def test_pooled_seeds_by_hand(tmp_path, capsys):
    """pooled_seeds.py: per-seed paired differences from the cached evaluations, pooled as their mean with the
    per-seed intervals combined (seed 0's reported numbers left out with --no-seed0)."""
    import math

    M = _load("metrics")
    ps = _load("pooled_seeds")
    gen = __import__("random").Random(0)
    evals = {}
    for seed, shift in ((1, 0.1), (2, -0.05)):
        dpo = [gen.random() for _ in range(50)]
        evals[seed] = {"dpo": dpo, "sera": [g + shift + 0.1 * gen.random() for g in dpo]}
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "measure_cache.json").write_text(json.dumps(
            {f"eval_{m}": {"guarded": g, "degenerate": [False] * 50} for m, g in evals[seed].items()}))
    ps.main(["--out", str(tmp_path), "--seeds", "1", "2", "--no-seed0"])
    out = capsys.readouterr().out
    ds = [M.paired_difference(evals[s]["sera"], evals[s]["dpo"], seed=s) for s in (1, 2)]
    mean = (ds[0]["diff"] + ds[1]["diff"]) / 2
    half = 1.96 * math.sqrt(sum(((d["hi"] - d["lo"]) / 3.92) ** 2 for d in ds)) / 2
    line = next(x for x in out.splitlines() if x.startswith("| full SeRA (defaults) − offline DPO |"))
    assert line.endswith(f"| {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] (2 seeds) |")
    assert line.startswith(f"| full SeRA (defaults) − offline DPO | {ds[0]['diff']:+.3f} [{ds[0]['lo']:+.3f}, "
                           f"{ds[0]['hi']:+.3f}] |")  # no column for seed 0's reported numbers
    ps.main(["--out", str(tmp_path), "--seeds", "1", "2"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| full SeRA (defaults) − offline DPO |"))
    s0 = ps.SEED0[("sera", "dpo")]
    assert f"| {s0[0]:+.3f} [{s0[1]:+.3f}, {s0[2]:+.3f}] | {ds[0]['diff']:+.3f}" in line and line.endswith("(3 seeds) |")


def test_judge_accuracy_by_hand(tmp_path, capsys, tiny_model):
    """judge_accuracy.py: each ensemble member's implicit reward (logp pi<k> - ref<k>), the members weighted as the
    run's pair phase weighted them, and the trained pairs, each scored against gold on the run's samples; --rescore
    scores them with another run's final policy (here the initial model itself: every reward 0, all ties)."""
    ja = _load("judge_accuracy")
    (tmp_path / "gold.py").write_text("def gold(prompt, text):\n    return float(text.split()[-1])\n")
    run = tmp_path / "seed_0" / "sera"
    (run / "iter_2").mkdir(parents=True)
    (run / "iter_1").mkdir()  # iteration 1 does not bootstrap: skipped even with samples
    golds = {"a": [0.1, 0.5, 0.9], "b": [0.3, 0.2, 0.7], "c": [0.0, 0.4, 0.8]}
    rows = [{"prompt_id": pid, "prompt": pid, "text": f"x {g}", "logp": {"pi1": g, "ref1": 0.0, "pi2": 1 - g, "ref2": 1.0},
             "prompt_ids": [5, 6], "token_ids": [7 + i, 8]} for pid, gs in golds.items() for i, g in enumerate(gs)]
    for t in (1, 2):
        (run / f"iter_{t}" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "iter_2" / "bootstrapped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "a", "chosen": "x 0.9", "rejected": "x 0.1"}, {"prompt": "b", "chosen": "x 0.2", "rejected": "x 0.7"},
        {"prompt": "c", "chosen": "x 0.8", "rejected": "x 0.0"}, {"prompt": "c", "chosen": "x 1", "rejected": "x 1"}]))
    (tmp_path / "seed_0" / "dpo").mkdir()
    (tmp_path / "seed_0" / "dpo" / "sera_state.json").write_text(json.dumps({"final_policy": tiny_model}))
    (run / "sera_state.json").write_text(json.dumps({
        "config": {"model": {"model_name_or_path": tiny_model}},
        "iterations": {"2": {"pair": {"ensemble": {"policies": [1, 2], "weights": [0.25, 0.75]}}}}}))
    res = ja.main(["--out", str(tmp_path), "--seeds", "0", "--runs", "sera", "--gold", f"{tmp_path / 'gold.py'}:gold",
                   "--rescore", "dpo", "dpo_clean"])  # no dpo_clean run here: left out
    assert list(res) == ["0/sera/2"]
    tab = res["0/sera/2"]
    assert tab["pi1"] == {"acc": 1.0, "lo": 1.0, "hi": 1.0, "n_pairs": 9, "n_prompts": 3, "extremes": 1.0}
    assert tab["pi2"]["acc"] == 0.0 and tab["ensemble"]["acc"] == 0.0  # 0.25 g - 0.75 g orders against gold
    assert tab["trained pairs"] == {"acc": 2 / 3, "n_pairs": 3}  # the gold tie is not counted
    assert tab["dpo"]["acc"] == 0.5 and "dpo_clean" not in tab
    cache = json.loads((tmp_path / "seed_0" / "judge_accuracy_cache.json").read_text())
    assert list(cache) == ["dpo:sera/iter_2/samples.jsonl"] and cache["dpo:sera/iter_2/samples.jsonl"] == [0.0] * 9
    assert "| 0 | sera | 2 | trained pairs | 0.667 | 3 | – |" in capsys.readouterr().out
    assert (tmp_path / "judge_accuracy.md").exists() and json.loads((tmp_path / "judge_accuracy.json").read_text())


def test_review_ceiling_by_hand(tmp_path, capsys):
    """review_ceiling.py: the expected flip AUROC of held-out gold margins g is P(g_i + g_j > 0) over i != j, which
    is the mean AUROC over random flips of their labels; --twins sets the fold twins' held-out strength beside
    their measured out-of-fold AUROC."""
    import random

    rc = _load("review_ceiling")
    s = rc.strength([1.0, -0.5, 2.0])
    assert s["acc"] == pytest.approx(2 / 3) and s["auroc"] == 1.0  # every sum of two margins is > 0
    assert rc.strength([1.0, -2.0, 0.5])["auroc"] == pytest.approx(1 / 3)
    assert rc.strength([1.0, -1.0])["auroc"] == 0.5  # a tie counts 1/2
    g = [random.Random(3).gauss(0.3, 1.0) for _ in range(30)]
    rng = random.Random(0)
    sims = []
    for _ in range(3000):  # flip 9 of 30 labels at random: the label margin of a flipped pair is -g
        flipped = [True] * 9 + [False] * 21
        rng.shuffle(flipped)
        sims.append(V.auroc([x if f else -x for x, f in zip(g, flipped)], flipped))  # score -(label margin)
    assert sum(sims) / len(sims) == pytest.approx(rc.strength(g)["auroc"], abs=0.005)

    seed = tmp_path / "seed_0"
    seed.mkdir()
    (tmp_path / "gold.py").write_text("def gold(prompt, text):\n    return float(text.split()[-1])\n")
    # two held-out prompts: gold-best vs gold-worst of each; a third whose samples tie on gold is dropped
    (seed / "heldout_samples.jsonl").write_text("".join(json.dumps({"prompt": p, "texts": t}) + "\n" for p, t in [
        ("a", ["x 1", "x 3", "x 2"]), ("b", ["y 5", "y 4"]), ("c", ["z 1", "w 1"])]))
    (seed / "pairs.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "flipped": f}) + "\n"
                                              for i, f in enumerate([True, False, False, True])))
    for k in (0, 1):
        (seed / f"fold{k}").mkdir()
        (seed / f"fold{k}" / "sera_state.json").write_text(json.dumps({"final_policy": "unused: cached"}))
    beta = 0.1
    cache = {"init_heldout": [[0.0, 0.0], [0.0, 0.0]],
             "heldout_dpo": [[10.0, -20.0], [0.0, 0.0]],  # margins +1, -2 (gold-oriented): acc 1/2, AUROC 0
             "heldout_cdpo": [[30.0, 0.0], [0.0, 0.0]],  # +3, 0: averaged with dpo +2, -1 (AUROC 1)
             "heldout_dpo_clean": [[-90.0, -90.0], [0.0, 0.0]],  # gold labels: left out of the average
             "heldout_fold0": [[10.0, 30.0], [0.0, 0.0]], "heldout_fold1": [[-10.0, -30.0], [0.0, 0.0]],
             # fold 0 = pairs 0 and 2, fold 1 = pairs 1 and 3; margins -1 +1 / +1 -1 against flips T F / F T
             "fold0_policy": [[-10.0, 10.0], [0.0, 0.0]], "fold0_init": [[0.0, 0.0], [0.0, 0.0]],
             "fold1_policy": [[10.0, -10.0], [0.0, 0.0]], "fold1_init": [[0.0, 0.0], [0.0, 0.0]]}
    (seed / "measure_cache.json").write_text(json.dumps(cache))
    assert rc.S.BETA == beta
    res = rc.main(["--out", str(tmp_path), "--seeds", "0", "--twins", "--gold", f"{tmp_path / 'gold.py'}:gold"])[0]
    assert res["dpo"]["acc"] == 0.5 and res["dpo"]["auroc"] == 0.0 and res["dpo"]["n"] == 2
    assert res["fold0"]["acc"] == 1.0 and res["fold0"]["auroc"] == 1.0
    assert res["fold1"]["acc"] == 0.0 and res["fold1"]["auroc"] == 0.0
    assert res["fold twins, measured out of fold"]["auroc"] == 1.0  # every flipped pair has the lower margin
    bag = res["fold0 and fold1 averaged"]  # +1, +3 and -1, -3 average to 0, 0: ties
    assert bag["acc"] == 0.5 and bag["auroc"] == 0.5 and bag["twin_correlation"] == pytest.approx(-1.0)
    mean = res["mean margin of the 2 noisy-label policies above"]
    assert mean["acc"] == 0.5 and mean["auroc"] == 1.0
    out = capsys.readouterr().out
    assert "| dpo | 0.500 [" in out and (tmp_path / "review_ceiling.md").read_text() in out
    assert "twins' margins on the held-out pairs: -1.000." in out
    (seed / "heldout_samples.jsonl").write_text(json.dumps({"prompt": "a", "texts": ["x 1", "x 3"]}) + "\n")
    with pytest.raises(SystemExit, match="1 held-out pairs rebuilt, the cache has 2"):
        rc.main(["--out", str(tmp_path), "--seeds", "0", "--twins", "--gold", f"{tmp_path / 'gold.py'}:gold"])


def test_hh_table_splits_by_seed_and_compares_pair_by_pair():
    """The HH-RLHF table: seed 0 trains on the first block, other seeds on other blocks, none on a held-out pair;
    the report's accuracies and differences from DPO come from the pair-by-pair scores (paired per seed, pooled per
    held-out pair over seeds), the product's own evaluation stands beside them."""
    sm = _load("smollm2")
    rows = [{"id": k} for k in range(50)]
    splits = [sm.hh_split(rows, 10, 12, s) for s in range(5)]
    # 3 blocks fit before the 12 held-out rows, then wrap
    assert [s[2]["train"] for s in splits] == [[[0, 10]], [[10, 20]], [[20, 30]], [[0, 10]], [[10, 20]]]
    for train, held, used in splits:
        start = used["train"][0][0]
        assert [r["id"] for r in held] == list(range(38, 50)) and [r["id"] for r in train] == list(range(start, start + 10))
        assert used["heldout"] == [38, 50]
    with pytest.raises(SystemExit, match="too few for 40 training and 12 held-out"):
        sm.hh_split(rows, 40, 12, 0)
    # one training block only (30 + 12 of 50 rows): the held-out block rotates from the end, 4 folds, then wraps
    folds = [sm.hh_split(rows, 30, 12, s) for s in range(5)]
    assert [f[2]["heldout"] for f in folds] == [[38, 50], [26, 38], [14, 26], [2, 14], [38, 50]]
    assert folds[1][2]["train"] == [[0, 26], [38, 42]] and folds[3][2]["train"] == [[0, 2], [14, 42]]
    for train, held, used in folds:
        ids = [r["id"] for r in train]
        assert len(ids) == 30 and not set(ids) & {r["id"] for r in held}
        assert [r["id"] for r in held] == list(range(*used["heldout"]))
        assert ids == [i for a, b in used["train"] for i in range(a, b)]

    def seed(s, dpo, ss):
        return {"seed": s, "n_train": 10, "train_rows": [[10 * s, 10 * s + 10]], "heldout_rows": [46, 50],
                "n_heldout": 4,
                "methods": {"dpo": {"heldout_accuracy": 0.6, "n_evaluated": 4, "correct": dpo,
                                    "per_iteration": {"1": 0.6}},
                            "sera_ss": {"heldout_accuracy": 0.6 if s == 0 else None, "n_evaluated": 4, "correct": ss,
                                        "per_iteration": {"1": 0.5, "2": 0.6}}}}

    lines = sm.hh_lines([seed(0, [1, 1, 0, 0], [1, 1, 1, 0]), seed(1, [1, 0, 0, 0], [1, 1, 1, 1])])
    dpo, ss = (next(x for x in lines if x.startswith(f"| {sm.METHODS[m][0]} |")) for m in ("dpo", "sera_ss"))
    assert "seeds 0 (pairs 0-9), 1 (pairs 10-19)" in "\n".join(lines)
    assert "| 0.500, 0.250 | 0.600, 0.600 | – | – |" in dpo and not any("cDPO" in x for x in lines)  # not run: no row
    # per seed +0.25 and +0.75; pooled: per-pair means (1, 1, 1, 0.5) - (1, 0.5, 0, 0) = +0.5
    assert "| 0.750, 1.000 | 0.600, – | +0.250 [" in ss and "| +0.500 [" in ss and "| 1: 0.500, 2: 0.600 |" in ss
    # seeds with their own held-out blocks pool their pairs side by side: the mean difference is the same as when
    # averaging per pair (equal blocks), but the Wilson interval counts 8 pairs, not 4
    rotated = [{**seed(0, [1, 1, 0, 0], [1, 1, 1, 0]), "heldout_rows": [46, 50]},
               {**seed(1, [1, 1, 1, 1], [0, 0, 0, 0]), "train_rows": [[0, 10]], "heldout_rows": [42, 46]}]
    lines = sm.hh_lines(rotated)
    ss = next(x for x in lines if x.startswith(f"| {sm.METHODS['sera_ss'][0]} |"))
    assert "seeds 0 (pairs 0-9; held out 46-49), 1 (pairs 0-9; held out 42-45)" in "\n".join(lines)
    assert "the seed's own 4 held-out pairs (8 in all)" in "\n".join(lines)
    # 3/8 - 6/8 = -0.375
    lo, hi = sm.wilson(0.375, 8)
    assert f"| 0.375 [{lo:.3f}, {hi:.3f}] | 0.750, 0.000 |" in ss and "| -0.375 [" in ss
    assert sm.wilson(0.375, 8) != sm.wilson(0.375, 4)
    # an arm run on some seeds only: "–" in its per-seed columns, its pooled difference over the seeds it ran
    partial = [seed(0, [1, 1, 0, 0], [1, 1, 1, 0]), seed(1, [1, 0, 0, 0], [1, 1, 1, 1])]
    del partial[0]["methods"]["sera_ss"]
    ss = next(x for x in sm.hh_lines(partial) if x.startswith(f"| {sm.METHODS['sera_ss'][0]} |"))
    assert "| –, 1.000 | –, – | –, +0.750 [" in ss and "| 1: 0.500, 2: 0.600 |" in ss


def test_hh_table_adds_its_methods_to_those_earlier_invocations_ran(tmp_path, monkeypatch):
    """A second invocation with other --hh-methods (e.g. another arm on some folds only) keeps the first one's
    results for the table instead of replacing them, reruns what it is asked for, and refuses an --out that holds
    another split for the seed."""
    sm = _load("smollm2")
    ran = []

    def run_method(name, cmd, run_dir, seed, env=None):
        ran.append(name)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "sera_state.json"), "w") as f:
            json.dump({"final_policy": run_dir, "iterations": {"1": {"train": {"eval": {"acc_mean": len(ran) / 10}}}}}, f)
        return run_dir, 1.0, 0

    monkeypatch.setattr(sm.R, "run_method", run_method)
    monkeypatch.setattr(sm, "hh_correct", lambda model, policy, held, cache, key: [len(ran) % 2] * len(held))
    cfg = {**sm.SIZES["default"], "hh_train": 384}
    sm.hh_table(str(tmp_path), cfg, "model", 1, 1, "fp32", ["dpo", "sera_ss_oof"])
    res = sm.hh_table(str(tmp_path), cfg, "model", 1, 1, "fp32", ["dpo", "cdpo"])
    assert ran == ["hh_dpo", "hh_sera_ss_oof", "hh_dpo", "hh_cdpo"]
    assert list(res["methods"]) == ["sera_ss_oof", "dpo", "cdpo"]
    assert res["methods"]["sera_ss_oof"]["heldout_accuracy"] == 0.2 and res["methods"]["dpo"]["heldout_accuracy"] == 0.3
    assert json.loads((tmp_path / "hh_seed_1" / "hh.json").read_text()) == res
    assert any(x.startswith(f"| {sm.METHODS['sera_ss_oof'][0]} |") for x in sm.hh_lines([res]))
    with pytest.raises(SystemExit, match=r"hh_seed_1/train.jsonl holds another HH-RLHF split than --hh-train 96"):
        sm.hh_table(str(tmp_path), {**cfg, "hh_train": 96}, "model", 1, 1, "fp32", ["dpo"])


def test_review_precision_compare_by_hand():
    """review_precision.compare: correlation, shared sign, RMS difference and both AUROCs on hand-made margins."""
    rp = _load("review_precision")
    run = [0.3, -0.1, 0.2, -0.4]
    fp32 = [0.3, 0.1, 0.2, -0.2]  # pair 1 changes sign
    flipped = [False, False, False, True]
    r = rp.compare(run, fp32, flipped)
    assert r["n"] == 4 and r["same_sign"] == 0.75
    assert r["rms_difference"] == pytest.approx(((0.2 ** 2 + 0.2 ** 2) / 4) ** 0.5)
    # deviations (0.3, -0.1, 0.2, -0.4) and (0.2, 0, 0.1, -0.3): 0.20 / sqrt(0.30 * 0.14)
    assert r["corr"] == pytest.approx(0.20 / (0.30 * 0.14) ** 0.5)
    # the flipped pair has the lowest margin both ways: AUROC 1; a flipped pair ranked second lowest: 2/3
    assert r["auroc_run"] == r["auroc_fp32"] == 1.0
    assert rp.compare(run, fp32, [False, True, False, False])["auroc_run"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("flags,match", [(["--hh-train", "0"], "--hh-train must be at least 1, got 0"),
                                         (["--hh-train", "-5"], "--hh-train must be at least 1, got -5"),
                                         (["--flip-share", "1.5"], r"--flip-share must be in \[0, 1\], got 1.5")])
def test_bad_benchmark_flags_are_refused_before_any_work(tmp_path, flags, match):
    sm = _load("smollm2")
    with pytest.raises(SystemExit, match=match):
        sm.main(["--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()
