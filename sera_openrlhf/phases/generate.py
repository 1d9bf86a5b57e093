"""Generate phase (SeRA-PB): N samples per prompt from π_{t-1}, written to samples.jsonl with their token ids."""

from __future__ import annotations

import random

from sera_openrlhf.generation import GenerationConfig
from sera_openrlhf.phases import RunContext


def iteration_prompts(ctx: RunContext, t: int) -> list:
    """--sera.num_prompts prompts drawn afresh each iteration (all of them with 0)."""
    n = ctx.cfg.bootstrap.num_prompts
    if n == 0 or n >= len(ctx.prompts):
        return ctx.prompts
    return random.Random(ctx.phase_seed(t, 9)).sample(ctx.prompts, n)


def run(ctx: RunContext, t: int) -> dict:
    prompts = iteration_prompts(ctx, t)
    config = GenerationConfig.from_bootstrap(ctx.cfg.bootstrap, seed=ctx.phase_seed(t, 2))
    samples = ctx.backend.generate(ctx.layout.policy(t - 1), [p["prompt"] for p in prompts], config,
                                   [p["id"] for p in prompts])
    rows = [{"prompt_id": p["id"], "prompt": p["prompt"], "sample_index": smp.sample_index, "text": smp.text,
             "truncated": smp.truncated, "n_generated_tokens": len(smp.token_ids), "prompt_ids": smp.prompt_ids,
             "token_ids": smp.token_ids}
            for p, group in zip(prompts, samples) for smp in group]
    ctx.write_rows(ctx.layout.samples(t), rows)
    n = len(rows)
    return {"n_prompts": len(prompts), "n_samples": n,
            "truncated_share": sum(r["truncated"] for r in rows) / max(n, 1),
            "mean_generated_tokens": sum(r["n_generated_tokens"] for r in rows) / max(n, 1)}
