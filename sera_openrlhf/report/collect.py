"""Read a SeRA run directory into one `RunSummary` (no rendering here; see render.py and plots.py).

Every number comes from `sera_state.json` when the loop recorded it there, else it is recomputed from the
iteration's files; a missing file or phase gives None, never an error.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from sera_openrlhf.errors import StateError
from sera_openrlhf.fileio import read_jsonl
from sera_openrlhf.rundir import STATE_FILE
from sera_openrlhf.state import checksum

TEXT_CHARS = 200  # prompt/response texts of the suspicious pairs are cut here
N_SUSPICIOUS = 10

# (label in the report, dotted config key, flag)
CONFIG_HIGHLIGHTS = (
    ("loss", "sera.loss", "--sera.loss"),
    ("beta", "model.beta", "--model.beta"),
    ("iterations (max)", "sera.iterations", "--sera.iterations"),
    ("reference", "sera.reference", "--sera.reference"),
    ("selector", "sera.selector", "--sera.selector"),
    ("select mode", "sera.select_mode", "--sera.select_mode"),
    ("keep ratio", "sera.keep_ratio", "--sera.keep_ratio"),
    ("threshold", "sera.threshold", "--sera.threshold"),
    ("direction", "sera.select_direction", "--sera.select_direction"),
    ("drop negative IRM", "sera.drop_negative_irm", "--sera.drop_negative_irm"),
    ("cross-fit folds", "sera.crossfit_folds", "--sera.crossfit_folds"),
    ("review refit", "sera.review_refit", "--sera.review_refit"),
    ("generated share (max)", "sera.generated_share_max", "--sera.generated_share_max"),
    ("num_samples", "sera.num_samples", "--sera.num_samples"),
    ("num_prompts", "sera.num_prompts", "--sera.num_prompts"),
    ("ensemble mode", "sera.ensemble_mode", "--sera.ensemble_mode"),
    ("ensemble K", "sera.ensemble_k", "--sera.ensemble_k"),
    ("ensemble lambda", "sera.ensemble_lambda", "--sera.ensemble_lambda"),
    ("ensemble decay", "sera.ensemble_decay", "--sera.ensemble_decay"),
    ("fluency guard off", "sera.no_fluency_guard", "--sera.no_fluency_guard"),
    ("fluency floor", "sera.fluency_floor", "--sera.fluency_floor"),
    ("fluency quantile", "sera.fluency_quantile", "--sera.fluency_quantile"),
    ("keep truncated", "sera.keep_truncated", "--sera.keep_truncated"),
    ("min margin", "sera.min_margin", "--sera.min_margin"),
    ("pair top fraction", "sera.pair_top_fraction", "--sera.pair_top_fraction"),
    ("length de-bias", "sera.length_debias", "--sera.length_debias"),
    ("length-normalised reward", "sera.length_normalized_reward", "--sera.length_normalized_reward"),
    ("NLL on bootstrapped chosen", "sera.bootstrap_nll_coef", "--sera.bootstrap_nll_coef"),
    ("converge Jaccard", "sera.converge_jaccard", "--sera.converge_jaccard"),
    ("converge min gain", "sera.converge_min_gain", "--sera.converge_min_gain"),
)


# ---------------------------------------------------------------------------------------------------- the summary
# Field order is the key order of report.json; None = unknown (phase not run, file missing).


@dataclass(slots=True)
class CrossfitFold:
    fold: int | str
    n_train_pairs: float | None
    steps: float | None
    loss_last: float | None
    acc_last: float | None


@dataclass(slots=True)
class IterationSummary:
    """One row of the report's Iterations table."""

    iteration: int
    status: str
    phases_done: list[str]
    reviewed: bool
    pairs_trained: float | None
    offline_pairs: float | None
    offline_kept: float | None
    generated: float | None
    generated_share: float | None
    generated_share_target: float | None
    kept_share: float | None
    mean_kept_irm: float | None
    jaccard: float | None
    n_negative_irm: float | None
    review_signal: dict | None
    calibration: dict | None  # --sera.select_mode soft: the fitted flip rate, its own AUROC estimate, fallback
    irm_quantiles: dict | None
    mean_len_offline: dict | None  # {"kept"|"dropped": {"chosen"|"rejected": mean length}}
    n_prompts: float | None
    n_samples: float | None
    truncated_share: float | None
    mean_generated_tokens: float | None
    guard: dict | None  # the fluency guard's counts as the loop recorded them ({"off": True} when disabled)
    guard_dropped: float | None
    pairing: dict | None  # why prompts gave no bootstrapped pair
    bootstrapped_pairs: float | None
    mean_len_bootstrapped: dict | None  # {"chosen"|"rejected": mean length}
    margins: dict | None  # n/mean/min/p25/p50/p75/max of the bootstrapped pairs' margins
    alpha: float | None
    ensemble: Any
    train_steps: float | None
    loss_first: float | None
    final_loss: float | None
    final_acc: float | None
    crossfit: list[CrossfitFold] | None
    policy: str | None
    eval: dict | None  # --eval.dataset after the iteration's training: eval_loss, acc_mean, margin
    lora: dict | None  # the LoRA adapter and the merged checkpoint later phases load


@dataclass(slots=True)
class SuspiciousPair:
    id: str
    irm: float | None
    kept: bool
    chosen_reward: float | None
    rejected_reward: float | None
    chosen_len: float | None
    rejected_len: float | None
    fold: Any
    irm_by_iteration: dict[str, float]
    prompt: str | None
    chosen: str | None
    rejected: str | None


@dataclass(slots=True)
class SuspiciousPairs:
    """The offline pairs with the most negative IRM in the last review."""

    iteration: int | None
    n_negative_irm: float | None
    pairs: list[SuspiciousPair]


@dataclass(slots=True)
class PlotSeries:
    """Per-row data only the plots need (not in report.json), by iteration."""

    review: dict[int, tuple[list, list]] = field(default_factory=dict)  # (IRM or None, kept) per review.jsonl row
    margins: dict[int, list[float]] = field(default_factory=dict)  # the bootstrapped pairs' margins
    train_log: dict[int, list[dict]] = field(default_factory=dict)  # policy/train_log.jsonl rows


@dataclass(slots=True)
class RunSummary:
    run_dir: str
    state_checksum_ok: bool | None
    finished: bool
    converged_at: int | None
    final_policy: str | None
    latest_policy: str | None
    data: Any  # the state's description of the offline data
    config: dict  # label of CONFIG_HIGHLIGHTS -> value
    config_flags: dict  # label -> flag
    iterations: list[IterationSummary]
    suspicious_pairs: SuspiciousPairs
    guard_totals: dict[str, float]
    series: PlotSeries | None
    resolved_precision: dict | None = None  # --sera.precision's choice, reason and probe figures
    resources: list[dict] | None = None  # per phase in run order: {phase, seconds, peak_rss_mb[, cuda_peak_mb]
    #                                      [, generated_per_rank, scored_per_rank: lists indexed by DP rank]}


# ---------------------------------------------------------------------------------------------------- small helpers


def num(x):
    """A finite float/int, else None (NaN, inf, strings and missing values all become None)."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return None


def dig(d, *keys):
    """d[k1][k2]..., or None where a level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _first(*values):
    return next((v for v in values if v is not None), None)


def _mean(xs) -> float | None:
    xs = [x for x in (num(v) for v in xs) if x is not None]
    return sum(xs) / len(xs) if xs else None


def _quantile(sorted_xs: list, q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _distribution(xs) -> dict | None:
    xs = sorted(x for x in (num(v) for v in xs) if x is not None)
    if not xs:
        return None
    return {"n": len(xs), "mean": sum(xs) / len(xs), "min": xs[0], "p25": _quantile(xs, 0.25),
            "p50": _quantile(xs, 0.5), "p75": _quantile(xs, 0.75), "max": xs[-1]}


def _rid(row: dict):
    """A row's pair id (str), or None when missing or malformed."""
    i = row.get("id")
    return i if isinstance(i, str) else (str(i) if isinstance(i, int) and not isinstance(i, bool) else None)


def _kept(row: dict) -> bool:
    return row.get("kept") is True


def _cfg(config: dict, dotted: str):
    """config["sera"]["keep_ratio"] for "sera.keep_ratio" (a flat "sera.keep_ratio" key works too)."""
    if dotted in config:
        return config[dotted]
    return dig(config, *dotted.split("."))


# ---------------------------------------------------------------------------------------------------- reading


def load_state(run_dir: str) -> dict:
    """`sera_state.json` of `run_dir`; StateError (one line) when the directory or the file is missing."""
    if not os.path.isdir(run_dir):
        raise StateError(f"{run_dir}: no such run directory")
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise StateError(f"{run_dir} is not a SeRA run directory: it has no {STATE_FILE} "
                         "(run python -m sera_openrlhf.cli.train_dpo --sera.enable ... first)")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{path} is unreadable ({e})") from None
    if not isinstance(state, dict):
        raise StateError(f"{path} is not a JSON object")
    return state


def _checksum_ok(state: dict) -> bool | None:
    """Does the state match its checksum (as the run writes it)? None when it has none."""
    if "checksum" not in state:
        return None
    return state["checksum"] == checksum(state)


def _rows(path: str) -> list[dict] | None:
    """The objects of a JSONL file of the run; None when it is missing or unreadable (the report shows the rest)."""
    try:
        rows = read_jsonl(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return [r for r in rows if isinstance(r, dict)]


def _iterations(stats_all: dict, done: list, run_dir: str) -> list[int]:
    """Every iteration the state or the directory mentions."""
    ts = {int(k) for k in stats_all if str(k).isdigit()}
    ts |= {int(m.group(1)) for m in (re.match(r"iter(\d+)/", d) for d in done) if m}
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"iter_(\d+)", name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            ts.add(int(m.group(1)))
    return sorted(t for t in ts if t >= 1)


@dataclass
class _Iteration:
    """One iteration as found: its statistics in sera_state.json and its files (None where missing)."""

    t: int
    dir: str
    stats: dict  # state["iterations"][str(t)]
    phases: list[str]  # finished phases, from state["done"]
    review: dict | None  # stats["review"], and so on
    generate: dict | None
    pair: dict | None
    train: dict | None
    review_rows: list[dict] | None
    boot_rows: list[dict] | None
    samples: list[dict] | None
    train_set: list[dict] | None
    log: list[dict] | None  # policy/train_log.jsonl
    margins: list[float] | None = None  # the bootstrapped pairs' margins
    review_files: dict = field(default_factory=dict)  # review statistics recomputed from review_rows

    def review_stat(self, key: str):
        """A review statistic: as the run recorded it, else recomputed from review.jsonl."""
        return _first(num(dig(self.review, key)), self.review_files.get(key))


def _read_iteration(run_dir: str, t: int, stats: dict, done: list[str]) -> _Iteration:
    d = os.path.join(run_dir, f"iter_{t}")
    phase_stats = {k: stats[k] if isinstance(stats.get(k), dict) else None
                   for k in ("review", "generate", "pair", "train")}
    it = _Iteration(t=t, dir=d, stats=stats, phases=[p.split("/", 1)[1] for p in done if p.startswith(f"iter{t}/")],
                    **phase_stats, review_rows=_rows(os.path.join(d, "review.jsonl")),
                    boot_rows=_rows(os.path.join(d, "bootstrapped.jsonl")),
                    samples=_rows(os.path.join(d, "samples.jsonl")),
                    train_set=_rows(os.path.join(d, "train_set.jsonl")),
                    log=_rows(os.path.join(d, "policy", "train_log.jsonl")))
    if it.review_rows:
        it.review_files = _review_from_rows(it.review_rows)
    it.margins = _margins(it)
    return it


def _margins(it: _Iteration) -> list[float] | None:
    """The bootstrapped pairs' margins: from bootstrapped.jsonl, else from the pairing statistics."""
    if it.boot_rows is not None:
        values = [b.get("margin") for b in it.boot_rows]
    elif isinstance(dig(it.pair, "margins"), list):
        values = it.pair["margins"]
    else:
        return None
    return [m for m in (num(x) for x in values) if m is not None]


def _review_from_rows(rows: list[dict]) -> dict:
    """The review statistics the loop records, recomputed from review.jsonl."""
    kept = [r for r in rows if _kept(r)]
    dropped = [r for r in rows if not _kept(r)]
    out = {"n_pairs": len(rows), "n_kept": len(kept), "kept_share": len(kept) / len(rows) if rows else None,
           "mean_irm_kept": _mean(r.get("irm") for r in kept),
           "n_negative_irm": sum(1 for r in rows if (num(r.get("irm")) or 0.0) < 0)}
    out["mean_len"] = {g: {s: _mean(r.get(f"{s}_len") for r in grp) for s in ("chosen", "rejected")}
                       for g, grp in (("kept", kept), ("dropped", dropped))}
    return out


@dataclass
class _Review:
    """What the later iterations and the suspicious-pairs table need from one review.jsonl."""

    irm: dict[str, float]  # id -> IRM
    kept: set[str]  # kept ids
    worst: list[dict]  # the N_SUSPICIOUS rows with the most negative IRM
    n_negative: int


def _digest_review(rows: list[dict]) -> _Review:
    valid = [r for r in rows if num(r.get("irm")) is not None and _rid(r) is not None]
    return _Review(irm={_rid(r): r["irm"] for r in valid},
                   kept={_rid(r) for r in rows if _kept(r) and _rid(r) is not None},
                   worst=sorted((r for r in valid if r["irm"] < 0), key=lambda r: r["irm"])[:N_SUSPICIOUS],
                   n_negative=sum(1 for r in valid if r["irm"] < 0))


# ---------------------------------------------------------------------------------------------------- one iteration


def _iteration_summary(it: _Iteration, reviews: dict[int, _Review], converged_at, config) -> IterationSummary:
    status = _status(it, converged_at, config)
    policy = os.path.join(it.dir, "policy")
    return IterationSummary(
        iteration=it.t, status=status, phases_done=it.phases, reviewed=bool(it.review or it.review_rows),
        **_review_fields(it, reviews), **_bootstrap_fields(it), **_training_fields(it),
        policy=policy if status == "trained" and os.path.isdir(policy) else None)


def _status(it: _Iteration, converged_at, config) -> str:
    if converged_at is not None and it.t == converged_at:
        return "converged (review only)"
    if converged_at is not None and it.t > converged_at:
        return "not run (converged earlier)"
    if it.train is not None or "train" in it.phases or (it.log and os.path.isdir(os.path.join(it.dir, "policy"))):
        return "trained"
    if it.t == 1 and _cfg(config, "sera.skip_first_training") is True:
        return "not trained (--sera.skip_first_training)"
    if it.phases or it.review or it.review_rows or it.log:
        return "in progress"
    return "incomplete"


def _review_fields(it: _Iteration, reviews: dict[int, _Review]) -> dict:
    # the loop records the Jaccard overlap from iteration 3 on (iteration 2's kept set has no predecessor)
    jac = _first(dig(it.review, "jaccard_previous"), dig(it.review, "jaccard_prev"))
    if jac is None and it.t in reviews and it.t - 1 in reviews:
        from sera_openrlhf.selection import jaccard  # imports torch: only when the state lacks the number

        jac = jaccard(reviews[it.t].kept, reviews[it.t - 1].kept)
    signal = dig(it.review, "signal")
    return {"offline_pairs": it.review_stat("n_pairs"), "kept_share": it.review_stat("kept_share"),
            "mean_kept_irm": it.review_stat("mean_irm_kept"), "jaccard": num(jac),
            "n_negative_irm": it.review_stat("n_negative_irm"),
            "review_signal": signal if isinstance(signal, dict) else None,
            "calibration": dig(it.review, "calibration") if isinstance(dig(it.review, "calibration"), dict) else None,
            "irm_quantiles": dig(it.review, "irm"),
            "mean_len_offline": dig(it.review, "mean_len") or it.review_files.get("mean_len")}


def _bootstrap_fields(it: _Iteration) -> dict:
    gen, pr, boot, samples = it.generate, it.pair, it.boot_rows, it.samples
    truncated_share = num(dig(gen, "truncated_share"))
    if truncated_share is None and samples:
        truncated_share = sum(bool(s.get("truncated")) for s in samples) / len(samples)
    guard = dig(pr, "guard")
    guard_dropped = None
    if isinstance(guard, dict) and not guard.get("off"):
        guard_dropped = sum(num(guard.get(k)) or 0 for k in ("low_fluency", "degenerate_text"))
    lens = {s: _first(num(dig(pr, f"mean_len_{s}")), num(dig(pr, f"mean_{s}_length")),
                      _mean(b.get(f"{s}_len") for b in boot) if boot else None) for s in ("chosen", "rejected")}
    pairing_keys = ("prompts", "too_few_valid", "duplicate_texts", "below_min_margin", "top_fraction_cut",
                    "truncated_dropped")
    return {"n_prompts": num(dig(gen, "n_prompts")),
            "n_samples": _first(num(dig(gen, "n_samples")), None if samples is None else len(samples)),
            "truncated_share": truncated_share, "mean_generated_tokens": num(dig(gen, "mean_generated_tokens")),
            "guard": guard, "guard_dropped": guard_dropped,
            "pairing": {k: num(pr.get(k)) for k in pairing_keys} if pr else None,
            "bootstrapped_pairs": _first(num(dig(pr, "n_pairs")), None if boot is None else len(boot)),
            "mean_len_bootstrapped": lens if any(v is not None for v in lens.values()) else None,
            "margins": _distribution(it.margins) if it.margins else None,
            "alpha": num(dig(pr, "alpha")), "ensemble": dig(pr, "ensemble")}


def _training_fields(it: _Iteration) -> dict:
    tr, train_set, log = it.train, it.train_set, it.log
    generated = _first(num(dig(tr, "n_generated")),
                       None if train_set is None else sum(1 for r in train_set if "nll_coef" in r))
    if it.t == 1 and tr is not None and generated is None:
        generated = 0
    pairs = _first(num(dig(tr, "n_train_pairs")), None if train_set is None else len(train_set))
    if pairs is None and tr is not None and num(tr.get("n_offline")) is not None:
        pairs = tr["n_offline"] + (generated or 0)
    offline_kept = it.review_stat("n_kept")
    if it.t == 1:  # iteration 1 trains on every offline pair
        offline_kept = _first(num(dig(tr, "n_offline")), None if train_set is None else len(train_set))
    share = num(dig(tr, "generated_share"))
    if share is None and pairs and generated is not None:
        share = generated / pairs
    last = log[-1] if log else {}
    return {"pairs_trained": pairs, "offline_kept": offline_kept, "generated": generated, "generated_share": share,
            "generated_share_target": num(dig(tr, "generated_share_target")),
            "train_steps": _first(num(dig(tr, "steps")), len(log) if log else None),
            "loss_first": _first(num(dig(tr, "loss_first")), num(log[0].get("loss")) if log else None),
            "final_loss": _first(num(dig(tr, "loss_last")), num(last.get("loss"))),
            "final_acc": _first(num(dig(tr, "acc_last")), num(last.get("acc"))),
            "crossfit": _crossfit(it.stats), "eval": dig(tr, "eval"), "lora": dig(tr, "lora")}


def _crossfit(stats: dict) -> list[CrossfitFold] | None:
    folds = []
    for key in sorted(k for k in stats if str(k).startswith("crossfit_fold")):
        s, n = _dict(stats[key]), key[len("crossfit_fold"):]
        folds.append(CrossfitFold(fold=int(n) if n.isdigit() else key, n_train_pairs=num(s.get("n_train_pairs")),
                                  steps=num(s.get("steps")), loss_last=num(s.get("loss_last")),
                                  acc_last=num(s.get("acc_last"))))
    return folds or None


# ---------------------------------------------------------------------------------------------------- suspicious pairs


def _suspicious(run_dir: str, ts: list[int], reviews: dict[int, _Review], stats_all: dict,
                config: dict) -> SuspiciousPairs:
    """The N_SUSPICIOUS offline pairs with the most negative IRM in the last review."""
    reviewed = [t for t in ts if t in reviews]
    in_stats = [t for t in ts if isinstance(dig(stats_all, str(t), "review"), dict)]
    if reviewed:
        t = reviewed[-1]
        n_negative, worst = reviews[t].n_negative, reviews[t].worst
    elif in_stats:
        t = in_stats[-1]
        rv = stats_all[str(t)]["review"]
        n_negative = num(rv.get("n_negative_irm"))
        mn = rv.get("most_negative")
        worst = [r for r in (mn if isinstance(mn, list) else []) if isinstance(r, dict)][:N_SUSPICIOUS]
    else:
        return SuspiciousPairs(iteration=None, n_negative_irm=None, pairs=[])
    worst = [r for r in worst if _rid(r) is not None]
    texts = _text_lookup(run_dir, ts, config, {_rid(r) for r in worst})
    pairs = []
    for r in worst:
        i = _rid(r)
        prompt, chosen, rejected = (None if x is None else _truncate(x) for x in texts.get(i, (None, None, None)))
        pairs.append(SuspiciousPair(
            id=i, irm=num(r.get("irm")), kept=_kept(r), chosen_reward=num(r.get("chosen_reward")),
            rejected_reward=num(r.get("rejected_reward")), chosen_len=num(r.get("chosen_len")),
            rejected_len=num(r.get("rejected_len")), fold=r.get("fold"),
            irm_by_iteration={str(u): reviews[u].irm[i] for u in reviewed if i in reviews[u].irm},
            prompt=prompt, chosen=chosen, rejected=rejected))
    return SuspiciousPairs(iteration=t, n_negative_irm=n_negative, pairs=pairs)


def _text_lookup(run_dir: str, ts: list[int], config: dict, want: set) -> dict:
    """id -> (prompt, chosen, rejected) for the ids in `want`: iteration 1's train set holds every offline pair;
    later train sets and kept.jsonl cover runs that skipped the first training."""
    found: dict = {}
    keys = (_cfg(config, "data.prompt_key") or "prompt", _cfg(config, "data.chosen_key") or "chosen",
            _cfg(config, "data.rejected_key") or "rejected")
    candidates = [os.path.join(run_dir, "iter_1", "train_set.jsonl")]
    for t in ts:
        candidates += [os.path.join(run_dir, f"iter_{t}", "train_set.jsonl"),
                       os.path.join(run_dir, f"iter_{t}", "kept.jsonl")]
    for path in dict.fromkeys(candidates):
        missing = {i for i in want if i not in found and isinstance(i, str)}
        if not missing or not os.path.isfile(path):
            continue
        # the offline set can be large: parse only the lines that mention a wanted id
        needles = {json.dumps(i, ensure_ascii=a) for i in missing for a in (False, True)}
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not any(n in line for n in needles):
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    i = _rid(row) if isinstance(row, dict) else None
                    if i in missing and i not in found:
                        pk = keys[0] if keys[0] in row else "prompt"
                        found[i] = tuple(_flatten_text(row.get(k)) for k in (pk, keys[1], keys[2]))
        except (OSError, UnicodeDecodeError):
            continue
    return found


def _flatten_text(x) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, list):  # chat messages
        parts = []
        for m in x:
            if isinstance(m, dict):
                parts.append(f"{m.get('role', '?')}: {_flatten_text(m.get('content', ''))}")
            else:
                parts.append(_flatten_text(m))
        return " / ".join(parts)
    return "" if x is None else str(x)


def _truncate(text: str, n: int = TEXT_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


# ---------------------------------------------------------------------------------------------------- the run


def collect(run_dir: str) -> RunSummary:
    """Read `run_dir` into a RunSummary. Raises StateError when it does not exist or has no sera_state.json."""
    run_dir = os.path.abspath(run_dir)
    state = load_state(run_dir)
    config, stats_all = _dict(state.get("config")), _dict(state.get("iterations"))
    done = [str(d) for d in (state.get("done") if isinstance(state.get("done"), list) else [])]
    converged_at = num(state.get("converged_at"))
    converged_at = int(converged_at) if converged_at is not None else None
    ts = _iterations(stats_all, done, run_dir)

    iterations, reviews, series = [], {}, PlotSeries()
    for t in ts:  # one iteration's files at a time: train sets and samples can be large
        it = _read_iteration(run_dir, t, _dict(stats_all.get(str(t))), done)
        if it.review_rows:
            reviews[t] = _digest_review(it.review_rows)
            series.review[t] = ([num(r.get("irm")) for r in it.review_rows], [_kept(r) for r in it.review_rows])
        if it.margins:
            series.margins[t] = it.margins
        if it.log:
            series.train_log[t] = it.log
        iterations.append(_iteration_summary(it, reviews, converged_at, config))

    final_policy = state.get("final_policy") if isinstance(state.get("final_policy"), str) else None
    trained = [it for it in iterations if it.policy]
    return RunSummary(
        run_dir=run_dir, state_checksum_ok=_checksum_ok(state), finished=final_policy is not None,
        converged_at=converged_at, final_policy=final_policy, latest_policy=trained[-1].policy if trained else None,
        data=state.get("data"), config=_config_highlights(config),
        config_flags={label: flag for label, _, flag in CONFIG_HIGHLIGHTS}, iterations=iterations,
        suspicious_pairs=_suspicious(run_dir, ts, reviews, stats_all, config),
        guard_totals=_guard_totals(iterations), series=series,
        resolved_precision=state.get("precision") if isinstance(state.get("precision"), dict) else None,
        resources=_resources(state, done))


def _resources(state: dict, done: list[str]) -> list[dict]:
    """Wall seconds and this rank's peak memory of every finished phase, in the order they ran, and the work of
    each data-parallel rank (prompts generated, sequences scored) where the phase recorded it."""
    seconds, memory = _dict(state.get("seconds")), _dict(state.get("memory"))
    out = []
    for p in done:
        row = {"phase": p, "seconds": num(seconds.get(p)), **{k: num(v) for k, v in _dict(memory.get(p)).items()
                                                            if k in ("peak_rss_mb", "cuda_peak_mb")}}
        t, _, name = p.partition("/")
        stats = _dict(_dict(state.get("iterations")).get(t.removeprefix("iter"))).get(name)
        for key in ("generated_per_rank", "scored_per_rank"):
            value = _dict(stats).get(key)
            if isinstance(value, list):
                row[key] = [int(v) if isinstance(v, (int, float)) else None for v in value]
        out.append(row)
    return out


def _config_highlights(config: dict) -> dict:
    values = {label: _cfg(config, key) for label, key, _ in CONFIG_HIGHLIGHTS}
    if _cfg(config, "model.ipo_enable") and values["loss"] in (None, "dpo"):
        values["loss"] = "ipo"
    return values


def _guard_totals(iterations: list[IterationSummary]) -> dict[str, float]:
    """Fluency-guard and pairing drop counts summed over the iterations."""
    totals: dict[str, float] = {}
    for it in iterations:
        for src in (it.guard if isinstance(it.guard, dict) else {}, it.pairing or {}):
            for k, v in src.items():
                if k not in ("off", "prompts", "kept") and num(v) is not None:
                    totals[k] = totals.get(k, 0) + v
    return totals
