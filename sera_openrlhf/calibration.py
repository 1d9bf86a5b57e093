"""Soft self-review: a calibrated probability that each offline pair's label is right, from its IRM alone.

Hard top-k selection only beats training on every pair when the review signal is strong; with a weak one it
throws away more clean pairs than flipped ones (docs/concepts.md, "How strong must the signal be for a hard cut
to help?").
`--sera.select_mode soft` keeps every pair and turns its IRM into a label confidence w = P(label right | IRM);
training then uses w·ℓ(h) + (1 − w)·ℓ(−h) (`losses.soft_label_losses`), the per-pair form of cDPO.

The model (gold-free): a pair whose label is right has an IRM drawn from N(μ, σ²) with μ > 0, a flipped pair the
mirror image N(−μ, σ²), a share ε of the labels is flipped. The fit is EM for this symmetric two-component
mixture; its fixed point has mean(1 − w) = ε̂, so the confidences spend exactly the estimated noise rate. The
same fit gives a gold-free estimate of how well the review detects flips: AUROC = Φ(√2 · μ / σ).

With no signal the mixture says nothing about single pairs: IRMs symmetric about 0 fit with any ε̂ up to 0.5, and
confidences averaging 0.5 would erase the labels' own signal. So unless the labels' net shift (1 − 2ε̂)·μ/σ, the mean
IRM in units of its spread, clears `min_shift` (default 2/√N: about the 95th percentile of the statistic on N
symmetric no-signal IRMs, simulated: 0.101 at N = 378), or when the caller's out-of-fold test failed, every pair
gets w = 1 − ε₀ (the prior flip rate, `--model.label_smoothing`): exactly cDPO.

A signal is not yet a flip rate. ε is read off the IRMs' shape (the flipped share is a mirrored bump), and a weak
review's mixture is almost one Gaussian: simulated with 30 % flips at AUROC 0.7 and N = 384, ε̂ ranged 0.05-0.42
(10th-90th percentile; benchmarks/quality/calibration_identification.py), and right-skewed IRMs drive ε̂ to 0
(HH-RLHF, out of fold: ε̂ 1 %, for labels that human raters agree on about 70 % of the time). So the fit is used
only where the mixture fits the IRMs clearly better than one Gaussian (log-likelihood gain ≥ `min_gain`);
otherwise the fallback again.

Plain torch only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

# One Gaussian is the mixture with ε = 0 on its boundary, so twice the gain is asymptotically ½χ²₀ + ½χ²₁ under it:
# 95th percentile 2.71, a gain of 1.35. Simulated on 300 draws of 384 Gaussian IRMs: gain ≥ 1.35 in 6.0 %.
MIN_GAIN = 1.35


@dataclass
class Calibration:
    """confidence: Tensor[N] float64 in [0, 1], P(label right | IRM). The other fields are JSON-ready stats."""

    confidence: torch.Tensor
    flip_rate: float  # ε̂ = mean(1 − confidence)
    mu: float | None
    sigma: float | None
    est_flip_auroc: float | None  # Φ(√2 μ/σ): the fit's own estimate of the review's flip-detection AUROC
    fallback: str | None  # why every pair got 1 − ε₀, or None when the mixture was used
    iterations: int
    loglik_gain: float | None = None  # log-likelihood of the mixture minus that of one Gaussian fitted to the IRMs
    has_signal: bool = False  # the labels' net IRM shift passed its test (the AUROC estimate means something)

    def stats(self) -> dict:
        out = asdict(self)
        out.pop("confidence")
        c = self.confidence
        out["confidence_quantiles"] = ({q: float(torch.quantile(c, p)) for q, p in
                                        (("p5", 0.05), ("p50", 0.5), ("p95", 0.95))} if c.numel() else None)
        return out


def flip_mixture(irm, prior_flip_rate: float, min_shift: float | None = None, min_gain: float = MIN_GAIN,
                 max_iter: int = 2000, tol: float = 1e-10) -> Calibration:
    """Fit the symmetric mixture (1 − ε)·N(μ, σ²) + ε·N(−μ, σ²) to `irm` (Tensor[N] or list) by EM.

    prior_flip_rate: ε₀ in [0, 0.5), the fallback confidence is 1 − ε₀ and the EM starts from it (0.1 if 0).
    min_shift: below this net shift (1 − 2ε̂)·μ/σ the review is called signal-free and the fallback is used
    (None: 2/√N).
    min_gain: below this log-likelihood gain of the mixture over one Gaussian the flip rate is not identified and
    the fallback is used.
    """
    m = torch.as_tensor(irm, dtype=torch.float64).flatten()
    n = m.numel()
    if not 0.0 <= prior_flip_rate < 0.5:
        raise ValueError(f"prior flip rate must be in [0, 0.5), got {prior_flip_rate}")

    def fallback(reason: str, mu=None, sigma=None, iterations=0, gain=None, has_signal=False) -> Calibration:
        return prior_only(n, prior_flip_rate, reason, mu, sigma, iterations, gain, has_signal)

    if n < 2 or float(m.std()) == 0.0:
        return fallback("fewer than 2 distinct margins")
    eps = prior_flip_rate or 0.1
    mu = float(m.abs().mean())
    sigma = float(m.std())
    it = 0
    for it in range(1, max_iter + 1):
        # E step: P(flipped | m) = σ(−(2μm/σ² + log((1 − ε)/ε)))
        logit_right = 2 * mu * m / sigma**2 + math.log((1 - eps) / eps)
        r = torch.sigmoid(-logit_right)
        # M step for ε, μ (the flipped component's mean is −μ) and the shared σ
        new_eps = float(r.mean())
        new_mu = float(((1 - 2 * r) * m).mean())
        new_sigma = math.sqrt(float(((1 - r) * (m - new_mu) ** 2 + r * (m + new_mu) ** 2).mean()))
        new_eps = min(max(new_eps, 1e-6), 0.5 - 1e-6)  # keep the log-odds finite; ε ≥ 0.5 would swap the labels
        done = abs(new_eps - eps) + abs(new_mu - mu) + abs(new_sigma - sigma) < tol
        eps, mu, sigma = new_eps, new_mu, max(new_sigma, 1e-12)
        if done:
            break
    shift = (1 - 2 * eps) * mu / sigma
    min_shift = 2 / math.sqrt(n) if min_shift is None else min_shift
    if shift < min_shift:
        return fallback(f"no signal: the labels' net IRM shift (1 - 2 eps) mu / sigma = {shift:.3f} < {min_shift:.3f}",
                        mu, sigma, it)
    # The flip rate is read off the IRMs' shape (a flipped share makes a mirrored bump). IRMs that one Gaussian fits
    # as well, e.g. a right-skewed or heavy-tailed unimodal spread, push ε̂ to 0: "no label is wrong" would then be
    # an artefact of the model, not a measurement, and w ≈ 1 would train like plain DPO, below cDPO.
    gain = _loglik(m, eps, mu, sigma) - _loglik(m, 0.0, float(m.mean()), float(m.std(correction=0)))
    if gain < min_gain:
        return fallback(f"flip rate not identified: the flipped/right mixture (eps {eps:.3f}) fits the IRMs no better "
                        f"than one Gaussian (log-likelihood gain {gain:.2f} < {min_gain:.2f})", mu, sigma, it, gain,
                        has_signal=True)
    confidence = torch.sigmoid(2 * mu * m / sigma**2 + math.log((1 - eps) / eps))
    return Calibration(confidence, float((1 - confidence).mean()), mu, sigma, _auroc(mu, sigma), None, it, gain, True)


def _loglik(m: torch.Tensor, eps: float, mu: float, sigma: float) -> float:
    """log-likelihood of m under (1 − ε)·N(μ, σ²) + ε·N(−μ, σ²)."""
    right = torch.distributions.Normal(mu, sigma).log_prob(m) + math.log1p(-eps)
    if eps == 0.0:
        return float(right.sum())
    return float(torch.logaddexp(right, torch.distributions.Normal(-mu, sigma).log_prob(m) + math.log(eps)).sum())


def prior_only(n: int, prior_flip_rate: float, reason: str, mu: float | None = None, sigma: float | None = None,
               iterations: int = 0, loglik_gain: float | None = None, has_signal: bool = False) -> Calibration:
    """Every one of n pairs gets confidence 1 − ε₀: cDPO with label smoothing ε₀."""
    return Calibration(torch.full((n,), 1.0 - prior_flip_rate, dtype=torch.float64), prior_flip_rate, mu, sigma,
                       None if mu is None else _auroc(mu, sigma), reason, iterations, loglik_gain, has_signal)


def _auroc(mu: float, sigma: float) -> float:
    """AUROC of ranking N(μ, σ²) above N(−μ, σ²): Φ(2μ / (σ√2)) = Φ(√2 μ/σ)."""
    return 0.5 * (1.0 + math.erf(mu / sigma))
