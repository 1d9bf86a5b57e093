"""SeRA-PB, preference bootstrapping: N sampled responses per prompt → one (chosen, rejected) pair per prompt.

Pure math on torch tensors (no openrlhf / deepspeed / transformers / vllm), so it is testable on its own.
Samples are grouped per prompt: every tensor is shaped [P, S] (P prompts, S samples each) and a boolean
`valid` [P, S] marks the usable samples.

Pipeline (the caller computes the log-probs and rewards):
  1. `ensemble_weights` + `ensemble_rewards`: r_t = Σ_k w_k · r_{θ_k} over the current and past policies (Eq. 7).
  2. `fluency_guard`: drop samples the *reference* model finds implausible, and broken text (design §1b: a literal
     SeRA hacks its own implicit reward with degenerate output, because β·log πθ/πref is largest exactly where
     the reference assigns low probability).
  3. `pairing_mask` + `fit_length_alpha` (optional, DICE): α such that ranking by r − α·len is length-neutral.
  4. `make_pairs`: chosen = argmax, rejected = argmin of r − α·len, margin filter, top-fraction cut.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

import torch

from .errors import ConfigError, NonFiniteError

# ---------------------------------------------------------------------------------------------------------------
# 1. Ensembled implicit reward (SeRA Eq. 7)
# ---------------------------------------------------------------------------------------------------------------

ENSEMBLE_MODES = ("last_k", "exp")


def ensemble_weights(
    num_policies: int, mode: str = "last_k", k: int = 2, lam: float = 0.5, decay: float = 0.5
) -> list[float]:
    """Weights of the policies whose implicit rewards are ensembled, aligned oldest → current, summing to 1.

    `num_policies` is how many policies exist so far (current included). The result covers only the policies
    that get a weight: its length is min(k, num_policies) for "last_k" and num_policies for "exp"; apply it to
    the LAST len(w) policies (so past policies outside the window need no scoring pass at all).

    - "last_k": the current policy gets `lam`, the remaining 1 − lam is split equally over the previous
      min(k, num_policies) − 1 ones. K = 2 gives (1 − λ, λ) for (previous, current). One policy → [1.0].
    - "exp": w_j ∝ decay ** age over all policies (age 0 = current), normalised; decay = 1 is a plain mean.
    """
    if num_policies < 1:
        raise ValueError(f"num_policies must be >= 1, got {num_policies}")
    if mode == "last_k":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"--sera.ensemble_k must be an integer >= 1, got {k!r}")
        if not (0.0 <= lam <= 1.0):
            raise ConfigError(f"--sera.ensemble_lambda must be in [0, 1] (weight of the current policy), got {lam!r}")
        n = min(k, num_policies)
        if n == 1:
            return [1.0]
        return [(1.0 - lam) / (n - 1)] * (n - 1) + [float(lam)]
    if mode == "exp":
        if not (0.0 < decay <= 1.0):
            raise ConfigError(f"--sera.ensemble_decay must be in (0, 1], got {decay!r}")
        raw = [decay**age for age in range(num_policies - 1, -1, -1)]  # oldest has the largest age
        total = sum(raw)
        return [w / total for w in raw]
    raise ConfigError(f"--sera.ensemble_mode must be one of {ENSEMBLE_MODES}, got {mode!r}")


def ensemble_rewards(rewards: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Weighted mean of implicit rewards over policies: [K, P, S] (oldest → current) → [P, S].

    SeRA's Eq. 7 combines the implicit rewards of the current and past policies so that the policy cannot
    reward its own drift; the paper's exact form is not public. This weighted mean is our reading of it
    (design §1, "Ensembled reward").
    """
    if rewards.dim() != 3 or rewards.shape[0] != len(weights):
        raise ValueError(f"rewards must be [K={len(weights)}, P, S], got {tuple(rewards.shape)}")
    w = torch.tensor(weights, dtype=rewards.dtype, device=rewards.device).view(-1, 1, 1)
    return (w * rewards).sum(dim=0)


def ensemble_spread(rewards: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Weighted standard deviation of implicit rewards over policies: [K, P, S] → [P, S] (0 for one policy).

    The conservative judge (--sera.judge_lambda) scores a sample pessimistically by mean ∓ λ·spread: where the
    ensemble's members disagree about a sample, the pair built on it is less trustworthy (CREAM, arXiv 2410.12735,
    weights pairs by the consistency of two iterations' rankings; pessimism over an ensemble is the same idea)."""
    mean = ensemble_rewards(rewards, weights)
    w = torch.tensor(weights, dtype=rewards.dtype, device=rewards.device).view(-1, 1, 1)
    return ((w * (rewards - mean) ** 2).sum(dim=0)).clamp_min(0).sqrt()


# ---------------------------------------------------------------------------------------------------------------
# 2. Fluency guard
# ---------------------------------------------------------------------------------------------------------------

# Thresholds of `degenerate_reason`. Each rule targets a failure seen when the policy hacks its implicit reward
# (design §1b: broken byte fragments, repetition loops); they are deliberately loose so normal text passes.
MAX_CHAR_RUN = 20  # one non-space character repeated this many times in a row ("!!!!…", "\n\n\n…")
MAX_WORD_RUN = 8  # one word / punctuation token repeated this many times in a row ("the the the …")
MIN_WORDS_FOR_RATIO = 40  # the distinct-word rule only applies to texts with at least this many words…
MIN_DISTINCT_RATIO = 0.25  # …and flags them when distinct words / words is below this (looping text)

_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")  # words, and runs of punctuation as one token
_ALLOWED_CONTROL = {"\n", "\t", "\r"}


def degenerate_reason(text: str) -> str | None:
    """Why `text` is degenerate, or None. Rules, checked in this order:

    - "empty": empty or whitespace only.
    - "invalid_char": U+FFFD (the decoder's replacement for broken byte sequences, i.e. a byte-level BPE model
      emitting fragments of a multi-byte character), a lone surrogate, or a control character other than
      \\n, \\t, \\r.
    - "char_run": one non-space character repeated >= MAX_CHAR_RUN times in a row.
    - "word_run": one token (a word, or a run of punctuation such as "!!" or "...") repeated >= MAX_WORD_RUN
      times in a row.
    - "low_diversity": >= MIN_WORDS_FOR_RATIO words and distinct/total words < MIN_DISTINCT_RATIO (a loop of a
      phrase or sentence).
    """
    if not text.strip():
        return "empty"
    for ch in text:
        if ch == "\ufffd" or (unicodedata.category(ch) in ("Cc", "Cs") and ch not in _ALLOWED_CONTROL):
            return "invalid_char"
    if re.search(r"([^ ])\1{%d,}" % (MAX_CHAR_RUN - 1), text):
        return "char_run"
    tokens = _TOKEN_RE.findall(text.lower())
    run = 1
    for prev, cur in zip(tokens, tokens[1:]):
        run = run + 1 if cur == prev else 1
        if run >= MAX_WORD_RUN:
            return "word_run"
    words = [t for t in tokens if t[0].isalnum() or t[0] == "_"]
    if len(words) >= MIN_WORDS_FOR_RATIO and len(set(words)) / len(words) < MIN_DISTINCT_RATIO:
        return "low_diversity"
    return None


def is_degenerate_text(text: str) -> bool:
    """True when `text` breaks one of the rules of `degenerate_reason` (which says which one)."""
    return degenerate_reason(text) is not None


def fluency_guard(
    ref_token_logp_mean: torch.Tensor,
    texts: list[list[str]],
    floor: float | None = None,
    floor_quantile: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Mark samples usable for bootstrapping: fluent under the REFERENCE model and valid text.

    ref_token_logp_mean: [P, S] mean per-token log-prob of each response under the reference model.
    texts: P lists of S decoded responses.
    floor: absolute floor on ref_token_logp_mean (e.g. -4.0); None = unused.
    floor_quantile: floor at this quantile of the batch's finite values (e.g. 0.1 drops the least fluent 10 %);
        None = unused. With both given the stricter (larger) floor applies.
    A sample below the floor, or with a non-finite value when a floor is set, is dropped as "low_fluency";
    `is_degenerate_text` drops it as "degenerate_text" (this reason wins when both apply, so the counts add
    up to P·S).

    Returns (valid BoolTensor [P, S], {"low_fluency": n, "degenerate_text": n, "kept": n}).
    """
    _check_texts(texts, ref_token_logp_mean.shape)
    if floor is not None and not math.isfinite(floor):
        raise ConfigError(f"--sera.fluency_floor must be a finite log-prob (e.g. -4.0), got {floor!r}")
    if floor_quantile is not None and not (0.0 < floor_quantile < 1.0):
        raise ConfigError(f"--sera.fluency_quantile must be in (0, 1), got {floor_quantile!r}")

    lp = ref_token_logp_mean.detach().double()
    degenerate = torch.tensor([[is_degenerate_text(t) for t in row] for row in texts], dtype=torch.bool)
    degenerate = degenerate.view(lp.shape).to(lp.device)

    floors = [] if floor is None else [float(floor)]
    finite = lp[torch.isfinite(lp)]
    if floor_quantile is not None and finite.numel() > 0:
        floors.append(torch.quantile(finite, floor_quantile).item())
    if floors:
        low = ~torch.isfinite(lp) | (lp < max(floors))
    else:
        low = torch.zeros_like(degenerate)
    low = low & ~degenerate
    valid = ~degenerate & ~low
    counts = {"low_fluency": int(low.sum()), "degenerate_text": int(degenerate.sum()), "kept": int(valid.sum())}
    return valid, counts


# ---------------------------------------------------------------------------------------------------------------
# 3. Pairing and DICE length de-biasing
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BootstrapPair:
    """One bootstrapped preference pair; indices point into the [P, S] sample grid."""

    prompt_index: int
    chosen_index: int
    rejected_index: int
    margin: float  # r(chosen) − r(rejected): the ensembled implicit-reward gap, before length de-biasing
    debiased_margin: float  # the same gap on r − α·len (== margin when α = 0); always >= 0


def pairing_mask(
    valid: torch.Tensor, texts: list[list[str]], truncated: torch.Tensor, drop_truncated: bool = True
) -> torch.Tensor:
    """The samples `make_pairs` chooses from: valid, not truncated (if drop_truncated), first copy of each text.

    Pass this to `fit_length_alpha` so α is fitted on exactly the samples that get paired.
    """
    _check_texts(texts, valid.shape)
    mask = valid.bool() & ~truncated.bool() if drop_truncated else valid.bool().clone()
    for p, row in enumerate(texts):
        seen = set()
        for s, text in enumerate(row):
            if mask[p, s]:
                if text in seen:
                    mask[p, s] = False  # identical texts count once
                seen.add(text)
    return mask


def _chosen_rejected(score: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row argmax / argmin of `score` [P, S] among `mask`ed entries (ties → lowest index)."""
    chosen = score.masked_fill(~mask, -math.inf).argmax(dim=1)
    rejected = score.masked_fill(~mask, math.inf).argmin(dim=1)
    return chosen, rejected


def _length_gap(rewards: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor, alpha: float) -> float:
    """Mean len(chosen) − len(rejected) over rows with >= 2 masked samples, pairing by r − α·len."""
    rows = mask.sum(dim=1) >= 2
    chosen, rejected = _chosen_rejected(rewards - alpha * lengths, mask)
    idx = torch.arange(len(rows), device=rows.device)
    gap = lengths[idx, chosen] - lengths[idx, rejected]
    return gap[rows].mean().item()


def fit_length_alpha(rewards: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor) -> float:
    """DICE-style length de-biasing (arXiv 2406.09760): the α for which pairing by r − α·len is length-neutral.

    rewards, lengths: [P, S]; valid: [P, S] samples that take part (use `pairing_mask`).
    Pairing each prompt by chosen = argmax, rejected = argmin of r − α·len, the mean length gap
    g(α) = mean(len_chosen − len_rejected) is piecewise constant and non-increasing in α: the chosen sample's
    length can only fall and the rejected one's only rise as longer responses are penalised more. It changes
    only at the breakpoints α = Δr / Δlen of same-prompt sample pairs. We bisect over those breakpoints,
    evaluating g at the midpoint of each constant segment (robust to float ties), and return the α with the
    smallest |g| (ties → smaller |α|; 0.0 when g(0) is already optimal).

    α may have either sign: α > 0 when the reward favours long responses (the usual DPO bias), α < 0 when it
    favours short ones (possible with length-normalised rewards). Deterministic; float64 throughout.
    """
    r, ln = rewards.detach().double(), lengths.detach().double()
    mask = valid.bool().to(r.device)
    if not torch.isfinite(r[mask]).all():
        raise NonFiniteError("fit_length_alpha: non-finite implicit reward on a valid sample")
    if not bool((mask.sum(dim=1) >= 2).any()):
        return 0.0
    gap0 = _length_gap(r, ln, mask, 0.0)
    if gap0 == 0.0:
        return 0.0
    sign = 1.0 if gap0 > 0 else -1.0

    # Breakpoints on the side of 0 that moves the gap toward 0, as distances t = sign·α > 0, sorted.
    d_r = r[:, :, None] - r[:, None, :]
    d_len = ln[:, :, None] - ln[:, None, :]
    pair_ok = mask[:, :, None] & mask[:, None, :] & (d_len > 0)
    t = (sign * d_r[pair_ok] / d_len[pair_ok]).unique()  # unique() sorts
    t = t[t > 0]
    if t.numel() == 0:
        return 0.0
    # One probe per constant segment (0, t1), (t1, t2), …, (tn, ∞), in increasing distance from 0.
    bounds = torch.cat([t.new_zeros(1), t])
    probes = torch.cat([(bounds[:-1] + bounds[1:]) / 2, t[-1:] * 2]).tolist()

    def g(i: int) -> float:
        return sign * _length_gap(r, ln, mask, sign * probes[i])

    # Find the first probe whose (sign-adjusted) gap is <= 0; g is non-increasing along the probes.
    lo, hi = -1, len(probes) - 1  # g(lo) > 0 (lo = -1 stands for α = 0), answer in (lo, hi]
    if g(hi) > 0:  # cannot reach 0: the most length-penalising α is the closest, if it helps at all
        return sign * probes[hi] if g(hi) < abs(gap0) else 0.0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if g(mid) > 0:
            lo = mid
        else:
            hi = mid
    before = (abs(gap0), 0.0) if lo < 0 else (abs(g(lo)), probes[lo])
    after = (abs(g(hi)), probes[hi])
    best = min(before, after)  # smaller |gap|, then smaller |α|
    return sign * best[1] if best[1] else 0.0


def make_pairs(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    valid: torch.Tensor,
    texts: list[list[str]],
    truncated: torch.Tensor,
    min_margin: float = 0.0,
    alpha: float = 0.0,
    drop_truncated: bool = True,
    top_fraction: float = 1.0,
    spread: torch.Tensor | None = None,
    judge_lambda: float = 0.0,
    members: torch.Tensor | None = None,
) -> tuple[list[BootstrapPair], dict]:
    """One (chosen, rejected) pair per prompt from S scored samples.

    rewards: [P, S] ensembled implicit rewards; lengths: [P, S] response lengths in tokens;
    valid: [P, S] usable samples (e.g. from `fluency_guard`); texts: P lists of S responses;
    truncated: [P, S] True where generation hit max_new_tokens without EOS.

    Candidates are `pairing_mask(valid, texts, truncated, drop_truncated)`. Ranking score r − α·len:
    chosen = argmax, rejected = argmin. The pair is dropped when its debiased margin (the gap in the score
    that labelled it; == margin when α = 0) is below `min_margin`, or is 0 (all candidates tie); then the
    `top_fraction` of the remaining pairs with the largest debiased margin is kept (at least one). Pairs are
    returned by prompt index.

    Conservative judge: with `spread` [P, S] (`ensemble_spread`) and judge_lambda λ > 0, chosen = argmax of
    score − λ·spread and rejected = argmin of score + λ·spread, and the debiased margin is that pessimistic gap.
    With `members` [K, P, S] (the policies' own rewards, those with weight > 0), a pair is kept only when every
    member prefers its chosen sample (unanimity; counted as `not_unanimous`).

    stats: prompts, pairs, the per-prompt reasons for no pair (too_few_valid: < 2 candidates before
    de-duplication, duplicate_texts: all candidates have the same text, below_min_margin, top_fraction_cut),
    truncated_dropped (valid samples removed for truncation), mean chosen/rejected length, mean margins, alpha.
    With no pair left, stats["no_pair_cause"] says why and which flag to change (`no_pair_cause`).
    """
    if not math.isfinite(min_margin):
        raise ConfigError(f"--sera.min_margin must be finite, got {min_margin!r}")
    if not (0.0 < top_fraction <= 1.0):
        raise ConfigError(f"--sera.pair_top_fraction must be in (0, 1], got {top_fraction!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    r, ln = rewards.detach().double(), lengths.detach().double()
    valid = valid.bool().to(r.device)
    truncated = truncated.bool().to(r.device)
    mask = pairing_mask(valid, texts, truncated, drop_truncated)
    if not torch.isfinite(r[mask]).all():
        raise NonFiniteError("make_pairs: non-finite implicit reward on a valid sample")

    n_prompts = r.shape[0]
    before_dedup = (valid & ~truncated if drop_truncated else valid).sum(dim=1)
    n_candidates = mask.sum(dim=1)
    score = r - alpha * ln
    lo = hi = score
    if spread is not None and judge_lambda > 0:
        lo, hi = score - judge_lambda * spread.double(), score + judge_lambda * spread.double()
    chosen, _ = _chosen_rejected(lo, mask)
    _, rejected = _chosen_rejected(hi, mask)

    stats = {
        "prompts": n_prompts,
        "pairs": 0,
        "too_few_valid": 0,
        "duplicate_texts": 0,
        "below_min_margin": 0,
        "top_fraction_cut": 0,
        "not_unanimous": 0,
        "truncated_dropped": int((valid & truncated).sum()) if drop_truncated else 0,
        "alpha": float(alpha),
    }
    pairs = []
    for p in range(n_prompts):
        if before_dedup[p] < 2:
            stats["too_few_valid"] += 1
            continue
        if n_candidates[p] < 2:
            stats["duplicate_texts"] += 1
            continue
        c, j = int(chosen[p]), int(rejected[p])
        pair = BootstrapPair(p, c, j, (r[p, c] - r[p, j]).item(), (lo[p, c] - hi[p, j]).item())
        if c == j or pair.debiased_margin < min_margin:  # c == j: all candidates tie, nothing to prefer
            stats["below_min_margin"] += 1
            continue
        if members is not None and not bool((members[:, p, c] > members[:, p, j]).all()):
            stats["not_unanimous"] += 1
            continue
        pairs.append(pair)

    if pairs and top_fraction < 1.0:
        n_keep = max(1, math.ceil(top_fraction * len(pairs)))
        ranked = sorted(pairs, key=lambda q: -q.debiased_margin)  # stable: ties keep prompt order
        stats["top_fraction_cut"] = len(pairs) - n_keep
        pairs = sorted(ranked[:n_keep], key=lambda q: q.prompt_index)

    stats["pairs"] = len(pairs)
    if not pairs:
        stats["no_pair_cause"] = no_pair_cause(stats, valid, truncated, drop_truncated)
        return pairs, stats
    stats["mean_chosen_length"] = sum(ln[q.prompt_index, q.chosen_index].item() for q in pairs) / len(pairs)
    stats["mean_rejected_length"] = sum(ln[q.prompt_index, q.rejected_index].item() for q in pairs) / len(pairs)
    stats["mean_margin"] = sum(q.margin for q in pairs) / len(pairs)
    stats["mean_debiased_margin"] = sum(q.debiased_margin for q in pairs) / len(pairs)
    return pairs, stats


def judge_agreement(members: torch.Tensor, weights: list[float], pairs: list[BootstrapPair]) -> list[float]:
    """The share of the ensemble, by weight, that prefers each pair's chosen sample (a tie counts half).

    members: [K, P, S] the policies' own rewards; weights: K ensemble weights (those with weight 0 do not vote).
    Used as the pair's label confidence by --sera.judge_consistency (CREAM, Wang et al. 2025: the agreement of
    the current and earlier policies' rankings regularises self-rewarding): a pair every member orders the
    same way keeps confidence 1, one they split on pushes less, or not at all at 1/2.
    """
    w = torch.tensor(weights, dtype=torch.float64)
    if w.numel() != members.shape[0] or not bool((w >= 0).all()) or float(w.sum()) <= 0:
        raise ValueError(f"judge_agreement: {members.shape[0]} members need as many non-negative weights with a "
                         f"positive sum, got {weights}")
    out = []
    for q in pairs:
        c, j = members[:, q.prompt_index, q.chosen_index], members[:, q.prompt_index, q.rejected_index]
        vote = (c > j).double() + 0.5 * (c == j).double()
        out.append(float((w * vote).sum() / w.sum()))
    return out


def no_pair_cause(stats: dict, valid: torch.Tensor, truncated: torch.Tensor, drop_truncated: bool) -> str:
    """Why no prompt gave a pair, with the flag that would change it (the dominant reason first)."""
    n = valid.numel()
    if drop_truncated and bool(truncated.all()):
        return (f"all {n} samples hit --sera.max_new_tokens without an EOS: raise --sera.max_new_tokens or pass "
                "--sera.keep_truncated")
    if int(valid.sum()) < 2 * stats["prompts"] and stats["too_few_valid"] == stats["prompts"]:
        if drop_truncated and int((valid & ~truncated).sum()) < int(valid.sum()):
            return (f"fewer than 2 usable samples per prompt: {int(truncated.sum())} of {n} samples were truncated "
                    "(--sera.max_new_tokens, --sera.keep_truncated) and the fluency guard dropped "
                    f"{n - int(valid.sum())} (--sera.fluency_floor, --sera.fluency_quantile)")
        return (f"the fluency guard left fewer than 2 of {n} samples per prompt: lower --sera.fluency_floor / "
                "--sera.fluency_quantile, or raise --sera.num_samples")
    if stats["not_unanimous"] >= max(stats["too_few_valid"], stats["below_min_margin"], stats["duplicate_texts"]):
        return ("the ensemble's policies disagree on every pair (--sera.judge_unanimous): drop the flag, or lower "
                "--sera.ensemble_k")
    if stats["duplicate_texts"] >= max(stats["too_few_valid"], stats["below_min_margin"]):
        return ("the samples of each prompt are identical: raise --sera.temperature (or --sera.top_p) or "
                "--sera.num_samples")
    if stats["below_min_margin"] >= stats["too_few_valid"]:
        return ("every pair's ensembled reward margin is below --sera.min_margin (or all rewards tie; with "
                "--sera.judge_lambda, the pessimistic margin): lower it")
    return (f"too few usable samples per prompt ({stats['too_few_valid']} of {stats['prompts']} prompts): raise "
            "--sera.num_samples or relax --sera.fluency_floor / --sera.fluency_quantile")


def _check_texts(texts: list[list[str]], shape: torch.Size) -> None:
    if len(shape) != 2 or len(texts) != shape[0] or any(len(row) != shape[1] for row in texts):
        raise ValueError(f"texts must be {tuple(shape)[0]} lists of {tuple(shape)[-1]} strings to match [P, S]")
