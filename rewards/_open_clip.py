"""open_clip models for the aesthetic, clip-score and hpsv2 rewards: real architectures with
weights from an open_clip pretrained tag or a file, and an in-process "tiny-test" config (random
weights) that builds offline. open_clip is imported inside functions only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from . import _hub
from .base import normalize, resize_center_crop

TINY = "tiny-test"
DEFAULT = "default"
# A CLIP small enough for unit tests: 32x32 images, 2-layer towers, 32-d embeddings.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# open_clip pretrained tag used when ``pretrained="default"``.
DEFAULT_TAGS = {"ViT-L-14": "openai", "ViT-H-14": "laion2b_s32b_b79k", TINY: None}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class OpenClip:
    """A loaded open_clip model with its tokenizer and preprocessing constants."""

    model: nn.Module
    tokenizer: Any
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def preprocess(self, images: Tensor) -> Tensor:
        """``[b, 3, H, W]`` in [0, 1] -> normalised ``[b, 3, size]`` (differentiable)."""
        return normalize(resize_center_crop(images, self.size), self.mean, self.std)

    def tokens(self, prompts: list[str], device: Any) -> Tensor:
        return self.tokenizer(prompts).to(device)  # [b, context_length]


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _tag_file(name: str, tag: str, cfg: dict[str, Any], arg: str, cache_dir: str | None) -> str:
    """Local checkpoint file of an open_clip pretrained tag (hub cache, or download)."""
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)  # "org/repo/" -> no file name: open_clip's
        if filename:
            return _hub.fetch(repo_id, filename, arg=arg, cache_dir=cache_dir)
        try:  # open_clip's default names: safetensors first, then the pickle
            return _hub.fetch(repo_id, "open_clip_model.safetensors", arg=arg, cache_dir=cache_dir)
        except FileNotFoundError as first:
            try:
                return _hub.fetch(
                    repo_id, "open_clip_pytorch_model.bin", arg=arg, cache_dir=cache_dir
                )
            except FileNotFoundError:
                raise first from None
    url = cfg.get("url", "")
    if _hub.offline():
        raise FileNotFoundError(
            f"open_clip weights {name}/{tag} come from {url} and the hub is offline; download "
            f"the file and pass {arg}='/path/to/{os.path.basename(url)}'"
        )
    import open_clip

    try:
        return open_clip.download_pretrained_from_url(url, cache_dir=cache_dir)
    except Exception as err:
        raise FileNotFoundError(
            f"could not download open_clip weights {name}/{tag} from {url} "
            f"({type(err).__name__}); download the file and pass {arg}='/path/to/"
            f"{os.path.basename(url)}'"
        ) from err


def load_open_clip(
    name: str, pretrained: str | None, *, arg: str = "pretrained", cache_dir: str | None = None
) -> OpenClip:
    """Build open_clip model ``name`` (an open_clip architecture or "tiny-test").

    ``pretrained``: ``"default"`` (the tag of ``DEFAULT_TAGS``), an open_clip tag, a checkpoint
    path, or None for random weights.
    """
    import open_clip

    if pretrained == DEFAULT:
        if name not in DEFAULT_TAGS:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise ValueError(
                f"no default {arg} for clip_model={name!r}; pass one of the tags {tags}, a file "
                "path or None (random weights)"
            )
        pretrained = DEFAULT_TAGS[name]
    # 1. the tiny test model: random weights only
    if name == TINY:
        if pretrained is not None:
            raise ValueError(f"clip_model='tiny-test' has random weights only; got {arg}=...")
        model = open_clip.CLIP(**TINY_CONFIG)
        tok = open_clip.SimpleTokenizer(context_length=TINY_CONFIG["text_cfg"]["context_length"])
        size = _pair(TINY_CONFIG["vision_cfg"]["image_size"])
        return OpenClip(model, tok, size, OPENAI_MEAN, OPENAI_STD, "random (tiny-test)")
    if name not in open_clip.list_models():
        raise ValueError(
            f"clip_model={name!r} is not an open_clip architecture; choose 'tiny-test' or one "
            f"of open_clip.list_models(), e.g. {', '.join(sorted(DEFAULT_TAGS)[:2])}"
        )
    # 2. resolve the checkpoint file: tag -> hub cache / download; path -> as is
    cfg: dict[str, Any] = {}
    path: str | None = None
    if pretrained is not None:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if cfg:
            path = _tag_file(name, pretrained, cfg, arg, cache_dir)
        elif os.path.isfile(pretrained):
            path = pretrained
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise FileNotFoundError(
                f"{arg}={pretrained!r} is neither an open_clip tag of {name} ({tags}) nor an "
                "existing checkpoint file"
            )
    model = open_clip.create_model(
        name, pretrained=path, force_quick_gelu=bool(cfg.get("quick_gelu", False))
    )
    tok = open_clip.get_tokenizer(name)
    size = _pair(model.visual.image_size)
    mean = tuple(cfg.get("mean", OPENAI_MEAN))
    std = tuple(cfg.get("std", OPENAI_STD))
    source = f"open_clip {name}/{pretrained}" if pretrained else f"open_clip {name} (random)"
    return OpenClip(model, tok, size, mean, std, source)
