"""SeRA-SS: self-review of offline pairs by implicit reward margin (IRM = r(chosen) - r(rejected)).

A per-pair table (`PairTable`) is a dict of equal-length columns, N = number of pairs:
    "id": list[str], "irm": Tensor[N] float                       (required)
    "chosen_reward", "rejected_reward", "chosen_len", "rejected_len": Tensor[N]   (used by the stats if present)
    "irm_prev": list of Tensor[N], previous iterations oldest first, and any other column   (for custom selectors)

A selector is `selector(table, config) -> list[str] of kept ids | Tensor[N] of weights >= 0 (0 = dropped)`.
The built-ins ("irm", "top", "threshold") and user callbacks ("pkg.mod:fn", "/path/file.py:fn") share this
protocol and are resolved through `SELECTORS`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sera_openrlhf.config import ReviewConfig, check_group_value
from sera_openrlhf.errors import ConfigError, NonFiniteError, SelectionError
from sera_openrlhf.registry import Registry

PairTable = dict
SELECTORS = Registry("selector")


# SelectionConfig field -> its flag in config.ReviewConfig (defaults, help and checks live there)
_FLAGS = {"mode": "select_mode", "keep_ratio": "keep_ratio", "threshold": "threshold",
          "direction": "select_direction", "drop_negative": "drop_negative_irm", "min_keep": "min_keep"}


@dataclass
class SelectionConfig:
    """What the built-in selectors read (and what a custom selector receives): the `--sera.*` review flags under
    short names. Defaults and valid values are those of `sera_openrlhf.config.ReviewConfig`."""

    mode: str = ReviewConfig.select_mode
    keep_ratio: float = ReviewConfig.keep_ratio
    threshold: float = ReviewConfig.threshold
    direction: str = ReviewConfig.select_direction
    drop_negative: bool = ReviewConfig.drop_negative_irm
    min_keep: int = ReviewConfig.min_keep

    def __post_init__(self):
        for name, flag in _FLAGS.items():
            check_group_value(ReviewConfig, flag, getattr(self, name))

    @classmethod
    def from_review(cls, review: ReviewConfig) -> "SelectionConfig":
        return cls(**{name: getattr(review, flag) for name, flag in _FLAGS.items()})


def _flag(name: str) -> str:
    return f"--sera.{_FLAGS[name]}"


@dataclass
class SelectionResult:
    """kept_mask: BoolTensor[N]; weights: Tensor[N] float (1/0 for hard selection); kept_ids in table order."""

    kept_mask: torch.Tensor
    weights: torch.Tensor
    kept_ids: list[str]


# ---------------------------------------------------------------------------------------------------- selectors


def _candidates(irm: list[float], config: SelectionConfig) -> list[int]:
    return [i for i, v in enumerate(irm) if v >= 0] if config.drop_negative else list(range(len(irm)))


@SELECTORS.register("top")
def select_top(table: PairTable, config: SelectionConfig) -> list[str]:
    """Keep the k highest-IRM pairs (lowest for direction 'low'), k = max(min_keep, round-half-up(ratio * N)).

    N counts ALL pairs, so --sera.drop_negative_irm never raises the kept share above keep_ratio; it only caps
    k at the pairs left. Ties at the cut go to the smaller id, so the result does not depend on row order.
    """
    ids, irm = table["id"], _irm(table).tolist()
    k = max(config.min_keep, math.floor(config.keep_ratio * len(ids) + 0.5))
    sign = -1.0 if config.direction == "high" else 1.0
    ranked = sorted(_candidates(irm, config), key=lambda i: (sign * irm[i], ids[i]))
    return [ids[i] for i in ranked[:k]]


@SELECTORS.register("threshold")
def select_threshold(table: PairTable, config: SelectionConfig) -> list[str]:
    """Keep IRM >= threshold (direction 'high') or IRM <= threshold ('low'); drop IRM < 0 first if asked."""
    ids, irm = table["id"], _irm(table)
    # compare in the IRM's own precision, so a float32 IRM of 0.7 passes a threshold of 0.7
    t = torch.tensor(config.threshold, dtype=irm.dtype).item()
    irm = irm.tolist()
    passes = (lambda v: v >= t) if config.direction == "high" else (lambda v: v <= t)
    return [ids[i] for i in _candidates(irm, config) if passes(irm[i])]


@SELECTORS.register("irm")
def select_irm(table: PairTable, config: SelectionConfig) -> list[str]:
    """The default selector: 'top' or 'threshold' according to config.mode ('soft' keeps every pair and is applied
    by the review phase itself: its output is a confidence per pair, not a selection)."""
    if config.mode == "soft":
        raise ConfigError("--sera.select_mode soft is not a selection; the review phase calibrates confidences")
    return (select_top if config.mode == "top" else select_threshold)(table, config)


def _irm(table: PairTable) -> torch.Tensor:
    """The "irm" column as a float Tensor[N]; Python numbers become float64 (not torch's default float32), so a
    custom table ranks exactly as the stats see it."""
    irm = table["irm"]
    if isinstance(irm, torch.Tensor):
        return irm if irm.is_floating_point() else irm.double()
    return torch.as_tensor(irm, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- applying


def apply_selector(selector: str, table: PairTable, config: SelectionConfig) -> SelectionResult:
    """Run a selector (registered name or "pkg.mod:fn" / "/file.py:fn") on a table and validate its answer.

    Raises ConfigError (naming the selector) for a malformed return value, and SelectionError (naming the flags
    to relax) when fewer than config.min_keep pairs are kept.
    """
    ids = _check_table(table)
    n = len(ids)
    fn = SELECTORS.get(selector, flag="--sera.selector")
    if not callable(fn):
        raise ConfigError(f"--sera.selector: {selector!r} is a {type(fn).__name__}, not a function")
    out = fn(table, config)
    who = f"selector {selector!r} returned"

    if isinstance(out, np.ndarray):  # an array of ids (e.g. from pandas) or of weights
        out = out.tolist() if out.dtype.kind in "OUS" else torch.from_numpy(out)
    if isinstance(out, torch.Tensor):
        if out.shape != (n,):
            raise ConfigError(f"{who} weights of shape {tuple(out.shape)}; expected ({n},), one per pair")
        weights = out.detach().to("cpu", torch.float32)  # a bool or 0/1 mask works too
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ConfigError(f"{who} weights that are negative, NaN or infinite; expected finite values >= 0")
        mask = weights > 0
    elif isinstance(out, (list, tuple, set, frozenset)):
        bad = [x for x in out if not isinstance(x, str)]
        if bad:
            raise ConfigError(f"{who} a sequence containing {type(bad[0]).__name__} values; expected ids (str) "
                              f"or a weight Tensor[{n}]")
        unknown = set(out) - set(ids)
        if unknown:
            shown = ", ".join(repr(x) for x in sorted(unknown)[:3])
            raise ConfigError(f"{who} {len(unknown)} id(s) not in the table, e.g. {shown}")
        keep = set(out)
        mask = torch.tensor([i in keep for i in ids], dtype=torch.bool)
        weights = mask.to(torch.float32)
    else:
        raise ConfigError(f"{who} {type(out).__name__}; expected a list of kept ids or a weight Tensor[{n}]")

    n_kept = int(mask.sum())
    if n_kept < config.min_keep:
        raise SelectionError(_too_few_message(selector, config, n_kept, n))
    return SelectionResult(mask, weights, [i for i, k in zip(ids, mask.tolist()) if k])


def _too_few_message(selector: str, config: SelectionConfig, n_kept: int, n: int) -> str:
    relax = [_flag("keep_ratio") if config.mode == "top" else _flag("threshold")]
    if config.drop_negative:
        relax.append(_flag("drop_negative"))
    relax.append(_flag("min_keep"))
    return (f"selector {selector!r} kept {n_kept} of {n} pairs, fewer than {_flag('min_keep')}={config.min_keep}; "
            f"relax {', '.join(relax)}")


def _check_table(table: PairTable) -> list[str]:
    """Validate the required columns; returns the ids."""
    for col in ("id", "irm"):
        if col not in table:
            raise KeyError(f"pair table has no {col!r} column")
    ids = list(table["id"])
    irm = torch.as_tensor(table["irm"])
    if irm.shape != (len(ids),):
        raise ValueError(f"pair table: 'irm' has shape {tuple(irm.shape)}, expected ({len(ids)},)")
    if len(set(ids)) != len(ids):
        raise ValueError("pair table: ids are not unique")
    bad = (~torch.isfinite(irm)).nonzero().flatten().tolist()
    if bad:
        raise NonFiniteError(f"implicit reward margin is NaN/inf for {len(bad)} pair(s), e.g. id {ids[bad[0]]!r}")
    return ids


# ---------------------------------------------------------------------------------------------------- statistics

QUANTILES = {"min": 0.0, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}


def selection_stats(
    table: PairTable,
    result: SelectionResult,
    previous_kept_ids: Sequence[str] | None = None,
    top_negative: int = 20,
) -> dict:
    """JSON-serialisable summary of one selection, for the report and for a person to inspect.

    IRM quantiles use linear interpolation; a group with no pairs gives None. `most_negative` lists up to
    `top_negative` pairs with IRM < 0, most negative first (the likeliest flipped labels).
    """
    irm = torch.as_tensor(table["irm"], dtype=torch.float64)
    kept, n = result.kept_mask, len(result.kept_mask)
    dropped = ~kept
    overlap = None if previous_kept_ids is None else jaccard(set(result.kept_ids), set(previous_kept_ids))
    stats = {
        "n_pairs": n,
        "n_kept": int(kept.sum()),
        "kept_share": float(kept.sum()) / n,
        "irm": {"all": _quantiles(irm), "kept": _quantiles(irm[kept]), "dropped": _quantiles(irm[dropped])},
        "mean_irm_kept": _mean(irm[kept]),
        "mean_len": None,
        "jaccard_previous": overlap,
        "n_negative_irm": int((irm < 0).sum()),
        "most_negative": [],
    }
    if "chosen_len" in table and "rejected_len" in table:
        lens = {s: torch.as_tensor(table[f"{s}_len"], dtype=torch.float64) for s in ("chosen", "rejected")}
        stats["mean_len"] = {
            group: {s: _mean(v[m]) for s, v in lens.items()} for group, m in (("kept", kept), ("dropped", dropped))
        }
    ids = list(table["id"])
    for i in torch.argsort(irm, stable=True)[: max(top_negative, 0)].tolist():
        if irm[i] >= 0:
            break
        row = {"id": ids[i], "irm": float(irm[i]), "kept": bool(kept[i])}
        for col in ("chosen_reward", "rejected_reward"):
            if col in table:
                row[col] = float(table[col][i])
        stats["most_negative"].append(row)
    return stats


def review_signal(irm: Sequence[float] | torch.Tensor, out_of_fold: bool, z: float = 1.645) -> dict:
    """Does the implicit reward agree with the labels clearly more often than chance?

    irm: Tensor[N] (or list) of margins. Returns {"out_of_fold", "n", "label_agreement", "lower_bound"}:
    label_agreement = share of pairs with IRM > 0 (IRM == 0 counts half); lower_bound = its one-sided Wilson
    score bound (z = 1.645: 95 %). lower_bound is None unless the IRMs are out-of-fold (cross-fitted review): a
    policy trained on the very pairs it scores agrees with them by memorisation, whatever its reward learned, so
    in-sample agreement tests nothing. A bound instead of a significance test, because with thousands of pairs a
    useless 52 % agreement is already "significant".
    Without this signal, selecting by IRM is random subsampling that only throws data away.
    """
    irm = torch.as_tensor(irm, dtype=torch.float64)
    n = int(irm.numel())
    if n == 0:
        return {"out_of_fold": out_of_fold, "n": 0, "label_agreement": None, "lower_bound": None}
    p = (float((irm > 0).sum()) + 0.5 * float((irm == 0).sum())) / n
    bound = None
    if out_of_fold:
        centre = p + z * z / (2 * n)
        spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        bound = (centre - spread) / (1 + z * z / n)
    return {"out_of_fold": out_of_fold, "n": n, "label_agreement": p, "lower_bound": bound}


def _quantiles(x: torch.Tensor) -> dict | None:
    if x.numel() == 0:
        return None
    q = torch.quantile(x, torch.tensor(list(QUANTILES.values()), dtype=x.dtype)).tolist()
    return dict(zip(QUANTILES, q))


def _mean(x: torch.Tensor) -> float | None:
    return float(x.mean()) if x.numel() else None


# ---------------------------------------------------------------------------------------------------- helpers


def assign_folds(ids: Sequence[str], num_folds: int, seed: int) -> list[int]:
    """Cross-fitting folds: fold[i] in [0, num_folds) for ids[i].

    Ids are ordered by sha1(seed, id) and dealt round-robin, so fold sizes differ by at most one and each id's
    fold depends only on (seed, the id set), never on row order.
    """
    if num_folds < 1:
        raise ConfigError(f"--sera.crossfit_folds must be >= 1, got {num_folds}")
    key = [hashlib.sha1(f"{seed}\0{i}".encode("utf-8")).hexdigest() for i in ids]
    order = sorted(range(len(ids)), key=lambda j: (key[j], ids[j]))
    folds = [0] * len(ids)
    for rank, j in enumerate(order):
        folds[j] = rank % num_folds
    return folds


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; 1.0 for two empty sets."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def auroc(scores: Sequence[float] | torch.Tensor, labels: Sequence[bool] | torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)), tied scores get their average rank.

    A higher score should mean a positive label is likelier; 1.0 = perfect, 0.5 = chance, 0.0 = reversed.
    """
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float64))
    y = np.asarray(torch.as_tensor(labels)).astype(bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"auroc: scores {s.shape} and labels {y.shape} must be 1-D of the same length")
    if not np.isfinite(s).all():
        raise ValueError("auroc: scores contain NaN/inf")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auroc: needs both positive and negative labels")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each distinct value
    rank_sum = avg_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
