"""Every `--sera.*` flag, in OpenRLHF's dotted style. `hierarchize` turns them into `args.sera.<name>`.

Flags only; what they do lives in the module named in each group's title. A test keeps docs/flags.md in step.
"""

from __future__ import annotations

import argparse


def _add(group, name, help, **kw):
    default = kw.get("default")
    if kw.get("action") not in ("store_true",):
        help = f"{help} (default: {default})"
    group.add_argument(f"--sera.{name}", help=help, **kw)


def add_sera_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SeRA: loop (sera_openrlhf.loop)")
    _add(g, "enable", "Run the SeRA loop: self-review + bootstrapping iterations", action="store_true", default=False)
    _add(g, "iterations", "Maximum number of SeRA iterations (T)", type=int, default=3)
    _add(g, "run_dir", "Run directory for per-iteration checkpoints, sets, statistics, state and report; "
         "default: --ckpt.output_dir", type=str, default=None)
    _add(g, "force_resume", "Resume even if the configuration differs from the one the run directory was started "
         "with", action="store_true", default=False)
    _add(g, "reference", "Reference model of later iterations: the initial model, or the previous iteration's "
         "policy (sDPO/DICE style)", type=str, default="initial", choices=["initial", "previous"])
    _add(g, "generated_share_max", "Share of generated pairs in the training mix at the last iteration; grows "
         "linearly from 0 at iteration 1", type=float, default=0.5)
    _add(g, "converge_jaccard", "Converged when the kept offline set's Jaccard overlap with the previous "
         "iteration's is at least this ...", type=float, default=0.9)
    _add(g, "converge_min_gain", "... and the mean IRM of kept pairs rose by less than this", type=float,
         default=0.0)
    _add(g, "skip_first_training", "Iteration 1 starts from --model.model_name_or_path as an already "
         "DPO-trained policy instead of training on all offline pairs", action="store_true", default=False)
    _add(g, "skip_invalid_pairs", "Skip (and count) offline pairs with an empty response or HH dialogues whose "
         "turns diverge before the last reply, instead of stopping with an error", action="store_true",
         default=False)
    _add(g, "trust_remote_code", "Allow model directories with custom code (auto_map in config.json)",
         action="store_true", default=False)

    g = parser.add_argument_group("SeRA: loss (sera_openrlhf.losses)")
    _add(g, "loss", "DAA loss: dpo, ipo, slic, simpo, rdpo, or an import path module:attr / file.py:attr of a "
         "registered-style loss. --model.ipo_enable selects ipo", type=str, default="dpo")
    _add(g, "simpo_gamma", "SimPO target reward margin gamma", type=float, default=0.5)
    _add(g, "rdpo_alpha", "R-DPO length-regularisation coefficient alpha", type=float, default=0.01)
    _add(g, "slic_delta", "SLiC-HF hinge margin delta", type=float, default=1.0)

    g = parser.add_argument_group("SeRA: scoring and reference cache (sera_openrlhf.scoring, .refcache)")
    _add(g, "ref_cache", "Precompute reference log-probs once per example and read them during training instead "
         "of running the reference model every step (auto = on whenever a --sera flag is given)", type=str,
         default="auto", choices=["auto", "on", "off"])
    _add(g, "cache_dir", "Reference log-prob cache directory; default: <run_dir>/cache", type=str, default=None)
    _add(g, "score_tokens_per_batch", "Token budget of one scoring batch (length-bucketed)", type=int,
         default=8192)
    _add(g, "score_batch_size", "Maximum sequences in one scoring batch", type=int, default=64)

    g = parser.add_argument_group("SeRA-SS: self-review of offline pairs (sera_openrlhf.selection)")
    _add(g, "selector", "Selection callback: irm (built-in, uses the flags below), a registered name, or an "
         "import path module:attr / file.py:attr", type=str, default="irm")
    _add(g, "select_mode", "top: keep a fraction; threshold: keep IRM beyond --sera.threshold", type=str,
         default="top", choices=["top", "threshold"])
    _add(g, "keep_ratio", "Fraction of offline pairs to keep in top mode", type=float, default=0.7)
    _add(g, "threshold", "IRM threshold in threshold mode", type=float, default=0.0)
    _add(g, "select_direction", "high: keep pairs the model separates most clearly (SeRA); low: keep the hardest "
         "pairs", type=str, default="high", choices=["high", "low"])
    _add(g, "drop_negative_irm", "Always drop pairs with IRM < 0", action="store_true", default=False)
    _add(g, "min_keep", "Fewest pairs selection may keep before it is an error", type=int, default=1)
    _add(g, "crossfit_folds", "Cross-fitted self-review: score each of K folds with a policy trained without it "
         "(0 or 1 = off, score in-sample)", type=int, default=0)
    _add(g, "review_min_agreement", "With cross-fitted review: the share of labels the out-of-fold IRM must agree "
         "with (its one-sided 95-percent lower confidence bound) for self-review to count as having a signal",
         type=float, default=0.55)
    _add(g, "no_signal", "What a cross-fitted review without signal does: warn and select anyway, or keep_all "
         "(train on every offline pair that iteration)", type=str, default="warn", choices=["warn", "keep_all"])
    _add(g, "review_policy", "Policy that scores offline pairs: the current one, or the short first-pass policy "
         "of iteration 1", type=str, default="current", choices=["current", "first_pass"])

    g = parser.add_argument_group("SeRA-PB: preference bootstrapping (sera_openrlhf.bootstrap, .generation)")
    _add(g, "prompts", "JSONL of prompts to bootstrap from (key --data.prompt_key or 'prompt'); default: the "
         "offline pairs' prompts", type=str, default=None)
    _add(g, "num_prompts", "Prompts per iteration (0 = all)", type=int, default=0)
    _add(g, "num_samples", "Responses sampled per prompt (N)", type=int, default=4)
    _add(g, "temperature", "Sampling temperature", type=float, default=1.0)
    _add(g, "top_p", "Nucleus sampling top-p", type=float, default=1.0)
    _add(g, "max_new_tokens", "Maximum new tokens per response", type=int, default=128)
    _add(g, "generation_batch_size", "Sequences per HF generate call", type=int, default=16)
    _add(g, "generation_backend", "hf (transformers generate, CPU/GPU) or vllm (GPU only)", type=str,
         default="hf", choices=["hf", "vllm"])
    _add(g, "vllm_tensor_parallel_size", "vLLM tensor parallel size", type=int, default=1)
    _add(g, "vllm_gpu_memory_utilization", "vLLM GPU memory share", type=float, default=0.5)
    _add(g, "ensemble_mode", "last_k: weighted mean over the last K policies; exp: exponential decay over all",
         type=str, default="last_k", choices=["last_k", "exp"])
    _add(g, "ensemble_k", "K policies in last_k mode", type=int, default=2)
    _add(g, "ensemble_lambda", "Weight of the current policy in last_k mode", type=float, default=0.5)
    _add(g, "ensemble_decay", "Decay per iteration of age in exp mode", type=float, default=0.5)
    _add(g, "min_margin", "Drop bootstrapped pairs whose ensembled reward margin (after length de-biasing) is below "
         "this", type=float,
         default=0.0)
    _add(g, "pair_top_fraction", "Keep only this top fraction of bootstrapped pairs by margin", type=float,
         default=1.0)
    _add(g, "length_debias", "Rank samples by r - alpha*length with alpha fitted so chosen and rejected have "
         "equal mean length (DICE)", action="store_true", default=False)
    _add(g, "keep_truncated", "Allow responses that hit --sera.max_new_tokens without EOS", action="store_true",
         default=False)
    _add(g, "no_fluency_guard", "Turn the fluency guard off (not recommended: see docs/concepts.md)",
         action="store_true", default=False)
    _add(g, "fluency_floor", "Drop samples whose mean per-token reference log-prob is below this absolute floor",
         type=float, default=None)
    _add(g, "fluency_quantile", "Drop samples below this quantile of the batch's mean per-token reference "
         "log-prob", type=float, default=0.1)
    _add(g, "length_normalized_reward", "Rank samples by the per-token (length-normalised) implicit reward",
         action="store_true", default=False)
    _add(g, "bootstrap_nll_coef", "NLL coefficient on bootstrapped chosen responses (RPO-style fluency "
         "regulariser; 0 = off)", type=float, default=0.2)
