"""Environments of steer.discrete: enumeration, path counts, rewards, scores, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from sklearn.linear_model import LinearRegression

from steer.discrete import BayesNetStructure, HyperGrid, bic_local_score, count_dags


@pytest.fixture(scope="module")
def bn() -> BayesNetStructure:
    return BayesNetStructure(4, seed=0)


def test_hypergrid_states_children_and_path_counts() -> None:
    env = HyperGrid(side=5, dim=3)
    assert env.num_states == 125 and env.num_moves == 3 and env.max_length == 13
    for s in range(env.num_states):
        x = env.coords[s]
        for d in range(3):
            kid = int(env.child[s, d])
            if x[d] == 4:
                assert kid == -1
            else:
                assert torch.equal(env.coords[kid] - x, torch.eye(3, dtype=torch.long)[d])
        a, b, c = (int(v) for v in x)
        n = math.comb(a + b + c, a) * math.comb(b + c, b)  # multinomial, independent of lgamma
        assert math.isclose(float(env.log_path_counts[s].exp()), n, rel_tol=1e-12)
        assert int(env.num_parents[s]) == int((x > 0).sum())


def test_hypergrid_standard_reward_values() -> None:
    env = HyperGrid(side=8, dim=2)
    by_coord = {tuple(int(v) for v in env.coords[i]): float(env.energy[i]) for i in range(64)}
    # |x/7 - 0.5|: x=0 -> 0.5 (outer only), x=1 -> 0.357 (outer and inner), x=3 -> 0.071 (none)
    expected = {
        (0, 0): 0.501,
        (1, 1): 2.501,
        (1, 6): 2.501,
        (0, 1): 0.501,
        (3, 3): 1e-3,
        (0, 3): 1e-3,
        (7, 7): 0.501,
    }
    for coord, reward in expected.items():
        assert math.isclose(math.exp(-by_coord[coord]), reward, rel_tol=1e-12), coord
    assert torch.allclose(env.target().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_hypergrid_user_energy_and_nan() -> None:
    env = HyperGrid(4, 2, energy=lambda x: (x.double() - 1.5).square().sum(1))
    assert math.isclose(float(env.energy[0]), 4.5)

    def bad(x: torch.Tensor) -> torch.Tensor:
        e = x.double().sum(1)
        return torch.where((x[:, 0] == 1) & (x[:, 1] == 2), float("nan"), e)

    with pytest.raises(ValueError, match=r"nan at state \(1,2\)"):
        HyperGrid(4, 2, energy=bad)
    with pytest.raises(ValueError, match="one value per state"):
        HyperGrid(4, 2, energy=lambda x: torch.zeros(3))


def test_too_large_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"1,000,000,000,000 states.*max_states=200,000"):
        HyperGrid(side=1000, dim=4)
    with pytest.raises(ValueError, match=r"1,138,779,265 states.*max_states"):
        BayesNetStructure(num_variables=7)
    with pytest.raises(ValueError, match="side must be an integer >= 2, got 1"):
        HyperGrid(side=1)
    with pytest.raises(ValueError, match="kind must be one of"):
        HyperGrid(3, 2).log_backward("bogus")
    with pytest.raises(ValueError, match="trajectories, more than the enumeration limit"):
        HyperGrid(8, 2).all_trajectories(max_trajectories=1000)


def test_count_dags_sequence() -> None:
    assert [count_dags(d) for d in range(7)] == [1, 1, 3, 25, 543, 29281, 3781503]


def _acyclic(adj: torch.Tensor) -> bool:
    return bool(torch.linalg.matrix_power(adj.double(), adj.shape[0]).abs().sum() == 0)


def test_bayesnet_enumeration(bn: BayesNetStructure) -> None:
    assert bn.num_states == 543
    adjs = [bn.adjacency(i) for i in range(bn.num_states)]
    assert all(_acyclic(a) for a in adjs)
    assert len({tuple(a.flatten().tolist()) for a in adjs}) == 543
    # every 12-bit acyclic graph is present (brute force over all 4096 masks)
    brute = 0
    for bits in itertools.product([0, 1], repeat=12):
        adj = torch.zeros(4, 4, dtype=torch.bool)
        adj[~torch.eye(4, dtype=torch.bool)] = torch.tensor(bits, dtype=torch.bool)
        brute += _acyclic(adj)
    assert brute == 543
    # children: one per absent edge whose addition keeps the graph acyclic
    for s in range(0, bn.num_states, 17):
        for e, (i, j) in enumerate(bn.pairs):
            adj = adjs[s].clone()
            ok = not bool(adj[i, j]) and _acyclic(
                adj.index_put((torch.tensor(i), torch.tensor(j)), torch.tensor(True))
            )
            assert (int(bn.child[s, e]) >= 0) == ok
    # n(G) = |E(G)|!: every order of adding a DAG's edges stays acyclic
    counts = torch.tensor([math.factorial(int(a.sum())) for a in adjs], dtype=torch.float64)
    assert torch.allclose(bn.log_path_counts.exp(), counts, rtol=1e-12)
    assert float(bn.energy.min()) == 0.0


def test_bic_local_score_matches_independent_regression(bn: BayesNetStructure) -> None:
    data = bn.data
    n = data.shape[0]
    for node, parents in [(0, []), (1, [0]), (2, [0, 3]), (3, [0, 1, 2])]:
        if parents:
            reg = LinearRegression().fit(data[:, parents].numpy(), data[:, node].numpy())
            mean = torch.as_tensor(reg.predict(data[:, parents].numpy()))
        else:
            mean = data[:, node].mean().expand(n)
        sigma = (data[:, node] - mean).square().mean().sqrt()
        loglik = torch.distributions.Normal(mean, sigma).log_prob(data[:, node]).sum()
        expected = float(loglik) - 0.5 * (len(parents) + 2) * math.log(n)
        assert math.isclose(bic_local_score(data, node, parents), expected, rel_tol=1e-9)


def test_bayesnet_energy_is_total_bic(bn: BayesNetStructure) -> None:
    def bic(index: int) -> float:
        adj = bn.adjacency(index)
        return sum(
            bic_local_score(bn.data, j, torch.nonzero(adj[:, j]).flatten().tolist())
            for j in range(4)
        )

    scores = torch.tensor([bic(i) for i in range(0, 543, 31)], dtype=torch.float64)
    energies = bn.energy[0:543:31]
    assert torch.allclose(energies - energies[0], -(scores - scores[0]), atol=1e-9)


@pytest.mark.parametrize("kind", ["uniform", "path_count", "random"])
def test_backward_policies_are_distributions(kind: str) -> None:
    for env in (HyperGrid(5, 2), BayesNetStructure(3, seed=1)):
        log_pb = env.log_backward(kind, generator=torch.Generator().manual_seed(0))
        src, act, dst = env.edges
        totals = torch.zeros(env.num_states, dtype=torch.float64)
        totals.index_add_(0, dst, log_pb[src, act].exp())
        assert torch.allclose(totals[1:], torch.ones(env.num_states - 1, dtype=torch.float64))
        assert bool(torch.isinf(log_pb[env.child < 0]).all())
        if kind == "path_count":
            n = env.log_path_counts.exp()
            assert torch.allclose(log_pb[src, act].exp(), n[src] / n[dst])


def test_all_trajectories_counts() -> None:
    env = HyperGrid(4, 2)
    paths = env.all_trajectories()
    assert paths.shape == (int(round(float(env.log_path_counts.exp().sum()))), env.max_length + 1)
    assert len({tuple(p.tolist()) for p in paths}) == paths.shape[0]
    finals = torch.bincount(paths[:, -1], minlength=env.num_states).double()
    assert torch.allclose(finals, env.log_path_counts.exp())


def test_env_does_not_import_the_exact_solvers() -> None:
    """No import circle: env.py (path counts, random P_B) needs only steer.ops; exact.py
    imports env and re-exports forward_log_flow and scatter_logsumexp from there."""
    import ast
    import inspect

    from steer.discrete import env as env_module
    from steer.discrete import exact

    tree = ast.parse(inspect.getsource(env_module))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.startswith("steer.discrete") for m in imported), imported
    assert exact.forward_log_flow is env_module.forward_log_flow
