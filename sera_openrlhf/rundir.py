"""Where every artefact of a SeRA run lives. Only this module builds paths inside the run directory.

    <run_dir>/
      sera_state.json             config, finished phases, per-iteration statistics (state.py)
      .lock                       held while a run is active (state.py)
      cache/                      reference log-probs (refcache.py; --sera.cache_dir moves it)
      iter_<t>/policy/            HF checkpoint of π_t (+ train_log.jsonl, train_margins.jsonl)
      iter_<t>/fold_<k>/policy/   π_t's twin trained without offline fold k (--sera.review_refit crossfit/frozen)
      iter_<t>/review.jsonl       per offline pair: id, IRM, implicit rewards, lengths, fold, kept, weight
      iter_<t>/kept.jsonl         the kept offline pairs in the input's keys (stock OpenRLHF can train on it)
      iter_<t>/samples.jsonl      every generated sample with its log-probs under each scoring model
      iter_<t>/bootstrapped.jsonl the bootstrapped pairs (prompt/chosen/rejected, margin)
      iter_<t>/train_set.jsonl    what iteration t trained on (offline kept + generated), with weights
      report/                     report.md, report.json, PNG plots (report/)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

STATE_FILE = "sera_state.json"


@dataclass
class RunDir:
    root: str
    initial_policy: str  # --model.model_name_or_path
    initial_reference: str  # --ref.model_name_or_path
    skip_first_training: bool  # --sera.skip_first_training
    reference_rule: str  # --sera.reference
    cache_dir: str | None  # --sera.cache_dir

    @property
    def state(self) -> str:
        return os.path.join(self.root, STATE_FILE)

    @property
    def lock(self) -> str:
        return os.path.join(self.root, ".lock")

    @property
    def cache(self) -> str:
        return self.cache_dir or os.path.join(self.root, "cache")

    @property
    def report(self) -> str:
        return os.path.join(self.root, "report")

    def iteration(self, t: int) -> str:
        return os.path.join(self.root, f"iter_{t}")

    def policy(self, t: int) -> str:
        """π_t: t = 0 is the initial model; with --sera.skip_first_training π_1 is the initial model too."""
        if t == 0 or (t == 1 and self.skip_first_training):
            return self.initial_policy
        return os.path.join(self.iteration(t), "policy")

    def reference(self, t: int) -> str:
        """The reference π_t is trained (and its implicit reward measured) against."""
        if self.reference_rule == "previous" and t >= 2:
            return self.policy(t - 1)
        return self.initial_reference

    def fold_policy(self, t: int, k: int) -> str:
        """The twin of π_t trained without offline fold k; it scores fold k at review t + 1."""
        return os.path.join(self.iteration(t), f"fold_{k}", "policy")

    def fold_start(self, t: int, k: int) -> str:
        """Where π_t's fold-k twin starts training: π_{t−1}'s fold-k twin, never π_{t−1} itself, which trained on
        fold k (the twins form their own chain that never sees fold k); π_0 at t = 1."""
        return self.fold_policy(t - 1, k) if t >= 2 else self.policy(0)

    def fold_reference(self, t: int, k: int) -> str:
        """The reference of π_t's fold-k twin: with --sera.reference previous, its own chain's previous policy."""
        if self.reference_rule == "previous" and t >= 2:
            return self.fold_start(t, k)
        return self.initial_reference

    def train_margins(self, t: int) -> str:
        """Every pair's implicit rewards in the training forwards of π_t (--sera.review_refit prequential)."""
        return os.path.join(self.policy(t), "train_margins.jsonl")

    def review(self, t: int) -> str:
        return os.path.join(self.iteration(t), "review.jsonl")

    def kept(self, t: int) -> str:
        return os.path.join(self.iteration(t), "kept.jsonl")

    def samples(self, t: int) -> str:
        return os.path.join(self.iteration(t), "samples.jsonl")

    def bootstrapped(self, t: int) -> str:
        return os.path.join(self.iteration(t), "bootstrapped.jsonl")

    def train_set(self, t: int) -> str:
        return os.path.join(self.iteration(t), "train_set.jsonl")
