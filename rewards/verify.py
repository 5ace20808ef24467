"""``steer rewards verify NAME --weights PATH``: score a few built-in images with a real checkpoint
through steer and through the reference code, side by side.

The reference of each model reward is the code its checkpoint was published with:

- ``imagereward``: ``ImageReward.ImageReward`` of ``image-reward`` (its ``score(prompt, image)``,
  its PIL preprocessing, ``med_config.json`` from THUDM/ImageReward);
- ``hpsv2``: the open_clip fork inside ``hpsv2`` (``create_model_and_transforms`` with HPS's
  arguments, its ``ResizeMaxSize`` transform and tokenizer; the glue of ``hpsv2.score``);
- ``aesthetic``: ``AestheticsPredictorV2Linear`` of ``simple-aesthetics-predictor`` (transformers
  CLIP-L/14 + the LAION MLP, ``CLIPProcessor``), which needs the CLIP as a transformers folder;
- ``pickscore``: transformers ``CLIPModel`` and its processor (PIL backend) as in the PickScore
  model card.

The references are built by :mod:`steer.rewards.reference_models`; the first three packages come
from :mod:`steer.rewards.reference` (installed with ``pip install --no-deps``, or fetched with
``--fetch-reference``); without them only steer's scores are printed. The images are generated (no
download) at the reward's input size, so both sides see the same pixels. Bad files or keywords
exit with status 2 and one line; a difference beyond ``--tol`` with status 1.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _hub
from .reference import ReferenceUnavailable
from .reference_models import (
    Scorer,
    aesthetic_reference,
    hpsv2_reference,
    imagereward_reference,
    pickscore_reference,
)

__all__ = ["PROMPTS", "builtin_images", "to_pil", "reference_scorer", "verify", "main"]

PROMPTS = [
    "a smooth gradient of colours",
    "a red circle on a blue background",
    "a black and white checkerboard",
    "a sunset over the sea",
]


def builtin_images(size: tuple[int, int] = (224, 224)) -> Tensor:
    """Four deterministic test pictures ``[4, 3, H, W]`` in [0, 1], exactly representable in
    uint8 (so a PIL round trip is lossless): a gradient, a disk, a checkerboard, a sunset."""
    h, w = size
    y = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    x = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    gradient = torch.stack([x, y, 1 - x])
    r = ((x - 0.5) ** 2 + (y - 0.5) ** 2).sqrt()
    disk = torch.sigmoid((0.3 - r) * 60)  # soft edge
    circle = torch.stack([disk, 0.1 * (1 - disk), 1 - disk])
    checker = ((torch.floor(x * 8) + torch.floor(y * 8)) % 2).expand(3, h, w)
    sea = (y > 0.6 + 0.02 * torch.sin(x * 40)).float()
    sun = torch.sigmoid((0.15 - ((x - 0.5) ** 2 + (y - 0.6) ** 2).sqrt()) * 80) * (1 - sea)
    sky = torch.stack([0.9 - 0.3 * y, 0.4 - 0.2 * y, 0.3 + 0.4 * y])
    water = torch.stack([0.1 + 0 * y, 0.2 + 0.2 * y, 0.5 + 0 * y])
    sunset = sky * (1 - sea) + water * sea + sun * torch.tensor([0.1, 0.5, -0.3]).view(3, 1, 1)
    images = torch.stack([gradient, circle, checker, sunset]).clamp(0, 1)
    return (images * 255).round() / 255  # [4, 3, H, W]


def to_pil(images: Tensor) -> list[Any]:
    """``[B, 3, H, W]`` in [0, 1] -> RGB PIL images (rounded to uint8)."""
    from PIL import Image

    arrays = (images.detach().cpu().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)
    return [Image.fromarray(a.numpy()) for a in arrays]


def reference_scorer(
    name: str,
    weights: str,
    kwargs: Mapping[str, Any],
    *,
    med_config: str | None = None,
    reference_clip: str | None = None,
    fetch: bool = False,
) -> tuple[Scorer, str]:
    """The reference scorer of reward ``name`` for the files steer is given (``weights`` and
    steer's factory ``kwargs``), and a one-line note (e.g. keys the reference ignored)."""
    if name == "imagereward":
        from .imagereward import IMAGEREWARD_TOKENIZER

        if med_config is None:
            med_config = _hub.fetch("THUDM/ImageReward", "med_config.json", arg="--med-config")
        tok = kwargs.get("tokenizer", "default")
        tok = IMAGEREWARD_TOKENIZER if tok == "default" else str(tok)
        blip = kwargs.get("blip", "large")
        vision = blip.get("vision") if isinstance(blip, Mapping) else None
        score, report = imagereward_reference(weights, med_config, tok, vision, fetch)
        note = f"reference ignored {len(report.unexpected_keys)} file keys, missed "
        note += f"{len(report.missing_keys)} model keys {list(report.missing_keys)[:4]}"
        return score, note
    if name == "hpsv2":
        return hpsv2_reference(weights, kwargs.get("clip_model", "ViT-H-14"), fetch), ""
    if name == "aesthetic":
        clip = reference_clip or "openai/clip-vit-large-patch14"
        return aesthetic_reference(weights, clip, fetch), f"reference CLIP: {clip}"
    if name == "pickscore":
        from .pickscore import PICKSCORE_PROCESSOR

        proc = kwargs.get("processor", "default")
        proc = PICKSCORE_PROCESSOR if proc == "default" else str(proc)
        return pickscore_reference(weights, proc), ""
    raise KeyError(f"no reference for {name!r}; verify takes {', '.join(FACTORY_WEIGHTS)}")


# the keyword of steer's factory that takes the checkpoint path
FACTORY_WEIGHTS = {
    "aesthetic": "weights",
    "hpsv2": "weights",
    "imagereward": "weights",
    "pickscore": "model",
}


@dataclass
class Verification:
    """Steer's and the reference's scores of the built-in images."""

    name: str
    prompts: list[str]
    steer: list[float]
    reference: list[float] | None
    note: str

    @property
    def max_abs(self) -> float:
        if self.reference is None:
            return float("nan")
        return max(abs(s - r) for s, r in zip(self.steer, self.reference, strict=True))

    @property
    def max_rel(self) -> float:
        if self.reference is None:
            return float("nan")
        return self.max_abs / max(max(abs(r) for r in self.reference), 1e-12)

    def table(self) -> str:
        lines = [f"{'image':<10} {'prompt':<36} {'steer':>12} {'reference':>12} {'|diff|':>10}"]
        kinds = ["gradient", "circle", "checker", "sunset"]
        for i, (p, s) in enumerate(zip(self.prompts, self.steer, strict=True)):
            r = "-" if self.reference is None else f"{self.reference[i]:12.6f}"
            d = "-" if self.reference is None else f"{abs(s - self.reference[i]):10.2e}"
            lines.append(f"{kinds[i]:<10} {p:<36} {s:12.6f} {r:>12} {d:>10}")
        if self.reference is not None:
            lines.append(f"max |diff| {self.max_abs:.3e}, relative {self.max_rel:.3e}")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def verify(
    name: str,
    weights: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    med_config: str | None = None,
    reference_clip: str | None = None,
    fetch: bool = False,
) -> Verification:
    """Score the built-in images with ``weights`` through steer and, when its reference package
    can be imported, through the reference."""
    import steer.rewards as R

    if name not in FACTORY_WEIGHTS:
        raise KeyError(f"verify takes one of {', '.join(FACTORY_WEIGHTS)}, got {name!r}")
    kwargs = dict(kwargs or {})
    reward = R.get(name, **{FACTORY_WEIGHTS[name]: weights}, **kwargs)
    images = builtin_images(reward.input_size or (224, 224))
    prompts = list(PROMPTS)
    with torch.no_grad():
        ours = reward(images, prompts if reward.needs_prompts else None).tolist()
    try:
        scorer, note = reference_scorer(
            name, weights, kwargs, med_config=med_config, reference_clip=reference_clip,
            fetch=fetch,
        )  # fmt: skip
    except (ReferenceUnavailable, FileNotFoundError) as err:
        return Verification(name, prompts, ours, None, f"no reference: {err}")
    return Verification(name, prompts, ours, scorer(to_pil(images), prompts), note)


def _keyword(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--kw takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="steer rewards verify",
        description="Score built-in images with a checkpoint through steer and the reference code.",
    )
    parser.add_argument("name", choices=sorted(FACTORY_WEIGHTS))
    parser.add_argument(
        "--weights", required=True, help="checkpoint file (pickscore: model folder)"
    )
    parser.add_argument(
        "--kw", action="append", default=[], type=_keyword, metavar="KEY=VALUE",
        help="keyword of steer's factory (repeatable; JSON values are parsed), e.g. "
        "--kw tokenizer=/path/bert  --kw version=v2  --kw processor=/path/clip-h",
    )  # fmt: skip
    parser.add_argument("--med-config", help="imagereward: med_config.json (default: hub cache)")
    parser.add_argument(
        "--reference-clip",
        help="aesthetic: the reference's transformers CLIP folder (openai/clip-vit-large-patch14)",
    )
    parser.add_argument(
        "--fetch-reference", action="store_true",
        help="pip download the reference wheel (--no-deps) when it is not installed",
    )  # fmt: skip
    parser.add_argument(
        "--tol", type=float, default=1e-3, help="largest relative difference accepted (exit 1)"
    )
    args = parser.parse_args(list(argv or []))
    try:
        result = verify(
            args.name, args.weights, dict(args.kw), med_config=args.med_config,
            reference_clip=args.reference_clip, fetch=args.fetch_reference,
        )  # fmt: skip
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:  # bad files / keywords
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(result.table())
    if result.reference is not None and not result.max_rel <= args.tol:
        print(f"FAIL: relative difference {result.max_rel:.3e} > --tol {args.tol:g}")
        return 1
    return 0
