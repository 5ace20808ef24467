"""Rejection sampling from the prior against closed-form posteriors (:mod:`steer.exact`).

The prior is a Gaussian mixture ``Σ_i w_i N(μ_i, σ²)`` and the likelihood a Gaussian bump
``r(x) = exp(-(x - m)² / 2s²) <= 1``. Then everything is closed-form:
``Z = Σ_i w_i s / sqrt(s² + σ²) exp(-(μ_i - m)² / 2(s² + σ²))``, the posterior is a mixture
with weights ``π_i ∝`` the summands, each component ``N(v (μ_i/σ² + m/s²), v)`` with
``v = 1 / (1/σ² + 1/s²)``, and ``E_prior[r²]`` is ``Z`` with ``s → s/√2``.
The posterior weights are checked through the prior responsibilities of the samples: since
``r`` cancels in the posterior's own responsibilities, ``E_post[resp_i(x)] = π_i`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from steer.exact import (
    RejectionResult,
    TooFewAccepted,
    log_mean_exp_stderr,
    rejection_sample,
)

W, MU, SIGMA = torch.tensor([0.3, 0.7]), torch.tensor([-2.0, 2.0]), 0.5  # 1-d prior
M, S = -0.5, 1.5  # likelihood bump


def mixture_draw(weights: Tensor, means: Tensor, std: float) -> Callable:
    """``draw(n, g)``: ``[n]`` for 1-d ``means [K]``, ``[n, d]`` for ``means [K, d]``."""

    def draw(n: int, generator: torch.Generator) -> Tensor:
        idx = torch.multinomial(weights, n, replacement=True, generator=generator)  # [n]
        return means[idx] + std * torch.randn(n, *means.shape[1:], generator=generator)

    return draw


def bump(m: float, s: float, coord: int | None = None) -> Callable[[Tensor], Tensor]:
    """``log r(x) = -(x - m)² / 2s²`` (of coordinate ``coord`` for ``x [n, d]``)."""

    def log_r(x: Tensor) -> Tensor:
        y = x if coord is None else x[:, coord]
        return -((y - m) ** 2) / (2 * s**2)

    return log_r


def closed_form(
    w: Tensor, mu: Tensor, sigma: float, m: float, s: float
) -> tuple[Tensor, Tensor, float, float]:
    """Posterior weights ``[K]``, component means ``[K]``, component variance, ``log Z``."""
    c = w * s / math.sqrt(s**2 + sigma**2) * torch.exp(-((mu - m) ** 2) / (2 * (s**2 + sigma**2)))
    v = 1 / (1 / sigma**2 + 1 / s**2)
    return c / c.sum(), v * (mu / sigma**2 + m / s**2), v, math.log(float(c.sum()))


def responsibilities(x: Tensor, w: Tensor, means: Tensor, std: float) -> Tensor:
    """Prior responsibilities ``[N, K]`` of samples ``x [N]`` or ``[N, d]``."""
    x = x.reshape(len(x), -1)
    means = means.reshape(len(means), -1)
    return torch.softmax(w.log() - torch.cdist(x, means).square() / (2 * std**2), dim=-1)


def assert_weights(res: RejectionResult, w: Tensor, means: Tensor, std: float, want: Tensor):
    resp = responsibilities(res.samples, w, means, std)  # [N, K]
    se = resp.std(0) / math.sqrt(len(resp))  # [K]
    assert ((resp.mean(0) - want).abs() < 4 * se).all(), (resp.mean(0), want, se)


def test_gaussian_mixture_posterior_and_log_z_match_the_closed_form() -> None:
    n = 4000
    draw, log_r = mixture_draw(W, MU, SIGMA), bump(M, S)
    res = rejection_sample(draw, log_r, n, generator=torch.Generator().manual_seed(0))
    pi, means, v, log_z = closed_form(W, MU, SIGMA, M, S)
    assert res.samples.shape == (n,) and res.log_reward.shape == (n,)
    assert res.num_accepted >= n and res.num_drawn > res.num_accepted
    assert res.acceptance_rate == res.num_accepted / res.num_drawn
    torch.testing.assert_close(res.log_reward, log_r(res.samples))
    # 1. mixture weights, mean and variance of the posterior, each within 4 standard errors
    assert_weights(res, W, MU, SIGMA, pi)
    mean = float((pi * means).sum())
    var = float((pi * (v + means**2)).sum()) - mean**2
    x = res.samples.double()
    assert abs(float(x.mean()) - mean) < 4 * math.sqrt(var / n)
    mu4 = float((x - x.mean()).pow(4).mean())
    assert abs(float(x.var()) - var) < 4 * math.sqrt((mu4 - var**2) / n)
    # 2. log Z within 4 reported errors, and the error is the delta method's with the true
    #    Var_prior(r) = E[r²] - Z² (E[r²]: Z with s/√2)
    assert abs(res.log_z - log_z) < 4 * res.log_z_stderr
    log_z2 = closed_form(W, MU, SIGMA, M, S / math.sqrt(2))[3]
    true_se = math.sqrt((math.exp(log_z2) - math.exp(2 * log_z)) / res.num_drawn) / math.exp(log_z)
    assert res.log_z_stderr == pytest.approx(true_se, rel=0.1)
    assert res.acceptance_rate == pytest.approx(math.exp(log_z), abs=4 * math.sqrt(0.25 / n))


def test_reported_stderr_matches_the_spread_over_independent_runs() -> None:
    draw, log_r = mixture_draw(W, MU, SIGMA), bump(M, S)
    runs = [
        rejection_sample(draw, log_r, 200, generator=torch.Generator().manual_seed(100 + i))
        for i in range(20)
    ]
    log_zs = torch.tensor([r.log_z for r in runs], dtype=torch.float64)
    reported = sum(r.log_z_stderr for r in runs) / len(runs)
    assert 0.5 * reported < float(log_zs.std()) < 2 * reported, (float(log_zs.std()), reported)
    # and the runs scatter around the truth
    log_z = closed_form(W, MU, SIGMA, M, S)[3]
    assert abs(float(log_zs.mean()) - log_z) < 4 * reported / math.sqrt(len(runs))


def test_two_dimensional_mixture_with_a_likelihood_in_one_coordinate() -> None:
    w = torch.tensor([0.2, 0.5, 0.3])
    means, std = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]]), 0.7
    n = 3000
    res = rejection_sample(
        mixture_draw(w, means, std),
        bump(2.5, 1.0, coord=1),
        n,
        batch_size=500,
        generator=torch.Generator().manual_seed(1),
    )
    assert res.samples.shape == (n, 2)
    pi, _, _, log_z = closed_form(w, means[:, 1], std, 2.5, 1.0)  # the likelihood sees x[:, 1]
    assert_weights(res, w, means, std, pi)
    assert abs(res.log_z - log_z) < 4 * res.log_z_stderr


def test_log_bound_admits_a_reward_bounded_by_two() -> None:
    draw, log_r = mixture_draw(W, MU, SIGMA), bump(M, S)
    pi, _, _, log_z = closed_form(W, MU, SIGMA, M, S)
    n = 2000
    plain = rejection_sample(draw, log_r, n, generator=torch.Generator().manual_seed(2))
    # r2 = 2 r <= 2 with log_bound = log 2: the same acceptances draw for draw, log Z + log 2
    doubled = rejection_sample(
        draw,
        lambda x: log_r(x) + math.log(2),
        n,
        generator=torch.Generator().manual_seed(2),
        log_bound=math.log(2),
    )
    torch.testing.assert_close(doubled.samples, plain.samples)
    assert doubled.num_drawn == plain.num_drawn
    assert doubled.log_z == pytest.approx(plain.log_z + math.log(2), abs=1e-6)  # float32 r
    assert doubled.log_z_stderr == pytest.approx(plain.log_z_stderr, rel=1e-5)
    assert abs(doubled.log_z - (log_z + math.log(2))) < 4 * doubled.log_z_stderr
    torch.testing.assert_close(doubled.log_reward, plain.log_reward + math.log(2))
    # a loose bound (r <= 1 declared as <= 2): half the acceptance rate, the same posterior
    loose = rejection_sample(
        draw, log_r, n, generator=torch.Generator().manual_seed(3), log_bound=math.log(2)
    )
    assert loose.acceptance_rate == pytest.approx(math.exp(log_z) / 2, abs=0.03)
    assert_weights(loose, W, MU, SIGMA, pi)
    assert abs(loose.log_z - log_z) < 4 * loose.log_z_stderr


def test_a_reward_above_the_bound_raises_with_the_maximum() -> None:
    draw = mixture_draw(W, MU, SIGMA)
    with pytest.raises(ValueError, match=r"log r = 0\.75 .*needs r <= 1.*log_bound"):
        rejection_sample(draw, lambda x: torch.full_like(x, 0.75), 10)
    # within the rounding tolerance it passes; with the bound declared it passes
    rejection_sample(draw, lambda x: torch.full_like(x, 5e-7), 10)
    rejection_sample(draw, lambda x: torch.full_like(x, 0.75), 10, log_bound=0.75)
    with pytest.raises(ValueError, match="log r = 1.5"):
        rejection_sample(draw, lambda x: torch.full_like(x, 1.5), 10, log_bound=1.0)


def test_nan_log_rewards_raise_with_their_count() -> None:
    def log_r(x: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        out[[1, 4, 7]] = math.nan
        return out

    with pytest.raises(ValueError, match="NaN for 3 of 64 samples"):
        rejection_sample(mixture_draw(W, MU, SIGMA), log_r, 10, batch_size=64)


def test_wrong_shapes_and_arguments_raise() -> None:
    draw = mixture_draw(W, MU, SIGMA)
    with pytest.raises(ValueError, match=r"log_reward must return a tensor \[n\]=\[8\]"):
        rejection_sample(draw, lambda x: x[:, None], 4, batch_size=8)
    with pytest.raises(ValueError, match=r"must return a tensor \[8, \.\.\.\]"):
        rejection_sample(lambda n, g: torch.zeros(n + 1), bump(M, S), 4, batch_size=8)
    for bad in ({"batch_size": 0}, {"max_draws": 0}, {"log_bound": math.inf}):
        with pytest.raises(ValueError):
            rejection_sample(draw, bump(M, S), 4, **bad)
    with pytest.raises(ValueError, match="num_samples"):
        rejection_sample(draw, bump(M, S), 0)


def test_too_few_accepted_raises_with_counts_and_the_partial_result() -> None:
    draw = mixture_draw(W, MU, SIGMA)

    def log_r(x: Tensor) -> Tensor:  # r = 0.01: an acceptance rate of 1%
        return torch.full_like(x, math.log(0.01))

    with pytest.raises(TooFewAccepted) as info:
        rejection_sample(
            draw, log_r, 100, max_draws=1000, batch_size=300, generator=torch.Generator()
        )
    err = info.value
    assert isinstance(err, RuntimeError)
    part = err.result
    assert part.num_drawn == 1000 and 0 < part.num_accepted < 100
    assert part.samples.shape == (part.num_accepted,)
    assert part.log_reward.shape == (part.num_accepted,)
    msg = str(err)
    assert "drew 1000 samples" in msg and f"accepted {part.num_accepted}," in msg
    assert f"acceptance rate {part.acceptance_rate:.3g}" in msg
    needed = math.ceil(100 / part.acceptance_rate)
    assert f"raise max_draws to about num_samples / rate = {needed}" in msg
    assert part.log_z == pytest.approx(math.log(0.01))  # r is constant: log Z exactly
    # none accepted: the advice comes from the mean of r over the draws
    with pytest.raises(TooFewAccepted, match=r"accepted 0,.*about num_samples / rate = 1e\+31"):
        rejection_sample(draw, lambda x: torch.full_like(x, -30 * math.log(10)), 10, max_draws=50)
    # r = 0 everywhere: nothing to raise max_draws to
    with pytest.raises(TooFewAccepted, match="every draw had r = 0") as info:
        rejection_sample(draw, lambda x: torch.full_like(x, -math.inf), 10, max_draws=50)
    assert info.value.result.samples.shape == (0,) and info.value.result.log_z == -math.inf


def test_the_same_seed_gives_the_same_samples() -> None:
    draw, log_r = mixture_draw(W, MU, SIGMA), bump(M, S)

    def run(seed: int) -> RejectionResult:
        return rejection_sample(
            draw, log_r, 300, batch_size=64, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.samples, b.samples) and a.log_z == b.log_z and a.num_drawn == b.num_drawn
    assert not torch.equal(a.samples, c.samples)
    torch.manual_seed(9)  # no generator: seeded from torch's global generator
    d = rejection_sample(draw, log_r, 50)
    torch.manual_seed(9)
    assert torch.equal(d.samples, rejection_sample(draw, log_r, 50).samples)


def test_streamed_log_z_equals_the_one_shot_estimate_over_every_draw(capsys) -> None:
    seen: list[Tensor] = []

    def log_r(x: Tensor) -> Tensor:
        out = bump(M, S)(x)
        seen.append(out)
        return out

    res = rejection_sample(
        mixture_draw(W, MU, SIGMA),
        log_r,
        500,
        batch_size=37,  # ragged batches, each merged into the running mean
        generator=torch.Generator().manual_seed(4),
        progress=True,
    )
    every = torch.cat(seen)
    assert len(every) == res.num_drawn and res.num_drawn % 37 == 0
    log_mean, stderr = log_mean_exp_stderr(every)
    assert res.log_z == pytest.approx(log_mean, abs=1e-12)
    assert res.log_z_stderr == pytest.approx(stderr, rel=1e-9)
    assert "rejection" in capsys.readouterr().err  # the tqdm bar


def test_log_mean_exp_stderr_closed_values_and_stability() -> None:
    log_mean, se = log_mean_exp_stderr(torch.tensor([0.2, 0.4, 0.6]).log())
    assert log_mean == pytest.approx(math.log(0.4))
    assert se == pytest.approx(0.2 / math.sqrt(3) / 0.4)
    # far below exp's range: the shift keeps it exact
    log_mean, se = log_mean_exp_stderr(
        torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64).log() - 2000
    )
    assert log_mean == pytest.approx(math.log(0.4) - 2000)
    assert se == pytest.approx(0.2 / math.sqrt(3) / 0.4)
    assert log_mean_exp_stderr(torch.tensor([-1.0, -math.inf])) == pytest.approx(
        (math.log(math.exp(-1) / 2), 1.0)  # r = (e^-1, 0): std e^-1/√2, se e^-1/2, mean e^-1/2
    )
    assert log_mean_exp_stderr(torch.tensor([0.0])) == (0.0, math.inf)
    assert log_mean_exp_stderr(torch.full((3,), -math.inf)) == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="empty"):
        log_mean_exp_stderr(torch.tensor([]))
    with pytest.raises(ValueError, match="1 NaN"):
        log_mean_exp_stderr(torch.tensor([0.0, math.nan]))
