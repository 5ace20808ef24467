"""Policies, sampler and the objectives of steer.objectives on enumerated DAGs: residuals vanish
at the exact optimum, the sampler samples the enumerated distribution, training converges."""

from __future__ import annotations

import math

import pytest
import torch

from steer.discrete import (
    DAG_OBJECTIVES,
    BayesNetStructure,
    DAGTrainConfig,
    HyperGrid,
    MLPPolicy,
    PolicyTable,
    TabularPolicy,
    corrected_reward,
    discrete_loss,
    sample_trajectories,
    soft_bellman,
    terminating_distribution,
    total_variation,
    train,
    trajectories_from_states,
    transition_loss,
)
from steer.discrete.env import DAGEnvironment


@pytest.fixture(scope="module")
def grid() -> HyperGrid:
    return HyperGrid(8, 2)


@pytest.fixture(scope="module")
def bn() -> BayesNetStructure:
    return BayesNetStructure(4, seed=0, temperature=4.0)


def _optimal_table(env: DAGEnvironment, log_pb: torch.Tensor) -> PolicyTable:
    """The exact GFlowNet: π* of the corrected reward, F(s) = exp V(s), Z = exp V(s0)."""
    sol = soft_bellman(env, corrected_reward(env, log_pb))
    return PolicyTable(log_pf=sol.log_policy, log_flow=sol.v, log_z=sol.v[0])


@pytest.mark.parametrize("kind", ["uniform", "random"])
def test_every_residual_vanishes_at_the_exact_optimum(grid: HyperGrid, kind: str) -> None:
    log_pb = grid.log_backward(kind, generator=torch.Generator().manual_seed(0))
    table = _optimal_table(grid, log_pb)
    gen = torch.Generator().manual_seed(1)
    traj = sample_trajectories(grid, table.log_pf, 256, log_pb, epsilon=0.3, generator=gen)
    for objective in DAG_OBJECTIVES:
        assert float(discrete_loss(objective, grid, table, traj)) < 1e-20, objective
    for objective in ("db", "soft_q", "modified_db"):
        assert float(transition_loss(objective, grid, table, log_pb)) < 1e-20, objective
    # a perturbed policy is not optimal: the losses see it
    bad = PolicyTable(torch.log_softmax(table.log_pf * 1.1, 1), table.log_flow, table.log_z)
    rescored = trajectories_from_states(grid, traj.latents, bad.log_pf, log_pb)
    for objective in DAG_OBJECTIVES:
        assert float(discrete_loss(objective, grid, bad, rescored)) > 1e-6, objective


def test_sampler_matches_enumerated_distribution() -> None:
    env = HyperGrid(4, 2)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(env.valid.shape, generator=gen, dtype=torch.float64)
    log_pf = torch.log_softmax(logits.masked_fill(~env.valid, float("-inf")), dim=1)
    traj = sample_trajectories(env, log_pf, 40_000, generator=gen)
    counts = torch.bincount(traj.extras["final"], minlength=env.num_states).double()
    assert total_variation(counts / counts.sum(), terminating_distribution(env, log_pf)) < 0.015
    # lengths: number of moves (= level of x) plus the exit; padded steps are zero
    assert torch.equal(traj.extras["lengths"], env.level[traj.extras["final"]] + 1)
    assert bool((traj.log_pf[~traj.extras["real"]] == 0).all())
    # re-scoring the states recovers the same actions and log-probabilities
    again = trajectories_from_states(env, traj.latents, log_pf)
    assert torch.equal(again.extras["actions"], traj.extras["actions"])
    assert torch.allclose(again.log_pf, traj.log_pf)


def test_policy_modules_tables(bn: BayesNetStructure) -> None:
    for module in (TabularPolicy(bn, "q"), MLPPolicy(bn, hidden=16, parametrization="q")):
        table = module()
        assert table.log_pf.shape == (543, 13)
        assert bool(torch.isinf(table.log_pf[~bn.valid]).all())
        assert torch.allclose(table.log_pf.exp().sum(1), torch.ones(543), atol=1e-5)
        assert torch.allclose(table.log_z, table.log_flow[0])  # Z = exp V(s0)
    with pytest.raises(ValueError, match="parametrization must be one of"):
        TabularPolicy(bn, "v")


def test_bad_training_arguments(grid: HyperGrid) -> None:
    with pytest.raises(ValueError, match="objective must be one of"):
        train(grid, "ppo")
    with pytest.raises(ValueError, match="mode='exact' needs a transition objective"):
        train(grid, "tb", config=DAGTrainConfig(mode="exact", steps=1))
    with pytest.raises(ValueError, match="needs a policy with parametrization='q'"):
        train(grid, "pcl", TabularPolicy(grid), DAGTrainConfig(steps=1))
    with pytest.raises(ValueError, match="epsilon must be in"):
        sample_trajectories(grid, TabularPolicy(grid)().log_pf, 4, epsilon=2.0)


@pytest.mark.slow
@pytest.mark.parametrize("env_name", ["grid", "bn"])
@pytest.mark.parametrize("objective", DAG_OBJECTIVES)
def test_training_reaches_target(
    objective: str, env_name: str, request: pytest.FixtureRequest
) -> None:
    env = request.getfixturevalue(env_name)
    result = train(env, objective)
    assert result.tv <= 0.02, f"{objective} on {env_name}: TV {result.tv:.4f}"
    assert math.isfinite(result.losses[-1]) and result.losses[-1] < result.losses[0]


@pytest.mark.slow
def test_mlp_training_reaches_target(grid: HyperGrid) -> None:
    result = train(grid, "tb", "mlp")
    assert result.tv <= 0.02
