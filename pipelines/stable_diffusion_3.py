"""``SteerStableDiffusion3Pipeline``: Stable Diffusion 3 / 3.5 (flow matching) with per-step
log-densities (§2b)."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
)
from diffusers.loaders import SD3LoraLoaderMixin
from peft import get_peft_model_state_dict
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedModel

from steer.diffusion import (
    FlowMatchPolicy,
    StepCallback,
    add_lora,
    check_flow_scheduler,
    pack_cond,
    rollout,
)
from steer.pipelines._common import (
    SteerPipelineOutput,
    check_latents,
    check_model_folder,
    check_output_type,
    decode_pred_x0,
    prompt_list,
    single_generator,
    to_output,
)

__all__ = ["SteerStableDiffusion3Pipeline"]


class SteerStableDiffusion3Pipeline(DiffusionPipeline, SD3LoraLoaderMixin):
    """Stable Diffusion 3 with the densities of §2b: ``__call__`` can return the trajectory.

    Components follow diffusers' ``StableDiffusion3Pipeline``: ``transformer``, ``scheduler``
    (``FlowMatchEulerDiscreteScheduler``), ``vae``, two CLIP text encoders with projection and
    their tokenizers, and optionally T5 (``text_encoder_3=None, tokenizer_3=None`` drops it: its
    embeddings are then zeros, as in diffusers). The policy's conditioning is the packed tensor of
    :func:`steer.diffusion.pack_cond` (:meth:`encode_prompt`, :meth:`prompt_cond`).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components: ClassVar[list[str]] = ["text_encoder_3", "tokenizer_3"]
    # the ``model_index.json`` pipeline classes this one loads (``steer.pipelines.load_pipeline``)
    loads: ClassVar[tuple[str, ...]] = (
        "SteerStableDiffusion3Pipeline",
        "StableDiffusion3Pipeline",
    )

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: PreTrainedModel | None = None,
        tokenizer_3: Any = None,
    ) -> None:
        super().__init__()
        check_flow_scheduler(scheduler)
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError(
                "text_encoder_3 and tokenizer_3 go together: give both (T5) or neither, got "
                f"{type(text_encoder_3).__name__} and {type(tokenizer_3).__name__}"
            )
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> SteerStableDiffusion3Pipeline:
        """Load any SD3 / SD3.5 hub id or local folder (``text_encoder_3=None,
        tokenizer_3=None`` skips T5); its scheduler must be ``FlowMatchEulerDiscreteScheduler``."""
        check_model_folder(
            pretrained_model_name_or_path, ("transformer", "vae", "text_encoder", "text_encoder_2")
        )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------
    # prompts → conditioning (gradients are the caller's choice)
    # ------------------------------------------------------------------------------------------
    def _clip(self, prompts: list[str], which: int) -> tuple[Tensor, Tensor]:
        """CLIP ``which`` (0, 1): penultimate states ``[B, 77, d]``, projection ``[B, p]``."""
        tokenizer = (self.tokenizer, self.tokenizer_2)[which]
        encoder = (self.text_encoder, self.text_encoder_2)[which]
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,  # diffusers: the first tokenizer's
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = encoder(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _t5(self, prompts: list[str], max_sequence_length: int) -> Tensor:
        """T5 embeddings ``[B, S, D]``; zeros without T5 (as diffusers)."""
        width = int(self.transformer.config.joint_attention_dim)
        if self.text_encoder_3 is None:
            dtype = self.text_encoder.dtype
            return torch.zeros(len(prompts), max_sequence_length, width, dtype=dtype,
                               device=self.device)  # fmt: skip
        ids = self.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder_3(ids.to(self.device))[0]

    def text_embeddings(
        self, prompts: list[str], max_sequence_length: int = 256
    ) -> tuple[Tensor, Tensor]:
        """diffusers' ``(prompt_embeds [B, 77 + S, D], pooled_prompt_embeds [B, P])``: both CLIP
        states side by side, zero-padded to ``D``, then T5's (``S = max_sequence_length``)."""
        (h1, p1), (h2, p2) = self._clip(prompts, 0), self._clip(prompts, 1)
        clip = torch.cat([h1, h2], dim=-1).to(self.text_encoder.dtype)  # [B, 77, d1 + d2]
        t5 = self._t5(prompts, max_sequence_length)  # [B, S, D]
        width = t5.shape[-1]
        if clip.shape[-1] > width:
            raise ValueError(
                f"the CLIP embeddings ({clip.shape[-1]} wide) do not fit the transformer's "
                f"joint_attention_dim={width}"
            )
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip)], dim=-2), torch.cat([p1, p2], dim=-1)

    def encode_prompt(
        self, prompts: list[str], return_pooled: bool = False, max_sequence_length: int = 256
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The policy's conditioning of ``prompts``: ``pack_cond(embeds, pooled)``
        ``[B, L, D + P]``; with ``return_pooled`` also the pooled embeddings ``[B, P]``."""
        embeds, pooled = self.text_embeddings(prompts, max_sequence_length)
        cond = pack_cond(embeds.to(self.transformer.dtype), pooled)
        return (cond, pooled) if return_pooled else cond

    def prompt_cond(
        self,
        prompts: list[str],
        guidance_scale: float,
        negative_prompt: str | list[str] = "",
        max_sequence_length: int = 256,
    ) -> Tensor:
        """``cond`` for :class:`FlowMatchPolicy`: ``[B, L, D + P]``, or ``[B, 2, L, D + P]``
        (negative, positive) under guidance (``w != 1``)."""
        positive = self.encode_prompt(prompts, max_sequence_length=max_sequence_length)
        if guidance_scale == 1.0:
            return positive
        negative = (
            [negative_prompt] * len(prompts)
            if isinstance(negative_prompt, str)
            else list(negative_prompt)
        )
        if len(negative) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negative)} entries for {len(prompts)} prompts"
            )
        negative_cond = self.encode_prompt(negative, max_sequence_length=max_sequence_length)
        return torch.stack([negative_cond, positive], dim=1)

    def policy(
        self,
        guidance_scale: float = 7.0,
        num_inference_steps: int = 28,
        eta: float = 1.0,
        sde: str = "ddim",
        sigma_min: float = 0.0,
    ) -> FlowMatchPolicy:
        """The forward policy ``P_F`` of this pipeline's transformer and scheduler."""
        return FlowMatchPolicy(
            self.transformer,
            self.scheduler,
            guidance_scale,
            num_inference_steps,
            eta,
            sde=sde,
            sigma_min=sigma_min,
        )

    def decode_latents(self, latents: Tensor) -> Tensor:
        """VAE-decode latents ``[B, 16, h, w]`` to images ``[B, 3, H, W]`` in ``[-1, 1]``."""
        cfg = self.vae.config
        scaled = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.decode(scaled).sample

    def decode_pred_x0(self, trajectory: Any, steps: list[int] | None = None) -> Tensor:
        """Decoded ``x̂_θ`` of the chosen steps (all by default): ``[B, S, 3, H, W]`` in
        ``[0, 1]``, ready for a reward."""
        return decode_pred_x0(self.decode_latents, trajectory, steps)

    # ------------------------------------------------------------------------------------------
    # LoRA
    # ------------------------------------------------------------------------------------------
    def add_lora(self, rank: int = 4, alpha: float | None = None, **kwargs: Any) -> None:
        """Add a trainable LoRA adapter on the transformer's attention projections (base
        frozen)."""
        add_lora(self.transformer, rank=rank, alpha=alpha, **kwargs)

    def save_lora_weights(  # type: ignore[override]
        self, save_directory: str | os.PathLike, adapter_name: str = "default", **kwargs: Any
    ) -> None:
        """Save the transformer adapter so that plain diffusers ``load_lora_weights`` of
        ``StableDiffusion3Pipeline`` reads it back."""
        state = get_peft_model_state_dict(self.transformer, adapter_name=adapter_name)
        if not state:
            raise ValueError("the transformer has no LoRA adapter to save; call add_lora() first")
        metadata = self.transformer.peft_config[adapter_name].to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])
        super().save_lora_weights(
            save_directory,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=metadata,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------
    # user-facing call
    # ------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_trajectory: bool = False,
        negative_prompt: str | list[str] = "",
        max_sequence_length: int = 256,
        sde: str = "ddim",
        sigma_min: float = 0.0,
        keep_pred_x0: bool = True,
        callback: StepCallback | None = None,
        grad: bool = False,
        progress: bool = True,
    ) -> SteerPipelineOutput:
        """Sample images for ``prompt`` (flow matching with noise ``η``, guidance ``w``),
        diffusers-style. ``eta=0`` is diffusers' Euler sampler (every step deterministic, no
        density); ``eta > 0`` the stochastic steps of (2.8), or Flow-GRPO's with
        ``sde="flow-grpo"`` (``eta`` is then its level ``a``).

        ``grad=False`` (default) samples without an autograd graph; the returned trajectory holds
        ``log_pf``/``log_pb`` per step and ``pred_x0`` (decode it with :meth:`decode_pred_x0`);
        its ``extras`` name ``eta``, ``sde``, ``sigma_min`` and the ``prompts``.
        """
        # 1. inputs
        check_output_type(output_type)
        generator = single_generator(generator)
        prompts = prompt_list(prompt, latents)
        policy = self.policy(guidance_scale, num_inference_steps, eta, sde, sigma_min)
        check_latents(latents, (len(prompts), *policy.sample_shape))
        # 2. sample the trajectory, then decode x_0
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            cond = self.prompt_cond(prompts, guidance_scale, negative_prompt, max_sequence_length)
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
            traj.extras.update(prompts=prompts, sde=sde, sigma_min=sigma_min)
            if output_type == "latent":
                images = traj.x0
            else:
                images = to_output(self.decode_latents(traj.x0), output_type)
        return SteerPipelineOutput(images=images, trajectory=traj if return_trajectory else None)
