"""Probe one configuration on a seed built by run.py: does the implicit reward agree with gold?

    python benchmarks/quality/probe.py --out runs/quality --seed 0 --name cf_e3 --labels noisy -- \
        --train.max_epochs 3 --sera.iterations 2 --sera.generated_share_max 0 --sera.review_refit frozen --sera.crossfit_folds 2

Runs the product's entry point once with the benchmark's stock flags for that seed (as in run.py) plus the flags
after `--`, on the seed's pairs with their noisy labels, only the gold-agreeing ones (`oracle`) or gold labels
(`clean`). Then prints, for every self-review of the run: the share of pairs whose IRM agrees with the gold
order, the AUROC of -IRM at finding the pairs whose label contradicts gold, and the product's own signal test
(`review.signal`); and the final policy's guarded gold, degenerate share and win rates on the held-out prompts.
Writes OUT/seed_<s>/probe_<name>/probe.jsonl. Use it to find out *why* a method does or does not win.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as R  # noqa: E402

LABELS = {"noisy": None, "oracle": "dpo_oracle", "clean": "dpo_clean"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quality", help="run.py's --out (its testbed and seed must exist)")
    ap.add_argument("--size", choices=sorted(R.SIZES), default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", required=True, help="probe name: OUT/seed_<s>/probe_<name>/")
    ap.add_argument("--labels", choices=sorted(LABELS), default="noisy")
    ap.add_argument("--gold", default="metrics:vader_gold")
    args = ap.parse_args(own)
    cfg = R.SIZES[args.size]
    out = os.path.abspath(args.out)
    seed_dir = os.path.join(out, f"seed_{args.seed}")
    meta_path = os.path.join(out, "assets", "testbed.json")
    for path in (meta_path, os.path.join(seed_dir, "pairs.jsonl"), os.path.join(seed_dir, "eval.json")):
        if not os.path.exists(path):
            sys.exit(f"probe: {path} is missing; run benchmarks/quality/run.py --out {args.out} --seeds {args.seed} first")
    with open(meta_path) as f:
        meta = json.load(f)
    gold_fn = R.M.load_callable(args.gold)
    run_dir = os.path.join(seed_dir, f"probe_{args.name}")
    data = (R.gold_derived_pairs(seed_dir, LABELS[args.labels]) if LABELS[args.labels]
            else os.path.join(seed_dir, "pairs.jsonl"))
    cmd = R.method_command("sera", meta, cfg, seed_dir, args.seed, run_dir)
    cmd = cmd[:cmd.index("--train.max_epochs")] + ["--data.dataset", data] + extra  # later flags win
    state_path = os.path.join(run_dir, "sera_state.json")
    wall = None
    if not (os.path.exists(state_path) and json.load(open(state_path)).get("final_policy")):
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "command.txt"), "w") as f:
            f.write(" ".join(cmd) + "\n")
        t0 = time.time()
        with open(os.path.join(run_dir, "stdout.log"), "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=R.REPO,
                                env={**os.environ, **R.ENV}).returncode
        wall = time.time() - t0
        if rc:
            sys.exit(f"probe: the run failed (exit {rc}); see {run_dir}/stdout.log")
    with open(state_path) as f:
        state = json.load(f)

    rows = {r["id"]: r for r in R.read_jsonl(data)}
    reviews = []
    for t in sorted(int(k) for k in state.get("iterations", {})):
        path = os.path.join(run_dir, f"iter_{t}", "review.jsonl")
        if not os.path.exists(path):
            continue
        review = R.read_jsonl(path)
        gold_order = [rows[r["id"]]["gold_chosen"] > rows[r["id"]]["gold_rejected"] for r in review]
        agree = sum((r["irm"] > 0) == g for r, g in zip(review, gold_order)) / len(review)
        wrong = [not g for g in gold_order]
        reviews.append({"iteration": t, "n": len(review), "irm_agrees_with_gold": agree,
                        "auroc_gold_wrong": R._auroc([-r["irm"] for r in review], wrong) if any(wrong) else None,
                        "out_of_fold": any(r.get("fold") is not None for r in review),
                        "signal": state["iterations"][str(t)].get("review", {}).get("signal")})
    ev = R.evaluate_policy(state["final_policy"], meta["heldout_prompts"][:cfg["n_eval_prompts"]], cfg, args.seed,
                           gold_fn, meta["model_dir"])
    with open(os.path.join(seed_dir, "eval.json")) as f:
        base = json.load(f)
    n = len(ev["guarded"])
    result = {"name": args.name, "labels": args.labels, "flags": extra, "command": cmd, "wall_seconds": wall,
              "reviews": reviews, "guarded_gold": sum(ev["guarded"]) / n,
              "degenerate_share": sum(ev["degenerate"]) / n, "truncated_share": sum(ev["truncated"]) / n,
              "win_vs_init": R.M.win_rate(ev["guarded"], base["init"]["eval"]["guarded"]),
              "win_vs_dpo": R.M.win_rate(ev["guarded"], base["dpo"]["eval"]["guarded"]) if "dpo" in base else None,
              "train": {t: {k: v.get("train", {}).get(k) for k in ("n_offline", "n_generated", "loss_last")}
                        for t, v in state.get("iterations", {}).items()}}
    R.write_jsonl(os.path.join(run_dir, "probe.jsonl"), [result])
    for rv in reviews:
        sig = rv["signal"] or {}
        print(f"review {rv['iteration']}: {rv['n']} pairs, {'out-of-fold' if rv['out_of_fold'] else 'in-sample'}, "
              f"IRM agrees with gold on {rv['irm_agrees_with_gold']:.1%}, AUROC(-IRM -> gold-wrong) "
              f"{R.fmt({'mean': rv['auroc_gold_wrong'], 'lo': None}) if rv['auroc_gold_wrong'] is not None else '–'}"
              + (f", product signal: agreement with labels {sig['label_agreement']:.1%} (lower bound "
                 f"{sig['lower_bound']:.1%}), {sig.get('action')}" if sig.get("lower_bound") is not None else ""))
    print(f"final policy: guarded gold {result['guarded_gold']:.3f}, degenerate {result['degenerate_share']:.0%}, "
          f"truncated {result['truncated_share']:.0%}, win vs init {result['win_vs_init']:.3f}"
          + (f", win vs offline DPO {result['win_vs_dpo']:.3f}" if result["win_vs_dpo"] is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
