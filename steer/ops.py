"""Small log-space tensor helpers shared by every sampler family (torch only).

``log_normal`` is the one Gaussian log-density of the package: the diffusion bridge
(:func:`steer.diffusion.schedule.gaussian_log_prob`) and the toy sampler both call it.
``scatter_logsumexp`` is the segment ``logsumexp`` of the exact DAG solvers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LOG_2PI", "log_normal", "scatter_logsumexp"]

LOG_2PI = math.log(2 * math.pi)


def log_normal(
    x: Tensor,
    mean: Tensor,
    std: Tensor | float,
    event_dims: int = 1,
    *,
    elementwise: bool = False,
) -> Tensor:
    """``log N(x; mean, std² I)`` summed over the last ``event_dims`` dims (a true density).

    Args:
        x: ``[..., *event]`` the points.
        mean: broadcasts against ``x``.
        std: a positive Python float or a positive tensor broadcasting against ``x - mean``
            (e.g. ``[B, 1, 1, 1]`` or ``[T, 1]``); a tensor is not checked (no device sync).
        event_dims: how many trailing dims form one event (1 for vectors ``[..., d]``,
            ``x.ndim - 1`` for whole images ``[B, C, H, W]``).
        elementwise: how the ``n`` event terms are accumulated. ``False`` (vectors):
            ``-½ Σ z² - Σ log σ - ½ n log 2π``, the quadratic term and the log-determinant
            reduced separately (a float ``std`` needs no tensor ``log``). ``True`` (images):
            ``Σ (-½ z² - log σ - ½ log 2π)``, one reduction of the per-element densities, whose
            float32 error stays ~3x smaller for ``n ~ 10⁴`` (the two large sums of the first
            form cancel). The two agree to rounding; each caller keeps one, so that its numbers
            are reproducible bit for bit.

    Returns:
        ``[...]``, the leading (batch) dims of ``x - mean``, in the inputs' dtype (cast before
        calling, e.g. ``x.float()``, for a float32 density of half-precision samples).
    """
    if isinstance(event_dims, bool) or not isinstance(event_dims, int):
        raise TypeError(f"event_dims must be an int, got {type(event_dims).__name__}")
    diff = x - mean  # [..., *event]
    if not 1 <= event_dims <= diff.ndim:
        raise ValueError(
            f"event_dims must be in [1, {diff.ndim}] for x - mean of shape "
            f"{tuple(diff.shape)}, got {event_dims}"
        )
    n = math.prod(diff.shape[diff.ndim - event_dims :])  # event size
    if isinstance(std, Tensor):
        z = diff / std
        if elementwise:
            per_dim = -0.5 * z.square() - torch.log(std) - 0.5 * LOG_2PI  # [..., *event]
            return _event_sum(per_dim, event_dims)
        log_det = _event_sum(std.log().expand_as(z), event_dims)
        return -0.5 * _event_sum(z.square(), event_dims) - log_det - 0.5 * n * LOG_2PI
    if isinstance(std, bool) or not isinstance(std, (int, float)):
        raise TypeError(f"std must be a float or a torch.Tensor, got {type(std).__name__}")
    std = float(std)
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    if elementwise:
        per_dim = -0.5 * diff.square() / std**2 - (math.log(std) + 0.5 * LOG_2PI)
        return _event_sum(per_dim, event_dims)
    return -0.5 * _event_sum(diff.square(), event_dims) / std**2 - n * (
        math.log(std) + 0.5 * LOG_2PI
    )


def _event_sum(values: Tensor, event_dims: int) -> Tensor:
    """Sum over the last ``event_dims`` dims (flattened first: one reduction, fixed order)."""
    return values.flatten(values.ndim - event_dims).sum(-1)


def scatter_logsumexp(values: Tensor, index: Tensor, size: int) -> Tensor:
    """``out[i] = log Σ_{j: index[j] = i} exp(values[j])``, ``[size]`` (``-inf`` where empty)."""
    # 1. A per-target maximum (detached: it cancels exactly) keeps exp() in range.
    top = torch.full((size,), -math.inf, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, index, values.detach(), reduce="amax")
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    # 2. Sum the shifted exponentials per target and undo the shift.
    sums = torch.zeros_like(top).index_add(0, index, torch.exp(values - shift[index]))
    return sums.log() + shift
