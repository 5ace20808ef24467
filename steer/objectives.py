"""GFlowNet objectives as pure functions of log-probability tensors.

Every function returns the residual ``delta`` of one trajectory (``[B]``) or of one transition
(the broadcast shape of its inputs) and never reduces over the batch: the caller applies a
penalty (:func:`squared` by default, :func:`huber` or :func:`log_cosh` for robustness) and reduces.
Equation numbers refer to the mathematics section of the README.

Per-step inputs may be given as ``[B, T]`` (summed over the steps) or as per-trajectory sums
``[B]``. The log-probability of the first step (``N(0, I)`` for a diffusion model) belongs in
``log_pf`` for (3.1)/(3.2); in the relative objectives (3.3)/(3.7) it cancels and may be left out.
Padded steps of variable-length trajectories must be zero in both ``log_pf`` and ``log_pb``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Penalty = Callable[[Tensor], Tensor]

__all__ = [
    "Penalty",
    "squared",
    "huber",
    "log_cosh",
    "trajectory_balance",
    "vargrad",
    "relative_trajectory_balance",
    "relative_vargrad",
    "detailed_balance",
    "energy_difference_detailed_balance",
    "modified_detailed_balance",
    "subtrajectory_balance",
    "group_mean",
    "group_normalise",
]


# --------------------------------------------------------------------------------------------
# penalties
# --------------------------------------------------------------------------------------------
def squared(delta: Tensor) -> Tensor:
    """The squared residual ``delta**2`` (the default penalty)."""
    return delta.square()


def huber(delta: Tensor, threshold: float = 1.0) -> Tensor:
    """Huber penalty: ``delta**2`` inside ``|delta| <= threshold``, linear outside (scaled so
    that it equals :func:`squared` near zero)."""
    if threshold <= 0:
        raise ValueError(f"huber threshold must be > 0, got {threshold}")
    a = delta.abs()
    return torch.where(a <= threshold, a.square(), threshold * (2 * a - threshold))


def log_cosh(delta: Tensor) -> Tensor:
    """``2 log cosh(delta)``, computed stably: ``delta**2`` near zero, ``2|delta|`` far out."""
    a = delta.abs()
    return 2 * (a + torch.nn.functional.softplus(-2 * a) - torch.log(torch.tensor(2.0)).to(a))


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _per_trajectory(x: Tensor, name: str) -> Tensor:
    """Sum a ``[B, T]`` per-step tensor over steps; pass a ``[B]`` tensor through."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 2:
        return x.sum(dim=1)
    if x.ndim == 1:
        return x
    raise ValueError(f"{name} must have shape [B, T] or [B], got {tuple(x.shape)}")


def _per_trajectory_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> tuple[Tensor, Tensor]:
    """Both per-step inputs of one trajectory, summed (:func:`_per_trajectory`); two ``[B, T]``
    inputs must have the same number of steps (a ``[B]`` sum goes with either)."""
    sums = _per_trajectory(a, name_a), _per_trajectory(b, name_b)
    if a.ndim == 2 and b.ndim == 2 and a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} has {a.shape[1]} steps ({tuple(a.shape)}) but {name_b} has {b.shape[1]} "
            f"({tuple(b.shape)}); give both [B, T] over the same T steps (zero-pad the shorter "
            "one's padded steps), or pass per-trajectory sums [B]"
        )
    return sums


def _same_batch(**tensors: Tensor) -> int:
    sizes = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch sizes differ: {sizes}; every input needs the same leading B")
    return next(iter(sizes.values()))


def _check_log_reward(log_reward: Tensor, name: str = "log_reward") -> Tensor:
    if not isinstance(log_reward, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(log_reward).__name__}")
    if log_reward.ndim != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(log_reward.shape)}")
    # one reduction and one scalar check: the sum is finite iff every term is (an overflowing
    # sum of finite terms is looked at element-wise and passes)
    if not bool(torch.isfinite(log_reward.sum())):
        bad = torch.nonzero(~torch.isfinite(log_reward)).flatten().tolist()[:8]
    else:
        bad = []
    if bad:
        raise ValueError(
            f"{name} has non-finite entries at batch indices {bad}; clip the reward "
            "(e.g. log(r + eps)) or drop those samples before computing the objective"
        )
    return log_reward


def _check_log_z(log_z: Tensor | float, batch: int) -> Tensor | float:
    if isinstance(log_z, (int, float)):
        return float(log_z)
    if not isinstance(log_z, Tensor):
        raise TypeError(f"log_z must be a float or a torch.Tensor, got {type(log_z).__name__}")
    if log_z.ndim == 0 or (log_z.ndim == 1 and log_z.shape[0] in (1, batch)):
        return log_z
    raise ValueError(
        f"log_z must be a scalar, shape [1] or shape [B]=[{batch}], got {tuple(log_z.shape)}"
    )


def group_mean(values: Tensor, group: Tensor | None) -> Tensor:
    """Mean of ``values [B]`` over the batch, or over each group of equal ids; shape ``[B]``."""
    if group is None:
        return values.mean().expand_as(values)
    if not isinstance(group, Tensor) or group.shape != values.shape:
        shape = tuple(group.shape) if isinstance(group, Tensor) else type(group).__name__
        raise ValueError(
            f"group must be an integer tensor of shape {tuple(values.shape)}, got {shape}"
        )
    if group.dtype.is_floating_point:
        raise TypeError(f"group must hold integer ids, got dtype {group.dtype}")
    _, inverse = torch.unique(group, return_inverse=True)
    n = int(inverse.max()) + 1
    sums = values.new_zeros(n).index_add(0, inverse, values)
    counts = values.new_zeros(n).index_add(0, inverse, torch.ones_like(values))
    return (sums / counts)[inverse]


def group_normalise(values: Tensor, group: Tensor | None, clip: float, eps: float = 1e-6) -> Tensor:
    """Advantages: ``(r - mean_g) / (std_g + eps)`` per group of equal ids (or the whole batch),
    clipped to ``[-clip, clip]``. Shape ``[B]``."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}; it bounds the advantages to [-clip, clip]")
    ids = torch.zeros_like(values, dtype=torch.long) if group is None else group
    mean = group_mean(values, ids)  # [B]
    std = group_mean((values - mean) ** 2, ids).sqrt()  # [B]
    return ((values - mean) / (std + eps)).clamp(-clip, clip)


# --------------------------------------------------------------------------------------------
# trajectory-level objectives
# --------------------------------------------------------------------------------------------
def trajectory_balance(
    log_pf: Tensor, log_pb: Tensor, log_reward: Tensor, log_z: Tensor | float
) -> Tensor:
    """Trajectory balance (3.1), Malkin et al. 2022:
    ``log Z + log P_F(τ) - log R(x) - log P_B(τ|x)``.

    Shapes: ``log_pf``, ``log_pb`` ``[B, T]`` or ``[B]``; ``log_reward`` ``[B]``; ``log_z`` a
    scalar, ``[1]`` or ``[B]`` (one learned value per prompt, gathered). Returns ``[B]``.
    """
    pf, pb = _per_trajectory_pair(log_pf, log_pb, "log_pf", "log_pb")
    log_reward = _check_log_reward(log_reward)
    batch = _same_batch(log_pf=pf, log_pb=pb, log_reward=log_reward)
    return _check_log_z(log_z, batch) + pf - log_reward - pb


def vargrad(
    log_pf: Tensor, log_pb: Tensor, log_reward: Tensor, group: Tensor | None = None
) -> Tensor:
    """VarGrad / log-variance (3.2), Richter et al. 2020: TB with ``log Z`` replaced by the batch
    mean of ``log R + log P_B - log P_F``, per group of equal ``group`` ids (e.g. prompts).

    The estimate is not detached: the squared penalty then gives exactly the gradient of the
    sample variance. Returns ``[B]``; a group of size one has residual 0.
    """
    pf, pb = _per_trajectory_pair(log_pf, log_pb, "log_pf", "log_pb")
    log_reward = _check_log_reward(log_reward)
    _same_batch(log_pf=pf, log_pb=pb, log_reward=log_reward)
    log_weight = log_reward + pb - pf  # [B]: a single-sample estimate of log Z
    return group_mean(log_weight, group) - log_weight


def relative_trajectory_balance(
    log_pf_post: Tensor, log_pf_prior: Tensor, log_reward: Tensor, log_z: Tensor | float
) -> Tensor:
    """Relative trajectory balance (3.3), Venkatraman et al. 2024:
    ``log Z + log P_F^post(τ) - log r(x) - log P_F^prior(τ)`` over the same trajectory.

    At zero residual for every τ the posterior samples ``∝ p_prior(x) r(x)``. Returns ``[B]``.
    """
    post, prior = _per_trajectory_pair(log_pf_post, log_pf_prior, "log_pf_post", "log_pf_prior")
    log_reward = _check_log_reward(log_reward)
    batch = _same_batch(log_pf_post=post, log_pf_prior=prior, log_reward=log_reward)
    return _check_log_z(log_z, batch) + post - log_reward - prior


def relative_vargrad(
    log_pf_post: Tensor, log_pf_prior: Tensor, log_reward: Tensor, group: Tensor | None = None
) -> Tensor:
    """Relative VarGrad (3.7), Venkatraman et al. 2024: RTB with ``log Z`` replaced by its batch
    (or per-group) estimate ``mean(log r + log P_F^prior - log P_F^post)``. Returns ``[B]``."""
    post, prior = _per_trajectory_pair(log_pf_post, log_pf_prior, "log_pf_post", "log_pf_prior")
    log_reward = _check_log_reward(log_reward)
    _same_batch(log_pf_post=post, log_pf_prior=prior, log_reward=log_reward)
    log_weight = log_reward + prior - post  # [B]
    return group_mean(log_weight, group) - log_weight


# --------------------------------------------------------------------------------------------
# transition-level objectives
# --------------------------------------------------------------------------------------------
def _broadcast(**tensors: Tensor) -> tuple[Tensor, ...]:
    """The per-transition inputs expanded to one shape. Each is a tensor of one rank (``[B]`` or
    ``[B, T]``; a 0-d tensor broadcasts anywhere): a ``[B]`` beside ``[B, T]`` would broadcast
    along T, not B, so it is refused."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ranks = {name: t.ndim for name, t in tensors.items() if t.ndim > 0}
    if len(set(ranks.values())) > 1:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(
            f"per-transition inputs mix ranks: {shapes}; give them all as [B] or all as [B, T] "
            "(a per-trajectory value x of shape [B] beside [B, T] inputs: x[:, None])"
        )
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in tensors.values()))
    except RuntimeError as err:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(f"inputs do not broadcast to one shape: {shapes}") from err
    if len(shape) == 0:
        raise ValueError("per-transition inputs need at least a batch dimension, got scalars")
    return tuple(t.expand(shape) for t in tensors.values())


def detailed_balance(
    log_flow: Tensor, log_pf: Tensor, log_flow_next: Tensor, log_pb: Tensor
) -> Tensor:
    """Detailed balance (3.4), Bengio et al. 2023, per transition ``s → s'``:
    ``log F(s) + log P_F(s'|s) - log F(s') - log P_B(s|s')``, with ``F(x) := R(x)`` at a
    terminal state (pass ``log R`` as ``log_flow_next`` there). Shapes broadcast (``[B]`` or
    ``[B, T]``); returns that shape."""
    f, pf, f_next, pb = _broadcast(
        log_flow=log_flow, log_pf=log_pf, log_flow_next=log_flow_next, log_pb=log_pb
    )
    return f + pf - f_next - pb


def energy_difference_detailed_balance(
    log_flow_residual: Tensor,
    log_pf: Tensor,
    log_flow_residual_next: Tensor,
    log_pb: Tensor,
    log_reward_pred: Tensor,
    log_reward_pred_next: Tensor,
    terminal: Tensor | bool | None = None,
) -> Tensor:
    """Energy-difference (forward-looking) DB (3.5), Zhang et al. 2024 (Pan et al. 2023):
    (3.4) with ``log F(s) = log F̃(s) + log R(x̂(s))``, i.e.
    ``log F̃(s) + log P_F(s'|s) - log F̃(s') - log P_B(s|s') + [log R(x̂(s)) - log R(x̂(s'))]``.

    ``terminal`` marks transitions into a terminal ``x_0``: there ``log F(x_0) = log R(x_0)``,
    so the next flow residual is taken as 0 whatever was passed and ``log_reward_pred_next``
    must be ``log R(x_0)``. The reward terms are data: detach them if they came with a graph.
    Shapes broadcast (``[B]`` or ``[B, T]``); returns that shape.
    """
    f, pf, f_next, pb, r, r_next = _broadcast(
        log_flow_residual=log_flow_residual,
        log_pf=log_pf,
        log_flow_residual_next=log_flow_residual_next,
        log_pb=log_pb,
        log_reward_pred=log_reward_pred,
        log_reward_pred_next=log_reward_pred_next,
    )
    if terminal is not None:
        terminal = torch.as_tensor(terminal, device=f_next.device, dtype=torch.bool)
        f_next = torch.where(terminal, torch.zeros_like(f_next), f_next)
    return (f + r) + pf - (f_next + r_next) - pb


def modified_detailed_balance(
    log_reward: Tensor,
    log_pf: Tensor,
    log_reward_next: Tensor,
    log_pb: Tensor,
    log_pf_stop: Tensor,
    log_pf_stop_next: Tensor,
) -> Tensor:
    """Modified DB (3.5 with every state terminating), Deleu et al. 2022: the flow is
    ``F(s) = R(s) / P_F(⊤|s)``, so ``F̃ = 1/P_F(⊤|s)`` and the energy difference
    ``log R(s) - log R(s')`` is the intermediate reward (4.5). Returns the broadcast shape."""
    r, pf, r_next, pb, stop, stop_next = _broadcast(
        log_reward=log_reward,
        log_pf=log_pf,
        log_reward_next=log_reward_next,
        log_pb=log_pb,
        log_pf_stop=log_pf_stop,
        log_pf_stop_next=log_pf_stop_next,
    )
    return (r - stop) + pf - (r_next - stop_next) - pb


def subtrajectory_balance(
    log_flows: Tensor,
    log_pf: Tensor,
    log_pb: Tensor,
    lam: float = 0.9,
    lengths: Tensor | None = None,
    penalty: Penalty = squared,
) -> Tensor:
    """Sub-trajectory balance SubTB(λ) (3.6), Madan et al. 2023: the penalised residual
    ``log F(s_i) + Σ_{i≤k<j} [log P_F - log P_B]_k - log F(s_j)`` of every sub-trajectory
    ``i < j``, weighted ``λ^(j-i)`` and normalised by the sum of weights.

    ``log_flows`` is ``[B, T+1]`` (``log R`` at the terminal state), ``log_pf``/``log_pb``
    ``[B, T]``; ``lengths`` ``[B]`` gives the number of real transitions of padded trajectories.
    Returns the per-trajectory loss ``[B]`` (the penalty is applied inside: a weighted sum).
    As ``λ → 0`` it is the mean DB penalty; as ``λ → ∞`` the TB penalty.
    """
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    for name, t in (("log_flows", log_flows), ("log_pf", log_pf), ("log_pb", log_pb)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if log_pf.ndim != 2 or log_pf.shape != log_pb.shape:
        raise ValueError(
            f"log_pf and log_pb must both be [B, T], got {tuple(log_pf.shape)} "
            f"and {tuple(log_pb.shape)}"
        )
    b, t = log_pf.shape
    if log_flows.shape != (b, t + 1):
        raise ValueError(f"log_flows must be [B, T+1]=[{b}, {t + 1}], got {tuple(log_flows.shape)}")
    # 1. A_i = log F_i - Σ_{k<i} (log P_F - log P_B)_k, so that δ_ij = A_i - A_j.
    steps = torch.nn.functional.pad((log_pf - log_pb).cumsum(dim=1), (1, 0))  # [B, T+1]
    a = log_flows - steps
    delta = a.unsqueeze(2) - a.unsqueeze(1)  # [B, T+1, T+1], δ[b, i, j]
    # 2. weights λ^(j-i-1) on i < j (the constant 1/λ cancels in the normalisation; λ=0 is DB).
    idx = torch.arange(t + 1, device=log_pf.device)
    span = idx.view(1, -1) - idx.view(-1, 1)  # [T+1, T+1], j - i
    weight = torch.where(
        span > 0,
        torch.tensor(float(lam), dtype=log_pf.dtype, device=log_pf.device).pow(
            span.clamp(min=1) - 1
        ),
        torch.zeros((), dtype=log_pf.dtype, device=log_pf.device),
    ).expand(b, t + 1, t + 1)
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.shape != (b,):
            shape = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
            raise ValueError(f"lengths must be an integer tensor [B]=[{b}], got {shape}")
        if lengths.dtype.is_floating_point or bool(((lengths < 1) | (lengths > t)).any()):
            raise ValueError(
                f"lengths must hold integer step counts in [1, T={t}], got {lengths.tolist()}"
            )
        valid = idx.view(1, 1, -1) <= lengths.view(-1, 1, 1)  # j <= length
        weight = weight * valid
    # 3. normalised weighted sum of penalties.
    return (weight * penalty(delta)).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))
