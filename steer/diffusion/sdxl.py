"""Stable Diffusion XL's UNet as the forward policy ``P_F`` (§2): the densities of
:class:`~steer.diffusion.DiffusionPolicy`, with SDXL's added conditioning.

An SDXL UNet is a ``UNet2DConditionModel`` with ``config.addition_embed_type == "text_time"``:
besides ``encoder_hidden_states`` ``[B, L, D]`` it takes ``added_cond_kwargs = {"text_embeds":
pooled [B, P], "time_ids": [B, 6]}`` (the pooled projection of the second text encoder; original
size, crop top-left and target size, as diffusers' ``StableDiffusionXLPipeline`` computes them).

Conditioning. As for SD3 (:func:`steer.diffusion.pack_cond`), the policy receives all of it as
**one tensor**, so that :func:`~steer.diffusion.rollout`, :class:`~steer.trajectory.Trajectory`
batch selection, replay buffers and ``negative_embeds`` work unchanged: :func:`pack_sdxl_cond`
appends ``[pooled | time_ids]`` to every token, ``cond = [B, L, D + P + 6]``;
``[B, 2, L, D + P + 6]`` holds (negative, positive) under guidance. Its width is checked against
the UNet's ``cross_attention_dim`` and ``projection_class_embeddings_input_dim`` (``P + 6 ·
addition_time_embed_dim``). :func:`unpack_sdxl_cond` splits it again.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from steer.diffusion.families import ModelFamily, family_of, register_family
from steer.diffusion.flow import pack_cond, unpack_cond
from steer.diffusion.policy import DiffusionPolicy

__all__ = ["NUM_TIME_IDS", "SDXLPolicy", "is_sdxl_unet", "pack_sdxl_cond", "unpack_sdxl_cond"]

NUM_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


def _config(unet: nn.Module) -> object:
    return getattr(unet, "module", unet).config


def is_sdxl_unet(unet: nn.Module) -> bool:
    """A ``UNet2DConditionModel`` with SDXL's ``text_time`` added conditioning."""
    return _config(unet).get("addition_embed_type") == "text_time"


def pack_sdxl_cond(embeds: Tensor, pooled: Tensor, time_ids: Tensor) -> Tensor:
    """``[..., L, D]`` prompt embeddings, ``[..., P]`` pooled embeddings and ``[..., 6]`` time ids
    as one ``[..., L, D + P + 6]`` tensor (every token row carries ``[pooled | time_ids]``)."""
    if time_ids.shape[:-1] != pooled.shape[:-1] or time_ids.shape[-1] != NUM_TIME_IDS:
        raise ValueError(
            f"pack_sdxl_cond needs pooled [..., P] and time_ids [..., {NUM_TIME_IDS}] with the "
            f"same leading dims, got {tuple(pooled.shape)} and {tuple(time_ids.shape)}"
        )
    return pack_cond(embeds, torch.cat([pooled.to(embeds), time_ids.to(embeds)], dim=-1))


def unpack_sdxl_cond(cond: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split :func:`pack_sdxl_cond`'s ``[..., L, D + P + 6]`` into ``(embeds [..., L, D],
    pooled [..., P], time_ids [..., 6])``."""
    embeds, extra = unpack_cond(cond, pooled_dim + NUM_TIME_IDS)
    return embeds, extra[..., :pooled_dim], extra[..., pooled_dim:]


class SDXLPolicy(DiffusionPolicy):
    """``P_F`` of (2.1)-(2.5) for an SDXL UNet and a DDIM / DDPM scheduler; ``P_B`` of (2.6).

    The densities, the schedule and the step interface are :class:`DiffusionPolicy`'s; only the
    UNet call differs: ``cond`` is packed (module docstring) and unpacked into
    ``encoder_hidden_states`` and ``added_cond_kwargs``.

    Args:
        unet: a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``.
        scheduler, guidance_scale, num_inference_steps, eta, use_adapters: as
            :class:`DiffusionPolicy`'s.
        negative_embeds: ``[1 or B, L, D + P + 6]`` packed unconditional conditioning for
            guidance when ``cond`` is ``[B, L, D + P + 6]``.
        sample_size: the latent ``(h, w)`` (or one int) when sampling another size than the
            UNet's ``config.sample_size`` (SDXL samples 1024² images as 128² latents).
    """

    cond_format = (
        "packed conditioning [B={batch}, L, D + P + 6] (steer.diffusion.pack_sdxl_cond(embeds, "
        "pooled, time_ids)) or [B, 2, L, D + P + 6] (negative, positive)"
    )

    def __init__(
        self,
        unet: nn.Module,
        scheduler: DDIMScheduler | DDPMScheduler,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        eta: float = 1.0,
        negative_embeds: Tensor | None = None,
        use_adapters: bool = True,
        sample_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            unet,
            scheduler,
            guidance_scale,
            num_inference_steps,
            eta,
            negative_embeds,
            use_adapters,
            sample_size,
        )

    def _init_policy(
        self, guidance_scale: float, negative_embeds: Tensor | None, use_adapters: bool
    ) -> None:
        family = family_of(self.denoiser)  # TypeError naming the known denoisers
        if not issubclass(family.policy, SDXLPolicy):  # e.g. an SD 1.x UNet
            name = type(getattr(self.denoiser, "module", self.denoiser)).__name__
            kind = _config(self.denoiser).get("addition_embed_type")
            raise TypeError(
                f"SDXLPolicy drives a UNet2DConditionModel with addition_embed_type='text_time' "
                f"(SDXL); this {name} has addition_embed_type={kind!r} (model family "
                f"{family.name!r}): build it with {family.policy.__name__} or "
                "make_policy(unet, scheduler)"
            )
        if _config(self.denoiser).get("time_cond_proj_dim") is not None:
            raise ValueError(
                "an SDXL UNet with time_cond_proj_dim (a guidance-embedding, LCM-distilled model) "
                "is not supported: it needs timestep_cond, which SDXLPolicy does not compute"
            )
        super()._init_policy(guidance_scale, negative_embeds, use_adapters)

    @property
    def cond_widths(self) -> tuple[int, int]:
        """``(D, P)``: the UNet's cross-attention width and pooled-embedding width."""
        cfg = _config(self.unet)
        pooled = int(cfg.projection_class_embeddings_input_dim) - NUM_TIME_IDS * int(
            cfg.addition_time_embed_dim
        )
        return int(cfg.cross_attention_dim), pooled

    def _forward(self, x: Tensor, t: Tensor, embeds: Tensor | None) -> Tensor:
        """One unguided UNet call: ``cond`` unpacked into its three parts."""
        dtype, (d, p) = self.dtype, self.cond_widths
        if embeds.shape[-1] != d + p + NUM_TIME_IDS:
            raise ValueError(
                f"cond must be packed [..., L, D + P + 6 = {d} + {p} + {NUM_TIME_IDS}] "
                "(steer.diffusion.pack_sdxl_cond(prompt_embeds, pooled_prompt_embeds, "
                f"add_time_ids)), got width {embeds.shape[-1]}"
            )
        hidden, pooled, time_ids = unpack_sdxl_cond(embeds.to(dtype), p)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        out = self.unet(
            x.to(dtype), t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False
        )
        return out[0]


# Stable Diffusion XL: a UNet2DConditionModel with text_time added conditioning
register_family(
    ModelFamily("sdxl", UNet2DConditionModel, SDXLPolicy, conditional=True, accepts=is_sdxl_unet,
                requires="addition_embed_type 'text_time' (SDXL)")
)  # fmt: skip
