"""Gaussian step densities of a diffusion sampler, from a diffusers scheduler's public tables.

Only ``alphas_cumprod``, the ``timesteps`` list that ``set_timesteps`` produces and the scheduler's
``config`` are read; no private helper and no scheduler ``step`` is used. Equation numbers refer to
docs/mathematics.md §2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from steer.ops import log_normal


@dataclass(frozen=True)
class SchedulerKind:
    """What a supported diffusers scheduler class means for the step densities of §2.

    Attributes:
        cls: the diffusers class.
        final_alpha: ``ᾱ`` after the last step, from the scheduler (and its ``alphas_cumprod``).
        noise_steps: ``[K]`` bool from ``(timesteps, eta)``: where diffusers' own ``step`` draws
            noise (so that a generator's stream matches diffusers').
        rederive_eps: recompute ``ε̂`` from the clipped ``x̂_θ`` (DDPM's posterior mean does).
        variance_types: the ``config.variance_type`` values it supports (``None``: any).
    """

    cls: type
    final_alpha: Callable[[object, Tensor], Tensor]
    noise_steps: Callable[[Tensor, float], Tensor]
    rederive_eps: bool = False
    variance_types: tuple[str, ...] | None = None


# every scheduler steer computes densities for, in one place; a new one is one entry here
SCHEDULERS: dict[str, SchedulerKind] = {
    "DDIMScheduler": SchedulerKind(
        DDIMScheduler,
        final_alpha=lambda s, acp: torch.tensor(1.0) if s.config.set_alpha_to_one else acp[0],
        noise_steps=lambda t, eta: torch.full(t.shape, eta > 0),
    ),
    "DDPMScheduler": SchedulerKind(
        DDPMScheduler,
        final_alpha=lambda s, acp: torch.tensor(1.0),  # DDPM ends at ᾱ = 1
        noise_steps=lambda t, eta: (t > 0) & (eta > 0),
        rederive_eps=True,
        variance_types=("fixed_small", "fixed_small_log"),  # the posterior variance, η = 1
    ),
}
SUPPORTED_SCHEDULERS = tuple(SCHEDULERS)
# Stable Diffusion's noise schedule (SD 1.x / 2.x, SDXL): scaled-linear betas, offset 1, the last
# step to ᾱ_1 (not 1), no clipping: the published scheduler configs of those models
SD_NOISE_SCHEDULE: dict[str, object] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SUPPORTED_SPACINGS = ("leading", "trailing", "linspace")

__all__ = [
    "StepSchedule",
    "make_schedule",
    "check_scheduler",
    "scheduler_kind",
    "scheduler_from_config",
    "SCHEDULERS",
    "SD_NOISE_SCHEDULE",
    "gaussian_log_prob",
    "SUPPORTED_SCHEDULERS",
    "SUPPORTED_PREDICTION_TYPES",
    "SUPPORTED_SPACINGS",
]


@dataclass(frozen=True)
class StepSchedule:
    """The per-step constants of one sampling schedule (``K`` steps, sampling order).

    Attributes:
        timesteps: ``[K]`` ``t_K, ..., t_1`` (int64), the timestep of each step's start state.
        alpha_t: ``[K]`` ``ᾱ_t`` at the start of each step.
        alpha_prev: ``[K]`` ``ᾱ_{t'}`` at its end (the next list entry; the final alpha last).
        sigma: ``[K]`` ``σ_t`` of (2.3); 0 marks a deterministic step.
        eta: the DDIM noise level ``η``.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        clip_sample: clamp range of ``x̂_θ`` (``None`` when the scheduler does not clip).
        rederive_eps: recompute ``ε̂`` from the clipped ``x̂_θ`` (DDPM's posterior mean does).
        noise_steps: ``[K]`` bool, the steps where diffusers' own scheduler draws noise.
    """

    timesteps: Tensor
    alpha_t: Tensor
    alpha_prev: Tensor
    sigma: Tensor
    eta: float
    prediction_type: str
    clip_sample: float | None
    rederive_eps: bool
    noise_steps: Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def deterministic(self) -> Tensor:
        """``[K]`` bool: steps with ``σ = 0`` (no density)."""
        return self.sigma == 0

    def to(self, device: torch.device | str) -> StepSchedule:
        moved = {
            name: getattr(self, name).to(device)
            for name in ("timesteps", "alpha_t", "alpha_prev", "sigma", "noise_steps")
        }
        return StepSchedule(
            eta=self.eta,
            prediction_type=self.prediction_type,
            clip_sample=self.clip_sample,
            rederive_eps=self.rederive_eps,
            **moved,
        )


def scheduler_kind(scheduler: object) -> SchedulerKind:
    """The registry entry of ``scheduler``'s class; ``TypeError`` naming the supported ones."""
    kind = SCHEDULERS.get(type(scheduler).__name__)
    if kind is None or not isinstance(scheduler, kind.cls):
        raise TypeError(
            f"scheduler must be one of {SUPPORTED_SCHEDULERS}, got {type(scheduler).__name__}; "
            "convert it with DDIMScheduler.from_config(scheduler.config)"
        )
    return kind


def scheduler_from_config(config: dict, name: str | None = None, **overrides: object):
    """A supported scheduler built from a diffusers scheduler ``config``: the class ``name``, or
    the config's own ``_class_name``; ``ValueError`` naming the supported ones otherwise."""
    name = name or config.get("_class_name", "")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not supported; choose one of "
                         f"{', '.join(SUPPORTED_SCHEDULERS)}")  # fmt: skip
    return SCHEDULERS[name].cls.from_config(config, **overrides)


def check_scheduler(scheduler: object) -> None:
    """Raise unless ``scheduler`` is a supported scheduler (``SCHEDULERS``) with supported
    options."""
    kind = scheduler_kind(scheduler)
    cfg = scheduler.config
    if cfg.prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise ValueError(
            f"scheduler prediction_type={cfg.prediction_type!r} is not supported; "
            f"expected one of {SUPPORTED_PREDICTION_TYPES}"
        )
    if cfg.timestep_spacing not in SUPPORTED_SPACINGS:
        raise ValueError(
            f"scheduler timestep_spacing={cfg.timestep_spacing!r} is not supported; "
            f"expected one of {SUPPORTED_SPACINGS}"
        )
    if getattr(cfg, "thresholding", False):
        raise ValueError(
            "scheduler thresholding=True is not supported; expected thresholding=False"
        )
    if kind.variance_types is not None and cfg.variance_type not in kind.variance_types:
        raise ValueError(
            f"{type(scheduler).__name__} variance_type={cfg.variance_type!r} is not supported; "
            f"expected one of {kind.variance_types} (the posterior variance, η = 1)"
        )


def _check_steps(num_inference_steps: object, num_train: int) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(
            f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}"
        )
    if not 1 <= num_inference_steps <= num_train:
        raise ValueError(
            f"num_inference_steps must be in [1, {num_train}] (the training steps), "
            f"got {num_inference_steps}"
        )
    return num_inference_steps


def _check_eta(eta: object) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float >= 0, got {type(eta).__name__}")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite float >= 0, got {eta}")
    return float(eta)


def make_schedule(
    scheduler: DDIMScheduler | DDPMScheduler, num_inference_steps: int, eta: float
) -> StepSchedule:
    """Build the constants of (2.3)-(2.6) for ``num_inference_steps`` steps at noise level ``η``.

    The previous timestep ``t'`` of each step is the next entry of ``scheduler.timesteps`` (§2),
    and the scheduler's own final alpha after the last one.

    Raises:
        TypeError / ValueError: unsupported scheduler or option, steps outside ``[1, T]``,
            ``eta < 0``, or an ``η`` so large that ``1 - ᾱ_{t'} - σ_t² < 0`` (2.4).
    """
    # 1. validate the scheduler and the arguments
    check_scheduler(scheduler)
    num_train = int(scheduler.config.num_train_timesteps)
    k = _check_steps(num_inference_steps, num_train)
    eta = _check_eta(eta)
    # 2. the actual timestep list (public set_timesteps) and the final alpha
    scheduler.set_timesteps(k)
    timesteps = scheduler.timesteps.detach().to("cpu", torch.int64)  # [K]
    if timesteps.numel() > 1 and not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"scheduler timesteps must strictly decrease, got {timesteps.tolist()}")
    acp = scheduler.alphas_cumprod.detach().to("cpu", torch.float32)  # [T]
    kind = scheduler_kind(scheduler)
    final = kind.final_alpha(scheduler, acp)
    # 3. ᾱ_t and ᾱ_{t'} (t' = next list entry)
    alpha_t = acp[timesteps]  # [K]
    alpha_prev = torch.cat([acp[timesteps[1:]], final.reshape(1).float()])  # [K]
    # 4. σ_t² of (2.3), in the same float32 order as diffusers
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)  # [K]
    sigma = eta * variance.clamp(min=0).sqrt()  # [K]
    # 5. the coefficient of ε̂ in (2.4) must be real
    direction = 1 - alpha_prev - sigma**2
    if bool((direction < -1e-6).any()):
        bad = int((direction < -1e-6).nonzero()[0, 0])
        raise ValueError(
            f"eta={eta} is too large: 1 - ᾱ_t' - σ_t² < 0 at timestep {int(timesteps[bad])}; "
            "use eta <= 1 (the DDPM posterior variance)"
        )
    # 6. where diffusers' scheduler draws noise (for identical generator streams)
    noise_steps = kind.noise_steps(timesteps, eta)  # [K] bool
    cfg = scheduler.config
    return StepSchedule(
        timesteps=timesteps,
        alpha_t=alpha_t,
        alpha_prev=alpha_prev,
        sigma=sigma,
        eta=eta,
        prediction_type=cfg.prediction_type,
        clip_sample=float(cfg.clip_sample_range) if cfg.clip_sample else None,
        rederive_eps=kind.rederive_eps,
        noise_steps=noise_steps,
    )


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x; mean, std² I)`` summed over every non-batch dim (§2), shape ``[B]``.

    ``std`` broadcasts against ``x`` (e.g. ``[B, 1, 1, 1]``) and must be positive. This is
    :func:`steer.ops.log_normal` with the whole sample ``[C, H, W]`` as one event, summed per
    element (the accurate form for large events).
    """
    return log_normal(x, mean, std, event_dims=x.ndim - 1, elementwise=True)  # [B]
