"""When can the soft review's calibration read a flip rate off the IRMs? A simulation, no model.

    python benchmarks/quality/calibration_identification.py [--draws 100] [--n 100 384 1500]

`--sera.select_mode soft` fits right labels' IRMs as N(mu, sigma^2) and flipped ones as N(-mu, sigma^2)
(sera_openrlhf.calibration). The flip rate eps is only visible in the IRMs' shape, so the fit is used only when the
mixture beats one Gaussian by a log-likelihood gain of at least calibration.MIN_GAIN. For IRM sets drawn from the
mixture itself (with the flip rate and review AUROC = Phi(sqrt(2) mu / sigma) in the rows) and from one Gaussian
(no flipped bump), this prints per N: how often the product uses the fit, the fitted eps without the test
(10th / 50th / 90th percentile) and the gain's median. Writes nothing; at the defaults it took about 70 min at one
thread beside three other jobs (the 1 500-pair cells dominate); `--draws 10 --n 100 384` takes 20 s.
"""

from __future__ import annotations

import argparse
import math

import torch

from sera_openrlhf.calibration import MIN_GAIN, flip_mixture

PRIOR = 0.3
CASES = [  # (label, flip rate, mu with sigma = 1)
    ("one Gaussian, mean 0.5 (no flips)", 0.0, 0.5),
    ("eps 0.3, AUROC 0.70", 0.3, math.sqrt(0.5) * 0.5244),  # Phi(sqrt(2) mu) = 0.70
    ("eps 0.3, AUROC 0.80", 0.3, math.sqrt(0.5) * 0.8416),
    ("eps 0.3, AUROC 0.92", 0.3, 1.0),
    ("eps 0.1, AUROC 0.92", 0.1, 1.0),
]


def draw(n, eps, mu, seed):
    g = torch.Generator().manual_seed(seed)
    flipped = torch.rand(n, generator=g) < eps
    irm = torch.randn(n, generator=g, dtype=torch.float64) + mu
    irm[flipped] *= -1
    return irm


def quantile(xs, p):
    xs = sorted(xs)
    return xs[round(p * (len(xs) - 1))] if xs else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--n", type=int, nargs="+", default=[100, 384, 1500])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"| IRMs | N | fit used (gain >= {MIN_GAIN}) | eps-hat without the test, p10 / p50 / p90 | median gain |")
    print("|---|---|---|---|---|")
    for label, eps, mu in CASES:
        for n in args.n:
            used, eps_hat, gains = 0, [], []
            for s in range(args.draws):
                irm = draw(n, eps, mu, 1000 * n + s)
                used += flip_mixture(irm, PRIOR).fallback is None
                free = flip_mixture(irm, PRIOR, min_shift=0.0, min_gain=float("-inf"))
                eps_hat.append(free.flip_rate)
                gains.append(free.loglik_gain)
            print(f"| {label} | {n} | {used / args.draws:.0%} | " + " / ".join(
                f"{quantile(eps_hat, p):.2f}" for p in (0.1, 0.5, 0.9)) + f" | {quantile(gains, 0.5):.2f} |")


if __name__ == "__main__":
    main()
