"""Pair phase (SeRA-PB): the ensembled implicit reward of each sample, the fluency guard (a floor fixed in
advance, see fluency.py), and one (best, worst) pair per prompt (design §1b guards: truncation, degenerate
text, min margin, DICE length de-biasing). Writes bootstrapped.jsonl sorted by margin; with no pair it warns
with the cause and the iteration trains on its offline pairs."""

from __future__ import annotations

import torch

from sera_openrlhf.bootstrap import (ensemble_rewards, ensemble_spread, fit_length_alpha, fluency_guard,
                                     judge_agreement, make_pairs, pairing_mask)
from sera_openrlhf.fileio import read_jsonl
from sera_openrlhf.phases import RunContext, as_response
from sera_openrlhf.phases.score import ensemble_members


def fixed_floor(ctx: RunContext) -> float | None:
    """--sera.fluency_floor if given, else the floor fixed once from the initial policy's samples."""
    if ctx.cfg.bootstrap.fluency_floor is not None:
        return ctx.cfg.bootstrap.fluency_floor
    return ctx.state.stats(1)["fluency_floor"]["floor"]


def run(ctx: RunContext, t: int) -> dict:
    b = ctx.cfg.bootstrap
    rows = read_jsonl(ctx.layout.samples(t))
    S = b.num_samples
    P = len(rows) // S

    def grid(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64).view(P, S)

    lengths = grid([r["n_tokens"] for r in rows])
    members, weights = ensemble_members(ctx, t)
    rewards = []
    for k in members:
        pi, ref = grid([r["logp"][f"pi{k}"] for r in rows]), grid([r["logp"][f"ref{k}"] for r in rows])
        r_k = ctx.loss.implicit_reward(pi.flatten(), ref.flatten(), lengths.flatten()).view(P, S)
        # SimPO's reward is per token already: normalising it again would divide by the length twice
        per_token = b.length_normalized_reward and not ctx.loss.length_normalized
        rewards.append(r_k / lengths if per_token else r_k)
    stacked = torch.stack(rewards)
    reward = ensemble_rewards(stacked, weights)
    texts = [[rows[p * S + j]["text"] for j in range(S)] for p in range(P)]
    truncated = torch.tensor([r["truncated"] for r in rows], dtype=torch.bool).view(P, S)
    if b.no_fluency_guard:
        valid, guard = torch.ones(P, S, dtype=torch.bool), {"off": True}
    else:
        init_mean = grid([r["logp"]["init"] for r in rows]) / lengths
        valid, guard = fluency_guard(init_mean, texts, fixed_floor(ctx))
        guard["floor"] = fixed_floor(ctx)
    alpha = 0.0
    if b.length_debias:
        alpha = fit_length_alpha(reward, lengths, pairing_mask(valid, texts, truncated, not b.keep_truncated))
    voters = stacked[torch.tensor(weights) > 0]  # a member with weight 0 does not vote
    pairs, pstats = make_pairs(reward, lengths, valid, texts, truncated, min_margin=b.min_margin, alpha=alpha,
                               drop_truncated=not b.keep_truncated, top_fraction=b.pair_top_fraction,
                               spread=ensemble_spread(stacked, weights), judge_lambda=b.judge_lambda,
                               members=voters if b.judge_unanimous else None)
    pairs = sorted(pairs, key=lambda bp: -bp.margin)
    agreement = judge_agreement(voters, [w for w in weights if w > 0], pairs) if pairs else []
    out = []
    for bp, agree in zip(pairs, agreement):
        c, r = rows[bp.prompt_index * S + bp.chosen_index], rows[bp.prompt_index * S + bp.rejected_index]
        out.append({"id": f"boot{t}-{c['prompt_id']}", "prompt": c["prompt"],
                    "chosen": as_response(c["prompt"], c["text"]), "rejected": as_response(r["prompt"], r["text"]),
                    "margin": bp.margin, "debiased_margin": bp.debiased_margin,
                    "chosen_len": c["n_tokens"], "rejected_len": r["n_tokens"], "agreement": agree,
                    **({"confidence": agree} if b.judge_consistency else {})})
    if not out:
        ctx.backend.print(f"[sera] warning: iteration {t}: bootstrapping produced no pair: {pstats['no_pair_cause']}. "
                          "This iteration trains on its kept offline pairs only.")
    ctx.write_rows(ctx.layout.bootstrapped(t), out)
    return {**pstats, "guard": guard, "alpha": alpha, "ensemble": {"policies": members, "weights": weights},
            "n_pairs": len(out), "margins": [o["margin"] for o in out],
            "mean_agreement": sum(agreement) / len(agreement) if agreement else None,
            "mean_len_chosen": sum(o["chosen_len"] for o in out) / max(len(out), 1),
            "mean_len_rejected": sum(o["rejected_len"] for o in out) / max(len(out), 1)}
