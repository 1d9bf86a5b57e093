"""Review from training dynamics (issue 23, item 1): how well the margins recorded while training find the
flipped labels, against the out-of-fold review, on the SmolLM2 testbed. No training of its own.

    python benchmarks/quality/training_margins.py --seeds 1 2 --out runs/q1

Reads the runs `run.py --testbed smollm2` left under OUT/seed_<s>/ (any of them that exist): `dpo` (3 epochs on
every pair), `fold0` / `fold1` (the validity check's twins, 3 epochs on one half each) and `sera` (its
iteration 1: one pass over every pair). Every training run writes `train_margins.jsonl`: each pair's implicit
rewards in the forward that trains on it, under the policy just before that step's update. So:

    prequential             the first forward (epoch 1): the policy has trained on the pairs before it in the
                            shuffled order, never on this one (what --sera.review_refit prequential reads)
    prequential, local rank the same margin as a percentile among the 64 forwards nearest in training order:
                            early in training every margin is near 0, later ones spread out
    epoch 2, epoch 3        later forwards: the policy has trained on the pair (in sample)
    mean over epochs        the margin's area under the training trajectory (AUM, dataset cartography)

and, for reference, the validity check's out-of-fold IRM (each half scored by the final twin trained on the
other half). Each row: flip-detection AUROC against the gold flip flags with its bootstrap interval, the
product's gold-free estimate, and the label information of hard and soft weights relative to uniform
(review_signal.measure). Writes OUT/training_margins.md and .json.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import metrics as M  # noqa: E402
import run as R  # noqa: E402
from review_information import oof_irm  # noqa: E402
from review_signal import measure  # noqa: E402

from sera_openrlhf.fileio import atomic_write_json, atomic_write_text  # noqa: E402

RUNS = {"dpo": "offline DPO, 3 epochs", "fold": "fold twins, 3 epochs on one half each", "sera": "SeRA iteration 1"}
WINDOW = 64


def forwards(path):
    """Training forwards of one run in training order: (id, epoch, margin)."""
    rows = sorted(R.read_jsonl(path), key=lambda m: (m["epoch"], m["micro_step"]))
    return [(m["id"].rsplit("#", 1)[0], m["epoch"], m["chosen_reward"] - m["rejected_reward"]) for m in rows]


def local_rank(margins, window=WINDOW):
    """Each margin's percentile among the `window` margins nearest to it in training order."""
    n, half = len(margins), window // 2
    out = []
    for p, m in enumerate(margins):
        lo = max(0, min(p - half, n - window))
        near = margins[lo: lo + window]
        out.append(sum(x < m for x in near) / max(len(near) - 1, 1))
    return out


def run_variants(seed_dir, name):
    """{variant: {pair id: score}} from one run (`fold`: both fold runs, each covering the half it trained on)."""
    dirs = ["fold0", "fold1"] if name == "fold" else [name]
    paths = [os.path.join(seed_dir, d, "iter_1", "policy", "train_margins.jsonl") for d in dirs]
    if not all(os.path.exists(p) for p in paths):
        return {}
    found = {}
    for path in paths:
        fw = forwards(path)
        first = {}
        for i, e, m in fw:
            first.setdefault(i, (len(first), m))
        order = sorted(first, key=lambda i: first[i][0])
        ranks = local_rank([first[i][1] for i in order])
        found.setdefault("prequential", {}).update({i: first[i][1] for i in order})
        found.setdefault("prequential, local rank", {}).update(dict(zip(order, ranks)))
        epochs = sorted({e for _, e, _ in fw})
        for e in epochs[1:]:
            found.setdefault(f"epoch {e + 1}", {}).update({i: m for i, ep, m in fw if ep == e})
        if len(epochs) > 1:
            per = {}
            for i, _, m in fw:
                per.setdefault(i, []).append(m)
            found.setdefault("mean over epochs", {}).update({i: sum(v) / len(v) for i, v in per.items()})
    return found


def seed_table(seed_dir, seed):
    """Every variant on the pairs it covers: a pair whose prompt is over --data.max_len never trains, and each
    epoch's sampler drops the last incomplete micro-batch (a different few pairs each time)."""
    pairs = R.read_jsonl(os.path.join(seed_dir, "pairs.jsonl"))
    scores = {f"{RUNS[name]}: {variant}": score for name in RUNS
              for variant, score in run_variants(seed_dir, name).items()}
    cache = os.path.join(seed_dir, "measure_cache.json")
    if os.path.exists(cache) and "fold1_policy" in json.load(open(cache)):
        irm, _ = oof_irm(seed_dir)  # the validity check's folds: pair i is in fold i % 2
        order = [r["id"] for i, r in enumerate(pairs) if i % 2 == 0] + [r["id"] for i, r in enumerate(pairs) if i % 2]
        scores["reference: out of fold (final fold twins)"] = dict(zip(order, irm.tolist()))
    rows = {}
    for name, score in scores.items():
        covered = [r for r in pairs if r["id"] in score]
        if len(covered) < 0.9 * len(pairs):
            raise SystemExit(f"training_margins: {name} covers {len(covered)} of {len(pairs)} pairs in {seed_dir}")
        rows[name] = {**measure([score[r["id"]] for r in covered], [bool(r["flipped"]) for r in covered], seed),
                      "n": len(covered)}
    return {"n_pairs": len(pairs), "n_flipped": sum(bool(r["flipped"]) for r in pairs), "rows": rows}


def report(out, per_seed):
    seeds = sorted(per_seed)
    names = [n for n in per_seed[seeds[0]]["rows"] if all(n in per_seed[s]["rows"] for s in seeds)]
    lines = [f"Seeds {', '.join(map(str, seeds))}; {', '.join(str(per_seed[s]['n_pairs']) for s in seeds)} pairs, "
             "30 % flipped (a row covers the pairs its run trained on: n, per seed). AUROC of −margin against the gold flip flags (mean over seeds [95 % t-interval]; per "
             "seed with its bootstrap interval); gold-free = the product's mixture-fit estimate; information "
             "relative to uniform weights (DPO = 1.00x), mean over seeds.", "",
             "| review | n | AUROC | per seed | gold-free estimate | hard top 70 % | soft (gated) | soft (no gate) | "
             "gold ceiling |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        ms = [per_seed[s]["rows"][n] for s in seeds]
        a, lo, hi = M.mean_ci([m["auroc"] for m in ms])
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        each = ", ".join(f"{m['auroc']:.3f} [{m['auroc_ci'][0]:.2f}, {m['auroc_ci'][1]:.2f}]" for m in ms)
        avg = lambda k: sum(m[k] for m in ms) / len(ms)  # noqa: E731
        lines.append(f"| {n} | {', '.join(str(m['n']) for m in ms)} | {a:.3f}{ci} | {each} | {avg('est_auroc'):.3f} | {avg('hard_top70'):.2f}x | "
                     f"{avg('soft'):.2f}x ({sum(m['gated'] for m in ms)}/{len(ms)} fit used) | "
                     f"{avg('soft_ungated'):.2f}x | {avg('ceiling'):.2f}x |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out, "training_margins.md"), text)
    atomic_write_json(os.path.join(out, "training_margins.json"), per_seed)
    return text


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="training_margins.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/quality_smollm2")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    per_seed = {s: seed_table(os.path.join(out, f"seed_{s}"), s) for s in args.seeds}
    if not any(t["rows"] for t in per_seed.values()):
        raise SystemExit(f"training_margins: no run with train_margins.jsonl under {out}/seed_<s>/ (run run.py "
                         "--testbed smollm2 first)")
    print(report(out, per_seed))


if __name__ == "__main__":
    main(sys.argv[1:])
