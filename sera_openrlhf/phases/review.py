"""Review phase (SeRA-SS): score every offline pair by its implicit reward margin and select.

Which policies score the pairs is --sera.review_refit: `current` π_{t-1} (in-sample); `crossfit` fold k by π_{t-1}'s
twin trained without fold k; `frozen` the iteration-1 policies (fold twins of π_1, else π_1 itself), so the
review is the same every iteration (scored at iteration 2, read back from its review.jsonl after); `prequential`
no scoring pass at all: each pair's implicit rewards in the forward of iteration 1 that first trained on it, when
the policy had not seen it yet (train_margins.jsonl).
Writes review.jsonl (every pair) and kept.jsonl (the kept pairs).
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from sera_openrlhf.calibration import flip_mixture, prior_only
from sera_openrlhf.data import PairRecord, write_pairs
from sera_openrlhf.errors import ConfigError
from sera_openrlhf.fileio import read_jsonl
from sera_openrlhf.phases import RunContext
from sera_openrlhf.selection import (SelectionConfig, SelectionResult, apply_selector, assign_folds, review_signal,
                                     selection_stats)

SCORE_COLUMNS = ("chosen_reward", "rejected_reward", "chosen_len", "rejected_len")


def folds(ctx: RunContext) -> list:
    return assign_folds([r["id"] for r in ctx.rows], ctx.cfg.review.crossfit_folds, ctx.seed)


def fold_rows(ctx: RunContext, k: int, held_out: bool) -> list:
    return [r for r, f in zip(ctx.rows, folds(ctx)) if (f == k) == held_out]


def scoring_iteration(ctx: RunContext, t: int) -> int:
    """s such that π_s (or its fold twins) scores the review of iteration t."""
    return 1 if ctx.cfg.review.review_refit == "frozen" else t - 1


def prequential(ctx: RunContext) -> dict:
    """The pair-rewards table of `score` from iteration 1's training forwards: each offline pair's first one
    (a copy `<id>#<n>` counts for its pair), scored by the policy just before it trained on the pair. A pair
    iteration 1 never trained on (the sampler drops the last incomplete micro-batch; --sera.train_pairs below
    the data size) is scored by π_1, which has not seen it either."""
    path = ctx.layout.train_margins(1)
    if not os.path.exists(path):
        raise ConfigError(f"--sera.review_refit prequential: {path} is missing (it is written by iteration 1's "
                          "training, since this version); rerun iteration 1 or use --sera.review_refit crossfit")
    if (ctx.state.stats(1).get("train") or {}).get("resumed_from_samples"):
        raise ConfigError(f"--sera.review_refit prequential: iteration 1 resumed from a DeepSpeed checkpoint mid-way, "
                          f"so {path} lacks the forwards before it; rerun iteration 1 without --ckpt.load_enable "
                          "or use --sera.review_refit crossfit")
    ids = [str(r["id"]) for r in ctx.rows]
    known, first = set(ids), {}
    for m in read_jsonl(path):  # in training order
        first.setdefault(m["id"] if m["id"] in known else m["id"].rsplit("#", 1)[0], m)
    unseen = [r for r in ctx.rows if str(r["id"]) not in first]
    if unseen:
        scored = ctx.backend.pair_rewards(ctx.layout.policy(1), ctx.layout.reference(1), unseen)
        for n, i in enumerate(scored["ids"]):
            first[i] = {k: scored[k][n] for k in SCORE_COLUMNS}
    rows = [first[i] for i in ids]
    return {"ids": ids, "too_long": [], "n_unseen": len(unseen),
            **{k: torch.tensor([float(r[k]) for r in rows], dtype=torch.float64) for k in SCORE_COLUMNS}}


def first_review_scores(ctx: RunContext) -> dict:
    """The pair-rewards table of iteration 2's review, read back from its review.jsonl (in its order)."""
    rows = read_jsonl(ctx.layout.review(2))
    scored = {r["id"] for r in rows}
    return {"ids": [r["id"] for r in rows],
            "too_long": [str(r["id"]) for r in ctx.rows if str(r["id"]) not in scored],
            **{k: torch.tensor([float(r[k]) for r in rows], dtype=torch.float64) for k in SCORE_COLUMNS}}


def score(ctx: RunContext, t: int):
    """Implicit rewards of every offline pair, and the fold of each id (empty without cross-fitting)."""
    if ctx.cfg.review.review_refit == "prequential":
        return prequential(ctx), {}
    n_folds, s = ctx.cfg.review.crossfit_folds, scoring_iteration(ctx, t)
    fold_of = dict(zip((r["id"] for r in ctx.rows), folds(ctx))) if n_folds >= 2 else {}
    if ctx.cfg.review.review_refit == "frozen" and t > 2:  # the same policies on the same pairs: same scores
        return first_review_scores(ctx), fold_of
    if n_folds >= 2:
        parts = [ctx.backend.pair_rewards(ctx.layout.fold_policy(s, k), ctx.layout.fold_reference(s, k),
                                          fold_rows(ctx, k, held_out=True)) for k in range(n_folds)]
        scores = {key: (sum((p[key] for p in parts), []) if isinstance(parts[0][key], list)
                        else torch.cat([p[key] for p in parts])) for key in parts[0]}
        return scores, fold_of
    return ctx.backend.pair_rewards(ctx.layout.policy(s), ctx.layout.reference(s), ctx.rows), {}


def read_irm(ctx: RunContext, t: int) -> dict:
    return {r["id"]: r["irm"] for r in read_jsonl(ctx.layout.review(t))}


def kept_ids(ctx: RunContext, t: int) -> list:
    return [r["id"] for r in read_jsonl(ctx.layout.review(t)) if r["kept"]]


def check_signal(ctx: RunContext, t: int, irm, out_of_fold: bool, config: SelectionConfig):
    """The out-of-fold agreement test; returns (signal stats, selector, config) with keep_all applied."""
    rc = ctx.cfg.review
    selector = rc.selector
    signal = review_signal(irm, out_of_fold=out_of_fold)
    signal["action"] = "select"
    if signal["lower_bound"] is not None and signal["lower_bound"] < rc.review_min_agreement:
        keep_all = rc.no_signal == "keep_all" and rc.select_mode != "soft"
        signal["action"] = "keep_all" if keep_all else "warned"
        advice = ("Keeping every offline pair (--sera.no_signal keep_all)." if keep_all else
                  "Train the review policies longer or on more data, or pass --sera.no_signal keep_all to keep "
                  "every pair when this happens.")
        if rc.select_mode == "soft":
            signal["action"] = "prior"
            advice = (f"Every pair gets the prior label confidence 1 - --model.label_smoothing "
                      f"({1 - ctx.flip_prior:g}): cDPO.")
        ctx.backend.print(
            f"[sera] warning: self-review has no signal at iteration {t}: the out-of-fold implicit reward "
            f"agrees with {signal['label_agreement']:.1%} of {signal['n']} labels (95 % lower bound "
            f"{signal['lower_bound']:.1%} < --sera.review_min_agreement {rc.review_min_agreement:.0%}), hardly "
            f"better than chance, so selecting by IRM is close to random subsampling. {advice}")
        if keep_all:
            selector, config = "top", replace(config, mode="top", keep_ratio=1.0, drop_negative=False)
    return signal, selector, config


def margins(ctx: RunContext, t: int, scores: dict):
    """(raw, prev, irm, window): this review's IRM [N] (per token with --sera.review_per_token), earlier reviews'
    IRMs (oldest first, NaN for a pair they lack), and the IRM selection and calibration rank by: the mean over
    the last --sera.review_average reviews (`window` of them)."""
    if ctx.cfg.review.review_per_token and not ctx.loss.length_normalized:
        raw = scores["chosen_reward"] / scores["chosen_len"] - scores["rejected_reward"] / scores["rejected_len"]
    else:
        raw = scores["chosen_reward"] - scores["rejected_reward"]
    prev = [torch.tensor([p.get(i, float("nan")) for i in scores["ids"]], dtype=torch.float64)
            for p in (read_irm(ctx, u) for u in range(2, t))]
    window = [raw.double()] + prev[::-1][:ctx.cfg.review.review_average - 1]
    irm = torch.stack(window).nanmean(0) if len(window) > 1 else raw
    return raw, prev, irm, len(window)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation of two reviews' margins over the pairs both scored: a gold-free test-retest check of
    the review (margins that are mostly noise do not repeat from one checkpoint to the next)."""
    both = ~(a.isnan() | b.isnan())
    if int(both.sum()) < 3:
        return None
    r = torch.corrcoef(torch.stack([a[both].double(), b[both].double()]))[0, 1]
    return float(r) if torch.isfinite(r) else None


def run(ctx: RunContext, t: int) -> dict:
    scores, fold_of = score(ctx, t)
    ids = scores["ids"]
    raw, prev, irm, window = margins(ctx, t, scores)
    table = {"id": ids, "irm": irm, **{k: scores[k] for k in SCORE_COLUMNS}, "irm_prev": prev}
    oos = ctx.cfg.review.out_of_sample
    signal, selector, config = check_signal(ctx, t, irm, oos, SelectionConfig.from_review(ctx.cfg.review))
    # the gold-free fit, in every mode: its flip-rate and AUROC estimates are reported and drive the adaptive share
    cal = (flip_mixture(irm, ctx.flip_prior) if signal["action"] == "select" else
           prior_only(len(ids), ctx.flip_prior, "the out-of-fold agreement test failed"))
    confidence = None
    if config.mode == "soft":  # every pair stays; its label confidence goes to the loss
        confidence = cal.confidence.tolist()
        if not oos and cal.fallback is None:
            # measured (docs/results.md): chance-level in-sample margins fit as an AUROC ~0.9 review
            ctx.backend.print(
                f"[sera] warning: iteration {t}: soft review calibrated on in-sample margins (estimated flip AUROC "
                f"{cal.est_flip_auroc:.2f}): a policy separates the pairs it trained on whatever their labels, so "
                "this estimate and the confidences overstate the review. Use --sera.review_refit crossfit (or "
                "frozen) with --sera.crossfit_folds 2 for confidences that mean something.")
        result = SelectionResult(torch.ones(len(ids), dtype=torch.bool), torch.ones(len(ids)), list(ids))
    else:
        result = apply_selector(selector, table, config)
    stats = selection_stats(table, result, previous_kept_ids=kept_ids(ctx, t - 1) if t >= 3 else None)
    stats["signal"] = signal
    stats["calibration"] = {**cal.stats(), "out_of_fold": oos, "reviews_averaged": window,
                            "previous_review_correlation": correlation(raw, prev[-1]) if prev else None}
    stats["n_prompt_too_long"] = len(scores["too_long"])
    if "n_unseen" in scores:  # prequential: pairs iteration 1 never trained on, scored by π_1
        stats["n_prequential_unseen"] = scores["n_unseen"]
    ctx.write_rows(ctx.layout.review(t), [
        {"id": i, "irm": float(raw[n]), **({"irm_averaged": float(irm[n])} if window > 1 else {}),
         "chosen_reward": float(scores["chosen_reward"][n]),
         "rejected_reward": float(scores["rejected_reward"][n]), "chosen_len": int(scores["chosen_len"][n]),
         "rejected_len": int(scores["rejected_len"][n]), "fold": fold_of.get(i),
         "kept": bool(result.kept_mask[n]), "weight": float(result.weights[n]),
         **({"confidence": confidence[n]} if confidence is not None else {})}
        for n, i in enumerate(ids)
    ])
    if ctx.backend.is_writer:
        by_id = {r["id"]: r for r in ctx.rows}
        kept = [PairRecord(id=i, prompt=by_id[i]["prompt"], chosen=by_id[i]["chosen"],
                           rejected=by_id[i]["rejected"]) for i in result.kept_ids]
        write_pairs(ctx.layout.kept(t), kept, ctx.data.prompt_key if ctx.use_prompt_key else None,
                    ctx.data.chosen_key, ctx.data.rejected_key)
    return stats


def stable(ctx: RunContext, t: int) -> bool:
    """Review t kept nearly the same set as review t-1 (Jaccard ≥ --sera.converge_jaccard) and its mean kept IRM
    rose by less than --sera.converge_min_gain."""
    if t < 3:
        return False
    now, before = ctx.state.stats(t)["review"], ctx.state.stats(t - 1)["review"]
    gain = (now["mean_irm_kept"] or 0.0) - (before["mean_irm_kept"] or 0.0)
    return (now["jaccard_previous"] is not None and now["jaccard_previous"] >= ctx.cfg.loop.converge_jaccard
            and gain < ctx.cfg.loop.converge_min_gain)


def converged(ctx: RunContext, t: int) -> bool:
    """Stable in two consecutive reviews (t-1 and t). Never with a frozen or prequential review: it cannot
    change, so its stability says nothing about the policy."""
    return ctx.cfg.review.review_refit not in ("frozen", "prequential") and stable(ctx, t - 1) and stable(ctx, t)
