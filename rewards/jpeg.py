"""JPEG (in)compressibility rewards of DDPO (Black et al., 2023): the size in kB (1 kB = 1000
bytes) of the image saved by PIL as JPEG at quality 95, with a minus sign for compressibility.
Not differentiable (the encoder is PIL's)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from torch import Tensor

from .base import Reward

__all__ = ["JpegReward", "jpeg_compressibility", "jpeg_incompressibility", "jpeg_size_kb"]


def jpeg_size_kb(image: np.ndarray, quality: int = 95) -> float:
    """JPEG size in kB of one ``[H, W, 3]`` uint8 image saved by PIL at ``quality``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegReward(Reward):
    """``sign * size_kB(JPEG(images))``; ``num_workers > 0`` encodes in a thread pool (PIL
    releases the GIL while encoding)."""

    differentiable = False
    input_size = None
    source = "PIL JPEG encoder (no weights)"

    def __init__(
        self, sign: float, quality: int = 95, batch_size: int = 64, num_workers: int = 0
    ) -> None:
        super().__init__(batch_size=batch_size)
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an int in [1, 100], got {quality!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.sign, self.quality, self.num_workers = float(sign), quality, num_workers
        self.name = "jpeg-compressibility" if sign < 0 else "jpeg-incompressibility"

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        # 1. [b, 3, H, W] in [0, 1] -> [b, H, W, 3] uint8, rounding as PIL's ToPILImage would
        arr = (images.detach().float() * 255).round().clamp(0, 255).byte()
        arr = arr.permute(0, 2, 3, 1).cpu().numpy()  # [b, H, W, 3]
        # 2. encode each image, in a thread pool if asked
        if self.num_workers > 0 and len(arr) > 1:
            with ThreadPoolExecutor(self.num_workers) as pool:
                sizes = list(pool.map(lambda a: jpeg_size_kb(a, self.quality), arr))
        else:
            sizes = [jpeg_size_kb(a, self.quality) for a in arr]
        return images.new_tensor(sizes) * self.sign  # [b]


def jpeg_compressibility(
    quality: int = 95, batch_size: int = 64, num_workers: int = 0
) -> JpegReward:
    """Minus the JPEG size in kB at ``quality`` (DDPO's compressibility reward)."""
    return JpegReward(-1.0, quality, batch_size, num_workers)


def jpeg_incompressibility(
    quality: int = 95, batch_size: int = 64, num_workers: int = 0
) -> JpegReward:
    """The JPEG size in kB at ``quality`` (DDPO's incompressibility reward)."""
    return JpegReward(1.0, quality, batch_size, num_workers)
