"""The phases of one SeRA iteration, one module each, run by `sera_openrlhf.driver` in this order:

    review  (review.py)   score the offline pairs by IRM and keep the clearest (SeRA-SS)
    generate (generate.py) sample N responses per prompt from the current policy
    score   (score.py)    log-probs of every sample under the ensemble's policies and references
    pair    (pair.py)     ensembled implicit reward → one (best, worst) pair per prompt, guarded (SeRA-PB)
    train   (train.py)    kept offline + bootstrapped pairs at the iteration's generated share → π_t

Each phase is `run(ctx, t) -> stats`: it reads what earlier phases wrote through `ctx.layout`, writes its own
outputs (atomically, on the writer rank) and returns JSON statistics that the driver stores in the state file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sera_openrlhf.config import SeraConfig
from sera_openrlhf.fileio import atomic_write_jsonl
from sera_openrlhf.losses import DAALoss
from sera_openrlhf.rundir import RunDir
from sera_openrlhf.sources import DataSpec
from sera_openrlhf.state import RunState


@dataclass
class RunContext:
    cfg: SeraConfig
    layout: RunDir
    state: RunState
    backend: Any  # openrlhf_adapter.backend.OpenRLHFBackend (or a stand-in with the same methods)
    loss: DAALoss
    data: DataSpec
    rows: list  # offline pairs {id, prompt, chosen, rejected}
    use_prompt_key: bool
    prompts: list  # bootstrapping prompts {id, prompt}
    seed: int  # --train.seed
    flip_prior: float = 0.0  # --model.label_smoothing: the prior label-flip rate of --sera.select_mode soft

    def phase_seed(self, t: int, phase: int) -> int:
        """Each phase seeds its RNGs from (seed, iteration, phase): a resumed run makes the same choices."""
        return self.seed * 1000 + t * 10 + phase

    def write_rows(self, path: str, rows) -> None:
        if self.backend.is_writer:
            atomic_write_jsonl(path, rows)


def as_response(prompt, text: str):
    """A generated response in the prompt's form: text, or a one-message list for chat-format data."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
