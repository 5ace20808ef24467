"""Off-policy tools: a replay buffer of past trajectories, re-scored under the current weights.

GFlowNet objectives hold for any sampling distribution, so trajectories drawn by an older policy
(or with exploration noise) are valid training data once their ``log P_F`` is recomputed under
the current weights; their rewards, ``P_B`` and prior log-probs do not change.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import Tensor

from steer.train.batch import BATCHED, RolloutBatch, concat_batches, select, to_device
from steer.trajectory import Trajectory

__all__ = ["ReplayBuffer", "rescore", "concat_batches", "to_device"]


class ReplayBuffer:
    """A FIFO buffer of at most ``capacity`` trajectories (kept on the CPU; their tensors only:
    no conditioning or extras, which the re-scoring reads from ``prompt_index``)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.batch: RolloutBatch | None = None

    def __len__(self) -> int:
        return 0 if self.batch is None else self.batch.traj.batch_size

    def add(self, batch: RolloutBatch) -> None:
        traj = replace(batch.traj, cond=None, extras={})
        new = to_device(replace(batch, traj=traj, extras={}), "cpu")
        merged = new if self.batch is None else concat_batches([self.batch, new])
        keep = slice(max(0, len(merged.traj.log_pf) - self.capacity), None)
        self.batch = select(merged, keep)

    def sample(self, n: int, generator: torch.Generator) -> RolloutBatch:
        idx = torch.randint(len(self), (n,), generator=generator)
        return select(self.batch, idx)

    def state_dict(self) -> dict[str, Tensor]:
        """The stored rows as flat tensors (``traj.<field>``, ``<field>``) for a safetensors
        file; empty when the buffer is."""
        if self.batch is None:
            return {}
        traj = {f"traj.{f.name}": getattr(self.batch.traj, f.name) for f in fields(Trajectory)}
        rows = {name: getattr(self.batch, name) for name in BATCHED}
        return {k: v for k, v in {**traj, **rows}.items() if isinstance(v, Tensor)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if not state:
            self.batch = None
            return
        traj = Trajectory(**{k[5:]: v for k, v in state.items() if k.startswith("traj.")})
        if traj.batch_size > self.capacity:
            raise ValueError(
                f"the saved replay buffer holds {traj.batch_size} trajectories, more than "
                f"train.replay_buffer={self.capacity}"
            )
        self.batch = RolloutBatch(traj=traj, **{name: state.get(name) for name in BATCHED})


def rescore(batch: RolloutBatch, policy, embeds: Tensor | None) -> RolloutBatch:
    """Recompute ``log P_F`` of every step under the current weights (no grad)."""
    traj = batch.traj
    with torch.no_grad():
        log_pf = torch.stack(
            [policy.log_prob(traj.latents[:, k], traj.latents[:, k + 1], k, embeds)
             for k in range(traj.num_steps)], dim=1,
        )  # fmt: skip
    return replace(batch, traj=replace(traj, log_pf=log_pf.to(traj.log_pf.dtype)))
