"""ImageReward (Xu et al., 2023) on transformers' BLIP modules, without the ``image-reward``
package (it pins a timm that open_clip cannot live with).

Architecture: BLIP ViT-L/16 at 224 px (``BlipVisionModel``) -> BERT-base text encoder with
cross-attention to every image token (``BlipTextModel``) -> the ``[CLS]`` state -> MLP
768 -> 1024 -> 128 -> 64 -> 16 -> 1 -> ``(r - 0.16717) / 1.03334`` (the published normalisation).
Prompts are tokenised by BERT (uncased, BLIP's ``[DEC]`` / ``[ENC]`` added), max 35 tokens.

The original checkpoint (``ImageReward.pt``) is mapped key by key onto these modules by
:func:`map_checkpoint`; unverified offline against the real file (see docs/rewards.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _hub
from ._open_clip import DEFAULT, OPENAI_MEAN, OPENAI_STD, TINY
from .aesthetic import RewardMLP
from .base import Reward, normalize, resize_center_crop

__all__ = ["ImageRewardModel", "ImageReward", "imagereward", "map_checkpoint", "blip_configs"]

IMAGEREWARD_WEIGHTS = "hf-hub:THUDM/ImageReward/ImageReward.pt"
IMAGEREWARD_TOKENIZER = "google-bert/bert-base-uncased"
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
# original-checkpoint prefixes that the score does not use (BLIP's contrastive projections)
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.", "blip.temp")
# (original regex, transformers replacement) for the vision tower; the text tower keeps its names
_VISION_RULES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc([12])\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
]


def blip_configs(size: str | Mapping[str, Any], vocab_size: int = 30524) -> tuple[Any, Any]:
    """(BlipVisionConfig, BlipTextConfig) of ImageReward ("large"), of the test form
    ("tiny-test"), or of "large" with overrides ``{"vision": {...}, "text": {...}}`` (keyword
    arguments of ``BlipVisionConfig`` / ``BlipTextConfig``; reduced sizes for parity tests)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    overrides: dict[str, dict[str, Any]] = {"vision": {}, "text": {}}
    if isinstance(size, Mapping):
        unknown = sorted(set(size) - set(overrides))
        if unknown:
            raise ValueError(f"blip overrides take the keys 'vision' and 'text', got {unknown}")
        overrides.update({k: dict(v) for k, v in size.items()})
        size = "large"
    if size == "large":
        v = dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=16,
        )
        t = dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=512,
        )
    elif size == TINY:
        v = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        t = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    else:
        raise ValueError(f"blip must be 'large', 'tiny-test' or a dict of overrides, got {size!r}")
    v.update(overrides["vision"])
    t = {"vocab_size": vocab_size, **t, **overrides["text"]}
    vision = BlipVisionConfig(**v, layer_norm_eps=1e-6, hidden_act="gelu", initializer_range=0.02)
    # is_decoder=True gives every layer its cross-attention block; forward runs bidirectionally
    text = BlipTextConfig(
        **t,
        encoder_hidden_size=v["hidden_size"],
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        is_decoder=True,
        pad_token_id=0,
        bos_token_id=None,
        sep_token_id=None,
    )
    return vision, text


class ImageRewardModel(nn.Module):
    """BLIP image tower, cross-attending text tower and reward MLP, with ImageReward's layout."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardMLP(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # 1. image tokens [b, 1 + N, Dv] (after the final LayerNorm, as BLIP's ViT)
        img = self.vision_model(pixel_values=pixel_values).last_hidden_state
        img_mask = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)
        # 2. text [CLS] state, cross-attending to every image token
        txt = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=img,
            encoder_attention_mask=img_mask,
        ).last_hidden_state[:, 0]  # [b, Dt]
        # 3. MLP head and the published normalisation
        return (self.mlp(txt).squeeze(-1) - SCORE_MEAN) / SCORE_STD  # [b]


def map_checkpoint(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map an original ImageReward state dict onto :class:`ImageRewardModel` keys.

    Returns ``(mapped, dropped)``; ``dropped`` lists keys of unused BLIP heads / buffers. A key
    that is neither mapped nor known-unused raises ValueError.
    """
    mapped: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in sd.items():
        if key.startswith(UNUSED_PREFIXES) or key.endswith("embeddings.position_ids"):
            dropped.append(key)
        elif key.startswith("mlp."):
            mapped[key] = value
        elif key.startswith("blip.text_encoder."):
            mapped["text_encoder." + key[len("blip.text_encoder.") :]] = value
        elif key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder.") :]
            for pattern, repl in _VISION_RULES:
                new, n = re.subn(pattern, repl, rest)
                if n:
                    mapped["vision_model." + new] = value
                    break
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unrecognised ImageReward checkpoint keys: {unknown[:10]}")
    return mapped, dropped


class ImageReward(Reward):
    """ImageReward score of (image, prompt) pairs (≈ N(0, 1) over its training set)."""

    differentiable = True
    needs_prompts = True

    def __init__(
        self, model: ImageRewardModel, tokenizer: Any, source: str, batch_size: int
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.model, self.tokenizer = model, tokenizer
        size = model.vision_model.config.image_size
        self.name, self.source, self.input_size = "imagereward", source, (size, size)

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        assert prompts is not None  # checked by Reward.forward (needs_prompts)
        pixels = resize_center_crop(images, self.input_size, pil_rounding=True)  # as PIL
        pixels = normalize(pixels, OPENAI_MEAN, OPENAI_STD)
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        ).to(images.device)
        return self.model(pixels, tok["input_ids"], tok["attention_mask"])  # [b]


def _bert_tokenizer(ident: str, cache_dir: str | None) -> Any:
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(
            ident, cache_dir=cache_dir, local_files_only=_hub.offline()
        )
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load the BERT tokenizer {ident!r} ({type(err).__name__}). Provide it "
            f"with\n    huggingface-cli download {ident} vocab.txt tokenizer_config.json\n"
            "or pass tokenizer='/path/to/folder'."
        ) from err
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def imagereward(
    weights: str | os.PathLike[str] | None = DEFAULT,
    blip: str | Mapping[str, Any] = "large",
    tokenizer: str = DEFAULT,
    batch_size: int = 16,
    cache_dir: str | None = None,
) -> ImageReward:
    """ImageReward.

    Args:
        weights: "default" (hub THUDM/ImageReward, ImageReward.pt), a path,
            "hf-hub:owner/repo/file", or None (random weights).
        blip: "large" (the ImageReward architecture), "tiny-test" (random, offline), or
            overrides of "large" ``{"vision": {...}, "text": {...}}`` (see :func:`blip_configs`).
        tokenizer: BERT tokenizer id or folder; "default" is bert-base-uncased (or the offline
            tokenizer of :mod:`steer.rewards.tiny` for "tiny-test"); "tiny-test" with
            ``weights=None`` builds the real architecture offline with random weights.
    """
    if not isinstance(blip, Mapping) and blip not in ("large", TINY):
        raise ValueError(f"blip must be 'large', 'tiny-test' or a dict of overrides, got {blip!r}")
    if blip == TINY:
        from .tiny import bert_tokenizer

        if weights == DEFAULT or tokenizer not in (DEFAULT, TINY):
            raise ValueError("blip='tiny-test' takes weights=None or a path, and no tokenizer")
        tok = bert_tokenizer()
        vision, text = blip_configs(TINY, vocab_size=len(tok))
    elif tokenizer == TINY:  # the real architecture, random weights, an offline vocabulary
        from .tiny import bert_tokenizer

        if weights is not None:
            raise ValueError("tokenizer='tiny-test' takes weights=None (random)")
        tok = bert_tokenizer()
        vision, text = blip_configs(blip)
    else:
        ident = IMAGEREWARD_TOKENIZER if tokenizer == DEFAULT else tokenizer
        tok = _bert_tokenizer(ident, cache_dir)
        vision, text = blip_configs(blip)
        _hub.check_vocab(tok, text.vocab_size, arg="tokenizer", ident=ident)
    weights = IMAGEREWARD_WEIGHTS if weights == DEFAULT else weights
    path = None if weights is None else _hub.resolve(weights, arg="weights", cache_dir=cache_dir)
    model = ImageRewardModel(vision, text)
    arch = blip if isinstance(blip, str) else "large with overrides"
    source = f"random ImageReward ({arch})"
    if path is not None:
        sd = _hub.load_state_dict(path, arg="weights")
        try:
            mapped, _ = map_checkpoint(sd)
        except ValueError as err:
            from ._checkpoints import describe

            raise ValueError(
                f"weights={path!r}: {err}; the file looks like {describe(sd)}"
            ) from None
        expected = f"ImageReward (BLIP {arch})"
        _hub.load_strict(model, mapped, arg="weights", path=path, expected=expected, original=sd)
        source = f"ImageReward {os.fspath(weights)} mapped onto transformers BLIP"
    return ImageReward(model, tok, source, batch_size).freeze()
