"""CLIP score and HPS v2 rewards on open_clip models.

- ``clip-score``: cosine similarity of the CLIP image and text embeddings (Radford et al., 2021);
  with ``torchmetrics_style=True``, ``max(100 cos, 0)`` as torchmetrics' CLIPScore (Hessel et al.,
  2021) defines it.
- ``hpsv2``: Human Preference Score v2 / v2.1 (Wu et al., 2023): open_clip ViT-H-14 fine-tuned on
  human preferences; the score is the cosine of the normalised embeddings (HPS's own scale,
  ≈ 0.2-0.35). The tokenizer is open_clip's, so the ``hpsv2`` package is not needed. Images are
  prepared as HPS evaluates them: the longer side resized to 224, then zero-padded to a square
  (``hpsv2``'s ``ResizeMaxSize``), not center-cropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from . import _hub
from ._open_clip import DEFAULT, TINY, OpenClip, load_open_clip
from .base import Reward

__all__ = ["ClipSimilarityReward", "clip_score", "hpsv2", "HPS_WEIGHTS"]

HPS_WEIGHTS = {
    "v2": "hf-hub:xswu/HPSv2/HPS_v2_compressed.pt",
    "v2.1": "hf-hub:xswu/HPSv2/HPS_v2.1_compressed.pt",
}


class ClipSimilarityReward(Reward):
    """``scale * cos(image, text)``, clamped at 0 if ``clamp_zero`` (both towers of open_clip)."""

    differentiable = True
    needs_prompts = True

    def __init__(
        self,
        clip: OpenClip,
        name: str,
        source: str,
        batch_size: int,
        scale: float = 1.0,
        clamp_zero: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.clip, self.model = clip, clip.model
        self.name, self.source, self.input_size = name, source, clip.size
        self.scale, self.clamp_zero = float(scale), bool(clamp_zero)

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        assert prompts is not None  # checked by Reward.forward (needs_prompts)
        # 1. unit-norm embeddings of both towers
        img = self.model.encode_image(self.clip.preprocess(images), normalize=True)  # [b, D]
        txt = self.model.encode_text(self.clip.tokens(prompts, images.device), normalize=True)
        # 2. paired cosine similarity
        cos = (img * txt.to(img.dtype)).sum(-1)  # [b]
        s = self.scale * cos
        return s.clamp(min=0.0) if self.clamp_zero else s


def clip_score(
    clip_model: str | Mapping[str, Any] = "ViT-L-14",
    pretrained: str | None = DEFAULT,
    torchmetrics_style: bool = False,
    batch_size: int = 32,
    cache_dir: str | None = None,
    quick_gelu: bool | None = None,
) -> ClipSimilarityReward:
    """CLIP image-text score.

    Args:
        clip_model: open_clip architecture, "tiny-test" (random, offline) or a model config dict.
        pretrained: open_clip tag ("default": openai for ViT-L-14), checkpoint path, or None.
        torchmetrics_style: return ``max(100 cos, 0)`` instead of ``cos``.
        quick_gelu: activation for a checkpoint file (None: the tag's; see ``load_open_clip``).
    """
    clip = load_open_clip(
        clip_model, pretrained, arg="pretrained", cache_dir=cache_dir, quick_gelu=quick_gelu
    )
    scale = 100.0 if torchmetrics_style else 1.0
    return ClipSimilarityReward(
        clip, "clip-score", clip.source, batch_size, scale=scale, clamp_zero=torchmetrics_style
    ).freeze()


def _check_version(version: str, path: str) -> None:
    """Refuse a file named like the other HPS version's checkpoint (the two share one
    architecture, so nothing else tells them apart)."""
    name = Path(path).name
    for other, spec in HPS_WEIGHTS.items():
        if other != version and name == spec.rsplit("/", 1)[-1]:
            raise ValueError(
                f"weights={path!r} is named like the HPS {other} checkpoint but version="
                f"{version!r}; pass version={other!r} (or rename the file if it is not {other})"
            )


def hpsv2(
    version: str = "v2.1",
    weights: str | os.PathLike[str] | None = DEFAULT,
    clip_model: str | Mapping[str, Any] = "ViT-H-14",
    batch_size: int = 32,
    cache_dir: str | None = None,
) -> ClipSimilarityReward:
    """HPS v2 / v2.1 reward.

    Args:
        version: "v2" or "v2.1" (selects the default checkpoint).
        weights: HPS checkpoint: "default" (hub xswu/HPSv2), a path, "hf-hub:owner/repo/file",
            or None (random weights, for tests).
        clip_model: "ViT-H-14" (the HPS architecture), "tiny-test", or an open_clip model config
            dict (reduced-size architectures, for parity tests).
    """
    if version not in HPS_WEIGHTS:
        raise ValueError(f"version must be one of {sorted(HPS_WEIGHTS)}, got {version!r}")
    if weights == DEFAULT:
        if clip_model == TINY or isinstance(clip_model, Mapping):
            raise ValueError("a test clip_model takes weights=None (random) or a file path")
        weights = HPS_WEIGHTS[version]
    # 1. find the file first (a missing file fails before building a 1B-parameter model)
    path = None if weights is None else _hub.resolve(weights, arg="weights", cache_dir=cache_dir)
    if path is not None:
        _check_version(version, path)
    # 2. the architecture with random weights (GELU, as HPS builds it), then the HPS state dict
    clip = load_open_clip(clip_model, None, arg="weights", cache_dir=cache_dir)
    clip.resize_mode = "longest"
    arch = clip_model if isinstance(clip_model, str) else "custom config"
    source = f"HPS {version} random ({arch})"
    if path is not None:
        sd = _hub.load_state_dict(path, arg="weights")
        if "logit_scale" in sd and sd["logit_scale"].ndim != clip.model.logit_scale.ndim:
            sd["logit_scale"] = sd["logit_scale"].reshape(clip.model.logit_scale.shape)
        expected = f"HPS {version} (open_clip {arch})"
        _hub.load_strict(clip.model, sd, arg="weights", path=path, expected=expected)
        source = f"HPS {version}: {os.fspath(weights)} on open_clip {arch}"
    return ClipSimilarityReward(clip, "hpsv2", source, batch_size).freeze()
