"""Pointed DAGs with every state terminating, enumerated exactly (§1, §4).

A :class:`DAGEnvironment` holds ``N`` states sorted in topological order (``s0`` has index 0),
``K`` move types and one exit action ``⊤`` (the last column of every ``[N, K+1]`` action table).
``child[s, a]`` is the state reached from ``s`` by move ``a`` (``-1`` where the move is not
allowed); every move goes from level ``l`` to level ``l + 1``, so levels give the topological
order used by the exact solvers of :mod:`steer.discrete.exact`. :func:`forward_log_flow` pushes
a tabular policy's flow through that order (it gives the path counts ``n(s)`` here and the
terminating distributions there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cached_property

import torch
from torch import Tensor

from steer.ops import scatter_logsumexp

__all__ = [
    "DAGEnvironment",
    "forward_log_flow",
    "check_enumerable",
    "energies_from",
    "DEFAULT_MAX_STATES",
    "DEFAULT_MAX_TRAJECTORIES",
    "BACKWARD_KINDS",
]

DEFAULT_MAX_STATES = 200_000
DEFAULT_MAX_TRAJECTORIES = 500_000
BACKWARD_KINDS = ("uniform", "path_count", "random")


def check_enumerable(num_states: int, max_states: int, what: str) -> None:
    """Raise ``ValueError`` if ``num_states`` exceeds ``max_states`` (before enumerating)."""
    if num_states > max_states:
        raise ValueError(
            f"{what} has {num_states:,} states, more than the enumeration limit "
            f"max_states={max_states:,}; choose a smaller environment or raise max_states"
        )


def energies_from(
    energy: Callable[[Tensor], Tensor], states: Tensor, describe: Callable[[int], str]
) -> Tensor:
    """Evaluate a user energy on all ``states`` ``[N, ...]``; return ``[N]`` float64.

    Raises ``ValueError`` naming the first state whose energy is NaN or infinite.
    """
    values = energy(states)
    if not isinstance(values, Tensor):
        raise TypeError(f"energy must return a torch.Tensor, got {type(values).__name__}")
    values = values.detach().to(torch.float64).reshape(-1)
    if values.shape[0] != states.shape[0]:
        raise ValueError(
            f"energy must return one value per state, shape [{states.shape[0]}], "
            f"got {values.shape[0]} values"
        )
    bad = torch.nonzero(~torch.isfinite(values)).flatten()
    if bad.numel() > 0:
        i = int(bad[0])
        raise ValueError(
            f"energy returned {values[i].item()} at state {describe(i)} (index {i}); "
            f"{bad.numel()} state(s) are non-finite, every energy must be a finite number"
        )
    return values


class DAGEnvironment:
    """An enumerated pointed DAG whose states all terminate.

    Args:
        child: ``[N, K]`` long, ``child[s, a]`` the state reached by move ``a`` or ``-1``.
        level: ``[N]`` long, the number of moves from ``s0`` (0 for ``s0`` only).
        energy: ``[N]`` the energy ``E(x)`` of terminating in each state (``R = exp(-E)``).
        features: ``[N, F]`` float features of each state (input of an MLP policy).
        names: optional readable name of each state (used in error messages and tables).
    """

    def __init__(
        self,
        child: Tensor,
        level: Tensor,
        energy: Tensor,
        features: Tensor,
        names: Sequence[str] | None = None,
    ) -> None:
        n = level.shape[0]
        if child.ndim != 2 or child.shape[0] != n:
            raise ValueError(f"child must be [N, K] with N={n}, got {tuple(child.shape)}")
        if energy.shape != (n,) or features.shape[0] != n:
            raise ValueError(
                f"energy must be [N]=[{n}] and features [N, F], got {tuple(energy.shape)} "
                f"and {tuple(features.shape)}"
            )
        if int(level[0]) != 0 or bool((level[1:] <= 0).any()) or bool((level.diff() < 0).any()):
            raise ValueError("states must be sorted by level with s0 alone at index 0, level 0")
        valid = child >= 0
        src = torch.arange(n).unsqueeze(1).expand_as(child)
        if bool((level[child.clamp(min=0)][valid] != level[src][valid] + 1).any()):
            raise ValueError("every move must go from level l to level l + 1")
        self.child = child.long()  # [N, K]
        self.level = level.long()  # [N]
        self.energy = energy.to(torch.float64)  # [N]
        self.features = features.float()  # [N, F]
        self._names = list(names) if names is not None else None

    # ---------------------------------------------------------------- sizes and masks
    @property
    def num_states(self) -> int:
        return self.level.shape[0]

    @property
    def num_moves(self) -> int:
        """``K``, the number of move types; the exit action is column ``K``."""
        return self.child.shape[1]

    @property
    def max_length(self) -> int:
        """The most actions in one trajectory (moves plus the exit)."""
        return int(self.level.max()) + 1

    @property
    def log_reward(self) -> Tensor:
        """``log R(x) = -E(x)``, shape ``[N]`` float64."""
        return -self.energy

    @cached_property
    def valid(self) -> Tensor:
        """``[N, K+1]`` bool: allowed actions (the exit, last column, is always allowed)."""
        return torch.cat([self.child >= 0, torch.ones(self.num_states, 1, dtype=torch.bool)], 1)

    @cached_property
    def edges(self) -> tuple[Tensor, Tensor, Tensor]:
        """All moves as ``(source [M], move type [M], destination [M])``."""
        src, act = torch.nonzero(self.child >= 0, as_tuple=True)
        return src, act, self.child[src, act]

    @cached_property
    def levels(self) -> list[Tensor]:
        """State indices of each level, in order."""
        return [torch.nonzero(self.level == lv).flatten() for lv in range(self.max_length)]

    @cached_property
    def num_parents(self) -> Tensor:
        """``[N]`` long, the number of parents of each state (0 for ``s0``)."""
        _, _, dst = self.edges
        return torch.zeros(self.num_states, dtype=torch.long).index_add_(
            0, dst, torch.ones_like(dst)
        )

    def name(self, index: int) -> str:
        """A readable name of state ``index``."""
        return self._names[index] if self._names is not None else str(index)

    # ---------------------------------------------------------------- exact quantities
    @cached_property
    def log_path_counts(self) -> Tensor:
        """``log n(s)``, the log-number of paths ``s0 → s``, ``[N]`` float64 (4.1)."""
        zeros = torch.where(self.valid, 0.0, -math.inf).to(torch.float64)
        return forward_log_flow(self, zeros)

    def target(self) -> Tensor:
        """The target ``P*(x) ∝ exp(-E(x))`` over all states, ``[N]`` float64."""
        return torch.softmax(self.log_reward, dim=0)

    def log_backward(
        self, kind: str = "uniform", generator: torch.Generator | None = None
    ) -> Tensor:
        """A backward policy as ``[N, K]`` float64: ``log P_B(s | child[s, a])`` (``-inf`` where
        the move is invalid). ``kind``: ``"uniform"`` over parents, ``"path_count"``
        ``P_B(s|s') = n(s)/n(s')`` (4.2, maximal trajectory entropy), or ``"random"``
        (softmax of standard normal logits per child, drawn from ``generator``)."""
        src, act, dst = self.edges
        if kind == "uniform":
            values = -self.num_parents[dst].to(torch.float64).log()
        elif kind == "path_count":
            values = self.log_path_counts[src] - self.log_path_counts[dst]
        elif kind == "random":
            logits = torch.randn(src.shape[0], generator=generator, dtype=torch.float64)
            values = logits - scatter_logsumexp(logits, dst, self.num_states)[dst]
        else:
            raise ValueError(f"kind must be one of {BACKWARD_KINDS}, got {kind!r}")
        out = torch.full(self.child.shape, -math.inf, dtype=torch.float64)
        out[src, act] = values
        return out

    def all_trajectories(self, max_trajectories: int = DEFAULT_MAX_TRAJECTORIES) -> Tensor:
        """Every complete trajectory ``s0 → … → x → ⊤`` as padded state indices ``[P, T+1]``
        (``P = Σ_x n(x)``, each row padded with its final state ``x``); raises ``ValueError``
        when ``P`` exceeds ``max_trajectories``."""
        total = float(self.log_path_counts.exp().sum())
        if total > max_trajectories:
            raise ValueError(
                f"{self!r} has {total:,.0f} trajectories, more than the enumeration limit "
                f"max_trajectories={max_trajectories:,}; train with sampled trajectories instead"
            )
        t_max = self.max_length
        # 1. Extend the paths of each level by every valid move, level by level.
        paths = [torch.zeros(1, 1, dtype=torch.long)]  # paths ending at level 0
        for _ in range(t_max - 1):
            last = paths[-1]
            kids = self.child[last[:, -1]]  # [P_l, K]
            row, col = torch.nonzero(kids >= 0, as_tuple=True)
            paths.append(torch.cat([last[row], kids[row, col].unsqueeze(1)], dim=1))
        # 2. Pad every path with its final state up to T+1 positions (the exit and padding).
        return torch.cat(
            [torch.cat([p, p[:, -1:].expand(-1, t_max + 1 - p.shape[1])], 1) for p in paths]
        )


def forward_log_flow(env: DAGEnvironment, log_pf: Tensor) -> Tensor:
    """``log`` of the probability of visiting each state under ``log_pf`` ``[N, K+1]`` (only the
    move columns are read), in topological order; ``[N]``. With zeros it counts paths ``n(s)``."""
    src, act, dst = env.edges
    moves = log_pf[src, act]  # [M]
    log_flow = torch.full((env.num_states,), -math.inf, dtype=log_pf.dtype)
    log_flow = log_flow.index_fill(0, torch.tensor([0]), 0.0)
    src_level = env.level[src]  # [M]
    for lv in range(env.max_length - 1):
        # 1. Push the (final) flow of level lv through its moves into level lv + 1.
        pick = torch.nonzero(src_level == lv).flatten()
        incoming = scatter_logsumexp(log_flow[src[pick]] + moves[pick], dst[pick], env.num_states)
        targets = env.levels[lv + 1]
        log_flow = log_flow.index_copy(0, targets, incoming[targets])
    return log_flow
