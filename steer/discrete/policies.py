"""Tabular and small-MLP policies on an enumerated DAG, and a vectorised trajectory sampler.

A policy module returns a :class:`PolicyTable` for every state at once (the DAGs are small):
``log P_F(a|s)`` ``[N, K+1]``, a state flow ``log F(s)`` ``[N]`` and ``log Z``. With
``parametrization="q"`` the outputs are soft Q-values: ``log P_F = Q - V``, ``log F = V =
logsumexp_a Q`` and ``log Z = V(s0)`` (soft Q-learning / PCL, (4.3)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from steer.discrete.env import DAGEnvironment
from steer.trajectory import Trajectory

__all__ = [
    "PolicyTable",
    "TabularPolicy",
    "MLPPolicy",
    "sample_trajectories",
    "trajectories_from_states",
    "PARAMETRIZATIONS",
]

PARAMETRIZATIONS = ("policy", "q")


@dataclass
class PolicyTable:
    """``log_pf`` ``[N, K+1]`` (``-inf`` where invalid), ``log_flow`` ``[N]``, ``log_z`` ``[]``."""

    log_pf: Tensor
    log_flow: Tensor
    log_z: Tensor


def _table(valid: Tensor, logits: Tensor, flow: Tensor, log_z: Tensor, kind: str) -> PolicyTable:
    masked = logits.masked_fill(~valid, -math.inf)  # [N, K+1]
    norm = torch.logsumexp(masked, dim=1)  # [N]
    log_pf = masked - norm.unsqueeze(1)
    if kind == "q":  # soft Q-values: F = exp V, Z = F(s0)
        return PolicyTable(log_pf=log_pf, log_flow=norm, log_z=norm[0])
    return PolicyTable(log_pf=log_pf, log_flow=flow, log_z=log_z)


def _check_kind(parametrization: str) -> str:
    if parametrization not in PARAMETRIZATIONS:
        raise ValueError(
            f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}"
        )
    return parametrization


class TabularPolicy(nn.Module):
    """One logit per (state, action), one log-flow per state and a scalar ``log Z``; all zero at
    initialisation (a uniform policy)."""

    def __init__(self, env: DAGEnvironment, parametrization: str = "policy") -> None:
        super().__init__()
        self.parametrization = _check_kind(parametrization)
        self.register_buffer("valid", env.valid.clone())
        self.logits = nn.Parameter(torch.zeros(env.num_states, env.num_moves + 1))
        self.log_flow = nn.Parameter(torch.zeros(env.num_states))
        self.log_z = nn.Parameter(torch.zeros(()))

    def forward(self) -> PolicyTable:
        return _table(self.valid, self.logits, self.log_flow, self.log_z, self.parametrization)


class MLPPolicy(nn.Module):
    """An MLP of the state features giving the ``K+1`` logits and the log-flow; ``log Z`` is a
    separate scalar."""

    def __init__(
        self,
        env: DAGEnvironment,
        hidden: int = 64,
        layers: int = 2,
        parametrization: str = "policy",
    ) -> None:
        super().__init__()
        self.parametrization = _check_kind(parametrization)
        self.register_buffer("valid", env.valid.clone())
        self.register_buffer("features", env.features.clone())
        width = [env.features.shape[1]] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(width[:-1], width[1:], strict=True):
            blocks += [nn.Linear(a, b), nn.LeakyReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(width[-1], env.num_moves + 2))
        self.log_z = nn.Parameter(torch.zeros(()))

    def forward(self) -> PolicyTable:
        out = self.net(self.features)  # [N, K+2]
        return _table(self.valid, out[:, :-1], out[:, -1], self.log_z, self.parametrization)


def sample_trajectories(
    env: DAGEnvironment,
    log_pf: Tensor,
    batch_size: int,
    log_pb: Tensor | None = None,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Sample ``batch_size`` trajectories ``s0 → … → x → ⊤`` from ``log_pf`` ``[N, K+1]``.

    With ``epsilon > 0`` actions come from ``(1-ε) P_F + ε·uniform`` (exploration); the stored
    ``log_pf`` is always that of ``log_pf`` (gathered from it: gradients flow if it has one).
    Returns the :class:`~steer.trajectory.Trajectory` of :func:`trajectories_from_states`.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    k = env.num_moves
    valid = env.valid.to(log_pf.dtype)  # [N, K+1]
    probs = (1 - epsilon) * log_pf.detach().exp() + epsilon * valid / valid.sum(1, keepdim=True)
    cdf = probs.cumsum(dim=1)  # [N, K+1]
    state = torch.zeros(batch_size, dtype=torch.long)
    done = torch.zeros(batch_size, dtype=torch.bool)
    states = [state]
    for _ in range(env.max_length):
        # 1. Inverse-CDF draw; an exit keeps the state, finished trajectories stay put.
        u = torch.rand(batch_size, 1, generator=generator, dtype=cdf.dtype) * cdf[state, -1:]
        action = torch.where(done, k, (u > cdf[state]).sum(dim=1).clamp(max=k))  # [B]
        done = done | (action == k)
        state = torch.where(done, state, env.child[state, action.clamp(max=k - 1)])
        states.append(state)
    latents = torch.stack(states, 1)  # [B, T+1]
    # 2. After the first exit the state repeats: everything after it is padding.
    return trajectories_from_states(env, latents, log_pf, log_pb)


def trajectories_from_states(
    env: DAGEnvironment, latents: Tensor, log_pf: Tensor, log_pb: Tensor | None = None
) -> Trajectory:
    """Score trajectories given as padded state indices ``[B, T+1]`` (each ``s0 → … → x``, then
    ``x`` repeated: the first repeat is the exit ``⊤``, later ones padding).

    Returns a :class:`~steer.trajectory.Trajectory` with ``latents`` the states, ``log_pf`` and
    ``log_pb`` ``[B, T]`` gathered from ``log_pf`` ``[N, K+1]`` and ``log_pb`` ``[N, K]`` (zero
    on padded steps; ``log P_B = 0`` at the exit) and ``extras``: ``actions`` ``[B, T]``,
    ``lengths`` ``[B]`` (actions taken, exit included), ``final`` ``[B]`` (the state ``x``) and
    ``real`` ``[B, T]`` (steps up to and including the exit).
    """
    t_max, k = latents.shape[1] - 1, env.num_moves
    src, dst = latents[:, :-1], latents[:, 1:]  # [B, T]
    # 1. The action of each step: the move whose child is the next state, else the exit.
    moved = dst != src
    acts = torch.where(moved, (env.child[src] == dst.unsqueeze(2)).long().argmax(2), k)
    lengths = moved.sum(dim=1) + 1  # [B]
    real = torch.arange(t_max).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
    # 2. Per-step log-probabilities, zero on padding.
    step_pf = torch.where(real, log_pf[src, acts], 0.0)
    if log_pb is None:
        step_pb = torch.zeros_like(step_pf)
    else:
        moves = torch.cat([log_pb, log_pb.new_zeros(env.num_states, 1)], 1)  # exit: log P_B = 0
        step_pb = torch.where(real, moves[src, acts], 0.0).to(step_pf.dtype)
    return Trajectory(
        latents=latents,
        timesteps=torch.arange(t_max),
        log_pf=step_pf,
        log_pb=step_pb,
        log_p_init=torch.zeros(latents.shape[0], dtype=step_pf.dtype),
        extras={"actions": acts, "lengths": lengths, "final": latents[:, -1], "real": real},
    )
