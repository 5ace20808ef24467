"""steer.rewards: the reward models users align to, behind one contract.

``reward = steer.rewards.get(name, **kwargs)``; ``reward(images, prompts) -> Tensor[B]`` of raw
scores for images float ``[B, 3, H, W]`` in ``[0, 1]`` (§1: ``r`` in ``exp(r / β)`` or
``p_prior · r``). ``steer.rewards.names()`` lists the registry and ``steer rewards`` prints it.
Heavy libraries (open_clip, transformers) are imported by the factories, not here.

Register your own reward::

    @steer.rewards.register("my-reward", differentiable=True, input_size=64)
    def my_reward(batch_size: int = 32) -> steer.rewards.Reward: ...
"""

from __future__ import annotations

from .base import NonFiniteRewardError, Reward, check_images, check_prompts
from .registry import RewardSpec, get, names, random_kwargs, register, spec, specs, test_kwargs

__all__ = [
    "NonFiniteRewardError",
    "Reward",
    "RewardSpec",
    "check_images",
    "check_prompts",
    "get",
    "names",
    "random_kwargs",
    "register",
    "spec",
    "specs",
    "test_kwargs",
]

_P = "steer.rewards."
register(
    "jpeg-compressibility",
    _P + "jpeg:jpeg_compressibility",
    differentiable=False,
    source="PIL JPEG encoder at quality 95 (no weights)",
    summary="minus the JPEG size in kB (DDPO)",
    random_kwargs={},  # no weights
)
register(
    "jpeg-incompressibility",
    _P + "jpeg:jpeg_incompressibility",
    differentiable=False,
    source="PIL JPEG encoder at quality 95 (no weights)",
    summary="the JPEG size in kB (DDPO)",
    random_kwargs={},  # no weights
)
register(
    "aesthetic",
    _P + "aesthetic:aesthetic",
    differentiable=True,
    input_size=224,
    source="open_clip ViT-L-14/openai + hf-hub:trl-lib/ddpo-aesthetic-predictor",
    summary="LAION improved aesthetic predictor (MLP on CLIP L/14 embeddings)",
    test_kwargs={"clip_model": "tiny-test", "pretrained": None, "weights": None},
    random_kwargs={"pretrained": None, "weights": None},
)
register(
    "clip-score",
    _P + "clip_score:clip_score",
    differentiable=True,
    input_size=224,
    source="open_clip ViT-L-14/openai (any open_clip model/tag)",
    summary="CLIP image-text cosine, or max(100 cos, 0) as torchmetrics",
    needs_prompts=True,
    test_kwargs={"clip_model": "tiny-test", "pretrained": None},
    random_kwargs={"pretrained": None},
)
register(
    "pickscore",
    _P + "pickscore:pickscore",
    differentiable=True,
    input_size=224,
    source="hf-hub:yuvalkirstain/PickScore_v1 + laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor",
    summary="PickScore: exp(logit_scale) * cos (transformers CLIPModel)",
    needs_prompts=True,
    test_kwargs={"model": "tiny-test"},
)
register(
    "hpsv2",
    _P + "clip_score:hpsv2",
    differentiable=True,
    input_size=224,
    source="hf-hub:xswu/HPSv2 (HPS_v2.1 / HPS_v2 _compressed.pt) on open_clip ViT-H-14",
    summary="Human Preference Score v2 / v2.1: cosine of HPS-tuned CLIP-H",
    needs_prompts=True,
    test_kwargs={"clip_model": "tiny-test", "weights": None},
    random_kwargs={"weights": None},
)
register(
    "imagereward",
    _P + "imagereward:imagereward",
    differentiable=True,
    input_size=224,
    source="hf-hub:THUDM/ImageReward/ImageReward.pt + bert-base-uncased (transformers BLIP)",
    summary="ImageReward (BLIP ViT-L + BERT cross-attention + MLP), normalised",
    needs_prompts=True,
    test_kwargs={"blip": "tiny-test", "weights": None},
    random_kwargs={"weights": None, "tokenizer": "tiny-test"},
)
register(
    "classifier",
    _P + "classifier:classifier",
    differentiable=True,
    source="any torch classifier (module, state dict + architecture, or .pt2)",
    summary="log p(c | x) or p(c | x), max over a set of classes",
    test_kwargs=_P + "classifier:test_kwargs",
    random_kwargs={},  # built locally: nothing to download
)
register(
    "digits-classifier",
    "steer.digits.classifier:digits_classifier",
    differentiable=True,
    input_size=16,
    source="small CNN trained locally on scikit-learn digits (cached in ~/.cache/steer)",
    summary="log p(c | x) of the embedded digits classifier (16x16 grayscale)",
    random_kwargs={},  # built locally: nothing to download
)
