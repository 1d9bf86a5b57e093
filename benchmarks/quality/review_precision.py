"""What does bf16 rounding cost a review? (issue 23, item 1; the reason for --sera.score_precision fp32)

    python benchmarks/quality/review_precision.py --out runs/q1 --seeds 1 2 --method sera_ss_oof [--iteration 2]

Takes the review a benchmark run wrote (OUT/seed_<s>/<method>/iter_<t>/review.jsonl: each pair's implicit rewards
as the product scored them, in the run's precision) and scores the same pairs again in fp32 with the same policies
(the fold twins of a frozen review, else pi_{t-1}) against the initial model, with the benchmark's own scoring.
Reports how far the two margins agree (correlation, shared sign) and each one's flip-detection AUROC against the
flipped labels. Only a run that trained in bf16 (`sera_state.json` precision) has anything to show. Scores are
cached in OUT/seed_<s>/review_precision_cache.json; writes OUT/review_precision.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as R  # noqa: E402
import smollm2 as S  # noqa: E402
import validity as V  # noqa: E402

from sera_openrlhf.fileio import atomic_write_json, atomic_write_text  # noqa: E402


def compare(run_irm, fp32_irm, flipped) -> dict:
    """The run's margins against the fp32 ones of the same pairs: correlation, share with the same sign, the RMS
    of their difference against the spread of the margins, and each one's flip-detection AUROC with its bootstrap
    interval (validity check 3: a flipped pair should get the lower margin)."""
    diff = [a - b for a, b in zip(run_irm, fp32_irm)]
    run, fp32 = V.check_flip_detection(run_irm, flipped), V.check_flip_detection(fp32_irm, flipped)
    return {"n": len(run_irm), "corr": statistics.correlation(run_irm, fp32_irm),
            "same_sign": sum((a > 0) == (b > 0) for a, b in zip(run_irm, fp32_irm)) / len(run_irm),
            "sd_margin_fp32": statistics.pstdev(fp32_irm), "rms_difference": statistics.fmean(d * d for d in diff) ** 0.5,
            "auroc_run": run["auroc"], "auroc_run_ci": [run["lo"], run["hi"]],
            "auroc_fp32": fp32["auroc"], "auroc_fp32_ci": [fp32["lo"], fp32["hi"]]}


def scorers(run_dir, state, t, review):
    """{policy directory: [review rows it scored]} for the review of iteration t."""
    refit = state["config"]["sera"]["review_refit"]
    if any("fold" in r for r in review):
        if refit != "frozen":
            raise SystemExit(f"{run_dir}: a cross-fitted review refit every iteration ({refit}) is not supported; "
                             "use a frozen one")
        path = lambda r: os.path.join(run_dir, "iter_1", f"fold_{r['fold']}", "policy")  # noqa: E731
    elif refit == "current":
        path = lambda r: os.path.join(run_dir, f"iter_{t - 1}", "policy")  # noqa: E731
    else:
        raise SystemExit(f"{run_dir}: --sera.review_refit {refit} without folds is not supported")
    out = {}
    for r in review:
        out.setdefault(path(r), []).append(r)
    return out


def seed_result(out, seed, method, t, model):
    seed_dir = os.path.join(out, f"seed_{seed}")
    run_dir = os.path.join(seed_dir, method)
    state = json.load(open(os.path.join(run_dir, "sera_state.json")))
    pairs = {r["id"]: r for r in R.read_jsonl(os.path.join(seed_dir, "pairs.jsonl"))}
    review = R.read_jsonl(os.path.join(run_dir, f"iter_{t}", "review.jsonl"))
    cache = os.path.join(seed_dir, "review_precision_cache.json")
    fp32 = {}
    init = S.logps_cache(cache, "init", model, list(pairs.values()))
    init = {i: (c, r) for i, c, r in zip(pairs, *init)}
    for policy, rows in scorers(run_dir, state, t, review).items():
        key = f"{method}/iter_{t}:{os.path.relpath(policy, run_dir)}"
        pc, pr = S.logps_cache(cache, key, policy, [pairs[r["id"]] for r in rows])
        for r, c, j in zip(rows, pc, pr):
            fp32[r["id"]] = S.BETA * ((c - init[r["id"]][0]) - (j - init[r["id"]][1]))
    ids = [r["id"] for r in review]
    res = compare([r["irm"] for r in review], [fp32[i] for i in ids], [bool(pairs[i]["flipped"]) for i in ids])
    return {"seed": seed, "precision": (state.get("precision") or {}).get("choice"),
            "score_precision": state["config"]["sera"].get("score_precision", "train"), **res}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--method", default="sera_ss_oof", help="the run whose review is rescored")
    ap.add_argument("--iteration", type=int, default=2, help="the review of this iteration (>= 2)")
    ap.add_argument("--model", default=None, help="the initial policy (default: the embedded SmolLM2)")
    args = ap.parse_args(argv)
    model = S.model_dir(args.model)
    rows = [seed_result(args.out, s, args.method, args.iteration, model) for s in args.seeds]
    lines = [f"# The review of `{args.method}` (iteration {args.iteration}) as the run scored it vs in fp32", "",
             "| seed | run's precision (training / scoring) | pairs | correlation | same sign | RMS difference / SD of "
             "fp32 margins | flip AUROC as run | flip AUROC fp32 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['precision']} / {r['score_precision']} | {r['n']} | {r['corr']:.3f} | "
                     f"{r['same_sign']:.3f} | {r['rms_difference']:.3f} / {r['sd_margin_fp32']:.3f} | "
                     f"{r['auroc_run']:.3f} [{r['auroc_run_ci'][0]:.3f}, {r['auroc_run_ci'][1]:.3f}] | "
                     f"{r['auroc_fp32']:.3f} [{r['auroc_fp32_ci'][0]:.3f}, {r['auroc_fp32_ci'][1]:.3f}] |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(args.out, "review_precision.md"), text)
    atomic_write_json(os.path.join(args.out, "review_precision.json"), rows)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
