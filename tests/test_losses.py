"""DAA losses: hand-computed values, OpenRLHF parity, gradient direction, limits and input validation.

Expected values are literal numbers worked out by hand from the papers' formulas (the arithmetic is in the
comments; the digits come from Python's `math`, never from torch or from the code under test), or come from a
second, plain-Python implementation that loops over floats. Parity with the real `openrlhf.models.loss.DPOLoss`
is checked by tests/test_trainer_losses.py::test_dpo_matches_openrlhf_dpoloss (it needs OpenRLHF importable).
"""

import math

import pytest
import torch

from sera_openrlhf.errors import ConfigError
from sera_openrlhf.losses import (
    LOSSES,
    PARAM_FLAGS,
    DAALoss,
    PreferenceBatch,
    build_loss,
    implicit_reward,
)

BUILTINS = ["dpo", "ipo", "slic", "simpo", "rdpo", "robust"]

# Three pairs. h = (pc - pr) - (rc - rr) = [1.0, -2.5, 1.5].
PC = [-10.0, -12.0, -8.0]
PR = [-11.0, -10.0, -8.5]
RC = [-10.5, -11.0, -9.0]
RR = [-10.5, -11.5, -8.0]
LC = [5, 8, 4]
LR = [4, 6, 10]


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
    # Rafailov et al. 2023, Eq. 7: -log sigma(beta * h) = log(1 + exp(-beta * h)); beta * h = [0.5, -1.25, 0.75]:
    # log(1 + e^-0.5) = 0.474077, log(1 + e^1.25) = 1.501929, log(1 + e^-0.75) = 0.386871
    assert_close(out.losses, [0.4740769841801067, 1.501929081345373, 0.38687100611489994])
    # Eq. 5: r = beta * (log pi - log pi_ref); pc - rc = [0.5, -1.0, 1.0], pr - rr = [-0.5, 1.5, -0.5]
    assert_close(out.chosen_rewards, [0.25, -0.5, 0.5])
    assert_close(out.rejected_rewards, [-0.25, 0.75, -0.25])


def test_cdpo_values():
    beta, eps = 0.5, 0.2
    out = build_loss("dpo", beta=beta, label_smoothing=eps)(make_batch())
    # Mitchell 2023 (cDPO), Eq. 3: (1 - eps) log(1 + e^(-beta h)) + eps log(1 + e^(beta h)), beta h = [0.5, -1.25, 0.75]
    # e.g. pair 0: 0.8 * 0.474077 + 0.2 * 0.974077 = 0.574077
    assert_close(out.losses, [0.5740769841801068, 1.2519290813453732, 0.5368710061149])


def test_ipo_values():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    out = build_loss("ipo", beta=beta)(make_batch())
    # Azar et al. 2023, Eq. 17: (h - 1 / (2 beta))^2 = ([1, -2.5, 1.5] - 2)^2
    assert_close(out.losses, [1.0, 20.25, 0.25])
    assert_close(out.chosen_rewards, [0.125, -0.25, 0.25])  # 0.25 * [0.5, -1.0, 1.0]


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
    # Meng et al. 2024, Eq. 4: r = beta / |y| * log pi(y|x)
    rc = [-4.0, -3.0, -4.0]  # 2 * [-10/5, -12/8, -8/4]
    rr = [-5.5, -10 / 3, -1.7]  # 2 * [-11/4, -10/6, -8.5/10]
    # Eq. 6: log(1 + exp(-(r_w - r_l - gamma))), r_w - r_l - gamma = [1.0, -1/6, -2.8]
    assert_close(out.losses, [0.31326168751822286, 0.7799487247663041, 2.8590328262879714])
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
    # Park et al. 2024, Eq. 9: log(1 + exp(-(beta h + alpha (|y_w| - |y_l|)))); beta h = [0.5, -1.25, 0.75],
    # |y_w| - |y_l| = [1, 2, -6], so the argument is [0.6, -1.05, 0.15]
    assert_close(out.losses, [0.4374879504858856, 1.3500584796176431, 0.6209570477895321])
    assert_close(out.chosen_rewards, [0.25, -0.5, 0.5])  # the length-free DPO reward, as for dpo


def test_rdpo_credits_longer_chosen_to_length():
    # R-DPO sign: a longer chosen response already explains part of the preference -> lower loss than DPO,
    # a shorter one -> higher loss (larger gradient), so the policy gains less by growing length.
    batch = make_batch()
    dpo = build_loss("dpo", beta=0.5)(batch).losses
    rdpo = build_loss("rdpo", beta=0.5, alpha=0.1)(batch).losses
    longer = torch.tensor(LC) > torch.tensor(LR)
    assert (rdpo[longer] < dpo[longer]).all() and (rdpo[~longer] > dpo[~longer]).all()


# ---------------------------------------------------------------- second implementation (plain Python floats)


def softplus(x: float) -> float:
    """log(1 + e^x) without overflow: -log sigma(z) = softplus(-z)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def reference_losses(name, params, pc, pr, rc, rr, lc, lr):
    """Per-example losses and implicit rewards from the papers, one pair at a time in float64 Python arithmetic.

    The margin is written as the difference of the two sides' log-ratios (log pi/pi_ref (y_w) - log pi/pi_ref
    (y_l)), not in OpenRLHF's (pi_w - pi_l) - (ref_w - ref_l) order the implementation uses.
    """
    losses, chosen, rejected = [], [], []
    for c, r, c0, r0, nc, nr in zip(pc, pr, rc, rr, lc, lr):
        beta = params.get("beta", 2.0 if name == "simpo" else 0.1)
        if name == "simpo":  # Meng et al. 2024, Eq. 4 and 6
            r_w, r_l = beta * c / nc, beta * r / nr
            losses.append(softplus(-(r_w - r_l - params.get("gamma", 0.5))))
        else:
            r_w, r_l = beta * (c - c0), beta * (r - r0)  # Rafailov et al. 2023, Eq. 5
            h = (c - c0) - (r - r0)
            if name == "dpo":  # Eq. 7; cDPO (Mitchell 2023, Eq. 3) for label_smoothing eps > 0
                eps = params.get("label_smoothing", 0.0)
                losses.append((1 - eps) * softplus(-beta * h) + eps * softplus(beta * h))
            elif name == "ipo":  # Azar et al. 2023, Eq. 17
                losses.append((h - 1 / (2 * beta)) ** 2)
            elif name == "slic":  # Zhao et al. 2023, Eq. 1 on beta * h
                losses.append(max(0.0, params.get("delta", 1.0) - beta * h))
            elif name == "rdpo":  # Park et al. 2024, Eq. 9
                losses.append(softplus(-(beta * h + params.get("alpha", 0.01) * (nc - nr))))
            elif name == "robust":  # Chowdhury et al. 2024, Eq. 8
                eps = params.get("label_smoothing", 0.0)
                losses.append(((1 - eps) * softplus(-beta * h) - eps * softplus(beta * h)) / (1 - 2 * eps))
        chosen.append(r_w)
        rejected.append(r_l)
    return losses, chosen, rejected


@pytest.mark.parametrize(
    "name,params",
    [
        ("dpo", {"beta": 0.1}),
        ("dpo", {"beta": 0.1, "label_smoothing": 0.1}),
        ("ipo", {"beta": 0.1}),
        ("slic", {"beta": 0.1, "delta": 1.0}),
        ("simpo", {"beta": 2.0, "gamma": 0.5}),
        ("rdpo", {"beta": 0.1, "alpha": 0.05}),
        ("robust", {"beta": 0.1, "label_smoothing": 0.3}),
    ],
)
def test_matches_plain_python_reference_fp32(name, params):
    # fp32 log-probs of realistic magnitude (as the trainer passes them); the reference runs in float64 on the
    # same fp32 values, so only the implementation's fp32 rounding separates the two.
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(8, generator=g) for _ in range(4))
    lc, lr = (torch.randint(1, 40, (8,), generator=g) for _ in range(2))
    out = build_loss(name, **params)(PreferenceBatch(pc, pr, rc, rr, lc, lr))
    losses, chosen, rejected = reference_losses(name, params, *(t.tolist() for t in (pc, pr, rc, rr, lc, lr)))
    as32 = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    torch.testing.assert_close(out.losses, as32(losses), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.losses.mean(), as32(sum(losses) / len(losses)), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, as32(chosen), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.rejected_rewards, as32(rejected), atol=1e-6, rtol=1e-6)


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


# Implicit rewards of make_batch() at each loss's default beta, by hand:
#   DPO-style (dpo, ipo, slic, rdpo; beta 0.1), Rafailov et al. 2023, Eq. 5: 0.1 * (log pi - log pi_ref) with
#     pc - rc = [0.5, -1.0, 1.0] and pr - rr = [-0.5, 1.5, -0.5]
#   SimPO (beta 2.0), Meng et al. 2024, Eq. 4: 2 * log pi / |y| = 2 * [-10/5, -12/8, -8/4], 2 * [-11/4, -10/6, -8.5/10]
DPO_REWARDS = ([0.05, -0.1, 0.1], [-0.05, 0.15, -0.05])
DEFAULT_REWARDS = {"dpo": DPO_REWARDS, "ipo": DPO_REWARDS, "slic": DPO_REWARDS, "rdpo": DPO_REWARDS,
                   "robust": DPO_REWARDS,
                   "simpo": ([-4.0, -3.0, -4.0], [-5.5, -10 / 3, -1.7])}


@pytest.mark.parametrize("name", BUILTINS)
def test_rewards_equal_implicit_reward(name):
    """Training (the loss's reported rewards) and self-review (`implicit_reward`, which SeRA's IRM calls) both
    give the paper's reward, each checked against the hand-computed numbers rather than against each other."""
    batch = make_batch()
    loss_fn = build_loss(name)
    out = loss_fn(batch)
    chosen, rejected = DEFAULT_REWARDS[name]
    assert_close(out.chosen_rewards, chosen, tol=1e-12)
    assert_close(out.rejected_rewards, rejected, tol=1e-12)
    assert_close(
        implicit_reward(loss_fn, batch.policy_chosen_logps, batch.reference_chosen_logps, batch.chosen_lengths),
        chosen, tol=1e-12,
    )
    assert_close(
        implicit_reward(loss_fn, batch.policy_rejected_logps, batch.reference_rejected_logps, batch.rejected_lengths),
        rejected, tol=1e-12,
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
        ("robust", {"beta": 0.3, "label_smoothing": 0.2}, math.log(2)),
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
        ("robust", {"label_smoothing": 0.5}, "--model.label_smoothing"),
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


def test_robust_dpo_is_unbiased_for_the_clean_loss_under_symmetric_flips():
    """Chowdhury et al. 2024, Lemma 3.1: with labels flipped at rate eps, the expected rDPO loss equals the clean
    DPO loss (cDPO's does not), so its gradient pushes a pair toward its *true* order."""
    eps, beta = 0.3, 0.5
    h = torch.tensor([2.0, -1.0, 0.5])
    zeros = torch.zeros(3)
    robust, dpo, cdpo = (build_loss(n, beta=beta, label_smoothing=e) for n, e in
                         (("robust", eps), ("dpo", 0.0), ("dpo", eps)))
    clean = dpo(PreferenceBatch(h, zeros, zeros, zeros)).losses

    def expected(loss):  # the label is kept with prob 1 - eps, flipped (chosen <-> rejected) with prob eps
        kept = loss(PreferenceBatch(h, zeros, zeros, zeros)).losses
        flipped = loss(PreferenceBatch(zeros, h, zeros, zeros)).losses
        return (1 - eps) * kept + eps * flipped

    torch.testing.assert_close(expected(robust), clean, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(expected(cdpo), clean, atol=1e-3)
