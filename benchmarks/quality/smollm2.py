"""The SmolLM2 testbed of the quality benchmark (`run.py --testbed smollm2`): a real pretrained LM whose implicit
reward carries signal, validity checks that say so before any method is ranked, and the baselines reviewers ask
for. See README.md ("SmolLM2 testbed").

Per seed, under OUT/seed_<s>/: the initial policy (SmolLM2-135M-Instruct, the project's embedded model)
continues VADER's human-rated movie-review prefixes; `pair_samples` continuations per training prompt, the gold
reward's best and worst become a pair (ties dropped), exactly `flip_share` of the labels are flipped and the
spurious rule may override small gold gaps. Held-out prompts give (a) held-out gold pairs for validity check 2
and (b) evaluation prompts, continued greedily by every final policy and scored by gold.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import metrics as M
import run as R
import validity as V

SIZES = {
    # smoke: seconds per method, for the test suite; default: one seed of every method in <= 90 min on 2 cores
    "smoke": dict(n_prompts=24, pair_samples=4, heldout_prompts=8, n_eval_prompts=8, max_new_tokens=8, max_len=32,
                  prompt_words=5, boot_prompts=4, boot_samples=2, iterations=2, batch_size=2, micro_batch_size=2,
                  lr=2e-5, gen_batch=64, hh_train=0, hh_eval=0),
    "default": dict(n_prompts=384, pair_samples=4, heldout_prompts=192, n_eval_prompts=192, max_new_tokens=24,
                    max_len=64, prompt_words=5, boot_prompts=128, boot_samples=4, iterations=3, batch_size=16,
                    micro_batch_size=8, lr=2e-5, gen_batch=128, hh_train=96, hh_eval=128),
}
BETA = 0.1  # OpenRLHF's default --model.beta, used by every DPO-family method
FLIP = 0.3  # the default --flip-share, and the prior flip rate eps the cDPO-family methods are given at any share

METHODS = {
    # name -> (label, offline?, extra flags). Offline methods train T epochs in one iteration; iterative ones T
    # iterations of exactly N pairs each (--sera.train_pairs N), so every method trains on T x N pairs.
    "dpo": ("offline DPO", True, []),
    "cdpo": ("cDPO, eps = 0.3 (the default flip share)", True, ["--model.label_smoothing", str(FLIP)]),
    "rdpo": ("rDPO (robust), eps = 0.3", True, ["--sera.loss", "robust", "--model.label_smoothing", str(FLIP)]),
    "iterdpo": ("plain iterative DPO (no review, no ensemble, no guard, no NLL)", False,
                ["--sera.keep_ratio", "1.0", "--sera.ensemble_k", "1", "--sera.ensemble_lambda", "1.0",
                 "--sera.no_fluency_guard", "--sera.bootstrap_nll_coef", "0"]),
    "random": ("random selection at SeRA's kept share", False,
               ["--sera.generated_share_max", "0", "--sera.selector", "SELECTORS:random_share"]),
    "sera_ss": ("SeRA-SS (self-review only)", False, ["--sera.generated_share_max", "0"]),
    "sera": ("full SeRA (defaults)", False, []),
    "sera_judge": ("full SeRA, conservative judge (lambda 1, unanimous, consistency-weighted)", False,
                   ["--sera.judge_lambda", "1.0", "--sera.judge_unanimous", "--sera.judge_consistency"]),
    "sera_simpo": ("full SeRA with SimPO (beta 2, gamma 0.5)", False,
                   ["--sera.loss", "simpo", "--model.beta", "2.0"]),
    "sera_keepall": ("full SeRA without offline selection (keep ratio 1.0)", False, ["--sera.keep_ratio", "1.0"]),
    # grows the generated share only while the out-of-sample review estimates its own flip AUROC at >= 0.6, the
    # signal at which a hard cut stops losing information (docs/concepts.md); prequential: no extra scoring pass
    "sera_adaptive": ("full SeRA, adaptive generated share (prequential review, min AUROC 0.6)", False,
                      ["--sera.review_refit", "prequential", "--sera.share_min_auroc", "0.6"]),
    "sera_soft": ("SeRA-SS, soft calibrated review (out of fold, frozen; prior eps = 0.3)", False,
                  ["--sera.generated_share_max", "0", "--sera.select_mode", "soft", "--model.label_smoothing",
                   str(FLIP), "--sera.review_refit", "frozen", "--sera.crossfit_folds", "2"]),
    # the out-of-fold review with twins trained as long as offline DPO (3 epochs, not the 1 of an iteration); on
    # seeds 1-2 its flip AUROC was 0.587 against 0.555 for 1-epoch twins (docs/results.md, "fold twins")
    "sera_ss_oof": ("SeRA-SS, hard cut on the out-of-fold review (frozen, twins 3 epochs)", False,
                    ["--sera.generated_share_max", "0", "--sera.review_refit", "frozen", "--sera.crossfit_folds", "2",
                     "--sera.fold_epochs", "3"]),
    # the same review scored in fp32 (--sera.score_precision fp32, the default since); on a bf16 machine the arm
    # above scored it in bf16 (earlier product), so the two differ only in the review's precision there
    "sera_ss_oof_fp32": ("SeRA-SS, hard cut on the out-of-fold review scored in fp32 (frozen, twins 3 epochs)", False,
                         ["--sera.generated_share_max", "0", "--sera.review_refit", "frozen", "--sera.crossfit_folds",
                          "2", "--sera.fold_epochs", "3", "--sera.score_precision", "fp32"]),
    "sera_soft_oof": ("SeRA-SS, soft calibrated review (frozen, twins 3 epochs; prior eps = 0.3)", False,
                      ["--sera.generated_share_max", "0", "--sera.select_mode", "soft", "--model.label_smoothing",
                       str(FLIP), "--sera.review_refit", "frozen", "--sera.crossfit_folds", "2",
                       "--sera.fold_epochs", "3"]),
    # reference points: they read the gold labels
    "dpo_oracle": ("offline DPO, gold-wrong pairs removed (perfect review)", True, []),
    "dpo_clean": ("offline DPO on gold labels (clean labels)", True, []),
}
DEFAULT_METHODS = list(METHODS)
GOLD_DATA = R.GOLD_DATA  # the reference points' gold-derived copies of pairs.jsonl (run.gold_derived_pairs)


def env(threads):
    return {**os.environ, **R.ENV, "OMP_NUM_THREADS": str(threads)}


# ------------------------------------------------------------------------------------------- testbed and data


def prompts(assets, cfg):
    """(train prompts, held-out prompts): the first `prompt_words` words of VADER's snippets, split 90/10."""
    train, held = R.split_snippets(R.load_snippets(R.ensure_vader(assets)))
    make = lambda rows: [p for p in (R.make_prompt(t, cfg["prompt_words"]) for _, _, t in rows) if p]  # noqa: E731
    return make(train), make(held)


def model_dir(path=None):
    """--model, else the project's embedded SmolLM2-135M-Instruct (converted once from its PyPI package)."""
    if path:
        return os.path.abspath(path)
    from sera_openrlhf.assets import ensure_smollm2

    return ensure_smollm2()


def generate(path, prompts_, n, cfg, seed, temperature=1.0):
    from sera_openrlhf.generation import GenerationConfig, build_generator

    model, tok = R.load_model(path)
    gcfg = GenerationConfig(num_samples=n, temperature=temperature, top_p=1.0, max_new_tokens=cfg["max_new_tokens"],
                            seed=seed, batch_size=cfg["gen_batch"])
    return build_generator("hf", tok, gcfg, model=model).generate(list(prompts_))


def sampled(seed_dir, name, path, prompts_, n, cfg, seed):
    """Samples of the initial policy, cached as OUT/seed_<s>/<name>.jsonl (one row per prompt)."""
    out = os.path.join(seed_dir, f"{name}.jsonl")
    if os.path.exists(out):
        return R.read_jsonl(out)
    t0 = time.time()
    rows = [{"prompt": p, "texts": [s.text for s in g], "token_ids": [s.token_ids for s in g]}
            for p, g in zip(prompts_, generate(path, prompts_, n, cfg, seed))]
    R.write_jsonl(out, rows)
    R.log(f"{name}: {len(rows)} prompts x {n} samples in {time.time() - t0:.0f} s")
    return rows


def best_worst(rows, samples, gold_fn, prefix):
    """One item per prompt: the gold-best and gold-worst of its first `samples` distinct continuations (with
    2 samples: the two), as label_pairs' (a, b); prompts whose samples all tie are left out."""
    items = []
    for n, r in enumerate(rows):
        texts = [t for t in dict.fromkeys(r["texts"][:samples]) if t.strip()]
        if len(texts) < 2:
            continue
        scored = sorted(texts, key=lambda t: gold_fn(r["prompt"], t))
        items.append({"id": f"{prefix}{n}", "prompt": r["prompt"], "a": scored[-1], "b": scored[0]})
    return items


def build_pairs(seed_dir, model, train_prompts, cfg, seed, gold_fn, spurious_fn):
    """The seed's noisy preference set (pairs.jsonl) and its info: best/worst of the first `pair_samples` of the
    cached samples of the first `n_prompts` prompts (a sweep cell passes its own cfg)."""
    n_prompts, samples, share = cfg["n_prompts"], cfg["pair_samples"], cfg.get("flip_share", FLIP)
    path, info_path = os.path.join(seed_dir, "pairs.jsonl"), os.path.join(seed_dir, "pairs_info.json")
    if os.path.exists(path) and os.path.exists(info_path):
        info = json.load(open(info_path))
        made = info.get("flip_share", FLIP)  # sets cached before --flip-share existed were made at the default
        if made != share:
            raise SystemExit(f"{info_path}: this preference set was made with --flip-share {made}, not {share}; "
                             "use another --out")
        return path, info
    rows = sampled(seed_dir, "train_samples", model, train_prompts, samples, cfg, 10_000 + seed)
    items = best_worst(rows[:n_prompts], samples, gold_fn, "pair")
    pairs, info = M.label_pairs(items, gold_fn, spurious_fn, share, seed)
    gaps = sorted(abs(r["gold_chosen"] - r["gold_rejected"]) for r in pairs)
    info.update({"pair_samples": samples, "n_prompts": n_prompts, "median_gold_gap": gaps[len(gaps) // 2],
                 "flip_share": share})
    R.write_jsonl(path, pairs)
    with open(info_path, "w") as f:
        json.dump(info, f)
    return path, info


# ------------------------------------------------------------------------------------------- methods


def command(name, model, data, n_pairs, cfg, seed_dir, seed, run_dir, precision):
    """The product's entry point with the same stock flags for every method; equal training pairs (T x N)."""
    label, offline, extra = METHODS[name]
    T = cfg["iterations"]
    extra = [x.replace("SELECTORS", os.path.join(R.HERE, "random_selector.py")) for x in extra]
    base = ["--model.model_name_or_path", model, "--data.dataset", data, "--data.prompt_key", "prompt",
            "--data.max_len", str(cfg["max_len"]), "--train.batch_size", str(cfg["batch_size"]),
            "--train.micro_batch_size", str(cfg["micro_batch_size"]), "--ds.zero_stage", "0",
            "--sera.precision", precision, "--sera.packed_train", "--adam.lr", str(cfg["lr"]),
            "--train.seed", str(seed), "--ckpt.output_dir", run_dir, "--sera.enable", "--sera.keep_truncated",
            "--sera.prompts", os.path.join(seed_dir, "boot_prompts.jsonl"),
            "--sera.num_samples", str(cfg["boot_samples"]), "--sera.max_new_tokens", str(cfg["max_new_tokens"]),
            "--sera.generation_batch_size", str(cfg["gen_batch"])]
    n_data = sum(1 for _ in open(data))
    if offline and n_data == n_pairs:  # T epochs of the N pairs (no copies: the reference cache scores each once)
        budget = ["--sera.iterations", "1", "--train.max_epochs", str(T)]
    elif offline:  # a gold-derived subset: repeated up to T x N pairs in one iteration
        budget = ["--sera.iterations", "1", "--train.max_epochs", "1", "--sera.train_pairs", str(T * n_pairs)]
    else:
        # never stop early on convergence: every method trains all T iterations (equal compute)
        budget = ["--sera.iterations", str(T), "--train.max_epochs", "1", "--sera.train_pairs", str(n_pairs),
                  "--sera.converge_min_gain=-1e9"]
    return [sys.executable, "-m", "sera_openrlhf.cli.train_dpo", *base, *budget, *extra]


def run_methods(names, model, pairs_path, n_pairs, cfg, seed_dir, seed, threads, precision):
    out = {}
    for name in names:
        data = R.gold_derived_pairs(seed_dir, name) if name in GOLD_DATA else pairs_path
        run_dir = os.path.join(seed_dir, name)
        cmd = command(name, model, data, n_pairs, cfg, seed_dir, seed, run_dir, precision)
        out[name] = R.run_method(name, cmd, run_dir, seed, env(threads))
    return out


# ------------------------------------------------------------------------------------------- measurement


def evaluate(policy, init, eval_prompts, cfg, gold_fn, nll_cap):
    """Greedy continuations of the held-out prompts: gold, independent degenerate flags, guarded gold."""
    groups = generate(policy, eval_prompts, 1, cfg, seed=0, temperature=0.0)
    texts = [g[0].text for g in groups]
    nll = R.response_nll(init, eval_prompts, [g[0].token_ids for g in groups])
    gold = [float(gold_fn(p, t)) for p, t in zip(eval_prompts, texts)]
    kinds = [M.degenerate_kind(t, n, nll_cap) for t, n in zip(texts, nll)]
    return {"texts": texts, "gold": gold, "nll_init": nll, "degenerate": [k is not None for k in kinds],
            "degenerate_kind": kinds, "guarded": M.guarded(gold, [k is not None for k in kinds]),
            "length": [len(g[0].token_ids) for g in groups]}


def cached(path, key, fn):
    """fn() stored under `key` in the JSON file at `path` (atomic), so a killed run resumes."""
    data = json.load(open(path)) if os.path.exists(path) else {}
    if key not in data:
        data[key] = fn()
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    return data[key]


def validity(seed_dir, model, pairs_path, cfg, seed, threads, precision, held, held_irm_clean, evals, cache):
    """The three checks for one preference set: gold-label vs noisy-label DPO (check 1), the gold-label policy's
    ordering of held-out gold pairs (check 2), and the out-of-fold flip AUROC of noisy-label DPO (check 3: two
    folds, each scored by a DPO policy trained on the other one only)."""
    pairs = R.read_jsonl(pairs_path)
    folds = [[r for i, r in enumerate(pairs) if i % 2 == k] for k in (0, 1)]
    oof = {}
    for k in (0, 1):
        path = os.path.join(seed_dir, f"fold{k}_train.jsonl")
        if not os.path.exists(path):
            R.write_jsonl(path, folds[1 - k])
        run_dir = os.path.join(seed_dir, f"fold{k}")
        cmd = command("dpo", model, path, len(folds[1 - k]), cfg, seed_dir, seed, run_dir, precision)
        _, _, rc = R.run_method(f"fold{k}", cmd, run_dir, seed, env(threads))
        if rc:
            raise SystemExit(f"validity: the fold {k} run failed; see {run_dir}/stdout.log")
        policy = json.load(open(os.path.join(run_dir, "sera_state.json")))["final_policy"]
        oof[k] = irm(logps_cache(cache, f"fold{k}_policy", policy, folds[k]),
                     logps_cache(cache, f"fold{k}_init", model, folds[k]))
    checks = {
        "label_noise_hurts": V.check_label_noise_hurts(evals["dpo_clean"]["guarded"], evals["dpo"]["guarded"]),
        "reward_orders_heldout_pairs": V.check_reward_orders_pairs(
            held_irm_clean, [r["gold_chosen"] - r["gold_rejected"] for r in held]),
        "oof_flip_auroc": V.check_flip_detection(oof[0] + oof[1], [r["flipped"] for r in folds[0] + folds[1]]),
    }
    return {**checks, "verdict": V.verdict(checks)}


def logps_cache(path, key, policy, rows):
    """(chosen, rejected) response log-prob sums of pairs under a policy, cached."""
    def fn():
        ps = [r["prompt"] for r in rows]
        return [R.response_logps(policy, ps, [r[side] for r in rows])[0] for side in ("chosen", "rejected")]
    return cached(path, key, fn)


def irm(policy_lp, init_lp, beta=BETA):
    (pc, pr), (ic, ir) = policy_lp, init_lp
    return [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, ic, ir)]


def heldout_pairs(rows, gold_fn):
    out = []
    for it in best_worst(rows, len(rows[0]["texts"]), gold_fn, "held"):
        ga, gb = gold_fn(it["prompt"], it["a"]), gold_fn(it["prompt"], it["b"])
        if ga != gb:
            out.append({"id": it["id"], "prompt": it["prompt"], "chosen": it["a"], "rejected": it["b"],
                        "gold_chosen": ga, "gold_rejected": gb})
    return out


def training_pairs(out, seed, cfg, model, gold_fn, spurious_fn):
    """(seed_dir, pairs.jsonl path, its info, held-out prompts): the seed's noisy preference set and its
    bootstrapping prompts (boot_prompts.jsonl), built once from cached samples."""
    import random

    seed_dir = os.path.join(out, f"seed_{seed}")
    os.makedirs(seed_dir, exist_ok=True)
    train_p, held_p = prompts(os.path.join(out, "assets"), cfg)
    pool = list(train_p)
    random.Random(seed).shuffle(pool)
    pairs_path, pinfo = build_pairs(seed_dir, model, pool[:cfg["n_prompts"]], cfg, seed, gold_fn, spurious_fn)
    boot = pool[cfg["n_prompts"]: cfg["n_prompts"] + cfg["boot_prompts"]]
    if not os.path.exists(os.path.join(seed_dir, "boot_prompts.jsonl")):
        R.write_jsonl(os.path.join(seed_dir, "boot_prompts.jsonl"),
                      [{"id": f"bp{n}", "prompt": p} for n, p in enumerate(boot)])
    return seed_dir, pairs_path, pinfo, held_p


def seed_run(out, seed, cfg, methods, gold_fn, spurious_fn, threads, precision, tokenizer, model, rank_anyway=False):
    seed_dir, pairs_path, pinfo, held_p = training_pairs(out, seed, cfg, model, gold_fn, spurious_fn)
    eval_prompts = held_p[:cfg["n_eval_prompts"]]
    held_rows = sampled(seed_dir, "heldout_samples", model,
                        held_p[cfg["n_eval_prompts"]: cfg["n_eval_prompts"] + cfg["heldout_prompts"]],
                        cfg["pair_samples"], cfg, 20_000 + seed)
    held = heldout_pairs(held_rows, gold_fn)
    cache = os.path.join(seed_dir, "measure_cache.json")
    # the independent "implausible" rule: NLL under pi0 above the 99th percentile of pi0's own samples
    nll_cap = cached(cache, "nll_cap", lambda: M.quantile(R.response_nll(
        model, [r["prompt"] for r in held_rows for _ in r["token_ids"]],
        [ids for r in held_rows for ids in r["token_ids"]]), 0.99))
    pairs = R.read_jsonl(pairs_path)
    n_pairs = len(pairs)
    init_held = logps_cache(cache, "init_heldout", model, held)
    res = {"seed": seed, "pairs": pinfo, "n_heldout_pairs": len(held), "nll_cap": nll_cap, "methods": {}}
    evals = {"init": cached(cache, "eval_init", lambda: evaluate(model, model, eval_prompts, cfg, gold_fn, nll_cap))}
    pairs_by_id = {r["id"]: r for r in pairs}
    held_irm = {}

    def measure(names):
        runs = run_methods(names, model, pairs_path, n_pairs, cfg, seed_dir, seed, threads, precision)
        for m in names:
            run_dir, _, rc = runs[m]
            if rc and m in ("dpo", "dpo_clean"):  # the validity checks and every comparison need both
                raise SystemExit(f"quality: {m} failed (exit {rc}); see {run_dir}/stdout.log")
            if rc:
                res["methods"][m] = {"error": f"exit {rc}, see {run_dir}/stdout.log"}
                continue
            info = R.count_tokens(run_dir, tokenizer, cfg["max_len"])
            # the phases' seconds the run itself recorded: they survive a killed and resumed run, whose process
            # wall time would count only its last part
            info["wall_seconds"] = round(sum(info["seconds"].values()), 1)
            policy = info["final_policy"]
            evals[m] = cached(cache, f"eval_{m}", lambda: evaluate(policy, model, eval_prompts, cfg, gold_fn, nll_cap))
            held_irm[m] = irm(logps_cache(cache, f"heldout_{m}", policy, held), init_held)
            rs = R.review_stats(run_dir, pairs_by_id) if m not in GOLD_DATA else []
            res["methods"][m] = {**info, "heldout_irm_accuracy": V.check_reward_orders_pairs(
                held_irm[m], [r["gold_chosen"] - r["gold_rejected"] for r in held])["accuracy"],
                "review_auroc_flipped": [r["auroc_flipped"] for r in rs],
                "review_flipped_share_dropped": [r["flipped_share_dropped"] for r in rs]}

    # validity first: the two DPO runs and the fold twins; the other methods only train where it has signal
    measure(["dpo", "dpo_clean"])
    res["validity"] = validity(seed_dir, model, pairs_path, cfg, seed, threads, precision, held, held_irm["dpo_clean"],
                               evals, cache)
    R.log(f"seed {seed}: validity\n" + "\n".join(validity_lines({**res["validity"], **{
        k: {**res["validity"][k], "per_seed": [res["validity"][k]]} for k in ("reward_orders_heldout_pairs",
                                                                             "oof_flip_auroc")}})))
    if res["validity"]["verdict"]["has_signal"] or rank_anyway:
        measure([m for m in methods if m not in ("dpo", "dpo_clean")])
    for m, ev in evals.items():
        summ = res["methods"].setdefault(m, {})
        kinds = [k for k in ev["degenerate_kind"] if k]
        summ.update({"guarded_gold": V.mean(ev["guarded"]), "mean_gold": V.mean(ev["gold"]),
                     "degenerate_share": V.mean(ev["degenerate"]),
                     "degenerate_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
                     "mean_length": V.mean(ev["length"]), "nll_init": V.mean(ev["nll_init"])})
        for base in ("dpo", "cdpo", "init"):
            if base in evals and base != m:
                summ[f"vs_{base}"] = M.paired_difference(ev["guarded"], evals[base]["guarded"], seed=seed)
    res["guarded"] = {m: ev["guarded"] for m, ev in evals.items()}
    res["hh"] = hh_table(out, cfg, model, seed, threads, precision)
    return res


# ------------------------------------------------------------------------------------------- real human labels

HH_METHODS = ("dpo", "sera_ss", "cdpo", "sera_ss_oof", "sera_soft_oof")  # table order: the target's comparison first
HH_DEFAULT = HH_METHODS[:3]  # the out-of-fold arms only on request (--hh-methods): they train twice as much


def hh_split(rows, n_train, n_eval, seed):
    """(train rows, held-out rows, {"train": [[first, end), ...], "heldout": [first, end)} as row indices).
    Every seed is judged on the last `n_eval` rows and seed s trains on the s-th block of `n_train` rows before
    them (seed 0: the first rows), wrapping round when the blocks run out, so seeds differ in their training pairs
    and never see a held-out one. When only one training block fits (e.g. 384 + 128 of 512 rows), seeds rotate
    the held-out block instead, cross-validation style: seed s holds out the s-th block of `n_eval` rows counted
    from the end (seed 0: the last rows, as above) and trains on the first `n_train` of the other rows."""
    n_blocks = (len(rows) - n_eval) // n_train
    if n_blocks < 1:
        raise SystemExit(f"quality: the HH-RLHF file has {len(rows)} pairs, too few for {n_train} training and "
                         f"{n_eval} held-out pairs")
    if n_blocks > 1:
        start = (seed % n_blocks) * n_train
        return (rows[start: start + n_train], rows[len(rows) - n_eval:],
                {"train": [[start, start + n_train]], "heldout": [len(rows) - n_eval, len(rows)]})
    end = len(rows) - (seed % (len(rows) // n_eval)) * n_eval
    before = end - n_eval  # rows ahead of the held-out block; the rest of the training rows follow it
    ranges = (([[0, min(before, n_train)]] if before else []) +
              ([[end, end + n_train - before]] if n_train > before else []))
    return ([rows[i] for a, b in ranges for i in range(a, b)], rows[before:end],
            {"train": ranges, "heldout": [before, end]})


def hh_correct(model, policy, held, cache, key):
    """Per held-out pair: 1 when the policy's implicit reward (vs the initial model) prefers the human-chosen
    response, so methods can be compared pair by pair. The conversation is formatted as OpenRLHF's RewardDataset
    does (chat template, trailing newlines stripped, EOS last), so this is the product's --eval.dataset accuracy
    up to its --data.max_len truncation and batching."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in held]

    def lp(path, name):  # [chosen log-prob sums, rejected log-prob sums], cached per model
        out = []
        for side in ("chosen", "rejected"):
            def ids(t, p, r, side=side):
                text = t.apply_chat_template(r["prompt"] + r[side], tokenize=False).rstrip("\n")
                return t(text if text.endswith(t.eos_token) else text + " " + t.eos_token,
                         add_special_tokens=False)["input_ids"]
            out.append(cached(cache, f"{name}_{side}_eos", lambda: R.score_responses(path, prompts, held, ids)[0]))
        return out

    init, pol = lp(model, "init"), lp(policy, key)
    return [int(m > 0) for m in irm(pol, init)]


def hh_table(out, cfg, model, seed, threads, precision, methods=HH_DEFAULT):
    """SmolLM2 trained on `hh_train` HH-RLHF harmless-base pairs (the project's embedded chat-format file; a
    different block per seed, see hh_split) by DPO, SeRA-SS and cDPO with equal training pairs; each final policy's
    implicit reward is scored on the last `hh_eval` pairs of the file (never trained on) through the product's
    --eval.dataset (the share of held-out human preferences it orders correctly), and pair by pair for paired
    differences against DPO. Written to OUT/hh_seed_<s>/hh.json, keeping the methods earlier invocations ran."""
    from sera_openrlhf.assets import default_dataset_path

    if not cfg["hh_train"]:
        return None
    hh_dir = os.path.join(out, f"hh_seed_{seed}")
    os.makedirs(hh_dir, exist_ok=True)
    rows = R.read_jsonl(default_dataset_path(chat=True))
    train, held, used = hh_split(rows, cfg["hh_train"], cfg["hh_eval"], seed)
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    paths = {}
    for name, part in (("train", train), ("heldout", held)):
        paths[name] = os.path.join(hh_dir, f"{name}.jsonl")
        if not os.path.exists(paths[name]):
            R.write_jsonl(paths[name], part)
        elif [r["id"] for r in R.read_jsonl(paths[name])] != [r["id"] for r in part]:
            raise SystemExit(f"quality: {paths[name]} holds another HH-RLHF split than --hh-train "
                             f"{cfg['hh_train']} gives seed {seed}; use another --out")
    hh_cfg = {**cfg, "max_len": 192, "micro_batch_size": 4}
    result = {"seed": seed, "n_train": len(train), "train_rows": used["train"], "heldout_rows": used["heldout"],
              "n_heldout": len(held), "methods": {}}
    earlier = os.path.join(hh_dir, "hh.json")
    if os.path.exists(earlier):  # an invocation adds its methods to those earlier ones ran, so the table has all
        result["methods"] = {k: v for k, v in json.load(open(earlier))["methods"].items() if k not in methods}
    cache = os.path.join(hh_dir, "measure_cache.json")
    for name in methods:
        run_dir = os.path.join(hh_dir, name)
        cmd = command(name, model, paths["train"], len(train), hh_cfg, hh_dir, seed, run_dir, precision)
        cmd += ["--data.apply_chat_template", "--eval.dataset", paths["heldout"], "--sera.prompts",
                paths["train"]]  # bootstrapping is off for all of them; --sera.prompts only has to exist
        _, wall, rc = R.run_method(f"hh_{name}", cmd, run_dir, seed, env(threads))
        if rc:
            result["methods"][name] = {"error": f"exit {rc}, see {run_dir}/stdout.log"}
            continue
        state = json.load(open(os.path.join(run_dir, "sera_state.json")))
        last = state["iterations"][str(max(int(t) for t in state["iterations"]))]
        ev = last["train"].get("eval") or {}
        result["methods"][name] = {"heldout_accuracy": ev.get("acc_mean"), "heldout_loss": ev.get("eval_loss"),
                                   "n_evaluated": ev.get("n", len(held)),
                                   "per_iteration": {t: (v.get("train", {}).get("eval") or {}).get("acc_mean")
                                                     for t, v in state["iterations"].items()},
                                   "correct": hh_correct(model, state["final_policy"], held, cache, name)}
    R.write_text(os.path.join(hh_dir, "hh.json"), json.dumps(result, indent=1))
    return result


def hh_lines(hh):
    """The HH-RLHF table of results.md. Per method: the share of held-out pairs ordered right, scored pair by pair in
    fp32 (mean over seeds), the product's own --eval.dataset accuracy per seed (in the run's precision: bf16
    rounding flips pairs whose margin is near 0), and the difference from DPO, paired per seed and pooled,
    bootstrapped over held-out pairs. Seeds judged on the same pairs pool each pair's correctness averaged over
    seeds (Wilson interval over the pairs, not pairs x seeds); seeds with their own held-out blocks (see hh_split)
    pool all their pairs side by side."""
    def rows(ranges):  # [[first, end), ...]
        return ", ".join(f"{a}-{b - 1}" for a, b in ranges)

    def vs_dpo(a, b):  # paired 0/1 correctness lists
        d = M.paired_difference(a, b)
        return fmt_ci(d["diff"], d["lo"], d["hi"], signed=True)

    held = {tuple(s["heldout_rows"]) for s in hh}
    same_held = len(held) == 1
    seeds = ", ".join(f"{s['seed']} (pairs {rows(s['train_rows'])}"
                      + ("" if same_held else f"; held out {rows([s['heldout_rows']])}") + ")" for s in hh)
    judged = (f"share of the last {hh[0]['n_heldout']} pairs" if same_held else
              f"share of the seed's own {hh[0]['n_heldout']} held-out pairs ({len(hh) * hh[0]['n_heldout']} in all)")
    lines = ["", "## Real human labels: held-out HH-RLHF harmless-base pairs", "",
             f"SmolLM2 trained on {hh[0]['n_train']} pairs of the embedded HH-RLHF harmless-base file (chat format; "
             f"seeds {seeds}) with equal training pairs per method; {judged} "
             "(never trained on) whose human-preferred response gets the higher implicit reward (chance 0.5), "
             "scored pair by pair in fp32 with paired 95 % bootstrap differences from DPO over held-out pairs; "
             "beside it the product's own --eval.dataset accuracy after the last iteration, in the run's precision.",
             "", "| method | held-out accuracy [95 % Wilson] | per seed | --eval.dataset per seed | vs DPO, per seed | "
             "vs DPO, pooled | --eval.dataset per iteration (first seed that ran it) |", "|---|---|---|---|---|---|---|"]
    for name in [m for m in HH_METHODS if any(m in s["methods"] for s in hh)]:
        runs = [s["methods"].get(name, {}) for s in hh]
        correct = [r["correct"] for r in runs if "correct" in r]
        if not correct:
            lines.append(f"| {METHODS[name][0]} | – | – | – | – | – | – |")
            continue
        acc = [sum(r["correct"]) / len(r["correct"]) if "correct" in r else None for r in runs]  # per seed
        accs = [a for a in acc if a is not None]
        lo, hi = wilson(V.mean(accs), max(len(c) for c in correct) * (1 if same_held else len(correct)))
        # per seed, "–" where the seed lacks the method (an arm run on some folds only), so the columns align
        paired = [(r["correct"], s["methods"]["dpo"]["correct"])
                  if "correct" in r and "correct" in s["methods"].get("dpo", {}) else None for r, s in zip(runs, hh)]
        both = [p for p in paired if p]
        per_seed = pooled = "–"
        if name != "dpo" and both:
            per_seed = ", ".join(vs_dpo(*p) if p else "–" for p in paired)
            avg = ((lambda cols: [sum(c) / len(c) for c in zip(*cols)]) if same_held else  # noqa: E731
                   (lambda cols: [x for c in cols for x in c]))
            pooled = vs_dpo(avg([a for a, _ in both]), avg([b for _, b in both]))
        each = ", ".join("–" if a is None else f"{a:.3f}" for a in acc)
        product = ", ".join("–" if r.get("heldout_accuracy") is None else f"{r['heldout_accuracy']:.3f}" for r in runs)
        per = next((r["per_iteration"] for r in runs if "per_iteration" in r), {})
        lines.append(f"| {METHODS[name][0]} | {fmt_ci(V.mean(accs), lo, hi)} | {each} | {product} | {per_seed} | "
                     f"{pooled} | " + ", ".join(f"{t}: {a:.3f}" for t, a in sorted(per.items()) if a is not None) + " |")
    return lines


# ------------------------------------------------------------------------------------------- validity sweep


def sweep_cell(out, seed, cfg, samples, n_prompts, gold_fn, spurious_fn, threads, precision, tokenizer, model):
    """The validity checks for another pair construction (samples per prompt) and data size (prompts): a run of
    only the two DPO methods and the fold twins, on pairs cut from the same cached samples, judged on the same
    held-out pairs and evaluation prompts as the main run."""
    import shutil

    cell_out = os.path.join(out, "sweep", f"{samples}x{n_prompts}")
    main_seed, cell_seed = os.path.join(out, f"seed_{seed}"), os.path.join(cell_out, f"seed_{seed}")
    os.makedirs(cell_seed, exist_ok=True)
    if not os.path.exists(os.path.join(cell_out, "assets")):
        os.symlink(os.path.join(out, "assets"), os.path.join(cell_out, "assets"))
    for name in ("train_samples.jsonl", "heldout_samples.jsonl"):
        if not os.path.exists(os.path.join(cell_seed, name)):
            shutil.copyfile(os.path.join(main_seed, name), os.path.join(cell_seed, name))
    main_cache = json.load(open(os.path.join(main_seed, "measure_cache.json")))
    for key in ("nll_cap", "eval_init", "init_heldout"):
        cached(os.path.join(cell_seed, "measure_cache.json"), key, lambda: main_cache[key])
    cell_cfg = {**cfg, "n_prompts": n_prompts, "pair_samples": samples, "hh_train": 0}
    res = seed_run(cell_out, seed, cell_cfg, ["dpo", "dpo_clean"], gold_fn, spurious_fn, threads, precision,
                   tokenizer, model)
    return {"samples": samples, "n_prompts": n_prompts, "n_pairs": res["pairs"]["n_pairs"],
            "median_gold_gap": res["pairs"]["median_gold_gap"], "validity": res["validity"]}


def write_sweep(out, cells):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Validity checks against pair construction and data size (SmolLM2 testbed)", "",
             "| samples per prompt | prompts | pairs | median gold gap | 1: clean vs noisy DPO guarded gold | "
             "2: held-out IRM ordering | 3: out-of-fold flip AUROC | verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["samples"], c["n_prompts"])):
        v = c["validity"]
        c1, c2, c3 = v["label_noise_hurts"], v["reward_orders_heldout_pairs"], v["oof_flip_auroc"]
        mark = lambda x: "pass" if x["pass"] else "FAIL"  # noqa: E731
        lines.append(f"| {c['samples']} | {c['n_prompts']} | {c['n_pairs']} | {c['median_gold_gap']:.2f} | "
                     f"{c1['clean']['mean']:.3f} vs {c1['noisy']['mean']:.3f} ({mark(c1)}) | "
                     f"{100 * c2['accuracy']:.1f} % ({mark(c2)}) | {c3['auroc']:.3f} [{c3['lo']:.3f}, {c3['hi']:.3f}] "
                     f"({mark(c3)}) | {'signal' if v['verdict']['has_signal'] else 'no signal'} |")
    R.write_text(os.path.join(out, "sweep.md"), "\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in sorted({c["samples"] for c in cells}):
        row = sorted((c for c in cells if c["samples"] == k), key=lambda c: c["n_pairs"])
        x = [c["n_pairs"] for c in row]
        axes[0].plot(x, [c["validity"]["oof_flip_auroc"]["auroc"] for c in row], "o-", label=f"{k} samples/prompt")
        axes[1].plot(x, [c["validity"]["reward_orders_heldout_pairs"]["accuracy"] for c in row], "o-",
                     label=f"{k} samples/prompt")
    axes[0].axhline(0.5, color="k", lw=0.8, ls="--")
    axes[1].axhline(V.ORDER_MIN, color="k", lw=0.8, ls="--")
    axes[0].set_title("out-of-fold flip AUROC (check 3)")
    axes[1].set_title("held-out IRM ordering (check 2)")
    for ax in axes:
        ax.set_xlabel("pairs")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=110)
    plt.close(fig)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- aggregate and report

KEYS = ("guarded_gold", "mean_gold", "degenerate_share", "mean_length", "nll_init", "heldout_irm_accuracy",
        "train_pairs", "train_tokens", "review_scoring_tokens", "generated_tokens", "wall_seconds")


def aggregate(per_seed, methods):
    table = {}
    for m in ["init"] + methods:
        rows = [s for s in per_seed if m in s["guarded"]]
        if not rows:
            continue
        agg = {"n_seeds": len(rows)}
        for key in KEYS:
            vals = [s["methods"][m][key] for s in rows if s["methods"][m].get(key) is not None]
            if vals:
                agg[key] = {"mean": V.mean(vals), "values": vals}
        pooled = [g for s in rows for g in s["guarded"][m]]
        mean, lo, hi = V.interval(pooled, [V.mean(s["guarded"][m]) for s in rows])
        agg["guarded_gold"].update({"lo": lo, "hi": hi, "over": "seeds" if len(rows) >= 2 else "prompts"})
        firsts = [s["methods"][m]["review_auroc_flipped"][0] for s in rows
                  if s["methods"][m].get("review_auroc_flipped")]
        if firsts:
            agg["review_auroc_first"] = V.mean(firsts)
        for base in ("dpo", "cdpo", "init"):
            if m != base and all(base in s["guarded"] for s in rows):
                agg[f"vs_{base}"] = M.paired_difference(pooled, [g for s in rows for g in s["guarded"][base]])
        table[m] = agg
    # validity over seeds: check 1 on the seeds' means (>= 2 seeds), checks 2-3 must pass on every seed
    checks = {"label_noise_hurts": V.check_label_noise_hurts(
        [g for s in per_seed for g in s["guarded"]["dpo_clean"]], [g for s in per_seed for g in s["guarded"]["dpo"]],
        [V.mean(s["guarded"]["dpo_clean"]) for s in per_seed], [V.mean(s["guarded"]["dpo"]) for s in per_seed])}
    for name in ("reward_orders_heldout_pairs", "oof_flip_auroc"):
        per = [s["validity"][name] for s in per_seed]
        checks[name] = {**per[0], "per_seed": per, "pass": all(c["pass"] for c in per)} if len(per) == 1 else {
            "per_seed": per, "pass": all(c["pass"] for c in per)}
    return table, {**checks, "verdict": V.verdict(checks)}


def fmt_ci(mean, lo, hi, digits=3, signed=False):
    f = (lambda v: f"{v:+.{digits}f}") if signed else (lambda v: f"{v:.{digits}f}")
    return f(mean) + (f" [{f(lo)}, {f(hi)}]" if lo is not None else "")


def wilson(p, n, z=1.96):
    """Two-sided 95 % Wilson score interval of a share p of n."""
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


def validity_lines(checks):
    c1, c2, c3 = (checks[k] for k in ("label_noise_hurts", "reward_orders_heldout_pairs", "oof_flip_auroc"))
    ok = lambda c: "**pass**" if c["pass"] else "**FAIL**"  # noqa: E731
    lines = [f"1. Gold-label DPO beats noisy-label DPO on guarded gold, non-overlapping 95 % intervals (over "
             f"{c1['over']}): clean {fmt_ci(c1['clean']['mean'], c1['clean']['lo'], c1['clean']['hi'])} vs noisy "
             f"{fmt_ci(c1['noisy']['mean'], c1['noisy']['lo'], c1['noisy']['hi'])}: {ok(c1)}"]
    for s in c2["per_seed"]:
        lines.append(f"2. The gold-label DPO policy's implicit reward orders {s['n']} held-out gold pairs "
                     f"{100 * s['accuracy']:.1f} % [{100 * s['lo']:.1f}, {100 * s['hi']:.1f}] (larger-gap half "
                     f"{100 * s['larger_gap_half']:.1f} %, smaller-gap half {100 * s['smaller_gap_half']:.1f} %; "
                     f"needs >= {100 * s['threshold']:.0f} %): {ok(s)}")
    for s in c3["per_seed"]:
        lines.append(f"3. Out-of-fold flip-detection AUROC of noisy-label DPO's IRM on the noisy set ({s['n']} pairs, "
                     f"{s['n_flipped']} flipped, 2 folds): {s['auroc']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}] "
                     f"(needs the interval above 0.5): {ok(s)}")
    return lines + ["", f"**Verdict: {checks['verdict']['message']}.**"]


def write_report(out, table, checks, methods, info):
    labels = {"init": "initial policy (SmolLM2-135M-Instruct)", **{m: METHODS[m][0] for m in METHODS}}
    lines = [f"# Alignment quality, SmolLM2 testbed: size {info['size']}, seeds {info['seeds']}", "",
             f"`{info['command']}`", "", "## Validity checks", ""] + validity_lines(checks) + ["", "## Methods", ""]
    if not checks["verdict"]["has_signal"]:
        lines += ["The testbed has no signal, so the table below is **not a ranking** of methods.", ""]
    lines += ["Guarded gold = VADER compound of the greedy continuation of held-out prompts, 0 for a degenerate one "
              "(independent rule: empty, > 50 % repeated word 3-grams, > 20 % non-ASCII, or NLL under the initial "
              "policy above the 99th percentile of its own samples). [lo, hi]: 95 % intervals (t over seeds with >= "
              "2 seeds, else bootstrap over prompts); differences and win rates: paired bootstrap over prompts. "
              "Every method trains on the same number of pairs (T x N, `--sera.train_pairs`), so the same "
              "optimizer steps; tokens are counted from the run directories.", "",
              "| method | guarded gold | vs offline DPO | win vs DPO | vs cDPO | degenerate | held-out IRM acc. | "
              "review AUROC (flips) | train pairs | train tok | review tok | generated tok | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in ["init"] + methods:
        a = table.get(m)
        if not a:
            continue
        g = a["guarded_gold"]
        d, c = a.get("vs_dpo"), a.get("vs_cdpo")
        num = lambda k, f="{:.0f}": f.format(a[k]["mean"]) if k in a else "–"  # noqa: E731
        auroc = f"{a['review_auroc_first']:.3f}" if "review_auroc_first" in a else "–"
        lines.append(
            f"| {labels[m]} | {fmt_ci(g['mean'], g['lo'], g['hi'])} | "
            f"{fmt_ci(d['diff'], d['lo'], d['hi'], signed=True) if d else '–'} | "
            f"{fmt_ci(d['win'], d['win_lo'], d['win_hi'], digits=2) if d else '–'} | "
            f"{fmt_ci(c['diff'], c['lo'], c['hi'], signed=True) if c else '–'} | "
            f"{100 * a['degenerate_share']['mean']:.1f} % | {num('heldout_irm_accuracy', '{:.3f}')} | {auroc} | ")
        lines[-1] += (f"{num('train_pairs')} | {num('train_tokens')} | {num('review_scoring_tokens')} | "
                      f"{num('generated_tokens')} | {num('wall_seconds')} |")
    for what, err in info.get("errors", {}).items():
        lines.append(f"| {what} | **failed**: {err} |" + " |" * 11)
    hh = [s for s in info.get("hh", []) if s]
    if hh:
        lines += hh_lines(hh)
    text = "\n".join(lines) + "\n"
    R.write_text(os.path.join(out, "results.md"), text)
    return text


def write_plot(out, table, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in ["init"] + methods if m in table]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    g = [table[m]["guarded_gold"] for m in names]
    axes[0].bar(range(len(names)), [x["mean"] for x in g], color="tab:blue",
                yerr=[[x["mean"] - x["lo"] if x["lo"] is not None else 0 for x in g],
                      [x["hi"] - x["mean"] if x["hi"] is not None else 0 for x in g]], capsize=3)
    axes[0].set_title("guarded gold, held-out prompts (95 % interval)")
    acc = [table[m].get("heldout_irm_accuracy", {}).get("mean", float("nan")) for m in names]
    axes[1].bar(range(len(names)), acc, color="tab:orange")
    axes[1].axhline(0.5, color="k", lw=0.8, ls="--")
    axes[1].set_title("implicit reward orders held-out gold pairs (share)")
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=110)
    plt.close(fig)


def main(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="run.py --testbed smollm2", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default="smollm2")
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/quality_smollm2")
    ap.add_argument("--gold", default="metrics:vader_gold", help="module:function or file.py:function, "
                    "f(prompt, response) -> float, higher is better")
    ap.add_argument("--spurious", default="metrics:prefer_longer", help="module:function or file.py:function, "
                    "f(prompt, a, b, gold_a, gold_b) -> 0, 1 or None; metrics:no_spurious for none")
    ap.add_argument("--flip-share", type=float, default=FLIP,
                    help="share of labels flipped at random (0.5 with --spurious metrics:no_spurious: labels with no "
                         "signal); the cDPO-family methods keep eps = %(default)s, the prior a user would bring")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS))
    ap.add_argument("--model", default=None, help="initial policy directory (default: the embedded "
                    "SmolLM2-135M-Instruct); the smoke test passes a tiny model")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="--sera.precision of every run (auto: bf16 only where this machine runs it faster)")
    ap.add_argument("--rank-anyway", action="store_true",
                    help="train and tabulate every method even when a validity check fails (default: stop after "
                         "the validity checks; the table is then not a ranking)")
    ap.add_argument("--sweep", nargs="*", default=[], metavar="SxP",
                    help="after the main run, the validity checks for other pair constructions and sizes, e.g. "
                         "2x384 4x96 4x192 (S samples per prompt, P prompts <= the size's prompts); first seed only")
    ap.add_argument("--no-hh", action="store_true",
                    help="skip the HH-RLHF human-label table (e.g. for a second invocation that only runs --sweep)")
    ap.add_argument("--hh-only", action="store_true",
                    help="only the HH-RLHF human-label table for --seeds (each seed its own block of training pairs), "
                         "written to OUT/hh.md; no VADER runs")
    ap.add_argument("--hh-methods", nargs="+", default=list(HH_DEFAULT), choices=HH_METHODS,
                    help="the methods of the HH-RLHF table (DPO always: every difference is taken against it)")
    ap.add_argument("--hh-train", type=int, default=None, metavar="N",
                    help="HH-RLHF training pairs per seed (default: the size's, 96); the last 128 pairs of the "
                         "512-pair file stay held out, so up to 384; above 192 only one training block fits, and "
                         "seed s holds out the s-th block of 128 from the end instead (4 folds)")
    args = ap.parse_args(argv)
    if "dpo" not in args.hh_methods:
        args.hh_methods.insert(0, "dpo")
    for need in ("dpo", "dpo_clean"):  # the validity checks and the baseline of every comparison
        if need not in args.methods:
            args.methods.insert(0, need)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if not 0.0 <= args.flip_share <= 1.0:
        raise SystemExit(f"--flip-share must be in [0, 1], got {args.flip_share}")
    if args.hh_train is not None and args.hh_train < 1:
        raise SystemExit(f"--hh-train must be at least 1, got {args.hh_train}")
    hh_train = args.hh_train or SIZES[args.size]["hh_train"]
    cfg = {**SIZES[args.size], "flip_share": args.flip_share, "hh_train": 0 if args.no_hh else hh_train}
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "assets"), exist_ok=True)
    gold_fn, spurious_fn = M.load_callable(args.gold), M.load_callable(args.spurious)
    from transformers import AutoTokenizer

    model = model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    t0 = time.time()
    if args.hh_only:
        if not SIZES[args.size]["hh_train"]:
            raise SystemExit(f"--hh-only: --size {args.size} has no HH-RLHF table (use --size default)")
        hh = []
        for seed in args.seeds:
            hh.append(hh_table(out, {**cfg, "hh_train": hh_train}, model, seed, args.threads, args.precision,
                               args.hh_methods))  # (--hh-only wins over --no-hh)
            md = "\n".join(["# " + " ".join(["python benchmarks/quality/run.py"] + list(argv))] + hh_lines(hh))
            R.write_text(os.path.join(out, "hh.md"), md + "\n")
            R.log(f"seed {seed} done\n{md}")
        return 1 if any("error" in m for s in hh for m in s["methods"].values()) else 0
    per_seed = []
    for seed in args.seeds:
        per_seed.append(seed_run(out, seed, cfg, args.methods, gold_fn, spurious_fn, args.threads, args.precision,
                                 tokenizer, model, args.rank_anyway))
        table, checks = aggregate(per_seed, args.methods)
        info = {"testbed": "smollm2", "size": args.size, "seeds": [s["seed"] for s in per_seed], "config": cfg,
                "flip_share": args.flip_share, "prior_eps": FLIP, "beta": BETA, "gold": args.gold, "spurious": args.spurious,
                "training": "full fine-tuning, fp32 or bf16 per --sera.precision, ZeRO-0, packed training",
                "threads": args.threads, "wall_seconds_this_invocation": round(time.time() - t0, 1),
                "command": " ".join(["python benchmarks/quality/run.py"] + list(argv)),
                "hh": [s.get("hh") for s in per_seed],
                "errors": {f"seed {s['seed']}: {m}": d["error"] for s in per_seed for m, d in s["methods"].items()
                           if "error" in d}}
        R.write_text(os.path.join(out, "results.json"), json.dumps(
            {"info": info, "validity": checks, "summary": table,
             "per_seed": [{k: v for k, v in s.items() if k != "guarded"} for s in per_seed]}, indent=1))
        md = write_report(out, table, checks, args.methods, info)
        write_plot(out, table, args.methods)
        R.log(f"seed {seed} done\n{md}")
    if args.sweep:
        main_res = per_seed[0]
        cells = [{"samples": cfg["pair_samples"], "n_prompts": cfg["n_prompts"], "n_pairs": main_res["pairs"]["n_pairs"],
                  "median_gold_gap": main_res["pairs"]["median_gold_gap"], "validity": main_res["validity"]}]
        for spec in args.sweep:
            k, n = (int(x) for x in spec.lower().split("x"))
            if n > cfg["n_prompts"] or k > cfg["pair_samples"] or k < 2:
                raise SystemExit(f"--sweep {spec}: needs 2 <= samples <= {cfg['pair_samples']} and prompts <= "
                                 f"{cfg['n_prompts']} (the cached samples of --size {args.size})")
            cells.append(sweep_cell(out, args.seeds[0], cfg, k, n, gold_fn, spurious_fn, args.threads,
                                    args.precision, tokenizer, model))
            R.write_text(os.path.join(out, "sweep.json"), json.dumps(cells, indent=1))
            R.log("sweep so far\n" + write_sweep(out, cells))
    if info["errors"]:
        R.log(f"failed runs: {info['errors']}")
        return 1
    return 0 if checks["verdict"]["has_signal"] else 3
