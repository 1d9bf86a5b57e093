"""Alignment-quality benchmark: does SeRA beat offline DPO and iterative DPO at (about) equal compute?

    python benchmarks/quality/run.py --size small --seeds 0 1 2 --out runs/quality

One command: builds a tiny testbed once (cached under OUT/assets), makes a preference set with known defects
per seed, trains every method through the product's entry point (`python -m sera_openrlhf.cli.train_dpo`,
one subprocess per method), then samples from each final policy on held-out prompts and scores the samples
with a gold reward. Writes OUT/results.json, OUT/results.md and OUT/results.png. See README.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))  # tiny: the test suite's tiny assets

import metrics as M  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)

VADER_VERSION = "3.3.2"

SIZES = {
    # model, pretraining, data and sampling sizes; small fits a 2-core CPU in well under an hour per seed
    "small": dict(vocab=1024, hidden=64, layers=2, heads=4, pretrain_steps=700, pretrain_batch=32, prompt_words=4,
                  n_pairs=512, n_eval_prompts=128, eval_samples=4, max_new_tokens=40, max_len=96,
                  boot_prompts=256, boot_samples=4, iterations=3, batch_size=16, micro_batch_size=8, lr=5e-4),
    "large": dict(vocab=2048, hidden=256, layers=4, heads=8, pretrain_steps=3000, pretrain_batch=32, prompt_words=4,
                  n_pairs=1024, n_eval_prompts=256, eval_samples=4, max_new_tokens=32, max_len=96,
                  boot_prompts=512, boot_samples=8, iterations=3, batch_size=32, micro_batch_size=16, lr=3e-4),
}

METHODS = {
    # name -> (label, extra flags). Every method runs with --sera.enable so that all run directories have the
    # same layout (iter_<t>/policy, train_set.jsonl, sera_state.json).
    "dpo": ("offline DPO", ["--sera.iterations", "1"]),
    "control": ("iterative DPO control (keep_ratio 1.0)", ["--sera.keep_ratio", "1.0"]),
    "sera_ss": ("SeRA self-review only", ["--sera.generated_share_max", "0"]),
    "sera": ("full SeRA (defaults, guards on)", []),
    "sera_cf2": ("full SeRA, crossfit 2 folds", ["--sera.review_refit", "crossfit", "--sera.crossfit_folds", "2"]),
    "sera_ipo": ("full SeRA, IPO loss", ["--sera.loss", "ipo"]),
    # reference points, not options a user has: they read the gold labels
    "dpo_oracle": ("offline DPO, gold-wrong pairs removed (a perfect self-review)", ["--sera.iterations", "1"]),
    "dpo_clean": ("offline DPO on gold labels (no corruption: the headroom)", ["--sera.iterations", "1"]),
}
DEFAULT_METHODS = ["dpo", "control", "sera_ss", "sera", "sera_cf2", "sera_ipo", "dpo_oracle", "dpo_clean"]
# the reference points train on a gold-derived copy of the seed's pairs
GOLD_DATA = {"dpo_oracle": "pairs_oracle.jsonl", "dpo_clean": "pairs_clean.jsonl"}


def log(msg):
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- setup / assets


def ensure_vader(assets):
    """Install vaderSentiment (the default gold reward) if missing and fetch its sdist's human-rated snippets."""
    try:
        import vaderSentiment  # noqa: F401
    except ImportError:
        log(f"installing vaderSentiment=={VADER_VERSION}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"vaderSentiment=={VADER_VERSION}"], check=True)
    target = os.path.join(assets, "movieReviewSnippets_GroundTruth.txt")
    if os.path.exists(target):
        return target
    dl = os.path.join(assets, "sdist")
    os.makedirs(dl, exist_ok=True)
    if not glob.glob(os.path.join(dl, "vaderSentiment-*.tar.gz")):
        log("downloading the vaderSentiment sdist (human-rated snippets)")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"vaderSentiment=={VADER_VERSION}", "-d", dl], check=True)
    (sdist,) = glob.glob(os.path.join(dl, "vaderSentiment-*.tar.gz"))
    with tarfile.open(sdist) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        inner = tarfile.open(fileobj=outer.extractfile(member))
        m2 = next(m for m in inner.getmembers() if m.name.endswith("movieReviewSnippets_GroundTruth.txt"))
        data = inner.extractfile(m2).read()
    with open(target + ".tmp", "wb") as f:
        f.write(data)
    os.replace(target + ".tmp", target)
    return target


def load_snippets(path):
    """[(id, human mean rating, text)] from the tab-separated ground-truth file."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) >= 3 and parts[2].strip():
                out.append((parts[0], float(parts[1]), " ".join(parts[2].split())))
    return out


def split_snippets(snippets):
    """Deterministic 90/10 train/held-out split (independent of --seeds)."""
    rng = random.Random(1234)
    idx = list(range(len(snippets)))
    rng.shuffle(idx)
    cut = int(0.9 * len(idx))
    return [snippets[i] for i in idx[:cut]], [snippets[i] for i in idx[cut:]]


def make_prompt(text, words):
    ws = text.split()
    return " ".join(ws[:words]) if len(ws) > words + 2 else None


def build_testbed(assets, cfg):
    """Tokenizer + tiny Llama pretrained on the train-split snippets; prompts. Cached in assets/."""
    model_dir = os.path.join(assets, "init_policy")
    meta_path = os.path.join(assets, "testbed.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tiny import CHAT_TEMPLATE

    snippets = load_snippets(ensure_vader(assets))
    train, held = split_snippets(snippets)
    texts = [t for _, _, t in train]
    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=cfg["vocab"], special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg["hidden"], intermediate_size=4 * cfg["hidden"],
                       num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       num_key_value_heads=cfg["heads"], max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(mcfg)
    # the training text format of OpenRLHF's RewardDataset without templates: prompt + response + " " + EOS
    lm_texts = [t + " " + tokenizer.eos_token for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=cfg["pretrain_steps"], pct_start=0.05)
    rng = random.Random(0)
    model.train()
    losses = []
    for step in range(cfg["pretrain_steps"]):
        batch = tokenizer(rng.sample(lm_texts, cfg["pretrain_batch"]), return_tensors="pt", padding=True,
                          truncation=True, max_length=cfg["max_len"], add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0:
            log(f"pretrain step {step}/{cfg['pretrain_steps']} loss {loss.item():.3f}")
    model.eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # held-out LM loss
    with torch.no_grad():
        hb = tokenizer([t + " " + tokenizer.eos_token for _, _, t in held[:256]], return_tensors="pt", padding=True,
                       truncation=True, max_length=cfg["max_len"], add_special_tokens=False)
        hl = model(**hb, labels=hb["input_ids"].masked_fill(hb["attention_mask"] == 0, -100)).loss.item()
    train_prompts = [p for p in (make_prompt(t, cfg["prompt_words"]) for _, _, t in train) if p]
    held_prompts = [p for p in (make_prompt(t, cfg["prompt_words"]) for _, _, t in held) if p]
    meta = {"model_dir": model_dir, "n_params": sum(p.numel() for p in model.parameters()),
            "n_train_snippets": len(train), "n_heldout_snippets": len(held), "pretrain_seconds": round(time.time() - t0, 1),
            "pretrain_loss_last100": sum(losses[-100:]) / len(losses[-100:]), "heldout_lm_loss": hl,
            "train_prompts": train_prompts, "heldout_prompts": held_prompts}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    log(f"testbed built: {meta['n_params']} parameters, held-out LM loss {hl:.3f}, {meta['pretrain_seconds']} s")
    return meta


# ------------------------------------------------------------------------------------------- sampling / scoring


def load_model(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


def sample(model_path, prompts, n, max_new_tokens, seed, batch_size=64):
    """P lists of n generated Samples (the product's HF backend, temperature 1)."""
    from sera_openrlhf.generation import GenerationConfig, build_generator

    model, tok = load_model(model_path)
    cfg = GenerationConfig(num_samples=n, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed,
                           batch_size=batch_size)
    return build_generator("hf", tok, cfg, model=model).generate(list(prompts))


def score_responses(model_path, prompts, responses, to_ids):
    """(log-prob sums, token counts) of each response given its prompt under a model, with the product's scoring
    engine. to_ids(tokenizer, prompt, response) -> the full token ids, prompt first."""
    import torch

    from sera_openrlhf.scoring import SequenceItem, hf_logprob_fn, score_sequences

    model, tok = load_model(model_path)
    items = [SequenceItem(torch.tensor(to_ids(tok, p, r)), len(tok(p, add_special_tokens=False)["input_ids"]))
             for p, r in zip(prompts, responses)]
    res = score_sequences(hf_logprob_fn(model), items, tok.pad_token_id, show_progress=False)
    return res.logp_sum.tolist(), res.num_tokens.tolist()


def response_nll(model_path, prompts, responses):
    """Mean per-token NLL of each generated response (its token ids, EOS included) given its prompt."""
    sums, counts = score_responses(model_path, prompts, responses,
                                   lambda tok, p, r: tok(p, add_special_tokens=False)["input_ids"] + list(r))
    return [-s / n if n else float("nan") for s, n in zip(sums, counts)]


def response_logps(model_path, prompts, texts):
    """Sum of response-token log-probs of `prompt + text + " " + EOS` (the training format), and their number."""
    return score_responses(model_path, prompts, texts,
                           lambda tok, p, t: tok(p + t + " " + tok.eos_token, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------- per-seed data


def build_pairs(seed_dir, meta, cfg, seed, gold_fn, spurious_fn, flip_share):
    path = os.path.join(seed_dir, "pairs.jsonl")
    info_path = os.path.join(seed_dir, "pairs_info.json")
    if os.path.exists(path) and os.path.exists(info_path):
        with open(info_path) as f:
            return path, json.load(f)
    rng = random.Random(seed)
    pool = list(meta["train_prompts"])
    rng.shuffle(pool)
    # pairs with exactly equal gold are dropped, so sample more prompts than pairs wanted
    n_pool = 4 * cfg["n_pairs"]
    prompts = pool[:n_pool]
    t0 = time.time()
    samples = sample(meta["model_dir"], prompts, 2, cfg["max_new_tokens"], seed=10_000 + seed)
    items = [{"id": f"pair{n}", "prompt": p, "a": s[0].text, "b": s[1].text}
             for n, (p, s) in enumerate(zip(prompts, samples))
             if s[0].text.strip() and s[1].text.strip() and s[0].text != s[1].text
             and not s[0].truncated and not s[1].truncated]
    rows, info = M.label_pairs(items, gold_fn, spurious_fn, flip_share, seed)
    rows = rows[: cfg["n_pairs"]]
    info.update({"n_pairs_used": len(rows), "flipped_used": sum(r["flipped"] for r in rows),
                 "spurious_used": sum(r["spurious"] for r in rows), "gold_wrong_used": sum(r["gold_wrong"] for r in rows),
                 "seconds": round(time.time() - t0, 1)})
    write_jsonl(path, rows)
    # bootstrapping prompts: train-split prompts not used by the pairs
    boot = pool[n_pool: n_pool + cfg["boot_prompts"]]
    write_jsonl(os.path.join(seed_dir, "boot_prompts.jsonl"), [{"id": f"bp{n}", "prompt": p} for n, p in enumerate(boot)])
    with open(info_path, "w") as f:
        json.dump(info, f)
    log(f"seed {seed}: {info}")
    return path, info


# ------------------------------------------------------------------------------------------- methods


def gold_derived_pairs(seed_dir, name):
    """The seed's pairs with the gold labels: `pairs_oracle.jsonl` drops every pair whose chosen has the lower
    gold (what a perfect self-review would keep), `pairs_clean.jsonl` swaps them back (no corruption at all)."""
    path = os.path.join(seed_dir, GOLD_DATA[name])
    if not os.path.exists(path):
        rows = []
        for r in read_jsonl(os.path.join(seed_dir, "pairs.jsonl")):
            if r["gold_wrong"] and name == "dpo_clean":
                r = {**r, "chosen": r["rejected"], "rejected": r["chosen"], "gold_chosen": r["gold_rejected"],
                     "gold_rejected": r["gold_chosen"], "gold_wrong": False}
            if not r["gold_wrong"]:
                rows.append(r)
        write_jsonl(path, rows)
    return path


def method_command(name, meta, cfg, seed_dir, seed, run_dir):
    iters = cfg["iterations"]
    data = gold_derived_pairs(seed_dir, name) if name in GOLD_DATA else os.path.join(seed_dir, "pairs.jsonl")
    base = [
        "--model.model_name_or_path", meta["model_dir"], "--data.dataset", data,
        "--data.prompt_key", "prompt", "--data.max_len", str(cfg["max_len"]),
        "--train.batch_size", str(cfg["batch_size"]), "--train.micro_batch_size", str(cfg["micro_batch_size"]),
        "--ds.zero_stage", "2", "--ds.param_dtype", "fp32", "--adam.lr", str(cfg["lr"]),
        "--train.seed", str(seed), "--ckpt.output_dir", run_dir, "--sera.enable",
        "--sera.prompts", os.path.join(seed_dir, "boot_prompts.jsonl"),
        "--sera.num_samples", str(cfg["boot_samples"]), "--sera.max_new_tokens", str(cfg["max_new_tokens"]),
        "--sera.generation_batch_size", "64",
    ]
    # equal compute: offline DPO trains T epochs in one iteration; the iterative methods 1 epoch per iteration
    offline = name == "dpo" or name in GOLD_DATA
    epochs = iters if offline else 1
    extra = list(METHODS[name][1])
    if not offline:
        extra += ["--sera.iterations", str(iters)]
    return [sys.executable, "-m", "sera_openrlhf.cli.train_dpo", *base, "--train.max_epochs", str(epochs), *extra]


def run_method(name, cmd, run_dir, seed, env=None):
    """Run one method's command (resumable: a finished run is reused, a killed one resumes from its state)."""
    state_path = os.path.join(run_dir, "sera_state.json")
    if os.path.exists(state_path):
        with open(state_path) as f:
            if json.load(f).get("final_policy"):
                return run_dir, 0.0, 0
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n")
    log(f"seed {seed}: {name} starts")
    t0 = time.time()
    with open(os.path.join(run_dir, "stdout.log"), "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env or {**os.environ, **ENV})
    wall = time.time() - t0
    log(f"seed {seed}: {name} finished rc={proc.returncode} in {wall:.0f} s")
    return run_dir, wall, proc.returncode


def count_tokens(run_dir, tokenizer, max_len):
    """Training tokens (policy forward+backward: pairs × (chosen + rejected tokens) × epochs, fold runs included),
    scoring tokens (no-grad self-review forwards) and generated tokens, read from the run directory."""
    with open(os.path.join(run_dir, "sera_state.json")) as f:
        state = json.load(f)
    epochs = state["config"]["train"]["max_epochs"]
    cache = {}

    def pair_tokens(r):
        key = r["id"]
        if key not in cache:
            p = r["prompt"]
            n = 0
            for side in ("chosen", "rejected"):
                n += min(len(tokenizer(p + r[side] + " " + tokenizer.eos_token, add_special_tokens=False)["input_ids"]), max_len)
            cache[key] = n
        return cache[key]

    train_tok = score_tok = gen_tok = 0
    train_pairs = 0
    for d in sorted(glob.glob(os.path.join(run_dir, "iter_*"))):
        ts = os.path.join(d, "train_set.jsonl")
        rows = read_jsonl(ts) if os.path.exists(ts) else []
        train_pairs += len(rows) * epochs
        train_tok += sum(pair_tokens(r) for r in rows) * epochs
        folds = glob.glob(os.path.join(d, "fold_*"))
        if folds and rows:
            k = len(folds)
            train_tok += int(sum(pair_tokens(r) for r in rows) * epochs * (k - 1))  # K fold runs on (K-1)/K each
            train_pairs += len(rows) * epochs * (k - 1)
        rv = os.path.join(d, "review.jsonl")
        # only a review that scored anything (a frozen one is scored at iteration 2 and read back after)
        review_stats = state["iterations"].get(d.rsplit("_", 1)[1], {}).get("review") or {}
        if os.path.exists(rv) and review_stats.get("scored_per_rank"):
            score_tok += sum(r["chosen_len"] + r["rejected_len"] for r in read_jsonl(rv))
        sm = os.path.join(d, "samples.jsonl")
        if os.path.exists(sm):
            smp = read_jsonl(sm)
            gen_tok += sum(r["n_generated_tokens"] for r in smp)
    n_gen = sum(v.get("train", {}).get("n_generated", 0) or 0 for v in state.get("iterations", {}).values())
    return {"train_pairs": train_pairs, "n_generated_pairs_trained": n_gen, "train_tokens": train_tok, "review_scoring_tokens": score_tok,
            "generated_tokens": gen_tok, "seconds": state.get("seconds", {}),
            "iterations_run": len(glob.glob(os.path.join(run_dir, "iter_*", "policy"))),
            "final_policy": state.get("final_policy")}


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_policy(policy, prompts, cfg, seed, gold_fn, init_path):
    from sera_openrlhf.bootstrap import is_degenerate_text

    samples = sample(policy, prompts, cfg["eval_samples"], cfg["max_new_tokens"], seed=20_000 + seed)
    flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
    texts = [s.text for _, s in flat]
    gold = [float(gold_fn(p, s.text)) for p, s in flat]
    degen = [is_degenerate_text(t) for t in texts]
    nll = response_nll(init_path, [p for p, _ in flat], [s.token_ids for _, s in flat])
    return {"texts": texts, "gold": gold, "degenerate": degen, "guarded": M.guarded(gold, degen),
            "length": [len(s.token_ids) for _, s in flat], "nll_init": nll,
            "truncated": [s.truncated for _, s in flat]}


def reward_probe(policy, init_path, prompts, init_eval, cfg, spurious_fn, beta=0.1):
    """The final policy's implicit reward r = beta * log(pi / pi_init) on the initial policy's held-out samples
    (the same texts for every method): how often it orders two samples of one prompt as gold does, as the spurious
    rule does, and its correlation with length (tokens)."""
    k = cfg["eval_samples"]
    flat_prompts = [p for p in prompts for _ in range(k)]
    texts = init_eval["texts"]
    lp, lens = response_logps(policy, flat_prompts, texts)
    lp0, _ = response_logps(init_path, flat_prompts, texts)
    r = [beta * (a - b) for a, b in zip(lp, lp0)]

    def agreement(reward):
        groups = [[(flat_prompts[i], texts[i], init_eval["gold"][i], reward[i]) for i in range(n * k, (n + 1) * k)]
                  for n in range(len(prompts))]
        return M.reward_agreement(groups, spurious_fn)

    out = agreement(r)
    out["length_corr"] = M.pearson(r, [float(x) for x in lens])
    # the per-token form (--sera.length_normalized_reward) removes the length term
    out["gold_per_token"] = agreement([x / n for x, n in zip(r, lens)])["gold"]
    return out


def review_stats(run_dir, pairs_by_id):
    out = []
    for d in sorted(glob.glob(os.path.join(run_dir, "iter_*")), key=lambda x: int(x.rsplit("_", 1)[1])):
        rv = os.path.join(d, "review.jsonl")
        if not os.path.exists(rv):
            continue
        rows = read_jsonl(rv)
        neg_irm = [-r["irm"] for r in rows]
        lab_f = [bool(pairs_by_id[r["id"]]["flipped"]) for r in rows]
        lab_w = [bool(pairs_by_id[r["id"]]["gold_wrong"]) for r in rows]
        st = {"iteration": int(d.rsplit("_", 1)[1]),
              "auroc_flipped": _auroc(neg_irm, lab_f), "auroc_gold_wrong": _auroc(neg_irm, lab_w)}
        st.update(M.dropped_corruption(rows, pairs_by_id))
        out.append(st)
    return out


def _auroc(scores, labels):
    from sera_openrlhf.selection import auroc

    try:
        return auroc(scores, labels)
    except ValueError:
        return None


def bootstrap_agreement(run_dir, gold_fn):
    """Share of bootstrapped pairs (implicit-reward labelled) whose chosen response has the higher gold."""
    agree = n = 0
    for bp in glob.glob(os.path.join(run_dir, "iter_*", "bootstrapped.jsonl")):
        for r in read_jsonl(bp):
            gc, gr = gold_fn(r["prompt"], r["chosen"]), gold_fn(r["prompt"], r["rejected"])
            if gc != gr:
                n += 1
                agree += gc > gr
    return agree / n if n else None


# ------------------------------------------------------------------------------------------- report


def summarise(per_seed, methods):
    """Aggregate per-seed summaries over seeds."""
    table = {}
    for m in ["init"] + methods:
        rows = [s["methods"][m] for s in per_seed if m in s["methods"] and "guarded_gold" in s["methods"][m]]
        if not rows:
            continue
        agg = {"n_seeds": len(rows)}
        for key in ("guarded_gold", "mean_gold", "degenerate_share", "mean_length", "nll_init", "win_vs_init",
                    "win_vs_dpo", "win_vs_control", "train_tokens", "generated_tokens", "review_scoring_tokens", "wall_seconds",
                    "auroc_flipped_first_review", "flipped_share_dropped_first_review", "boot_gold_agreement",
                    "truncated_share", "flipped_share_kept_last_review", "n_generated_pairs_trained",
                    "ir_gold_agreement", "ir_spurious_agreement", "ir_length_corr", "ir_gold_agreement_per_token"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            if vals:
                mean, lo, hi = M.mean_ci(vals)
                agg[key] = {"mean": mean, "lo": lo, "hi": hi, "values": vals}
        table[m] = agg
    return table


def fmt(entry, pct=False, digits=3, ci=False):
    if not entry:
        return "–"
    f = (lambda v: f"{100 * v:.0f} %") if pct else (lambda v: f"{v:.{digits}f}")
    s = f(entry["mean"])
    if ci and entry["lo"] is not None:
        s += f" [{f(entry['lo'])}, {f(entry['hi'])}]"
    return s


def write_markdown(out, table, methods, info):
    labels = {"init": "initial policy (no training)", **{m: METHODS[m][0] for m in METHODS}}
    lines = [f"# Alignment quality (gold reward): {info['size']}, {info['n_seeds']} seed(s)", "",
             "guarded gold = gold with degenerate outputs counted as 0 (headline); win rates compare guarded gold "
             "per held-out prompt and sample index; [lo, hi] = 95 % t-interval over seeds (none with 1 seed).", "",
             "| method | guarded gold | mean gold | degenerate | win vs init | win vs DPO | win vs control | length | NLL (init) | "
             "truncated | train tokens | generated tokens | boot. pairs trained | boot. pairs gold-agree | "
             "AUROC(-IRM→flip) | flips among dropped | flips among kept (last) | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in ["init"] + methods:
        if m not in table:
            continue
        a = table[m]
        tok = lambda k: f"{a[k]['mean'] / 1000:.0f}k" if k in a else "–"  # noqa: E731
        lines.append(
            f"| {labels[m]} | {fmt(a.get('guarded_gold'), ci=True)} | {fmt(a.get('mean_gold'))} | "
            f"{fmt(a.get('degenerate_share'), pct=True)} | {fmt(a.get('win_vs_init'), ci=True)} | "
            f"{fmt(a.get('win_vs_dpo'), ci=True)} | {fmt(a.get('win_vs_control'), ci=True)} | "
            f"{fmt(a.get('mean_length'), digits=1)} | {fmt(a.get('nll_init'), digits=2)} | "
            f"{fmt(a.get('truncated_share'), pct=True)} | {tok('train_tokens')} | {tok('generated_tokens')} | "
            f"{fmt(a.get('n_generated_pairs_trained'), digits=0)} | {fmt(a.get('boot_gold_agreement'), pct=True)} | "
            f"{fmt(a.get('auroc_flipped_first_review'), digits=2)} | "
            f"{fmt(a.get('flipped_share_dropped_first_review'), pct=True)} | "
            f"{fmt(a.get('flipped_share_kept_last_review'), pct=True)} | {fmt(a.get('wall_seconds'), digits=0)} |")
    lines += ["", f"Flipped share of the offline pairs: {info['flip_share']:.0%} (base rate for 'flips among dropped').",
              "", "## The implicit reward as a reward model", "",
              "Each final policy's implicit reward r = β·log(π/π_init), β = 0.1, on the initial policy's held-out "
              "samples (the same texts for every method): the share of same-prompt sample pairs it orders as gold "
              "does (chance 50 %), the share of pairs the spurious rule decides where it prefers what the rule "
              "prefers, and its correlation with response length. Self-review and bootstrapping rank by this "
              "reward, so they can only beat offline DPO where it is better than chance.", "",
              "| method | r agrees with gold | r per token agrees with gold | r agrees with spurious rule | "
              "corr(r, length) | AUROC(-IRM→flip), first review | boot. pairs gold-agree |",
              "|---|---|---|---|---|---|---|"]
    for m in methods:
        a = table.get(m)
        if a:
            lines.append(f"| {labels[m]} | {fmt(a.get('ir_gold_agreement'), ci=True)} | "
                         f"{fmt(a.get('ir_gold_agreement_per_token'), ci=True)} | "
                         f"{fmt(a.get('ir_spurious_agreement'), ci=True)} | {fmt(a.get('ir_length_corr'), digits=2)} | "
                         f"{fmt(a.get('auroc_flipped_first_review'), digits=2)} | "
                         f"{fmt(a.get('boot_gold_agreement'), pct=True)} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def write_plot(out, table, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in ["init"] + methods if m in table]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "guarded_gold", "guarded gold (higher is better)"),
                           (axes[1], "degenerate_share", "degenerate share")):
        vals = [table[m].get(key, {}).get("mean", float("nan")) for m in names]
        errs = []
        for m in names:
            e = table[m].get(key, {})
            errs.append((e["hi"] - e["mean"]) if e.get("hi") is not None else 0.0)
        ax.bar(range(len(names)), vals, yerr=errs, capsize=3, color="tab:blue")
        for m in names:
            for v in table[m].get(key, {}).get("values", []):
                ax.plot(names.index(m), v, "k.", ms=4)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--testbed", choices=("tiny", "smollm2"), default="tiny")
    if pre.parse_known_args(argv)[0].testbed == "smollm2":
        import smollm2

        return smollm2.main(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", choices=("tiny", "smollm2"), default="tiny",
                    help="tiny: a 262k-parameter Llama pretrained on the spot (fast, but its implicit reward has no "
                         "signal); smollm2: SmolLM2-135M-Instruct (smollm2.py; its own options: run.py --testbed "
                         "smollm2 --help)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--gold", default="metrics:vader_gold",
                    help="module:function or file.py:function, called as f(prompt, response) -> float, higher is "
                         "better (default: VADER compound of the response)")
    ap.add_argument("--spurious", default="metrics:prefer_longer",
                    help="module:function or file.py:function, called as f(prompt, a, b, gold_a, gold_b) -> 0, 1 or "
                         "None: the response the spurious rule prefers, None to keep the gold label (default: the "
                         "longer response when the gold gap is below 0.1)")
    ap.add_argument("--flip-share", type=float, default=0.3)
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS))
    ap.add_argument("--jobs", type=int, default=2, help="methods trained concurrently (default 2)")
    args = ap.parse_args(argv)
    if "dpo" not in args.methods:
        args.methods = ["dpo"] + args.methods  # the win-rate baseline
    cfg = SIZES[args.size]
    out = os.path.abspath(args.out)
    assets = os.path.join(out, "assets")
    os.makedirs(assets, exist_ok=True)
    ensure_vader(assets)
    gold_fn, spurious_fn = M.load_callable(args.gold), M.load_callable(args.spurious)
    meta = build_testbed(assets, cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(meta["model_dir"])
    eval_prompts = meta["heldout_prompts"][: cfg["n_eval_prompts"]]

    per_seed = []
    for seed in args.seeds:
        seed_dir = os.path.join(out, f"seed_{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        _, pinfo = build_pairs(seed_dir, meta, cfg, seed, gold_fn, spurious_fn, args.flip_share)
        pairs_by_id = {r["id"]: r for r in read_jsonl(os.path.join(seed_dir, "pairs.jsonl"))}
        with ThreadPoolExecutor(max_workers=args.jobs) as ex:
            runs = dict(zip(args.methods, ex.map(
                lambda m: run_method(m, method_command(m, meta, cfg, seed_dir, seed, os.path.join(seed_dir, m)),
                                     os.path.join(seed_dir, m), seed), args.methods)))
        res = {"seed": seed, "pairs": pinfo, "methods": {}}
        ev_path = os.path.join(seed_dir, "eval.json")
        cached = json.load(open(ev_path)) if os.path.exists(ev_path) else {}
        evals = {}
        for m in ["init"] + args.methods:
            if m == "init":
                policy, info = meta["model_dir"], {}
            else:
                run_dir, wall, rc = runs[m]
                if rc != 0:
                    res["methods"][m] = {"error": f"exit {rc}, see {run_dir}/stdout.log"}
                    continue
                info = count_tokens(run_dir, tokenizer, cfg["max_len"])
                info["wall_seconds"] = wall or cached.get(m, {}).get("wall_seconds")
                policy = info["final_policy"]
            if m in cached and "eval" in cached[m]:
                ev = cached[m]["eval"]
            else:
                log(f"seed {seed}: evaluating {m}")
                ev = evaluate_policy(policy, eval_prompts, cfg, seed, gold_fn, meta["model_dir"])
            if m != "init" and "reward_probe" not in ev:
                ev["reward_probe"] = reward_probe(policy, meta["model_dir"], eval_prompts, evals["init"], cfg,
                                                  spurious_fn)
            evals[m] = ev
            summ = {**info, "eval": ev, "guarded_gold": sum(ev["guarded"]) / len(ev["guarded"]),
                    "mean_gold": sum(ev["gold"]) / len(ev["gold"]),
                    "degenerate_share": sum(ev["degenerate"]) / len(ev["degenerate"]),
                    "mean_length": sum(ev["length"]) / len(ev["length"]),
                    "nll_init": sum(ev["nll_init"]) / len(ev["nll_init"]),
                    "truncated_share": sum(ev["truncated"]) / len(ev["truncated"])}
            if "reward_probe" in ev:
                summ["ir_gold_agreement"] = ev["reward_probe"]["gold"]
                summ["ir_spurious_agreement"] = ev["reward_probe"]["spurious"]
                summ["ir_length_corr"] = ev["reward_probe"]["length_corr"]
                summ["ir_gold_agreement_per_token"] = ev["reward_probe"].get("gold_per_token")
            if m != "init":
                rs = review_stats(run_dir, pairs_by_id)
                summ["reviews"] = rs
                if rs:
                    summ["auroc_flipped_first_review"] = rs[0]["auroc_flipped"]
                    summ["flipped_share_dropped_first_review"] = rs[0]["flipped_share_dropped"]
                    summ["flipped_share_kept_last_review"] = rs[-1]["flipped_share_kept"]
                summ["boot_gold_agreement"] = bootstrap_agreement(run_dir, gold_fn)
            res["methods"][m] = summ
        for m, summ in res["methods"].items():
            if "eval" not in summ:
                continue
            summ["win_vs_init"] = M.win_rate(evals[m]["guarded"], evals["init"]["guarded"])
            if "dpo" in evals:
                summ["win_vs_dpo"] = M.win_rate(evals[m]["guarded"], evals["dpo"]["guarded"])
            if "control" in evals:
                summ["win_vs_control"] = M.win_rate(evals[m]["guarded"], evals["control"]["guarded"])
            summ["guarded_gold_prompt_bootstrap_ci"] = M.bootstrap_ci(summ["eval"]["guarded"], seed=seed)
        with open(ev_path, "w") as f:
            json.dump({m: {"eval": s["eval"], "wall_seconds": s.get("wall_seconds")}
                       for m, s in res["methods"].items() if "eval" in s}, f)
        per_seed.append(res)
        table = summarise(per_seed, args.methods)
        info = {"size": args.size, "n_seeds": len(per_seed), "seeds": [s["seed"] for s in per_seed],
                "flip_share": args.flip_share, "gold": args.gold, "spurious": args.spurious, "config": cfg,
                "testbed": {k: v for k, v in meta.items() if not k.endswith("_prompts")},
                "command": " ".join([os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:]))}
        slim = [{**s, "methods": {m: {k: v for k, v in d.items() if k != "eval"} for m, d in s["methods"].items()}}
                for s in per_seed]
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"info": info, "summary": table, "per_seed": slim}, f, indent=1)
        md = write_markdown(out, table, args.methods, info)
        write_plot(out, table, args.methods)
        log(f"seed {seed} done; results so far:\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
