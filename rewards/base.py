"""The reward contract: ``reward(images, prompts) -> Tensor[B]`` of raw scores (§1).

A reward is an ``nn.Module`` whose parameters are frozen (gradients reach the *pixels*, never the
reward model). ``Reward.forward`` validates the input, splits it into chunks of ``batch_size``,
calls the subclass's :meth:`Reward.score` on each chunk and checks that every score is finite.

Device and dtype follow the caller: the model computes where the caller put it
(``reward.to(device, dtype)``; nothing here calls ``.cuda()``), the images are moved to the model's
device and dtype for the computation (differentiably), and the scores come back on the images'
device and dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NonFiniteRewardError",
    "Reward",
    "check_images",
    "check_prompts",
    "resize_center_crop",
    "resize_longest_pad",
    "quantize_uint8",
    "normalize",
]


class NonFiniteRewardError(ValueError):
    """A reward model returned NaN or +-inf for some image."""


def check_images(images: object) -> Tensor:
    """Validate a batch of images: a float tensor ``[B, 3, H, W]`` with B, H, W > 0, values in
    ``[0, 1]`` and no NaN. Returns the tensor unchanged; raises TypeError / ValueError naming what
    was seen and what is expected."""
    if not isinstance(images, Tensor):
        raise TypeError(
            f"images must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a floating-point tensor in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with images.float() / 255"
        )
    if images.ndim != 4:
        raise ValueError(
            f"images must have rank 4 [B, 3, H, W], got rank {images.ndim} with shape "
            f"{tuple(images.shape)}"
        )
    if images.shape[1] != 3:
        raise ValueError(
            f"images must have 3 channels (RGB) in dim 1 of [B, 3, H, W], got shape "
            f"{tuple(images.shape)}"
        )
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must be a non-empty batch, got shape {tuple(images.shape)}")
    with torch.no_grad():
        n_nan = int(torch.isnan(images).sum())
        if n_nan:
            raise ValueError(
                f"images contain {n_nan} NaN pixel value(s) (shape {tuple(images.shape)})"
            )
        lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
            "map [-1, 1] outputs with (x + 1) / 2 and clamp"
        )
    return images


def check_prompts(prompts: object, batch: int, required: bool, name: str) -> list[str] | None:
    """Validate prompts: ``None`` (only if the reward ignores them) or a sequence of ``batch``
    strings. A bare string is refused (it would be read as one prompt per character)."""
    if prompts is None:
        if required:
            raise ValueError(
                f"reward {name!r} needs one prompt per image: pass prompts as a list of {batch} "
                "strings"
            )
        return None
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a list of {batch} strings (one per image), got "
            f"{type(prompts).__name__}; for one prompt use [prompt] * {batch}"
        )
    if len(prompts) != batch:
        raise ValueError(
            f"got {len(prompts)} prompts for a batch of {batch} images; pass one prompt per image"
        )
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(
            f"prompts must be strings; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}"
        )
    return list(prompts)


def quantize_uint8(images: Tensor) -> Tensor:
    """Round ``[0, 1]`` values to the 256 levels of uint8 in the forward pass, with the identity
    as gradient (straight-through): what a PIL round trip does to the pixels, differentiably."""
    return images + (torch.floor(images * 255 + 0.5) / 255 - images).detach()  # half up, as PIL


def _bicubic(images: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


_PIL_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images (32 - 8 - 2)


@functools.lru_cache(maxsize=64)
def _pil_weights(in_size: int, out_size: int) -> Tensor:
    """Pillow's bicubic (a = -0.5) resampling matrix ``[out, in]`` for uint8 images: the
    antialiased support, each row normalised, then rounded to integers at 22 bits as Pillow's
    ``normalize_coeffs_8bpc`` does (float64, exact)."""

    def cubic(x: float) -> float:
        a, x = -0.5, abs(x)
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a if x < 2.0 else 0.0

    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        k = [cubic((j - center + 0.5) / fscale) for j in range(lo, hi)]
        total = sum(k)
        k = [v / total for v in k] if total != 0.0 else k
        one = float(1 << _PIL_BITS)
        w[i, lo:hi] = torch.tensor(
            [math.floor(0.5 + v * one) if v >= 0 else math.ceil(-0.5 + v * one) for v in k],
            dtype=torch.float64,
        )
    return w


def _pil_pass(x: Tensor, dim: int, out_size: int) -> Tensor:
    """One Pillow resampling pass of uint8-valued ``x`` along ``dim`` (-1: width, -2: height):
    the forward value is Pillow's integer arithmetic (round half up, clip to uint8), the gradient
    that of the same weights in float (straight-through)."""
    w = _pil_weights(x.shape[dim], out_size)  # [out, in], integers (float64, on the CPU)
    xt = x.transpose(dim, -1)
    smooth = xt @ (w / (1 << _PIL_BITS)).to(x.device, x.dtype).T  # [..., out]
    with torch.no_grad():  # integer arithmetic, exact in float64 (on the CPU for MPS)
        dev = torch.device("cpu") if x.device.type == "mps" else x.device
        ints = (xt.detach().to(dev, torch.float64) * 255).round()
        acc = torch.floor(ints @ w.to(dev).T + (1 << (_PIL_BITS - 1)))
        exact = (torch.floor(acc / (1 << _PIL_BITS)).clamp(0, 255) / 255).to(x.device, x.dtype)
    return (smooth + (exact - smooth).detach()).transpose(dim, -1)


@functools.lru_cache(maxsize=256)
def _vertical_first(h: int, w: int, new_h: int, new_w: int) -> bool:
    """Whether the installed Pillow resizes ``(h, w) -> (new_h, new_w)`` with its vertical pass
    first (Pillow 13 does when the height shrinks more; older Pillows never): probed once per
    size pair on a random uint8 image, comparing both orders of :func:`_pil_pass` with Pillow."""
    import numpy as np
    from PIL import Image

    if new_h == h or new_w == w:
        return False
    probe = np.random.default_rng(0).integers(0, 256, size=(h, w), dtype=np.uint8)
    out = Image.fromarray(probe).resize((new_w, new_h), Image.Resampling.BICUBIC)
    pil = torch.from_numpy(np.asarray(out).astype(np.float64)) / 255
    x = torch.from_numpy(probe.astype(np.float64)).view(1, 1, h, w) / 255
    horizontal = _pil_pass(_pil_pass(x, -1, new_w), -2, new_h)[0, 0]
    return not torch.equal(horizontal, pil)


def _pil_resize(x: Tensor, new_h: int, new_w: int) -> Tensor:
    """Pillow's two-pass uint8 bicubic resize of uint8-valued ``x`` (``[B, C, H, W]``), in the
    order of its passes (each pass rounds to uint8, so the order shows in the last bit)."""
    h, w = x.shape[-2:]
    passes = [(-1, new_w), (-2, new_h)]
    if _vertical_first(h, w, new_h, new_w):
        passes.reverse()
    for dim, size in passes:
        if x.shape[dim] != size:
            x = _pil_pass(x, dim, size)
    return x


def resize_center_crop(
    images: Tensor,
    size: int | tuple[int, int],
    floor_offsets: bool = False,
    pil_rounding: bool = False,
) -> Tensor:
    """Differentiable counterpart of ``Resize(shortest side, bicubic) + CenterCrop`` on
    ``[B, 3, H, W]`` images in [0, 1]; the result is clamped to [0, 1] like a PIL round trip.

    The crop starts at ``round(excess / 2)`` as torchvision's ``CenterCrop`` (OpenAI CLIP, BLIP,
    open_clip), or at ``excess // 2`` with ``floor_offsets`` as transformers' image processors
    (PickScore): the two differ by one pixel when the excess is 3 mod 4. ``pil_rounding``
    reproduces Pillow's resize of a uint8 image, which the references run: the input rounded to
    uint8, then Pillow's horizontal and vertical passes with its integer weights, each rounded
    and clipped to uint8, so that the forward pass equals Pillow's; gradients are those of the
    same weights in float (straight-through rounding). Without it one float antialiased bicubic
    resize is done (up to ~7/255 from Pillow's pixels).
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    _, _, h, w = images.shape
    # 1. scale so that the shorter side matches the crop's (OpenAI CLIP / BLIP eval transforms);
    #    the longer side is truncated as torchvision's Resize(int) does
    if out_h == out_w:
        short, long = min(h, w), max(h, w)
        new_long = max(out_h, int(out_h * long / short))
        new_h, new_w = (out_h, new_long) if h <= w else (new_long, out_h)
    else:
        scale = max(out_h / h, out_w / w)
        new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    dtype = images.dtype  # antialiased bicubic in float32 for half / bfloat16 inputs
    x = images.float() if dtype in (torch.float16, torch.bfloat16) else images
    if pil_rounding:
        x = _pil_resize(quantize_uint8(x), new_h, new_w)
    elif (new_h, new_w) != (h, w):
        x = _bicubic(x, (new_h, new_w))
    # 2. center crop
    if floor_offsets:
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    else:
        top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
    x = x[:, :, top : top + out_h, left : left + out_w]  # [B, 3, out_h, out_w]
    return x.clamp(0.0, 1.0).to(dtype)


def resize_longest_pad(
    images: Tensor, size: int, fill: float = 0.0, pil_rounding: bool = False
) -> Tensor:
    """Differentiable counterpart of HPS v2's evaluation transform (``ResizeMaxSize``) on
    ``[B, 3, H, W]`` images in [0, 1]: scale so that the *longer* side is ``size`` (bicubic,
    antialiased, on float pixels as HPS resizes after ``ToTensor``; not clamped), then pad with
    ``fill`` to ``size x size``, the left / top getting the smaller half. ``pil_rounding``
    rounds the input to uint8 (straight-through), as HPS's PIL input is."""
    if pil_rounding:
        images = quantize_uint8(images)
    _, _, h, w = images.shape
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)  # Python's round, as HPS
        dtype = images.dtype
        work = images.float() if dtype in (torch.float16, torch.bfloat16) else images
        images = F.interpolate(
            work, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
        ).to(dtype)
    # HPS pads only when it resized; an image whose longer side is already ``size`` is padded
    # here too (HPS would hand the model a non-square image, which its ViT refuses)
    pad_h, pad_w = size - images.shape[2], size - images.shape[3]
    if pad_h or pad_w:
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        images = F.pad(images, pads, mode="constant", value=fill)
    return images  # [B, 3, size, size]


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Channel-wise ``(x - mean) / std`` on ``[B, 3, H, W]``."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


class Reward(nn.Module):
    """Base class of every reward: subclasses set the attributes and implement :meth:`score`.

    Attributes:
        name: registry name.
        differentiable: whether gradients reach the pixels.
        input_size: the (H, W) the model sees after resizing, or None (any size).
        source: where the weights come from (hub id, path, "random (test form)", ...).
        needs_prompts: whether ``prompts`` is required.
        batch_size: images per forward pass of the model.
    """

    name: str = "reward"
    differentiable: bool = False
    input_size: tuple[int, int] | None = None
    source: str = ""
    needs_prompts: bool = False

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        """Raw scores ``[b]`` of one validated chunk ``[b, 3, H, W]`` already on the model's
        device and dtype."""
        raise NotImplementedError

    def _model_place(self, images: Tensor) -> tuple[torch.device, torch.dtype]:
        p = next(self.parameters(), None)
        return (p.device, p.dtype) if p is not None else (images.device, images.dtype)

    def freeze(self) -> Reward:
        """Eval mode (dropout off) and frozen parameters; returns self."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def forward(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        """Scores ``[B]`` of ``images [B, 3, H, W]`` in [0, 1] (with one prompt per image where
        the reward needs them), computed in chunks of ``batch_size``."""
        # 1. validate
        images = check_images(images)
        batch = images.shape[0]
        plist = check_prompts(prompts, batch, self.needs_prompts, self.name)
        device, dtype = self._model_place(images)
        # 2. score chunk by chunk on the model's device / dtype
        chunks = []
        for start in range(0, batch, self.batch_size):
            stop = min(start + self.batch_size, batch)
            x = images[start:stop].to(device=device, dtype=dtype)
            s = self.score(x, None if plist is None else plist[start:stop])
            if not isinstance(s, Tensor):
                raise TypeError(
                    f"reward {self.name!r}: score() returned {type(s).__name__}; it must return "
                    f"a tensor of {stop - start} scores, one per image"
                )
            if s.shape != (stop - start,):
                raise ValueError(
                    f"reward {self.name!r}: score() returned shape {tuple(s.shape)}, expected "
                    f"({stop - start},), one score per image (e.g. squeeze a [b, 1] output)"
                )
            # 3. never turn a non-finite score into a number: name the reward and the index
            bad = (~torch.isfinite(s.detach())).nonzero().flatten()
            if bad.numel():
                i = start + int(bad[0])
                raise NonFiniteRewardError(
                    f"reward {self.name!r} returned a non-finite score {float(s[bad[0]])} for "
                    f"batch index {i} ({bad.numel()} non-finite in images[{start}:{stop}])"
                )
            chunks.append(s)
        return torch.cat(chunks).to(device=images.device, dtype=images.dtype)  # [B]

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, differentiable={self.differentiable}, "
            f"input_size={self.input_size}, batch_size={self.batch_size}, source={self.source!r}"
        )
