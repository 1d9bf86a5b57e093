"""Worked example: a custom DAA loss (squared hinge) plugged in without editing sera_openrlhf.

Train with it (one run, or inside the SeRA loop with --sera.enable):

    python -m sera_openrlhf.cli.train_dpo <stock flags> --sera.loss docs/examples/hinge_loss.py:SquaredHingeLoss
    python -m sera_openrlhf.cli.train_dpo <stock flags> --sera.loss docs/examples/hinge_loss.py:squared_hinge

Constructor (or function) parameters named like a loss flag receive that flag's value: beta <- --model.beta,
delta <- --sera.slic_delta (also label_smoothing, gamma, alpha); any other parameter keeps its default.
"""

from __future__ import annotations

import torch

from sera_openrlhf.losses import DAALoss, LossOutput, PreferenceBatch


def _margin(batch: PreferenceBatch) -> torch.Tensor:
    """h = [log pi(y_w) - log pi(y_l)] - [log pi_ref(y_w) - log pi_ref(y_l)], shape [B]."""
    return (batch.policy_chosen_logps - batch.policy_rejected_logps) - (
        batch.reference_chosen_logps - batch.reference_rejected_logps
    )


class SquaredHingeLoss(DAALoss):
    """Squared hinge on the reference-adjusted log-ratio margin: a smooth cousin of SLiC-HF's hinge.

        loss_i = max(0, delta - beta * h_i) ** 2

    Zero once the policy separates the pair by `delta / beta` nats beyond the reference; unlike the plain hinge
    its gradient shrinks as the margin approaches delta. The implicit reward is inherited from DAALoss, DPO's
    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), so SeRA's self-review ranks pairs by the margin this loss
    trains. A loss with another reward overrides `implicit_reward` (see SimPOLoss in sera_openrlhf/losses.py).
    """

    needs_reference = True  # the default; a reference-free loss sets False (and needs_lengths = True if it uses them)

    def __init__(self, beta: float = 0.1, delta: float = 1.0) -> None:
        super().__init__(beta)  # validates beta > 0 and names --model.beta if not
        self.delta = float(delta)

    def compute_losses(self, batch: PreferenceBatch) -> torch.Tensor:
        # batch tensors are [B] sums of response-token log-probs; return [B] unreduced losses carrying grad.
        return torch.relu(self.delta - self.beta * _margin(batch)) ** 2


def squared_hinge(batch: PreferenceBatch, beta: float = 0.1, delta: float = 1.0) -> LossOutput:
    """The same loss as a plain function: returns per-example losses and implicit rewards, each [B].

    The function form always reviews with DPO's implicit reward; for another reward, subclass DAALoss.
    """
    losses = torch.relu(delta - beta * _margin(batch)) ** 2
    chosen_rewards = beta * (batch.policy_chosen_logps - batch.reference_chosen_logps)
    rejected_rewards = beta * (batch.policy_rejected_logps - batch.reference_rejected_logps)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())
