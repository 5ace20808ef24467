"""Generic DDPM pretraining of a diffusers ``UNet2DModel`` on an in-memory tensor dataset.

Epsilon prediction (Ho et al., 2020, eq. 14): the network's output is the ``ε̂`` of (2.1),
so a model trained here plugs into the policy of (2.1)-(2.5) unchanged. An exponential
moving average (EMA) of the weights is what gets saved.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel


@dataclass(frozen=True)
class DDPMTrainConfig:
    """Optimisation settings of :func:`train_ddpm` (AdamW, linear warm-up, EMA of the weights)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995  # 0 keeps the raw weights
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if self.warmup_steps < 0 or not self.grad_clip > 0:
            raise ValueError(
                f"warmup_steps must be >= 0 and grad_clip > 0; got {self.warmup_steps}, "
                f"{self.grad_clip}"
            )


def make_unet(
    sample_size: int,
    channels: int = 1,
    block_out_channels: Sequence[int] = (16, 32, 64),
    layers_per_block: int = 1,
    attention: bool = False,
    norm_num_groups: int = 8,
) -> UNet2DModel:
    """A small unconditional ``UNet2DModel``; ``attention`` adds self-attention at the lowest
    resolution (the mid block always has one)."""
    n = len(block_out_channels)
    if n < 1 or any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(
            f"block_out_channels must be non-empty multiples of norm_num_groups={norm_num_groups}; "
            f"got {tuple(block_out_channels)}"
        )
    last_down = "AttnDownBlock2D" if attention else "DownBlock2D"
    first_up = "AttnUpBlock2D" if attention else "UpBlock2D"
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * (n - 1) + (last_down,),
        up_block_types=(first_up,) + ("UpBlock2D",) * (n - 1),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
    )


def make_scheduler(
    num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2"
) -> DDPMScheduler:
    """The training noise schedule (epsilon prediction, samples clipped to ``[-1, 1]``)."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
    )


def ddpm_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample ``mean ||ε - ε_θ(√ᾱ_t x_0 + √(1-ᾱ_t) ε, t)||²`` (Ho et al. eq. 14): ``[B]``."""
    # 1. t ~ U{0, ..., T-1}, ε ~ N(0, I)
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(x0)  # [B, C, H, W]
    t = t.to(x0.device)
    # 2. x_t from the forward process (the marginal of (2.6) from t = 0)
    x_t = scheduler.add_noise(x0, noise, t)  # [B, C, H, W]
    # 3. regress the noise
    eps = unet(x_t, t).sample  # [B, C, H, W]
    return F.mse_loss(eps, noise, reduction="none").flatten(1).mean(1)  # [B]


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p, 1.0 - decay)


def train_ddpm(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    data: torch.Tensor,
    config: DDPMTrainConfig,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[UNet2DModel, list[float]]:
    """Train ``unet`` on ``data`` ``[N, C, H, W]`` in ``[-1, 1]``; returns (EMA model, losses).

    Seeded by ``config.seed`` (minibatches, timesteps and noise); ``callback(step, loss)`` runs
    after each step.
    """
    from tqdm.auto import tqdm

    if data.ndim != 4 or not torch.isfinite(data).all():
        raise ValueError(f"data must be a finite [N, C, H, W] tensor; got {tuple(data.shape)}")
    # 1. optimiser with linear warm-up, EMA copy of the weights
    generator = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    warm = max(config.warmup_steps, 1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
    ema = copy.deepcopy(unet).requires_grad_(False) if config.ema_decay > 0 else unet
    losses: list[float] = []
    unet.train()
    bar = tqdm(range(config.steps), desc="DDPM pretraining", disable=not progress)
    for step in bar:
        # 2. one minibatch of the epsilon objective
        idx = torch.randint(0, data.shape[0], (config.batch_size,), generator=generator)
        loss = ddpm_loss(unet, scheduler, data[idx], generator).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DDPM loss is {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        opt.step()
        lr_sched.step()
        # 3. EMA with a short warm-up of its own decay
        if ema is not unet:
            _ema_update(ema, unet, min(config.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if callback is not None:
            callback(step, losses[-1])
    ema.eval()
    return ema, losses


def sample_ddim(
    unet: UNet2DModel,
    scheduler: DDPMScheduler | DDIMScheduler,
    num_samples: int,
    num_inference_steps: int = 50,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """DDIM sampling ((2.1)-(2.5); ``eta=1``: DDPM posterior variance) with diffusers'
    ``DDIMScheduler`` built from ``scheduler``'s config. Returns ``[N, C, H, W]`` in ``[-1, 1]``.
    No ``torch.no_grad`` here: wrap the call when no gradient is wanted."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_inference_steps)
    cfg = unet.config
    device = next(unet.parameters()).device
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        shape = (n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        x = torch.randn(shape, generator=generator).to(device)  # [n, C, H, W]
        for t in ddim.timesteps:
            eps = unet(x, t).sample
            x = ddim.step(eps, t, x, eta=eta, generator=generator).prev_sample
        out.append(x)
    return torch.cat(out)  # [N, C, H, W]


def save_ddpm_folder(unet: UNet2DModel, scheduler: DDPMScheduler, folder: str | Path) -> Path:
    """Write a diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) with
    ``SteerDDPMPipeline.save_pretrained``; ``DDPMPipeline.from_pretrained(folder)`` loads it."""
    from steer.pipelines import SteerDDPMPipeline

    SteerDDPMPipeline(unet, scheduler).save_pretrained(folder)
    return Path(folder)


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """``(result, wall seconds, process CPU seconds)`` of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu
