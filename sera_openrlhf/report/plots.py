"""The report's PNG plots, one function per file (`DRAWERS` maps `<name>.png` to its function).

Matplotlib and numpy are imported when a plot is drawn, not with this module, and draw through the Agg canvas
directly (no pyplot), so rendering never touches a global backend. A plot without data is not drawn.
"""

from __future__ import annotations

import io
import math
import os

from sera_openrlhf.fileio import atomic_open
from sera_openrlhf.report.collect import RunSummary, dig, num


def draw_plots(summary: RunSummary, out_dir: str) -> dict[str, str]:
    """Draw every plot that has data to `out_dir/<name>.png`; returns {name: file name} of the drawn ones."""
    plots = {}
    for name, draw in DRAWERS.items():
        path = os.path.join(out_dir, f"{name}.png")
        if draw(summary, path):
            plots[name] = f"{name}.png"
        elif os.path.exists(path):  # a stale plot from an earlier report would contradict this one
            os.unlink(path)
    return plots


# ---------------------------------------------------------------------------------------------------- canvas


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
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


# ---------------------------------------------------------------------------------------------------- plots


def plot_irm_hist(summary: RunSummary, path: str) -> bool:
    """irm_hist.png: IRM histogram per reviewed iteration, kept vs dropped."""
    data = {t: v for t, v in sorted(summary.series.review.items()) if any(x is not None for x in v[0])}
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


def plot_kept_share(summary: RunSummary, path: str) -> bool:
    """kept_share.png: kept share and mean kept IRM per iteration."""
    its = [it for it in summary.iterations if it.kept_share is not None or it.mean_kept_irm is not None]
    if not its:
        return False
    ts = [it.iteration for it in its]
    fig = _figure(9, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    shares = [it.kept_share for it in its]
    xs = [t for t, s in zip(ts, shares) if s is not None]
    ys = [s for s in shares if s is not None]
    bars = ax1.bar(xs, ys, color="tab:green", width=0.6, label="kept share")
    for b, y in zip(bars, ys):
        ax1.annotate(f"{y:.0%}", (b.get_x() + b.get_width() / 2, y / 2), ha="center", va="center", fontsize=9,
                     color="white", fontweight="bold")
    ratio = summary.config.get("keep ratio")
    if num(ratio) is not None and summary.config.get("select mode") in (None, "top"):
        ax1.axhline(ratio, color="k", ls=":", lw=1, label=f"--sera.keep_ratio {ratio}")
    ax1.set_ylim(0, 1.3)
    ax1.set_title("Kept share of offline pairs")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("kept / all offline pairs")
    _legend(ax1, fontsize=8, loc="upper center", ncols=2)
    _iter_ticks(ax1, ts)
    pts = [(it.iteration, it.mean_kept_irm) for it in its if it.mean_kept_irm is not None]
    if pts:
        ax2.plot(*zip(*pts), "o-", color="tab:blue", label="mean IRM, kept pairs")
    med = [(it.iteration, dig(it.irm_quantiles, "all", "p50")) for it in its]
    med = [(t, v) for t, v in med if num(v) is not None]
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


def plot_lengths(summary: RunSummary, path: str) -> bool:
    """lengths.png: mean chosen/rejected length, kept vs dropped offline pairs and bootstrapped pairs."""
    import numpy as np

    off = [(it.iteration, it.mean_len_offline) for it in summary.iterations if isinstance(it.mean_len_offline, dict)]
    boot = [(it.iteration, it.mean_len_bootstrapped) for it in summary.iterations
            if isinstance(it.mean_len_bootstrapped, dict)]
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
            ys = [num(dig(d, *keys)) for _, d in data]
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


def plot_bootstrap_margins(summary: RunSummary, path: str) -> bool:
    """bootstrap_margins.png: distribution of the bootstrapped pairs' implicit-reward margins per iteration."""
    data = {t: m for t, m in sorted(summary.series.margins.items()) if m}
    if not data:
        return False
    import numpy as np
    from matplotlib.ticker import MaxNLocator

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
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Bootstrapped pairs: ensembled implicit-reward margin")
    ax.set_xlabel("margin r(chosen) − r(rejected)")
    ax.set_ylabel("pairs")
    _legend(ax, fontsize=8)
    _save(fig, path)
    return True


def plot_training(summary: RunSummary, path: str) -> bool:
    """training.png: train loss and accuracy per optimizer step, iterations concatenated."""
    logs = {t: [r for r in log if num(r.get("loss")) is not None or num(r.get("acc")) is not None]
            for t, log in sorted(summary.series.train_log.items())}
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
            pts = [(x, num(r.get(key))) for x, r in zip(xs, log) if num(r.get(key)) is not None]
            if not pts:
                continue
            px, py = zip(*pts)
            if window > 1:
                ax.plot(px, py, color=c, alpha=0.25, lw=0.8)
                ax.plot(px, _running_mean(py, window), color=c, lw=1.6,
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


def _running_mean(ys, window):
    out, acc, q = [], 0.0, []
    for y in ys:
        q.append(y)
        acc += y
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def plot_convergence(summary: RunSummary, path: str) -> bool:
    """convergence.png: Jaccard overlap with the previous kept set and mean kept IRM per iteration."""
    jac = [(it.iteration, it.jaccard) for it in summary.iterations if it.jaccard is not None]
    irm = [(it.iteration, it.mean_kept_irm) for it in summary.iterations if it.mean_kept_irm is not None]
    if not jac and not irm:
        return False
    ts = sorted({t for t, _ in jac} | {t for t, _ in irm})
    fig = _figure(9, 3.4)
    ax1, ax2 = fig.subplots(1, 2)
    thr = num(summary.config.get("converge Jaccard"))
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
    conv = summary.converged_at
    if conv is not None:
        for ax in (ax1, ax2):
            ax.axvline(conv, color="tab:red", ls="--", lw=1, label=f"converged at iteration {conv}")
    _legend(ax2, fontsize=8)
    if conv is not None:
        _legend(ax1, fontsize=8, loc="lower right")
    fig.suptitle("Convergence: stop when the kept set is stable and its mean IRM stops rising")
    _save(fig, path)
    return True


# name -> drawer of <name>.png; the order is the order of the report's Plots section
DRAWERS = {
    "irm_hist": plot_irm_hist,
    "kept_share": plot_kept_share,
    "lengths": plot_lengths,
    "bootstrap_margins": plot_bootstrap_margins,
    "training": plot_training,
    "convergence": plot_convergence,
}
PLOTS = tuple(DRAWERS)
