"""The run report: per-iteration statistics of a SeRA run directory as Markdown, JSON and PNG plots.

    python -m sera_openrlhf.cli.report RUN_DIR        (also run at the end of every `--sera.enable` run)

Reads `sera_state.json` (per-phase statistics) and the per-iteration files described in `sera_openrlhf.loop`,
and writes `<run_dir>/report/`:

    report.md               summary table per iteration, configuration highlights, the most suspicious offline
                            pairs (most negative implicit reward margin), the bootstrapping guards' counts, the
                            final policy and the plots
    report.json             every number of report.md (`build_report`)
    irm_hist.png            IRM histogram per reviewed iteration, kept vs dropped
    kept_share.png          kept share and mean kept IRM per iteration
    lengths.png             mean chosen/rejected length: kept vs dropped offline pairs, bootstrapped pairs
    bootstrap_margins.png   distribution of the bootstrapped pairs' implicit-reward margins per iteration
    training.png            train loss and accuracy per optimizer step, iterations concatenated
    convergence.png         Jaccard overlap with the previous kept set and mean kept IRM per iteration

The report reads whatever exists: an unfinished run, an iteration that converged after its review, or a run
whose files were partly deleted gives a shorter report (a plot without data is not drawn and not linked), never
an error. Statistics come from the state file when present, else are recomputed from the files. Matplotlib
draws through its Agg canvas directly (no pyplot), so rendering never touches a global backend.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

from sera_openrlhf.errors import StateError
from sera_openrlhf.fileio import atomic_write_json, atomic_write_text

STATE_FILE = "sera_state.json"
REPORT_DIR = "report"
PLOTS = ("irm_hist", "kept_share", "lengths", "bootstrap_margins", "training", "convergence")
TEXT_CHARS = 200
N_SUSPICIOUS = 10
_PHASES = ("review", "generate", "score_samples", "pair", "train")

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
    ("review policy", "sera.review_policy", "--sera.review_policy"),
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


# ---------------------------------------------------------------------------------------------------- reading


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: str) -> list[dict] | None:
    """Rows of a JSONL file; None when it is missing. Lines that do not parse to an object are skipped."""
    if not os.path.isfile(path):
        return None
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except (OSError, UnicodeDecodeError):
        return None
    return rows


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
    import hashlib

    if "checksum" not in state:
        return None
    body = json.dumps({k: v for k, v in state.items() if k != "checksum"}, sort_keys=True)
    return state["checksum"] == hashlib.sha256(body.encode()).hexdigest()


def _cfg(config: dict, dotted: str):
    """config["sera"]["keep_ratio"] for "sera.keep_ratio" (a flat "sera.keep_ratio" key works too)."""
    if not isinstance(config, dict):
        return None
    if dotted in config:
        return config[dotted]
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# ---------------------------------------------------------------------------------------------------- numbers


def _num(x):
    """A finite float/int, else None (NaN, inf, strings and missing values all become None)."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return None


def _mean(xs) -> float | None:
    xs = [x for x in (_num(v) for v in xs) if x is not None]
    return sum(xs) / len(xs) if xs else None


def _quantile(sorted_xs: list, q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _summary(xs) -> dict | None:
    xs = sorted(x for x in (_num(v) for v in xs) if x is not None)
    if not xs:
        return None
    return {"n": len(xs), "mean": sum(xs) / len(xs), "min": xs[0], "p25": _quantile(xs, 0.25),
            "p50": _quantile(xs, 0.5), "p75": _quantile(xs, 0.75), "max": xs[-1]}


def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _rid(row: dict):
    """A row's pair id (str), or None when missing or malformed."""
    i = row.get("id")
    return i if isinstance(i, str) else (str(i) if isinstance(i, int) and not isinstance(i, bool) else None)


def _kept(row: dict) -> bool:
    return row.get("kept") is True


def _jaccard(a: set, b: set) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


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


# ---------------------------------------------------------------------------------------------------- collecting


def _iterations(stats_all: dict, done: list, run_dir: str) -> list[int]:
    ts = set()
    for k in stats_all:
        if str(k).isdigit():
            ts.add(int(k))
    for d in done:
        m = re.match(r"iter(\d+)/", str(d))
        if m:
            ts.add(int(m.group(1)))
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"iter_(\d+)", name)
        if m and os.path.isdir(os.path.join(run_dir, name)):
            ts.add(int(m.group(1)))
    return sorted(t for t in ts if t >= 1)


def _review_from_rows(rows: list[dict]) -> dict:
    """The review statistics the loop records, recomputed from review.jsonl."""
    kept = [r for r in rows if _kept(r)]
    dropped = [r for r in rows if not _kept(r)]
    out = {"n_pairs": len(rows), "n_kept": len(kept), "kept_share": len(kept) / len(rows) if rows else None,
           "mean_irm_kept": _mean(r.get("irm") for r in kept),
           "n_negative_irm": sum(1 for r in rows if (_num(r.get("irm")) or 0.0) < 0)}
    out["mean_len"] = {g: {s: _mean(r.get(f"{s}_len") for r in grp) for s in ("chosen", "rejected")}
                       for g, grp in (("kept", kept), ("dropped", dropped))}
    return out


def _collect(run_dir: str):
    """(report dict, raw series for the plots)."""
    run_dir = os.path.abspath(run_dir)
    state = load_state(run_dir)
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    stats_all = state.get("iterations") if isinstance(state.get("iterations"), dict) else {}
    done = [str(d) for d in (state.get("done") if isinstance(state.get("done"), list) else [])]
    ts = _iterations(stats_all, done, run_dir)
    converged_at = _num(state.get("converged_at"))
    converged_at = int(converged_at) if converged_at is not None else None

    series = {"review": {}, "margins": {}, "train_log": {}}
    iterations = []
    kept_sets: dict[int, set] = {}
    reviews: dict[int, dict] = {}  # t -> {"irm": {id: irm}, "worst": rows, "n_negative": n}: compact
    for t in ts:
        d = os.path.join(run_dir, f"iter_{t}")
        st = stats_all.get(str(t)) if isinstance(stats_all.get(str(t)), dict) else {}
        rv, gen, pr, tr = (st.get(k) if isinstance(st.get(k), dict) else None
                           for k in ("review", "generate", "pair", "train"))
        phases = [p.split("/", 1)[1] for p in done if p.startswith(f"iter{t}/")]

        review_rows = _read_jsonl(os.path.join(d, "review.jsonl"))
        if review_rows:
            valid = [r for r in review_rows if _num(r.get("irm")) is not None and _rid(r) is not None]
            reviews[t] = {"irm": {_rid(r): r["irm"] for r in valid},
                          "worst": sorted((r for r in valid if r["irm"] < 0), key=lambda r: r["irm"])[:N_SUSPICIOUS],
                          "n_negative": sum(1 for r in valid if r["irm"] < 0)}
            kept_sets[t] = {_rid(r) for r in review_rows if _kept(r) and _rid(r) is not None}
            series["review"][t] = ([_num(r.get("irm")) for r in review_rows], [_kept(r) for r in review_rows])
        rv_files = _review_from_rows(review_rows) if review_rows else {}
        reviewed = bool(rv or review_rows)

        boot_rows = _read_jsonl(os.path.join(d, "bootstrapped.jsonl"))
        margins = None
        if boot_rows is not None:
            margins = [m for m in (_num(b.get("margin")) for b in boot_rows) if m is not None]
        elif pr and isinstance(pr.get("margins"), list):
            margins = [m for m in (_num(x) for x in pr["margins"]) if m is not None]
        if margins:
            series["margins"][t] = margins

        samples = _read_jsonl(os.path.join(d, "samples.jsonl"))
        train_set = _read_jsonl(os.path.join(d, "train_set.jsonl"))
        log = _read_jsonl(os.path.join(d, "policy", "train_log.jsonl"))
        if log:
            series["train_log"][t] = log

        # jaccard: the loop records it from iteration 3 on (the kept set of iteration 2 has no predecessor)
        jac = _first(_get(rv, "jaccard_previous"), _get(rv, "jaccard_prev"))
        if jac is None and t in kept_sets and (t - 1) in kept_sets:
            jac = _jaccard(kept_sets[t], kept_sets[t - 1])

        guard = _get(pr, "guard")
        guard_dropped = None
        if isinstance(guard, dict) and not guard.get("off"):
            guard_dropped = sum(_num(guard.get(k)) or 0 for k in ("low_fluency", "degenerate_text"))

        n_gen_train = _first(_num(_get(tr, "n_generated")),
                             None if train_set is None else sum(1 for r in train_set if "nll_coef" in r))
        if t == 1 and tr is not None and n_gen_train is None:
            n_gen_train = 0
        pairs_trained = _first(_num(_get(tr, "n_train_pairs")), None if train_set is None else len(train_set))
        if pairs_trained is None and tr is not None and _num(tr.get("n_offline")) is not None:
            pairs_trained = tr["n_offline"] + (n_gen_train or 0)
        offline_kept = _first(_num(_get(rv, "n_kept")), rv_files.get("n_kept"))
        if t == 1:
            offline_kept = _first(_num(_get(tr, "n_offline")), None if train_set is None else len(train_set))
        gen_share = _num(_get(tr, "generated_share"))
        if gen_share is None and pairs_trained and n_gen_train is not None:
            gen_share = n_gen_train / pairs_trained

        truncated_share = _num(_get(gen, "truncated_share"))
        if truncated_share is None and samples:
            truncated_share = sum(bool(s.get("truncated")) for s in samples) / len(samples)

        mean_len_off = _get(rv, "mean_len") or rv_files.get("mean_len")
        boot_c = _first(_num(_get(pr, "mean_len_chosen")), _num(_get(pr, "mean_chosen_length")),
                        None if not boot_rows else _mean(b.get("chosen_len") for b in boot_rows))
        boot_r = _first(_num(_get(pr, "mean_len_rejected")), _num(_get(pr, "mean_rejected_length")),
                        None if not boot_rows else _mean(b.get("rejected_len") for b in boot_rows))

        last = log[-1] if log else {}
        policy = os.path.join(d, "policy")
        if converged_at is not None and t == converged_at:
            status = "converged (review only)"
        elif converged_at is not None and t > converged_at:
            status = "not run (converged earlier)"
        elif tr is not None or "train" in phases or (log and os.path.isdir(policy)):
            status = "trained"
        elif t == 1 and _cfg(config, "sera.skip_first_training") is True:
            status = "not trained (--sera.skip_first_training)"
        elif phases or reviewed or log:
            status = "in progress"
        else:
            status = "incomplete"

        crossfit = []
        for key in sorted(k for k in st if str(k).startswith("crossfit_fold")):
            s = st[key] if isinstance(st[key], dict) else {}
            crossfit.append({"fold": int(key[len("crossfit_fold"):]) if key[len("crossfit_fold"):].isdigit() else key,
                             "n_train_pairs": _num(s.get("n_train_pairs")), "steps": _num(s.get("steps")),
                             "loss_last": _num(s.get("loss_last")), "acc_last": _num(s.get("acc_last"))})

        iterations.append({
            "iteration": t,
            "status": status,
            "phases_done": phases,
            "reviewed": reviewed,
            "pairs_trained": pairs_trained,
            "offline_pairs": _first(_num(_get(rv, "n_pairs")), rv_files.get("n_pairs")),
            "offline_kept": offline_kept,
            "generated": n_gen_train,
            "generated_share": gen_share,
            "generated_share_target": _num(_get(tr, "generated_share_target")),
            "kept_share": _first(_num(_get(rv, "kept_share")), rv_files.get("kept_share")),
            "mean_kept_irm": _first(_num(_get(rv, "mean_irm_kept")), rv_files.get("mean_irm_kept")),
            "jaccard": _num(jac),
            "n_negative_irm": _first(_num(_get(rv, "n_negative_irm")), rv_files.get("n_negative_irm")),
            "review_signal": _get(rv, "signal") if isinstance(_get(rv, "signal"), dict) else None,
            "irm_quantiles": _get(rv, "irm"),
            "mean_len_offline": mean_len_off,
            "n_prompts": _num(_get(gen, "n_prompts")),
            "n_samples": _first(_num(_get(gen, "n_samples")), None if samples is None else len(samples)),
            "truncated_share": truncated_share,
            "mean_generated_tokens": _num(_get(gen, "mean_generated_tokens")),
            "guard": guard,
            "guard_dropped": guard_dropped,
            "pairing": {k: _num(_get(pr, k)) for k in ("prompts", "too_few_valid", "duplicate_texts",
                                                        "below_min_margin", "top_fraction_cut",
                                                        "truncated_dropped")} if pr else None,
            "bootstrapped_pairs": _first(_num(_get(pr, "n_pairs")), None if boot_rows is None else len(boot_rows)),
            "mean_len_bootstrapped": {"chosen": boot_c, "rejected": boot_r}
            if boot_c is not None or boot_r is not None else None,
            "margins": _summary(margins) if margins else None,
            "alpha": _num(_get(pr, "alpha")),
            "ensemble": _get(pr, "ensemble"),
            "train_steps": _first(_num(_get(tr, "steps")), len(log) if log else None),
            "loss_first": _first(_num(_get(tr, "loss_first")), _num(log[0].get("loss")) if log else None),
            "final_loss": _first(_num(_get(tr, "loss_last")), _num(last.get("loss"))),
            "final_acc": _first(_num(_get(tr, "acc_last")), _num(last.get("acc"))),
            "crossfit": crossfit or None,
            "policy": policy if status == "trained" and os.path.isdir(policy) else None,
        })

    suspicious, suspicious_iter, n_negative = _suspicious(run_dir, ts, reviews, stats_all, config)
    guard_totals: dict[str, int] = {}
    for it in iterations:
        for src in (it["guard"] if isinstance(it["guard"], dict) else {}, it["pairing"] or {}):
            for k, v in src.items():
                if k in ("off", "prompts", "kept"):
                    continue
                if _num(v) is not None:
                    guard_totals[k] = guard_totals.get(k, 0) + v

    final_policy = state.get("final_policy") if isinstance(state.get("final_policy"), str) else None
    trained = [it for it in iterations if it["policy"]]
    report = {
        "run_dir": run_dir,
        "state_checksum_ok": _checksum_ok(state),
        "finished": final_policy is not None,
        "converged_at": converged_at,
        "final_policy": final_policy,
        "latest_policy": trained[-1]["policy"] if trained else None,
        "data": state.get("data"),
        "config": {label: _cfg(config, key) for label, key, _ in CONFIG_HIGHLIGHTS},
        "config_flags": {label: flag for label, _, flag in CONFIG_HIGHLIGHTS},
        "iterations": iterations,
        "suspicious_pairs": {"iteration": suspicious_iter, "n_negative_irm": n_negative, "pairs": suspicious},
        "guard_totals": guard_totals,
    }
    if _cfg(config, "model.ipo_enable") and report["config"]["loss"] in (None, "dpo"):
        report["config"]["loss"] = "ipo"
    return report, series


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


def _suspicious(run_dir, ts, reviews, stats_all, config):
    """The N_SUSPICIOUS offline pairs with the most negative IRM in the last review."""
    reviewed = [t for t in ts if t in reviews]
    in_stats = [t for t in ts if isinstance(_get(stats_all, str(t), "review"), dict)]
    if reviewed:
        t = reviewed[-1]
        n_negative, worst = reviews[t]["n_negative"], reviews[t]["worst"]
    elif in_stats:
        t = in_stats[-1]
        rv = stats_all[str(t)]["review"]
        n_negative = _num(rv.get("n_negative_irm"))
        mn = rv.get("most_negative")
        worst = [r for r in (mn if isinstance(mn, list) else []) if isinstance(r, dict)][:N_SUSPICIOUS]
    else:
        return [], None, None
    worst = [r for r in worst if _rid(r) is not None]
    texts = _text_lookup(run_dir, ts, config, {_rid(r) for r in worst})
    history = {u: reviews[u]["irm"] for u in reviewed}
    out = []
    for r in worst:
        i = _rid(r)
        prompt, chosen, rejected = texts.get(i, (None, None, None))
        out.append({
            "id": i, "irm": _num(r.get("irm")), "kept": _kept(r),
            "chosen_reward": _num(r.get("chosen_reward")), "rejected_reward": _num(r.get("rejected_reward")),
            "chosen_len": _num(r.get("chosen_len")), "rejected_len": _num(r.get("rejected_len")),
            "fold": r.get("fold"),
            "irm_by_iteration": {str(u): history[u].get(i) for u in reviewed if i in history[u]},
            "prompt": None if prompt is None else _truncate(prompt),
            "chosen": None if chosen is None else _truncate(chosen),
            "rejected": None if rejected is None else _truncate(rejected),
        })
    return out, t, n_negative


def build_report(run_dir: str) -> dict:
    """Every number of the report of `run_dir`, as a JSON-serialisable dict (no files are written).

    Raises StateError when `run_dir` does not exist or has no `sera_state.json`.
    """
    return _collect(run_dir)[0]


# ---------------------------------------------------------------------------------------------------- plots


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    from sera_openrlhf.fileio import atomic_open

    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def _legend(ax, **kw) -> None:
    """ax.legend(**kw) when anything is labelled (no warning on an empty panel)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _iter_ticks(ax, ts):
    ax.set_xticks(list(ts))
    ax.set_xticklabels([str(t) for t in ts])
    ax.set_xlim(min(ts) - 0.6, max(ts) + 0.6)


def _plot_irm_hist(series, report, path) -> bool:
    data = {t: v for t, v in sorted(series["review"].items())
            if any(x is not None for x in v[0])}
    if not data:
        return False
    import numpy as np

    n = len(data)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 3.2 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)  # same bins and limits; every panel keeps its tick labels
    allv = np.array([x for irm, _ in data.values() for x in irm if x is not None], dtype=float)
    # a few extreme pairs would squeeze the rest into one bin: on large sets the axis spans the 0.5-99.5 %
    # range and the pairs beyond it are counted in the edge bins
    lo, hi = (np.quantile(allv, [0.005, 0.995]) if allv.size >= 200 else (allv.min(), allv.max()))
    lo, hi = float(lo), float(hi)
    if allv.min() <= 0.0 <= allv.max():
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    for ax, (t, (irm, kept)) in zip(axes.flat, data.items()):
        k = np.array([x for x, m in zip(irm, kept) if m and x is not None], dtype=float)
        dr = np.array([x for x, m in zip(irm, kept) if not m and x is not None], dtype=float)
        n_out = int(((k < lo) | (k > hi)).sum() + ((dr < lo) | (dr > hi)).sum())
        ax.hist([np.clip(k, lo, hi), np.clip(dr, lo, hi)], bins=bins, stacked=True, histtype="stepfilled",
                color=["tab:green", "tab:gray"], label=[f"kept (n={k.size})", f"dropped (n={dr.size})"],
                alpha=0.85)
        if lo <= 0.0 <= hi:
            ax.axvline(0.0, color="tab:red", ls="--", lw=1, label="IRM = 0")
        share = k.size / max(k.size + dr.size, 1)
        title = f"iteration {t}: kept {share:.0%}"
        if n_out:
            title += f"\n({n_out} pairs beyond the axis, counted in the edge bins)"
        ax.set_title(title, fontsize=10)
        ax.set_xlim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
        ax.set_xlabel("implicit reward margin (IRM)")
        ax.set_ylabel("offline pairs")
        _legend(ax, fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle("Self-review: IRM of offline pairs under the reviewing policy")
    _save(fig, path)
    return True


def _plot_kept_share(report, path) -> bool:
    its = [it for it in report["iterations"] if it["kept_share"] is not None or it["mean_kept_irm"] is not None]
    if not its:
        return False
    ts = [it["iteration"] for it in its]
    fig = _figure(9, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    shares = [it["kept_share"] for it in its]
    xs = [t for t, s in zip(ts, shares) if s is not None]
    ys = [s for s in shares if s is not None]
    bars = ax1.bar(xs, ys, color="tab:green", width=0.6, label="kept share")
    for b, y in zip(bars, ys):
        ax1.annotate(f"{y:.0%}", (b.get_x() + b.get_width() / 2, y / 2), ha="center", va="center", fontsize=9,
                     color="white", fontweight="bold")
    ratio = report["config"].get("keep ratio")
    if _num(ratio) is not None and report["config"].get("select mode") in (None, "top"):
        ax1.axhline(ratio, color="k", ls=":", lw=1, label=f"--sera.keep_ratio {ratio}")
    ax1.set_ylim(0, 1.3)
    ax1.set_title("Kept share of offline pairs")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("kept / all offline pairs")
    _legend(ax1, fontsize=8, loc="upper center", ncols=2)
    _iter_ticks(ax1, ts)
    pts = [(it["iteration"], it["mean_kept_irm"]) for it in its if it["mean_kept_irm"] is not None]
    if pts:
        ax2.plot(*zip(*pts), "o-", color="tab:blue", label="mean IRM, kept pairs")
    med = [(it["iteration"], _get(it, "irm_quantiles", "all", "p50")) for it in its]
    med = [(t, v) for t, v in med if _num(v) is not None]
    if med:
        ax2.plot(*zip(*med), "s--", color="tab:gray", label="median IRM, all pairs")
    ax2.axhline(0.0, color="tab:red", ls=":", lw=1)
    ax2.set_title("Mean IRM of kept pairs")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("implicit reward margin")
    _legend(ax2, fontsize=8)
    _iter_ticks(ax2, ts)
    _save(fig, path)
    return True


def _plot_lengths(report, path) -> bool:
    import numpy as np

    off = [(it["iteration"], it["mean_len_offline"]) for it in report["iterations"]
           if isinstance(it["mean_len_offline"], dict)]
    boot = [(it["iteration"], it["mean_len_bootstrapped"]) for it in report["iterations"]
            if isinstance(it["mean_len_bootstrapped"], dict)]
    if not off and not boot:
        return False
    panels = [p for p in (("offline", off), ("boot", boot)) if p[1]]
    fig = _figure(4.8 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    nan = float("nan")
    for ax, (kind, data) in zip(axes, panels):
        ts = [t for t, _ in data]
        x = np.arange(len(ts))
        if kind == "offline":
            groups = [("kept, chosen", ("kept", "chosen"), "tab:green", None),
                      ("kept, rejected", ("kept", "rejected"), "tab:green", "//"),
                      ("dropped, chosen", ("dropped", "chosen"), "tab:gray", None),
                      ("dropped, rejected", ("dropped", "rejected"), "tab:gray", "//")]
            title = "Offline pairs: kept vs dropped"
        else:
            groups = [("chosen", ("chosen",), "tab:blue", None), ("rejected", ("rejected",), "tab:orange", "//")]
            title = "Bootstrapped pairs"
        w = 0.8 / len(groups)
        for j, (label, keys, color, hatch) in enumerate(groups):
            ys = [_num(_get(d, *keys)) for _, d in data]
            ax.bar(x + (j - (len(groups) - 1) / 2) * w, [nan if y is None else y for y in ys], w,
                   color=color, hatch=hatch, edgecolor="white" if hatch is None else "k", lw=0.4,
                   alpha=0.9 if "rejected" not in label else 0.6, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels([str(t) for t in ts])
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean response length (tokens)")
        ax.set_title(title)
        top = ax.get_ylim()[1]
        ax.set_ylim(0, top * 1.3)
        _legend(ax, fontsize=8, loc="upper center", ncols=2)
    fig.suptitle("Response lengths (a chosen/rejected gap is a length bias)")
    _save(fig, path)
    return True


def _plot_margins(series, path) -> bool:
    data = {t: m for t, m in sorted(series["margins"].items()) if m}
    if not data:
        return False
    import numpy as np

    fig = _figure(6.4, 3.6)
    ax = fig.subplots()
    allv = [x for m in data.values() for x in m]
    lo, hi = min(allv), max(allv)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
    colors = ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    for j, (t, m) in enumerate(data.items()):
        c = colors[j % len(colors)]
        ax.hist(m, bins=bins, histtype="stepfilled", alpha=0.35, color=c)
        ax.hist(m, bins=bins, histtype="step", lw=1.5, color=c,
                label=f"iteration {t}: {len(m)} pairs, mean {sum(m) / len(m):.3g}")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Bootstrapped pairs: ensembled implicit-reward margin")
    ax.set_xlabel("margin r(chosen) − r(rejected)")
    ax.set_ylabel("pairs")
    _legend(ax, fontsize=8)
    _save(fig, path)
    return True


def _smooth(ys, window):
    out, acc, q = [], 0.0, []
    for y in ys:
        q.append(y)
        acc += y
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def _plot_training(series, path) -> bool:
    logs = {t: [r for r in log if _num(r.get("loss")) is not None or _num(r.get("acc")) is not None]
            for t, log in sorted(series["train_log"].items())}
    logs = {t: log for t, log in logs.items() if log}
    if not logs:
        return False
    fig = _figure(9, 5.2)
    ax_loss, ax_acc = fig.subplots(2, 1, sharex=True)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    offset, boundaries = 0, []
    for j, (t, log) in enumerate(logs.items()):
        c = colors[j % len(colors)]
        n = len(log)
        window = max(1, min(25, n // 10))
        xs = list(range(offset + 1, offset + n + 1))
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            pts = [(x, _num(r.get(key))) for x, r in zip(xs, log) if _num(r.get(key)) is not None]
            if not pts:
                continue
            px, py = zip(*pts)
            if window > 1:
                ax.plot(px, py, color=c, alpha=0.25, lw=0.8)
                ax.plot(px, _smooth(py, window), color=c, lw=1.6,
                        label=f"iteration {t} ({window}-step mean)" if key == "loss" else None)
            else:
                ax.plot(px, py, "o-" if n < 30 else "-", ms=3, color=c, lw=1.4,
                        label=f"iteration {t}" if key == "loss" else None)
        boundaries.append((offset, t))
        offset += n
    for ax in (ax_loss, ax_acc):
        for b, t in boundaries[1:]:
            ax.axvline(b + 0.5, color="k", ls="--", lw=0.8)
    for b, t in boundaries:
        ax_loss.annotate(f"iter {t}", (b + 1, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=8,
                         xytext=(3, -3), textcoords="offset points")
    ax_loss.set_ylabel("train loss")
    ax_loss.set_title("Training (optimizer steps of all iterations, dashed lines = iteration boundaries)")
    _legend(ax_loss, fontsize=8, loc="upper right")
    ax_acc.set_ylabel("train accuracy")
    ax_acc.set_ylim(-0.05, 1.05)
    ax_acc.set_xlabel("optimizer step (cumulative)")
    _save(fig, path)
    return True


def _plot_convergence(report, path) -> bool:
    jac = [(it["iteration"], it["jaccard"]) for it in report["iterations"] if it["jaccard"] is not None]
    irm = [(it["iteration"], it["mean_kept_irm"]) for it in report["iterations"] if it["mean_kept_irm"] is not None]
    if not jac and not irm:
        return False
    ts = sorted({t for t, _ in jac} | {t for t, _ in irm})
    fig = _figure(9, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    thr = _num(report["config"].get("converge Jaccard"))
    if jac:
        ax1.plot(*zip(*jac), "o-", color="tab:purple", label="Jaccard(kept_t, kept_t-1)")
    else:
        ax1.text(0.5, 0.5, "needs two reviewed iterations", ha="center", va="center", transform=ax1.transAxes)
    if thr is not None:
        ax1.axhline(thr, color="k", ls=":", lw=1, label=f"--sera.converge_jaccard {thr}")
    ax1.set_ylim(0, 1.05)
    ax1.set_title("Kept-set overlap with the previous iteration")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("Jaccard overlap")
    _legend(ax1, fontsize=8, loc="lower right")
    _iter_ticks(ax1, ts)
    if irm:
        ax2.plot(*zip(*irm), "o-", color="tab:blue", label="mean IRM, kept pairs")
    ax2.set_title("Mean IRM of kept pairs")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("implicit reward margin")
    _iter_ticks(ax2, ts)
    conv = report.get("converged_at")
    if conv is not None:
        for ax in (ax1, ax2):
            ax.axvline(conv, color="tab:red", ls="--", lw=1, label=f"converged at iteration {conv}")
    _legend(ax2, fontsize=8)
    if conv is not None:
        _legend(ax1, fontsize=8, loc="lower right")
    fig.suptitle("Convergence: stop when the kept set is stable and its mean IRM stops rising")
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------------- markdown


def _fmt(x, kind: str = "g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if kind == "pct":
        return f"{x:.1%}"
    if kind == "int":
        return f"{int(x)}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _cell(text) -> str:
    s = "—" if text is None else str(text)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return s.replace("\r", "").replace("\n", " ⏎ ")


def _pair_len(d, *keys) -> str:
    """"chosen / rejected" mean lengths, one decimal."""
    c, r = _num(_get(d, *keys, "chosen")), _num(_get(d, *keys, "rejected"))
    if c is None and r is None:
        return "—"
    return " / ".join("—" if v is None else f"{v:.1f}" for v in (c, r))


def _markdown(report: dict, plots: dict) -> str:
    L = []
    name = os.path.basename(report["run_dir"].rstrip("/")) or report["run_dir"]
    L.append(f"# SeRA run report: {name}\n")
    L.append(f"Run directory: `{report['run_dir']}`\n")
    its = report["iterations"]
    if report["converged_at"] is not None:
        status = (f"converged at iteration {report['converged_at']} (kept set stable, mean kept IRM no longer "
                  f"rising); the final policy is iteration {report['converged_at'] - 1}'s")
    elif report["finished"]:
        status = f"finished after {len([i for i in its if i['status'] == 'trained'])} trained iteration(s)"
    else:
        status = "not finished (running, interrupted, or stopped by an error); rerun the same command to resume"
    L.append(f"Status: {status}.\n")
    if report["state_checksum_ok"] is False:
        L.append("**Warning:** `sera_state.json` fails its checksum (edited or corrupted); numbers may be off.\n")
    data = report.get("data")
    if isinstance(data, dict):
        files = ", ".join(f"`{f.get('path')}` ({f.get('n_pairs')} pairs, {f.get('format')})"
                          for f in data.get("files") or [] if isinstance(f, dict))
        skipped = data.get("skipped") or {}
        line = f"Offline data: {data.get('n_pairs', '—')} pairs"
        if files:
            line += f" from {files}"
        if skipped:
            line += "; skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items())
        L.append(line + ".\n")

    L.append("## Final policy\n")
    if report["final_policy"]:
        L.append(f"`{report['final_policy']}`\n")
    elif report["latest_policy"]:
        L.append(f"The run has not finished; the latest trained policy is `{report['latest_policy']}`.\n")
    else:
        L.append("No policy has been trained yet.\n")

    L.append("## Iterations\n")
    head = ["iter", "status", "pairs trained", "offline kept", "generated", "generated share", "kept share",
            "mean kept IRM", "Jaccard prev.", "guard drops", "truncated share", "bootstrapped pairs",
            "len kept c/r", "len boot c/r", "final loss", "final acc"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for it in its:
        guard = it["guard"]
        gd = "off" if isinstance(guard, dict) and guard.get("off") else _fmt(it["guard_dropped"], "int")
        row = [str(it["iteration"]), it["status"], _fmt(it["pairs_trained"], "int"), _fmt(it["offline_kept"], "int"),
               _fmt(it["generated"], "int"), _fmt(it["generated_share"], "pct"), _fmt(it["kept_share"], "pct"),
               _fmt(it["mean_kept_irm"]), _fmt(it["jaccard"]), gd, _fmt(it["truncated_share"], "pct"),
               _fmt(it["bootstrapped_pairs"], "int"), _pair_len(it["mean_len_offline"], "kept"),
               _pair_len(it["mean_len_bootstrapped"]), _fmt(it["final_loss"]), _fmt(it["final_acc"])]
        L.append("| " + " | ".join(_cell(c) for c in row) + " |")
    L.append("")
    L.append("Iteration 1 trains on every offline pair; later iterations train on the kept offline pairs plus "
             "generated (bootstrapped) pairs. *Offline kept* counts the pairs self-review kept; *generated* the "
             "bootstrapped pairs that entered training (of *bootstrapped pairs* made); *guard drops* the samples "
             "the fluency guard removed; *len* columns are mean token lengths, chosen / rejected.\n")
    sig = [(it["iteration"], it["review_signal"]) for it in its
           if it.get("review_signal") and _num(it["review_signal"].get("lower_bound")) is not None]
    if sig:
        L.append("Self-review signal (share of offline pairs whose out-of-fold IRM agrees with the label; chance "
                 "is 50 %): " + "; ".join(
                     f"iteration {t}: {_fmt(_num(g.get('label_agreement')), 'pct')} (95 % lower bound "
                     f"{_fmt(_num(g['lower_bound']), 'pct')})"
                     + (" (**no signal**: selection kept every pair)" if g.get("action") == "keep_all" else
                        " (**no signal**: selection is random subsampling)" if g.get("action") == "warned" else "")
                     for t, g in sig) + ".\n")
    folds = [(it["iteration"], f) for it in its for f in (it["crossfit"] or [])]
    if folds:
        L.append("Cross-fitted review policies (iteration 1): " + "; ".join(
            f"fold {f['fold']}: {_fmt(f['n_train_pairs'], 'int')} pairs, final loss {_fmt(f['loss_last'])}, "
            f"acc {_fmt(f['acc_last'])}" for _, f in folds) + ".\n")

    L.append("## Configuration highlights\n")
    L.append("| setting | flag | value |")
    L.append("|---|---|---|")
    for label, value in report["config"].items():
        if value is None and label not in ("fluency floor",):
            continue
        L.append(f"| {_cell(label)} | `{report['config_flags'][label]}` | {_cell(_fmt(value))} |")
    L.append("")

    sp = report["suspicious_pairs"]
    L.append("## Most suspicious offline pairs\n")
    if sp["iteration"] is None:
        L.append("No self-review has run yet.\n")
    elif not sp["pairs"]:
        L.append(f"No offline pair has a negative IRM in the review of iteration {sp['iteration']}.\n")
    else:
        L.append(f"The {len(sp['pairs'])} pairs with the most negative implicit reward margin in the review of "
                 f"iteration {sp['iteration']} ({_fmt(sp['n_negative_irm'], 'int')} pairs have IRM < 0): the "
                 "policy prefers the *rejected* response, often a sign of a flipped label. Texts are cut at "
                 f"{TEXT_CHARS} characters.\n")
        L.append("| # | id | IRM | kept | IRM by iteration | prompt | chosen | rejected |")
        L.append("|---|---|---|---|---|---|---|---|")
        for n, p in enumerate(sp["pairs"], 1):
            hist = ", ".join(f"{u}: {_fmt(v)}" for u, v in p["irm_by_iteration"].items())
            L.append("| " + " | ".join(_cell(c) for c in (
                n, p["id"], _fmt(p["irm"]), _fmt(p["kept"]), hist or "—", p["prompt"], p["chosen"],
                p["rejected"])) + " |")
        L.append("")

    L.append("## Bootstrapping guards\n")
    boot = [it for it in its if it["guard"] is not None or it["pairing"] is not None]
    if not boot:
        L.append("No bootstrapping has run yet.\n")
    else:
        head = ["iter", "samples", "truncated share", "fluency: low", "fluency: degenerate text", "samples kept",
                "truncated dropped", "prompts w/o pair: too few valid", "duplicate texts", "below min margin",
                "top-fraction cut", "pairs"]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for it in boot:
            g = it["guard"] if isinstance(it["guard"], dict) else {}
            p = it["pairing"] or {}
            off = g.get("off")
            row = [it["iteration"], _fmt(it["n_samples"], "int"), _fmt(it["truncated_share"], "pct"),
                   "off" if off else _fmt(_num(g.get("low_fluency")), "int"),
                   "off" if off else _fmt(_num(g.get("degenerate_text")), "int"),
                   "all" if off else _fmt(_num(g.get("kept")), "int"), _fmt(p.get("truncated_dropped"), "int"),
                   _fmt(p.get("too_few_valid"), "int"), _fmt(p.get("duplicate_texts"), "int"),
                   _fmt(p.get("below_min_margin"), "int"), _fmt(p.get("top_fraction_cut"), "int"),
                   _fmt(it["bootstrapped_pairs"], "int")]
            L.append("| " + " | ".join(_cell(c) for c in row) + " |")
        L.append("")
        if report["guard_totals"]:
            L.append("Totals over iterations: " + ", ".join(f"{k} {v}" for k, v in report["guard_totals"].items())
                     + ".\n")

    captions = {
        "irm_hist": "IRM of every offline pair at each self-review, kept (green) vs dropped (grey).",
        "kept_share": "Kept share of offline pairs and the mean IRM of the kept pairs.",
        "lengths": "Mean chosen/rejected lengths of kept vs dropped offline pairs and of bootstrapped pairs.",
        "bootstrap_margins": "Distribution of the bootstrapped pairs' ensembled implicit-reward margins.",
        "training": "Train loss and accuracy per optimizer step, iterations concatenated.",
        "convergence": "Jaccard overlap of consecutive kept sets and mean kept IRM.",
    }
    if plots:
        L.append("## Plots\n")
        for key in PLOTS:
            if key in plots:
                L.append(f"{captions[key]}\n")
                L.append(f"![{key}]({plots[key]})\n")
    return "\n".join(L).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- entry


def write_report(run_dir: str) -> str:
    """Write `<run_dir>/report/` (report.md, report.json, PNG plots) and return the path of report.md.

    Raises StateError when `run_dir` does not exist or has no `sera_state.json`.
    """
    report, series = _collect(run_dir)
    out = os.path.join(report["run_dir"], REPORT_DIR)
    os.makedirs(out, exist_ok=True)
    drawers = {
        "irm_hist": lambda p: _plot_irm_hist(series, report, p),
        "kept_share": lambda p: _plot_kept_share(report, p),
        "lengths": lambda p: _plot_lengths(report, p),
        "bootstrap_margins": lambda p: _plot_margins(series, p),
        "training": lambda p: _plot_training(series, p),
        "convergence": lambda p: _plot_convergence(report, p),
    }
    plots = {}
    for key in PLOTS:
        path = os.path.join(out, f"{key}.png")
        if drawers[key](path):
            plots[key] = f"{key}.png"
        elif os.path.exists(path):  # a stale plot from an earlier report would contradict this one
            os.unlink(path)
    report["plots"] = plots
    atomic_write_json(os.path.join(out, "report.json"), report)
    md = os.path.join(out, "report.md")
    atomic_write_text(md, _markdown(report, plots))
    return md
