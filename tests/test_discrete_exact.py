"""Exact solvers of steer.discrete against brute-force enumeration of trajectories (§4)."""

from __future__ import annotations

import math

import pytest
import torch

from steer import objectives as obj
from steer.discrete import (
    BayesNetStructure,
    HyperGrid,
    corrected_reward,
    kl_regularised_reward,
    path_consistency_residual,
    scatter_logsumexp,
    soft_bellman,
    terminating_distribution,
    total_variation,
    trajectories_from_states,
    uncorrected_reward,
)
from steer.discrete.env import DAGEnvironment

ENVS = {
    "grid": lambda: HyperGrid(5, 2),
    "grid3": lambda: HyperGrid(3, 3),
    "bn": lambda: BayesNetStructure(3, seed=2, temperature=0.5),
}


@pytest.fixture(scope="module", params=list(ENVS))
def env(request: pytest.FixtureRequest) -> DAGEnvironment:
    return ENVS[request.param]()


def _random_log_policy(env: DAGEnvironment, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(env.valid.shape, generator=gen, dtype=torch.float64) * 2
    return torch.log_softmax(logits.masked_fill(~env.valid, float("-inf")), dim=1)


def _brute_terminating(env: DAGEnvironment, log_pf: torch.Tensor) -> torch.Tensor:
    """Σ over every enumerated trajectory of P_F(τ), grouped by final state (independent)."""
    traj = trajectories_from_states(env, env.all_trajectories(), log_pf)
    probs = traj.log_pf.sum(1).exp()
    return torch.zeros(env.num_states, dtype=torch.float64).index_add(
        0, traj.extras["final"], probs
    )


def test_scatter_logsumexp_matches_dense() -> None:
    values = torch.randn(50, dtype=torch.float64) * 30
    index = torch.randint(0, 7, (50,))
    out = scatter_logsumexp(values, index, 9)
    for i in range(9):
        picked = values[index == i]
        expected = torch.logsumexp(picked, 0) if picked.numel() else torch.tensor(-math.inf)
        assert torch.allclose(out[i], expected.double()) or (out[i] == expected == -math.inf)


def test_terminating_distribution_matches_enumeration(env: DAGEnvironment) -> None:
    log_pf = _random_log_policy(env, 0)
    p = terminating_distribution(env, log_pf)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    assert torch.allclose(p, _brute_terminating(env, log_pf), atol=1e-14)


def test_soft_bellman_policy_is_exp_of_path_reward(env: DAGEnvironment) -> None:
    """π*(τ) = exp(Σ_t r - V(s0)) for every trajectory (soft Bellman, §4)."""
    gen = torch.Generator().manual_seed(1)
    reward = torch.randn(env.valid.shape, generator=gen, dtype=torch.float64)
    reward = reward.masked_fill(~env.valid, float("-inf"))
    sol = soft_bellman(env, reward)
    traj = trajectories_from_states(env, env.all_trajectories(), sol.log_policy)
    src, acts, real = traj.latents[:, :-1], traj.extras["actions"], traj.extras["real"]
    total = torch.where(real, reward[src, acts], 0.0).sum(1)
    assert torch.allclose(traj.log_pf.sum(1), total - sol.v[0], atol=1e-12)
    assert torch.allclose(torch.logsumexp(total, 0), sol.v[0])


def test_41_uncorrected_reaches_path_count_tilt(env: DAGEnvironment) -> None:
    p = terminating_distribution(env, soft_bellman(env, uncorrected_reward(env)).log_policy)
    biased = env.log_path_counts.exp() * env.log_reward.exp()
    assert total_variation(p, biased / biased.sum()) <= 1e-9
    assert total_variation(p, env.target()) > 0.05  # not the target: the DAG is not a tree


@pytest.mark.parametrize("kind", ["uniform", "path_count", "random"])
def test_42_corrected_reaches_target(env: DAGEnvironment, kind: str) -> None:
    log_pb = env.log_backward(kind, generator=torch.Generator().manual_seed(3))
    sol = soft_bellman(env, corrected_reward(env, log_pb))
    assert total_variation(terminating_distribution(env, sol.log_policy), env.target()) <= 1e-9
    assert math.isclose(float(sol.v[0]), float(torch.logsumexp(env.log_reward, 0)), rel_tol=1e-12)
    if kind == "path_count":  # maximal trajectory entropy: π*(τ | x) = 1 / n(x)
        traj = trajectories_from_states(env, env.all_trajectories(), sol.log_policy)
        final = traj.extras["final"]
        log_cond = traj.log_pf.sum(1) - torch.log(env.target()[final])
        assert torch.allclose(log_cond, -env.log_path_counts[final], atol=1e-10)


def test_44_kl_regularised_reaches_prior_tilt(env: DAGEnvironment) -> None:
    prior = _random_log_policy(env, 4)
    p = terminating_distribution(
        env, soft_bellman(env, kl_regularised_reward(env, prior)).log_policy
    )
    tilt = _brute_terminating(env, prior) * env.log_reward.exp()
    assert total_variation(p, tilt / tilt.sum()) <= 1e-9


def test_43_pcl_residual_is_tb_residual(env: DAGEnvironment) -> None:
    log_pb = env.log_backward("random", generator=torch.Generator().manual_seed(5))
    log_pi = _random_log_policy(env, 6)
    v0 = torch.tensor(0.37, dtype=torch.float64)
    traj = trajectories_from_states(env, env.all_trajectories(), log_pi, log_pb)
    reward = corrected_reward(env, log_pb)
    src, acts, real = traj.latents[:, :-1], traj.extras["actions"], traj.extras["real"]
    pcl = path_consistency_residual(v0, traj.log_pf, torch.where(real, reward[src, acts], 0.0))
    log_r = env.log_reward[traj.extras["final"]]
    tb = obj.trajectory_balance(traj.log_pf, traj.log_pb, log_r, v0)
    assert torch.allclose(pcl, tb, atol=1e-12)
    assert float((pcl - pcl.mean()).abs().max()) > 1e-3  # a non-trivial comparison


def test_solvers_are_differentiable() -> None:
    env = HyperGrid(4, 2)
    logits = torch.zeros(env.valid.shape, dtype=torch.float64, requires_grad=True)
    log_pf = torch.log_softmax(logits.masked_fill(~env.valid, float("-inf")), dim=1)
    p = terminating_distribution(env, log_pf)
    (p * env.log_reward).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bad_tables_raise() -> None:
    env = HyperGrid(3, 2)
    with pytest.raises(ValueError, match=r"log_pf must be \[N, K\+1\]=\[9, 3\], got \[9, 2\]"):
        terminating_distribution(env, torch.zeros(9, 2))
    with pytest.raises(ValueError, match="reward has NaN"):
        soft_bellman(env, torch.full((9, 3), float("nan")))
    with pytest.raises(TypeError, match="log_pf must be a torch.Tensor"):
        terminating_distribution(env, [[0.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"log_pi and reward must both be \[B, T\]"):
        path_consistency_residual(torch.tensor(0.0), torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="p and q must have one shape"):
        total_variation(torch.ones(3), torch.ones(4))
