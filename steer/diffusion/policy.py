"""A diffusers UNet as the forward policy ``P_F`` and the noising process as ``P_B`` (§2)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

from steer.diffusion.families import ModelFamily, family_of, register_family
from steer.diffusion.lora import adapters_disabled, is_adapter_param
from steer.diffusion.schedule import StepSchedule, gaussian_log_prob, make_schedule

__all__ = ["StepOutput", "DiffusionPolicy", "require_frozen"]


@dataclass
class StepOutput:
    """One denoising step ``x_t -> x_{t'}``.

    Attributes:
        sample: ``[B, ...]`` ``x_{t'}`` (the reparameterised draw ``mean + std * noise``).
        log_prob: ``[B]`` ``log P_F(sample | x_t)`` (2.5) summed over dims; 0 where deterministic.
        mean: ``[B, ...]`` ``μ_θ(x_t)`` (2.4).
        std: ``[B]`` ``σ_t`` (2.3).
        pred_x0: ``[B, ...]`` ``x̂_θ(x_t)`` (2.2).
        deterministic: ``[B]`` bool, ``σ_t = 0`` (no density).
    """

    sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor
    pred_x0: Tensor
    deterministic: Tensor

    def log_prob_of(self, x: Tensor) -> Tensor:
        """``log P_F(x | x_t)`` ``[B]`` of this step's Gaussian for another ``x`` (2.5), 0 where
        ``σ = 0``: the same guarded density as ``log_prob``."""
        std = self.std.view(-1, *([1] * (x.ndim - 1)))
        return DiffusionPolicy._log_normal(x, self.mean, std)[0]


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP / accelerate wrapper (for its config and class)."""
    return getattr(module, "module", module)


class DiffusionPolicy(nn.Module):
    """``P_F`` of (2.1)-(2.5) for a diffusers UNet and a DDIM / DDPM scheduler; ``P_B`` of (2.6).

    Args:
        unet: ``UNet2DModel`` (unconditional) or ``UNet2DConditionModel`` (prompt embeddings).
        scheduler: ``DDIMScheduler`` or ``DDPMScheduler``; only its public tables are read.
        guidance_scale: classifier-free guidance ``w`` of (2.1); 1 means no guidance.
        num_inference_steps: ``K``; change with :meth:`set_timesteps`.
        eta: DDIM noise level ``η >= 0`` (1: DDPM posterior variance).
        negative_embeds: ``[1 or B, L, D]`` unconditional embeddings for guidance when ``cond`` is
            ``[B, L, D]``; a ``cond`` of shape ``[B, 2, L, D]`` carries (negative, positive) itself.
        use_adapters: ``False`` runs the UNet with its peft adapters disabled (the frozen prior).
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
    ) -> None:
        super().__init__()
        family = family_of(unet)  # TypeError naming the known denoisers
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a float >= 0, got {guidance_scale!r}")
        self.unet = unet
        self.scheduler = scheduler
        self.guidance_scale = float(guidance_scale)
        self.negative_embeds = negative_embeds
        self.use_adapters = use_adapters
        self.family = family.name
        self.conditional = family.conditional
        self.schedule = make_schedule(scheduler, num_inference_steps, eta)
        object.__setattr__(self, "_deterministic_map", None)  # not a submodule: no shared params
        self.frozen_tail = 0  # the last N steps, stochastic or not, also taken by the map

    # ------------------------------------------------------------------------------------------
    # the deterministic-step convention (§2)
    # ------------------------------------------------------------------------------------------
    @property
    def deterministic_map(self) -> DiffusionPolicy | None:
        """The frozen policy whose map ``x_0 = g(x_1)`` replaces this one's at steps with
        ``σ = 0``; ``None`` uses this policy's own weights there.

        A deterministic step has no density, so no objective trains it (§2, convention (b): the
        state before it is terminal and its reward is ``R(g(x_1))``). Its map must then stay the
        pretrained one, or the target moves with weights no objective sees: the fine-tuner sets
        it to the frozen prior.
        """
        return self._deterministic_map

    def frozen_steps(self, idx: Tensor | None = None) -> Tensor:
        """Bool ``[K]`` (or at ``idx``): the steps the deterministic map takes — every σ = 0
        step and the last ``frozen_tail`` steps; all False without a map."""
        sched = self.schedule
        k = torch.arange(sched.num_steps)
        mask = sched.deterministic.cpu() | (k >= sched.num_steps - self.frozen_tail)
        if self._deterministic_map is None:
            mask = torch.zeros_like(mask)
        return mask if idx is None else mask.to(idx.device)[idx]

    def trainable_steps(self) -> list[int]:
        """The steps whose transition this policy's own weights take (the rest: the map)."""
        return (~self.frozen_steps()).nonzero().flatten().tolist()

    def __setattr__(self, name: str, value: object) -> None:
        if name == "deterministic_map":  # nn.Module would register a module value as a child
            type(self).deterministic_map.fset(self, value)
            return
        super().__setattr__(name, value)

    @deterministic_map.setter
    def deterministic_map(self, policy: DiffusionPolicy | None) -> None:
        if policy is not None:
            if not isinstance(policy, DiffusionPolicy):
                raise TypeError(
                    f"deterministic_map must be a DiffusionPolicy, got {type(policy).__name__}"
                )
            require_frozen(policy)
            if policy.deterministic_map is not None:
                raise ValueError("the deterministic map must not have a map of its own")
        object.__setattr__(self, "_deterministic_map", policy)

    # ------------------------------------------------------------------------------------------
    # schedule and shapes
    # ------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, eta: float | None = None) -> StepSchedule:
        """Set ``K`` and ``η`` (``None`` keeps the current ``η``); returns the new schedule."""
        eta = self.schedule.eta if eta is None else eta
        self.schedule = make_schedule(self.scheduler, num_inference_steps, eta)
        return self.schedule

    @property
    def num_inference_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def eta(self) -> float:
        return self.schedule.eta

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one latent, from the UNet config."""
        cfg = _unwrap(self.unet).config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), int(h), int(w))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _index(self, k: int | Tensor, batch: int, device: torch.device) -> Tensor:
        """Step indices as a ``[B]`` long tensor, validated against ``K``."""
        n = self.schedule.num_steps
        if isinstance(k, Tensor):
            if k.dtype not in (torch.int32, torch.int64) or k.ndim > 1:
                raise TypeError(
                    f"k must be an int or a [B] integer tensor, got {k.dtype} {k.shape}"
                )
            idx = k.to(device=device, dtype=torch.long).expand(batch)
        elif isinstance(k, int) and not isinstance(k, bool):
            if not 0 <= k < n:
                raise ValueError(f"step index k must be in [0, {n - 1}] (K={n} steps), got {k}")
            return torch.full((batch,), k, dtype=torch.long, device=device)
        else:
            raise TypeError(f"k must be an int or a [B] integer tensor, got {type(k).__name__}")
        if bool(((idx < 0) | (idx >= n)).any()):
            raise ValueError(f"step index k must be in [0, {n - 1}] (K={n} steps), got {k}")
        return idx

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
    def _embeddings(self, cond: Tensor | None, batch: int) -> tuple[Tensor | None, Tensor | None]:
        """(negative, positive) embeddings ``[B, L, D]`` (negative is None without guidance)."""
        if not self.conditional:
            if cond is not None:
                raise ValueError(
                    f"cond must be None for an unconditional {type(_unwrap(self.unet)).__name__}"
                )
            return None, None
        if not isinstance(cond, Tensor) or cond.ndim not in (3, 4) or cond.shape[0] != batch:
            got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise ValueError(
                f"cond must be prompt embeddings [B={batch}, L, D] or "
                f"[B, 2, L, D] (negative, positive), got {got}"
            )
        if cond.ndim == 4:
            return cond[:, 0], cond[:, 1]
        if self.guidance_scale == 1.0:
            return None, cond
        if self.negative_embeds is None:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} needs negative_embeds on the policy or a "
                "cond of shape [B, 2, L, D]"
            )
        return self.negative_embeds.to(cond).expand_as(cond), cond

    def _unet(self, x: Tensor, t: Tensor, embeds: Tensor | None) -> Tensor:
        dtype = self.dtype
        if embeds is None:
            return self.unet(x.to(dtype), t).sample
        return self.unet(x.to(dtype), t, encoder_hidden_states=embeds.to(dtype)).sample

    def model_output(self, x_t: Tensor, idx: Tensor, cond: Tensor | None) -> Tensor:
        """The UNet output at step indices ``idx`` ``[B]``, guided per (2.1) (before conversion)."""
        t = self.schedule.timesteps.to(x_t.device)[idx]  # [B]
        t_in = t[0] if bool((t == t[0]).all()) else t
        neg, pos = self._embeddings(cond, x_t.shape[0])
        with adapters_disabled(self.unet, enabled=not self.use_adapters):
            if neg is None:
                return self._unet(x_t, t_in, pos)
            both = self._unet(
                torch.cat([x_t, x_t]),
                torch.cat([t, t]) if t_in.ndim else t_in,
                torch.cat([neg, pos]),
            )
        out_u, out_c = both.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def denoise(
        self, x_t: Tensor, k: int | Tensor, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(ε̂, x̂_θ)`` of (2.1)-(2.2) at step ``k``, with the scheduler's clipping of ``x̂``."""
        idx = self._index(k, x_t.shape[0], x_t.device)
        return self._denoise(x_t, idx, cond)

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

    @staticmethod
    def _log_normal(x: Tensor, mean: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(2.5) summed over dims, 0 where ``σ = 0``: ``(log_prob [B], deterministic [B])``."""
        det = sigma.flatten() == 0  # [B]
        safe = torch.where(sigma == 0, torch.ones_like(sigma), sigma)
        lp = gaussian_log_prob(x.to(mean.dtype), mean, safe)  # [B]
        return torch.where(det, torch.zeros_like(lp), lp), det

    def step(
        self,
        x_t: Tensor,
        k: int | Tensor,
        cond: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """Sample ``x_{t'} ~ P_F(· | x_t)`` (2.5) at step ``k`` (index into the schedule).

        ``noise`` (shape of ``x_t``) replaces the draw; otherwise it is drawn from ``generator``
        where diffusers' scheduler draws it. ``log_prob`` scores the detached sample, so its
        gradient is the score of the realised transition; ``sample`` keeps the reparameterised path.
        """
        idx = self._index(k, x_t.shape[0], x_t.device)
        if bool(self.frozen_steps(idx).any()):
            return self._step_with_map(x_t, idx, cond, noise, generator)
        mean, sigma, x0 = self._mean(x_t, idx, cond)
        if noise is None and bool(self.schedule.noise_steps.to(idx.device)[idx].any()):
            gen_device = generator.device if generator is not None else mean.device
            noise = torch.randn(
                mean.shape, generator=generator, device=gen_device, dtype=mean.dtype
            ).to(mean.device)
        if noise is not None and noise.shape != mean.shape:
            raise ValueError(f"noise must have shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
        sample = mean if noise is None else mean + sigma * noise.to(mean)
        log_prob, det = self._log_normal(sample.detach(), mean, sigma)
        return StepOutput(sample, log_prob, mean, sigma.flatten(), x0, det)

    def _map_for(self, idx: Tensor) -> DiffusionPolicy:
        """The frozen map, on this policy's schedule, for step indices that it takes."""
        if not bool(self.frozen_steps(idx).all()):
            raise ValueError(
                "a batch of step indices mixes steps of the frozen map (σ = 0 or the frozen "
                "tail) with the policy's own; step them in separate calls"
            )
        frozen = self._deterministic_map
        frozen.schedule = self.schedule
        return frozen

    def _step_with_map(
        self,
        x_t: Tensor,
        idx: Tensor,
        cond: Tensor | None,
        noise: Tensor | None,
        generator: torch.Generator | None,
    ) -> StepOutput:
        """A step taken by the frozen map, under this policy's schedule."""
        return self._map_for(idx).step(x_t, idx, cond, noise=noise, generator=generator)

    def log_prob(
        self, x_t: Tensor, x_next: Tensor, k: int | Tensor, cond: Tensor | None = None
    ) -> Tensor:
        """``log P_F(x_next | x_t)`` (2.5) under the current weights, ``[B]``; 0 where ``σ = 0``."""
        if x_next.shape != x_t.shape:
            raise ValueError(f"x_next must match x_t {tuple(x_t.shape)}, got {tuple(x_next.shape)}")
        idx = self._index(k, x_t.shape[0], x_t.device)
        if bool(self.frozen_steps(idx).any()):  # the frozen map's density (no gradient to θ)
            return self._map_for(idx).log_prob(x_t, x_next, idx, cond)
        mean, sigma, _ = self._mean(x_t, idx, cond)
        return self._log_normal(x_next, mean, sigma)[0]

    def log_pb(self, x_t: Tensor, x_next: Tensor, k: int | Tensor) -> Tensor:
        """``log P_B(x_t | x_next)`` of (2.6), the fixed noising step, ``[B]``."""
        if x_next.shape != x_t.shape:
            raise ValueError(f"x_next must match x_t {tuple(x_t.shape)}, got {tuple(x_next.shape)}")
        idx = self._index(k, x_t.shape[0], x_t.device)
        a_t, a_prev, _ = self._consts(idx, x_t.ndim)
        ratio = a_t / a_prev  # [B, 1, ...]
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        return gaussian_log_prob(x_t.to(dtype), ratio.sqrt() * x_next.to(dtype), (1 - ratio).sqrt())

    # ------------------------------------------------------------------------------------------
    # the frozen prior (RTB, 3.3)
    # ------------------------------------------------------------------------------------------
    @contextmanager
    def adapters_disabled(self) -> Iterator[DiffusionPolicy]:
        """Within the block the UNet runs without its peft adapters (the base model)."""
        with adapters_disabled(self.unet):
            yield self

    def frozen_prior(self) -> DiffusionPolicy:
        """The same UNet with adapters disabled, as a prior sharing the weights; checked frozen."""
        prior = DiffusionPolicy(
            self.unet,
            self.scheduler,
            self.guidance_scale,
            self.num_inference_steps,
            self.eta,
            self.negative_embeds,
            use_adapters=False,
        )
        require_frozen(prior)
        return prior


def require_frozen(prior: DiffusionPolicy) -> DiffusionPolicy:
    """Refuse a prior with trainable parameters, naming the first one ((3.3): frozen)."""
    for name, param in prior.unet.named_parameters():
        if param.requires_grad and (prior.use_adapters or not is_adapter_param(name)):
            raise ValueError(
                f"the prior must be frozen, but parameter {name!r} requires grad; call "
                "prior.unet.requires_grad_(False) on a separate copy, or train peft adapters "
                "only and use policy.frozen_prior()"
            )
    return prior


# the two UNet families of Stable Diffusion 1.x/2.x and of unconditional pixel/latent priors
register_family(ModelFamily("unet", UNet2DModel, DiffusionPolicy, conditional=False))
register_family(ModelFamily("unet-text", UNet2DConditionModel, DiffusionPolicy, conditional=True))
