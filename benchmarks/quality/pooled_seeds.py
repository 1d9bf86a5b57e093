"""Method comparisons over seeds, the seeds run in separate invocations (issue 23's 3-seed end-to-end table).

    python benchmarks/quality/pooled_seeds.py --out runs/q1 --seeds 1 2

Reads each seed's cached evaluations (OUT/seed_<s>/measure_cache.json, written by `run.py --testbed smollm2`),
prints per seed the guarded gold and paired differences (95 % bootstrap over prompts), then every comparison
pooled over seeds: the mean of the per-seed differences, its interval from the per-seed intervals (normal
approximation, seeds independent). SEED0 holds seed 0's differences as docs/results.md reports them (issue 22's
run, whose raw outputs are not kept); --no-seed0 leaves them out (and so pools seed 0 of another --out, such as
the shuffled-label run, like any other seed).
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import metrics as M  # noqa: E402

LABEL = {"init": "initial policy", "dpo": "offline DPO", "dpo_clean": "offline DPO on gold labels",
         "cdpo": "cDPO, eps = 0.3", "iterdpo": "plain iterative DPO",
         "random": "random selection at SeRA's kept share", "sera": "full SeRA (defaults)",
         "sera_judge": "full SeRA, conservative judge", "sera_ss": "SeRA-SS (self-review only)",
         "sera_soft": "SeRA-SS, soft review", "sera_keepall": "full SeRA, keep ratio 1.0",
         "sera_adaptive": "full SeRA, adaptive share", "sera_ss_oof": "SeRA-SS, out-of-fold review (3-epoch twins)",
         "sera_soft_oof": "SeRA-SS, soft out-of-fold review (3-epoch twins)",
         "sera_ss_oof_fp32": "SeRA-SS, out-of-fold review scored in fp32"}
ORDER = ["init", "dpo", "dpo_clean", "cdpo", "iterdpo", "random", "sera_ss", "sera_ss_oof", "sera_ss_oof_fp32",
         "sera_soft", "sera_soft_oof", "sera", "sera_keepall", "sera_adaptive", "sera_judge"]
COMP = [("sera", "dpo"), ("sera", "cdpo"), ("sera", "random"), ("sera", "iterdpo"), ("iterdpo", "dpo"), ("random", "dpo"),
        ("cdpo", "dpo"), ("dpo_clean", "dpo"), ("dpo", "init"), ("cdpo", "init"), ("sera", "init"),
        ("sera_judge", "sera"), ("sera_judge", "dpo"), ("sera_ss", "dpo"), ("sera_ss", "random"), ("sera_soft", "dpo"),
        ("sera_soft", "cdpo"), ("sera_keepall", "dpo"), ("sera_keepall", "sera"), ("sera_keepall", "iterdpo"),
        ("sera_adaptive", "dpo"), ("sera_adaptive", "cdpo"), ("sera_adaptive", "sera"), ("sera_ss_oof", "dpo"),
        ("sera_ss_oof", "sera_ss"), ("sera_ss_oof", "random"), ("sera_soft_oof", "cdpo"), ("sera_soft_oof", "sera_soft"),
        ("sera_soft_oof", "dpo"), ("sera_ss_oof_fp32", "dpo"), ("sera_ss_oof_fp32", "sera_ss_oof"),
        ("sera_ss_oof_fp32", "random"), ("sera_ss_oof_fp32", "sera_ss")]
SEED0 = {("sera", "dpo"): (0.040, -0.028, 0.107), ("iterdpo", "dpo"): (0.053, -0.005, 0.111),
         ("dpo_clean", "dpo"): (0.170, 0.103, 0.239), ("sera", "cdpo"): (0.108, 0.031, 0.184),
         ("random", "dpo"): (0.007, -0.043, 0.058), ("cdpo", "dpo"): (-0.069, -0.145, 0.007),
         ("sera_ss", "dpo"): (0.013, -0.053, 0.083)}
SEED0_POINT = {("sera", "random"): 0.336 - 0.303, ("sera", "iterdpo"): 0.336 - 0.349,
               ("sera_ss", "random"): 0.309 - 0.303}


def main(argv):
    ap = argparse.ArgumentParser(prog="pooled_seeds.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/q1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-seed0", action="store_true", help="pool the given seeds only")
    args = ap.parse_args(argv)
    seed0, seed0_point = ({}, {}) if args.no_seed0 else (SEED0, SEED0_POINT)
    seeds = args.seeds
    ev = {}
    for seed in seeds:
        c = json.load(open(os.path.join(args.out, f"seed_{seed}", "measure_cache.json")))
        ev[seed] = {k[5:]: v for k, v in c.items() if k.startswith("eval_")}
    f = lambda d: f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"  # noqa: E731
    per = lambda name: " | ".join(f"{name}, seed {s}" if i == 0 else f"seed {s}" for i, s in enumerate(seeds))  # noqa: E731
    ids = ", ".join(map(str, seeds))
    lines = [f"| method | {per('guarded gold')} | degenerate ({ids}) | {per('vs offline DPO')} | win vs DPO ({ids}) | "
             f"{per('vs cDPO')} |", "|---|" + "---|" * (3 * len(seeds) + 2)]
    for m in ORDER:
        if not all(m in ev[s] for s in seeds):
            continue
        g = [sum(ev[s][m]["guarded"]) / len(ev[s][m]["guarded"]) for s in seeds]
        dg = [sum(ev[s][m]["degenerate"]) / len(ev[s][m]["degenerate"]) for s in seeds]
        vd = [M.paired_difference(ev[s][m]["guarded"], ev[s]["dpo"]["guarded"], seed=s) if m != "dpo" else None
              for s in seeds]
        vc = [M.paired_difference(ev[s][m]["guarded"], ev[s]["cdpo"]["guarded"], seed=s)
              if m != "cdpo" and "cdpo" in ev[s] else None for s in seeds]
        lines.append(f"| {LABEL[m]} | " + " | ".join(f"{x:.3f}" for x in g) + " | "
                     + ", ".join(f"{x:.1%}" for x in dg) + " | " + " | ".join(f(d) if d else "–" for d in vd)
                     + " | " + (", ".join(f"{d['win']:.2f}" for d in vd) if vd[0] else "–") + " | "
                     + " | ".join(f(d) if d else "–" for d in vc) + " |")
    print("\n".join(lines))
    print()
    builtin = not args.no_seed0
    pl = ["| comparison | " + "seed 0 (reported) | " * builtin + " | ".join(f"seed {s}" for s in seeds) + " | pooled |",
          "|---|" + "---|" * (builtin + len(seeds) + 1)]
    for a, b in COMP:
        if not all(a in ev[s] and b in ev[s] for s in seeds):
            continue
        ds = [M.paired_difference(ev[s][a]["guarded"], ev[s][b]["guarded"], seed=s) for s in seeds]
        rows = [(d["diff"], d["lo"], d["hi"]) for d in ds]
        s0 = seed0.get((a, b))
        if s0:
            rows = [s0] + rows
        m = sum(r[0] for r in rows) / len(rows)
        se = math.sqrt(sum(((r[2] - r[1]) / 3.92) ** 2 for r in rows)) / len(rows)
        s0txt = (f"{s0[0]:+.3f} [{s0[1]:+.3f}, {s0[2]:+.3f}]" if s0 else
                 f"{seed0_point[(a, b)]:+.3f} (no interval)" if (a, b) in seed0_point else "–")
        pl.append(f"| {LABEL[a]} − {LABEL[b]} | " + f"{s0txt} | " * builtin + " | ".join(f(d) for d in ds)
                  + f" | {m:+.3f} [{m - 1.96 * se:+.3f}, {m + 1.96 * se:+.3f}] ({len(rows)} seeds) |")
    print("\n".join(pl))


if __name__ == "__main__":
    main(sys.argv[1:])
