"""Bayesian-network structure learning as a pointed DAG (Deleu et al. 2022), every state
terminating: a state is a DAG over ``d`` variables, a move adds one edge keeping it acyclic.

The energy is the negative BIC score, over ``temperature``, of data drawn from a known
linear-Gaussian network (seeded).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from steer.discrete.env import DEFAULT_MAX_STATES, DAGEnvironment, check_enumerable

__all__ = ["BayesNetStructure", "count_dags", "linear_gaussian_data", "bic_local_score"]


def count_dags(d: int) -> int:
    """The number of labelled DAGs on ``d`` nodes (Robinson 1973): 1, 1, 3, 25, 543, 29281, ..."""
    a = [1]
    for n in range(1, d + 1):
        a.append(
            sum(
                (-1) ** (k + 1) * math.comb(n, k) * 2 ** (k * (n - k)) * a[n - k]
                for k in range(1, n + 1)
            )
        )
    return a[d]


def _pairs(d: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(d) for j in range(d) if i != j]


def _reaches(mask: int, pairs: list[tuple[int, int]], d: int) -> list[int]:
    """Bitmask of the nodes reachable from each node (including itself) in graph ``mask``."""
    reach = [1 << i for i in range(d)]
    changed = True
    while changed:
        changed = False
        for bit, (i, j) in enumerate(pairs):
            if mask >> bit & 1 and reach[i] | reach[j] != reach[i]:
                reach[i] |= reach[j]
                changed = True
    return reach


def _enumerate(d: int) -> tuple[list[int], list[list[int]]]:
    """All DAGs reachable from the empty graph by adding edges; ``(masks, children)`` where
    ``children[g][e]`` is the mask after adding edge ``e`` (or -1 if present or cyclic)."""
    pairs = _pairs(d)
    seen, frontier, moves = {0: None}, [0], {}
    while frontier:
        nxt = []
        for mask in frontier:
            reach = _reaches(mask, pairs, d)
            row = []
            for bit, (i, j) in enumerate(pairs):
                # adding i -> j closes a cycle iff j already reaches i
                ok = not (mask >> bit & 1) and not (reach[j] >> i & 1)
                row.append(mask | 1 << bit if ok else -1)
                if ok and row[-1] not in seen:
                    seen[row[-1]] = None
                    nxt.append(row[-1])
            moves[mask] = row
        frontier = nxt
    masks = sorted(seen, key=lambda m: (bin(m).count("1"), m))
    return masks, [moves[m] for m in masks]


def linear_gaussian_data(
    d: int, num_samples: int, seed: int, edge_prob: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample a random linear-Gaussian network and data from it (seeded).

    Returns ``(data [num_samples, d] float64, adjacency [d, d] bool, weights [d, d])``; the
    network follows a random order, each forward pair an edge with ``edge_prob``, weights
    ``±U(0.5, 1.5)``, unit noise."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(d, generator=gen)
    adj = torch.zeros(d, d, dtype=torch.bool)
    weights = torch.zeros(d, d, dtype=torch.float64)
    for a in range(d):
        for b in range(a + 1, d):
            if float(torch.rand((), generator=gen)) < edge_prob:
                i, j = int(order[a]), int(order[b])
                adj[i, j] = True
                sign = 1.0 if float(torch.rand((), generator=gen)) < 0.5 else -1.0
                weights[i, j] = sign * (0.5 + float(torch.rand((), generator=gen)))
    data = torch.zeros(num_samples, d, dtype=torch.float64)
    for j in order.tolist():  # ancestral sampling
        noise = torch.randn(num_samples, generator=gen, dtype=torch.float64)
        data[:, j] = data @ weights[:, j] + noise
    return data, adj, weights


def bic_local_score(data: Tensor, node: int, parents: list[int]) -> float:
    """BIC of one family: the maximised Gaussian log-likelihood of ``node`` regressed on
    ``parents`` with an intercept, minus ``(|parents| + 2)/2 · log n`` (weights, intercept,
    variance)."""
    n = data.shape[0]
    # 1. Least squares by the normal equations (design: intercept and parents).
    design = torch.cat([torch.ones(n, 1, dtype=data.dtype), data[:, parents]], dim=1)  # [n, p+1]
    coef = torch.linalg.solve(design.T @ design, design.T @ data[:, node])
    # 2. The maximum-likelihood variance and the log-likelihood at the optimum.
    variance = (data[:, node] - design @ coef).square().mean()
    loglik = -0.5 * n * (math.log(2 * math.pi) + variance.log() + 1.0)
    return float(loglik) - 0.5 * (len(parents) + 2) * math.log(n)


class BayesNetStructure(DAGEnvironment):
    """DAGs over ``num_variables`` nodes (543 for 4), built one edge at a time.

    ``E(G) = -(BIC(G | data) - max_G' BIC(G' | data)) / temperature`` (a constant shift that
    keeps ``log Z`` moderate), the data drawn from a seeded linear-Gaussian network
    (:attr:`true_adjacency`). Move ``e`` adds the ``e``-th ordered pair ``(i, j)``, ``i ≠ j``.
    ``n(G) = |E(G)|!``: every order of adding the edges of a DAG stays acyclic.
    """

    def __init__(
        self,
        num_variables: int = 4,
        num_samples: int = 30,
        seed: int = 0,
        temperature: float = 1.0,
        max_states: int = DEFAULT_MAX_STATES,
    ) -> None:
        if not isinstance(num_variables, int) or num_variables < 2:
            raise ValueError(f"num_variables must be an integer >= 2, got {num_variables!r}")
        if num_samples < 3 or temperature <= 0:
            raise ValueError(
                f"need num_samples >= 3 and temperature > 0, got {num_samples}, {temperature}"
            )
        d = num_variables
        check_enumerable(count_dags(d), max_states, f"BayesNetStructure(num_variables={d})")
        self.num_variables, self.pairs = d, _pairs(d)
        self.data, self.true_adjacency, self.true_weights = linear_gaussian_data(
            d, num_samples, seed
        )
        # 1. Enumerate, index the children.
        masks, moves = _enumerate(d)
        index = {m: i for i, m in enumerate(masks)}
        child = torch.tensor([[index[c] if c >= 0 else -1 for c in row] for row in moves])
        bits = torch.tensor([[m >> b & 1 for b in range(len(self.pairs))] for m in masks])
        # 2. Energies: the BIC decomposes over families; cache each (node, parent set).
        cache: dict[tuple[int, int], float] = {}
        energy = torch.empty(len(masks), dtype=torch.float64)
        for g, mask in enumerate(masks):
            total = 0.0
            for j in range(d):
                pa = [i for b, (i, jj) in enumerate(self.pairs) if jj == j and mask >> b & 1]
                key = (j, sum(1 << i for i in pa))
                if key not in cache:
                    cache[key] = bic_local_score(self.data, j, pa)
                total += cache[key]
            energy[g] = -total
        energy = (energy - energy.min()) / temperature  # min E = 0: keeps log Z moderate
        self.masks, self.temperature = masks, temperature
        names = [self._describe(m) for m in masks]
        super().__init__(child, bits.sum(1), energy, bits.float(), names)

    def _describe(self, mask: int) -> str:
        edges = [f"{i}->{j}" for b, (i, j) in enumerate(self.pairs) if mask >> b & 1]
        return "{" + ",".join(edges) + "}"

    def adjacency(self, index: int) -> Tensor:
        """``[d, d]`` bool adjacency matrix of state ``index``."""
        adj = torch.zeros(self.num_variables, self.num_variables, dtype=torch.bool)
        for b, (i, j) in enumerate(self.pairs):
            adj[i, j] = bool(self.masks[index] >> b & 1)
        return adj

    def __repr__(self) -> str:
        return f"BayesNetStructure(num_variables={self.num_variables}, states={self.num_states})"
