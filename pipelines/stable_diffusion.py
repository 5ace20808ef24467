"""``SteerStableDiffusionPipeline``: Stable Diffusion 1.x/2.x with per-step log-densities."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import get_peft_model_state_dict
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer

from steer.diffusion import DiffusionPolicy, StepCallback, add_lora, check_scheduler, rollout
from steer.pipelines._common import (
    SteerPipelineOutput,
    check_latents,
    check_model_folder,
    check_output_type,
    decode_pred_x0,
    load_scheduler,
    single_generator,
    to_output,
)

__all__ = ["SteerStableDiffusionPipeline"]


class SteerStableDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Stable Diffusion with the densities of §2: ``__call__`` can return the trajectory.

    Components follow diffusers (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
    ``scheduler``); the scheduler must be DDIM or DDPM (:meth:`from_pretrained` converts others).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    # the ``model_index.json`` pipeline classes this one loads (``steer.pipelines.load_pipeline``)
    loads: ClassVar[tuple[str, ...]] = ("SteerStableDiffusionPipeline", "StableDiffusionPipeline")

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDIMScheduler | DDPMScheduler,
    ) -> None:
        super().__init__()
        check_scheduler(scheduler)
        self.register_modules(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> SteerStableDiffusionPipeline:
        """Load any SD 1.x/2.x hub id or local folder; a PNDM/other scheduler becomes DDIM."""
        check_model_folder(pretrained_model_name_or_path, ("unet", "vae", "text_encoder"))
        if "scheduler" not in kwargs:
            hub = {
                k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only") if k in kwargs
            }
            kwargs["scheduler"] = load_scheduler(
                pretrained_model_name_or_path, DDIMScheduler, **hub
            )
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only") if k in kwargs}
        index = cls.load_config(pretrained_model_name_or_path, **hub)
        for unused in ("safety_checker", "feature_extractor"):  # SD folders list them: skip them
            if unused in index:
                kwargs.setdefault(unused, None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------
    # building blocks (reusable, gradients are the caller's choice)
    # ------------------------------------------------------------------------------------------
    def encode_prompt(
        self, prompts: list[str], return_pooled: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """CLIP embeddings ``[B, L, D]`` of ``prompts`` (padded to the tokenizer's max length);
        with ``return_pooled`` also the pooled embeddings ``[B, D]``."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = self.text_encoder(ids.to(self.device))
        embeds = out[0].to(self.unet.dtype)
        return (embeds, out.pooler_output) if return_pooled else embeds

    def prompt_cond(
        self, prompts: list[str], guidance_scale: float, negative_prompt: str | list[str] = ""
    ) -> Tensor:
        """``cond`` for :class:`DiffusionPolicy`: ``[B, L, D]``, or ``[B, 2, L, D]`` (negative,
        positive) under guidance (``w != 1``)."""
        positive = self.encode_prompt(prompts)
        if guidance_scale == 1.0:
            return positive
        negative = (
            [negative_prompt] * len(prompts)
            if isinstance(negative_prompt, str)
            else negative_prompt
        )
        if len(negative) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negative)} entries for {len(prompts)} prompts"
            )
        return torch.stack([self.encode_prompt(list(negative)), positive], dim=1)

    def policy(
        self, guidance_scale: float = 7.5, num_inference_steps: int = 50, eta: float = 1.0
    ) -> DiffusionPolicy:
        """The forward policy ``P_F`` of this pipeline's UNet and scheduler."""
        return DiffusionPolicy(self.unet, self.scheduler, guidance_scale, num_inference_steps, eta)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """VAE-decode latents ``[B, 4, h, w]`` to images ``[B, 3, H, W]`` in ``[-1, 1]``."""
        scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(scaled).sample

    def decode_pred_x0(self, trajectory: Any, steps: list[int] | None = None) -> Tensor:
        """Decoded ``x̂_θ`` of the chosen steps (all by default): ``[B, S, 3, H, W]`` in ``[0, 1]``,
        ready for a reward."""
        return decode_pred_x0(self.decode_latents, trajectory, steps)

    # ------------------------------------------------------------------------------------------
    # LoRA
    # ------------------------------------------------------------------------------------------
    def add_lora(self, rank: int = 4, alpha: float | None = None, **kwargs: Any) -> None:
        """Add a trainable LoRA adapter on the UNet's attention projections (base frozen)."""
        add_lora(self.unet, rank=rank, alpha=alpha, **kwargs)

    def save_lora_weights(  # type: ignore[override]
        self, save_directory: str | os.PathLike, adapter_name: str = "default", **kwargs: Any
    ) -> None:
        """Save the UNet adapter so that plain diffusers ``load_lora_weights`` reads it back."""
        state = get_peft_model_state_dict(self.unet, adapter_name=adapter_name)
        if not state:
            raise ValueError("the unet has no LoRA adapter to save; call add_lora() first")
        metadata = self.unet.peft_config[adapter_name].to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])
        super().save_lora_weights(
            save_directory, unet_lora_layers=state, unet_lora_adapter_metadata=metadata, **kwargs
        )

    # ------------------------------------------------------------------------------------------
    # user-facing call
    # ------------------------------------------------------------------------------------------
    def _prompts(self, prompt: str | list[str], latents: Tensor | None) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        if latents is not None and isinstance(latents, Tensor) and latents.shape[0] != len(prompts):
            raise ValueError(
                f"prompt list has {len(prompts)} entries but latents has batch {latents.shape[0]}; "
                "give one prompt per latent"
            )
        return prompts

    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_trajectory: bool = False,
        negative_prompt: str | list[str] = "",
        keep_pred_x0: bool = True,
        callback: StepCallback | None = None,
        grad: bool = False,
        progress: bool = True,
    ) -> SteerPipelineOutput:
        """Sample images for ``prompt`` (DDIM with noise ``η``, guidance ``w``), diffusers-style.

        ``grad=False`` (default) samples without an autograd graph; the returned trajectory holds
        ``log_pf``/``log_pb`` per step and ``pred_x0`` (decode it with :meth:`decode_pred_x0`).
        """
        # 1. inputs
        check_output_type(output_type)
        generator = single_generator(generator)
        prompts = self._prompts(prompt, latents)
        policy = self.policy(guidance_scale, num_inference_steps, eta)
        check_latents(latents, (len(prompts), *policy.sample_shape))
        # 2. sample the trajectory, then decode x_0
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            cond = self.prompt_cond(prompts, guidance_scale, negative_prompt)
            traj = rollout(
                policy,
                cond=cond,
                generator=generator,
                grad=grad,
                latents=latents,
                keep_pred_x0=keep_pred_x0,
                callback=callback,
                progress=progress,
            )
            traj.extras["prompts"] = prompts
            if output_type == "latent":
                images = traj.x0
            else:
                images = to_output(self.decode_latents(traj.x0), output_type)
        return SteerPipelineOutput(images=images, trajectory=traj if return_trajectory else None)
