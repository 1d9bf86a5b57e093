"""Train phase: the iteration's training mix (kept offline pairs with their weights + bootstrapped pairs at the
generated share) → π_t. Writes train_set.jsonl; the policy goes to iter_<t>/policy."""

from __future__ import annotations

import os

from sera_openrlhf.config import LoopConfig
from sera_openrlhf.fileio import read_jsonl
from sera_openrlhf.phases import RunContext
from sera_openrlhf.phases.review import fold_rows


def generated_share(loop: LoopConfig, t: int) -> float:
    """Linear schedule: 0 at iteration 1, --sera.generated_share_max at the last iteration."""
    T = loop.iterations
    return 0.0 if T <= 1 else loop.generated_share_max * (t - 1) / (T - 1)


def first_pass(ctx: RunContext) -> dict:
    """Iteration 1: the DAA on every offline pair."""
    ctx.write_rows(ctx.layout.train_set(1), ctx.rows)
    stats = ctx.backend.train("iter1", ctx.rows, ctx.layout.policy(0), ctx.layout.reference(1),
                              ctx.layout.policy(1))
    return {**stats, "n_offline": len(ctx.rows), "n_generated": 0, "generated_share": 0.0}


def crossfit_fold(ctx: RunContext, k: int) -> dict:
    """Iteration 1, fold k: the review policy for fold k, trained on every other fold."""
    return ctx.backend.train("iter1", fold_rows(ctx, k, held_out=False), ctx.layout.policy(0),
                             ctx.layout.reference(1), ctx.layout.fold_policy(k))


def run(ctx: RunContext, t: int) -> dict:
    weights = {r["id"]: r["weight"] for r in read_jsonl(ctx.layout.review(t)) if r["weight"] > 0}
    offline = [{**r, "weight": weights[r["id"]]} for r in ctx.rows if r["id"] in weights]
    path = ctx.layout.bootstrapped(t)
    boot = read_jsonl(path) if os.path.exists(path) else []  # sorted by margin
    share = generated_share(ctx.cfg.loop, t)
    n_gen = min(len(boot), round(share / (1 - share) * len(offline)))
    generated = [{"id": b["id"], "prompt": b["prompt"], "chosen": b["chosen"], "rejected": b["rejected"],
                  "weight": 1.0, "nll_coef": ctx.cfg.bootstrap.bootstrap_nll_coef} for b in boot[:n_gen]]
    rows = offline + generated
    ctx.write_rows(ctx.layout.train_set(t), rows)
    stats = ctx.backend.train(f"iter{t}", rows, ctx.layout.policy(t - 1), ctx.layout.reference(t),
                              ctx.layout.policy(t))
    return {**stats, "n_offline": len(offline), "n_generated": len(generated),
            "generated_share": len(generated) / max(len(rows), 1), "generated_share_target": share}
