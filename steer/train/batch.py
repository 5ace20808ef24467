"""The rollout batch the fine-tuner trains on: its fields declared once, with the row operations
(select, concatenate, move) that the replay buffer and the PPO minibatches use."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from steer.trajectory import Trajectory


@dataclass
class RolloutBatch:
    """A rollout with everything the objectives need, all detached. Every field but ``traj`` and
    ``extras`` is ``None`` or a tensor whose first dimension is the batch: an objective that needs
    a new per-trajectory quantity adds one field here and nothing else changes."""

    traj: Trajectory
    raw_reward: Tensor  # [B] the reward model's scores
    log_reward: Tensor  # [B] log R(x_0) = raw / beta
    prompt_index: Tensor | None = None  # [B] ids of prompts in a fixed set (log Z table, groups)
    pooled: Tensor | None = None  # [B, D] pooled prompt embeddings (log Z network, flow cond)
    log_reward_pred: Tensor | None = None  # [B, K] log R(x̂_θ(x_k)) (db, subtb)
    log_pf_prior: Tensor | None = None  # [B, K] the frozen prior's log-probs (rtb)
    advantages: Tensor | None = None  # [B] normalised rewards (ddpo, dpok)
    extras: dict = field(default_factory=dict)


# the per-row tensor fields of a RolloutBatch: derived, never listed by hand
BATCHED: tuple[str, ...] = tuple(
    f.name for f in fields(RolloutBatch) if f.name not in ("traj", "extras")
)


@dataclass
class StepTerms:
    """What a re-scored step gives the per-step losses."""

    log_prob: Tensor  # [B] log P_F(x_{k-1} | x_k) under the current weights, with grad
    mean: Tensor | None = None  # [B, ...] the step's mean μ_θ (dpok)
    std: Tensor | None = None  # [] or [B] the step's σ (dpok)
    prior_mean: Tensor | None = None  # [B, ...] the prior's mean at the same x_k (dpok)


def _map(batch: RolloutBatch, fn) -> dict[str, Tensor | None]:
    return {n: None if getattr(batch, n) is None else fn(getattr(batch, n)) for n in BATCHED}


def select(batch: RolloutBatch, idx: Tensor | slice) -> RolloutBatch:
    """The rows ``idx`` of a batch (extras dropped)."""
    return RolloutBatch(traj=batch.traj[idx], extras={}, **_map(batch, lambda t: t[idx]))


def to_device(batch: RolloutBatch, device: torch.device | str) -> RolloutBatch:
    """The batch on ``device`` (extras kept)."""
    moved = _map(batch, lambda t: t.to(device))
    return RolloutBatch(traj=batch.traj.to(device), extras=batch.extras, **moved)


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """Concatenate rollout batches along the batch dimension (extras are dropped)."""
    trajs = [b.traj for b in batches]
    traj_fields = {
        f.name: torch.cat([getattr(t, f.name) for t in trajs])
        for f in fields(Trajectory)
        if f.name not in ("timesteps", "deterministic", "cond", "extras")
        and getattr(trajs[0], f.name) is not None
    }
    traj = replace(trajs[0], cond=None, extras={}, **traj_fields)
    other = {
        name: None if getattr(batches[0], name) is None
        else torch.cat([getattr(b, name) for b in batches])
        for name in BATCHED
    }  # fmt: skip
    return RolloutBatch(traj=traj, extras={}, **other)
