"""What every Gaussian step policy shares (§2, §2b): the step record, step indices, guidance, the
deterministic-step convention, re-scoring and the frozen prior.

:class:`~steer.diffusion.DiffusionPolicy` (UNets, §2) and :class:`~steer.diffusion.FlowMatchPolicy`
(flow-matching transformers, §2b) subclass :class:`GaussianStepPolicy`; a subclass supplies its
schedule, its denoiser's forward call, the step mean ``(μ_θ, std, x̂_θ)`` and ``P_B``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from steer.diffusion.families import family_of
from steer.diffusion.lora import adapters_disabled, is_adapter_param
from steer.diffusion.schedule import gaussian_log_prob

__all__ = ["StepOutput", "GaussianStepPolicy", "require_frozen", "log_normal_or_zero"]


@dataclass
class StepOutput:
    """One denoising step ``x_t -> x_{t'}``.

    Attributes:
        sample: ``[B, ...]`` ``x_{t'}`` (the reparameterised draw ``mean + std * noise``).
        log_prob: ``[B]`` ``log P_F(sample | x_t)`` (2.5 / 2.8) summed over dims; 0 where
            deterministic.
        mean: ``[B, ...]`` ``μ_θ(x_t)`` (2.4 / 2.8).
        std: ``[B]`` the step's standard deviation (``σ_t`` of 2.3, ``s`` of 2.8).
        pred_x0: ``[B, ...]`` ``x̂_θ(x_t)`` (2.2 / 2.7).
        deterministic: ``[B]`` bool, ``std = 0`` (no density).
    """

    sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor
    pred_x0: Tensor
    deterministic: Tensor

    def log_prob_of(self, x: Tensor) -> Tensor:
        """``log P_F(x | x_t)`` ``[B]`` of this step's Gaussian for another ``x``, 0 where
        ``std = 0``: the same guarded density as ``log_prob``."""
        std = self.std.view(-1, *([1] * (x.ndim - 1)))
        return log_normal_or_zero(x, self.mean, std)[0]


def log_normal_or_zero(x: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """``log N(x; mean, std² I)`` summed over dims, 0 where ``std = 0``:
    ``(log_prob [B], deterministic [B])``; ``std`` is ``[B, 1, ...]``."""
    det = std.flatten() == 0  # [B]
    safe = torch.where(std == 0, torch.ones_like(std), std)
    lp = gaussian_log_prob(x.to(mean.dtype), mean, safe)  # [B]
    return torch.where(det, torch.zeros_like(lp), lp), det


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP / accelerate wrapper (for its config and class)."""
    return getattr(module, "module", module)


class GaussianStepPolicy(nn.Module):
    """A forward policy whose every step is Gaussian, ``P_F(x_{t'} | x_t) = N(μ_θ, std² I)``.

    Subclasses set ``self.scheduler``, ``self.schedule`` (with ``timesteps``, ``noise_steps``,
    ``deterministic``, ``num_steps``, ``eta``), call :meth:`_init_policy`, and implement
    ``denoiser``, ``_make_schedule``, ``_forward``, ``_denoise``, ``_mean``, ``log_pb`` and
    ``_options``.
    """

    # how the ``cond`` of this policy looks, for error messages (``{batch}`` is filled in)
    cond_format = "prompt embeddings [B={batch}, L, D] or [B, 2, L, D] (negative, positive)"

    def _init_policy(
        self, guidance_scale: float, negative_embeds: Tensor | None, use_adapters: bool
    ) -> None:
        """Validate the denoiser's family and the guidance, and set the shared attributes."""
        family = family_of(self.denoiser)  # TypeError naming the known denoisers
        if not isinstance(self, family.policy):
            name = type(_unwrap(self.denoiser)).__name__
            raise TypeError(
                f"a {name} (model family {family.name!r}) is driven by {family.policy.__name__}, "
                f"not {type(self).__name__}; build it with make_policy(denoiser, scheduler)"
            )
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a float >= 0, got {guidance_scale!r}")
        self.guidance_scale = float(guidance_scale)
        self.negative_embeds = negative_embeds
        self.use_adapters = use_adapters
        self.family = family.name
        self.conditional = family.conditional
        object.__setattr__(self, "_deterministic_map", None)  # not a submodule: no shared params
        self.frozen_tail = 0  # the last N steps, stochastic or not, also taken by the map

    # ------------------------------------------------------------------------------------------
    # what a subclass provides
    # ------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        """The diffusers model that this policy drives (a UNet, a transformer)."""
        raise NotImplementedError

    def _make_schedule(self, num_inference_steps: int, eta: float) -> Any:
        raise NotImplementedError

    def _forward(self, x: Tensor, t: Tensor, embeds: Tensor | None) -> Tensor:
        """One (unguided) call of the denoiser at timesteps ``t`` (a scalar or ``[B]``)."""
        raise NotImplementedError

    def _denoise(self, x_t: Tensor, idx: Tensor, cond: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _mean(self, x_t: Tensor, idx: Tensor, cond: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(μ_θ, std [B, 1, ...], x̂_θ)`` of the step at indices ``idx``."""
        raise NotImplementedError

    def log_pb(self, x_t: Tensor, x_next: Tensor, k: int | Tensor) -> Tensor:
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        """The constructor's keyword arguments (besides denoiser, scheduler, use_adapters)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    # the deterministic-step convention (§2)
    # ------------------------------------------------------------------------------------------
    @property
    def deterministic_map(self) -> GaussianStepPolicy | None:
        """The frozen policy whose map ``x_0 = g(x_1)`` replaces this one's at steps with
        ``std = 0``; ``None`` uses this policy's own weights there.

        A deterministic step has no density, so no objective trains it (§2, convention (b): the
        state before it is terminal and its reward is ``R(g(x_1))``). Its map must then stay the
        pretrained one, or the target moves with weights no objective sees: the fine-tuner sets
        it to the frozen prior.
        """
        return self._deterministic_map

    def frozen_steps(self, idx: Tensor | None = None) -> Tensor:
        """Bool ``[K]`` (or at ``idx``): the steps the deterministic map takes — every std = 0
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
    def deterministic_map(self, policy: GaussianStepPolicy | None) -> None:
        if policy is not None:
            if not isinstance(policy, type(self)):
                raise TypeError(
                    f"deterministic_map must be a {type(self).__name__}, "
                    f"got {type(policy).__name__}"
                )
            require_frozen(policy)
            if policy.deterministic_map is not None:
                raise ValueError("the deterministic map must not have a map of its own")
        object.__setattr__(self, "_deterministic_map", policy)

    # ------------------------------------------------------------------------------------------
    # schedule and shapes
    # ------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, eta: float | None = None) -> Any:
        """Set ``K`` and ``η`` (``None`` keeps the current ``η``); returns the new schedule."""
        eta = self.schedule.eta if eta is None else eta
        self.schedule = self._make_schedule(num_inference_steps, eta)
        return self.schedule

    @property
    def num_inference_steps(self) -> int:
        return self.schedule.num_steps

    @property
    def eta(self) -> float:
        return self.schedule.eta

    def _set_sample_size(self, sample_size: int | tuple[int, int] | None) -> None:
        """The latent ``(h, w)`` to sample (one int: square); ``None``: the denoiser's own."""
        if isinstance(sample_size, int) and not isinstance(sample_size, bool):
            sample_size = (sample_size, sample_size)
        if sample_size is not None and (
            not isinstance(sample_size, (tuple, list))
            or len(sample_size) != 2
            or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sample_size
            )
        ):
            raise ValueError(f"sample_size must be an int or (h, w) of ints > 0, got {sample_size}")
        self._sample_size = None if sample_size is None else tuple(sample_size)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one latent: the ``sample_size`` given, else the denoiser's config."""
        cfg = _unwrap(self.denoiser).config
        size = getattr(self, "_sample_size", None) or cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), int(h), int(w))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

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

    # ------------------------------------------------------------------------------------------
    # the denoiser under classifier-free guidance: (2.1) / (2.7)
    # ------------------------------------------------------------------------------------------
    def _embeddings(self, cond: Tensor | None, batch: int) -> tuple[Tensor | None, Tensor | None]:
        """(negative, positive) conditioning ``[B, ...]`` (negative is None without guidance)."""
        if not self.conditional:
            if cond is not None:
                name = type(_unwrap(self.denoiser)).__name__
                raise ValueError(f"cond must be None for an unconditional {name}")
            return None, None
        if not isinstance(cond, Tensor) or cond.ndim not in (3, 4) or cond.shape[0] != batch:
            got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise ValueError(f"cond must be {self.cond_format.format(batch=batch)}, got {got}")
        if cond.ndim == 4:
            return cond[:, 0], cond[:, 1]
        if self.guidance_scale == 1.0:
            return None, cond
        if self.negative_embeds is None:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} needs negative_embeds on the policy or a "
                "cond of shape [B, 2, ...] (negative, positive)"
            )
        return self.negative_embeds.to(cond).expand_as(cond), cond

    def model_output(self, x_t: Tensor, idx: Tensor, cond: Tensor | None) -> Tensor:
        """The denoiser output at step indices ``idx`` ``[B]``, guided per (2.1) / (2.7):
        ``out_u + w (out_c - out_u)`` (before any conversion)."""
        t = self.schedule.timesteps.to(x_t.device)[idx]  # [B]
        t_in = t[0] if bool((t == t[0]).all()) else t
        neg, pos = self._embeddings(cond, x_t.shape[0])
        with adapters_disabled(self.denoiser, enabled=not self.use_adapters):
            if neg is None:
                return self._forward(x_t, t_in, pos)
            both = self._forward(
                torch.cat([x_t, x_t]),
                torch.cat([t, t]) if t_in.ndim else t_in,
                torch.cat([neg, pos]),
            )
        out_u, out_c = both.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def denoise(self, x_t: Tensor, k: int | Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """``(ε̂, x̂_θ)`` at step ``k`` ((2.1)-(2.2), or (2.7) for flow matching)."""
        idx = self._index(k, x_t.shape[0], x_t.device)
        return self._denoise(x_t, idx, cond)

    # ------------------------------------------------------------------------------------------
    # P_F: sampling and re-scoring
    # ------------------------------------------------------------------------------------------
    def step(
        self,
        x_t: Tensor,
        k: int | Tensor,
        cond: Any = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """Sample ``x_{t'} ~ P_F(· | x_t)`` at step ``k`` (index into the schedule).

        ``noise`` (shape of ``x_t``) replaces the draw; otherwise it is drawn from ``generator``
        where diffusers' scheduler draws it. ``log_prob`` scores the detached sample, so its
        gradient is the score of the realised transition; ``sample`` keeps the reparameterised path.
        """
        idx = self._index(k, x_t.shape[0], x_t.device)
        if bool(self.frozen_steps(idx).any()):
            return self._map_for(idx).step(x_t, idx, cond, noise=noise, generator=generator)
        mean, std, x0 = self._mean(x_t, idx, cond)
        if noise is None and bool(self.schedule.noise_steps.to(idx.device)[idx].any()):
            gen_device = generator.device if generator is not None else mean.device
            noise = torch.randn(
                mean.shape, generator=generator, device=gen_device, dtype=mean.dtype
            ).to(mean.device)
        if noise is not None and noise.shape != mean.shape:
            raise ValueError(f"noise must have shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
        sample = mean if noise is None else mean + std * noise.to(mean)
        log_prob, det = log_normal_or_zero(sample.detach(), mean, std)
        return StepOutput(sample, log_prob, mean, std.flatten(), x0, det)

    def _map_for(self, idx: Tensor) -> GaussianStepPolicy:
        """The frozen map, on this policy's schedule, for step indices that it takes."""
        if not bool(self.frozen_steps(idx).all()):
            raise ValueError(
                "a batch of step indices mixes steps of the frozen map (std = 0 or the frozen "
                "tail) with the policy's own; step them in separate calls"
            )
        frozen = self._deterministic_map
        frozen.schedule = self.schedule
        return frozen

    def log_prob(self, x_t: Tensor, x_next: Tensor, k: int | Tensor, cond: Any = None) -> Tensor:
        """``log P_F(x_next | x_t)`` under the current weights, ``[B]``; 0 where ``std = 0``."""
        if x_next.shape != x_t.shape:
            raise ValueError(f"x_next must match x_t {tuple(x_t.shape)}, got {tuple(x_next.shape)}")
        idx = self._index(k, x_t.shape[0], x_t.device)
        if bool(self.frozen_steps(idx).any()):  # the frozen map's density (no gradient to θ)
            return self._map_for(idx).log_prob(x_t, x_next, idx, cond)
        mean, std, _ = self._mean(x_t, idx, cond)
        return log_normal_or_zero(x_next, mean, std)[0]

    # ------------------------------------------------------------------------------------------
    # the frozen prior (RTB, 3.3)
    # ------------------------------------------------------------------------------------------
    @contextmanager
    def adapters_disabled(self) -> Iterator[GaussianStepPolicy]:
        """Within the block the denoiser runs without its peft adapters (the base model)."""
        with adapters_disabled(self.denoiser):
            yield self

    def frozen_prior(self) -> GaussianStepPolicy:
        """The same denoiser with adapters disabled, as a prior sharing the weights; checked
        frozen."""
        prior = type(self)(self.denoiser, self.scheduler, **self._options(), use_adapters=False)
        require_frozen(prior)
        return prior


def require_frozen(prior: GaussianStepPolicy) -> GaussianStepPolicy:
    """Refuse a prior with trainable parameters, naming the first one ((3.3): frozen)."""
    for name, param in prior.denoiser.named_parameters():
        if param.requires_grad and (prior.use_adapters or not is_adapter_param(name)):
            raise ValueError(
                f"the prior must be frozen, but parameter {name!r} requires grad; call "
                "requires_grad_(False) on a separate copy of the denoiser, or train peft "
                "adapters only and use policy.frozen_prior()"
            )
    return prior
