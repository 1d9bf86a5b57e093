"""Train phase: the iteration's training mix (kept offline pairs with their weights + bootstrapped pairs at the
generated share) → π_t, and, for a cross-fitted review, π_t's fold twins. Writes train_set.jsonl; the policy
goes to iter_<t>/policy, the twins to iter_<t>/fold_<k>/policy."""

from __future__ import annotations

import os
import random

from sera_openrlhf.config import LoopConfig
from sera_openrlhf.errors import ConfigError
from sera_openrlhf.fileio import read_jsonl
from sera_openrlhf.phases import RunContext
from sera_openrlhf.phases.review import folds


def generated_share(loop: LoopConfig, t: int) -> float:
    """min(--sera.generated_share_max, --sera.generated_share_step · (t − 1)): 0 at iteration 1, and the same
    share at iteration t whatever --sera.iterations is."""
    return min(loop.generated_share_max, loop.generated_share_step * (t - 1))


def target_share(ctx: RunContext, t: int) -> float:
    """Iteration t's generated share: the fixed schedule, or with --sera.share_min_auroc A the previous share
    one --sera.generated_share_step up while review t's gold-free flip-AUROC estimate is at least A, one step
    down when it is lower or the review found no signal (needs review t's stats: call after the review)."""
    loop = ctx.cfg.loop
    if not loop.share_min_auroc or t == 1:
        return generated_share(loop, t)
    before = ctx.state.stats(t - 1).get("train", {}).get("generated_share_target", 0.0) if t > 2 else 0.0
    cal = ctx.state.stats(t).get("review", {}).get("calibration") or {}
    # a flip rate the IRMs cannot identify (calibration.py) leaves the AUROC estimate standing (state files
    # written before `has_signal` existed: no fallback meant a signal)
    signal = cal.get("has_signal", not cal.get("fallback"))
    judged = signal and (cal.get("est_flip_auroc") or 0.0) >= loop.share_min_auroc
    step = loop.generated_share_step if judged else -loop.generated_share_step
    return min(loop.generated_share_max, max(0.0, before + step))


def to_budget(ctx: RunContext, t: int, rows: list) -> list:
    """--sera.train_pairs N: exactly N rows, a seeded subsample of a larger mix, or whole shuffled passes over a
    smaller one plus a seeded part-pass (copies get ids `<id>#<pass>`, so every row's id stays unique)."""
    n = ctx.cfg.loop.train_pairs
    if not n or not rows or len(rows) == n:
        return rows
    rng = random.Random(ctx.phase_seed(t, 7))
    if len(rows) > n:
        keep = set(rng.sample(range(len(rows)), n))
        return [r for i, r in enumerate(rows) if i in keep]
    out = list(rows)
    while len(out) < n:
        copy = len(out) // len(rows) + 1
        extra = rng.sample(rows, min(len(rows), n - len(out)))
        out += [{**r, "id": f"{r['id']}#{copy}", "source_id": r.get("source_id", r["id"])} for r in extra]
    return out


def first_pass(ctx: RunContext) -> dict:
    """Iteration 1: the DAA on every offline pair (soft mode: each with the prior confidence, i.e. cDPO)."""
    rows = ctx.rows
    if ctx.cfg.review.select_mode == "soft":
        rows = [{**r, "confidence": 1.0 - ctx.flip_prior} for r in rows]
    rows = to_budget(ctx, 1, rows)
    ctx.write_rows(ctx.layout.train_set(1), rows)
    stats = ctx.backend.train("iter1", rows, ctx.layout.policy(0), ctx.layout.reference(1),
                              ctx.layout.policy(1))
    return {**stats, "n_offline": len(ctx.rows), "n_generated": 0, "generated_share": 0.0, "n_train_pairs": len(rows)}


def fold_twins_needed(ctx: RunContext, t: int) -> bool:
    """Does a later review read π_t's fold twins? (crossfit: review t + 1; frozen: every review, from π_1's)."""
    refit = ctx.cfg.review.review_refit
    return (refit == "crossfit" and t < ctx.cfg.loop.iterations) or (refit == "frozen" and t == 1 and
                                                                     ctx.cfg.review.crossfit_folds >= 2)


def fold_twin(ctx: RunContext, t: int, k: int) -> dict:
    """π_t's twin without offline fold k: π_t's training set minus fold k's offline pairs (bootstrapped pairs
    stay), on hard labels (no soft-mode confidence), started from π_{t−1}'s twin (`RunDir.fold_start`), so no
    policy in its chain ever trained on fold k and it scores fold k out of sample at the next review."""
    path = ctx.layout.train_set(t)
    rows = read_jsonl(path) if os.path.exists(path) else ctx.rows
    fold_of = dict(zip((r["id"] for r in ctx.rows), folds(ctx)))
    # a twin only reviews, so it learns the labels as given, without soft mode's confidences: cDPO smoothing at
    # eps 0.3 shrinks each pair's push to 0.4x and left one-epoch twins at chance (flip AUROC 0.51 vs 0.555)
    rows = [{key: v for key, v in r.items() if key != "confidence"} for r in rows
            if fold_of.get(r.get("source_id", r["id"])) != k]
    stats = ctx.backend.train(f"iter{t}_fold{k}", rows, ctx.layout.fold_start(t, k), ctx.layout.fold_reference(t, k),
                              ctx.layout.fold_policy(t, k), epochs=ctx.cfg.review.fold_epochs or None)
    return {**stats, "fold": k, "n_rows": len(rows)}


def pick_generated(ctx: RunContext, t: int, boot: list, n: int) -> list:
    """n of the bootstrapped pairs (sorted by margin): --sera.generated_pick random (seeded) or margin."""
    if n >= len(boot) or ctx.cfg.loop.generated_pick == "margin":
        return boot[:n]
    return sorted(random.Random(ctx.phase_seed(t, 6)).sample(boot, n), key=lambda b: -b["margin"])


def run(ctx: RunContext, t: int) -> dict:
    review = {r["id"]: r for r in read_jsonl(ctx.layout.review(t)) if r["weight"] > 0}
    offline = [{**r, "weight": review[r["id"]]["weight"],
                **({"confidence": review[r["id"]]["confidence"]} if "confidence" in review[r["id"]] else {})}
               for r in ctx.rows if r["id"] in review]
    path = ctx.layout.bootstrapped(t)
    boot = read_jsonl(path) if os.path.exists(path) else []  # sorted by margin
    share = target_share(ctx, t)
    n_gen = min(len(boot), round(share / (1 - share) * len(offline)))
    generated = [{"id": b["id"], "prompt": b["prompt"], "chosen": b["chosen"], "rejected": b["rejected"],
                  "weight": 1.0, "nll_coef": ctx.cfg.bootstrap.bootstrap_nll_coef,
                  **({"confidence": b["confidence"]} if "confidence" in b else {})}
                 for b in pick_generated(ctx, t, boot, n_gen)]
    rows = offline + generated
    if not rows:
        raise ConfigError(f"iteration {t} has nothing to train on: self-review kept no offline pair and "
                          "bootstrapping produced none (see the warnings above)")
    rows = to_budget(ctx, t, rows)
    ctx.write_rows(ctx.layout.train_set(t), rows)
    stats = ctx.backend.train(f"iter{t}", rows, ctx.layout.policy(t - 1), ctx.layout.reference(t),
                              ctx.layout.policy(t))
    return {**stats, "n_offline": len(offline), "n_generated": len(generated), "n_bootstrapped_pool": len(boot),
            "generated_pick": ctx.cfg.loop.generated_pick,
            "generated_share": len(generated) / max(len(offline) + len(generated), 1), "generated_share_target": share,
            "n_train_pairs": len(rows)}
