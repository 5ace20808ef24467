"""A diffusers UNet as the forward policy ``P_F`` and the noising process as ``P_B`` (§2)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

from steer.diffusion.base import GaussianStepPolicy, StepOutput, require_frozen
from steer.diffusion.families import ModelFamily, register_family
from steer.diffusion.schedule import StepSchedule, gaussian_log_prob, make_schedule

__all__ = ["StepOutput", "DiffusionPolicy", "require_frozen"]


class DiffusionPolicy(GaussianStepPolicy):
    """``P_F`` of (2.1)-(2.5) for a diffusers UNet and a DDIM / DDPM scheduler; ``P_B`` of (2.6).

    The step interface (``step``, ``log_prob``, ``denoise``, ``set_timesteps``, the deterministic
    map, ``frozen_prior``) is :class:`~steer.diffusion.base.GaussianStepPolicy`'s.

    Args:
        unet: ``UNet2DModel`` (unconditional) or ``UNet2DConditionModel`` (prompt embeddings).
        scheduler: ``DDIMScheduler`` or ``DDPMScheduler``; only its public tables are read.
        guidance_scale: classifier-free guidance ``w`` of (2.1); 1 means no guidance.
        num_inference_steps: ``K``; change with :meth:`set_timesteps`.
        eta: DDIM noise level ``η >= 0`` (1: DDPM posterior variance).
        negative_embeds: ``[1 or B, L, D]`` unconditional embeddings for guidance when ``cond`` is
            ``[B, L, D]``; a ``cond`` of shape ``[B, 2, L, D]`` carries (negative, positive) itself.
        use_adapters: ``False`` runs the UNet with its peft adapters disabled (the frozen prior).
        sample_size: the latent ``(h, w)`` (or one int) when sampling another size than the
            UNet's ``config.sample_size`` (SD 1.5 samples 512² images as 64² latents).
    """

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
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self._set_sample_size(sample_size)
        self._init_policy(guidance_scale, negative_embeds, use_adapters)
        self.schedule = make_schedule(scheduler, num_inference_steps, eta)

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    def _make_schedule(self, num_inference_steps: int, eta: float) -> StepSchedule:
        return make_schedule(self.scheduler, num_inference_steps, eta)

    def _options(self) -> dict[str, object]:
        return dict(
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps,
            eta=self.eta,
            negative_embeds=self.negative_embeds,
            sample_size=self._sample_size,
        )

    def _consts(self, idx: Tensor, ndim: int) -> tuple[Tensor, Tensor, Tensor]:
        """``ᾱ_t``, ``ᾱ_{t'}``, ``σ_t`` at step indices ``idx``, shaped ``[B, 1, ...]``."""
        sched = self.schedule
        shape = (-1,) + (1,) * (ndim - 1)
        pick = [
            getattr(sched, n).to(idx.device)[idx].view(shape) for n in ("alpha_t", "alpha_prev")
        ]
        return pick[0], pick[1], sched.sigma.to(idx.device)[idx].view(shape)

    # ------------------------------------------------------------------------------------------
    # the denoiser: (2.1)-(2.2)
    # ------------------------------------------------------------------------------------------
    def _forward(self, x: Tensor, t: Tensor, embeds: Tensor | None) -> Tensor:
        dtype = self.dtype
        if embeds is None:
            return self.unet(x.to(dtype), t).sample
        return self.unet(x.to(dtype), t, encoder_hidden_states=embeds.to(dtype)).sample

    def _denoise(self, x_t: Tensor, idx: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        # 1. model output, computed in at least float32
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        x = x_t.to(dtype)
        out = self.model_output(x_t, idx, cond).to(dtype)  # [B, ...]
        a_t, _, _ = self._consts(idx, x.ndim)
        sq_a, sq_b = a_t.sqrt(), (1 - a_t).sqrt()
        # 2. convert to (ε̂, x̂): (2.1) for v-prediction, (2.2) otherwise
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            eps, x0 = out, (x - sq_b * out) / sq_a
        elif kind == "v_prediction":
            eps, x0 = sq_a * out + sq_b * x, sq_a * x - sq_b * out
        else:  # sample
            eps, x0 = (x - sq_a * out) / sq_b, out
        # 3. the scheduler's clipping of x̂ (DDPM's posterior mean re-derives ε̂ from it)
        r = self.schedule.clip_sample
        if r is not None:
            x0 = x0.clamp(-r, r)
            if self.schedule.rederive_eps:
                eps = (x - sq_a * x0) / sq_b
        return eps, x0

    # ------------------------------------------------------------------------------------------
    # P_F and P_B
    # ------------------------------------------------------------------------------------------
    def _mean(self, x_t: Tensor, idx: Tensor, cond: Tensor | None) -> tuple[Tensor, ...]:
        """``(μ_θ, σ [B, 1, ...], x̂_θ)`` of (2.3)-(2.4)."""
        eps, x0 = self._denoise(x_t, idx, cond)
        _, a_prev, sigma = self._consts(idx, x_t.ndim)
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt()  # checked >= -1e-6 in schedule
        return a_prev.sqrt() * x0 + direction * eps, sigma, x0

    def log_pb(self, x_t: Tensor, x_next: Tensor, k: int | Tensor) -> Tensor:
        """``log P_B(x_t | x_next)`` of (2.6), the fixed noising step, ``[B]``."""
        if x_next.shape != x_t.shape:
            raise ValueError(f"x_next must match x_t {tuple(x_t.shape)}, got {tuple(x_next.shape)}")
        idx = self._index(k, x_t.shape[0], x_t.device)
        a_t, a_prev, _ = self._consts(idx, x_t.ndim)
        ratio = a_t / a_prev  # [B, 1, ...]
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        return gaussian_log_prob(x_t.to(dtype), ratio.sqrt() * x_next.to(dtype), (1 - ratio).sqrt())


def _no_added_cond(unet: nn.Module) -> bool:
    """A UNet that needs no ``added_cond_kwargs`` (SDXL's ``text_time`` is the ``sdxl`` family)."""
    return unet.config.get("addition_embed_type") in (None, "text")


# the two UNet families of Stable Diffusion 1.x/2.x and of unconditional pixel/latent priors
register_family(ModelFamily("unet", UNet2DModel, DiffusionPolicy, conditional=False))
register_family(
    ModelFamily("unet-text", UNet2DConditionModel, DiffusionPolicy, conditional=True,
                accepts=_no_added_cond, requires="addition_embed_type None or 'text' (SD 1.x/2.x)")
)  # fmt: skip
