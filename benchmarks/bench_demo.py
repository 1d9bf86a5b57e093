"""The demo's wall time and peak RSS: this working tree against the same demo at an older git revision, run one
after the other in one invocation (never concurrently: they would share the cores).

    python benchmarks/bench_demo.py                              # vs the default baseline revision
    python benchmarks/bench_demo.py --baseline 6ad2d06 --json out.json -- --pairs 16 --prompts 4

Both runs use this checkout's venv, the embedded SmolLM2-135M-Instruct (`--model`) and the same demo arguments
(anything after `--`); the baseline's source comes from a `git worktree` of the revision, put first on
PYTHONPATH. Peak RSS is the child's own maximum resident set (`wait4` rusage), wall time its elapsed time.

Targets (issue 20): wall time <= 0.5x the baseline, peak RSS <= 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the last commit before issue 20's work (CPU speed and memory)
DEFAULT_BASELINE = "6ad2d06"


def run_demo(source: str, model: str, run_dir: str, demo_args: list[str], log_path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=source, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    cmd = [sys.executable, "-c",
           "import sys, sera_openrlhf; print('[bench_demo] source:', sera_openrlhf.__file__, flush=True);"
           "from sera_openrlhf.cli.demo import main; sys.exit(main(sys.argv[1:]))",
           "--model", model, "--run-dir", run_dir, *demo_args]
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=source, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"demo from {source} failed with exit code {proc.returncode}; see {log_path}")
    with open(log_path) as f:
        first = f.readline().strip()
    if not first.endswith(os.path.join(source, "sera_openrlhf", "__init__.py")):
        raise SystemExit(f"the demo imported the wrong sera_openrlhf ({first!r}, expected one under {source})")
    with open(os.path.join(run_dir, "sera_state.json")) as f:
        state = json.load(f)
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux: KiB
            "phase_seconds": state.get("seconds", {}), "phase_memory": state.get("memory", {})}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    demo_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"git revision to compare with ({DEFAULT_BASELINE})")
    p.add_argument("--model", default=os.path.join(ROOT, ".cache", "sera", "models", "SmolLM2-135M-Instruct"))
    p.add_argument("--workdir", default=None, help="where run dirs and logs go (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)

    work = a.workdir or tempfile.mkdtemp(prefix="bench_demo_")
    os.makedirs(work, exist_ok=True)
    tree = os.path.join(work, "baseline_src")
    if not os.path.isdir(tree):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, a.baseline], check=True,
                       stdout=subprocess.DEVNULL)
    rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        results = {}
        for name, source in (("baseline", tree), ("current", ROOT)):
            print(f"[bench_demo] {name}: demo from {source} ...", flush=True)
            results[name] = run_demo(source, a.model, os.path.join(work, f"run_{name}"), demo_args,
                                     os.path.join(work, f"{name}.log"))
            print(f"[bench_demo] {name}: {results[name]['wall_s']} s, peak RSS {results[name]['peak_rss_mb']} MB",
                  flush=True)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)
    base, cur = results["baseline"], results["current"]
    out = {
        "baseline_rev": rev, "demo_args": demo_args, "threads": os.environ.get("OMP_NUM_THREADS"),
        **results,
        "wall_current_over_baseline": round(cur["wall_s"] / base["wall_s"], 3),
        "peak_rss_current_over_baseline": round(cur["peak_rss_mb"] / base["peak_rss_mb"], 3),
        "targets": {"wall_ratio_le_0.5": cur["wall_s"] <= 0.5 * base["wall_s"], "peak_rss_le_4GB": cur["peak_rss_mb"] <= 4096},
    }
    print(f"wall time: {cur['wall_s']} s vs {base['wall_s']} s at {rev} ({out['wall_current_over_baseline']}x); "
          f"peak RSS: {cur['peak_rss_mb']} MB vs {base['peak_rss_mb']} MB ({out['peak_rss_current_over_baseline']}x)")
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(out, f, indent=2)
        os.replace(a.json + ".tmp", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
