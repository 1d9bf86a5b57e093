"""Pure parts of the alignment-quality benchmark: loading gold/spurious callables, label corruption, metrics.

No torch and no training here, so `tests/test_quality_benchmark.py` can check all of it in seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import random
import statistics

# ------------------------------------------------------------------------------------------- callables


def load_callable(spec: str):
    """`module:function` or `path/to/file.py:function` -> the callable."""
    if ":" not in spec:
        raise ValueError(f"{spec!r}: expected module:function or file.py:function")
    target, attr = spec.rsplit(":", 1)
    if target.endswith(".py") or os.path.sep in target:
        if not os.path.exists(target):
            raise ValueError(f"{spec!r}: no such file {target}")
        name = "_quality_user_" + os.path.splitext(os.path.basename(target))[0]
        mod_spec = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {attr} is not a callable of {target}")
    return fn


_VADER = None


def vader_gold(prompt: str, response: str) -> float:
    """Default gold reward: VADER compound sentiment of the response in [-1, 1]; positive is better."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return float(_VADER.polarity_scores(response)["compound"])


SMALL_GAP = 0.1


def prefer_longer(prompt: str, a: str, b: str, gold_a: float, gold_b: float):
    """Default spurious feature: when the gold gap is small (< 0.1), the longer response (in words) is preferred.

    Returns 0 (a preferred), 1 (b preferred) or None (the rule does not apply; the gold label stands).
    """
    if abs(gold_a - gold_b) >= SMALL_GAP:
        return None
    la, lb = len(a.split()), len(b.split())
    if la == lb:
        return None
    return 0 if la > lb else 1


def no_spurious(prompt: str, a: str, b: str, gold_a: float, gold_b: float):
    """No spurious rule: every label not flipped keeps its gold label (with `--flip-share 0.5`, labels that carry
    no signal at all)."""
    return None


# ------------------------------------------------------------------------------------------- corruption


def label_pairs(items, gold_fn, spurious_fn, flip_share: float, seed: int):
    """Label sampled response pairs by the gold reward, then inject known defects.

    items: [{"id", "prompt", "a", "b"}]; pairs whose two responses have exactly equal gold carry no gold
    preference and are dropped (returned count in `info`).
    Order: (1) gold label; (2) exactly round(flip_share * n) pairs, drawn at random, get the gold label swapped
    (`flipped`); (3) on the others, the spurious rule may override the gold label (`spurious` when it changed
    it). `gold_wrong` marks pairs whose chosen response has the lower gold.
    Returns (rows, info): rows keep prompt/chosen/rejected plus gold_chosen, gold_rejected, flipped, spurious,
    gold_wrong.
    """
    if not 0.0 <= flip_share <= 1.0:
        raise ValueError(f"flip_share must be in [0, 1], got {flip_share}")
    scored, ties = [], 0
    for it in items:
        ga, gb = float(gold_fn(it["prompt"], it["a"])), float(gold_fn(it["prompt"], it["b"]))
        if ga == gb:
            ties += 1
            continue
        scored.append((it, ga, gb))
    rng = random.Random(seed)
    n_flip = round(flip_share * len(scored))
    flip_idx = set(rng.sample(range(len(scored)), n_flip))
    rows = []
    for n, (it, ga, gb) in enumerate(scored):
        win = 0 if ga > gb else 1  # gold label
        flipped = spurious = False
        if n in flip_idx:
            win, flipped = 1 - win, True
        else:
            pick = spurious_fn(it["prompt"], it["a"], it["b"], ga, gb)
            if pick is not None and pick != win:
                win, spurious = int(pick), True
        texts, golds = (it["a"], it["b"]), (ga, gb)
        rows.append({"id": it["id"], "prompt": it["prompt"], "chosen": texts[win], "rejected": texts[1 - win],
                     "gold_chosen": golds[win], "gold_rejected": golds[1 - win], "flipped": flipped,
                     "spurious": spurious, "gold_wrong": golds[win] < golds[1 - win]})
    info = {"n_items": len(items), "n_ties_dropped": ties, "n_pairs": len(rows), "n_flipped": n_flip,
            "n_spurious": sum(r["spurious"] for r in rows), "n_gold_wrong": sum(r["gold_wrong"] for r in rows)}
    return rows, info


# ------------------------------------------------------------------------------------------- metrics


def guarded(golds, degenerate):
    """Per-output guarded gold: a degenerate output scores 0."""
    if len(golds) != len(degenerate):
        raise ValueError("golds and degenerate flags differ in length")
    return [0.0 if d else float(g) for g, d in zip(golds, degenerate)]


def guarded_gold(golds, degenerate) -> float:
    vals = guarded(golds, degenerate)
    return sum(vals) / len(vals) if vals else float("nan")


def win_rate(a, b) -> float:
    """Share of paired outputs where a beats b (ties count one half)."""
    if len(a) != len(b) or not a:
        raise ValueError("win_rate needs two non-empty lists of the same length")
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_ci(values, level: float = 0.95):
    """(mean, lo, hi): Student-t interval of the mean over seeds; lo = hi = None with fewer than 2 values."""
    if level != 0.95:
        raise ValueError("only the 95 % interval is tabulated")
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None, None
    df = len(vals) - 1
    half = _T975.get(df, 1.96) * statistics.stdev(vals) / math.sqrt(len(vals))
    return m, m - half, m + half


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0):
    """Percentile 95 % bootstrap interval of a mean (over prompts, within one seed)."""
    vals = [float(v) for v in values]
    if not vals:
        return None, None
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(vals) for _ in vals) / len(vals) for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def dropped_corruption(review_rows, pair_flags: dict) -> dict:
    """Share of corrupted pairs among the dropped and the kept ones of one self-review.

    review_rows: [{"id", "kept", ...}]; pair_flags: id -> {"flipped", "spurious", "gold_wrong"}.
    """
    out = {}
    for name, sel in (("dropped", [r for r in review_rows if not r["kept"]]), ("kept", [r for r in review_rows if r["kept"]]),
                      ("all", review_rows)):
        n = len(sel)
        out[f"n_{name}"] = n
        for flag in ("flipped", "spurious", "gold_wrong"):
            k = sum(bool(pair_flags[r["id"]][flag]) for r in sel)
            out[f"{flag}_share_{name}"] = k / n if n else None
    return out


# ------------------------------------------------------------------------------------------- implicit reward probe


def reward_agreement(groups, spurious_fn=None):
    """How often a model's implicit reward orders two responses to the same prompt as gold (or a spurious rule) does.

    groups: per prompt, a list of (prompt, text, gold, reward) for its sampled responses. Every pair (i < j) of one
    prompt is compared. Returns {"gold": share of pairs with unequal gold where the reward orders them as gold
    does, "n_gold": that number of pairs, "spurious": share of pairs the spurious rule decides where the reward
    prefers the response the rule prefers, "n_spurious"}; reward ties count 1/2; None where no pair qualifies.
    """
    def half(x):
        return 1.0 if x > 0 else 0.5 if x == 0 else 0.0

    g_hits = g_n = s_hits = s_n = 0.0
    for group in groups:
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                (p, a, ga, ra), (_, b, gb, rb) = group[i], group[j]
                if ga != gb:
                    g_n += 1
                    g_hits += half((ra - rb) * (1 if ga > gb else -1))
                if spurious_fn is not None:
                    pick = spurious_fn(p, a, b, ga, gb)
                    if pick in (0, 1):
                        s_n += 1
                        s_hits += half((ra - rb) * (1 if pick == 0 else -1))
    return {"gold": g_hits / g_n if g_n else None, "n_gold": int(g_n),
            "spurious": s_hits / s_n if s_n else None, "n_spurious": int(s_n)}


def pearson(x, y):
    """Pearson correlation of two equal-length sequences; None when either is constant or shorter than 2."""
    if len(x) != len(y):
        raise ValueError(f"pearson: lengths differ ({len(x)} vs {len(y)})")
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


# ------------------------------------------------------------------------------------------- paired comparisons


def paired_bootstrap(a, b, stat, n_boot: int = 2000, seed: int = 0):
    """Percentile 95 % interval of stat(a_sample, b_sample) over prompts resampled together (paired)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs two non-empty lists of the same length")
    rng = random.Random(seed)
    vals = []
    for _ in range(n_boot):
        idx = [rng.randrange(len(a)) for _ in a]
        vals.append(stat([a[i] for i in idx], [b[i] for i in idx]))
    vals.sort()
    return vals[int(0.025 * n_boot)], vals[int(0.975 * n_boot) - 1]


def paired_difference(a, b, seed: int = 0) -> dict:
    """Mean of a - b per prompt with its paired 95 % interval, and the win rate of a over b with its interval."""
    diff = lambda x, y: sum(x) / len(x) - sum(y) / len(y)  # noqa: E731
    lo, hi = paired_bootstrap(a, b, diff, seed=seed)
    wlo, whi = paired_bootstrap(a, b, win_rate, seed=seed + 1)
    return {"diff": diff(a, b), "lo": lo, "hi": hi, "win": win_rate(a, b), "win_lo": wlo, "win_hi": whi}


# ------------------------------------------------------------------------------------------- degenerate outputs
# Independent of the product's own guard (sera_openrlhf.bootstrap.degenerate_reason): a method must not be judged
# by the predicate it may have been tuned against.

REPEAT_SHARE = 0.5
NON_ASCII_SHARE = 0.2


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0 with fewer than n + 1 words)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


def degenerate_kind(text: str, nll_init: float | None = None, nll_cap: float | None = None):
    """Why an output is degenerate, or None: empty; 'repetitive' (> half its word 3-grams repeat);
    'non_ascii' (> 20 % of characters); 'implausible' (mean NLL under the initial policy above nll_cap, a
    quantile of the initial policy's own samples)."""
    if not text.strip():
        return "empty"
    if repeated_ngram_share(text) > REPEAT_SHARE:
        return "repetitive"
    if sum(ord(ch) > 127 for ch in text) > NON_ASCII_SHARE * len(text):
        return "non_ascii"
    if nll_cap is not None and nll_init is not None and nll_init > nll_cap:
        return "implausible"
    return None


def quantile(values, q: float) -> float:
    vals = sorted(float(v) for v in values if v == v)
    if not vals:
        raise ValueError("quantile of no values")
    pos = q * (len(vals) - 1)
    lo = int(pos)
    return vals[lo] + (vals[min(lo + 1, len(vals) - 1)] - vals[lo]) * (pos - lo)
