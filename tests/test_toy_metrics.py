"""Metrics of §6 on cases with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from steer.toy.buffer import ReplayBuffer, mala
from steer.toy.metrics import check_sample_size, log_mean_exp, mmd_rbf, mode_masses, wasserstein2
from steer.toy.targets import gmm25

GEN = torch.Generator().manual_seed(0)


def test_w2_equals_brute_force_over_permutations() -> None:
    x, y = torch.randn(6, 2, generator=GEN), torch.randn(6, 2, generator=GEN)
    best = min(
        sum(float((x[i] - y[p]).square().sum()) for i, p in enumerate(perm))
        for perm in itertools.permutations(range(6))
    )
    assert wasserstein2(x, y) == pytest.approx(math.sqrt(best / 6), rel=1e-6)
    shift = torch.tensor([3.0, 4.0])
    assert wasserstein2(x, x + shift) == pytest.approx(5.0, rel=1e-6)


def test_w2_between_draws_of_one_distribution_shrinks_with_k() -> None:
    target = gmm25()
    w = [
        np.mean([wasserstein2(target.sample(k, GEN), target.sample(k, GEN)) for _ in range(3)])
        for k in (50, 800)
    ]
    assert w[1] < 0.6 * w[0]


def test_mmd_matches_an_explicit_double_sum_and_separates() -> None:
    x, y = torch.randn(30, 2, generator=GEN), torch.randn(25, 2, generator=GEN) + 0.5
    h = 1.3
    k = lambda a, b: math.exp(-float((a - b).square().sum()) / (2 * h * h))  # noqa: E731
    mean = lambda a, b: sum(k(p, q) for p in a for q in b) / (len(a) * len(b))  # noqa: E731
    ref = math.sqrt(mean(x, x) + mean(y, y) - 2 * mean(x, y))
    assert mmd_rbf(x, y, bandwidth=h) == pytest.approx(ref, rel=1e-6)
    same = mmd_rbf(torch.randn(500, 2, generator=GEN), torch.randn(500, 2, generator=GEN))
    far = mmd_rbf(torch.randn(500, 2, generator=GEN), torch.randn(500, 2, generator=GEN) + 2)
    assert same < 0.1 < far


def test_log_mean_exp_and_mode_masses() -> None:
    w = torch.tensor([0.0, math.log(3.0)])
    assert float(log_mean_exp(w)) == pytest.approx(math.log(2.0))
    target = gmm25()
    exact = mode_masses(target.sample(2000, GEN), *target.mixture())
    assert exact["modes_covered"] == 25 and exact["mode_mass_max_error"] < 0.02
    collapsed = mode_masses(torch.zeros(2000, 2), *target.mixture())
    assert collapsed["modes_covered"] == 1 and not collapsed["mode_mass_within_4se"]


def test_metrics_sample_size_beyond_memory_raises_with_the_limit() -> None:
    with pytest.raises(ValueError, match=r"the limit is K <= \d+"):
        check_sample_size(10**9)
    with pytest.raises(ValueError, match="K must be an integer >= 2"):
        check_sample_size(1)


def test_mala_samples_a_gaussian_and_buffer_prioritises_rank() -> None:
    log_p = lambda x: -0.5 * (x - 2).square().sum(-1)  # noqa: E731
    x, lp, eta = mala(log_p, torch.zeros(2000, 1), steps=150, step_size=0.1, generator=GEN)
    assert abs(float(x.mean()) - 2) < 0.1 and abs(float(x.var()) - 1) < 0.15
    torch.testing.assert_close(lp, log_p(x))
    buf = ReplayBuffer(1, capacity=1000, kind="rank")
    vals = torch.arange(1000.0)
    buf.add(vals[:, None], vals)
    xs, _ = buf.sample(4000, GEN)
    assert float(xs.mean()) > 700  # top ranks drawn far more often than uniform (mean 500)
    with pytest.raises(ValueError, match="non-finite"):
        buf.add(torch.zeros(1, 1), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="uniform"):
        ReplayBuffer(1, kind="prioritised")


def test_buffer_rank_probabilities_and_ring_overwrite() -> None:
    """Rank sampling follows ``p_i ∝ 1 / (kN + rank_i)`` (checked against the formula on a
    small buffer), and a full buffer overwrites its oldest entries first."""
    buf = ReplayBuffer(1, capacity=10, kind="rank", k=0.5)
    rewards = torch.tensor([3.0, -1.0, 7.0, 0.0, 5.0, 2.0, 9.0, -4.0, 1.0, 6.0])
    buf.add(rewards[:, None], rewards)
    ranks = torch.argsort(torch.argsort(rewards, descending=True))
    expected = 1.0 / (0.5 * 10 + ranks.double())
    expected /= expected.sum()
    xs, _ = buf.sample(200_000, torch.Generator().manual_seed(1))
    freq = torch.stack([(xs[:, 0] == r).double().mean() for r in rewards])
    torch.testing.assert_close(freq, expected, atol=4e-3, rtol=0)
    buf.add(torch.tensor([[100.0], [101.0], [102.0]]), torch.tensor([100.0, 101.0, 102.0]))
    assert len(buf) == 10 and set(buf.x[:3, 0].tolist()) == {100.0, 101.0, 102.0}
    assert buf.x[3:, 0].tolist() == rewards[3:].tolist()
