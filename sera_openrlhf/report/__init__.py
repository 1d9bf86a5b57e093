"""The run report: per-iteration statistics of a SeRA run directory as Markdown, JSON and PNG plots.

    python -m sera_openrlhf.cli.report RUN_DIR        (also run at the end of every `--sera.enable` run)

Reads `sera_state.json` (per-phase statistics) and the per-iteration files of the run directory
(iter_<t>/review.jsonl, kept.jsonl, samples.jsonl, bootstrapped.jsonl, train_set.jsonl, policy/train_log.jsonl),
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

collect.py reads the run directory into one `RunSummary`; render.py writes report.md and report.json from it;
plots.py draws the PNGs (one `plot_<name>` function per file).

The report reads whatever exists: an unfinished run, an iteration that converged after its review, or a run
whose files were partly deleted gives a shorter report (a plot without data is not drawn and not linked), never
an error. Statistics come from the state file when present, else are recomputed from the files.
"""

from __future__ import annotations

import os

from sera_openrlhf.fileio import atomic_write_json, atomic_write_text
from sera_openrlhf.report.collect import RunSummary, collect, load_state
from sera_openrlhf.report.plots import PLOTS, draw_plots
from sera_openrlhf.report.render import markdown, report_dict

__all__ = ["PLOTS", "REPORT_DIR", "RunSummary", "build_report", "collect", "load_state", "write_report"]

REPORT_DIR = "report"


def build_report(run_dir: str) -> dict:
    """Every number of the report of `run_dir`, as a JSON-serialisable dict (no files are written).

    Raises StateError when `run_dir` does not exist or has no `sera_state.json`.
    """
    return report_dict(collect(run_dir))


def write_report(run_dir: str) -> str:
    """Write `<run_dir>/report/` (report.md, report.json, PNG plots) and return the path of report.md.

    Raises StateError when `run_dir` does not exist or has no `sera_state.json`.
    """
    summary = collect(run_dir)
    out = os.path.join(summary.run_dir, REPORT_DIR)
    os.makedirs(out, exist_ok=True)
    plots = draw_plots(summary, out)
    atomic_write_json(os.path.join(out, "report.json"), report_dict(summary) | {"plots": plots})
    md = os.path.join(out, "report.md")
    atomic_write_text(md, markdown(summary, plots))
    return md
