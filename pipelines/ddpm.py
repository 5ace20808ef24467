"""``SteerDDPMPipeline``: an unconditional ``UNet2DModel`` prior with per-step log-densities."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel
from torch import Tensor

from steer.diffusion import (
    DiffusionPolicy,
    StepCallback,
    add_lora,
    check_scheduler,
    load_unet_lora,
    rollout,
    save_unet_lora,
)
from steer.pipelines._common import (
    SteerPipelineOutput,
    check_latents,
    check_model_folder,
    check_output_type,
    load_scheduler,
    single_generator,
    to_output,
)

__all__ = ["SteerDDPMPipeline"]

_LORA_CONFIG = "adapter_config.json"


class SteerDDPMPipeline(DiffusionPipeline):
    """An unconditional pixel-space prior (``unet``, ``scheduler``), e.g. the digits prior.

    Loads any diffusers folder with ``model_index.json``, ``unet/`` and ``scheduler/``.
    """

    # the ``model_index.json`` pipeline classes this one loads (``steer.pipelines.load_pipeline``)
    loads: ClassVar[tuple[str, ...]] = ("SteerDDPMPipeline", "DDPMPipeline", "DDIMPipeline")

    def __init__(self, unet: UNet2DModel, scheduler: DDIMScheduler | DDPMScheduler) -> None:
        super().__init__()
        if not isinstance(unet, UNet2DModel):
            raise TypeError(f"unet must be a UNet2DModel, got {type(unet).__name__}")
        check_scheduler(scheduler)
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> SteerDDPMPipeline:
        """Load a folder or hub id; a scheduler other than DDIM/DDPM becomes DDPM (logged)."""
        check_model_folder(pretrained_model_name_or_path, ("unet",))
        if "scheduler" not in kwargs:
            hub = {
                k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only") if k in kwargs
            }
            kwargs["scheduler"] = load_scheduler(
                pretrained_model_name_or_path, DDPMScheduler, **hub
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def policy(self, num_inference_steps: int = 1000, eta: float = 1.0) -> DiffusionPolicy:
        """The forward policy ``P_F`` of this pipeline's UNet and scheduler."""
        return DiffusionPolicy(self.unet, self.scheduler, 1.0, num_inference_steps, eta)

    # ------------------------------------------------------------------------------------------
    # LoRA (UNet2DModel has no diffusers loader: peft weights + their config, in one folder)
    # ------------------------------------------------------------------------------------------
    def add_lora(self, rank: int = 4, alpha: float | None = None, **kwargs: Any) -> None:
        """Add a trainable LoRA adapter on the UNet's attention projections (base frozen)."""
        add_lora(self.unet, rank=rank, alpha=alpha, **kwargs)

    def save_lora_weights(self, save_directory: str | os.PathLike) -> None:
        """Write ``unet_lora.safetensors`` and ``adapter_config.json`` to ``save_directory``."""
        path = save_unet_lora(self.unet, save_directory)
        cfg = self.unet.peft_config["default"]
        spec = {
            "rank": cfg.r,
            "alpha": cfg.lora_alpha,
            "target_modules": sorted(cfg.target_modules),
        }
        (path.parent / _LORA_CONFIG).write_text(json.dumps(spec, indent=2))

    def load_lora_weights(self, directory: str | os.PathLike) -> None:
        """Add the saved adapter to the UNet and load its weights."""
        spec_file = Path(directory) / _LORA_CONFIG
        if not spec_file.is_file():
            raise FileNotFoundError(f"{spec_file} is missing; save with save_lora_weights()")
        spec = json.loads(spec_file.read_text())
        add_lora(self.unet, spec["rank"], spec["alpha"], tuple(spec["target_modules"]))
        load_unet_lora(self.unet, directory)

    # ------------------------------------------------------------------------------------------
    # user-facing call
    # ------------------------------------------------------------------------------------------
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int = 1000,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_trajectory: bool = False,
        keep_pred_x0: bool = True,
        callback: StepCallback | None = None,
        grad: bool = False,
        progress: bool = True,
    ) -> SteerPipelineOutput:
        """Sample ``batch_size`` images (default: the batch of ``latents``, else 1); with a
        DDPMScheduler and ``η = 1`` this is DDPM sampling (the same generator gives diffusers'
        ``DDPMPipeline`` images)."""
        check_output_type(output_type)
        generator = single_generator(generator)
        policy = self.policy(num_inference_steps, eta)
        if isinstance(latents, Tensor):
            if batch_size is not None and batch_size != latents.shape[0]:
                raise ValueError(
                    f"batch_size={batch_size} but latents has batch {latents.shape[0]}: give one "
                    "or make them agree"
                )
            batch_size = latents.shape[0]
        batch_size = 1 if batch_size is None else batch_size
        check_latents(latents, (batch_size, *policy.sample_shape))
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            traj = rollout(
                policy,
                batch_size=batch_size,
                generator=generator,
                grad=grad,
                latents=latents,
                keep_pred_x0=keep_pred_x0,
                callback=callback,
                progress=progress,
            )
            images = traj.x0 if output_type == "latent" else to_output(traj.x0, output_type)
        return SteerPipelineOutput(images=images, trajectory=traj if return_trajectory else None)
