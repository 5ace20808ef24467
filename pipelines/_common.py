"""What both pipelines share: the output record, model-folder checks, scheduler loading, images."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin
from PIL import Image
from torch import Tensor

from steer.diffusion.schedule import SCHEDULERS, scheduler_from_config
from steer.images import to_unit
from steer.trajectory import Trajectory

logger = logging.getLogger("steer.pipelines")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.safetensors",  # transformers components (text encoder)
    "pytorch_model.bin",
    "model.safetensors.index.json",
)


@dataclass
class SteerPipelineOutput:
    """``images`` (PIL list, ``[B, H, W, C]`` array, ``[B, C, H, W]`` tensor or latents) and, when
    asked for, the sampling ``trajectory`` with its log-densities."""

    images: Any
    trajectory: Trajectory | None = None


def check_model_folder(path: str | os.PathLike, components: tuple[str, ...]) -> None:
    """For a local folder, raise ``FileNotFoundError`` naming the first missing file."""
    root = Path(path)
    if not root.is_dir():
        return  # a hub id: diffusers resolves it (and reports if unreachable)
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} is missing: not a diffusers pipeline folder")
    for name in components:
        config = root / name / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config} is missing: the folder has no {name}")
        if not any((root / name / f).is_file() for f in _WEIGHT_FILES):
            raise FileNotFoundError(
                f"{root / name / _WEIGHT_FILES[0]} is missing: the {name} has no weights "
                f"(looked for {', '.join(_WEIGHT_FILES)})"
            )


def load_scheduler(
    path: str | os.PathLike, default: type[SchedulerMixin], **kwargs: Any
) -> DDIMScheduler | DDPMScheduler:
    """The folder's scheduler if steer supports it (``steer.diffusion.SCHEDULERS``), else
    ``default`` built from its config (e.g. Stable Diffusion's PNDM becomes DDIM with the same
    betas, offset and spacing), logged."""
    config = DDIMScheduler.load_config(path, subfolder="scheduler", **kwargs)
    name = config.get("_class_name", "")
    if name in SCHEDULERS:
        return scheduler_from_config(config)
    logger.warning(
        "scheduler %s is not supported by steer; using %s with its config", name, default.__name__
    )
    return default.from_config(config)


def to_output(images: Tensor, output_type: str) -> Any:
    """Images in ``[-1, 1]`` ``[B, C, H, W]`` to ``output_type`` (``pt`` stays in ``[0, 1]``)."""
    images = to_unit(images)
    if output_type == "pt":
        return images
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()  # [B, H, W, C]
    if output_type == "np":
        return array
    array = (array * 255).round().astype(np.uint8)
    if array.shape[-1] == 1:
        return [Image.fromarray(a[..., 0]) for a in array]
    return [Image.fromarray(a) for a in array]


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def check_latents(latents: Tensor | None, shape: tuple[int, ...]) -> None:
    """Raise for latents of the wrong type, shape or dtype."""
    if latents is None:
        return
    if not isinstance(latents, Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise ValueError(f"latents must have a floating-point dtype, got {latents.dtype}")


def prompt_list(prompt: str | list[str], latents: Tensor | None) -> list[str]:
    """``prompt`` as a non-empty list of str, one per row of ``latents`` (if given)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError("prompt must not be an empty list")
    if isinstance(latents, Tensor) and latents.shape[0] != len(prompts):
        raise ValueError(
            f"prompt list has {len(prompts)} entries but latents has batch {latents.shape[0]}; "
            "give one prompt per latent"
        )
    return prompts


def single_generator(generator: Any) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    raise TypeError(
        f"generator must be one torch.Generator or None, got {type(generator).__name__}"
    )


def decode_pred_x0(decode_latents: Any, trajectory: Trajectory, steps: list[int] | None) -> Tensor:
    """``x̂_θ`` of the chosen steps (all by default) decoded with ``decode_latents``:
    ``[B, S, 3, H, W]`` in ``[0, 1]``, ready for a reward (every latent pipeline's method)."""
    if trajectory.pred_x0 is None:
        raise ValueError("trajectory has no pred_x0; sample with keep_pred_x0=True")
    steps = list(range(trajectory.num_steps)) if steps is None else steps
    decoded = [decode_latents(trajectory.pred_x0[:, k]) for k in steps]
    return to_unit(torch.stack(decoded, dim=1))
