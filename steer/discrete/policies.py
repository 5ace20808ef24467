"""Tabular and small-MLP policies on an enumerated DAG, and a vectorised trajectory sampler.

A policy module returns a :class:`PolicyTable` for every state at once (the DAGs are small):
``log P_F(a|s)`` ``[N, K+1]``, a state flow ``log F(s)`` ``[N]`` and ``log Z``. With
``parametrization="q"`` the outputs are soft Q-values: ``log P_F = Q - V``, ``log F = V =
logsumexp_a Q`` and ``log Z = V(s0)`` (soft Q-learning / PCL, (4.3)).

:func:`rollout` samples trajectories from a policy with the rollout contract of
:mod:`steer.trajectory`; :func:`sample_trajectories` is the same draw from a ``log_pf`` table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from steer.discrete.env import DAGEnvironment
from steer.trajectory import StepCallback, StepRecord, Trajectory, check_batch_size

__all__ = [
    "PolicyTable",
    "TabularPolicy",
    "MLPPolicy",
    "rollout",
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
    """Sample ``batch_size`` trajectories ``s0 → … → x → ⊤`` from ``log_pf`` ``[N, K+1]``:
    ``rollout(log_pf, batch_size, env=env, ...)`` with the table first (see :func:`rollout`)."""
    return rollout(log_pf, batch_size, generator=generator, env=env, epsilon=epsilon, log_pb=log_pb)


Policy = Tensor | PolicyTable | Callable[[], PolicyTable]
"""A discrete policy: its ``log_pf`` table ``[N, K+1]``, a :class:`PolicyTable`, or a module
called with no argument that returns one (:class:`TabularPolicy`, :class:`MLPPolicy`)."""


def _log_pf_table(policy: Policy, env: DAGEnvironment) -> Tensor:
    """``log_pf`` ``[N, K+1]`` of ``policy`` (calling a module once), checked against ``env``."""
    table = policy
    if not isinstance(table, (Tensor, PolicyTable)) and callable(table):
        table = table()
    if isinstance(table, PolicyTable):
        table = table.log_pf
    if not isinstance(table, Tensor):
        raise TypeError(
            "policy must be a log_pf tensor [N, K+1], a PolicyTable or a module returning one, "
            f"got {type(policy).__name__}"
        )
    expected = (env.num_states, env.num_moves + 1)
    if tuple(table.shape) != expected or not table.is_floating_point():
        raise ValueError(
            f"log_pf must be a float tensor [N, K+1]={list(expected)} for this env, "
            f"got {table.dtype} {list(table.shape)}"
        )
    return table


def _check_options(
    env: DAGEnvironment, num_steps: int | None, epsilon: float, log_pb: Tensor | None
) -> None:
    if num_steps is not None and num_steps != env.max_length:
        raise ValueError(
            f"num_steps={num_steps!r}, but trajectories on this env have T = env.max_length = "
            f"{env.max_length} steps (moves, exit, padding); pass num_steps=None or "
            f"{env.max_length}"
        )
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise TypeError(f"epsilon must be a number in [0, 1], got {type(epsilon).__name__}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    if log_pb is not None and tuple(log_pb.shape) != tuple(env.child.shape):
        raise ValueError(f"log_pb must be [N, K]={list(env.child.shape)}, got {list(log_pb.shape)}")


def rollout(
    policy: Policy,
    batch_size: int,
    *,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    env: DAGEnvironment,
    epsilon: float = 0.0,
    log_pb: Tensor | None = None,
) -> Trajectory:
    """Sample ``batch_size`` trajectories ``s0 → … → x → ⊤`` of a tabular policy on ``env``.

    The rollout contract of :mod:`steer.trajectory`, plus discrete options.

    Args:
        policy: a ``log_pf`` table ``[N, K+1]``, a :class:`PolicyTable` or a policy module.
        batch_size: ``B``.
        num_steps: ``T = env.max_length`` (every trajectory is padded to it); only that value
            (or None) is valid.
        generator: draws the uniforms of the inverse-CDF action draws.
        callback: ``callback(k, k, StepRecord)`` after each step (a
            :data:`~steer.trajectory.StepCallback`): ``sample`` the states ``[B]`` after it,
            ``log_prob`` ``[B]`` the drawn action's ``log P_F`` (0 once finished), ``extras``
            ``"action"`` ``[B]`` (``K`` = exit) and ``"done"`` ``[B]``.
        env: the :class:`DAGEnvironment` (required).
        epsilon: actions come from ``(1-ε) P_F + ε·uniform`` (exploration); the stored
            ``log_pf`` is always the policy's (gathered from it: gradients flow if it has one).
        log_pb: ``[N, K]`` backward policy scored into ``log_pb`` (zeros if None).

    Returns:
        the :class:`~steer.trajectory.Trajectory` of :func:`trajectories_from_states`.
    """
    if not isinstance(env, DAGEnvironment):
        raise TypeError(f"env must be a DAGEnvironment, got {type(env).__name__}")
    log_pf = _log_pf_table(policy, env)
    batch_size = check_batch_size(batch_size)
    _check_options(env, num_steps, epsilon, log_pb)
    k = env.num_moves
    valid = env.valid.to(log_pf.dtype)  # [N, K+1]
    probs = (1 - epsilon) * log_pf.detach().exp() + epsilon * valid / valid.sum(1, keepdim=True)
    cdf = probs.cumsum(dim=1)  # [N, K+1]
    state = torch.zeros(batch_size, dtype=torch.long)
    done = torch.zeros(batch_size, dtype=torch.bool)
    states = [state]
    for step in range(env.max_length):
        # 1. Inverse-CDF draw; an exit keeps the state, finished trajectories stay put.
        u = torch.rand(batch_size, 1, generator=generator, dtype=cdf.dtype) * cdf[state, -1:]
        action = torch.where(done, k, (u > cdf[state]).sum(dim=1).clamp(max=k))  # [B]
        if callback is not None:
            lp = torch.where(done, 0.0, log_pf[state, action])  # [B], before done updates
        done = done | (action == k)
        state = torch.where(done, state, env.child[state, action.clamp(max=k - 1)])
        states.append(state)
        if callback is not None:
            info = {"action": action, "done": done}
            callback(step, step, StepRecord(sample=state, log_prob=lp, extras=info))
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
