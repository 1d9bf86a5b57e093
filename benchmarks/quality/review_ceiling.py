"""How strong can a review by this model get? (issue 23, item 1: the out-of-fold flip AUROC >= 0.75 target)

    python benchmarks/quality/review_ceiling.py --out runs/q1 --seeds 1 2 [--twins]

A review flags a pair as flipped when its implicit reward margin is negative. Out of sample, a policy's margin on
a pair it never trained on is what it has *generalised* about the labels, and held-out gold pairs measure exactly
that. For held-out gold margins g (chosen = the gold-better response), flipping a random share of the labels turns
a pair's margin into -g, and the expected flip-detection AUROC over the random flips is, whatever the share,

    E[AUROC] = P(g_i + g_j > 0) over pairs i != j   (a flipped i and a clean j are ordered right iff -(-g_i) > -g_j),

so each final policy of the benchmark (OUT/seed_<s>/measure_cache.json: its held-out log-probs) has an expected
review strength without any training. Offline DPO on *gold* labels, trained 3 epochs on every pair, bounds what
any review by this model on this much data can reach: a fold twin trains on half the pairs with 30 % of the labels
wrong. With --twins the validity check's fold twins (OUT/seed_<s>/fold<k>) are scored on the held-out pairs too
(cached) and set beside their measured out-of-fold AUROC on the training pairs, which checks the formula.
Writes OUT/review_ceiling.md and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import metrics as M  # noqa: E402
import review_information as RI  # noqa: E402
import run as R  # noqa: E402
import smollm2 as S  # noqa: E402
import validity as V  # noqa: E402

from sera_openrlhf.fileio import atomic_write_json, atomic_write_text  # noqa: E402

N = statistics.NormalDist()


def strength(g, n_boot=1000, seed=0):
    """Gold-order accuracy of held-out margins g and the expected flip AUROC P(g_i + g_j > 0), i != j (ties 1/2),
    each with a 95 % bootstrap interval over pairs."""
    g = np.asarray(g, dtype=float)

    def stats(x):
        s = x[:, None] + x[None, :]
        u = (s > 0) + 0.5 * (s == 0)
        n = len(x)
        return float(((x > 0) + 0.5 * (x == 0)).mean()), float((u.sum() - np.trace(u)) / (n * (n - 1)))

    rng = np.random.default_rng(seed)
    boot = np.array([stats(g[rng.integers(0, len(g), len(g))]) for _ in range(n_boot)])
    acc, auc = stats(g)
    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
    return {"acc": acc, "acc_ci": [lo[0], hi[0]], "auroc": auc, "auroc_ci": [lo[1], hi[1]], "n": len(g),
            # the same under a Gaussian margin: AUROC = Phi(sqrt 2 * Phi^-1(acc))
            "gaussian_auroc": N.cdf(math.sqrt(2) * N.inv_cdf(min(max(acc, 1e-6), 1 - 1e-6)))}


def seed_rows(seed_dir, twins, gold_fn):
    cache_path = os.path.join(seed_dir, "measure_cache.json")
    cache = json.load(open(cache_path))
    init = cache["init_heldout"]
    margins = {m[len("heldout_"):]: np.asarray(S.irm(v, init)) for m, v in cache.items()
               if m.startswith("heldout_") and not m.startswith("heldout_fold")}
    out = {m: strength(g) for m, g in margins.items()}
    noisy = [m for m in margins if m != "dpo_clean"]
    if len(noisy) > 1:  # do independent training runs average out to a stronger reviewer? (bagging)
        out[f"mean margin of the {len(noisy)} noisy-label policies above"] = strength(
            np.mean([margins[m] for m in noisy], axis=0))
    if twins:
        held = S.heldout_pairs(R.read_jsonl(os.path.join(seed_dir, "heldout_samples.jsonl")), gold_fn)
        if len(held) != len(init[0]):
            raise SystemExit(f"{seed_dir}: {len(held)} held-out pairs rebuilt, the cache has {len(init[0])}")
        twin = []
        for k in (0, 1):  # twin k trained on the other fold and scored fold k (smollm2.validity)
            policy = json.load(open(os.path.join(seed_dir, f"fold{k}", "sera_state.json")))["final_policy"]
            twin.append(np.asarray(S.irm(S.logps_cache(cache_path, f"heldout_fold{k}", policy, held), init)))
            out[f"fold{k}"] = strength(twin[k])
        # a bagged review (both twins score every pair) would need twins that err apart; they share a model
        out["fold0 and fold1 averaged"] = {**strength((twin[0] + twin[1]) / 2),
                                           "twin_correlation": float(np.corrcoef(twin[0], twin[1])[0, 1])}
        oof, flipped = RI.oof_irm(seed_dir)
        out["fold twins, measured out of fold"] = V.check_flip_detection(oof.tolist(), flipped.tolist())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/q1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--twins", action="store_true", help="also score the validity check's fold twins (~2 min each)")
    ap.add_argument("--gold", default="metrics:vader_gold", help="the benchmark's --gold (rebuilds the held-out pairs "
                    "for --twins)")
    args = ap.parse_args(argv)
    gold_fn = M.load_callable(args.gold)
    res = {s: seed_rows(os.path.join(args.out, f"seed_{s}"), args.twins, gold_fn) for s in args.seeds}
    names = list(dict.fromkeys(n for r in res.values() for n in r))
    lines = [f"Seeds {', '.join(map(str, args.seeds))}: each final policy's implicit reward on the held-out gold "
             "pairs (n per seed: " + ", ".join(str(next(iter(r.values()))["n"]) for r in res.values()) + "). "
             "Expected flip AUROC = P(g_i + g_j > 0), what a review by that policy would score on pairs it never "
             "trained on, at any flip share; 95 % bootstrap intervals over pairs.", "",
             "| policy | held-out accuracy | expected flip AUROC | Gaussian AUROC from the accuracy |", "|---|---|---|---|"]
    for n in names:
        cells = [r[n] for r in res.values() if n in r]
        if "acc" not in cells[0]:
            lines.append(f"| {n} | – | " + " / ".join(f"{c['auroc']:.3f}" for c in cells) + " | – |")
            continue
        lines.append(f"| {n} | " + " / ".join(f"{c['acc']:.3f} [{c['acc_ci'][0]:.2f}, {c['acc_ci'][1]:.2f}]"
                                              for c in cells) + " | "
                     + " / ".join(f"{c['auroc']:.3f} [{c['auroc_ci'][0]:.2f}, {c['auroc_ci'][1]:.2f}]"
                                  for c in cells) + " | "
                     + " / ".join(f"{c['gaussian_auroc']:.3f}" for c in cells) + " |")
    corr = [r["fold0 and fold1 averaged"]["twin_correlation"] for r in res.values() if "fold0 and fold1 averaged" in r]
    if corr:
        lines += ["", "Correlation of the two fold twins' margins on the held-out pairs: "
                  + " / ".join(f"{c:.3f}" for c in corr) + "."]
    atomic_write_json(os.path.join(args.out, "review_ceiling.json"), {str(s): r for s, r in res.items()})
    atomic_write_text(os.path.join(args.out, "review_ceiling.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
