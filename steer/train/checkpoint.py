"""Checkpoints: ``checkpoint-N`` folders written through ``Accelerator.save_state`` on every rank.

What the ranks share (trainable weights, log Z, flow, optimiser, lr schedule, step, curves) is
written once by ``Accelerator.save_state`` (with each rank's Python, NumPy and torch RNG states
in ``random_states_<rank>.pkl``); what differs per rank (its generator of prompts and noise, its
replay buffer) goes to ``rank-<rank>.safetensors``. The folder is written as
``checkpoint-N.partial`` and published by :mod:`steer.checkpoints` once every rank has finished
and a manifest of its files is on disk, so an interrupted save never leaves a half-written
checkpoint under a final name; the oldest are then pruned to ``checkpoints_total_limit``
(never the only loadable one). Each holds the resolved config, and a resume refuses a
checkpoint of another config, naming the fields that differ.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from steer import checkpoints as ckpt

# fields that may change between a run and its resume
RESUMABLE_FIELDS = ("train.steps", "log.")
RANK_FILE = "rank-{}.safetensors"


class TrainState:
    """What the ranks share besides the optimiser: trainable weights, step, curves (registered
    with ``accelerator.register_for_checkpointing``: rank 0 writes it, every rank reads it). The
    rank's ``generator`` is saved per rank (:func:`save_checkpoint`)."""

    def __init__(self, modules: dict[str, nn.Module], generator: torch.Generator) -> None:
        self.modules = modules
        self.generator = generator
        self.step = 0
        self.history: list[dict[str, float]] = []

    def trainable(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{p_name}": p
            for name, module in self.modules.items()
            for p_name, p in module.named_parameters()
            if p.requires_grad
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "history": self.history,
            "weights": {k: v.detach().cpu().clone() for k, v in self.trainable().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.history = list(state["history"])
        params = self.trainable()
        missing = sorted(set(params) - set(state["weights"]))
        if missing:
            raise ValueError(f"checkpoint lacks trainable weights {missing[:5]}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["weights"][k].to(p.device, p.dtype))


def weights_digest(params: list[nn.Parameter]) -> Tensor:
    """SHA-256 ``[32]`` (uint8) of the bytes of ``params``: equal on ranks that agree."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    config: dict[str, Any],
    limit: int,
    rank_state: dict[str, Tensor] | None = None,
) -> Path:
    """Every rank: ``save_state`` and its ``rank_state`` into ``checkpoint-N.partial``; then the
    main process writes the config and the manifest, publishes the folder and prunes."""
    acc, partial = accelerator, ckpt.partial_path(output_dir, step)
    if acc.is_main_process:
        ckpt.begin(output_dir, step)
    acc.wait_for_everyone()
    acc.save_state(str(partial))
    tensors = {k: v.detach().cpu().contiguous() for k, v in (rank_state or {}).items()}
    save_file(tensors, str(partial / RANK_FILE.format(acc.process_index)))
    ckpt.pause_for_tests("save", step)
    acc.wait_for_everyone()
    if acc.is_main_process:
        (partial / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        ckpt.write_manifest(partial, {"step": step, "world_size": acc.num_processes})
        ckpt.publish(partial)
        ckpt.prune(output_dir, limit, report=acc.print)
    acc.wait_for_everyone()
    return ckpt.final_path(output_dir, step)


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Tensor]:
    """``load_state`` of a checkpoint on every rank; returns this rank's ``rank_state``."""
    acc, path = accelerator, Path(path)
    saved = ckpt.read_manifest(path).get("world_size")
    if saved != acc.num_processes:
        raise ValueError(
            f"{path} was written by {saved} processes, this run has {acc.num_processes}: launch "
            f"it with --num_processes {saved} (each rank resumes its own generator and replay "
            "buffer)"
        )
    acc.load_state(str(path))
    return load_file(str(path / RANK_FILE.format(acc.process_index)))


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields (``a.b``) whose values differ, ignoring those a resume may change."""
    return ckpt.config_differences(saved, current, RESUMABLE_FIELDS, opaque=("reward.kwargs",))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoints of a run folder under a final name, oldest first."""
    return [p for _, p in ckpt.complete(output_dir)]


def resolve_resume(spec: str, output_dir: Path, config: dict[str, Any], report=print) -> Path:
    """``latest`` (the newest complete checkpoint in ``output_dir``; ``.partial`` folders are
    ignored and reported) or a path → a checkpoint folder of this same config."""
    if spec == "latest":
        path = ckpt.latest(output_dir, report)
        if path is None:
            raise FileNotFoundError(
                f"resume_from_checkpoint=latest but {output_dir} holds no complete checkpoint"
            )
    else:
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint={spec} does not exist")
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{path} is not a steer checkpoint (no config.yaml)")
        why = ckpt.verify(path, deep=True)
        if why is not None:
            raise ValueError(f"resume_from_checkpoint={spec} is not a complete checkpoint: {why}")
    diffs = config_differences(yaml.safe_load((path / "config.yaml").read_text()), config)
    if diffs:
        raise ValueError(f"checkpoint {path} belongs to another config; differing fields: {diffs}")
    return path
