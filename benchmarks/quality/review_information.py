"""How much label signal each way of using a review keeps, on a SmolLM2 run's out-of-fold IRMs (no training).

    python benchmarks/quality/review_information.py runs/q1/seed_0

Reads the validity check's fold runs (each half of the noisy pairs scored by a DPO policy trained on the other
half, cached in measure_cache.json) and the pairs' gold flip flags. At the start of training, a DPO-family loss
with per-pair confidence w pushes each pair with weight 2w - 1 (d/dh of w·ℓ(h) + (1 - w)·ℓ(-h) at h = 0), and a
flipped pair pushes the wrong way, so the summed gradient's signal-to-noise is (Σ (2w - 1) s)² / Σ (2w - 1)²
with s = +1 for a right label and -1 for a flipped one: the "information" below. Uniform weights (DPO, and cDPO,
which only rescales them) are the baseline; a hard cut keeps w in {0, 1} (the weight, not 2w - 1, for a dropped
pair is 0); soft weights are the product's calibration; the gold-calibrated logistic posterior is the ceiling
for weights that rise with the IRM.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

from sera_openrlhf.calibration import flip_mixture
from sera_openrlhf.selection import auroc, review_signal

BETA = 0.1


def oof_irm(seed_dir):
    cache = json.load(open(os.path.join(seed_dir, "measure_cache.json")))
    pairs = [json.loads(line) for line in open(os.path.join(seed_dir, "pairs.jsonl"))]
    irm, flipped = [], []
    for k in (0, 1):  # the validity check's folds: pair i is in fold i % 2
        (pc, pr), (ic, ir) = cache[f"fold{k}_policy"], cache[f"fold{k}_init"]
        irm += [BETA * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, ic, ir)]
        flipped += [r["flipped"] for i, r in enumerate(pairs) if i % 2 == k]
    return torch.tensor(irm, dtype=torch.float64), torch.tensor(flipped)


def information(push, s):
    return float((push * s).sum() ** 2 / (push * push).sum())


def weights_information(irm, flipped, prior=0.3, keep=0.7) -> dict:
    """{"rows": [(weights, information)], "uniform": the uniform weights' information, "fit": the ungated
    mixture fit, "gated": the product's (gated) fit} for IRMs [N] and gold flip flags [N] (bool)."""
    irm = torch.as_tensor(irm, dtype=torch.float64)
    flipped = torch.as_tensor(flipped, dtype=torch.bool)
    s = torch.where(flipped, -1.0, 1.0).double()
    n = len(irm)
    top = torch.zeros(n, dtype=torch.float64)
    top[torch.argsort(-irm)[: round(keep * n)]] = 1.0
    gated = flip_mixture(irm, prior)
    fitted = flip_mixture(irm, prior, min_shift=0.0, min_gain=float("-inf"))
    a = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a], max_iter=200)
    z = irm / irm.std()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a[0] + a[1] * z, (~flipped).double())
        loss.backward()
        return loss

    opt.step(closure)
    gold_post = torch.sigmoid(a[0] + a[1] * z).detach()
    base = information(torch.ones(n, dtype=torch.float64), s)
    rows = [("uniform: DPO, cDPO (any eps)", base),
            (f"hard top {keep:.0%} by IRM (SeRA-SS)", information(top, s)),
            ("soft, the product's calibration (gated)", information(2 * gated.confidence - 1, s)),
            ("soft, the same fit without the no-signal gate", information(2 * fitted.confidence - 1, s)),
            ("soft, gold-calibrated logistic posterior (ceiling)", information(2 * gold_post - 1, s))]
    return {"rows": rows, "uniform": base, "fit": fitted, "gated": gated}


def main(seed_dir, prior=0.3, keep=0.7):
    irm, flipped = oof_irm(seed_dir)
    n = len(irm)
    info = weights_information(irm, flipped, prior, keep)
    fitted, gated, base = info["fit"], info["gated"], info["uniform"]
    sig = review_signal(irm, out_of_fold=True)
    shift = (1 - 2 * fitted.flip_rate) * fitted.mu / fitted.sigma
    print(f"{n} pairs, {int(flipped.sum())} flipped; out-of-fold flip AUROC {auroc(-irm, flipped):.3f}; "
          f"label agreement {sig['label_agreement']:.3f} (one-sided 95 % lower bound {sig['lower_bound']:.3f})")
    print(f"mixture fit: eps {fitted.flip_rate:.3f}, mu/sigma {fitted.mu / fitted.sigma:.3f}, own AUROC estimate "
          f"{fitted.est_flip_auroc:.3f}; net shift {shift:.3f} vs the no-signal bar 2/sqrt(N) = {2 / math.sqrt(n):.3f}"
          f" -> {'fit used' if gated.fallback is None else 'falls back to cDPO'}")
    print("\n| weights | information | vs uniform |\n|---|---|---|")
    for name, v in info["rows"]:
        print(f"| {name} | {v:.1f} | {v / base:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/q1/seed_0")
