"""Exact solvers on enumerated DAGs (§4): soft Bellman, terminating distributions, rewards.

Every action table is ``[N, K+1]``: ``K`` moves then the exit ``⊤``; entries of invalid actions
are ``-inf`` (log-probabilities, rewards) and never read. All functions are differentiable
(no ``torch.no_grad``) and work in log space with ``logsumexp``; use float64 for exact checks.
``forward_log_flow`` (from :mod:`steer.discrete.env`, which needs it for path counts) and
``scatter_logsumexp`` (from :mod:`steer.ops`) are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from steer.discrete.env import DAGEnvironment, forward_log_flow
from steer.ops import scatter_logsumexp

__all__ = [
    "SoftBellmanSolution",
    "scatter_logsumexp",
    "forward_log_flow",
    "terminating_log_distribution",
    "terminating_distribution",
    "soft_bellman",
    "uncorrected_reward",
    "corrected_reward",
    "kl_regularised_reward",
    "energy_difference_reward",
    "path_consistency_residual",
    "total_variation",
]


def _check_table(env: DAGEnvironment, table: Tensor, name: str) -> None:
    if not isinstance(table, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(table).__name__}")
    expected = (env.num_states, env.num_moves + 1)
    if tuple(table.shape) != expected:
        raise ValueError(f"{name} must be [N, K+1]={list(expected)}, got {list(table.shape)}")
    if bool(torch.isnan(table[env.valid]).any()):
        raise ValueError(f"{name} has NaN entries on valid actions")


def terminating_log_distribution(env: DAGEnvironment, log_pf: Tensor) -> Tensor:
    """``log P_T(x) = log P(visit x) + log P_F(⊤ | x)`` of a tabular policy ``[N, K+1]``; ``[N]``.

    The terminating distribution of §1, by one forward pass in topological order."""
    _check_table(env, log_pf, "log_pf")
    return forward_log_flow(env, log_pf) + log_pf[:, -1]


def terminating_distribution(env: DAGEnvironment, log_pf: Tensor) -> Tensor:
    """``P_T(x)`` of a tabular policy ``log_pf`` ``[N, K+1]``; ``[N]`` (sums to 1)."""
    return terminating_log_distribution(env, log_pf).exp()


@dataclass
class SoftBellmanSolution:
    """Exact soft-Bellman solution: ``q``, ``log_policy`` ``[N, K+1]`` and ``v`` ``[N]``."""

    q: Tensor
    v: Tensor
    log_policy: Tensor


def soft_bellman(env: DAGEnvironment, reward: Tensor) -> SoftBellmanSolution:
    """Soft value iteration in reverse topological order (§4, soft Bellman):
    ``Q(s, a) = r(s, a) + V(child)``, ``V(⊤) = 0``, ``V(s) = logsumexp_a Q(s, a)``,
    ``π*(a|s) = exp(Q(s, a) - V(s))``. ``reward`` is ``[N, K+1]`` (the exit in the last column).
    """
    _check_table(env, reward, "reward")
    n, k = env.num_states, env.num_moves
    valid = env.valid  # [N, K+1]
    v = torch.zeros(n, dtype=reward.dtype)
    q = torch.full((n, k + 1), -math.inf, dtype=reward.dtype)
    for lv in reversed(range(env.max_length)):
        idx = env.levels[lv]
        # 1. V of the successors: children are one level deeper, already solved; V(⊤) = 0.
        kids = env.child[idx]  # [n_l, K]
        v_next = torch.where(kids >= 0, v[kids.clamp(min=0)], torch.zeros_like(v[0]))
        v_next = torch.cat([v_next, v_next.new_zeros(idx.shape[0], 1)], dim=1)  # [n_l, K+1]
        # 2. Q on valid actions, V by logsumexp.
        q_l = torch.where(valid[idx], reward[idx] + v_next, -math.inf)
        q = q.index_copy(0, idx, q_l)
        v = v.index_copy(0, idx, torch.logsumexp(q_l, dim=1))
    # 3. The optimal soft policy.
    log_policy = torch.where(valid, q - v.unsqueeze(1), -math.inf)
    return SoftBellmanSolution(q=q, v=v, log_policy=log_policy)


def _exit_only(env: DAGEnvironment, moves: Tensor, exit_reward: Tensor) -> Tensor:
    table = torch.cat([moves, exit_reward.unsqueeze(1)], dim=1)
    return torch.where(env.valid, table, -math.inf)


def uncorrected_reward(env: DAGEnvironment) -> Tensor:
    """(4.1) ``r = 0`` on moves, ``-E(x)`` at exit; ``[N, K+1]``. Reaches ``∝ n(x) exp(-E)``."""
    return _exit_only(env, torch.zeros_like(env.child, dtype=torch.float64), env.log_reward)


def corrected_reward(env: DAGEnvironment, log_pb: Tensor) -> Tensor:
    """(4.2) ``r(s, s') = log P_B(s | s')`` on moves, ``-E(x)`` at exit; ``[N, K+1]``.

    ``log_pb`` is ``[N, K]`` as from :meth:`DAGEnvironment.log_backward`."""
    if tuple(log_pb.shape) != tuple(env.child.shape):
        raise ValueError(f"log_pb must be [N, K]={list(env.child.shape)}, got {list(log_pb.shape)}")
    return _exit_only(env, log_pb.to(torch.float64), env.log_reward)


def kl_regularised_reward(env: DAGEnvironment, log_prior: Tensor) -> Tensor:
    """(4.4) The reward of KL-regularised RL toward a prior policy ``μ`` ``[N, K+1]``: the entropy
    bonus of soft Bellman plus ``log μ(a|s)`` equals ``-KL(π(·|s) || μ(·|s))``; ``-E`` at exit."""
    _check_table(env, log_prior, "log_prior")
    return uncorrected_reward(env) + torch.where(env.valid, log_prior.to(torch.float64), 0.0)


def energy_difference_reward(env: DAGEnvironment, log_pb: Tensor) -> Tensor:
    """(4.5) with correction: ``r(s, s') = log P_B(s|s') + E(s) - E(s')`` on moves and ``0`` at
    exit; every state terminates, so the rewards sum to ``log P_B(τ) - E(x) + E(s0)``."""
    src, act, dst = env.edges
    moves = torch.full(env.child.shape, -math.inf, dtype=torch.float64)
    moves[src, act] = log_pb.to(torch.float64)[src, act] + env.energy[src] - env.energy[dst]
    return _exit_only(env, moves, torch.zeros(env.num_states, dtype=torch.float64))


def path_consistency_residual(
    v_start: Tensor, log_pi: Tensor, reward: Tensor, v_end: Tensor | float = 0.0
) -> Tensor:
    """Path-consistency residual of PCL (4.3), Nachum et al. 2017, at temperature 1, sign chosen
    to match TB: ``V(s_0) - V(s_T) + Σ_t [log π(a_t|s_t) - r_t]``. ``log_pi``, ``reward``:
    ``[B, T]`` (zero on padded steps); ``v_start``: ``[B]`` or scalar. Returns ``[B]``."""
    if log_pi.shape != reward.shape or log_pi.ndim != 2:
        raise ValueError(
            f"log_pi and reward must both be [B, T], got {list(log_pi.shape)}, {list(reward.shape)}"
        )
    return v_start - v_end + (log_pi - reward).sum(dim=1)


def total_variation(p: Tensor, q: Tensor) -> float:
    """``½ Σ |p - q|`` of two distributions over the same states."""
    if p.shape != q.shape:
        raise ValueError(f"p and q must have one shape, got {list(p.shape)} and {list(q.shape)}")
    return 0.5 * float((p.double() - q.double()).abs().sum())
