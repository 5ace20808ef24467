"""The LAION improved aesthetic predictor (Schuhmann et al., 2022), used as a reward by DDPO:
an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 on the L2-normalised CLIP ViT-L/14 (OpenAI) image
embedding. Preprocessing is done in torch, so gradients reach the pixels."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from . import _hub
from ._open_clip import DEFAULT, OpenClip, load_open_clip
from .base import Reward

__all__ = ["RewardMLP", "AestheticReward", "aesthetic", "DEFAULT_AESTHETIC_WEIGHTS"]

DEFAULT_AESTHETIC_WEIGHTS = "hf-hub:trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"


class RewardMLP(nn.Module):
    """``in -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropouts 0.2, 0.2, 0.1 (active in training
    only), laid out as ``layers.{0,2,4,6,7}`` like the LAION predictor and ImageReward's head."""

    def __init__(self, in_features: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # [B, in] -> [B, 1]


class AestheticReward(Reward):
    """Aesthetic score ``MLP(e / ||e||)`` with ``e`` the CLIP image embedding (≈ 1-10 scale)."""

    differentiable = True
    needs_prompts = False

    def __init__(self, clip: OpenClip, mlp: RewardMLP, source: str, batch_size: int) -> None:
        super().__init__(batch_size=batch_size)
        self.clip = clip
        self.model = clip.model
        self.mlp = mlp
        self.name = "aesthetic"
        self.input_size = clip.size
        self.source = source

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        x = self.clip.preprocess(images)  # [b, 3, 224, 224]
        emb = self.model.encode_image(x, normalize=True)  # [b, D], unit norm
        return self.mlp(emb).squeeze(-1)  # [b]


def aesthetic(
    clip_model: str | Mapping[str, Any] = "ViT-L-14",
    pretrained: str | None = DEFAULT,
    weights: str | os.PathLike[str] | None = DEFAULT_AESTHETIC_WEIGHTS,
    batch_size: int = 32,
    cache_dir: str | None = None,
    quick_gelu: bool | None = None,
) -> AestheticReward:
    """The LAION aesthetic reward.

    Args:
        clip_model: open_clip architecture ("ViT-L-14"; "ViT-L-14-quickgelu" for a local copy of
            OpenAI's weights), "tiny-test" (random, offline), or a model config dict.
        pretrained: open_clip tag ("default" = "openai"), a checkpoint path, or None (random).
        weights: MLP weights: a path, "hf-hub:owner/repo/file", or None (random init).
        batch_size: images per forward pass.
        cache_dir: hub cache folder.
        quick_gelu: activation for a checkpoint file (OpenAI's CLIP: True); None takes the
            tag's, and refuses a ViT-L-14 file, which could hold either.
    """
    path = None if weights is None else _hub.resolve(weights, arg="weights", cache_dir=cache_dir)
    clip = load_open_clip(
        clip_model, pretrained, arg="pretrained", cache_dir=cache_dir, quick_gelu=quick_gelu
    )
    mlp = RewardMLP(int(clip.model.visual.output_dim))  # 768 for ViT-L-14
    if path is None:
        mlp_source = "random MLP"
    else:
        sd = _hub.load_state_dict(path, arg="weights")
        expected = f"the aesthetic MLP on {mlp.layers[0].in_features}-d CLIP embeddings"
        _hub.load_strict(mlp, sd, arg="weights", path=path, expected=expected)
        mlp_source = f"MLP {os.fspath(weights)}"  # type: ignore[arg-type]
    return AestheticReward(clip, mlp, f"{clip.source} + {mlp_source}", batch_size).freeze()
