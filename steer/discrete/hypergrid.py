"""The hypergrid of Bengio et al. 2021 (NeurIPS), every state terminating."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from steer.discrete.env import DEFAULT_MAX_STATES, DAGEnvironment, check_enumerable, energies_from

__all__ = ["HyperGrid", "hypergrid_reward"]


def hypergrid_reward(
    coords: Tensor, side: int, r0: float = 1e-3, r1: float = 0.5, r2: float = 2.0
) -> Tensor:
    """The standard hypergrid reward of Bengio et al. 2021 on integer ``coords`` ``[N, D]``:
    ``R0 + R1 Π_d 1[0.25 < |x_d/(H-1) - 0.5| ≤ 0.5] + R2 Π_d 1[0.3 < |x_d/(H-1) - 0.5| < 0.4]``.
    Returns ``[N]`` float64."""
    a = (coords.to(torch.float64) / (side - 1) - 0.5).abs()  # [N, D]
    outer = ((a > 0.25) & (a <= 0.5)).all(dim=1)
    inner = ((a > 0.3) & (a < 0.4)).all(dim=1)
    return r0 + r1 * outer.to(torch.float64) + r2 * inner.to(torch.float64)


class HyperGrid(DAGEnvironment):
    """States ``x ∈ {0, …, H-1}^D`` from ``s0 = 0``; move ``d`` adds 1 to coordinate ``d``; every
    state may exit. ``n(x)`` is the multinomial coefficient ``(Σ x_d)! / Π x_d!``.

    Args:
        side: ``H ≥ 2``. dim: ``D ≥ 1``.
        energy: ``None`` for the standard reward (``E = -log R``), or a callable mapping the
            integer coordinates ``[N, D]`` to energies ``[N]``.
        r0, r1, r2: constants of the standard reward.
        max_states: enumeration limit; a larger grid raises ``ValueError``.
    """

    def __init__(
        self,
        side: int = 8,
        dim: int = 2,
        energy: Callable[[Tensor], Tensor] | None = None,
        r0: float = 1e-3,
        r1: float = 0.5,
        r2: float = 2.0,
        max_states: int = DEFAULT_MAX_STATES,
    ) -> None:
        for arg, value, low in (("side", side, 2), ("dim", dim, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}")
        check_enumerable(side**dim, max_states, f"HyperGrid(side={side}, dim={dim})")
        if energy is None and (r0 <= 0 or min(r1, r2) < 0):
            raise ValueError(f"need r0 > 0 and r1, r2 >= 0, got r0={r0}, r1={r1}, r2={r2}")
        self.side, self.dim = side, dim
        # 1. All coordinates, sorted by level (sum of coordinates), then lexicographically.
        grid = torch.tensor(list(itertools.product(range(side), repeat=dim)), dtype=torch.long)
        level = grid.sum(dim=1)
        order = torch.argsort(level * side**dim + self._flat(grid), stable=True)
        coords, level = grid[order], level[order]
        rank = torch.empty_like(order)
        rank[self._flat(coords)] = torch.arange(coords.shape[0])
        # 2. child[s, d] = the state with coordinate d increased by one.
        step = coords.unsqueeze(1) + torch.eye(dim, dtype=torch.long)  # [N, D, D]
        inside = (step < side).all(dim=2)  # [N, D]
        child = torch.where(inside, rank[self._flat(step.clamp(max=side - 1))], -1)
        # 3. Energies and one-hot features.
        names = ["(" + ",".join(str(int(c)) for c in row) + ")" for row in coords]
        if energy is None:
            values = -hypergrid_reward(coords, side, r0, r1, r2).log()
        else:
            values = energies_from(energy, coords, lambda i: names[i])
        features = torch.nn.functional.one_hot(coords, side).flatten(1).float()  # [N, D*H]
        self.coords = coords  # [N, D]
        super().__init__(child, level, values, features, names)

    def _flat(self, coords: Tensor) -> Tensor:
        weights = self.side ** torch.arange(coords.shape[-1] - 1, -1, -1)
        return (coords * weights).sum(dim=-1)

    def path_counts_closed_form(self) -> Tensor:
        """``n(x) = (Σ_d x_d)! / Π_d x_d!`` for every state, ``[N]`` float64 (for checks)."""
        lg = torch.lgamma(self.coords.to(torch.float64) + 1)
        return torch.exp(torch.lgamma(self.coords.sum(1).to(torch.float64) + 1) - lg.sum(1))

    def __repr__(self) -> str:
        return f"HyperGrid(side={self.side}, dim={self.dim}, states={self.num_states})"
