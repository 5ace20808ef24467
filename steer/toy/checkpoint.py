"""Checkpoints of ``steer toy train``: ``checkpoint-<iteration>`` folders in the run's folder.

Each holds ``state.pt`` (the sampler's weights with log Z and the flow head, the Adam state, the
replay buffer with its rank priorities, the MALA step size, the torch RNG, the iteration, the
history and the training time so far) and the run's ``config.yaml``; written under a temporary
name and published by one rename (:mod:`steer.checkpoints`), so a killed run leaves its newest
complete checkpoint loadable. A resume refuses a checkpoint of another config, naming the
fields that differ (only those of :data:`RESUMABLE` may change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from steer import checkpoints as ckpt
from steer.toy.buffer import ReplayBuffer
from steer.toy.sampler import DiffusionSampler

RESUMABLE = (
    "iterations",
    "max_time_s",
    "checkpoint_every",
    "checkpoints_total_limit",
    "resume",
    "eval_every",  # evaluations draw from a copy of the RNG: they never change training
    "eval_samples",
)
STATE = "state.pt"


def _plain(value: Any) -> Any:
    """A NumPy scalar of a metric as the Python number ``torch.load(weights_only=True)`` reads."""
    return value.item() if hasattr(value, "item") else value


def state_of(
    sampler: DiffusionSampler,
    opt: torch.optim.Optimizer,
    buffer: ReplayBuffer | None,
    eta: float,
    iteration: int,
    history: list[dict[str, Any]],
    elapsed_s: float,
) -> dict[str, Any]:
    """Everything an exact resume needs, as plain tensors and Python values."""
    return {
        "sampler": {k: v.detach().clone() for k, v in sampler.state_dict().items()},
        "optimizer": opt.state_dict(),
        "buffer": {} if buffer is None else buffer.state_dict(),
        "rng": torch.get_rng_state(),
        "eta": float(eta),
        "iteration": int(iteration),
        "history": [{k: _plain(v) for k, v in h.items()} for h in history],
        "elapsed_s": float(elapsed_s),
    }


def save(out: Path, state: dict[str, Any], config: dict[str, Any], limit: int) -> Path:
    """Write ``out/checkpoint-<iteration>`` atomically, then prune to ``limit``."""
    step = state["iteration"]
    partial = ckpt.begin(out, step)
    torch.save(state, partial / STATE)
    ckpt.pause_for_tests("save", step)
    (partial / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    ckpt.write_manifest(partial, {"iteration": step})
    final = ckpt.publish(partial)
    ckpt.prune(out, limit)
    return final


def resolve(out: Path | None, config: dict[str, Any], path: Path | None = None) -> Path:
    """The checkpoint folder ``path``, or else the newest complete checkpoint in the run folder
    ``out`` (``.partial`` folders ignored and reported), checked to be of this same config."""
    if path is None:
        if out is None:
            raise ValueError("resume needs the run folder (steer toy train --out DIR)")
        path = ckpt.latest(out)
        if path is None:
            raise FileNotFoundError(f"resume=true but {out} holds no complete checkpoint")
    else:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        why = ckpt.verify(path, deep=True)
        if why is not None:
            raise ValueError(f"{path} is not a complete checkpoint: {why}")
    saved = yaml.safe_load((path / "config.yaml").read_text())
    diffs = ckpt.config_differences(saved, config, RESUMABLE)
    if diffs:
        raise ValueError(f"checkpoint {path} belongs to another config; differing fields: {diffs}")
    return path


def load(path: Path) -> dict[str, Any]:
    """The ``state_of`` dict saved in a checkpoint folder."""
    return torch.load(Path(path) / STATE, weights_only=True)


def restore(
    state: dict[str, Any],
    sampler: DiffusionSampler,
    opt: torch.optim.Optimizer,
    buffer: ReplayBuffer | None,
) -> None:
    """Load a saved state into the sampler, the optimiser, the buffer and the torch RNG."""
    sampler.load_state_dict(state["sampler"])
    opt.load_state_dict(state["optimizer"])
    if buffer is not None and state["buffer"]:
        buffer.load_state_dict(state["buffer"])
    torch.set_rng_state(state["rng"])
