"""Every `--sera.*` option, defined once: one dataclass per option group, one field per flag.

A field's name is its flag (`keep_ratio` is `--sera.keep_ratio`); its metadata holds the help text, the
choices and a check. The argparse group (`cli/flags.py`), docs/flags.md and validation are all generated
from these classes, in the style of `transformers.HfArgumentParser` and TRL's `DPOConfig`.

`SeraConfig.from_namespace(args.sera)` builds and validates every group at once, before any model is loaded,
including options that only matter in later iterations, and raises one `ConfigError` naming the flag.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Optional

from sera_openrlhf.errors import ConfigError

Check = tuple[Callable[[Any], bool], str]  # (predicate, what a valid value is)


def option(default: Any, help: str, *, type: Optional[type] = None, choices: Optional[tuple] = None,
           check: Optional[Check] = None, stock: bool = False):
    """A flag. `type` defaults to the default's type; `stock` marks flags that also act without --sera.enable
    (one training run with SeRA's trainer)."""
    kind = type or (bool if isinstance(default, bool) else default.__class__)
    return field(default=default, metadata={"help": help, "type": kind, "choices": choices, "check": check,
                                            "stock": stock})


def at_least(low) -> Check:
    return (lambda v: v >= low, f">= {low}")


def fraction(low_open: bool = False, high_open: bool = False) -> Check:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    return (lambda v: (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1), f"in {lo}0, 1{hi}")


FINITE: Check = (lambda v: math.isfinite(v), "a finite number")
POSITIVE: Check = (lambda v: math.isfinite(v) and v > 0, "> 0")
NON_NEGATIVE: Check = (lambda v: math.isfinite(v) and v >= 0, ">= 0")


# ---------------------------------------------------------------------------------------------------- groups


@dataclass
class LoopConfig:
    """SeRA: loop (sera_openrlhf.driver)"""

    enable: bool = option(False, "Run the SeRA loop: self-review + bootstrapping iterations")
    iterations: int = option(3, "Maximum number of SeRA iterations (T)", check=at_least(1))
    run_dir: Optional[str] = option(None, "Run directory for per-iteration checkpoints, sets, statistics, state "
                                    "and report; default: --ckpt.output_dir", type=str)
    force_resume: bool = option(False, "Resume even if the configuration differs from the one the run directory "
                                "was started with")
    reference: str = option("initial", "Reference model of later iterations: the initial model, or the previous "
                            "iteration's policy (sDPO/DICE style)", choices=("initial", "previous"))
    generated_share_step: float = option(0.25, "Growth of the generated pairs' share of the training mix per "
                                         "iteration: share(t) = min(--sera.generated_share_max, step * (t - 1)), "
                                         "the same schedule whatever --sera.iterations", check=fraction())
    generated_share_max: float = option(0.5, "Cap on the generated pairs' share of the training mix",
                                        check=fraction(high_open=True))
    share_min_auroc: float = option(0.0, "Adaptive generated share (0 = off, the fixed schedule above): the share "
                                    "grows by --sera.generated_share_step while the review's gold-free estimate of "
                                    "its own flip-detection AUROC (review.calibration) is at least this, and "
                                    "shrinks by the same step when it falls below or the review has no signal: the "
                                    "same implicit reward judges the generated pairs. Needs an out-of-sample review "
                                    "(--sera.crossfit_folds or --sera.review_refit prequential)", check=fraction())
    generated_pick: str = option("random", "Which bootstrapped pairs fill the generated share when there are more "
                                 "than it holds: a seeded random subset, or the largest ensembled margins",
                                 choices=("random", "margin"))
    converge_jaccard: float = option(0.9, "Converged when, in two consecutive iterations, the kept offline set's "
                                     "Jaccard overlap with the previous iteration's is at least this ...",
                                     check=fraction())
    converge_min_gain: float = option(0.0, "... and the mean IRM of kept pairs rose by less than this (never with "
                                      "--sera.review_refit frozen or prequential: its review does not change)",
                                      check=FINITE)
    train_pairs: int = option(0, "Train every iteration on exactly this many pairs (0 = the whole mix): a larger "
                              "mix is subsampled, a smaller one repeated, in a seeded order. Gives methods with "
                              "different kept shares the same optimizer steps (a fair-compute control)",
                              check=at_least(0))
    skip_first_training: bool = option(False, "Iteration 1 starts from --model.model_name_or_path as an already "
                                       "DPO-trained policy instead of training on all offline pairs")
    skip_invalid_pairs: bool = option(False, "Skip (and count) offline pairs with an empty response or HH "
                                      "dialogues whose turns diverge before the last reply, instead of stopping "
                                      "with an error", stock=True)
    trust_remote_code: bool = option(False, "Allow model directories with custom code (auto_map in config.json)",
                                     stock=True)


@dataclass
class LossConfig:
    """SeRA: loss (sera_openrlhf.losses)"""

    loss: str = option("dpo", "DAA loss: dpo (cDPO with --model.label_smoothing), robust (rDPO, flip rate from "
                       "--model.label_smoothing), ipo, slic, simpo, rdpo (length-regularised R-DPO), or an import "
                       "path module:attr / file.py:attr of a registered-style loss. --model.ipo_enable selects ipo",
                       stock=True)
    simpo_gamma: float = option(0.5, "SimPO target reward margin gamma", check=NON_NEGATIVE, stock=True)
    rdpo_alpha: float = option(0.01, "R-DPO length-regularisation coefficient alpha", check=NON_NEGATIVE,
                               stock=True)
    slic_delta: float = option(1.0, "SLiC-HF hinge margin delta", check=POSITIVE, stock=True)


@dataclass
class ScoringConfig:
    """SeRA: scoring and reference cache (sera_openrlhf.scoring, .refcache)"""

    ref_cache: str = option("auto", "Precompute reference log-probs once per example and read them during "
                            "training instead of running the reference model every step (auto = on whenever a "
                            "--sera flag is given)", choices=("auto", "on", "off"), stock=True)
    cache_dir: Optional[str] = option(None, "Reference log-prob cache directory; default: <run_dir>/cache",
                                      type=str, stock=True)
    score_tokens_per_batch: int = option(8192, "Token budget of one scoring batch (length-bucketed)",
                                         check=at_least(1), stock=True)
    score_batch_size: int = option(64, "Maximum sequences in one scoring batch", check=at_least(1), stock=True)
    packed_train: bool = option(False, "Train with the scoring engine's packed forward: a pair's prompt runs once "
                                "for chosen and rejected, and the LM head and log-softmax only on response "
                                "positions. Same loss and gradients up to float rounding (checked once against "
                                "the stock forward, which it falls back to); not used with ZeRO-3, ring attention, "
                                "--ds.packing_samples, sliding-window attention or an MoE aux loss", stock=True)


@dataclass
class ReviewConfig:
    """SeRA-SS: self-review of offline pairs (sera_openrlhf.selection)"""

    selector: str = option("irm", "Selection callback: irm (built-in, uses the flags below), a registered name, "
                           "or an import path module:attr / file.py:attr")
    select_mode: str = option("top", "top: keep a share of pairs ranked by IRM; threshold: keep pairs whose IRM "
                              "passes --sera.threshold; soft: keep every pair, trained with a calibrated label "
                              "confidence w from its IRM, w*loss(label) + (1-w)*loss(flipped), the mean of 1-w being "
                              "the estimated flip rate; cDPO with --model.label_smoothing (the prior flip rate) "
                              "where the review has no signal or its IRMs do not identify a flip rate "
                              "(sera_openrlhf.calibration)",
                              choices=("top", "threshold", "soft"))
    keep_ratio: float = option(0.7, "Share of ALL offline pairs kept in top mode: k = max(min_keep, "
                               "round-half-up(keep_ratio * N)), capped by the pairs left after "
                               "--sera.drop_negative_irm", check=fraction(low_open=True))
    threshold: float = option(0.0, "IRM cut in threshold mode: keep IRM >= threshold (direction high) or "
                              "IRM <= threshold (low)", check=FINITE)
    select_direction: str = option("high", "high: keep the pairs the model separates best (SeRA); low: keep the "
                                   "hardest pairs (arXiv 2508.04149)", choices=("high", "low"))
    drop_negative_irm: bool = option(False, "Always drop pairs with IRM < 0 (the model prefers the rejected "
                                     "response: often a flipped label) before applying the mode")
    min_keep: int = option(1, "Fewest pairs a selection may keep; fewer is an error. In top mode k is raised to "
                           "at least this", check=at_least(1))
    crossfit_folds: int = option(0, "K folds for --sera.review_refit crossfit / frozen: each fold is scored by a "
                                 "twin policy trained without it (0 = off)", check=(lambda v: v == 0 or v >= 2,
                                                                                    "0 (off) or >= 2"))
    fold_epochs: int = option(0, "Epochs each fold twin trains (0 = --train.max_epochs, as the policy it stands in "
                              "for). A twin that has not yet generalised the labels reviews at chance; on the SmolLM2 "
                              "testbed 3 epochs instead of 1 raised the review's flip AUROC from 0.555 to 0.587, "
                              "within noise (docs/results.md)", check=at_least(0))
    review_min_agreement: float = option(0.55, "With cross-fitted review: the share of labels the out-of-fold IRM "
                                         "must agree with (its one-sided 95-percent lower confidence bound) for "
                                         "self-review to count as having a signal", check=fraction())
    no_signal: str = option("warn", "What a cross-fitted review without signal does: warn and select anyway, or "
                            "keep_all (train on every offline pair that iteration)", choices=("warn", "keep_all"))
    review_per_token: bool = option(False, "Review by the per-token implicit reward margin, r(y_w)/|y_w| - "
                                    "r(y_l)/|y_l|, so a long response's summed log-ratio does not dominate its pair "
                                    "(SimPO's reward is per token already)")
    review_average: int = option(1, "Rank and calibrate by the IRM averaged over this many reviews (the current "
                                 "and the K-1 before it: the margin's area under the training trajectory, as in "
                                 "dataset cartography), which steadies a noisy single-checkpoint margin",
                                 check=at_least(1))
    review_refit: str = option("current", "Which policies score the offline pairs at iteration t. current: "
                               "pi_{t-1}, in-sample, each iteration. crossfit: each of --sera.crossfit_folds folds by "
                               "a twin of pi_{t-1} whose whole training chain left that fold out, refit each "
                               "iteration. frozen: the "
                               "iteration-1 policies (the fold twins with --sera.crossfit_folds, else the first-pass "
                               "pi_1) every iteration. prequential: no scoring pass; each pair's implicit reward "
                               "margin in the iteration-1 training step that first trained on it, under a policy that "
                               "had not seen it yet (out of sample and free), every iteration",
                               choices=("current", "crossfit", "frozen", "prequential"))

    @property
    def out_of_sample(self) -> bool:
        """Whether each pair is scored by a policy that never trained on it (fold twins or the prequential margin)."""
        return self.crossfit_folds >= 2 or self.review_refit == "prequential"


@dataclass
class BootstrapConfig:
    """SeRA-PB: preference bootstrapping (sera_openrlhf.bootstrap, .generation)"""

    prompts: Optional[str] = option(None, "JSONL of prompts to bootstrap from (key --data.prompt_key or 'prompt'); "
                                    "default: the offline pairs' prompts", type=str)
    num_prompts: int = option(0, "Prompts per iteration (0 = all)", check=at_least(0))
    num_samples: int = option(4, "Responses sampled per prompt (N); bootstrapping needs at least 2",
                              check=at_least(1))
    temperature: float = option(1.0, "Sampling temperature; 0 = greedy", check=NON_NEGATIVE)
    top_p: float = option(1.0, "Nucleus sampling threshold", check=fraction(low_open=True))
    max_new_tokens: int = option(128, "Response length cap; a response without EOS within it is 'truncated'",
                                 check=at_least(1))
    generation_batch_size: int = option(16, "HF backend: sequences per generate call, in blocks of whole prompts "
                                        "(max(1, this // --sera.num_samples) prompts; data-parallel ranks take whole "
                                        "blocks, so the samples do not depend on the number of ranks)",
                                        check=at_least(1))
    generation_backend: str = option("hf", "hf (transformers generate, CPU/GPU) or vllm (GPU only)",
                                     choices=("hf", "vllm"))
    vllm_tensor_parallel_size: int = option(1, "vLLM tensor parallel size (of each engine with "
                                            "--sera.vllm_engines; > 1 in process: data-parallel rank 0 generates "
                                            "everything)", check=at_least(1))
    vllm_gpu_memory_utilization: float = option(0.5, "vLLM GPU memory share (in process: at most 90 percent of what is "
                                                "free when the engine is built)", check=fraction(low_open=True))
    vllm_engines: int = option(0, "With --sera.generation_backend vllm: N > 0 generates on N of OpenRLHF's "
                               "Ray-managed vLLM engines (created once per run on the Ray cluster's GPUs at "
                               "RAY_ADDRESS, or a local one; weights synced from the DeepSpeed model after each "
                               "training phase); 0 builds an engine in process for each generation phase",
                               check=at_least(0))
    ensemble_mode: str = option("last_k", "last_k: weighted mean over the last K policies; exp: exponential decay "
                                "over all", choices=("last_k", "exp"))
    ensemble_k: int = option(2, "K policies in last_k mode", check=at_least(1))
    ensemble_lambda: float = option(0.5, "Weight of the current policy in last_k mode", check=fraction())
    ensemble_decay: float = option(0.5, "Decay per iteration of age in exp mode", check=fraction(low_open=True))
    min_margin: float = option(0.0, "Drop bootstrapped pairs whose ensembled reward margin (after length "
                               "de-biasing) is below this", check=FINITE)
    pair_top_fraction: float = option(1.0, "Keep only this top fraction of bootstrapped pairs by margin",
                                      check=fraction(low_open=True))
    length_debias: bool = option(False, "Rank samples by r - alpha*length with alpha fitted so chosen and rejected "
                                 "have equal mean length (DICE)")
    judge_lambda: float = option(0.0, "Conservative judge: pick the chosen sample by ensemble mean - lambda * std "
                                 "over the ensemble's policies, the rejected by mean + lambda * std, and judge "
                                 "--sera.min_margin on that pessimistic gap (0 = off; one policy has std 0)",
                                 check=NON_NEGATIVE)
    judge_unanimous: bool = option(False, "Keep a bootstrapped pair only when every policy of the ensemble "
                                   "prefers its chosen sample")
    judge_consistency: bool = option(False, "Give each bootstrapped pair the label confidence w = the share of "
                                     "the ensemble's policies (by ensemble weight) that prefer its chosen sample, "
                                     "trained as w*loss + (1-w)*loss(swapped) (CREAM's consistency weighting; one "
                                     "policy: w = 1)")
    keep_truncated: bool = option(False, "Allow responses that hit --sera.max_new_tokens without EOS")
    no_fluency_guard: bool = option(False, "Turn the fluency guard off (not recommended: see docs/concepts.md)")
    fluency_floor: Optional[float] = option(None, "Drop samples whose mean per-token log-prob under the initial "
                                            "reference is below this absolute floor (replaces the floor from "
                                            "--sera.fluency_quantile)", type=float, check=FINITE)
    fluency_quantile: float = option(0.1, "Fix the fluency floor once, at this quantile of the mean per-token "
                                     "log-prob of the initial policy's own samples (design section 1b)",
                                     check=(lambda v: 0 < v < 1, "in (0, 1)"))
    length_normalized_reward: bool = option(False, "Rank samples by the per-token (length-normalised) implicit "
                                            "reward")
    bootstrap_nll_coef: float = option(0.2, "NLL coefficient on bootstrapped chosen responses (RPO-style fluency "
                                       "regulariser; 0 = off)", check=NON_NEGATIVE)


@dataclass
class PrecisionConfig:
    """SeRA: precision (sera_openrlhf.precision)"""

    precision: str = option("auto", "dtype of training, HF generation and the training's reference log-probs "
                            "(the loop's other scoring: --sera.score_precision), written to --ds.param_dtype. "
                            "auto: bf16 on a CUDA GPU with bf16; on CPU bf16 only where the CPU has amx_bf16 or "
                            "avx512_bf16 and a short matmul probe (cached per CPU model and thread count) measures "
                            "it faster than fp32, else fp32. An explicit --ds.param_dtype wins over auto and "
                            "must agree with fp32/bf16. Acts whenever a --sera flag is given; without any, "
                            "the stock run keeps OpenRLHF's --ds.param_dtype (default bf16)",
                            choices=("auto", "fp32", "bf16"), stock=True)
    score_precision: str = option("fp32", "dtype of the no-grad scoring passes of the loop (self-review, "
                                  "bootstrapping judge, fluency guard, and their reference log-probs). fp32: "
                                  "always fp32, whatever --sera.precision trains in: bf16 rounding moves a pair's "
                                  "implicit reward margin by about as much as training does (measured: the same "
                                  "review detected flipped labels at AUROC 0.57-0.60 in bf16, 0.62-0.63 in fp32), "
                                  "at the cost of fp32 forwards and memory for scoring only. train: the training "
                                  "dtype",
                                  choices=("fp32", "train"))


GROUPS = (LoopConfig, LossConfig, ScoringConfig, ReviewConfig, BootstrapConfig, PrecisionConfig)


def options(group) -> list:
    return list(fields(group))


def check_value(name: str, value: Any, meta: dict) -> None:
    """One flag's value against its type, choices and check; the error names the flag and what is allowed."""
    flag = f"--sera.{name}"
    if value is None:
        return
    kind = meta["type"]
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{flag} is a switch, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{flag} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{flag} must be a number, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{flag} must be one of {', '.join(meta['choices'])}; got {value!r}")
    if meta["check"] is not None:
        ok, requirement = meta["check"]
        if not ok(value):
            raise ConfigError(f"{flag} must be {requirement}, got {value!r}")


def check_group_value(group, name: str, value: Any) -> None:
    """Validate one value by its flag's definition (for core types that take a flag's value directly)."""
    check_value(name, value, next(f for f in fields(group) if f.name == name).metadata)


def build_group(group, values: dict):
    for f in fields(group):
        check_value(f.name, values.get(f.name, f.default), f.metadata)
    return group(**{f.name: values[f.name] for f in fields(group) if f.name in values})


@dataclass
class SeraConfig:
    loop: LoopConfig
    loss: LossConfig
    scoring: ScoringConfig
    review: ReviewConfig
    bootstrap: BootstrapConfig
    precision: PrecisionConfig

    @classmethod
    def from_namespace(cls, ns) -> "SeraConfig":
        """From `args.sera` (argparse) or any object with the flag names as attributes; validates all."""
        values = vars(ns) if hasattr(ns, "__dict__") else dict(ns)
        cfg = cls(*(build_group(g, values) for g in GROUPS))
        cfg.check_combinations()
        return cfg

    def check_combinations(self) -> None:
        refit, folds = self.review.review_refit, self.review.crossfit_folds
        if refit == "crossfit" and folds < 2:
            raise ConfigError("--sera.review_refit crossfit needs --sera.crossfit_folds K >= 2")
        if refit in ("current", "prequential") and folds:
            raise ConfigError(f"--sera.crossfit_folds {folds} needs --sera.review_refit crossfit (fold twins refit "
                              "each iteration) or frozen (the iteration-1 fold twins)")
        if self.review.fold_epochs and not folds:
            raise ConfigError(f"--sera.fold_epochs {self.review.fold_epochs} sets how long the fold twins train: it "
                              "needs --sera.crossfit_folds K >= 2")
        if refit == "prequential" and self.loop.skip_first_training:
            raise ConfigError("--sera.review_refit prequential reads iteration 1's training forwards, which "
                              "--sera.skip_first_training skips")
        if refit == "frozen" and not folds and self.loop.skip_first_training:
            raise ConfigError("--sera.review_refit frozen without --sera.crossfit_folds scores with the first-pass "
                              "policy, which --sera.skip_first_training skips")
        if self.loop.share_min_auroc and not self.review.out_of_sample:
            # measured (docs/results.md): on labels with no signal an in-sample review estimates itself at ~0.9
            raise ConfigError(f"--sera.share_min_auroc {self.loop.share_min_auroc} judges the review's gold-free "
                              "estimate of itself, which in sample reads about 0.9 even on labels with no signal: "
                              "add --sera.review_refit crossfit (or frozen) --sera.crossfit_folds 2, or "
                              "--sera.review_refit prequential")
        if self.review.select_mode == "soft" and self.review.selector != "irm":
            raise ConfigError(f"--sera.select_mode soft is the built-in calibration of the IRM; it cannot be combined "
                              f"with --sera.selector {self.review.selector} (a selector may return weights instead)")
        if self.bootstrap.vllm_engines and self.bootstrap.generation_backend != "vllm":
            raise ConfigError(f"--sera.vllm_engines {self.bootstrap.vllm_engines} needs --sera.generation_backend "
                              "vllm")
        bootstraps = self.loop.iterations > 1 and self.loop.generated_share_max > 0
        if bootstraps and self.bootstrap.num_samples < 2:
            raise ConfigError(f"--sera.num_samples must be >= 2 to form a (chosen, rejected) pair, got "
                              f"{self.bootstrap.num_samples} (or pass --sera.generated_share_max 0 to train on "
                              "offline pairs only)")


def stock_path_flags() -> set[str]:
    """Flags that act without --sera.enable."""
    return {f.name for g in GROUPS for f in fields(g) if f.metadata["stock"]}


def defaults() -> dict:
    return {f.name: f.default for g in GROUPS for f in fields(g) if f.default is not MISSING}
