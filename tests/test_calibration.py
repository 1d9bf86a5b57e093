"""--sera.select_mode soft: the gold-free calibration of label confidences from IRMs, and the per-pair soft-label
loss it trains with. Synthetic IRMs with known flips check what the fit recovers; the loss identities are checked
for every registered loss."""

from __future__ import annotations

import pytest
import torch

from sera_openrlhf.calibration import flip_mixture, prior_only
from sera_openrlhf.losses import LOSSES, DPOLoss, PreferenceBatch, build_loss, soft_label_losses, swapped
from sera_openrlhf.selection import auroc


def mixture(n, eps, mu, sigma, seed):
    """IRMs of n pairs: right labels ~ N(mu, sigma^2), a share eps flipped (their IRM mirrored)."""
    g = torch.Generator().manual_seed(seed)
    flipped = torch.rand(n, generator=g) < eps
    irm = torch.randn(n, generator=g, dtype=torch.float64) * sigma + mu
    irm[flipped] *= -1
    return irm, flipped


@pytest.mark.parametrize("eps,mu,sigma", [(0.3, 0.5, 0.6), (0.1, 1.0, 1.0), (0.2, 0.7, 1.0)])
def test_the_fit_recovers_the_flip_rate_and_its_own_accuracy(eps, mu, sigma):
    irm, flipped = mixture(6000, eps, mu, sigma, seed=1)
    cal = flip_mixture(irm, prior_flip_rate=0.2)
    assert cal.fallback is None
    assert cal.flip_rate == pytest.approx(float(flipped.double().mean()), abs=0.03)
    # the confidences spend exactly the estimated noise rate (EM's fixed point)
    assert float((1 - cal.confidence).mean()) == pytest.approx(cal.flip_rate, abs=1e-12)
    # the gold-free accuracy estimate matches the real flip-detection AUROC of the IRM
    assert cal.est_flip_auroc == pytest.approx(auroc(-irm, flipped), abs=0.02)
    # confidence rises with the IRM, so it orders flips exactly as the IRM does
    order = torch.argsort(irm)
    assert bool((cal.confidence[order].diff() >= 0).all())
    assert ((0 <= cal.confidence) & (cal.confidence <= 1)).all()


@pytest.mark.parametrize("irm", [
    torch.randn(4000, generator=torch.Generator().manual_seed(2), dtype=torch.float64),  # no signal at all
    mixture(4000, 0.5, 0.8, 0.5, seed=3)[0],  # a clear margin, but the labels are coin flips (shuffled labels)
    mixture(4000, 0.0, 0.0, 1.0, seed=4)[0] + 0.01,
])
def test_without_signal_every_pair_gets_the_prior_confidence(irm):
    cal = flip_mixture(irm, prior_flip_rate=0.2)
    assert cal.fallback is not None and "no signal" in cal.fallback and not cal.has_signal
    assert cal.flip_rate == 0.2 and torch.equal(cal.confidence, torch.full((4000,), 0.8, dtype=torch.float64))


def test_a_flip_rate_the_irm_shape_cannot_identify_falls_back_to_the_prior():
    """IRMs with a clear net shift that one Gaussian fits as well as the mixture (here: one Gaussian, and a
    right-skewed spread like HH-RLHF's out-of-fold review) drive the mixture's eps to 0, which would train like plain
    DPO; the fit is not used, but its signal and AUROC estimate are kept for the adaptive share."""
    g = torch.Generator().manual_seed(7)
    one = torch.randn(384, generator=g, dtype=torch.float64) * 0.3 + 0.1
    skewed = 0.2 * torch.exp(0.5 * torch.randn(384, generator=g, dtype=torch.float64)) - 0.2  # log-normal, mean ~0.03
    for irm in (one, skewed):
        free = flip_mixture(irm, 0.3, min_gain=float("-inf"))
        assert free.fallback is None and free.flip_rate < 0.05 and free.loglik_gain < 1.35  # the artefact
        cal = flip_mixture(irm, 0.3)
        assert cal.fallback.startswith("flip rate not identified") and cal.has_signal
        assert cal.loglik_gain == pytest.approx(free.loglik_gain)
        assert cal.est_flip_auroc == pytest.approx(free.est_flip_auroc, abs=1e-6)
        assert cal.flip_rate == 0.3 and torch.equal(cal.confidence, torch.full((384,), 0.7, dtype=torch.float64))
    # a mirrored bump: identified
    cal = flip_mixture(mixture(384, 0.3, 1.0, 1.0, seed=0)[0], 0.3)
    assert cal.fallback is None and cal.has_signal and cal.loglik_gain > 1.35


def test_the_identification_test_rarely_passes_one_gaussian():
    """min_gain 1.35 (the boundary likelihood-ratio test's 95th percentile): on 60 draws of 384 IRMs from one
    Gaussian with a clear shift the mixture is used in about 5 % of them."""
    used = sum(flip_mixture(torch.randn(384, generator=torch.Generator().manual_seed(100 + s), dtype=torch.float64)
                            + 0.5, 0.3).fallback is None for s in range(60))
    assert used <= 8, used


def test_degenerate_inputs_fall_back_and_bad_priors_are_refused():
    assert flip_mixture(torch.zeros(5), 0.1).fallback == "fewer than 2 distinct margins"
    assert flip_mixture([0.3], 0.0).confidence.tolist() == [1.0]
    with pytest.raises(ValueError, match="prior flip rate"):
        flip_mixture([0.1, 0.2], 0.5)
    stats = prior_only(3, 0.25, "why").stats()
    assert stats["flip_rate"] == 0.25 and stats["fallback"] == "why" and stats["confidence_quantiles"]["p50"] == 0.75


def batch(seed=0, b=8):
    g = torch.Generator().manual_seed(seed)
    logps = [(-5 * torch.rand(b, generator=g, dtype=torch.float64)).requires_grad_(i < 2) for i in range(4)]
    lengths = [torch.randint(1, 20, (b,), generator=g) for _ in range(2)]
    return PreferenceBatch(*logps, *lengths)


@pytest.mark.parametrize("name", sorted(LOSSES.names()))
def test_soft_labels_interpolate_between_the_label_and_its_flip(name):
    loss, b = build_loss(name), batch()
    plain, flipped = loss(b).losses, loss(swapped(b)).losses
    assert torch.equal(soft_label_losses(loss, b, torch.ones(8)).losses, plain)  # w = 1: the loss untouched
    assert torch.allclose(soft_label_losses(loss, b, torch.zeros(8)).losses, flipped)
    w = torch.linspace(0, 1, 8, dtype=torch.float64)
    out = soft_label_losses(loss, b, w)
    assert torch.allclose(out.losses, w * plain + (1 - w) * flipped)
    assert torch.equal(out.chosen_rewards, loss(b).chosen_rewards)  # rewards of the pair as labelled
    out.losses.sum().backward()
    assert b.policy_chosen_logps.grad is not None


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.45])
def test_one_confidence_for_every_pair_is_exactly_cdpo(eps):
    """No signal -> w = 1 - eps everywhere: the same losses and gradients as cDPO (--model.label_smoothing eps)."""
    b1, b2 = batch(5), batch(5)
    soft = soft_label_losses(DPOLoss(0.1), b1, torch.full((8,), 1 - eps, dtype=torch.float64)).losses
    cdpo = DPOLoss(0.1, label_smoothing=eps)(b2).losses
    assert torch.allclose(soft, cdpo, rtol=0, atol=1e-15)
    soft.sum().backward()
    cdpo.sum().backward()
    assert torch.allclose(b1.policy_chosen_logps.grad, b2.policy_chosen_logps.grad, rtol=0, atol=1e-15)


def test_the_default_no_signal_test_rarely_fires_on_noise_and_passes_a_clear_signal():
    """min_shift 2/sqrt(N): on symmetric no-signal IRMs of N = 378 pairs the fit is used in about 5 % of draws
    (it would turn most labels to coin flips); a clear signal of the same size is always used."""
    used = sum(flip_mixture(torch.randn(378, generator=torch.Generator().manual_seed(s), dtype=torch.float64),
                            0.3).fallback is None for s in range(100))
    assert used <= 10, used
    for s in range(5):
        assert flip_mixture(mixture(378, 0.3, 1.0, 1.0, seed=s)[0], 0.3).fallback is None
