"""Rejection fine-tuning: a baseline that trains the prior on exact samples of its own posterior.

Prior draws accepted by rejection (``steer.diffusion.exact_posterior``, §7) are exact samples of
``∝ p_prior(x) r(x)``; fine-tuning the prior's UNet on them with its own denoising loss (DDPM
ε-prediction, ``steer.digits.pretrain.ddpm_loss``), from the prior's weights, moves the model
toward the posterior without any reward gradient or trajectory objective. The budget is either a
wall time (``draw_fraction`` of it spent drawing, the rest training) or a number of optimiser
steps with a number of prior draws (equal trajectories: ``steps × batch_size`` draws by default).
Its cost is the prior draws: at acceptance rate ``a`` one exact sample costs ``1 / a`` rollouts.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from steer.diffusion import DiffusionPolicy, exact_posterior
from steer.exact import TooFewAccepted

# (seconds since the start, optimiser steps so far, the UNet being trained) after each draw
# batch (step 0) and each optimiser step
Callback = Callable[[float, int, nn.Module], None]


@dataclass(frozen=True)
class RejectionFTConfig:
    """The budget (``seconds``, or ``steps`` with ``num_draws``) and the optimisation."""

    seconds: float | None = None  # wall time for drawing + training
    steps: int | None = None  # or: optimiser steps ...
    num_draws: int | None = None  # ... on the accepted of this many prior draws (steps × batch)
    draw_fraction: float = 0.5  # with ``seconds``: the share spent drawing
    draw_batch: int = 256  # prior draws per rejection call
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.seconds is None) == (self.steps is None):
            raise ValueError("give exactly one budget: seconds or steps")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds}")
        for name in ("steps", "num_draws"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < self.draw_fraction < 1:
            raise ValueError(f"draw_fraction must be in (0, 1), got {self.draw_fraction}")
        if self.batch_size < 1 or self.draw_batch < 1 or not self.lr > 0:
            raise ValueError("batch_size and draw_batch must be >= 1 and lr > 0")

    @property
    def draws(self) -> int:
        """The prior draws of a step budget (``num_draws``, or ``steps × batch_size``)."""
        if self.num_draws is not None:
            return self.num_draws
        return (self.steps or 0) * self.batch_size


@dataclass
class RejectionFTResult:
    """The fine-tuned policy and what it cost."""

    policy: DiffusionPolicy
    losses: list[float]  # per optimiser step (mean over its minibatch)
    step_seconds: list[float]  # seconds since the start at the end of each step
    num_drawn: int
    num_accepted: int
    log_z: float  # log of the mean of r over every prior draw (Monte Carlo, §7)
    draw_seconds: float
    seconds: float  # wall time from the start to the end of the last step
    history: list[dict[str, float]] = field(default_factory=list)


def load_prior(
    folder: str | Path, num_inference_steps: int = 20, eta: float = 1.0, spacing: str = "trailing"
) -> DiffusionPolicy:
    """A frozen prior policy from a diffusers pipeline folder (``unet/``, ``scheduler/``)."""
    from diffusers import DDIMScheduler, UNet2DModel

    folder = Path(folder)
    unet = UNet2DModel.from_pretrained(folder / "unet").requires_grad_(False).eval()
    config = DDIMScheduler.load_config(folder / "scheduler")
    scheduler = DDIMScheduler.from_config(config, timestep_spacing=spacing)
    return DiffusionPolicy(unet, scheduler, num_inference_steps=num_inference_steps, eta=eta)


def classifier_log_reward(
    reward: Any, decode: Callable[[Tensor], Tensor], beta: float
) -> Callable[[Tensor], Tensor]:
    """``x_0 -> log r = reward(decode(x_0)) / β`` ``[n]``, the log-reward of the posterior."""
    from steer.train.sampling import score

    def log_reward(x0: Tensor) -> Tensor:
        return score(reward, decode(x0), None) / beta

    return log_reward


class _Draws:
    """Accepted prior draws, gathered over rejection calls, and the running ``log Z``."""

    def __init__(self) -> None:
        self.samples: list[Tensor] = []
        self.drawn, self.accepted, self.sum_rate = 0, 0, 0.0

    def add(
        self,
        prior: DiffusionPolicy,
        log_reward: Callable[[Tensor], Tensor],
        n: int,
        gen: torch.Generator,
    ) -> None:
        try:  # accept up to all n: a partial result (TooFewAccepted) is the usual outcome
            res = exact_posterior(prior, log_reward, n, max_draws=n, batch_size=n, generator=gen)
        except TooFewAccepted as err:
            res = err.result
        self.samples.append(res.samples)
        self.drawn += res.num_drawn
        self.accepted += res.num_accepted
        self.sum_rate += res.num_drawn * math.exp(res.log_z)  # Σ r over the draws

    def data(self) -> Tensor:
        if not self.accepted:
            raise RuntimeError(
                f"rejection fine-tuning: none of {self.drawn} prior draws was accepted; "
                "raise the budget (or β)"
            )
        return torch.cat(self.samples)

    @property
    def log_z(self) -> float:
        return math.log(self.sum_rate / self.drawn) if self.sum_rate > 0 else -math.inf


def _draw(
    prior: DiffusionPolicy,
    log_reward: Callable[[Tensor], Tensor],
    settings: RejectionFTConfig,
    clock: Callable[[], float],
    notify: Callable[[], None],
) -> _Draws:
    """Prior draws by rejection: ``settings.draws`` of them, or for ``draw_fraction`` of the
    wall budget (and until one is accepted)."""
    gen = torch.Generator().manual_seed(40_000 + settings.seed)  # not the report's reference
    draws = _Draws()
    if settings.seconds is None:
        while draws.drawn < settings.draws:
            draws.add(
                prior, log_reward, min(settings.draw_batch, settings.draws - draws.drawn), gen
            )
            notify()
        return draws
    until, begin = settings.draw_fraction * settings.seconds, clock()
    while clock() < until or (not draws.accepted and clock() < settings.seconds):
        # a first small batch times the draws; later ones fit the time left (overshoot < 1)
        per_draw = (clock() - begin) / max(draws.drawn, 1)
        left = max(until - clock(), 0.0)
        fit = math.ceil(left / per_draw) if draws.drawn and per_draw > 0 else 32
        draws.add(prior, log_reward, max(1, min(settings.draw_batch, fit)), gen)
        notify()
    return draws


def _finetuned(prior: DiffusionPolicy, unet: nn.Module) -> DiffusionPolicy:
    """A policy of ``unet`` on the prior's scheduler and sampler; its σ = 0 steps keep the
    prior's map (as the fine-tuner's policies do), when the prior is frozen."""
    policy = DiffusionPolicy(unet, prior.scheduler, prior.guidance_scale,
                             prior.num_inference_steps, prior.eta)  # fmt: skip
    frozen = not any(p.requires_grad for p in prior.unet.parameters())
    if frozen and prior.deterministic_map is None:
        policy.deterministic_map = prior
    return policy


def _train(
    unet: nn.Module,
    noise_schedule: Any,
    data: Tensor,
    settings: RejectionFTConfig,
    clock: Callable[[], float],
    notify: Callable[[int], None],
) -> tuple[list[float], list[float]]:
    """AdamW on the DDPM loss of random minibatches of ``data`` until the budget is spent;
    returns the per-step losses and the seconds at the end of each step."""
    from steer.digits.pretrain import ddpm_loss

    opt = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(50_000 + settings.seed)
    losses: list[float] = []
    times: list[float] = []

    def more() -> bool:
        if settings.steps is not None:
            return len(losses) < settings.steps
        return clock() < float(settings.seconds or 0.0)

    while more():
        idx = torch.randint(0, data.shape[0], (settings.batch_size,), generator=gen)
        loss = ddpm_loss(unet, noise_schedule, data[idx.to(data.device)], gen).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"rejection fine-tuning: non-finite loss at step {len(losses)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), settings.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
        times.append(clock())
        notify(len(losses))
    return losses, times


def rejection_ft(
    prior: DiffusionPolicy | str | Path,
    log_reward: Callable[[Tensor], Tensor],
    settings: RejectionFTConfig,
    *,
    num_inference_steps: int | None = None,
    eta: float | None = None,
    callback: Callback | None = None,
) -> RejectionFTResult:
    """Fine-tune a copy of ``prior``'s UNet with the DDPM loss on exact posterior samples.

    Args:
        prior: the prior policy (its schedule is the sampler) or its pipeline folder.
        log_reward: ``x_0 [n, C, H, W] -> log r [n]``, ``log r <= 0`` (e.g.
            :func:`classifier_log_reward`).
        settings: budget and optimisation.
        num_inference_steps / eta: set the prior's sampler first (``None``: keep it).
        callback: called after each draw batch and each optimiser step (:data:`Callback`).
    """
    from diffusers import DDPMScheduler

    start = time.perf_counter()
    if not isinstance(prior, DiffusionPolicy):
        prior = load_prior(prior, num_inference_steps or 20, 1.0 if eta is None else eta)
    elif num_inference_steps is not None:
        prior.set_timesteps(num_inference_steps, eta)
    unet = copy.deepcopy(prior.unet).requires_grad_(True).train()

    def clock() -> float:
        return time.perf_counter() - start

    def notify(step: int = 0) -> None:
        if callback is not None:
            callback(clock(), step, unet)

    draws = _draw(prior, log_reward, settings, clock, notify)
    data, draw_seconds = draws.data().to(prior.device), clock()
    noise_schedule = DDPMScheduler.from_config(prior.scheduler.config)
    losses, times = _train(unet, noise_schedule, data, settings, clock, notify)
    unet.requires_grad_(False).eval()
    history = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    return RejectionFTResult(_finetuned(prior, unet), losses, times, draws.drawn, draws.accepted,
                             draws.log_z, draw_seconds, clock(), history)  # fmt: skip
