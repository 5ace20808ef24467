"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences. The score is
``logit_scale.exp() * cos(image, text)`` (≈ 18-23 for real images), as in the authors' example.
Model and processor load with transformers by hub id or local folder; the image preprocessing
(resize shortest side, center crop, normalise) is re-done in torch from the processor's settings
so that gradients reach the pixels."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from . import _hub
from ._open_clip import DEFAULT, OPENAI_MEAN, OPENAI_STD, TINY
from .base import Reward, normalize, resize_center_crop

__all__ = ["PickScoreReward", "pickscore", "PICKSCORE_MODEL", "PICKSCORE_PROCESSOR"]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _embeds(out: Any) -> Tensor:
    """transformers < 5 returns the projected embedding, >= 5 an output with ``pooler_output``."""
    return out if isinstance(out, Tensor) else out.pooler_output


class PickScoreReward(Reward):
    """``exp(logit_scale) * <img / |img|, txt / |txt|>`` of a transformers CLIPModel."""

    differentiable = True
    needs_prompts = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        source: str,
        batch_size: int,
        max_length: int = 77,
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.name, self.source, self.input_size = "pickscore", source, size
        self.mean, self.std, self.max_length = mean, std, max_length

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        assert prompts is not None  # checked by Reward.forward (needs_prompts)
        # 1. pixels as the CLIP processor would prepare them, in torch
        # as transformers' PIL image processor: uint8 PIL resize, crop offsets rounded down
        pixels = resize_center_crop(images, self.input_size, floor_offsets=True, pil_rounding=True)
        pixels = normalize(pixels, self.mean, self.std)
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(images.device)
        # 2. unit-norm embeddings, scaled cosine
        img = _embeds(self.model.get_image_features(pixel_values=pixels))  # [b, D]
        txt = _embeds(
            self.model.get_text_features(
                input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]
            )
        )
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (img * txt.to(img.dtype)).sum(-1)  # [b]


def _tiny_model(tokenizer: Any) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        **ids,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))


def _load(kind: str, ident: str, cache_dir: str | None) -> Any:
    from transformers import CLIPModel, CLIPProcessor

    from ._hub import offline

    loader = CLIPModel if kind == "model" else CLIPProcessor
    try:
        return loader.from_pretrained(ident, cache_dir=cache_dir, local_files_only=offline())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load the PickScore {kind} {ident!r} ({type(err).__name__}): it is "
            f"neither a local folder nor in the hub cache. Provide it with\n"
            f"    huggingface-cli download {ident}\n"
            f"where the hub is reachable, or pass {kind}='/path/to/folder' (a folder saved "
            "with save_pretrained)."
        ) from err


def pickscore(
    model: str = PICKSCORE_MODEL,
    processor: str = DEFAULT,
    batch_size: int = 32,
    cache_dir: str | None = None,
) -> PickScoreReward:
    """PickScore reward.

    Args:
        model: transformers CLIPModel hub id or folder, or "tiny-test" (random, offline).
        processor: CLIPProcessor hub id or folder; "default" is PickScore's CLIP-H processor
            (or the offline tokenizer of :mod:`steer.rewards.tiny` for "tiny-test").
    """
    if model == TINY:
        if processor not in (DEFAULT, TINY):
            raise ValueError(
                f"model='tiny-test' uses its own tokenizer; got processor={processor!r}"
            )
        from .tiny import clip_tokenizer

        tokenizer = clip_tokenizer()
        net = _tiny_model(tokenizer)
        size, mean, std = (32, 32), OPENAI_MEAN, OPENAI_STD
        source = "random (tiny-test)"
    else:
        proc = _load(
            "processor", PICKSCORE_PROCESSOR if processor == DEFAULT else processor, cache_dir
        )
        net = _load("model", model, cache_dir)
        tokenizer, ip = proc.tokenizer, proc.image_processor
        vocab = int(net.config.text_config.vocab_size)
        _hub.check_vocab(
            tokenizer,
            vocab,
            arg="processor",
            ident=PICKSCORE_PROCESSOR if processor == DEFAULT else processor,
        )
        crop = ip.crop_size if getattr(ip, "do_center_crop", True) else ip.size
        size = (
            (int(crop["height"]), int(crop["width"]))
            if "height" in crop
            else (int(crop["shortest_edge"]),) * 2
        )
        mean, std = tuple(ip.image_mean), tuple(ip.image_std)
        source = f"transformers CLIPModel {model} + processor {processor}"
    max_length = int(net.config.text_config.max_position_embeddings)
    return PickScoreReward(net, tokenizer, size, mean, std, source, batch_size, max_length).freeze()
