"""How well an implicit reward judges the policy's own samples (issue 23, items 3 and 5): the gold-order accuracy
of the rewards SeRA-PB pairs by, on each bootstrapping iteration's samples, against the offline labels' accuracy.

    python benchmarks/quality/judge_accuracy.py --out runs/q1 --seeds 1 2 [--runs sera iterdpo] [--rescore dpo dpo_clean]

For each OUT/seed_<s>/<run>/iter_<t>/samples.jsonl (t >= 2: the iterations that bootstrap), every pair of one
prompt's samples whose gold differs is ordered by
    pi<k>       each ensemble member's implicit reward, from the log-probs the run recorded (reference ref<k>),
    ensemble    the members weighted as the run's pair phase weighted them (sera_state.json),
    <run>       with --rescore: another final policy of the same seed (e.g. offline DPO on the noisy labels, and
                on gold labels: what an implicit reward learnt from these prompts could reach with a perfect
                review), scored on the same token ids against the initial policy,
and the pairs the run trained on (bootstrapped.jsonl, after the guards: best vs worst) are checked against gold.
Accuracy: share of pairs whose higher reward has the higher gold (reward ties 1/2), with a 95 % bootstrap
interval over prompts; and on each prompt's gold-best vs gold-worst sample only (how the offline pairs were
built, so comparable with the offline labels' own accuracy). Writes OUT/judge_accuracy.md and .json.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import metrics as M  # noqa: E402
import run as R  # noqa: E402

from sera_openrlhf.fileio import atomic_write_json, atomic_write_text  # noqa: E402


def accuracy(groups, n_boot=1000, seed=0):
    """Pairwise gold-order accuracy over prompts' sample groups [(prompt, text, gold, reward)], with a 95 %
    bootstrap interval over prompts."""
    per = [M.reward_agreement([g]) for g in groups]
    per = [(p["gold"] * p["n_gold"], p["n_gold"]) for p in per if p["n_gold"]]
    if not per:
        return None
    acc = lambda rows: sum(h for h, _ in rows) / sum(n for _, n in rows)  # noqa: E731
    rng = random.Random(seed)
    boot = sorted(acc([per[rng.randrange(len(per))] for _ in per]) for _ in range(n_boot))
    # the gold-best vs gold-worst sample of each prompt: how the offline pairs were built, so comparable with
    # the offline labels' accuracy and with the held-out implicit-reward accuracy of the benchmark's table
    extremes = [M.reward_agreement([[max(g, key=lambda x: x[2]), min(g, key=lambda x: x[2])]]) for g in groups]
    extremes = [e["gold"] for e in extremes if e["n_gold"]]
    return {"acc": acc(per), "lo": boot[int(0.025 * n_boot)], "hi": boot[int(0.975 * n_boot) - 1],
            "n_pairs": sum(n for _, n in per), "n_prompts": len(per),
            "extremes": sum(extremes) / len(extremes) if extremes else None}


def logps(model_path, rows):
    """Log-prob sum of each sample's response under a model, on the token ids the sample was generated as."""
    import torch

    from sera_openrlhf.scoring import SequenceItem, hf_logprob_fn, score_sequences

    model, tok = R.load_model(model_path)
    items = [SequenceItem(torch.tensor(r["prompt_ids"] + r["token_ids"]), len(r["prompt_ids"])) for r in rows]
    return score_sequences(hf_logprob_fn(model), items, tok.pad_token_id, show_progress=False).logp_sum.tolist()


def rescored(seed_dir, policy_run, samples_file, rows, init_logps):
    """Implicit reward (log-prob ratio to the initial policy; beta does not change an order) of each sample under
    a run's final policy; cached in the seed directory. init_logps() gives the initial policy's log-probs."""
    cache = os.path.join(seed_dir, "judge_accuracy_cache.json")
    store = json.load(open(cache)) if os.path.exists(cache) else {}
    key = f"{policy_run}:{os.path.relpath(samples_file, seed_dir)}"
    if key not in store:
        state = json.load(open(os.path.join(seed_dir, policy_run, "sera_state.json")))
        store[key] = [a - b for a, b in zip(logps(state["final_policy"], rows), init_logps())]
        atomic_write_json(cache, store)
    return store[key]


def iteration_table(seed_dir, run, t, gold_fn, rescore, init):
    it_dir = os.path.join(seed_dir, run, f"iter_{t}")
    samples_file = os.path.join(it_dir, "samples.jsonl")
    rows = R.read_jsonl(samples_file)
    golds = [gold_fn(r["prompt"], r["text"]) for r in rows]
    state = json.load(open(os.path.join(seed_dir, run, "sera_state.json")))
    ens = state["iterations"][str(t)]["pair"]["ensemble"]
    rewards = {f"pi{k}": [r["logp"][f"pi{k}"] - r["logp"][f"ref{k}"] for r in rows] for k in ens["policies"]}
    rewards["ensemble"] = [sum(w * rewards[f"pi{k}"][i] for k, w in zip(ens["policies"], ens["weights"]))
                           for i in range(len(rows))]
    init_logps = functools.cache(lambda: logps(init, rows))  # scored once, whatever the number of --rescore runs
    for other in rescore:
        if os.path.exists(os.path.join(seed_dir, other, "sera_state.json")):
            rewards[other] = rescored(seed_dir, other, samples_file, rows, init_logps)
    out = {}
    for name, rew in rewards.items():
        groups = collections.defaultdict(list)
        for r, g, x in zip(rows, golds, rew):
            groups[r["prompt_id"]].append((r["prompt"], r["text"], g, x))
        out[name] = accuracy(list(groups.values()))
    trained = R.read_jsonl(os.path.join(it_dir, "bootstrapped.jsonl"))
    pair_golds = [(gold_fn(b["prompt"], b["chosen"]), gold_fn(b["prompt"], b["rejected"])) for b in trained]
    decided = [gc > gr for gc, gr in pair_golds if gc != gr]
    out["trained pairs"] = {"acc": sum(decided) / len(decided) if decided else None, "n_pairs": len(decided)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="judge_accuracy.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/q1")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", nargs="+", default=["sera", "iterdpo"], help="runs whose samples are judged")
    ap.add_argument("--rescore", nargs="*", default=[], help="final policies of other runs to judge the same samples")
    ap.add_argument("--gold", default="metrics:vader_gold")
    args = ap.parse_args(argv)
    gold_fn = M.load_callable(args.gold)
    res, lines = {}, ["| seed | run | iteration | judge | accuracy [95 %] | pairs | gold-best vs gold-worst |",
                      "|---|---|---|---|---|---|---|"]
    for seed in args.seeds:
        seed_dir = os.path.join(args.out, f"seed_{seed}")
        init = json.load(open(os.path.join(seed_dir, args.runs[0], "sera_state.json")))["config"]["model"]["model_name_or_path"]
        for run in args.runs:
            ts = sorted(int(d[5:]) for d in os.listdir(os.path.join(seed_dir, run)) if d.startswith("iter_")
                        and os.path.exists(os.path.join(seed_dir, run, d, "samples.jsonl")) and d != "iter_1")
            for t in ts:
                tab = iteration_table(seed_dir, run, t, gold_fn, args.rescore, init)
                res[f"{seed}/{run}/{t}"] = tab
                for judge, a in tab.items():
                    if a and a["acc"] is not None:
                        ci = f" [{a['lo']:.3f}, {a['hi']:.3f}]" if "lo" in a else ""
                        ext = f"{a['extremes']:.3f}" if a.get("extremes") is not None else "–"
                        lines.append(f"| {seed} | {run} | {t} | {judge} | {a['acc']:.3f}{ci} | {a['n_pairs']} | {ext} |")
    text = "\n".join(lines)
    print(text)
    atomic_write_text(os.path.join(args.out, "judge_accuracy.md"), "# Implicit reward as a judge of own samples\n\n"
                      + text + "\n")
    atomic_write_json(os.path.join(args.out, "judge_accuracy.json"), res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
