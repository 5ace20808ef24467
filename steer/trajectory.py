"""The :class:`Trajectory` record shared by every sampler (diffusion, toy, discrete), and the
contract of their ``rollout`` functions.

Every family samples a batch with one signature::

    rollout(policy, batch_size, *, num_steps=None, generator=None, callback=None, **options)
        -> Trajectory

(:func:`steer.diffusion.rollout`, :func:`steer.toy.rollout`, :func:`steer.discrete.rollout`).
``num_steps`` is ``T``: the diffusion rollout sets its schedule with it, the toy and discrete
rollouts have a fixed ``T`` and only accept that value. ``callback`` is a :data:`StepCallback`,
called after every step ``k = 0, ..., T-1`` in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["StepCallback", "StepLike", "StepRecord", "Trajectory", "check_batch_size"]


class StepLike(Protocol):
    """What a rollout's callback receives for one step ``k``: the state after it and its
    ``log P_F``. The diffusion rollout passes its
    :class:`~steer.diffusion.StepOutput` (which adds ``mean``, ``std``, ``pred_x0``), the toy and
    discrete rollouts a :class:`StepRecord`."""

    @property
    def sample(self) -> Tensor:
        """``[B, ...]`` the state after the step: ``Trajectory.latents[:, k + 1]``."""
        ...

    @property
    def log_prob(self) -> Tensor:
        """``[B]`` ``log P_F`` of the step under the policy (``Trajectory.log_pf[:, k]``)."""
        ...


@dataclass
class StepRecord:
    """One step of a toy or discrete rollout, as its callback sees it.

    Attributes:
        sample: ``[B, ...]`` the state after the step.
        log_prob: ``[B]`` ``log P_F`` of the step under the policy (not the exploration's).
        extras: per-sampler data of the step (e.g. ``"action"`` of a discrete step).
    """

    sample: Tensor
    log_prob: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


StepCallback = Callable[[int, float, StepLike], None]
"""``callback(k, t_k, step)``, called by every ``rollout`` after each step ``k = 0..T-1`` in
order: ``t_k`` is ``Trajectory.timesteps[k]`` (an int diffusion timestep, a float toy time, the
discrete step index) and ``step`` a :class:`StepLike`. It observes; its return value is ignored."""


def check_batch_size(batch_size: object) -> int:
    """``batch_size`` as an int, or ``ValueError`` naming it unless it is an int ``>= 1``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


@dataclass
class Trajectory:
    """A batch of sampled trajectories ``τ = (s0, x_K, ..., x_0)``.

    Attributes:
        latents: ``[B, K+1, ...]`` the states ``x_K, ..., x_0`` in sampling order.
        timesteps: ``[K]`` the timestep of each step's starting state ``x_k`` (``t_K, ..., t_1``).
        log_pf: ``[B, K]`` ``log P_F(x_{k-1} | x_k)`` of each step (0 where deterministic).
        log_pb: ``[B, K]`` ``log P_B(x_k | x_{k-1})`` of each step.
        log_p_init: ``[B]`` ``log P_F(x_K | s0)``, the density of the first state.
        pred_x0: ``[B, K, ...]`` the denoiser's prediction ``x̂_θ(x_k)`` at each step, if kept.
        deterministic: ``[K]`` bool, steps with ``σ = 0`` (no density; ``log_pf`` is 0 there).
        cond: the conditioning used (prompt embeddings, prompts, ...), if any.
        extras: free-form per-sampler data (e.g. decoded images, rewards).
    """

    latents: Tensor
    timesteps: Tensor
    log_pf: Tensor
    log_pb: Tensor
    log_p_init: Tensor
    pred_x0: Tensor | None = None
    deterministic: Tensor | None = None
    cond: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b, k = self.log_pf.shape
        if self.latents.shape[:2] != (b, k + 1):
            raise ValueError(
                f"latents must be [B, K+1, ...]=[{b}, {k + 1}, ...], "
                f"got {tuple(self.latents.shape)}"
            )
        if self.log_pb.shape != (b, k):
            raise ValueError(f"log_pb must be [B, K]=[{b}, {k}], got {tuple(self.log_pb.shape)}")
        if self.log_p_init.shape != (b,):
            raise ValueError(f"log_p_init must be [B]=[{b}], got {tuple(self.log_p_init.shape)}")
        if self.timesteps.shape != (k,):
            raise ValueError(f"timesteps must be [K]=[{k}], got {tuple(self.timesteps.shape)}")

    @property
    def batch_size(self) -> int:
        return self.log_pf.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_pf.shape[1]

    @property
    def x0(self) -> Tensor:
        """The final samples ``[B, ...]``."""
        return self.latents[:, -1]

    def log_pf_total(self) -> Tensor:
        """``log P_F(τ) = log N(x_K; 0, I) + Σ_k log P_F(x_{k-1}|x_k)``, shape ``[B]``."""
        return self.log_p_init + self.log_pf.sum(dim=1)

    def log_pb_total(self) -> Tensor:
        """``Σ_k log P_B(x_k | x_{k-1})``, shape ``[B]``."""
        return self.log_pb.sum(dim=1)

    def to(self, device: torch.device | str) -> Trajectory:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def detach(self) -> Trajectory:
        detached = {
            f.name: getattr(self, f.name).detach()
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **detached)

    def __getitem__(self, index: Tensor | slice | list[int]) -> Trajectory:
        """Select trajectories along the batch dimension."""
        batched = {"latents", "log_pf", "log_pb", "log_p_init", "pred_x0"}
        picked = {
            name: getattr(self, name)[index] for name in batched if getattr(self, name) is not None
        }
        cond = self.cond[index] if isinstance(self.cond, Tensor) else self.cond
        return replace(self, cond=cond, **picked)
