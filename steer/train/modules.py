"""Small trainable modules of the objectives: the log-partition ``log Z`` and the flow ``F̃_φ``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LogZTable(nn.Module):
    """One learned ``log Z`` per prompt of a fixed prompt set (a single one when unconditional)."""

    def __init__(self, num_prompts: int = 1, init: float = 0.0) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        self.values = nn.Parameter(torch.full((num_prompts,), float(init)))

    def forward(self, prompt_index: Tensor | None, pooled: Tensor | None = None) -> Tensor:
        """``prompt_index [B]`` (int) → ``log Z [B]``; ``None`` → the one value, shape ``[1]``."""
        if prompt_index is None:
            return self.values[:1]
        return self.values[prompt_index]


class LogZNetwork(nn.Module):
    """``log Z`` as a small MLP of the pooled prompt embedding, for open prompt sets."""

    def __init__(self, embed_dim: int, hidden: int = 128, init: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, float(init))

    def forward(self, prompt_index: Tensor | None, pooled: Tensor | None = None) -> Tensor:
        if pooled is None:
            raise ValueError("LogZNetwork needs the pooled prompt embedding [B, D]")
        return self.net(pooled.float()).squeeze(-1)  # [B]


def timestep_features(t: Tensor, dim: int = 32, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of integer timesteps ``t [B]`` → ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FlowNetwork(nn.Module):
    """The flow residual ``log F̃_φ(x_t, t, c)`` of energy-difference DB (3.5): a small conv net
    over the (latent) image, with timestep features and an optional pooled prompt embedding
    added to the hidden channels. Output ``[B]``, initialised to zero."""

    def __init__(self, in_channels: int, cond_dim: int = 0, width: int = 32, t_dim: int = 32):
        super().__init__()
        self.t_dim = t_dim
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
        )  # fmt: skip
        self.embed = nn.Linear(t_dim + cond_dim, width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.cond_dim = cond_dim

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        dtype = self.embed.weight.dtype  # run in the network's own precision
        h = self.conv(x.to(dtype)).mean(dim=(2, 3))  # [B, W]
        feats = timestep_features(t.expand(x.shape[0]), self.t_dim).to(dtype)  # [B, t_dim]
        if self.cond_dim:
            if cond is None:
                raise ValueError("this FlowNetwork was built with cond_dim > 0: pass cond [B, D]")
            feats = torch.cat([feats, cond.to(dtype)], dim=-1)
        return self.head(h + self.embed(feats)).squeeze(-1)  # [B]
