"""Metrics of samplers of unnormalised densities (§6).

With log-weights ``w_i = log R(x_i) + log P_B(τ_i | x_i) - log P_F(τ_i)``: ELBO ``= mean w``,
``log Ẑ_RW = logmeanexp w`` (forward trajectories), EUBO ``= mean w`` over backward trajectories
from exact target samples; ``Δlog Z = |log Z - ELBO|``, ``Δlog Z_RW = |log Z - log Ẑ_RW|``.
Sample quality: exact 2-Wasserstein between equal-size sets (an assignment problem), RBF MMD and,
for mixtures, the per-mode mass error.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from steer.toy.sampler import DiffusionSampler
from steer.toy.targets import Target
from steer.trajectory import Trajectory

__all__ = [
    "log_weights",
    "log_mean_exp",
    "wasserstein2",
    "mmd_rbf",
    "mode_masses",
    "check_sample_size",
    "evaluate_sampler",
]


def log_weights(traj: Trajectory, log_reward: Tensor) -> Tensor:
    """``w = log R(x) + Σ log P_B - log P_F(τ)`` per trajectory, ``[B]`` (§6)."""
    return log_reward + traj.log_pb_total() - traj.log_pf_total()


def log_mean_exp(w: Tensor) -> Tensor:
    """``log (1/K) Σ exp w_i``, computed stably."""
    return torch.logsumexp(w, dim=0) - math.log(w.shape[0])


def check_sample_size(k: int, bytes_per_entry: int = 8 * 3) -> None:
    """Raise if the ``K × K`` cost matrix of W2/MMD will not fit in available memory."""
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"metrics sample size K must be an integer >= 2, got {k!r}")
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        avail = 8 * 2**30
    limit = int(math.sqrt(0.5 * avail / bytes_per_entry))
    if k > limit:
        raise ValueError(
            f"metrics sample size K={k} needs {k * k * bytes_per_entry / 2**30:.1f} GiB for its "
            f"K x K matrices; with {avail / 2**30:.1f} GiB available the limit is K <= {limit}"
        )


def wasserstein2(x: Tensor, y: Tensor) -> float:
    """Exact 2-Wasserstein distance (not squared) between two equal-size empirical sets
    ``[K, d]``: ``sqrt(min_π (1/K) Σ_i ||x_i - y_π(i)||²)`` over permutations (Hungarian)."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"x and y must both be [K, d], got {tuple(x.shape)} and {tuple(y.shape)}")
    check_sample_size(x.shape[0])
    a, b = x.double().cpu().numpy(), y.double().cpu().numpy()
    cost = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T  # [K, K]
    cost = np.maximum(cost, 0.0)
    rows, cols = linear_sum_assignment(cost)
    return float(math.sqrt(cost[rows, cols].mean()))


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None) -> float:
    """Kernel MMD (biased V-statistic, its square root) with ``k(a, b) = exp(-||a-b||²/(2h²))``;
    ``h`` defaults to the median distance within the pooled sample."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be [K, d] with equal d, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    check_sample_size(max(x.shape[0], y.shape[0]))
    x, y = x.double(), y.double()
    if bandwidth is None:
        z = torch.cat([x, y])
        bandwidth = float(torch.cdist(z, z).median())
    gamma = 1.0 / (2 * bandwidth**2)
    kxx = torch.exp(-gamma * torch.cdist(x, x).square()).mean()
    kyy = torch.exp(-gamma * torch.cdist(y, y).square()).mean()
    kxy = torch.exp(-gamma * torch.cdist(x, y).square()).mean()
    return float((kxx + kyy - 2 * kxy).clamp_min(0).sqrt())


def mode_masses(x: Tensor, means: Tensor, weights: Tensor) -> dict[str, float | int | bool]:
    """Assign samples to the nearest mean; compare each mode's mass with its weight.

    Returns the worst absolute error, the number of modes with at least one sample, and
    whether every mode lies within 4 binomial standard errors ``sqrt(w(1-w)/K)``.
    """
    k = x.shape[0]
    idx = torch.cdist(x.double(), means.double()).argmin(dim=1)  # [K]
    mass = torch.bincount(idx, minlength=means.shape[0]).double() / k  # [M]
    w = weights.double()
    err = (mass - w).abs()
    se = (w * (1 - w) / k).sqrt()
    return {
        "mode_mass_max_error": float(err.max()),
        "modes_covered": int((mass > 0).sum()),
        "modes_total": int(means.shape[0]),
        "mode_mass_within_4se": bool((err <= 4 * se).all()),
    }


def evaluate_sampler(
    sampler: DiffusionSampler,
    target: Target,
    k: int = 2000,
    generator: torch.Generator | None = None,
    sample_quality: bool = True,
) -> tuple[dict[str, float | int | bool | None], Tensor]:
    """All §6 metrics on ``K`` forward trajectories (and ``K`` exact samples pushed through
    ``P_B`` for the EUBO). Returns ``(metrics, samples [K, d])``; metrics a target cannot
    support (no ``log Z`` or no exact sampler) are ``None``."""
    check_sample_size(k)
    # 1. forward trajectories: ELBO and importance-weighted log Z.
    with torch.no_grad():
        traj = sampler.rollout(k, generator=generator)
        w = log_weights(traj, target.log_prob(traj.x0))  # [K]
    if torch.isnan(w).any():
        raise ValueError("the sampler produced NaN log-weights: training diverged")
    out: dict[str, float | int | bool | None] = {
        "elbo": float(w.mean()),
        "log_z_rw": float(log_mean_exp(w)),
        "eubo": None,
        "w2": None,
        "mmd": None,
    }
    log_z = target.log_z
    out["delta_log_z"] = None if log_z is None else abs(log_z - out["elbo"])
    out["delta_log_z_rw"] = None if log_z is None else abs(log_z - out["log_z_rw"])
    samples = traj.x0
    # 2. exact samples: EUBO through P_B, then W2 and MMD.
    if target.has_samples:
        truth = target.sample(k, generator=generator)
        with torch.no_grad():
            back = sampler.backward_rollout(truth, generator=generator)
            out["eubo"] = float(log_weights(back, target.log_prob(truth)).mean())
        if sample_quality:
            out["w2"] = wasserstein2(samples, truth)
            out["mmd"] = mmd_rbf(samples, truth)
    # 3. mixtures: per-mode mass.
    mix = target.mixture()
    if mix is not None:
        out.update(mode_masses(samples, *mix))
    return out, samples
