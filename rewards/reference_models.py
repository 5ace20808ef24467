"""The reference models of steer's model rewards, built by their own packages' classes, and
their scoring as the packages' own entry points do it (for the parity tests and ``steer rewards
verify``). Each ``*_model`` builds a reference with random weights (optionally at a reduced size),
each ``*_scorer`` scores PIL images and prompts with it, each ``*_reference`` loads a checkpoint
the way the reference package loads its published file.

- ImageReward: ``ImageReward.ImageReward`` (image-reward), its ``score(prompt, image)``;
- HPS v2: hpsv2's open_clip fork with ``hpsv2.img_score.initialize_model``'s arguments and the
  body of ``hpsv2.score``;
- aesthetic: simple-aesthetics-predictor's ``AestheticsPredictorV2Linear`` and its README's
  ``CLIPProcessor`` call;
- PickScore: transformers ``CLIPModel`` as in the PickScore model card.

Transformers processors are used with their PIL backend (transformers 4's image processors,
which these models were published with).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .reference import import_reference

__all__ = [
    "Scorer",
    "imagereward_model",
    "imagereward_scorer",
    "imagereward_reference",
    "hpsv2_model",
    "hpsv2_scorer",
    "hpsv2_reference",
    "aesthetic_scorer",
    "aesthetic_reference",
    "pil_processor",
    "pickscore_scorer",
    "pickscore_reference",
]

Scorer = Callable[[list[Any], list[str]], list[float]]


@contextlib.contextmanager
def _patched(obj: Any, attr: str, value: Any) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def _vit_kwargs(vision: Mapping[str, Any]) -> dict[str, Any]:
    """BLIP ``VisionTransformer`` keywords from BlipVisionConfig-style overrides (only for
    reduced-size parity tests: at full size the reference builds its own ViT-L)."""
    width = int(vision["hidden_size"])
    return dict(
        img_size=int(vision.get("image_size", 224)),
        patch_size=int(vision.get("patch_size", 16)),
        embed_dim=width,
        depth=int(vision["num_hidden_layers"]),
        num_heads=int(vision["num_attention_heads"]),
        mlp_ratio=int(vision.get("intermediate_size", 4 * width)) / width,
    )


def imagereward_model(
    med_config: str,
    tokenizer: str,
    vision: Mapping[str, Any] | None = None,
    fetch: bool = False,
) -> Any:
    """The reference ``ImageReward`` module (random weights), built by its own constructor.

    ``tokenizer``: what the reference's ``bert-base-uncased`` resolves to (a hub id or folder).
    ``vision``: reduced ViT size (BlipVisionConfig names), else the reference's own ViT-L.
    """
    ir = import_reference("imagereward", "ImageReward.ImageReward", fetch=fetch)
    blip = importlib.import_module("ImageReward.models.BLIP.blip")
    pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    base_tok = blip.BertTokenizer

    class Redirected(base_tok):  # type: ignore[misc, valid-type]
        """``bert-base-uncased`` -> ``tokenizer``; transformers 4's
        ``additional_special_tokens_ids`` (read by the reference's ``init_tokenizer``) from
        transformers 5's extra special tokens."""

        @classmethod
        def from_pretrained(cls, name: str, *args: Any, **kwargs: Any) -> Any:
            target = tokenizer if name == "bert-base-uncased" else name
            return super().from_pretrained(target, *args, **kwargs)

        @property
        def additional_special_tokens_ids(self) -> list[int]:
            extra = list(getattr(self, "extra_special_tokens", None) or [])
            return [int(i) for i in self.convert_tokens_to_ids(extra)]

    def small_vit(*args: Any, **kwargs: Any) -> tuple[Any, int]:
        assert vision is not None
        return vit.VisionTransformer(**_vit_kwargs(vision)), int(vision["hidden_size"])

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(blip, "BertTokenizer", Redirected))
        if vision is not None:
            stack.enter_context(_patched(pretrain, "create_vit", small_vit))
        return ir.ImageReward(med_config=med_config, device="cpu")


def imagereward_scorer(model: Any) -> Scorer:
    """The reference's own ``ImageReward.score(prompt, pil_image)``, image by image."""
    model.eval()

    def score(pils: list[Any], prompts: list[str]) -> list[float]:
        with torch.no_grad():
            return [float(model.score(p, im)) for im, p in zip(pils, prompts, strict=True)]

    return score


def imagereward_reference(
    weights: str,
    med_config: str,
    tokenizer: str,
    vision: Mapping[str, Any] | None = None,
    fetch: bool = False,
) -> tuple[Scorer, Any]:
    """The reference ImageReward loaded as ``ImageReward.load`` does (``strict=False``), and
    ``load_state_dict``'s report (the keys it ignored or missed)."""
    model = imagereward_model(med_config, tokenizer, vision, fetch)
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    report = model.load_state_dict(sd, strict=False)
    return imagereward_scorer(model), report


def hpsv2_model(clip_model: str | Mapping[str, Any] = "ViT-H-14", fetch: bool = False) -> Any:
    """``(model, preprocess_val, tokenizer)`` of hpsv2's open_clip (random weights), built with
    ``hpsv2.img_score.initialize_model``'s arguments, without the laion2B weights that an HPS
    checkpoint replaces entirely. ``clip_model``: "ViT-H-14" (the reference's own config) or a
    model config dict (reduced size), registered with the reference's ``add_model_config``."""
    factory = import_reference("hpsv2", "hpsv2.src.open_clip.factory", fetch=fetch)
    name = clip_model
    if isinstance(clip_model, Mapping):
        digest = hashlib.sha1(json.dumps(clip_model, sort_keys=True).encode()).hexdigest()
        name = f"steer-verify-{digest[:10]}"
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(dict(clip_model), f)
            factory.add_model_config(path)
    model, _, preprocess_val = factory.create_model_and_transforms(
        name, None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None,
        pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True,
        aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False,
    )  # fmt: skip
    return model, preprocess_val, factory.get_tokenizer(name)


def hpsv2_scorer(model: Any, preprocess_val: Any, tokenizer: Any) -> Scorer:
    """The body of ``hpsv2.score`` (CPU: its CUDA autocast does nothing)."""
    model.eval()

    def score(pils: list[Any], prompts: list[str]) -> list[float]:
        out = []
        for im, p in zip(pils, prompts, strict=True):
            with torch.no_grad():
                o = model(preprocess_val(im).unsqueeze(0), tokenizer([p]))
                logits = o["image_features"] @ o["text_features"].T
                out.append(float(torch.diagonal(logits)[0]))
        return out

    return score


def hpsv2_reference(
    weights: str, clip_model: str | Mapping[str, Any] = "ViT-H-14", fetch: bool = False
) -> Scorer:
    """HPS v2 as ``hpsv2.score`` computes it, loading ``checkpoint['state_dict']`` strictly."""
    model, preprocess_val, tokenizer = hpsv2_model(clip_model, fetch)
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    return hpsv2_scorer(model, preprocess_val, tokenizer)


def aesthetic_scorer(model: Any, processor: Any) -> Scorer:
    """simple-aesthetics-predictor's README: ``processor(images=...)`` then ``.logits``."""
    model.eval()

    def score(pils: list[Any], prompts: list[str]) -> list[float]:
        with torch.no_grad():
            return model(**processor(images=pils, return_tensors="pt")).logits[:, 0].tolist()

    return score


def aesthetic_reference(weights: str, clip: str, fetch: bool = False) -> Scorer:
    """simple-aesthetics-predictor's ``AestheticsPredictorV2Linear`` on the transformers CLIP
    folder ``clip``, with the LAION MLP file ``weights`` loaded as its converter does."""
    v2 = import_reference("aesthetic", "aesthetics_predictor.v2", fetch=fetch)
    model = v2.AestheticsPredictorV2Linear.from_pretrained(clip)
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    model.layers.load_state_dict({k.replace("layers.", ""): v for k, v in sd.items()})
    return aesthetic_scorer(model, pil_processor(clip))


def pil_processor(folder: str) -> Any:
    """The processor of ``folder`` with its PIL image backend (transformers 4's CLIP processor,
    which PickScore and the LAION predictor were used with)."""
    from transformers import AutoImageProcessor, CLIPProcessor

    proc = CLIPProcessor.from_pretrained(folder)
    proc.image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    return proc


def pickscore_scorer(model: Any, proc: Any) -> Scorer:
    """PickScore's model card: ``logit_scale.exp() * cos`` of the processor's inputs."""
    model.eval()

    def embeds(out: Any) -> Tensor:
        e = out if isinstance(out, Tensor) else out.pooler_output
        return e / torch.norm(e, dim=-1, keepdim=True)

    def score(pils: list[Any], prompts: list[str]) -> list[float]:
        out = []
        kw = dict(padding=True, truncation=True, max_length=77, return_tensors="pt")
        for im, p in zip(pils, prompts, strict=True):
            with torch.no_grad():
                img = embeds(model.get_image_features(**proc(images=[im], **kw)))
                txt = embeds(model.get_text_features(**proc(text=[p], **kw)))
                out.append(float(model.logit_scale.exp() * (txt @ img.T)[0, 0]))
        return out

    return score


def pickscore_reference(model_dir: str, processor: str) -> Scorer:
    """PickScore as its model card computes it (transformers only, PIL image backend)."""
    from transformers import AutoModel

    return pickscore_scorer(AutoModel.from_pretrained(model_dir), pil_processor(processor))
