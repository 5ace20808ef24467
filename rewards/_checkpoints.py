"""What a checkpoint file looks like, from its keys and shapes alone: the hint that the
bad-checkpoint errors add ("the file looks like open_clip ViT-L-14 ..."), so that a file of another
model or another variant (ViT-L vs ViT-H, BLIP base vs large) is named as such."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

__all__ = ["describe"]


def _depth(sd: Mapping[str, Tensor], pattern: str) -> int:
    found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


def _open_clip_names(
    vision: tuple[int, int, int, int], text_width: int | None, coca: bool
) -> list[str]:
    """open_clip architectures with this (vision width, layers, patch, image size) and text
    width (CoCa models only for a file with a text decoder)."""
    try:
        import open_clip
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return []
    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        size = v.get("image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        if (v.get("width"), v.get("layers"), v.get("patch_size"), size) != vision:
            continue
        if text_width is not None and t.get("width") != text_width:
            continue
        if ("multimodal_cfg" in cfg) == coca and not name.endswith("-quickgelu"):
            names.append(name)
    return sorted(names, key=lambda n: (len(n), n))  # the plain name first


def _open_clip(sd: Mapping[str, Tensor]) -> str | None:
    conv = sd.get("visual.conv1.weight")
    if conv is None:
        return None
    layers = _depth(sd, r"visual\.transformer\.resblocks\.(\d+)\.")
    patch = int(conv.shape[-1])
    pos = sd.get("visual.positional_embedding")
    size = patch * round((int(pos.shape[0]) - 1) ** 0.5) if pos is not None else 224
    vision = (int(conv.shape[0]), layers, patch, size)
    text = sd.get("ln_final.weight")
    text_width = None if text is None else int(text.shape[0])
    coca = any(k.startswith("text_decoder.") for k in sd)
    names = _open_clip_names(vision, text_width, coca)
    arch = " / ".join(names[:3]) if names else "an open_clip ViT"
    desc = f"vision width {vision[0]}, {layers} layers, patch {patch}, {size} px"
    if text_width is not None:
        text_layers = _depth(sd, r"transformer\.resblocks\.(\d+)\.")
        desc += f"; text width {text_width}, {text_layers} layers"
    return f"open_clip {arch} ({desc})"


def _blip(sd: Mapping[str, Tensor], prefix: str) -> str | None:
    cls = sd.get(prefix + "cls_token")
    if cls is None:
        return None
    width, depth = int(cls.shape[-1]), _depth(sd, re.escape(prefix) + r"blocks\.(\d+)\.")
    size = {768: "ViT-B (BLIP base)", 1024: "ViT-L (BLIP large, ImageReward's)"}.get(width, "ViT")
    text = "with ImageReward's MLP head" if "mlp.layers.0.weight" in sd else "without a reward head"
    return f"a BLIP checkpoint, image tower {size}: width {width}, {depth} blocks, {text}"


def _mlp(sd: Mapping[str, Tensor]) -> str | None:
    w = sd.get("layers.0.weight")
    if w is None or w.ndim != 2 or len(sd) > 16:
        return None
    dim = int(w.shape[1])
    clips = {512: "ViT-B-32 / ViT-B-16", 768: "ViT-L-14", 1024: "ViT-H-14"}.get(dim, "a CLIP")
    return f"an aesthetic-style MLP head on {dim}-d embeddings ({clips})"


def _transformers_clip(sd: Mapping[str, Tensor]) -> str | None:
    key = "vision_model.embeddings.patch_embedding.weight"
    if key not in sd:
        return None
    w = sd[key]
    depth = _depth(sd, r"vision_model\.encoder\.layers\.(\d+)\.")
    return (
        f"a transformers CLIP state dict (vision width {int(w.shape[0])}, {depth} layers, patch "
        f"{int(w.shape[-1])}): load such folders with transformers, or convert to open_clip"
    )


def describe(sd: Mapping[str, Tensor]) -> str:
    """One phrase naming the model a state dict looks like ("" if unknown)."""
    for probe in (
        _open_clip,
        lambda s: _blip(s, "blip.visual_encoder."),
        lambda s: _blip(s, "visual_encoder."),
        _mlp,
        _transformers_clip,
    ):
        found = probe(sd)
        if found:
            return found
    first = sorted(sd)[:3]
    return f"an unknown model (first keys {first})" if first else "an empty state dict"
