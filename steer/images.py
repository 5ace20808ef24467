"""Image helpers shared by the trainer, the pipelines and the digits application (torch; the
PNG writer imports torchvision on use)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["to_unit", "save_grid", "diversity"]


def to_unit(x: Tensor) -> Tensor:
    """A model's images in ``[-1, 1]`` → ``[0, 1]`` (clamped), the range rewards take."""
    return (x / 2 + 0.5).clamp(0, 1)


def save_grid(
    images: Tensor,
    path: str | Path,
    nrow: int | None = None,
    scale: int = 1,
    padding: int = 1,
    pad_value: float = 0.0,
) -> Path:
    """Images ``[N, C, H, W]`` in ``[0, 1]`` → one PNG grid (``nrow`` per row, default about
    √N; ``scale``: nearest-neighbour upscaling, for tiny images)."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = images.detach().float().cpu().clamp(0, 1)
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    nrow = nrow or max(1, int(len(x) ** 0.5))
    save_image(x, str(path), nrow=nrow, padding=padding, pad_value=pad_value)
    return path


def diversity(images: Tensor) -> float:
    """Mean pairwise L2 distance between flattened images ``[N, ...]``."""
    flat = images.flatten(1).float()
    n = flat.shape[0]
    if n < 2:
        return 0.0
    d = torch.cdist(flat, flat)
    return float(d.sum() / (n * (n - 1)))
