"""open_clip models for the aesthetic, clip-score and hpsv2 rewards: real architectures with
weights from an open_clip pretrained tag or a file, and an in-process "tiny-test" config (random
weights) that builds offline. open_clip is imported inside functions only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from . import _hub
from .base import normalize, resize_center_crop, resize_longest_pad

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
    """A loaded open_clip model with its tokenizer and preprocessing constants.

    ``resize_mode``: ``"shortest"`` (OpenAI CLIP / open_clip: the shorter side to ``size``, center
    crop) or ``"longest"`` (HPS v2: the longer side to ``size``, zero padding to a square).
    """

    model: nn.Module
    tokenizer: Any
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    resize_mode: str = "shortest"

    def preprocess(self, images: Tensor) -> Tensor:
        """``[b, 3, H, W]`` in [0, 1] -> normalised ``[b, 3, size]`` (differentiable), with the
        pixel rounding of the references' PIL pipelines (straight-through gradients)."""
        if self.resize_mode == "longest":
            x = resize_longest_pad(images, self.size[0], pil_rounding=True)
        else:
            x = resize_center_crop(images, self.size, pil_rounding=True)
        return normalize(x, self.mean, self.std)

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


def _quick_gelu(name: str, quick_gelu: bool | None, arg: str, path: str) -> bool:
    """QuickGELU or GELU for checkpoint file ``path`` of architecture ``name``: a file does not
    say which, and OpenAI's weights (open_clip's ``openai`` tag) need QuickGELU, which the plain
    name builds without. Refuse the ambiguous case instead of computing other features."""
    import open_clip

    if quick_gelu is not None:
        return quick_gelu
    if name.endswith("-quickgelu"):
        return True
    tags = open_clip.list_pretrained_tags_by_model(name)
    quick = [t for t in tags if open_clip.get_pretrained_cfg(name, t).get("quick_gelu")]
    if not quick:
        return False
    variant = f"{name}-quickgelu"
    alt = f"clip_model={variant!r}" if variant in open_clip.list_models() else "quick_gelu=True"
    raise ValueError(
        f"{arg}={path!r} is a checkpoint file for clip_model={name!r}, whose open_clip tags "
        f"{quick} use QuickGELU and the others GELU; the file does not say which, and the wrong "
        f"activation silently computes other features. For a copy of OpenAI's weights (the "
        f"'openai' tag, e.g. timm/vit_large_patch14_clip_224.openai; the aesthetic reward's CLIP) "
        f"pass {alt}; for weights trained with GELU pass quick_gelu=False."
    )


def _from_config(
    cfg: Mapping[str, Any], pretrained: str | None, arg: str, quick_gelu: bool | None
) -> OpenClip:
    """An open_clip ``CLIP`` from a model config dict (open_clip's JSON layout: ``embed_dim``,
    ``vision_cfg``, ``text_cfg``, optional ``quick_gelu``), random or from a checkpoint file."""
    import open_clip

    cfg = dict(cfg)
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"an open_clip model config needs {missing}; got keys {sorted(cfg)}")
    model = open_clip.CLIP(**cfg)
    source = "open_clip custom config (random)"
    if pretrained is not None:
        path = _hub.resolve(pretrained, arg=arg)
        sd = _hub.load_state_dict(path, arg=arg)
        _hub.load_strict(model, sd, arg=arg, path=path, expected="the open_clip config")
        source = f"open_clip custom config + {path}"
    ctx = int(cfg["text_cfg"].get("context_length", 77))
    tok = open_clip.SimpleTokenizer(context_length=ctx)
    size = _pair(cfg["vision_cfg"].get("image_size", 224))
    return OpenClip(model, tok, size, OPENAI_MEAN, OPENAI_STD, source)


def load_open_clip(
    name: str | Mapping[str, Any],
    pretrained: str | None,
    *,
    arg: str = "pretrained",
    cache_dir: str | None = None,
    quick_gelu: bool | None = None,
) -> OpenClip:
    """Build open_clip model ``name``: an open_clip architecture, "tiny-test", or a model config
    dict (open_clip's JSON layout, e.g. a reduced-size architecture).

    ``pretrained``: ``"default"`` (the tag of ``DEFAULT_TAGS``), an open_clip tag, a checkpoint
    path, or None for random weights. ``quick_gelu``: None takes the tag's activation; with a
    checkpoint file of an architecture that has QuickGELU tags (OpenAI's), it must be given (or
    the ``-quickgelu`` architecture named), else ValueError.
    """
    import open_clip

    if isinstance(name, Mapping):
        return _from_config(name, pretrained, arg, quick_gelu)
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
            f"clip_model={name!r} is not an open_clip architecture; choose 'tiny-test', a model "
            f"config dict, or one of open_clip.list_models(), e.g. "
            f"{', '.join(sorted(DEFAULT_TAGS)[:2])}"
        )
    # 2. resolve the checkpoint: a tag (hub cache / download) or a file; its activation
    cfg: dict[str, Any] = {}
    path: str | None = None
    quick = bool(quick_gelu)
    if pretrained is not None:
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if cfg:
            path = _tag_file(name, pretrained, cfg, arg, cache_dir)
            quick = bool(cfg.get("quick_gelu", False))
            if quick_gelu is not None and quick_gelu != quick:
                raise ValueError(
                    f"quick_gelu={quick_gelu} contradicts open_clip tag {name}/{pretrained}, "
                    f"which uses {'QuickGELU' if quick else 'GELU'}; leave quick_gelu=None"
                )
        elif os.path.isfile(pretrained):
            path = pretrained
            quick = _quick_gelu(name, quick_gelu, arg, path)
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise FileNotFoundError(
                f"{arg}={pretrained!r} is neither an open_clip tag of {name} ({tags}) nor an "
                "existing checkpoint file"
            )
    # 3. the architecture, then the weights (tag: open_clip's loader; file: a strict load whose
    #    error names the file, the first missing / unexpected keys and what the file looks like)
    model = open_clip.create_model(name, pretrained=path if cfg else None, force_quick_gelu=quick)
    if path is not None and not cfg:
        sd = _hub.load_state_dict(path, arg=arg)
        _hub.load_strict(model, sd, arg=arg, path=path, expected=f"open_clip {name}")
    tok = open_clip.get_tokenizer(name)
    size = _pair(model.visual.image_size)
    mean = tuple(cfg.get("mean", OPENAI_MEAN))
    std = tuple(cfg.get("std", OPENAI_STD))
    act = "QuickGELU" if quick else "GELU"
    source = (
        f"open_clip {name}/{pretrained} ({act})" if pretrained else f"open_clip {name} (random)"
    )
    return OpenClip(model, tok, size, mean, std, source)
