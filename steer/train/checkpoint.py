"""Checkpoints: ``checkpoint-N`` folders written through ``Accelerator.save_state`` on every rank.

A checkpoint is first written to ``checkpoint-N.partial`` and renamed only once every rank has
finished, so an interrupted save never replaces a good checkpoint; the oldest are then pruned to
``checkpoints_total_limit``. Each holds the resolved config, and a resume refuses a checkpoint of
another config, naming the fields that differ.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from torch import nn

# fields that may change between a run and its resume
RESUMABLE_FIELDS = ("train.steps", "log.")


class TrainState:
    """Everything of a run that is not the optimiser: trainable weights, step, curves, RNG."""

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
            "generator": self.generator.get_state(),
            "weights": {k: v.detach().cpu().clone() for k, v in self.trainable().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.generator.set_state(state["generator"])
        params = self.trainable()
        missing = sorted(set(params) - set(state["weights"]))
        if missing:
            raise ValueError(f"checkpoint lacks trainable weights {missing[:5]}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["weights"][k].to(p.device, p.dtype))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).startswith("reward.kwargs"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields (``a.b``) whose values differ, ignoring those a resume may change."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(set(a) | set(b))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in keys
        if a.get(k) != b.get(k) and not any(k.startswith(f) for f in RESUMABLE_FIELDS)
    ]


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, config: dict[str, Any], limit: int
) -> Path:
    """Save on every rank into a partial folder, then publish it atomically and prune."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(spec: str, output_dir: Path, config: dict[str, Any]) -> Path:
    """``latest`` (in ``output_dir``) or a path → a checkpoint folder of this same config."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest but {output_dir} holds none")
        path = found[-1]
    else:
        path = Path(spec)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint={spec} does not exist")
    saved_cfg = path / "config.yaml"
    if not saved_cfg.is_file():
        raise FileNotFoundError(f"{path} is not a steer checkpoint (no config.yaml)")
    diffs = config_differences(yaml.safe_load(saved_cfg.read_text()), config)
    if diffs:
        raise ValueError(f"checkpoint {path} belongs to another config; differing fields: {diffs}")
    return path
