"""Score phase (SeRA-PB): log-probs of every sample's generated token ids under each ensemble member π_k, its
reference, and the initial reference (for the fluency guard). Adds them to samples.jsonl."""

from __future__ import annotations

import os

from sera_openrlhf.bootstrap import ensemble_weights
from sera_openrlhf.fileio import read_jsonl
from sera_openrlhf.phases import RunContext


def ensemble_members(ctx: RunContext, t: int) -> tuple[list, list]:
    """Indices of the trained policies π_1..π_{t-1} whose implicit rewards are ensembled (oldest first), and
    their weights."""
    b = ctx.cfg.bootstrap
    w = ensemble_weights(t - 1, b.ensemble_mode, b.ensemble_k, b.ensemble_lambda, b.ensemble_decay)
    return list(range(t - len(w), t)), w


def run(ctx: RunContext, t: int) -> dict:
    rows = read_jsonl(ctx.layout.samples(t))
    members, _ = ensemble_members(ctx, t)
    models = {f"pi{k}": ctx.layout.policy(k) for k in members}
    models.update({f"ref{k}": ctx.layout.reference(k) for k in members})
    models["init"] = ctx.layout.initial_reference
    by_path = {}  # a directory scored once even when it plays several roles (π_1 is π_2's reference, ...)
    for tag, path in models.items():
        by_path.setdefault(os.path.abspath(path) if os.path.exists(path) else path, []).append(tag)  # Hub ids stay
    logps, n_tokens = ctx.backend.sequence_logps(by_path, rows)
    for n, r in enumerate(rows):
        r["logp"] = {tag: logps[tag][n] for tag in sorted(logps)}
        r["n_tokens"] = n_tokens[n]
    ctx.write_rows(ctx.layout.samples(t), rows)
    return {"scored_under": sorted(models)}
