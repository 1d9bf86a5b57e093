"""Fluency-floor phase (design §1b guard, run once): sample from the initial policy π0, score the samples under
the initial reference, and fix the floor at --sera.fluency_quantile of their mean per-token log-prob. Every later
pair phase drops samples below this fixed floor (and below --sera.fluency_floor, if given), so a batch of
degenerate samples can no longer pass a floor derived from itself."""

from __future__ import annotations

import torch

from sera_openrlhf.generation import GenerationConfig
from sera_openrlhf.phases import RunContext
from sera_openrlhf.phases.generate import iteration_prompts


def needed(ctx: RunContext) -> bool:
    b = ctx.cfg.bootstrap
    return not b.no_fluency_guard and b.fluency_floor is None


def run(ctx: RunContext) -> dict:
    b = ctx.cfg.bootstrap
    prompts = iteration_prompts(ctx, 1)
    config = GenerationConfig.from_bootstrap(b, seed=ctx.phase_seed(1, 8))
    samples = ctx.backend.generate(ctx.layout.policy(0), [p["prompt"] for p in prompts], config,
                                   [p["id"] for p in prompts])
    rows = [{"prompt_ids": smp.prompt_ids, "token_ids": smp.token_ids} for group in samples for smp in group]
    logps, n_tokens = ctx.backend.sequence_logps({ctx.layout.initial_reference: ["init"]}, rows)
    per_token = torch.tensor(logps["init"], dtype=torch.float64) / torch.tensor(n_tokens, dtype=torch.float64)
    per_token = per_token[torch.isfinite(per_token)]
    floor = torch.quantile(per_token, b.fluency_quantile).item() if per_token.numel() else None
    return {"floor": floor, "quantile": b.fluency_quantile, "n_samples": int(per_token.numel()),
            "policy": "initial", "mean_token_logp": per_token.mean().item() if per_token.numel() else None}
