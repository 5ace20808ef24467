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
    """FIFO buffer of terminal samples ``x [N, d]`` and their log-rewards ``[N]``.

    ``kind="rank"`` draws sample ``i`` with probability ``∝ 1 / (k N + rank_i)`` (rank 0 = the
    highest reward; Tripp et al. 2020), ``kind="uniform"`` uniformly.
    """

    def __init__(self, dim: int, capacity: int = 50_000, kind: str = "rank", k: float = 0.01):
        if kind not in BUFFER_KINDS:
            raise ValueError(f"buffer kind must be one of {BUFFER_KINDS}, got {kind!r}")
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.kind, self.capacity, self.k = kind, capacity, k
        self.x = torch.empty(0, dim)
        self.log_reward = torch.empty(0)
        self._probs: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def add(self, x: Tensor, log_reward: Tensor) -> None:
        """Append a batch (NaN / infinite rewards are refused, never stored)."""
        if x.ndim != 2 or log_reward.shape != (x.shape[0],):
            raise ValueError(
                f"expected x [B, d] and log_reward [B], got {tuple(x.shape)} and "
                f"{tuple(log_reward.shape)}"
            )
        if not torch.isfinite(log_reward).all():
            raise ValueError("log_reward has non-finite entries; the buffer will not store them")
        self.x = torch.cat([self.x, x.detach().cpu().float()])[-self.capacity :]
        self.log_reward = torch.cat([self.log_reward, log_reward.detach().cpu().float()])
        self.log_reward = self.log_reward[-self.capacity :]
        self._probs = None

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` stored samples (with replacement): ``(x [n, d], log_reward [n])``."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if self.kind == "uniform":
            idx = torch.randint(0, len(self), (n,), generator=generator)
        else:
            if self._probs is None:
                order = torch.argsort(self.log_reward, descending=True)
                ranks = torch.empty_like(order)
                ranks[order] = torch.arange(len(self))
                self._probs = 1.0 / (self.k * len(self) + ranks.float())
            idx = torch.multinomial(self._probs, n, replacement=True, generator=generator)
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
