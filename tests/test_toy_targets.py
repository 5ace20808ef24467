"""Targets of the toy suite: exact log-densities, exact samples and log Z."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import distributions as D

from steer.toy.posterior import Posterior9
from steer.toy.registry import get_target
from steer.toy.targets import (
    Funnel,
    ManyWell,
    Target,
    UserTarget,
    gmm25,
    gmm40,
    manywell_log_z,
)

GEN = torch.Generator().manual_seed(0)


def _mixture(means: torch.Tensor, std: float) -> D.MixtureSameFamily:
    m = means.shape[0]
    comp = D.Independent(D.Normal(means, std * torch.ones_like(means)), 1)
    return D.MixtureSameFamily(D.Categorical(torch.ones(m) / m), comp)


@pytest.mark.parametrize("make", [gmm25, gmm40])
def test_gmm_log_prob_matches_torch_distributions(make) -> None:
    target = make()
    ref = _mixture(target.means, target.std)
    x = torch.cat([target.sample(64, GEN), 4 * torch.randn(64, target.dim, generator=GEN)])
    torch.testing.assert_close(target.log_prob(x), ref.log_prob(x), rtol=1e-4, atol=1e-3)


def test_gmm25_samples_match_moments_and_modes() -> None:
    target = gmm25()
    x = target.sample(40_000, GEN)
    # grid {-10..10} has variance 50 per coordinate, plus the component variance 0.3
    torch.testing.assert_close(x.mean(0), torch.zeros(2), atol=0.15, rtol=0)
    torch.testing.assert_close(x.var(0), torch.full((2,), 50.3), atol=1.2, rtol=0)
    nearest = torch.cdist(x, target.means).argmin(1)
    frac = torch.bincount(nearest, minlength=25).float() / x.shape[0]
    assert (frac - 1 / 25).abs().max() < 4 * math.sqrt(0.04 * 0.96 / x.shape[0])


def test_funnel_log_prob_and_samples() -> None:
    target = Funnel()
    x = target.sample(20_000, GEN)
    ref = D.Normal(0.0, 3.0).log_prob(x[:, 0]) + D.Normal(
        torch.zeros(9), torch.exp(0.5 * x[:, :1]).expand(-1, 9)
    ).log_prob(x[:, 1:]).sum(-1)
    torch.testing.assert_close(target.log_prob(x), ref, rtol=1e-4, atol=1e-3)
    assert abs(float(x[:, 0].mean())) < 0.1 and abs(float(x[:, 0].std()) - 3.0) < 0.1
    # x_i / exp(x_0 / 2) is a standard normal
    z = x[:, 1:] / torch.exp(0.5 * x[:, :1])
    assert abs(float(z.std()) - 1.0) < 0.02


def test_manywell_log_z_by_quadrature() -> None:
    assert abs(manywell_log_z(16) - 164.6957) < 1e-3
    grid = np.linspace(-6, 6, 200_001)  # independent: trapezoid rule on a fine grid
    z1 = np.trapezoid(np.exp(-(grid**4) + 6 * grid**2 + 0.5 * grid), grid)
    assert abs(16 * (math.log(z1) + 0.5 * math.log(2 * math.pi)) - ManyWell().log_z) < 1e-6


def test_manywell_samples_match_density_histogram() -> None:
    target = ManyWell()
    x = target.sample(2000, GEN)  # 32000 draws of each coordinate type
    x1, x2 = x[:, 0::2].flatten().numpy(), x[:, 1::2].flatten()
    edges = np.linspace(-3, 3, 25)
    grid = np.linspace(-3, 3, 24_001)
    dens = np.exp(-(grid**4) + 6 * grid**2 + 0.5 * grid)
    cdf = np.concatenate([[0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(grid))])
    expected = np.diff(np.interp(edges, grid, cdf / cdf[-1]))
    observed = np.histogram(x1, edges)[0] / x1.size
    se = np.sqrt(expected * (1 - expected) / x1.size)
    assert np.all(np.abs(observed - expected) <= 5 * se + 1e-4)
    assert abs(float(x2.mean())) < 0.03 and abs(float(x2.var()) - 1) < 0.04
    # the log-density is log R: it differs from the normalised density by log Z
    pair = D.Normal(0.0, 1.0).log_prob(x[:, 1::2]).sum(-1) - 8 * math.log(2 * math.pi)
    assert torch.isfinite(target.log_prob(x) + pair).all()


def test_posterior9_is_gmm25_times_likelihood() -> None:
    target = Posterior9(prior=None)
    x = 6 * torch.randn(256, 2, generator=GEN)
    torch.testing.assert_close(
        target.log_prob(x), gmm25().log_prob(x) + target.log_likelihood(x), rtol=1e-4, atol=1e-4
    )
    ref = _mixture(target.means, target.std)
    torch.testing.assert_close(
        target.log_prob(x) - target.log_z, ref.log_prob(x), atol=1e-3, rtol=1e-4
    )
    assert target.log_z == pytest.approx(math.log(9 / 25))


def test_user_energy_checks_shape_and_nan() -> None:
    good = UserTarget(lambda x: 0.5 * x.square().sum(-1), dim=3)
    assert good.log_prob(torch.zeros(5, 3)).shape == (5,)
    with pytest.raises(ValueError, match="returned shape"):
        UserTarget(lambda x: x.square(), dim=3)
    with pytest.raises(ValueError, match="NaN"):
        UserTarget(lambda x: torch.full((x.shape[0],), float("nan")), dim=2)
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        good.log_prob(torch.zeros(5, 2))


def test_unknown_target_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="gmm25, funnel, manywell, gmm40, posterior9"):
        get_target("gmm26")
    with pytest.raises(ValueError, match="dim"):
        get_target("math:cos")


@pytest.mark.parametrize("make", [gmm25, lambda: gmm40(dim=5), Funnel, ManyWell])
def test_closed_form_score_equals_autograd(make) -> None:
    target = make()
    x = 2 * torch.randn(64, target.dim, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(target.score(x), Target.score(target, x), rtol=1e-4, atol=1e-4)
