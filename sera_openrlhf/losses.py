"""Direct alignment algorithm (DAA) losses and the implicit rewards they train.

Every loss maps per-example sequence log-prob sums ([B] tensors) to per-example losses ([B], unreduced) and
reports the implicit rewards r(x, y) it trains. SeRA's self-review (IRM = r(x, y_w) - r(x, y_l)) and the labelling
of bootstrapped pairs call the same `implicit_reward`, so training and review agree on what "reward" means.

Plug in a new loss by subclassing `DAALoss` (implement `compute_losses`, override `implicit_reward` if it is not
DPO's) and registering it with `@LOSSES.register("name")`, or without touching this package:
`--sera.loss pkg.module:MyLoss` or `--sera.loss /path/to/file.py:my_loss_fn` (see `build_loss`).

Plain torch only: no openrlhf / deepspeed / transformers imports here.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .registry import Registry

LOSSES = Registry("loss")

# The CLI flag each constructor parameter comes from, so range errors name what the user typed.
PARAM_FLAGS: Dict[str, str] = {
    "beta": "--model.beta",
    "label_smoothing": "--model.label_smoothing",
    "gamma": "--sera.simpo_gamma",
    "alpha": "--sera.rdpo_alpha",
    "delta": "--sera.slic_delta",
}


@dataclass
class PreferenceBatch:
    """Per-example inputs of a DAA loss. Every tensor has shape [B]; log-probs are sums over response tokens."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    reference_chosen_logps: Optional[Tensor] = None  # None for reference-free losses (SimPO)
    reference_rejected_logps: Optional[Tensor] = None
    chosen_lengths: Optional[Tensor] = None  # number of response tokens
    rejected_lengths: Optional[Tensor] = None


@dataclass
class LossOutput:
    losses: Tensor  # [B] per-example, unreduced, carries grad
    chosen_rewards: Tensor  # [B] detached implicit rewards r(x, y_w)
    rejected_rewards: Tensor  # [B] detached implicit rewards r(x, y_l)


def _param(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and ok(v)):
        raise ConfigError(f"{PARAM_FLAGS.get(name, name)} must be {requirement}, got {value!r}")
    return v


class DAALoss(nn.Module):
    """Base class: `forward(PreferenceBatch) -> LossOutput`, per-example losses [B] plus detached rewards [B]."""

    needs_reference: bool = True
    needs_lengths: bool = False
    length_normalized: bool = False  # the implicit reward is already per token (SimPO)

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = _param("beta", beta, lambda v: v > 0, "> 0")

    def implicit_reward(
        self, logps: Tensor, ref_logps: Optional[Tensor] = None, lengths: Optional[Tensor] = None
    ) -> Tensor:
        """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)); [B] -> [B]. DPO, Rafailov et al. 2023, Eq. 5."""
        if ref_logps is None:
            raise ValueError(f"{type(self).__name__}.implicit_reward needs reference log-probs (ref_logps)")
        return self.beta * (logps - ref_logps)

    def compute_losses(self, batch: PreferenceBatch) -> Tensor:
        """Per-example losses [B] (carrying grad) for an already-validated batch."""
        raise NotImplementedError

    def forward(self, batch: PreferenceBatch) -> LossOutput:
        self.check_batch(batch)
        losses = self.compute_losses(batch)
        with torch.no_grad():  # rewards are for logging and selection, never for backprop
            chosen = self.implicit_reward(batch.policy_chosen_logps, batch.reference_chosen_logps, batch.chosen_lengths)
            rejected = self.implicit_reward(
                batch.policy_rejected_logps, batch.reference_rejected_logps, batch.rejected_lengths
            )
        return LossOutput(losses, chosen, rejected)

    def check_batch(self, batch: PreferenceBatch) -> None:
        """ValueError when the batch lacks what this loss needs or its tensors are not all [B]."""
        name = type(self).__name__
        shape = batch.policy_chosen_logps.shape
        if len(shape) != 1:
            raise ValueError(f"{name}: log-probs must be 1-D [B] tensors, got shape {tuple(shape)}")
        for f in fields(batch):
            t = getattr(batch, f.name)
            if t is not None and t.shape != shape:
                raise ValueError(f"{name}: batch.{f.name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if self.needs_reference and (batch.reference_chosen_logps is None or batch.reference_rejected_logps is None):
            raise ValueError(
                f"{name} needs reference log-probs (batch.reference_chosen_logps / reference_rejected_logps); "
                f"compute them with the reference model or use a reference-free loss such as simpo"
            )
        if self.needs_lengths:
            if batch.chosen_lengths is None or batch.rejected_lengths is None:
                raise ValueError(f"{name} needs response lengths (batch.chosen_lengths / rejected_lengths)")
            if bool((batch.chosen_lengths <= 0).any() | (batch.rejected_lengths <= 0).any()):
                raise ValueError(f"{name}: response lengths must be positive token counts")


def _logratio_margin(batch: PreferenceBatch) -> Tensor:
    """h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)), [B]. Same order of ops as OpenRLHF."""
    pi_logratios = batch.policy_chosen_logps - batch.policy_rejected_logps
    ref_logratios = batch.reference_chosen_logps - batch.reference_rejected_logps
    return pi_logratios - ref_logratios


def _float_lengths(lengths: Tensor, like: Tensor) -> Tensor:
    # at least fp32: bf16 cannot represent token counts above 256 exactly
    return lengths.to(torch.promote_types(like.dtype, torch.float32))


@LOSSES.register("dpo")
class DPOLoss(DAALoss):
    """DPO; with label_smoothing > 0, conservative DPO (cDPO). Matches OpenRLHF's `DPOLoss(ipo=False)`."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__(beta)
        self.label_smoothing = _param("label_smoothing", label_smoothing, lambda v: 0 <= v < 0.5, "in [0, 0.5)")

    def compute_losses(self, batch: PreferenceBatch) -> Tensor:
        h = _logratio_margin(batch)
        # Rafailov et al. 2023, Eq. 7: -log sigma(beta * h); Mitchell 2023 (cDPO), Eq. 3: label noise eps mixes
        # in the flipped label: -(1 - eps) log sigma(beta * h) - eps log sigma(-beta * h).
        return (
            -F.logsigmoid(self.beta * h) * (1 - self.label_smoothing)
            - F.logsigmoid(-self.beta * h) * self.label_smoothing
        )


@LOSSES.register("robust")
class RobustDPOLoss(DAALoss):
    """Robust DPO (rDPO): an unbiased estimate of the clean-label DPO loss under a known label-flip rate eps
    (--model.label_smoothing), TRL's `loss_type="robust"`. Unlike cDPO it can push a pair's margin *against* its
    label when the loss judges the label likely flipped: the weight on the flipped term is negative."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__(beta)
        self.label_smoothing = _param("label_smoothing", label_smoothing, lambda v: 0 <= v < 0.5, "in [0, 0.5)")

    def compute_losses(self, batch: PreferenceBatch) -> Tensor:
        h = _logratio_margin(batch)
        eps = self.label_smoothing
        # Chowdhury et al. 2024 ("Provably robust DPO"), Eq. 8: ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps),
        # l(h) = -log sigma(beta * h); eps = 0 is DPO.
        return (-(1 - eps) * F.logsigmoid(self.beta * h) + eps * F.logsigmoid(-self.beta * h)) / (1 - 2 * eps)


@LOSSES.register("ipo")
class IPOLoss(DAALoss):
    """IPO. Matches OpenRLHF's `DPOLoss(ipo=True)`, with beta in the role of IPO's tau."""

    def compute_losses(self, batch: PreferenceBatch) -> Tensor:
        # Azar et al. 2023, Eq. 17: regress h onto the fixed target margin 1 / (2 tau).
        return (_logratio_margin(batch) - 1 / (2 * self.beta)) ** 2


@LOSSES.register("slic")
class SLiCLoss(DAALoss):
    """SLiC-HF rank-calibration hinge on reference-adjusted log-ratios (TRL's `loss_type="hinge"` when delta = 1).

    With reference log-probs of 0 and beta = 1 this is exactly SLiC-HF's calibration term; the reference
    adjustment (as in TRL) keeps the implicit reward the same as DPO's, which SeRA's self-review relies on.
    """

    def __init__(self, beta: float = 0.1, delta: float = 1.0) -> None:
        super().__init__(beta)
        self.delta = _param("delta", delta, lambda v: v > 0, "> 0")

    def compute_losses(self, batch: PreferenceBatch) -> Tensor:
        # Zhao et al. 2023 (SLiC-HF), Eq. 1 calibration loss max(0, delta - log P(y+|x) + log P(y-|x)), here
        # on beta * h as in TRL's hinge loss relu(1 - beta * h).
        return torch.relu(self.delta - self.beta * _logratio_margin(batch))


@LOSSES.register("simpo")
class SimPOLoss(DAALoss):
    """SimPO: reference-free, length-normalised reward with a target reward margin gamma.

    Meng et al. use beta around 2.0-2.5 (far above DPO's 0.1), hence the different default.
    """

    needs_reference = False
    needs_lengths = True
    length_normalized = True

    def __init__(self, beta: float = 2.0, gamma: float = 0.5) -> None:
        super().__init__(beta)
        self.gamma = _param("gamma", gamma, lambda v: v >= 0, ">= 0")

    def implicit_reward(
        self, logps: Tensor, ref_logps: Optional[Tensor] = None, lengths: Optional[Tensor] = None
    ) -> Tensor:
        """r(x, y) = beta / |y| * log pi(y|x); [B] -> [B]; ref_logps is ignored. Meng et al. 2024, Eq. 4."""
        if lengths is None:
            raise ValueError("SimPOLoss.implicit_reward needs response lengths")
        return self.beta * logps / _float_lengths(lengths, logps)

    def compute_losses(self, batch: PreferenceBatch) -> Tensor:
        chosen = self.implicit_reward(batch.policy_chosen_logps, lengths=batch.chosen_lengths)
        rejected = self.implicit_reward(batch.policy_rejected_logps, lengths=batch.rejected_lengths)
        # Meng et al. 2024, Eq. 6: -log sigma(r_w - r_l - gamma).
        return -F.logsigmoid(chosen - rejected - self.gamma)


@LOSSES.register("rdpo")
class RDPOLoss(DAALoss):
    """R-DPO: DPO with a length term that credits the chosen response's extra length to the data, not the policy.

    Park et al. 2024 add -alpha * |y| to the RLHF objective, so the preference reward becomes
    beta * log(pi / pi_ref) + alpha * |y|. Inside the sigmoid that is +alpha * (|y_w| - |y_l|): a longer chosen
    response already explains part of the preference, so the policy gains less by growing length, and pairs whose
    chosen response is shorter get larger gradients. The implicit reward stays beta * log(pi / pi_ref): the
    length-free part the policy itself encodes, which is what self-review should rank by.
    """

    needs_lengths = True

    def __init__(self, beta: float = 0.1, alpha: float = 0.01) -> None:
        super().__init__(beta)
        self.alpha = _param("alpha", alpha, lambda v: v >= 0, ">= 0")

    def compute_losses(self, batch: PreferenceBatch) -> Tensor:
        h = _logratio_margin(batch)
        length_gap = _float_lengths(batch.chosen_lengths, h) - _float_lengths(batch.rejected_lengths, h)
        # Park et al. 2024 ("Disentangling length from quality in DPO"), Eq. 9:
        # -log sigma(beta * h + alpha * (|y_w| - |y_l|)).
        return -F.logsigmoid(self.beta * h + self.alpha * length_gap)


class FunctionLoss(DAALoss):
    """Adapter for a user function `fn(batch: PreferenceBatch, beta=..., ...) -> LossOutput`.

    The function may set `fn.needs_reference = False` / `fn.needs_lengths = True`. Its implicit reward (for
    self-review) is DPO's beta * log(pi / pi_ref); for another reward, subclass DAALoss instead.
    """

    def __init__(self, fn: Callable[..., LossOutput], name: str, beta: float = 0.1,
                 fn_params: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(beta)
        self.fn = fn
        self.name = name
        self.fn_params = dict(fn_params or {})
        self.needs_reference = bool(getattr(fn, "needs_reference", True))
        self.needs_lengths = bool(getattr(fn, "needs_lengths", False))

    def forward(self, batch: PreferenceBatch) -> LossOutput:
        self.check_batch(batch)
        out = self.fn(batch, **self.fn_params)
        shape = batch.policy_chosen_logps.shape
        where = f"--sera.loss: loss callback '{self.name}' returned"
        if not isinstance(out, LossOutput):
            raise ConfigError(
                f"{where} {type(out).__name__}; expected LossOutput(losses, chosen_rewards, rejected_rewards)"
            )
        for f in fields(out):
            t = getattr(out, f.name)
            if not isinstance(t, Tensor) or t.shape != shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ConfigError(f"{where} {f.name} of shape {got}; expected per-example shape {tuple(shape)}")
        if batch.policy_chosen_logps.requires_grad and not out.losses.requires_grad:
            raise ConfigError(f"{where} losses that carry no gradient (detached?)")
        return LossOutput(out.losses, out.chosen_rewards.detach(), out.rejected_rewards.detach())


def _accepted_params(fn: Callable[..., Any], params: Dict[str, Any], skip_first: bool = False) -> Dict[str, Any]:
    """The subset of `params` that `fn` accepts by keyword (all of them if it takes **kwargs)."""
    sig = list(inspect.signature(fn).parameters.values())[1 if skip_first else 0:]
    if any(p.kind is p.VAR_KEYWORD for p in sig):
        return dict(params)
    names = {p.name for p in sig if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in params.items() if k in names}


def build_loss(name_or_path: str, **params: Any) -> DAALoss:
    """Build a loss from a registered name, `pkg.module:attr` or `/path/file.py:attr`.

    `params` may hold every loss parameter the CLI knows (beta, label_smoothing, gamma, alpha, delta); each loss
    receives only those its constructor (or function) accepts, and None values fall back to the defaults.
    """
    obj = LOSSES.get(name_or_path, flag="--sera.loss")
    params = {k: v for k, v in params.items() if v is not None}
    if isinstance(obj, type):
        if not issubclass(obj, DAALoss):
            raise ConfigError(f"--sera.loss: '{name_or_path}' is the class {obj.__name__}, which does not subclass "
                              f"sera_openrlhf.losses.DAALoss")
        try:
            return obj(**_accepted_params(obj, params))
        except TypeError as e:  # a user class with a required parameter the CLI does not provide
            raise ConfigError(f"--sera.loss: cannot construct '{name_or_path}': {e}") from e
    if callable(obj):
        return FunctionLoss(obj, name_or_path, beta=params.get("beta", 0.1),
                            fn_params=_accepted_params(obj, params, skip_first=True))
    raise ConfigError(
        f"--sera.loss: '{name_or_path}' is a {type(obj).__name__}, not a DAALoss subclass or a function"
    )


def implicit_reward(loss: DAALoss, logps: Tensor, ref_logps: Optional[Tensor] = None,
                    lengths: Optional[Tensor] = None) -> Tensor:
    """The implicit reward [B] that `loss` trains; IRM = implicit_reward(chosen) - implicit_reward(rejected)."""
    return loss.implicit_reward(logps, ref_logps, lengths)


def swapped(batch: PreferenceBatch) -> PreferenceBatch:
    """The same pairs with chosen and rejected exchanged (the flipped labels)."""
    return PreferenceBatch(batch.policy_rejected_logps, batch.policy_chosen_logps, batch.reference_rejected_logps,
                           batch.reference_chosen_logps, batch.rejected_lengths, batch.chosen_lengths)


def soft_label_losses(loss: DAALoss, batch: PreferenceBatch, confidence: Tensor) -> LossOutput:
    """Per-pair soft labels (--sera.select_mode soft): w·ℓ(x, y_w, y_l) + (1 − w)·ℓ(x, y_l, y_w), [B].

    confidence w: Tensor[B] in [0, 1], the probability that the label is right. For DPO this is cDPO (Mitchell
    2023, Eq. 3) with a per-pair ε = 1 − w; with w = 1 − ε for every pair it is exactly `DPOLoss(label_smoothing=ε)`.
    Works for any loss: the flipped term is the loss of the swapped pair. Rewards are those of the pair as labelled.
    """
    out = loss(batch)
    if bool((confidence >= 1).all()):
        return out
    w = confidence.to(out.losses.dtype)
    return LossOutput(w * out.losses + (1 - w) * loss(swapped(batch)).losses, out.chosen_rewards,
                      out.rejected_rewards)
