"""``SteerStableDiffusionXLPipeline``: Stable Diffusion XL with per-step log-densities (§2)."""

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
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from peft import get_peft_model_state_dict
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from steer.diffusion import (
    SDXLPolicy,
    StepCallback,
    add_lora,
    check_scheduler,
    pack_sdxl_cond,
    rollout,
)
from steer.diffusion.sdxl import NUM_TIME_IDS, is_sdxl_unet
from steer.pipelines._common import (
    SteerPipelineOutput,
    check_latents,
    check_model_folder,
    check_output_type,
    decode_pred_x0,
    load_scheduler,
    prompt_list,
    single_generator,
    to_output,
)

__all__ = ["SteerStableDiffusionXLPipeline"]

_HUB_KEYS = ("cache_dir", "revision", "local_files_only")
Size = tuple[int, int]


class SteerStableDiffusionXLPipeline(DiffusionPipeline, StableDiffusionXLLoraLoaderMixin):
    """Stable Diffusion XL with the densities of §2: ``__call__`` can return the trajectory.

    Components follow diffusers' ``StableDiffusionXLPipeline`` (``vae``, ``text_encoder``
    ``CLIPTextModel``, ``text_encoder_2`` ``CLIPTextModelWithProjection``, two tokenizers,
    ``unet`` with ``addition_embed_type="text_time"``, ``scheduler`` DDIM or DDPM:
    :meth:`from_pretrained` converts others). The policy's conditioning is the packed tensor of
    :func:`steer.diffusion.pack_sdxl_cond` (:meth:`encode_prompt`, :meth:`prompt_cond`).
    ``force_zeros_for_empty_prompt`` (diffusers' option, saved in ``model_index.json``): without
    a ``negative_prompt`` the unconditional embeddings are zeros.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    # the ``model_index.json`` pipeline classes this one loads (``steer.pipelines.load_pipeline``)
    loads: ClassVar[tuple[str, ...]] = (
        "SteerStableDiffusionXLPipeline",
        "StableDiffusionXLPipeline",
    )

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: DDIMScheduler | DDPMScheduler,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        super().__init__()
        check_scheduler(scheduler)
        _check_parts(unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> SteerStableDiffusionXLPipeline:
        """Load an SDXL (base) hub id or local folder; an Euler/other scheduler becomes DDIM with
        the same config (logged)."""
        check_model_folder(
            pretrained_model_name_or_path, ("unet", "vae", "text_encoder", "text_encoder_2")
        )
        hub = {k: kwargs[k] for k in _HUB_KEYS if k in kwargs}
        if "scheduler" not in kwargs:
            kwargs["scheduler"] = load_scheduler(
                pretrained_model_name_or_path, DDIMScheduler, **hub
            )
        index = cls.load_config(pretrained_model_name_or_path, **hub)
        for unused in ("image_encoder", "feature_extractor"):  # IP-adapter parts: skip them
            if unused in index:
                kwargs.setdefault(unused, None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------
    # prompts → conditioning (gradients are the caller's choice)
    # ------------------------------------------------------------------------------------------
    def default_size(self) -> Size:
        """``(height, width)`` in pixels of the UNet's ``sample_size``."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor

    def add_time_ids(
        self,
        height: int | None = None,
        width: int | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
    ) -> Tensor:
        """SDXL's micro-conditioning ``[6]`` as diffusers computes it: ``original_size +
        crops_coords_top_left + target_size``, the sizes defaulting to ``(height, width)``."""
        default = self.default_size()
        size = (height or default[0], width or default[1])
        ids = [*(original_size or size), *crops_coords_top_left, *(target_size or size)]
        if len(ids) != NUM_TIME_IDS:
            raise ValueError(
                "original_size, crops_coords_top_left and target_size must be pairs (h, w), got "
                f"{original_size}, {crops_coords_top_left}, {target_size}"
            )
        return torch.tensor(ids, dtype=self.text_encoder_2.dtype, device=self.device)

    def text_embeddings(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """diffusers' ``(prompt_embeds [B, L, D1 + D2], pooled_prompt_embeds [B, P])``: both
        encoders' penultimate states side by side, the second one's projection."""
        states, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder),
                                   (self.tokenizer_2, self.text_encoder_2)):  # fmt: skip
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the text_embeds of CLIPTextModelWithProjection (the last encoder)
        dtype = self.text_encoder_2.dtype
        return torch.cat(states, dim=-1).to(dtype), pooled.to(dtype)

    def encode_prompt(
        self, prompts: list[str], return_pooled: bool = False, **size: Any
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The policy's conditioning of ``prompts``: ``pack_sdxl_cond(embeds, pooled, time_ids)``
        ``[B, L, D + P + 6]``; with ``return_pooled`` also the pooled embeddings ``[B, P]``.
        ``size``: the keyword arguments of :meth:`add_time_ids`."""
        embeds, pooled = self.text_embeddings(prompts)
        time_ids = self.add_time_ids(**size).expand(len(prompts), NUM_TIME_IDS)
        cond = pack_sdxl_cond(embeds, pooled, time_ids)
        return (cond, pooled) if return_pooled else cond

    def negative_cond(
        self, batch: int = 1, negative_prompt: str | list[str] | None = None, **size: Any
    ) -> Tensor:
        """The unconditional conditioning ``[batch, L, D + P + 6]`` of guidance: zeros for the
        embeddings and the pooled vector when ``negative_prompt`` is None and
        ``force_zeros_for_empty_prompt`` (diffusers' default), else the encoded negative
        prompt (``""`` when None); the time ids are the positive ones, as in diffusers."""
        if negative_prompt is None and self.config.force_zeros_for_empty_prompt:
            cond = self.encode_prompt([""], **size)
            d, p = cond.shape[-1] - NUM_TIME_IDS, NUM_TIME_IDS
            cond = torch.cat([torch.zeros_like(cond[..., :d]), cond[..., -p:]], dim=-1)
            return cond.expand(batch, *cond.shape[1:])
        negative = negative_prompt or ""
        negatives = [negative] * batch if isinstance(negative, str) else list(negative)
        if len(negatives) != batch:
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch} prompts")
        return self.encode_prompt(negatives, **size)

    def prompt_cond(
        self,
        prompts: list[str],
        guidance_scale: float,
        negative_prompt: str | list[str] | None = None,
        **size: Any,
    ) -> Tensor:
        """``cond`` for :class:`SDXLPolicy`: ``[B, L, D + P + 6]``, or ``[B, 2, L, D + P + 6]``
        (negative, positive) under guidance (``w != 1``)."""
        positive = self.encode_prompt(prompts, **size)
        if guidance_scale == 1.0:
            return positive
        negative = self.negative_cond(len(prompts), negative_prompt, **size)
        return torch.stack([negative, positive], dim=1)

    def policy(
        self,
        guidance_scale: float = 5.0,
        num_inference_steps: int = 50,
        eta: float = 1.0,
        height: int | None = None,
        width: int | None = None,
    ) -> SDXLPolicy:
        """The forward policy ``P_F`` of this pipeline's UNet and scheduler, sampling latents of
        ``(height, width) / vae_scale_factor``."""
        default, f = self.default_size(), self.vae_scale_factor
        h, w = height or default[0], width or default[1]
        if h % f or w % f:
            raise ValueError(f"height and width must be multiples of {f}, got {h} and {w}")
        return SDXLPolicy(self.unet, self.scheduler, guidance_scale, num_inference_steps, eta,
                          sample_size=(h // f, w // f))  # fmt: skip

    def decode_latents(self, latents: Tensor) -> Tensor:
        """VAE-decode latents ``[B, 4, h, w]`` to images ``[B, 3, H, W]`` in ``[-1, 1]`` (the
        VAE's ``latents_mean``/``latents_std`` if set; a float16 VAE with ``force_upcast`` decodes
        in float32, as diffusers does)."""
        vae, cfg = self.vae, self.vae.config
        upcast = vae.dtype == torch.float16 and cfg.get("force_upcast", False)
        dtype = torch.float32 if upcast else vae.dtype
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        x = latents.to(dtype)
        if mean is not None and std is not None:
            mean, std = (x.new_tensor(v).view(1, -1, 1, 1) for v in (mean, std))
            x = x * std / cfg.scaling_factor + mean
        else:
            x = x / cfg.scaling_factor
        if not upcast:
            return vae.decode(x).sample
        vae.to(torch.float32)
        try:
            return vae.decode(x).sample
        finally:
            vae.to(torch.float16)

    def decode_pred_x0(self, trajectory: Any, steps: list[int] | None = None) -> Tensor:
        """Decoded ``x̂_θ`` of the chosen steps (all by default): ``[B, S, 3, H, W]`` in
        ``[0, 1]``, ready for a reward."""
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
        """Save the UNet adapter so that plain diffusers ``StableDiffusionXLPipeline
        .load_lora_weights`` reads it back."""
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
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_trajectory: bool = False,
        negative_prompt: str | list[str] | None = None,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
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
        prompts = prompt_list(prompt, latents)
        policy = self.policy(guidance_scale, num_inference_steps, eta, height, width)
        check_latents(latents, (len(prompts), *policy.sample_shape))
        size = dict(
            height=height,
            width=width,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
        )
        # 2. sample the trajectory, then decode x_0
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            cond = self.prompt_cond(prompts, guidance_scale, negative_prompt, **size)
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


def _check_parts(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel | None,
    text_encoder_2: CLIPTextModelWithProjection | None,
    tokenizer: CLIPTokenizer | None,
    tokenizer_2: CLIPTokenizer | None,
) -> None:
    """Raise unless the UNet is SDXL's and both text encoders (and tokenizers) fit it."""
    for name, part in (("text_encoder_2", text_encoder_2), ("tokenizer_2", tokenizer_2),
                       ("text_encoder", text_encoder), ("tokenizer", tokenizer)):  # fmt: skip
        if part is None:
            raise ValueError(
                f"SDXL needs {name}: text_encoder_2 is a CLIPTextModelWithProjection whose "
                "projection is the UNet's pooled text_embeds, text_encoder a CLIPTextModel (the "
                "refiner, without text_encoder, is not supported); got None"
            )
    if not is_sdxl_unet(unet):
        raise TypeError(
            "unet must be an SDXL UNet2DConditionModel (addition_embed_type='text_time'), got "
            f"addition_embed_type={unet.config.get('addition_embed_type')!r}; Stable Diffusion "
            "1.x/2.x is SteerStableDiffusionPipeline"
        )
    cfg = unet.config
    width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    added = text_encoder_2.config.projection_dim + NUM_TIME_IDS * cfg.addition_time_embed_dim
    if width != cfg.cross_attention_dim or added != cfg.projection_class_embeddings_input_dim:
        raise ValueError(
            f"the text encoders do not fit the unet: hidden sizes {text_encoder.config.hidden_size}"
            f" + {text_encoder_2.config.hidden_size} vs cross_attention_dim "
            f"{cfg.cross_attention_dim}; projection_dim {text_encoder_2.config.projection_dim} + 6"
            f" x addition_time_embed_dim {cfg.addition_time_embed_dim} vs "
            f"projection_class_embeddings_input_dim {cfg.projection_class_embeddings_input_dim}"
        )
