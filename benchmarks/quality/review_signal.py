"""Review-signal ablation (issue 23, item 1): how well each way of scoring the offline pairs finds the flipped
labels on the SmolLM2 testbed, and what each is worth to hard and soft selection, over seeds.

    python benchmarks/quality/review_signal.py --seeds 0 --out runs/q1 --threads 1   # one seed per process,
    python benchmarks/quality/review_signal.py --seeds 1 --out runs/q1 --threads 1   # side by side
    python benchmarks/quality/review_signal.py --seeds 0 1 2 --out runs/q1           # the table (cached runs)

Per seed it builds the same noisy preference set as `run.py --testbed smollm2` (shared cache under OUT/seed_<s>)
and runs the product once, through its CLI: three iterations of DPO on every pair (`--sera.keep_ratio 1.0`, no
bootstrapping) with a cross-fitted review (`--sera.review_refit crossfit --sera.crossfit_folds 2
--sera.review_average 2`), which trains π1, π2 and their fold twins. The reviews it writes at t = 2 and t = 3 are
out of fold (each half scored by the twin trained without it) and, at t = 3, averaged over the two checkpoints;
π1 and π2 themselves score every pair in sample, which is what the default review (`--sera.review_refit current`)
reads. So one run gives every variant below, each also per token (`--sera.review_per_token`):

    in-sample π1            the default review at t = 2
    in-sample π2            the default review at t = 3
    in-sample mean π1, π2   --sera.review_average 2 at t = 3
    out-of-fold π1 twins    --sera.review_refit frozen --sera.crossfit_folds 2 (every iteration), or crossfit at t = 2
    out-of-fold π2 twins    --sera.review_refit crossfit at t = 3
    out-of-fold mean        --sera.review_refit crossfit --sera.review_average 2 at t = 3

`--folds K --iterations T` runs the same with K folds (each twin trains on (K − 1)/K of the pairs) and reviews
at t = 2..T (T = 2: π1 and its twins only), into OUT/seed_<s>/review_signal_k<K>_t<T> and
OUT/review_signal_k<K>_t<T>.md.

For each: the flip-detection AUROC against the gold flip flags (with a bootstrap interval per seed, a t-interval
over seeds), the product's gold-free estimate of that AUROC (the mixture fit of sera_openrlhf.calibration), and the
label information that uniform weights, the hard top-70 % cut and soft weights keep (review_information.py).
Writes OUT/review_signal.md and .json.
"""

from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import metrics as M  # noqa: E402
import run as R  # noqa: E402
import smollm2 as S  # noqa: E402
import validity as V  # noqa: E402
from review_information import weights_information  # noqa: E402

from sera_openrlhf.phases.review import correlation  # noqa: E402

from sera_openrlhf.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from sera_openrlhf.selection import auroc  # noqa: E402

def variants(iterations):
    """The review variants one run with T iterations gives, in table order."""
    ts = range(1, iterations)
    names = [f"in-sample π{t}" for t in ts]
    names += ["in-sample mean π1, π2"] if iterations >= 3 else []
    names += [f"out-of-fold π{t} twins" for t in ts]
    return names + (["out-of-fold mean"] if iterations >= 3 else [])


def tag(folds, iterations):
    """Run-directory and output-file suffix of a non-default ablation run (K folds, T iterations)."""
    return "" if (folds, iterations) == (2, 3) else f"_k{folds}_t{iterations}"


def margins(sums, lens, per_token):
    """IRM of each pair from (chosen, rejected) β·log-ratio sums and token counts."""
    (c, r), (lc, lr) = sums, lens
    if per_token:
        return [a / la - b / lb for a, b, la, lb in zip(c, r, lc, lr)]
    return [a - b for a, b in zip(c, r)]


def in_sample(cache, key, policy, init, pairs):
    """(β·log-ratio sums, token counts) of (chosen, rejected) under `policy` against the initial model, cached
    (the initial model's log-probs once per seed)."""
    def logps(path):
        ps = [r["prompt"] for r in pairs]
        return lambda: [R.response_logps(path, ps, [r[side] for r in pairs]) for side in ("chosen", "rejected")]

    if os.path.exists(cache) and key in json.load(open(cache)):
        return json.load(open(cache))[key]
    ini = S.cached(cache, "review_signal_init", logps(init))  # before `key`'s entry: cached() rewrites the file

    def fn():
        pol = logps(policy)()
        return {"sums": [[S.BETA * (a - b) for a, b in zip(pol[i][0], ini[i][0])] for i in (0, 1)],
                "lens": [pol[0][1], pol[1][1]]}
    return S.cached(cache, key, fn)


def seed_margins(out, seed, cfg, model, gold_fn, spurious_fn, threads, precision, folds):
    """{(variant, per_token): IRM list} aligned with pairs.jsonl, and the pairs' flip flags."""
    seed_dir, pairs_path, _, _ = S.training_pairs(out, seed, cfg, model, gold_fn, spurious_fn)
    pairs = R.read_jsonl(pairs_path)
    T = cfg["iterations"]
    name = "review_signal" + tag(folds, T)
    run_dir = os.path.join(seed_dir, name)
    flags = ["--sera.keep_ratio", "1.0", "--sera.review_refit", "crossfit", "--sera.crossfit_folds", str(folds),
             "--sera.review_average", str(T - 1)]
    cmd = S.command("sera_ss", model, pairs_path, len(pairs), cfg, seed_dir, seed, run_dir, precision) + flags
    _, _, rc = R.run_method(name, cmd, run_dir, seed, S.env(threads))
    if rc:
        raise SystemExit(f"review_signal: the product run failed (exit {rc}); see {run_dir}/stdout.log")
    cache = os.path.join(seed_dir, "measure_cache.json")
    index = {r["id"]: n for n, r in enumerate(pairs)}
    found = {}
    for per_token in (False, True):
        for t in range(1, T):
            sc = in_sample(cache, f"{name}_pi{t}", os.path.join(run_dir, f"iter_{t}", "policy"), model, pairs)
            found[(f"in-sample π{t}", per_token)] = margins(sc["sums"], sc["lens"], per_token)
            review = sorted(R.read_jsonl(os.path.join(run_dir, f"iter_{t + 1}", "review.jsonl")),
                            key=lambda r: index[r["id"]])
            if len(review) != len(pairs):
                raise SystemExit(f"review_signal: {run_dir}/iter_{t + 1}/review.jsonl has {len(review)} of "
                                 f"{len(pairs)} pairs (a pair over --data.max_len?)")
            found[(f"out-of-fold π{t} twins", per_token)] = margins(
                ([r["chosen_reward"] for r in review], [r["rejected_reward"] for r in review]),
                ([r["chosen_len"] for r in review], [r["rejected_len"] for r in review]), per_token)
        if T >= 3:  # the first two checkpoints' mean (--sera.review_average 2 at t = 3)
            for kind, mean in (("in-sample π{}", "in-sample mean π1, π2"), ("out-of-fold π{} twins", "out-of-fold mean")):
                a, b = found[(kind.format(1), per_token)], found[(kind.format(2), per_token)]
                found[(mean, per_token)] = [(x + y) / 2 for x, y in zip(a, b)]
    return found, [bool(r["flipped"]) for r in pairs]


def measure(irm, flipped, seed):
    x, f = torch.tensor(irm, dtype=torch.float64), torch.tensor(flipped)
    info = weights_information(x, f, S.FLIP)
    rows = dict(info["rows"])
    lo, hi = V.bootstrap(lambda ix: auroc(-x[ix], f[ix]) if 0 < int(f[ix].sum()) < len(ix) else float("nan"),
                         len(irm), n_boot=1000, seed=seed)
    return {"auroc": auroc(-x, f), "auroc_ci": [lo, hi], "est_auroc": info["fit"].est_flip_auroc,
            "gated": info["gated"].fallback is None,
            "hard_top70": rows["hard top 70% by IRM (SeRA-SS)"] / info["uniform"],
            "soft": rows["soft, the product's calibration (gated)"] / info["uniform"],
            "soft_ungated": rows["soft, the same fit without the no-signal gate"] / info["uniform"],
            "ceiling": rows["soft, gold-calibrated logistic posterior (ceiling)"] / info["uniform"]}


def report(out, per_seed, folds, iterations):
    seeds = sorted(per_seed)
    lines = [f"Seeds {', '.join(map(str, seeds))}; {', '.join(str(per_seed[s]['n_pairs']) for s in seeds)} pairs, "
             f"30 % flipped; {folds} folds, {iterations} iterations. AUROC = flip-detection AUROC of −IRM against the gold flip flags (mean over seeds "
             "[95 % t-interval]; per seed, with its bootstrap interval over pairs); gold-free = the product's own "
             "estimate from the mixture fit; the last columns are label information relative to uniform weights "
             "(DPO/cDPO = 1.00), mean over seeds.", "",
             "| review | per token | AUROC | per seed | gold-free estimate | hard top 70 % | soft (gated) | "
             "soft (no gate) | gold ceiling |", "|---|---|---|---|---|---|---|---|---|"]
    for v in variants(iterations):
        for pt in (False, True):
            ms = [per_seed[s]["variants"][f"{v}|{int(pt)}"] for s in seeds]
            a, lo, hi = M.mean_ci([m["auroc"] for m in ms])
            ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
            each = ", ".join(f"{m['auroc']:.3f} [{m['auroc_ci'][0]:.2f}, {m['auroc_ci'][1]:.2f}]" for m in ms)
            avg = lambda k: sum(m[k] for m in ms) / len(ms)  # noqa: E731
            gated = sum(m["gated"] for m in ms)
            lines.append(f"| {v} | {'yes' if pt else 'no'} | {a:.3f}{ci} | {each} | {avg('est_auroc'):.3f} | "
                         f"{avg('hard_top70'):.2f}x | {avg('soft'):.2f}x ({gated}/{len(ms)} fit used) | "
                         f"{avg('soft_ungated'):.2f}x | {avg('ceiling'):.2f}x |")
    corr = [per_seed[s].get("checkpoint_correlation") for s in seeds]
    if all(corr):
        lines += ["", "Correlation of the margins of the two checkpoints (π1 and π2, or their twins) over the pairs, per "
                  "seed: the gold-free test-retest number the product records as "
                  "`review.calibration.previous_review_correlation`.", "",
                  "| review | per token | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---|---|" + "---|" * len(seeds)]
        for kind in ("in-sample π{}", "out-of-fold π{} twins"):
            for pt in (0, 1):
                lines.append(f"| {kind.format('1 vs π2').replace(' twins', '')}{' twins' if 'twins' in kind else ''}"
                             f" | {'yes' if pt else 'no'} | " + " | ".join(f"{c[f'{kind}|{pt}']:.3f}" for c in corr)
                             + " |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out, f"review_signal{tag(folds, iterations)}.md"), text)
    atomic_write_json(os.path.join(out, f"review_signal{tag(folds, iterations)}.json"), per_seed)
    return text


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="review_signal.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(S.SIZES), default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/quality_smollm2")
    ap.add_argument("--model", default=None, help="initial policy directory (default: the embedded SmolLM2)")
    ap.add_argument("--gold", default="metrics:vader_gold")
    ap.add_argument("--spurious", default="metrics:prefer_longer")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--folds", type=int, default=2, help="--sera.crossfit_folds K (each twin trains on (K-1)/K)")
    ap.add_argument("--iterations", type=int, default=3, help="T: reviews at t = 2..T (T >= 2; the means need 3)")
    args = ap.parse_args(argv)
    if args.folds < 2 or args.iterations < 2:
        ap.error("--folds and --iterations must be >= 2")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "assets"), exist_ok=True)
    gold_fn, spurious_fn = M.load_callable(args.gold), M.load_callable(args.spurious)
    model = S.model_dir(args.model)
    per_seed = {}
    cfg = {**S.SIZES[args.size], "iterations": args.iterations}
    for seed in args.seeds:
        found, flipped = seed_margins(out, seed, cfg, model, gold_fn, spurious_fn, args.threads, args.precision,
                                      args.folds)
        per_seed[seed] = {"n_pairs": len(flipped), "n_flipped": sum(flipped), "variants": {
            f"{v}|{int(pt)}": measure(irm, flipped, seed) for (v, pt), irm in found.items()}}
        if args.iterations >= 3:  # the product's gold-free test-retest number (review.calibration) at t = 3
            per_seed[seed]["checkpoint_correlation"] = {
                f"{kind}|{int(pt)}": correlation(torch.tensor(found[(kind.format(2), pt)]),
                                                 torch.tensor(found[(kind.format(1), pt)]))
                for kind in ("in-sample π{}", "out-of-fold π{} twins") for pt in (False, True)}
        atomic_write_json(os.path.join(out, f"seed_{seed}", f"review_signal{tag(args.folds, args.iterations)}.json"),
                          per_seed[seed])
    print(report(out, per_seed, args.folds, args.iterations))


if __name__ == "__main__":
    main(sys.argv[1:])
