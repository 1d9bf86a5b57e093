"""report.json and report.md from a RunSummary (collect.py); the PNGs are drawn in plots.py."""

from __future__ import annotations

import dataclasses
import math
import os

from sera_openrlhf.report.collect import TEXT_CHARS, IterationSummary, RunSummary, dig, num
from sera_openrlhf.report.plots import PLOTS

CAPTIONS = {
    "irm_hist": "IRM of every offline pair at each self-review, kept (green) vs dropped (grey).",
    "kept_share": "Kept share of offline pairs and the mean IRM of the kept pairs.",
    "lengths": "Mean chosen/rejected lengths of kept vs dropped offline pairs and of bootstrapped pairs.",
    "bootstrap_margins": "Distribution of the bootstrapped pairs' ensembled implicit-reward margins.",
    "training": "Train loss and accuracy per optimizer step, iterations concatenated.",
    "convergence": "Jaccard overlap of consecutive kept sets and mean kept IRM.",
}


def report_dict(summary: RunSummary) -> dict:
    """Every number of the report as a JSON-serialisable dict: the summary without its plot series."""
    out = dataclasses.asdict(dataclasses.replace(summary, series=None))
    del out["series"]
    return out


def markdown(summary: RunSummary, plots: dict[str, str]) -> str:
    """report.md; `plots` maps the plot names that were drawn to their file names."""
    lines = [*_header(summary), *_final_policy(summary), *_iterations(summary), *_config(summary),
             *_suspicious(summary), *_guards(summary), *_resources(summary), *_plots(plots)]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- cells


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


def _row(cells) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table_head(head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _pair_len(d, *keys) -> str:
    """"chosen / rejected" mean lengths, one decimal."""
    c, r = num(dig(d, *keys, "chosen")), num(dig(d, *keys, "rejected"))
    if c is None and r is None:
        return "—"
    return " / ".join("—" if v is None else f"{v:.1f}" for v in (c, r))


# ---------------------------------------------------------------------------------------------------- sections


def _header(s: RunSummary) -> list[str]:
    name = os.path.basename(s.run_dir.rstrip("/")) or s.run_dir
    if s.converged_at is not None:
        status = (f"converged at iteration {s.converged_at} (kept set stable, mean kept IRM no longer "
                  f"rising); the final policy is iteration {s.converged_at - 1}'s")
    elif s.finished:
        status = f"finished after {len([i for i in s.iterations if i.status == 'trained'])} trained iteration(s)"
    else:
        status = "not finished (running, interrupted, or stopped by an error); rerun the same command to resume"
    lines = [f"# SeRA run report: {name}\n", f"Run directory: `{s.run_dir}`\n", f"Status: {status}.\n"]
    if s.state_checksum_ok is False:
        lines.append("**Warning:** `sera_state.json` fails its checksum (edited or corrupted); numbers may be off.\n")
    if isinstance(s.data, dict):
        files = ", ".join(f"`{f.get('path')}` ({f.get('n_pairs')} pairs, {f.get('format')})"
                          for f in s.data.get("files") or [] if isinstance(f, dict))
        skipped = s.data.get("skipped") or {}
        line = f"Offline data: {s.data.get('n_pairs', '—')} pairs"
        if files:
            line += f" from {files}"
        if skipped:
            line += "; skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items())
        lines.append(line + ".\n")
        too_long = s.data.get("prompt_too_long") or {}
        counts = {**too_long.get("pairs", {}), **too_long.get("prompts", {})}
        if any(counts.values()):
            lines.append("Skipped for a prompt longer than `--data.max_len`: "
                         + ", ".join(f"{n} from `{src}`" for src, n in counts.items()) + ".\n")
    return lines


def _final_policy(s: RunSummary) -> list[str]:
    if s.final_policy:
        text = f"`{s.final_policy}`\n"
    elif s.latest_policy:
        text = f"The run has not finished; the latest trained policy is `{s.latest_policy}`.\n"
    else:
        text = "No policy has been trained yet.\n"
    return ["## Final policy\n", text]


def _iterations(s: RunSummary) -> list[str]:
    lines = ["## Iterations\n"]
    lines += _table_head(["iter", "status", "pairs trained", "offline kept", "generated", "generated share",
                          "kept share", "mean kept IRM", "Jaccard prev.", "guard drops", "truncated share",
                          "bootstrapped pairs", "len kept c/r", "len boot c/r", "final loss", "final acc"])
    lines += [_row(_iteration_cells(it)) for it in s.iterations]
    lines.append("")
    lines.append("Iteration 1 trains on every offline pair; later iterations train on the kept offline pairs plus "
                 "generated (bootstrapped) pairs. *Offline kept* counts the pairs self-review kept; *generated* the "
                 "bootstrapped pairs that entered training (of *bootstrapped pairs* made); *guard drops* the "
                 "samples the fluency guard removed; *len* columns are mean token lengths, chosen / rejected.\n")
    return lines + _review_signal(s.iterations) + _calibration(s.iterations) + _crossfit(s.iterations) + \
        _eval(s.iterations)


def _iteration_cells(it: IterationSummary) -> list:
    guard_off = isinstance(it.guard, dict) and it.guard.get("off")
    return [str(it.iteration), it.status, _fmt(it.pairs_trained, "int"), _fmt(it.offline_kept, "int"),
            _fmt(it.generated, "int"), _fmt(it.generated_share, "pct"), _fmt(it.kept_share, "pct"),
            _fmt(it.mean_kept_irm), _fmt(it.jaccard), "off" if guard_off else _fmt(it.guard_dropped, "int"),
            _fmt(it.truncated_share, "pct"), _fmt(it.bootstrapped_pairs, "int"),
            _pair_len(it.mean_len_offline, "kept"), _pair_len(it.mean_len_bootstrapped), _fmt(it.final_loss),
            _fmt(it.final_acc)]


def _review_signal(iterations: list[IterationSummary]) -> list[str]:
    sig = [(it.iteration, it.review_signal) for it in iterations
           if it.review_signal and num(it.review_signal.get("lower_bound")) is not None]
    if not sig:
        return []
    parts = [f"iteration {t}: {_fmt(num(g.get('label_agreement')), 'pct')} (95 % lower bound "
             f"{_fmt(num(g['lower_bound']), 'pct')})"
             + (" (**no signal**: selection kept every pair)" if g.get("action") == "keep_all" else
                " (**no signal**: selection is random subsampling)" if g.get("action") == "warned" else
                " (**no signal**: every pair got the prior confidence, cDPO)" if g.get("action") == "prior" else "")
             for t, g in sig]
    return ["Self-review signal (share of offline pairs whose out-of-fold IRM agrees with the label; chance "
            "is 50 %): " + "; ".join(parts) + ".\n"]


def _calibration(iterations: list[IterationSummary]) -> list[str]:
    cal = [(it.iteration, it.calibration) for it in iterations if it.calibration]
    if not cal:
        return []
    parts = [f"iteration {t}" + ("" if c.get("out_of_fold", True) else " (in sample)") + ": " +
             (f"cDPO weights ({c['fallback']})" if c.get("fallback") else
              f"estimated flip rate {_fmt(num(c.get('flip_rate')), 'pct')}, estimated flip-detection AUROC "
              f"{_fmt(num(c.get('est_flip_auroc')))}") +
             (f", correlation with the previous review {_fmt(num(c['previous_review_correlation']))}"
              if c.get("previous_review_correlation") is not None else "") for t, c in cal]
    return ["Review calibration (gold-free: right labels' IRMs fitted as N(mu, sigma^2), flipped ones as "
            "N(-mu, sigma^2); in-sample IRMs overstate it; with `--sera.select_mode soft` each pair trains with "
            "its confidence, and without signal every pair gets 1 - `--model.label_smoothing`, i.e. cDPO): "
            + "; ".join(parts) + ".\n"]


def _crossfit(iterations: list[IterationSummary]) -> list[str]:
    folds = [f for it in iterations for f in (it.crossfit or [])]
    if not folds:
        return []
    return ["Cross-fitted review twins (each scores its fold at the next review): " + "; ".join(
        f"fold {f.fold}: {_fmt(f.n_train_pairs, 'int')} pairs, final loss {_fmt(f.loss_last)}, "
        f"acc {_fmt(f.acc_last)}" for f in folds) + ".\n"]


def _eval(iterations: list[IterationSummary]) -> list[str]:
    lines = []
    evals = [(it.iteration, it.eval) for it in iterations if isinstance(it.eval, dict)]
    if evals:
        lines.append("Evaluation on `--eval.dataset` after each iteration's training: " + "; ".join(
            f"iteration {t}: loss {_fmt(num(e.get('eval_loss')))}, reward accuracy "
            f"{_fmt(num(e.get('acc_mean')), 'pct')}, mean margin {_fmt(num(e.get('margin')))}" for t, e in evals)
            + ".\n")
    lora = [(it.iteration, it.lora) for it in iterations if isinstance(it.lora, dict)]
    if lora:
        lines.append("LoRA: each iteration saved its adapter and merged it into its base; scoring, generation and "
                     "the next iteration load the merged checkpoint, the reference stays the base model ("
                     + "; ".join(f"iteration {t}: adapter `{x.get('adapter')}`" for t, x in lora) + ").\n")
    return lines


def _config(s: RunSummary) -> list[str]:
    lines = ["## Configuration highlights\n", "| setting | flag | value |", "|---|---|---|"]
    for label, value in s.config.items():
        if value is None and label != "fluency floor":
            continue
        lines.append(f"| {_cell(label)} | `{s.config_flags[label]}` | {_cell(_fmt(value))} |")
    return lines + [""]


def _resources(s: RunSummary) -> list[str]:
    if not s.resources:
        return []
    lines = ["## Time and memory per phase\n"]
    p = s.resolved_precision
    if p:
        lines.append(f"Precision: {p.get('choice')} ({_cell(p.get('reason'))}).\n")
    cuda = any("cuda_peak_mb" in r for r in s.resources)
    ranks = any("generated_per_rank" in r or "scored_per_rank" in r for r in s.resources)
    lines += _table_head(["phase", "seconds", "peak RSS (MB)"] + (["peak CUDA (MB)"] if cuda else []) +
                         (["prompts generated per rank", "sequences scored per rank"] if ranks else []))
    for r in s.resources:
        cells = [r["phase"], _fmt(r["seconds"]), _fmt(r.get("peak_rss_mb"))] + (
            [_fmt(r.get("cuda_peak_mb"))] if cuda else [])
        if ranks:
            cells += [" / ".join(_fmt(v, "int") for v in r[k]) if k in r else "—"
                      for k in ("generated_per_rank", "scored_per_rank")]
        lines.append(_row(cells))
    if ranks:
        lines.append("\nPer rank: the work of each data-parallel rank (rank 0 first); memory is rank 0's.\n")
    return lines + [""]


def _suspicious(s: RunSummary) -> list[str]:
    sp = s.suspicious_pairs
    lines = ["## Most suspicious offline pairs\n"]
    if sp.iteration is None:
        return lines + ["No self-review has run yet.\n"]
    if not sp.pairs:
        return lines + [f"No offline pair has a negative IRM in the review of iteration {sp.iteration}.\n"]
    lines.append(f"The {len(sp.pairs)} pairs with the most negative implicit reward margin in the review of "
                 f"iteration {sp.iteration} ({_fmt(sp.n_negative_irm, 'int')} pairs have IRM < 0): the "
                 "policy prefers the *rejected* response, often a sign of a flipped label. Texts are cut at "
                 f"{TEXT_CHARS} characters.\n")
    lines += _table_head(["#", "id", "IRM", "kept", "IRM by iteration", "prompt", "chosen", "rejected"])
    for n, p in enumerate(sp.pairs, 1):
        history = ", ".join(f"{u}: {_fmt(v)}" for u, v in p.irm_by_iteration.items())
        lines.append(_row((n, p.id, _fmt(p.irm), _fmt(p.kept), history or "—", p.prompt, p.chosen, p.rejected)))
    return lines + [""]


def _guards(s: RunSummary) -> list[str]:
    lines = ["## Bootstrapping guards\n"]
    boot = [it for it in s.iterations if it.guard is not None or it.pairing is not None]
    if not boot:
        return lines + ["No bootstrapping has run yet.\n"]
    lines += _table_head(["iter", "samples", "truncated share", "fluency: low", "fluency: degenerate text",
                          "samples kept", "truncated dropped", "prompts w/o pair: too few valid", "duplicate texts",
                          "below min margin", "top-fraction cut", "pairs"])
    for it in boot:
        g = it.guard if isinstance(it.guard, dict) else {}
        p = it.pairing or {}
        off = g.get("off")
        lines.append(_row([
            it.iteration, _fmt(it.n_samples, "int"), _fmt(it.truncated_share, "pct"),
            "off" if off else _fmt(num(g.get("low_fluency")), "int"),
            "off" if off else _fmt(num(g.get("degenerate_text")), "int"),
            "all" if off else _fmt(num(g.get("kept")), "int"), _fmt(p.get("truncated_dropped"), "int"),
            _fmt(p.get("too_few_valid"), "int"), _fmt(p.get("duplicate_texts"), "int"),
            _fmt(p.get("below_min_margin"), "int"), _fmt(p.get("top_fraction_cut"), "int"),
            _fmt(it.bootstrapped_pairs, "int")]))
    lines.append("")
    if s.guard_totals:
        lines.append("Totals over iterations: " + ", ".join(f"{k} {v}" for k, v in s.guard_totals.items()) + ".\n")
    return lines


def _plots(plots: dict[str, str]) -> list[str]:
    if not plots:
        return []
    lines = ["## Plots\n"]
    for key in PLOTS:
        if key in plots:
            lines += [f"{CAPTIONS[key]}\n", f"![{key}]({plots[key]})\n"]
    return lines
