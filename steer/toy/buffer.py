"""Off-policy tools: a replay buffer (uniform or reward-rank prioritised) and MALA local search.

Following Sendera et al. (NeurIPS 2024): terminal samples of forward rollouts (and of local
search) enter the buffer; backward (data-to-noise) trajectories are drawn from buffer samples
through ``P_B`` and trained with the same objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ReplayBuffer", "mala", "BUFFER_KINDS"]

BUFFER_KINDS = ("uniform", "rank")


class ReplayBuffer:
    """Ring buffer of terminal samples ``x [N, d]`` and their log-rewards ``[N]`` (the oldest
    entry is overwritten once ``capacity`` is reached; adding is O(batch), not O(N)).

    ``kind="rank"`` draws sample ``i`` with probability ``∝ 1 / (k N + rank_i)`` (rank 0 = the
    highest reward; Tripp et al. 2020), ``kind="uniform"`` uniformly. The ranks (a sort of the
    whole buffer) are recomputed once ``rank_refresh × N`` entries have been added since the
    last sort; in between, a slot keeps the rank of the entry it held at that sort.
    """

    def __init__(
        self,
        dim: int,
        capacity: int = 50_000,
        kind: str = "rank",
        k: float = 0.01,
        rank_refresh: float = 0.05,
    ):
        if kind not in BUFFER_KINDS:
            raise ValueError(f"buffer kind must be one of {BUFFER_KINDS}, got {kind!r}")
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.kind, self.capacity, self.k, self.rank_refresh = kind, capacity, k, rank_refresh
        self._x = torch.empty(capacity, dim)
        self._log_reward = torch.empty(capacity)
        self._size, self._next, self._stale = 0, 0, 0
        self._cdf: Tensor | None = None  # cumulative rank probabilities, by slot

    def __len__(self) -> int:
        return self._size

    @property
    def x(self) -> Tensor:
        """The stored samples ``[N, d]`` (slot order)."""
        return self._x[: self._size]

    @property
    def log_reward(self) -> Tensor:
        """The stored log-rewards ``[N]`` (slot order)."""
        return self._log_reward[: self._size]

    def add(self, x: Tensor, log_reward: Tensor) -> None:
        """Append a batch (NaN / infinite rewards are refused, never stored)."""
        if x.ndim != 2 or log_reward.shape != (x.shape[0],):
            raise ValueError(
                f"expected x [B, d] and log_reward [B], got {tuple(x.shape)} and "
                f"{tuple(log_reward.shape)}"
            )
        if not torch.isfinite(log_reward).all():
            raise ValueError("log_reward has non-finite entries; the buffer will not store them")
        x = x.detach().cpu().float()[-self.capacity :]
        log_reward = log_reward.detach().cpu().float()[-self.capacity :]
        n = x.shape[0]
        slots = (self._next + torch.arange(n)) % self.capacity
        self._x[slots], self._log_reward[slots] = x, log_reward
        self._next = (self._next + n) % self.capacity
        self._size = min(self.capacity, self._size + n)
        self._stale += n

    def state_dict(self) -> dict[str, Tensor]:
        """The stored entries (slot order), the ring's counters and the rank priorities (the
        cumulative probabilities of the last sort, if any): what a resume needs to draw the same
        samples."""
        state = {
            "x": self.x.clone(),
            "log_reward": self.log_reward.clone(),
            "counters": torch.tensor([self._size, self._next, self._stale]),
        }
        if self._cdf is not None:
            state["cdf"] = self._cdf.clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (into a buffer of the same dim, capacity)."""
        size, nxt, stale = (int(v) for v in state["counters"])
        x = state["x"]
        if x.ndim != 2 or x.shape[1] != self._x.shape[1] or size > self.capacity:
            raise ValueError(
                f"the saved buffer ({size} entries of dim {x.shape[-1]}) does not fit this one "
                f"(capacity {self.capacity}, dim {self._x.shape[1]})"
            )
        self._x[:size], self._log_reward[:size] = x, state["log_reward"]
        self._size, self._next, self._stale = size, nxt, stale
        self._cdf = state["cdf"].clone() if "cdf" in state else None

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` stored samples (with replacement): ``(x [n, d], log_reward [n])``."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if self.kind == "uniform":
            idx = torch.randint(0, len(self), (n,), generator=generator)
        else:
            if self._cdf is None or self._stale > self.rank_refresh * len(self):
                order = torch.argsort(self.log_reward, descending=True)
                ranks = torch.empty_like(order)
                ranks[order] = torch.arange(len(self))
                self._cdf = torch.cumsum(1.0 / (self.k * len(self) + ranks.double()), 0)
                self._stale = 0
            u = torch.rand(n, generator=generator, dtype=torch.float64) * self._cdf[-1]
            idx = torch.searchsorted(self._cdf, u).clamp_max(len(self._cdf) - 1)
        return self.x[idx], self.log_reward[idx]


def mala(
    log_prob: Callable[[Tensor], Tensor],
    x: Tensor,
    steps: int = 200,
    step_size: float = 0.01,
    target_accept: float = 0.574,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Metropolis-adjusted Langevin local search with an adaptive step size.

    Proposal ``y = x + η ∇log p(x) + sqrt(2η) ξ``, accepted with the MH ratio; after each step
    ``η`` grows by 10% when the batch acceptance exceeds ``target_accept`` and shrinks by 10%
    otherwise. Returns ``(x [B, d], log p(x) [B], final η)``. Pure sampling: no graph is kept.
    """
    if steps < 0 or step_size <= 0:
        raise ValueError(f"mala needs steps >= 0 and step_size > 0, got {steps}, {step_size}")

    def value_and_grad(z: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            lp = log_prob(z)
            (g,) = torch.autograd.grad(lp.sum(), z)
        return lp.detach(), g

    x = x.detach()
    lp, grad = value_and_grad(x)
    eta = step_size
    for _ in range(steps):
        # 1. Langevin proposal and its reverse.
        noise = torch.randn(x.shape, generator=generator)
        y = x + eta * grad + math.sqrt(2 * eta) * noise
        lp_y, grad_y = value_and_grad(y)
        fwd = -(y - x - eta * grad).square().sum(-1) / (4 * eta)  # log q(y | x) + c
        rev = -(x - y - eta * grad_y).square().sum(-1) / (4 * eta)  # log q(x | y) + c
        # 2. Metropolis-Hastings acceptance (NaN proposals are rejected, never accepted).
        log_alpha = lp_y + rev - lp - fwd
        accept = torch.log(torch.rand(x.shape[0], generator=generator)) < log_alpha
        x = torch.where(accept[:, None], y, x)
        lp = torch.where(accept, lp_y, lp)
        grad = torch.where(accept[:, None], grad_y, grad)
        # 3. adapt the step size toward the target acceptance rate.
        eta *= 1.1 if accept.float().mean().item() > target_accept else 0.9
    return x, lp, eta
