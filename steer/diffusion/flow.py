"""A flow-matching transformer (SD3) as the forward policy ``P_F``, the noising kernel as ``P_B``
(§2b).

The step densities come from ``FlowMatchEulerDiscreteScheduler``'s public tables only: its
``sigmas`` and ``timesteps`` after ``set_timesteps`` (which apply its ``shift``) and its
``config``; its ``step`` is never called. These tables live here, not in
:data:`steer.diffusion.schedule.SCHEDULERS`: a :class:`~steer.diffusion.schedule.SchedulerKind`
is built on ``alphas_cumprod`` and a final ``ᾱ``, which a flow-matching scheduler does not have.

Conditioning. An SD3 transformer takes ``encoder_hidden_states`` ``[B, L, D]`` and
``pooled_projections`` ``[B, P]``. The policy receives both as **one tensor** (so that
:func:`~steer.diffusion.rollout`, :class:`~steer.trajectory.Trajectory` batch selection, replay
buffers and ``negative_embeds`` work unchanged): :func:`pack_cond` appends the pooled vector to
every token's features, ``cond = [B, L, D + P]`` (its width, checked against the transformer's
``joint_attention_dim + pooled_projection_dim``, tells it from bare embeddings; the cost is
``L·P`` more numbers per prompt); under guidance ``[B, 2, L, D + P]`` holds (negative,
positive), or ``negative_embeds`` ``[1 or B, L, D + P]`` sits on the policy.
:func:`unpack_cond` splits it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn

from steer.diffusion.base import GaussianStepPolicy
from steer.diffusion.families import ModelFamily, register_family
from steer.diffusion.schedule import gaussian_log_prob

__all__ = [
    "FLOW_SCHEDULERS",
    "SDES",
    "FlowMatchPolicy",
    "FlowSchedule",
    "check_flow_scheduler",
    "make_flow_schedule",
    "pack_cond",
    "unpack_cond",
]

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
SDES = ("ddim", "flow-grpo")  # (2.8) with noise η ∈ [0, 1]; Flow-GRPO's SDE with noise a >= 0


# ----------------------------------------------------------------------------------------------
# conditioning: (embeds, pooled) <-> one tensor
# ----------------------------------------------------------------------------------------------
def pack_cond(embeds: Tensor, pooled: Tensor) -> Tensor:
    """``[..., L, D]`` prompt embeddings and ``[..., P]`` pooled embeddings as one
    ``[..., L, D + P]`` tensor (every token row carries the pooled vector after its own ``D``).
    The leading dims are ``[B]`` or ``[B, 2]`` (negative, positive)."""
    if embeds.ndim < 3 or pooled.shape[:-1] != embeds.shape[:-2]:
        raise ValueError(
            f"pack_cond needs embeds [..., L, D] and pooled [..., P] with the same leading dims, "
            f"got {tuple(embeds.shape)} and {tuple(pooled.shape)}"
        )
    rows = pooled.to(embeds).unsqueeze(-2).expand(*embeds.shape[:-1], pooled.shape[-1])
    return torch.cat([embeds, rows], dim=-1)  # [..., L, D + P]


def unpack_cond(cond: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """Split :func:`pack_cond`'s ``[..., L, D + P]`` into ``(embeds [..., L, D],
    pooled [..., P])``."""
    if cond.ndim < 3 or cond.shape[-1] <= pooled_dim:
        raise ValueError(
            f"cond must be packed [..., L, D + {pooled_dim}] (pack_cond(embeds, pooled)), "
            f"got {tuple(cond.shape)}"
        )
    return cond[..., :-pooled_dim], cond[..., 0, -pooled_dim:]


# ----------------------------------------------------------------------------------------------
# the schedule: (2.8), (2.9) and Flow-GRPO's SDE from the scheduler's sigmas
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowSchedule:
    """The per-step constants of one flow-matching sampling schedule (``K`` steps).

    The step mean is linear in the state and the (guided) velocity, ``μ = c_x x + c_v v̂``.

    Attributes:
        timesteps: ``[K]`` float, the scheduler's timesteps (``σ · T``), the transformer's input.
        sigma: ``[K]`` ``σ`` of each step's start state.
        sigma_next: ``[K]`` ``σ'`` at its end (the next list entry; 0 or ``sigma_min`` last).
        std: ``[K]`` the step's standard deviation (``s`` of (2.8), or Flow-GRPO's); 0 marks a
            deterministic step.
        coef_x, coef_v: ``[K]`` ``c_x``, ``c_v`` of the mean.
        pb_scale, pb_std: ``[K]`` ``a`` and ``b`` of ``P_B(x_σ | x_σ') = N(a x_σ', b² I)`` (2.9).
        eta: the noise level (``η`` of (2.8), or Flow-GRPO's ``a``).
        sde: ``"ddim"`` (2.8) or ``"flow-grpo"``.
        noise_steps: ``[K]`` bool, the steps where noise is drawn (``std > 0``).
    """

    timesteps: Tensor
    sigma: Tensor
    sigma_next: Tensor
    std: Tensor
    coef_x: Tensor
    coef_v: Tensor
    pb_scale: Tensor
    pb_std: Tensor
    eta: float
    sde: str
    noise_steps: Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def deterministic(self) -> Tensor:
        """``[K]`` bool: steps with ``std = 0`` (no density)."""
        return self.std == 0

    def to(self, device: torch.device | str) -> FlowSchedule:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in moved.items() if torch.is_tensor(v)})


def check_flow_scheduler(scheduler: object) -> None:
    """Raise unless ``scheduler`` is a supported flow-matching scheduler with supported options."""
    if type(scheduler).__name__ not in FLOW_SCHEDULERS or not isinstance(
        scheduler, FlowMatchEulerDiscreteScheduler
    ):
        raise TypeError(
            f"a flow-matching model needs a scheduler of {FLOW_SCHEDULERS}, got "
            f"{type(scheduler).__name__}; build it with "
            "FlowMatchEulerDiscreteScheduler.from_config(...) (DDIM/DDPM drive UNets)"
        )
    cfg = scheduler.config
    for option, fix in (("use_dynamic_shifting", "a fixed shift"),
                        ("stochastic_sampling", "steer's own noise (eta, sde)")):  # fmt: skip
        if cfg.get(option, False):
            raise ValueError(
                f"FlowMatchEulerDiscreteScheduler {option}=True is not supported; set "
                f"{option}=False and use {fix}"
            )


def _check_noise(eta: object, sde: str) -> float:
    if sde not in SDES:
        raise ValueError(f"sde must be one of {SDES}, got {sde!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite float, got {eta!r}")
    if sde == "ddim" and not 0 <= eta <= 1:
        raise ValueError(
            f"eta={eta} is outside [0, 1], where (2.8) is a density (0: the Euler sampler, 1: "
            "the noising posterior); for more noise use sde='flow-grpo' with its level a >= 0"
        )
    if sde == "flow-grpo" and eta < 0:
        raise ValueError(f"the Flow-GRPO noise level a (eta) must be >= 0, got {eta}")
    return float(eta)


def _sigmas(scheduler: FlowMatchEulerDiscreteScheduler, k: int, sigma_min: float) -> Tensor:
    """The ``K + 1`` noise levels ``σ_K, ..., σ_1, σ_0`` (float64), validated."""
    num_train = int(scheduler.config.num_train_timesteps)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_train:
        raise ValueError(f"num_inference_steps must be an int in [1, {num_train}], got {k!r}")
    scheduler.set_timesteps(k)
    sigmas = scheduler.sigmas.detach().to("cpu", torch.float64)  # [K + 1]
    if sigmas.shape != (k + 1,):
        raise ValueError(f"scheduler sigmas must have K + 1 = {k + 1} entries, got {sigmas.shape}")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(
            f"scheduler sigmas must end at 0 (the clean sample), got {float(sigmas[-1])}; "
            "supported: a terminal 0 (invert_sigmas=False), optionally replaced by the policy's "
            "sigma_min"
        )
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or not 0 < float(sigmas[0]) <= 1:
        raise ValueError(
            f"scheduler sigmas must strictly decrease from <= 1, got {sigmas.tolist()}"
        )
    last = float(sigmas[-2])
    if isinstance(sigma_min, bool) or not isinstance(sigma_min, (int, float)):
        raise ValueError(f"sigma_min must be a float, got {sigma_min!r}")
    if not 0 <= sigma_min < last:
        raise ValueError(
            f"sigma_min={sigma_min} must be in [0, {last:.4g}) (0, or below the last positive "
            "sigma of the schedule)"
        )
    sigmas[-1] = sigma_min
    return sigmas


def make_flow_schedule(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_inference_steps: int,
    eta: float,
    sde: str = "ddim",
    sigma_min: float = 0.0,
) -> FlowSchedule:
    """The constants of (2.8)-(2.9) (or Flow-GRPO's SDE) for ``K`` steps at noise ``eta``.

    Raises:
        TypeError / ValueError: a scheduler of another family or with unsupported options, a
            sigma list that does not end at 0, ``sigma_min`` outside ``[0, σ_1)``, ``η`` outside
            ``[0, 1]`` (``sde="ddim"``) or ``a < 0`` (``sde="flow-grpo"``), an unknown ``sde``.
    """
    # 1. validate; the noise levels σ_K > ... > σ_1 > σ_0 (0 or sigma_min), in float64
    check_flow_scheduler(scheduler)
    eta = _check_noise(eta, sde)
    sigmas = _sigmas(scheduler, num_inference_steps, sigma_min)  # [K + 1]
    s, s_next = sigmas[:-1], sigmas[1:]  # σ, σ' per step [K]
    # 2. P_B of (2.9): a = (1-σ)/(1-σ'), b² = σ² - a² σ'²  (b > 0 for σ' < σ)
    a = (1 - s) / (1 - s_next)
    b = (s**2 - a**2 * s_next**2).clamp(min=0).sqrt()
    if sde == "ddim":
        # 3a. (2.8): s² = η² σ'² b² / σ²; μ = (1-σ') x̂ + √(σ'² - s²) ε̂, x̂ = x - σv, ε̂ = x + (1-σ)v
        std = eta * s_next * b / s
        d = (s_next**2 - std**2).clamp(min=0).sqrt()
        coef_x, coef_v = (1 - s_next) + d, d * (1 - s) - s * (1 - s_next)
    else:
        # 3b. Flow-GRPO: std_t = a √(σ / (1-σ)) (at σ = 1 the next entry stands in for σ in
        # 1-σ, as Flow-GRPO does), Δ = σ' - σ < 0, μ = x + (v̂ + std_t² ε̂ / (2σ)) Δ,
        # std = std_t √(-Δ)
        dt = s_next - s
        std_t = eta * (s / (1 - torch.where(s == 1, s_next, s))).sqrt()
        c = std_t**2 / (2 * s)
        coef_x, coef_v = 1 + c * dt, dt * (1 + c * (1 - s))
        std = std_t * (-dt).sqrt()
    f32 = {name: v.to(torch.float32) for name, v in
           dict(sigma=s, sigma_next=s_next, std=std, coef_x=coef_x, coef_v=coef_v,
                pb_scale=a, pb_std=b).items()}  # fmt: skip
    timesteps = scheduler.timesteps.detach().to("cpu", torch.float32)  # [K]
    return FlowSchedule(timesteps=timesteps, eta=eta, sde=sde, noise_steps=f32["std"] > 0, **f32)


# ----------------------------------------------------------------------------------------------
# the policy
# ----------------------------------------------------------------------------------------------
class FlowMatchPolicy(GaussianStepPolicy):
    """``P_F`` of (2.7)-(2.8) (or Flow-GRPO's SDE) for a velocity-predicting SD3 transformer
    and a ``FlowMatchEulerDiscreteScheduler``; ``P_B`` of (2.9).

    The step interface (``step``, ``log_prob``, ``denoise`` → ``(ε̂, x̂_θ)``, ``set_timesteps``,
    the deterministic map, ``frozen_prior``) is :class:`~steer.diffusion.base.GaussianStepPolicy`'s,
    the same as :class:`~steer.diffusion.DiffusionPolicy`'s.

    Args:
        transformer: an ``SD3Transformer2DModel`` (predicts the velocity ``v``).
        scheduler: a ``FlowMatchEulerDiscreteScheduler``; only ``sigmas``, ``timesteps`` and
            ``config`` are read (its ``shift`` included).
        guidance_scale: classifier-free guidance ``w`` on ``v̂``; 1 means no guidance.
        num_inference_steps: ``K``; change with :meth:`set_timesteps`.
        eta: the noise level: ``η ∈ [0, 1]`` of (2.8) (0: diffusers' Euler sampler, every step
            deterministic), or Flow-GRPO's ``a >= 0`` with ``sde="flow-grpo"``.
        negative_embeds: ``[1 or B, L, D + P]`` packed unconditional conditioning for guidance
            when ``cond`` is ``[B, L, D + P]`` (module docstring).
        use_adapters: ``False`` runs the transformer without its peft adapters (the prior).
        sde: ``"ddim"`` (2.8) or ``"flow-grpo"`` (§2b).
        sigma_min: the last noise level: 0 (the last step of (2.8) is then deterministic) or a
            small ``σ_min > 0`` (every step stochastic for ``η > 0``; the final state keeps noise
            ``σ_min``).
        sample_size: the latent ``(h, w)`` (or one int) when sampling another size than the
            transformer's ``config.sample_size`` (SD3 samples 1024² images as 128² latents).
    """

    cond_format = (
        "packed conditioning [B={batch}, L, D + P] (steer.diffusion.pack_cond(embeds, pooled)) "
        "or [B, 2, L, D + P] (negative, positive)"
    )

    def __init__(
        self,
        transformer: nn.Module,
        scheduler: FlowMatchEulerDiscreteScheduler,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 28,
        eta: float = 1.0,
        negative_embeds: Tensor | None = None,
        use_adapters: bool = True,
        sde: str = "ddim",
        sigma_min: float = 0.0,
        sample_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.scheduler = scheduler
        self._set_sample_size(sample_size)
        self._init_policy(guidance_scale, negative_embeds, use_adapters)
        self.sde, self.sigma_min = sde, sigma_min
        self.schedule = self._make_schedule(num_inference_steps, eta)

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    @property
    def unet(self) -> nn.Module:
        """The transformer, under the name code written for :class:`DiffusionPolicy` reads."""
        return self.transformer

    def _make_schedule(self, num_inference_steps: int, eta: float) -> FlowSchedule:
        return make_flow_schedule(
            self.scheduler, num_inference_steps, eta, sde=self.sde, sigma_min=self.sigma_min
        )

    def _options(self) -> dict[str, object]:
        return dict(
            guidance_scale=self.guidance_scale,
            num_inference_steps=self.num_inference_steps,
            eta=self.eta,
            negative_embeds=self.negative_embeds,
            sde=self.sde,
            sigma_min=self.sigma_min,
            sample_size=self._sample_size,
        )

    @property
    def cond_widths(self) -> tuple[int, int]:
        """``(D, P)``: the transformer's text-embedding and pooled-embedding widths."""
        cfg = getattr(self.transformer, "module", self.transformer).config
        return int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)

    def _pick(self, name: str, idx: Tensor, ndim: int) -> Tensor:
        """A ``[K]`` schedule constant at step indices ``idx``, shaped ``[B, 1, ...]``."""
        return getattr(self.schedule, name).to(idx.device)[idx].view((-1,) + (1,) * (ndim - 1))

    # ------------------------------------------------------------------------------------------
    # the denoiser: (2.7)
    # ------------------------------------------------------------------------------------------
    def _forward(self, x: Tensor, t: Tensor, embeds: Tensor | None) -> Tensor:
        dtype, (d, p) = self.dtype, self.cond_widths
        if embeds.shape[-1] != d + p:
            raise ValueError(
                f"cond must be packed [..., L, D + P = {d} + {p}] (steer.diffusion.pack_cond("
                f"prompt_embeds, pooled_prompt_embeds)), got width {embeds.shape[-1]}"
            )
        hidden, pooled = unpack_cond(embeds.to(dtype), p)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # the transformer embeds [B] timesteps
        out = self.transformer(
            hidden_states=x.to(dtype),
            timestep=t,
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
            return_dict=False,
        )
        return out[0]

    def velocity(self, x_t: Tensor, k: int | Tensor, cond: Tensor | None = None) -> Tensor:
        """The guided velocity ``v̂`` at step ``k``, in at least float32."""
        idx = self._index(k, x_t.shape[0], x_t.device)
        return self._velocity(x_t, idx, cond)

    def _velocity(self, x_t: Tensor, idx: Tensor, cond: Tensor | None) -> Tensor:
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        return self.model_output(x_t, idx, cond).to(dtype)

    def _denoise(self, x_t: Tensor, idx: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(ε̂, x̂_θ)`` of (2.7): ``x̂ = x - σ v̂``, ``ε̂ = x + (1-σ) v̂``."""
        v = self._velocity(x_t, idx, cond)
        x, s = x_t.to(v.dtype), self._pick("sigma", idx, x_t.ndim)
        return x + (1 - s) * v, x - s * v

    # ------------------------------------------------------------------------------------------
    # P_F and P_B
    # ------------------------------------------------------------------------------------------
    def _mean(self, x_t: Tensor, idx: Tensor, cond: Tensor | None) -> tuple[Tensor, ...]:
        """``(μ_θ, std [B, 1, ...], x̂_θ)``: ``μ = c_x x + c_v v̂`` ((2.8) or Flow-GRPO)."""
        v = self._velocity(x_t, idx, cond)
        x, nd = x_t.to(v.dtype), x_t.ndim
        mean = self._pick("coef_x", idx, nd) * x + self._pick("coef_v", idx, nd) * v
        return mean, self._pick("std", idx, nd), x - self._pick("sigma", idx, nd) * v

    def log_pb(self, x_t: Tensor, x_next: Tensor, k: int | Tensor) -> Tensor:
        """``log P_B(x_t | x_next) = log N(x_t; a x_next, b² I)`` of (2.9), ``[B]``."""
        if x_next.shape != x_t.shape:
            raise ValueError(f"x_next must match x_t {tuple(x_t.shape)}, got {tuple(x_next.shape)}")
        idx = self._index(k, x_t.shape[0], x_t.device)
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        scale, std = self._pick("pb_scale", idx, x_t.ndim), self._pick("pb_std", idx, x_t.ndim)
        return gaussian_log_prob(x_t.to(dtype), scale * x_next.to(dtype), std)


# the rectified-flow transformers of Stable Diffusion 3 / 3.5
register_family(
    ModelFamily("sd3", SD3Transformer2DModel, FlowMatchPolicy, conditional=True,
                component="transformer", schedulers=("FlowMatchEulerDiscreteScheduler",),
                spacing=False)
)  # fmt: skip
