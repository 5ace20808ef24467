"""Exact samples of a diffusion prior's posterior ``∝ p_prior(x) r(x)``, by rejection (§7).

With ``0 ≤ r ≤ 1`` (a classifier probability ``p(c | x)^(1/β)``, say), drawing ``x`` from the
prior's own sampler and accepting it with probability ``r(x)`` draws the posterior exactly, and
``log Z = log E_prior[r(x)]`` is the Monte Carlo mean over every draw. The sampler is the policy
as it stands (its steps, spacing and ``η``): the ``p_prior`` that relative trajectory balance
(3.3) fine-tunes from, so a fine-tuned model is judged against the target it was trained for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from steer.diffusion.policy import DiffusionPolicy
from steer.diffusion.rollout import rollout
from steer.exact import RejectionResult, rejection_sample

__all__ = ["exact_posterior"]


def exact_posterior(
    prior: DiffusionPolicy,
    log_reward: Callable[[Tensor], Tensor],
    num_samples: int,
    *,
    cond: Tensor | None = None,
    batch_size: int = 256,
    max_draws: int | None = None,
    generator: torch.Generator | None = None,
    log_bound: float = 0.0,
    progress: bool = False,
) -> RejectionResult:
    """Rejection-sample ``num_samples`` final states ``x_0`` of ``∝ p_prior(x_0) r(x_0)``.

    Args:
        prior: the prior policy; its current schedule (``K``, spacing, ``η``) is the sampler.
        log_reward: ``x_0 [n, C, H, W] -> log r [n]`` with ``log r ≤ log_bound`` (0: ``r ≤ 1``).
        cond: one prompt's embeddings ``[L, D]`` (or ``[2, L, D]`` with the negative) for a
            text-conditional prior; ``None`` for an unconditional one.
        batch_size / max_draws / generator / log_bound / progress: as in
            :func:`steer.exact.rejection_sample`.

    Returns:
        a :class:`steer.exact.RejectionResult` whose ``samples`` are ``[num_samples, C, H, W]``
        and whose ``log_z`` estimates ``log E_prior[r]`` (plus ``log_bound``).
    """
    if cond is not None and cond.ndim not in (2, 3):
        raise ValueError(
            f"cond must be one prompt's embeddings [L, D] or [2, L, D], got {tuple(cond.shape)}"
        )

    def draw(n: int, gen: torch.Generator) -> Tensor:
        # 1. n trajectories of the prior sampler, without gradients; keep x_0 only
        batch_cond = None if cond is None else cond.expand(n, *cond.shape).to(prior.device)
        with torch.no_grad():
            traj = rollout(
                prior,
                batch_size=None if batch_cond is not None else n,
                cond=batch_cond,
                generator=gen,
                keep_pred_x0=False,
            )
        return traj.x0.float()

    def score(x0: Tensor) -> Tensor:
        with torch.no_grad():
            return log_reward(x0).float()

    return rejection_sample(
        draw,
        score,
        num_samples,
        batch_size=batch_size,
        max_draws=max_draws,
        generator=generator,
        log_bound=log_bound,
        progress=progress,
    )
