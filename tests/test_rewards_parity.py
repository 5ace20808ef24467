"""Parity of steer's model rewards with the code their checkpoints were published with.

Each reference model is built with random weights by the reference package's own classes, at a
reduced size (the architecture's kind and the input resolution kept, widths and depths shrunk),
and saved in the file format and key layout of the published checkpoint; steer loads that file
through its public ``steer.rewards.get`` and must give the same scores (1e-4 relative, float32).
Real-size layouts are compared on the meta device (no memory, no weights). The reference packages
cannot be dependencies (their pins: ``steer.rewards.reference.REFERENCES``); their wheels are
staged with ``pip download --no-deps`` when not installed (``STEER_REFERENCE_FETCH=0`` turns this
off), and a test skips, naming the pin, only when neither works. See docs/rewards.md.
"""

from __future__ import annotations

import collections
import json
import os
import string
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import steer.rewards as R
from steer.rewards import reference
from steer.rewards import verify as V
from steer.rewards.cli import main as rewards_cli

RTOL = 1e-4  # score parity at the model's input size (same pixels on both sides)
PREPROCESS_TOL = 1e-2  # preprocessing: max |diff| / std of the scores over random images
SIZES = [(256, 256), (300, 200), (200, 300), (97, 131), (512, 384), (227, 224), (224, 229)]
PROMPTS = V.PROMPTS + ["a photo of a cat", "a painting of a dog", "the sea", "a red dog"]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _staged(name: str) -> None:
    fetch = os.environ.get("STEER_REFERENCE_FETCH", "1") != "0"
    try:
        reference.stage(name, fetch=fetch)
    except reference.ReferenceUnavailable as err:
        pytest.skip(f"reference of {name} unavailable: {err}")


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights of unit-scale activations (the references' own inits make near-constant scores):
    matrices ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.1), biases and embeddings N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and "embed" not in name and "class_embedding" not in name:
                p.copy_(noise / p.shape[-1] ** 0.5)
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def smooth_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random images with a natural-ish spectrum (smooth fields + fine noise), uint8-exact."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(h, w), mode="bilinear")
    x = (coarse + 0.08 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1)
    return (x * 255).round() / 255


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def native_parity(reward: Any, scorer: V.Scorer, size: tuple[int, int]) -> float:
    """Max relative difference on the built-in and random images at the input size."""
    x = torch.cat([V.builtin_images(size), smooth_images(4, *size, seed=1)])
    ours = reward(x, PROMPTS if reward.needs_prompts else None)
    theirs = torch.tensor(scorer(V.to_pil(x), PROMPTS))
    return relative(ours, theirs)


def preprocessing_gap(reward: Any, scorer: V.Scorer, size: tuple[int, int]) -> dict[str, float]:
    """Max |score difference| from images of other sizes and aspect ratios (steer's torch resize
    vs the reference's own pipeline on the same pixels), over the std of the reference's scores
    of random images at the input size."""
    spread = torch.tensor(scorer(V.to_pil(smooth_images(16, *size, seed=2)), PROMPTS * 2)).std()
    gaps = {}
    for i, (h, w) in enumerate(SIZES):
        x = torch.cat([V.builtin_images((h, w)), smooth_images(4, h, w, seed=10 + i)])
        ours = reward(x, PROMPTS if reward.needs_prompts else None)
        theirs = torch.tensor(scorer(V.to_pil(x), PROMPTS))
        gaps[f"{h}x{w}"] = float((ours - theirs).abs().max() / spread)
    print(f"\n{reward.name}: preprocessing max|diff|/std by size {gaps}")
    return gaps


# --- ImageReward ------------------------------------------------------------------------------

IR_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=224, patch_size=32)  # fmt: skip
# the reference's MLP is MLP(768): its text tower stays 768 wide, shallow and narrow inside
IR_TEXT = dict(hidden_size=768, intermediate_size=64, num_hidden_layers=2, num_attention_heads=12,
               max_position_embeddings=64)  # fmt: skip


def _bert_folder(folder: Path) -> int:
    """A small uncased WordPiece vocabulary, laid out as the bert-base-uncased hub folder."""
    pieces = list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation)
    words = "a an the of photo cat dog painting with and on red circle blue sunset over sea"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + pieces + ["##" + p for p in pieces]
    tokens += [w for w in words.split() if w not in tokens]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return len(tokens) + 2  # + BLIP's [DEC] and [ENC]


def _med_config(path: Path, vocab: int, text: dict[str, Any]) -> None:
    """BLIP's med_config.json (THUDM/ImageReward's file) with the given sizes."""
    cfg = {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": text["hidden_size"],
        "initializer_range": 0.02, "intermediate_size": text["intermediate_size"],
        "layer_norm_eps": 1e-12, "max_position_embeddings": text["max_position_embeddings"],
        "model_type": "bert", "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"], "pad_token_id": 0, "type_vocab_size": 2,
        "vocab_size": vocab, "encoder_width": 768, "add_cross_attention": True,
    }  # fmt: skip
    path.write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _staged("imagereward")
    d = tmp_path_factory.mktemp("imagereward")
    vocab = _bert_folder(d / "bert-base-uncased")
    _med_config(d / "med_config.json", vocab, IR_TEXT)
    model = V.imagereward_model(str(d / "med_config.json"), str(d / "bert-base-uncased"), IR_VISION)
    _randomize(model, seed=0)
    torch.save(model.state_dict(), d / "ImageReward.pt")  # ImageReward.load reads this layout
    blip = {"vision": IR_VISION, "text": {**IR_TEXT, "vocab_size": vocab}}
    kwargs = {"blip": blip, "tokenizer": str(d / "bert-base-uncased")}
    return {"dir": d, "model": model, "kwargs": kwargs}


def test_imagereward_equals_reference(imagereward_files: dict[str, Any]) -> None:
    f = imagereward_files
    reward = R.get("imagereward", weights=str(f["dir"] / "ImageReward.pt"), **f["kwargs"])
    rel = native_parity(reward, V.imagereward_scorer(f["model"]), (224, 224))
    assert rel < RTOL, rel


def test_imagereward_preprocessing_matches_reference(imagereward_files: dict[str, Any]) -> None:
    f = imagereward_files
    reward = R.get("imagereward", weights=str(f["dir"] / "ImageReward.pt"), **f["kwargs"])
    gaps = preprocessing_gap(reward, V.imagereward_scorer(f["model"]), (224, 224))
    assert max(gaps.values()) < PREPROCESS_TOL, gaps


# --- HPS v2 -----------------------------------------------------------------------------------

HPS_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _staged("hpsv2")
    d = tmp_path_factory.mktemp("hpsv2")
    model, preprocess_val, tokenizer = V.hpsv2_model(HPS_CONFIG)
    _randomize(model, seed=1)
    torch.save({"state_dict": model.state_dict()}, d / "HPS_v2.1_compressed.pt")  # hpsv2's
    return {"dir": d, "scorer": V.hpsv2_scorer(model, preprocess_val, tokenizer)}


def test_hpsv2_equals_reference(hps_files: dict[str, Any]) -> None:
    path = str(hps_files["dir"] / "HPS_v2.1_compressed.pt")
    reward = R.get("hpsv2", weights=path, clip_model=HPS_CONFIG)
    assert native_parity(reward, hps_files["scorer"], (224, 224)) < RTOL


def test_hpsv2_preprocessing_is_the_references_resize_and_pad(hps_files: dict[str, Any]) -> None:
    path = str(hps_files["dir"] / "HPS_v2.1_compressed.pt")
    reward = R.get("hpsv2", weights=path, clip_model=HPS_CONFIG)
    gaps = preprocessing_gap(reward, hps_files["scorer"], (224, 224))
    assert max(gaps.values()) < 1e-4, gaps  # the same float pipeline: no PIL resize involved


# --- aesthetic --------------------------------------------------------------------------------

AES_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=224, patch_size=32, projection_dim=32, hidden_act="quick_gelu")  # fmt: skip
AES_OPEN_CLIP = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32,
                   "patch_size": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}  # fmt: skip


def transformers_to_open_clip(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A transformers CLIP vision tower's state dict in open_clip's ``visual.*`` layout (what
    timm/vit_large_patch14_clip_224.openai holds for OpenAI's weights)."""
    out = {
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].T.contiguous(),
    }
    renames = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
               ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]  # fmt: skip
    for s in ("weight", "bias"):
        out[f"visual.ln_pre.{s}"] = sd[f"vision_model.pre_layrnorm.{s}"]
        out[f"visual.ln_post.{s}"] = sd[f"vision_model.post_layernorm.{s}"]
        for i in range(layers):
            hf, oc = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
            qkv = [sd[f"{hf}self_attn.{q}_proj.{s}"] for q in "qkv"]
            out[f"{oc}attn.in_proj_{s}"] = torch.cat(qkv)
            for a, b in renames:
                out[f"{oc}{b}.{s}"] = sd[f"{hf}{a}.{s}"]
    return out


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import open_clip
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPVisionConfig

    from steer.rewards.tiny import clip_tokenizer

    _staged("aesthetic")
    v2 = reference.import_reference("aesthetic", "aesthetics_predictor.v2")
    d = tmp_path_factory.mktemp("aesthetic")
    model = v2.AestheticsPredictorV2Linear(CLIPVisionConfig(**AES_VISION))
    _randomize(model, seed=2)
    # 1. the reference's CLIP as a transformers folder (openai/clip-vit-large-patch14's layout)
    model.save_pretrained(d / "clip")
    ip = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=ip, tokenizer=clip_tokenizer()).save_pretrained(d / "clip")
    # 2. the LAION MLP file: the reference's head with LAION's "layers." keys
    mlp = collections.OrderedDict(("layers." + k, v) for k, v in model.layers.state_dict().items())
    torch.save(mlp, d / "sac+logos+ava1-l14-linearMSE.pth")
    # 3. the same CLIP in open_clip's layout, as steer loads it (random text tower)
    clip = open_clip.CLIP(**AES_OPEN_CLIP)
    sd = clip.state_dict()
    visual = transformers_to_open_clip(model.state_dict(), AES_VISION["num_hidden_layers"])
    assert set(visual) == {k for k in sd if k.startswith("visual.")}  # nothing left random
    torch.save({**sd, **visual}, d / "open_clip_pytorch_model.bin")
    kwargs = {"clip_model": AES_OPEN_CLIP, "pretrained": str(d / "open_clip_pytorch_model.bin")}
    scorer = V.aesthetic_scorer(model, V._pil_processor(str(d / "clip")))
    return {"dir": d, "kwargs": kwargs, "scorer": scorer, "model": model}


def test_aesthetic_equals_reference(aesthetic_files: dict[str, Any]) -> None:
    f = aesthetic_files
    reward = R.get("aesthetic", weights=str(f["dir"] / "sac+logos+ava1-l14-linearMSE.pth"),
                   **f["kwargs"])  # fmt: skip
    assert native_parity(reward, f["scorer"], (224, 224)) < RTOL


def test_aesthetic_preprocessing_matches_openai_clip(aesthetic_files: dict[str, Any]) -> None:
    """The LAION MLP was trained on embeddings of OpenAI CLIP's preprocessing (torchvision on
    PIL: Resize(224, bicubic), CenterCrop(224)), which steer follows; simple-aesthetics-
    predictor's transformers processor crops one pixel higher where the excess is 3 mod 4."""
    from torchvision import transforms as T

    f = aesthetic_files
    reward = R.get("aesthetic", weights=str(f["dir"] / "sac+logos+ava1-l14-linearMSE.pth"),
                   **f["kwargs"])  # fmt: skip
    openai = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
                        T.CenterCrop(224), T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])  # fmt: skip
    model = f["model"]

    def scorer(pils: list[Any], prompts: list[str]) -> list[float]:
        with torch.no_grad():
            pixels = torch.stack([openai(im) for im in pils])
            return model(pixel_values=pixels).logits[:, 0].tolist()

    gaps = preprocessing_gap(reward, scorer, (224, 224))
    assert max(gaps.values()) < PREPROCESS_TOL, gaps
    processor = preprocessing_gap(reward, f["scorer"], (224, 224))  # simple-aesthetics-predictor
    assert max(v for k, v in processor.items() if k != "227x224") < PREPROCESS_TOL, processor
