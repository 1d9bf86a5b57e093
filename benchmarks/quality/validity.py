"""Validity checks of a quality testbed: can it rank methods at all? Pure Python, no torch.

A testbed has signal for self-review only if (1) label noise measurably hurts (gold-label DPO beats noisy-label
DPO, non-overlapping 95 % intervals), (2) a DPO policy's implicit reward orders held-out pairs as gold does
(>= 60 %), and (3) a DPO policy trained without a pair can tell, from its implicit reward margin, whether that
pair's label was flipped (out-of-fold AUROC above 0.5 with its interval). `tests/test_quality_benchmark.py` runs
these on synthetic inputs whose answer is known.
"""

from __future__ import annotations

import random

ORDER_MIN = 0.60


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def bootstrap(stat, n: int, n_boot: int = 2000, seed: int = 0):
    """Percentile 95 % interval of stat(indices) over n_boot resamples (with replacement) of range(n)."""
    rng = random.Random(seed)
    vals = sorted(v for v in (stat([rng.randrange(n) for _ in range(n)]) for _ in range(n_boot)) if v == v)
    if not vals:  # e.g. an AUROC whose resamples never hold both classes
        return float("nan"), float("nan")
    return vals[int(0.025 * len(vals))], vals[int(0.975 * len(vals)) - 1]


def auroc(scores, labels) -> float:
    """P(score of a positive > score of a negative), ties 1/2 (Mann-Whitney); NaN without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    ranked = sorted(scores)
    rank = {}
    i = 0
    while i < len(ranked):  # average ranks of ties
        j = i
        while j < len(ranked) and ranked[j] == ranked[i]:
            j += 1
        rank[ranked[i]] = (i + j + 1) / 2
        i = j
    r_pos = sum(rank[s] for s in pos)
    return (r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def interval(per_unit, seeds_means=None, seed: int = 0):
    """(mean, lo, hi) of a quality measure. With >= 2 seeds: Student-t over the seeds' means (seeds_means);
    with one: a bootstrap over the units (prompts) of that seed."""
    if seeds_means is not None and len(seeds_means) >= 2:
        from metrics import mean_ci

        return mean_ci(seeds_means)
    m = mean(per_unit)
    lo, hi = bootstrap(lambda idx: mean(per_unit[i] for i in idx), len(per_unit), seed=seed)
    return m, lo, hi


def check_label_noise_hurts(clean, noisy, clean_seeds=None, noisy_seeds=None) -> dict:
    """Check 1: gold-label DPO's guarded gold beats noisy-label DPO's with non-overlapping 95 % intervals.
    clean/noisy: per-prompt guarded gold of one seed (pooled over seeds: the per-seed means go in *_seeds)."""
    c, n = interval(clean, clean_seeds, seed=1), interval(noisy, noisy_seeds, seed=2)
    return {"clean": {"mean": c[0], "lo": c[1], "hi": c[2]}, "noisy": {"mean": n[0], "lo": n[1], "hi": n[2]},
            "over": "seeds" if clean_seeds and len(clean_seeds) >= 2 else "prompts (one seed)",
            "pass": c[1] is not None and n[2] is not None and c[1] > n[2]}


def check_reward_orders_pairs(margins, gaps) -> dict:
    """Check 2: share of held-out gold pairs (chosen = higher gold) whose implicit reward margin is > 0 (ties
    1/2), overall and on the larger- and smaller-gold-gap halves; passes at >= ORDER_MIN overall."""
    if len(margins) != len(gaps) or not margins:
        raise ValueError("check_reward_orders_pairs needs one margin per held-out pair")
    hit = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    order = sorted(range(len(gaps)), key=lambda i: gaps[i])
    small, large = order[: len(order) // 2], order[len(order) // 2:]
    acc = mean(hit)
    lo, hi = bootstrap(lambda idx: mean(hit[i] for i in idx), len(hit), seed=3)
    return {"accuracy": acc, "lo": lo, "hi": hi, "n": len(hit), "larger_gap_half": mean(hit[i] for i in large),
            "smaller_gap_half": mean(hit[i] for i in small), "threshold": ORDER_MIN, "pass": acc >= ORDER_MIN}


def check_flip_detection(oof_margins, flipped) -> dict:
    """Check 3: out-of-fold AUROC of -IRM at finding the flipped pairs of the noisy set, with a bootstrap 95 %
    interval; passes when the interval lies above 0.5 (self-review has a signal to use)."""
    if len(oof_margins) != len(flipped):
        raise ValueError("check_flip_detection needs one margin per pair")
    neg = [-m for m in oof_margins]
    a = auroc(neg, flipped)
    lo, hi = bootstrap(lambda idx: auroc([neg[i] for i in idx], [flipped[i] for i in idx]), len(neg), seed=4)
    return {"auroc": a, "lo": lo, "hi": hi, "n": len(neg), "n_flipped": int(sum(bool(f) for f in flipped)),
            "pass": lo == lo and lo > 0.5}


def verdict(checks: dict) -> dict:
    """All checks pass -> the testbed can rank methods; else say which failed."""
    failed = [name for name, c in checks.items() if not c.get("pass")]
    return {"has_signal": not failed, "failed": failed,
            "message": "testbed has signal: all validity checks pass" if not failed else
            f"testbed has no signal (failed: {', '.join(failed)}): methods are not ranked"}
