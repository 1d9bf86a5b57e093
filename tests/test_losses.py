"""DAA losses: hand-computed values, OpenRLHF parity, gradient direction, limits and input validation.

Expected values are computed here from the papers' formulas with `math`, never by calling the code under test.
Parity with the real `openrlhf.models.loss.DPOLoss` is checked by a separate integration test (it needs
OpenRLHF importable); here OpenRLHF's formula is restated inline.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from sera_openrlhf.errors import ConfigError
from sera_openrlhf.losses import (
    LOSSES,
    PARAM_FLAGS,
    DAALoss,
    PreferenceBatch,
    build_loss,
    implicit_reward,
)

BUILTINS = ["dpo", "ipo", "slic", "simpo", "rdpo"]

# Three pairs. h = (pc - pr) - (rc - rr) = [1.0, -2.5, 1.5].
PC = [-10.0, -12.0, -8.0]
PR = [-11.0, -10.0, -8.5]
RC = [-10.5, -11.0, -9.0]
RR = [-10.5, -11.5, -8.0]
LC = [5, 8, 4]
LR = [4, 6, 10]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def margins():
    return [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR)]


def make_batch(requires_grad: bool = False, dtype=torch.float64) -> PreferenceBatch:
    t = lambda xs, grad=False: torch.tensor(xs, dtype=dtype, requires_grad=grad)  # noqa: E731
    return PreferenceBatch(
        policy_chosen_logps=t(PC, requires_grad),
        policy_rejected_logps=t(PR, requires_grad),
        reference_chosen_logps=t(RC),
        reference_rejected_logps=t(RR),
        chosen_lengths=torch.tensor(LC),
        rejected_lengths=torch.tensor(LR),
    )


def assert_close(actual: torch.Tensor, expected, tol: float = 1e-9) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


# ---------------------------------------------------------------- hand-computed values


def test_margins_fixture():
    assert margins() == [1.0, -2.5, 1.5]


def test_dpo_values():
    beta = 0.5
    out = build_loss("dpo", beta=beta)(make_batch())
    assert_close(out.losses, [-log_sigmoid(beta * h) for h in margins()])
    assert_close(out.chosen_rewards, [beta * (pc - rc) for pc, rc in zip(PC, RC)])
    assert_close(out.rejected_rewards, [beta * (pr - rr) for pr, rr in zip(PR, RR)])


def test_cdpo_values():
    beta, eps = 0.5, 0.2
    out = build_loss("dpo", beta=beta, label_smoothing=eps)(make_batch())
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in margins()]
    assert_close(out.losses, expected)


def test_ipo_values():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    out = build_loss("ipo", beta=beta)(make_batch())
    assert_close(out.losses, [(h - 2.0) ** 2 for h in margins()])  # [1, 20.25, 0.25]
    assert_close(out.chosen_rewards, [beta * (pc - rc) for pc, rc in zip(PC, RC)])


def test_slic_values():
    beta, delta = 0.5, 1.0
    out = build_loss("slic", beta=beta, delta=delta)(make_batch())
    # hinge max(0, delta - beta * h): h = 1 -> 0.5, h = -2.5 -> 2.25, h = 1.5 -> 0.25
    assert_close(out.losses, [0.5, 2.25, 0.25])
    out = build_loss("slic", beta=1.0, delta=1.0)(make_batch())
    assert_close(out.losses, [0.0, 3.5, 0.0])  # hinge inactive once the margin exceeds delta


def test_simpo_values():
    beta, gamma = 2.0, 0.5
    out = build_loss("simpo", beta=beta, gamma=gamma)(make_batch())
    rc = [beta * lp / n for lp, n in zip(PC, LC)]
    rr = [beta * lp / n for lp, n in zip(PR, LR)]
    assert_close(out.losses, [-log_sigmoid(a - b - gamma) for a, b in zip(rc, rr)])
    assert_close(out.chosen_rewards, rc)
    assert_close(out.rejected_rewards, rr)


def test_simpo_ignores_reference():
    batch = make_batch()
    batch.reference_chosen_logps = batch.reference_rejected_logps = None
    with_ref = build_loss("simpo")(make_batch()).losses
    torch.testing.assert_close(build_loss("simpo")(batch).losses, with_ref)


def test_rdpo_values():
    beta, alpha = 0.5, 0.1
    out = build_loss("rdpo", beta=beta, alpha=alpha)(make_batch())
    expected = [-log_sigmoid(beta * h + alpha * (lc - lr)) for h, lc, lr in zip(margins(), LC, LR)]
    assert_close(out.losses, expected)
    assert_close(out.chosen_rewards, [beta * (pc - rc) for pc, rc in zip(PC, RC)])


def test_rdpo_credits_longer_chosen_to_length():
    # R-DPO sign: a longer chosen response already explains part of the preference -> lower loss than DPO,
    # a shorter one -> higher loss (larger gradient), so the policy gains less by growing length.
    batch = make_batch()
    dpo = build_loss("dpo", beta=0.5)(batch).losses
    rdpo = build_loss("rdpo", beta=0.5, alpha=0.1)(batch).losses
    longer = torch.tensor(LC) > torch.tensor(LR)
    assert (rdpo[longer] < dpo[longer]).all() and (rdpo[~longer] > dpo[~longer]).all()


# ---------------------------------------------------------------- OpenRLHF parity (formula restated)


def openrlhf_dpo_formula(pc, pr, rc, rr, beta, label_smoothing=0.0, ipo=False):
    """openrlhf/models/loss.py::DPOLoss.forward (0.11.2), restated: returns (mean loss, chosen, rejected)."""
    logits = (pc - pr) - (rc - rr)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    return losses.mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()


@pytest.mark.parametrize(
    "name,params,ipo",
    [
        ("dpo", {"beta": 0.1}, False),
        ("dpo", {"beta": 0.1, "label_smoothing": 0.1}, False),
        ("ipo", {"beta": 0.1}, True),
    ],
)
def test_matches_openrlhf_formula(name, params, ipo):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(8, generator=g) for _ in range(4))  # fp32, realistic magnitudes
    out = build_loss(name, **params)(PreferenceBatch(pc, pr, rc, rr))
    ref_loss, ref_chosen, ref_rejected = openrlhf_dpo_formula(pc, pr, rc, rr, ipo=ipo, **params)
    torch.testing.assert_close(out.losses.mean(), ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, ref_chosen, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, ref_rejected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- properties of every built-in


@pytest.mark.parametrize("name", BUILTINS)
def test_shapes_and_detached_rewards(name):
    batch = make_batch(requires_grad=True)
    out = build_loss(name)(batch)
    assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (3,)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name", BUILTINS)
def test_gradient_raises_chosen_and_lowers_rejected(name):
    # Margins h = [1, -1] with beta = 0.1 keep every loss in its active region (SLiC hinge, IPO below target).
    pc = torch.tensor([-5.0, -7.0], requires_grad=True)
    pr = torch.tensor([-6.0, -6.0], requires_grad=True)
    batch = PreferenceBatch(pc, pr, torch.tensor([-5.5, -6.5]), torch.tensor([-5.5, -6.5]),
                            torch.tensor([3, 5]), torch.tensor([4, 4]))
    loss_fn = build_loss(name, beta=0.1)
    before = loss_fn(batch).losses
    before.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    with torch.no_grad():  # one SGD step on the log-probs themselves
        pc -= 0.1 * pc.grad
        pr -= 0.1 * pr.grad
    assert (pc > torch.tensor([-5.0, -7.0])).all() and (pr < torch.tensor([-6.0, -6.0])).all()
    assert (loss_fn(batch).losses < before.detach()).all()


@pytest.mark.parametrize("name", BUILTINS)
def test_rewards_equal_implicit_reward(name):
    batch = make_batch()
    loss_fn = build_loss(name)
    out = loss_fn(batch)
    torch.testing.assert_close(
        out.chosen_rewards,
        implicit_reward(loss_fn, batch.policy_chosen_logps, batch.reference_chosen_logps, batch.chosen_lengths),
    )
    torch.testing.assert_close(
        out.rejected_rewards,
        implicit_reward(loss_fn, batch.policy_rejected_logps, batch.reference_rejected_logps, batch.rejected_lengths),
    )


@pytest.mark.parametrize("name", BUILTINS)
def test_bf16_inputs(name):
    batch = make_batch(dtype=torch.bfloat16)
    out = build_loss(name)(batch)
    assert torch.isfinite(out.losses).all()


# ---------------------------------------------------------------- limits


def equal_batch() -> PreferenceBatch:
    same = torch.tensor([-7.0, -3.0])
    return PreferenceBatch(same, same.clone(), same - 1, same - 1, torch.tensor([4, 9]), torch.tensor([4, 9]))


def test_dpo_beta_to_zero_gives_log2():
    out = build_loss("dpo", beta=1e-8)(make_batch())
    assert_close(out.losses, [math.log(2)] * 3, tol=1e-6)


@pytest.mark.parametrize(
    "name,params,expected",
    [
        ("dpo", {"beta": 0.3}, math.log(2)),
        ("dpo", {"beta": 0.3, "label_smoothing": 0.25}, math.log(2)),
        ("ipo", {"beta": 0.2}, (1 / (2 * 0.2)) ** 2),
        ("slic", {"beta": 0.3, "delta": 1.5}, 1.5),
        ("simpo", {"beta": 2.0, "gamma": 0.7}, math.log1p(math.exp(0.7))),  # -log sigma(-gamma)
        ("rdpo", {"beta": 0.3, "alpha": 0.05}, math.log(2)),  # equal lengths: no length term
    ],
)
def test_equal_chosen_and_rejected(name, params, expected):
    assert_close(build_loss(name, **params)(equal_batch()).losses, [expected, expected], tol=1e-6)


# ---------------------------------------------------------------- errors


def test_unknown_loss_lists_names():
    with pytest.raises(ConfigError) as e:
        build_loss("dpx")
    assert "--sera.loss" in str(e.value) and "dpx" in str(e.value)
    assert all(name in str(e.value) for name in BUILTINS)


@pytest.mark.parametrize(
    "name,params,flag",
    [
        ("dpo", {"beta": 0.0}, "--model.beta"),
        ("simpo", {"beta": -1.0}, "--model.beta"),
        ("dpo", {"beta": float("nan")}, "--model.beta"),
        ("dpo", {"label_smoothing": 0.6}, "--model.label_smoothing"),
        ("dpo", {"label_smoothing": -0.1}, "--model.label_smoothing"),
        ("simpo", {"gamma": -1.0}, "--sera.simpo_gamma"),
        ("rdpo", {"alpha": -0.1}, "--sera.rdpo_alpha"),
        ("slic", {"delta": 0.0}, "--sera.slic_delta"),
    ],
)
def test_out_of_range_params_name_the_flag(name, params, flag):
    with pytest.raises(ConfigError, match=flag):
        build_loss(name, **params)


def test_param_flags_cover_every_builtin_parameter():
    import inspect

    for name in BUILTINS:
        assert set(inspect.signature(LOSSES.get(name)).parameters) <= set(PARAM_FLAGS)


def test_missing_reference_for_dpo():
    batch = make_batch()
    batch.reference_rejected_logps = None
    with pytest.raises(ValueError, match="reference log-probs"):
        build_loss("dpo")(batch)


@pytest.mark.parametrize("name", ["simpo", "rdpo"])
def test_missing_lengths(name):
    batch = make_batch()
    batch.chosen_lengths = None
    with pytest.raises(ValueError, match="lengths"):
        build_loss(name)(batch)


def test_zero_length_rejected():
    batch = make_batch()
    batch.rejected_lengths = torch.tensor([4, 0, 2])
    with pytest.raises(ValueError, match="positive"):
        build_loss("simpo")(batch)


def test_shape_mismatch():
    batch = make_batch()
    batch.reference_chosen_logps = batch.reference_chosen_logps[:2]
    with pytest.raises(ValueError, match="reference_chosen_logps"):
        build_loss("dpo")(batch)


# ---------------------------------------------------------------- build_loss and helpers


def test_build_loss_passes_only_accepted_params():
    every = {"beta": 0.2, "label_smoothing": 0.1, "gamma": 1.0, "alpha": 0.05, "delta": 2.0}
    assert build_loss("dpo", **every).label_smoothing == 0.1
    simpo = build_loss("simpo", **every)
    assert (simpo.beta, simpo.gamma) == (0.2, 1.0)
    assert build_loss("slic", **every).delta == 2.0
    assert build_loss("rdpo", **every).alpha == 0.05
    assert build_loss("simpo", gamma=None).gamma == 0.5  # None = "flag not given": keep the default


def test_builtins_are_daaloss_with_declared_needs():
    for name in BUILTINS:
        assert isinstance(build_loss(name), DAALoss)
    assert not build_loss("simpo").needs_reference and build_loss("simpo").needs_lengths
    assert build_loss("dpo").needs_reference and not build_loss("dpo").needs_lengths


def test_implicit_reward_needs_reference():
    with pytest.raises(ValueError, match="ref_logps"):
        implicit_reward(build_loss("dpo"), torch.zeros(2))
