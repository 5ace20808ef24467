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
from steer.rewards import reference_models as M
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


def native_parity(reward: Any, scorer: M.Scorer, size: tuple[int, int]) -> float:
    """Max relative difference on the built-in and random images at the input size."""
    x = torch.cat([V.builtin_images(size), smooth_images(4, *size, seed=1)])
    ours = reward(x, PROMPTS if reward.needs_prompts else None)
    theirs = torch.tensor(scorer(V.to_pil(x), PROMPTS))
    rel = relative(ours, theirs)
    print(f"\n{reward.name}: max relative score difference at {size[0]}x{size[1]}: {rel:.2e}")
    return rel


def preprocessing_gap(reward: Any, scorer: M.Scorer, size: tuple[int, int]) -> dict[str, float]:
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
    model = M.imagereward_model(str(d / "med_config.json"), str(d / "bert-base-uncased"), IR_VISION)
    _randomize(model, seed=0)
    torch.save(model.state_dict(), d / "ImageReward.pt")  # ImageReward.load reads this layout
    blip = {"vision": IR_VISION, "text": {**IR_TEXT, "vocab_size": vocab}}
    kwargs = {"blip": blip, "tokenizer": str(d / "bert-base-uncased")}
    return {"dir": d, "model": model, "kwargs": kwargs}


def test_imagereward_equals_reference(imagereward_files: dict[str, Any]) -> None:
    f = imagereward_files
    reward = R.get("imagereward", weights=str(f["dir"] / "ImageReward.pt"), **f["kwargs"])
    rel = native_parity(reward, M.imagereward_scorer(f["model"]), (224, 224))
    assert rel < RTOL, rel


def test_imagereward_preprocessing_matches_reference(imagereward_files: dict[str, Any]) -> None:
    f = imagereward_files
    reward = R.get("imagereward", weights=str(f["dir"] / "ImageReward.pt"), **f["kwargs"])
    gaps = preprocessing_gap(reward, M.imagereward_scorer(f["model"]), (224, 224))
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
    model, preprocess_val, tokenizer = M.hpsv2_model(HPS_CONFIG)
    _randomize(model, seed=1)
    torch.save({"state_dict": model.state_dict()}, d / "HPS_v2.1_compressed.pt")  # hpsv2's
    return {"dir": d, "scorer": M.hpsv2_scorer(model, preprocess_val, tokenizer)}


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
                  image_size=224, patch_size=32, projection_dim=32,
                  hidden_act="quick_gelu")  # fmt: skip
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
               ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
               ("mlp.fc2", "mlp.c_proj")]  # fmt: skip
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
    scorer = M.aesthetic_scorer(model, M.pil_processor(str(d / "clip")))
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
                        T.CenterCrop(224), T.ToTensor(),
                        T.Normalize(OPENAI_MEAN, OPENAI_STD)])  # fmt: skip
    model = f["model"]

    def scorer(pils: list[Any], prompts: list[str]) -> list[float]:
        with torch.no_grad():
            pixels = torch.stack([openai(im) for im in pils])
            return model(pixel_values=pixels).logits[:, 0].tolist()

    gaps = preprocessing_gap(reward, scorer, (224, 224))
    assert max(gaps.values()) < PREPROCESS_TOL, gaps
    processor = preprocessing_gap(reward, f["scorer"], (224, 224))  # simple-aesthetics-predictor
    assert max(v for k, v in processor.items() if k != "227x224") < PREPROCESS_TOL, processor


# --- PickScore --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickscore_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A PickScore_v1-like model folder and a laion/CLIP-ViT-H-14-like processor folder."""
    from transformers import CLIPConfig, CLIPModel

    from steer.rewards.tiny import clip_tokenizer

    d = tmp_path_factory.mktemp("pickscore")
    tok = clip_tokenizer()
    # legacy token ids 0 / 1 / 2 as in PickScore_v1's config.json (pooling at the largest id)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, pad_token_id=1,
                eos_token_id=2)  # fmt: skip
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=224, patch_size=32)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    _randomize(model, seed=3)
    model.save_pretrained(d / "PickScore_v1")
    proc = d / "CLIP-ViT-H-14-laion2B-s32B-b79K"
    tok.save_pretrained(proc)
    model.config.save_pretrained(proc)  # the laion repo is a whole model folder
    (proc / "preprocessor_config.json").write_text(json.dumps({  # the hub file's legacy format
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_MEAN),
        "image_std": list(OPENAI_STD), "resample": 3, "size": 224}))  # fmt: skip
    kwargs = {"processor": str(proc)}
    return {"dir": d, "model": str(d / "PickScore_v1"), "kwargs": kwargs,
            "scorer": M.pickscore_reference(str(d / "PickScore_v1"), str(proc))}  # fmt: skip


def test_pickscore_equals_reference(pickscore_files: dict[str, Any]) -> None:
    f = pickscore_files
    reward = R.get("pickscore", model=f["model"], **f["kwargs"])
    assert native_parity(reward, f["scorer"], (224, 224)) < RTOL


def test_pickscore_preprocessing_matches_reference(pickscore_files: dict[str, Any]) -> None:
    f = pickscore_files
    reward = R.get("pickscore", model=f["model"], **f["kwargs"])
    gaps = preprocessing_gap(reward, f["scorer"], (224, 224))
    assert max(gaps.values()) < PREPROCESS_TOL, gaps


# --- real sizes: layouts on the meta device ---------------------------------------------------

REAL_MED = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=512)  # fmt: skip


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_real_imagereward_layout_equals_reference(tmp_path: Path) -> None:
    """The reference ImageReward (ViT-L/16 + BERT-base with BLIP's med_config) maps key for key
    and shape for shape onto steer's "large" model; only BLIP's unused heads are dropped."""
    from steer.rewards.imagereward import ImageRewardModel, blip_configs, map_checkpoint

    _staged("imagereward")
    _bert_folder(tmp_path / "bert")
    _med_config(tmp_path / "med_config.json", 30524, REAL_MED)
    with torch.device("meta"):
        ref = M.imagereward_model(str(tmp_path / "med_config.json"), str(tmp_path / "bert"))
        ours = ImageRewardModel(*blip_configs("large"))
    mapped, dropped = map_checkpoint(ref.state_dict())
    assert _shapes(mapped) == _shapes(ours.state_dict())
    assert sorted(dropped) == [
        "blip.text_encoder.embeddings.position_ids",
        "blip.text_proj.bias",
        "blip.text_proj.weight",
        "blip.vision_proj.bias",
        "blip.vision_proj.weight",
    ]


def test_real_hpsv2_and_aesthetic_layouts_equal_reference() -> None:
    """HPS's ViT-H-14 (hpsv2's open_clip) has open_clip's ViT-H-14 keys and shapes; the
    aesthetic reference's CLIP-L/14 (transformers) maps onto open_clip's ViT-L-14-quickgelu
    visual tower, whose MLPs use QuickGELU, and its head onto steer's RewardMLP(768)."""
    import open_clip
    from transformers import CLIPVisionConfig

    from steer.rewards.aesthetic import RewardMLP

    _staged("hpsv2")
    _staged("aesthetic")
    factory = reference.import_reference("hpsv2", "hpsv2.src.open_clip.factory")
    ref_model = reference.import_reference("hpsv2", "hpsv2.src.open_clip.model")
    v2 = reference.import_reference("aesthetic", "aesthetics_predictor.v2")
    openai_l14 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=224, patch_size=14,
                                  projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
    with torch.device("meta"):
        hps = ref_model.CLIP(**factory.get_model_config("ViT-H-14"))
        ours_h = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
        aes = v2.AestheticsPredictorV2Linear(openai_l14)
        ours_l = open_clip.CLIP(**open_clip.get_model_config("ViT-L-14-quickgelu"))
        mlp = RewardMLP(768)
    assert _shapes(hps.state_dict()) == _shapes(ours_h.state_dict())
    visual = {k: v for k, v in ours_l.state_dict().items() if k.startswith("visual.")}
    assert _shapes(transformers_to_open_clip(aes.state_dict(), 24)) == _shapes(visual)
    head = {"layers." + k: v for k, v in aes.layers.state_dict().items()}
    assert _shapes(head) == _shapes(mlp.state_dict())
    act = ours_l.visual.transformer.resblocks[0].mlp.gelu
    assert type(act).__name__ == "QuickGELU"
    assert open_clip.get_pretrained_cfg("ViT-L-14", "openai")["quick_gelu"] is True


# --- QuickGELU: an open_clip tag and its local file -------------------------------------------

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


def test_open_clip_tag_and_its_local_file_give_equal_embeddings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An architecture whose 'openai' tag uses QuickGELU (as ViT-L-14's): the tag, read from a
    local hub cache, and a copy of its file under the ``-quickgelu`` name compute the same
    embeddings; the plain name with the file is refused, naming the ``-quickgelu`` variant."""
    import open_clip
    from open_clip import pretrained as P

    for name, quick in (("steer-tiny", False), ("steer-tiny-quickgelu", True)):
        (tmp_path / f"{name}.json").write_text(json.dumps({**TINY_CLIP, "quick_gelu": quick}))
    open_clip.add_model_config(tmp_path)
    tag = P._pcfg(hf_hub="steer-test/tiny-openai/", quick_gelu=True)
    monkeypatch.setitem(P._PRETRAINED, "steer-tiny", {"openai": tag})
    # the tag's file in a hub cache, as `huggingface-cli download` leaves it
    snap = tmp_path / "hub" / "models--steer-test--tiny-openai" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--steer-test--tiny-openai" / "refs").mkdir()
    (tmp_path / "hub" / "models--steer-test--tiny-openai" / "refs" / "main").write_text("0" * 40)
    model = open_clip.CLIP(**TINY_CLIP, quick_gelu=True)
    _randomize(model, seed=4)
    torch.save(model.state_dict(), snap / "open_clip_pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x = smooth_images(3, 40, 48, seed=5)
    by_tag = R.get("clip-score", clip_model="steer-tiny", pretrained="openai",
                   cache_dir=str(tmp_path / "hub"))  # fmt: skip
    file = str(snap / "open_clip_pytorch_model.bin")
    by_file = R.get("clip-score", clip_model="steer-tiny-quickgelu", pretrained=file)
    emb = [r.model.encode_image(r.clip.preprocess(x)) for r in (by_tag, by_file)]
    torch.testing.assert_close(emb[0], emb[1], rtol=0, atol=0)
    flag = R.get("clip-score", clip_model="steer-tiny", pretrained=file, quick_gelu=True)
    torch.testing.assert_close(flag.model.encode_image(flag.clip.preprocess(x)), emb[0])
    with pytest.raises(ValueError, match="clip_model='steer-tiny-quickgelu'"):
        R.get("clip-score", clip_model="steer-tiny", pretrained=file)
    gelu = R.get("clip-score", clip_model="steer-tiny", pretrained=file, quick_gelu=False)
    assert (gelu.model.encode_image(gelu.clip.preprocess(x)) - emb[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="contradicts open_clip tag"):
        R.get("clip-score", clip_model="steer-tiny", pretrained="openai", quick_gelu=False,
              cache_dir=str(tmp_path / "hub"))  # fmt: skip


def test_aesthetic_refuses_a_vit_l_file_without_its_activation(tmp_path: Path) -> None:
    (tmp_path / "ViT-L-14.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="clip_model='ViT-L-14-quickgelu'"):
        R.get("aesthetic", pretrained=str(tmp_path / "ViT-L-14.bin"), weights=None)


# --- bad checkpoints --------------------------------------------------------------------------


def test_a_checkpoint_of_another_model_names_keys_file_and_what_it_is(
    hps_files: dict[str, Any], aesthetic_files: dict[str, Any], imagereward_files: dict[str, Any]
) -> None:
    mlp = str(aesthetic_files["dir"] / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(ValueError) as err:
        R.get("hpsv2", weights=mlp, clip_model=HPS_CONFIG)
    text = str(err.value)
    assert mlp in text and "missing keys ['ln_final.bias'" in text
    assert "unexpected keys ['layers.0.bias'" in text and "aesthetic-style MLP head" in text
    clip = str(aesthetic_files["dir"] / "open_clip_pytorch_model.bin")  # another CLIP's shapes
    with pytest.raises(ValueError, match=r"shape mismatches \['visual.+vision width 64, 2 layers"):
        R.get("hpsv2", weights=clip, clip_model=HPS_CONFIG)
    hps = str(hps_files["dir"] / "HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match=r"unrecognised ImageReward checkpoint keys.+open_clip"):
        R.get("imagereward", weights=hps, **imagereward_files["kwargs"])
    with pytest.raises(ValueError, match="named like the HPS v2.1 checkpoint but version='v2'"):
        R.get("hpsv2", version="v2", weights=hps, clip_model=HPS_CONFIG)


def test_checkpoint_descriptions_name_the_variant() -> None:
    import open_clip

    from steer.rewards._checkpoints import describe

    with torch.device("meta"):
        sds = {n: open_clip.CLIP(**open_clip.get_model_config(n)).state_dict()
               for n in ("ViT-L-14", "ViT-H-14")}  # fmt: skip
    for name, vision in (("ViT-L-14", "1024, 24 layers"), ("ViT-H-14", "1280, 32 layers")):
        text = describe(sds[name])
        assert text.startswith(f"open_clip {name} ") and f"(vision width {vision}, patch 14" in text
    blip_b = {"blip.visual_encoder.cls_token": torch.zeros(1, 1, 768)}
    blip_b |= {f"blip.visual_encoder.blocks.{i}.norm1.weight": torch.zeros(768) for i in range(12)}
    assert "ViT-B (BLIP base)" in describe(blip_b) and "12 blocks" in describe(blip_b)


# --- steer rewards verify ---------------------------------------------------------------------


def _verify_args(name: str, files: dict[str, Any]) -> list[str]:
    d = files["dir"]
    if name == "imagereward":
        kw = files["kwargs"]
        return ["--weights", str(d / "ImageReward.pt"), "--med-config", str(d / "med_config.json"),
                "--kw", f"blip={json.dumps(kw['blip'])}",
                "--kw", f"tokenizer={kw['tokenizer']}"]  # fmt: skip
    if name == "hpsv2":
        cfg = json.dumps(HPS_CONFIG)
        return ["--weights", str(d / "HPS_v2.1_compressed.pt"), "--kw", f"clip_model={cfg}"]
    if name == "aesthetic":
        kw = files["kwargs"]
        return ["--weights", str(d / "sac+logos+ava1-l14-linearMSE.pth"),
                "--kw", f"clip_model={json.dumps(kw['clip_model'])}",
                "--kw", f"pretrained={kw['pretrained']}",
                "--reference-clip", str(d / "clip")]  # fmt: skip
    return ["--weights", files["model"], "--kw", f"processor={files['kwargs']['processor']}"]


@pytest.mark.parametrize("name", ["imagereward", "hpsv2", "aesthetic", "pickscore"])
def test_verify_command_on_reference_files(
    name: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    fixture = {"imagereward": "imagereward_files", "hpsv2": "hps_files",
               "aesthetic": "aesthetic_files", "pickscore": "pickscore_files"}[name]  # fmt: skip
    files = request.getfixturevalue(fixture)
    assert rewards_cli(["verify", name, *_verify_args(name, files), "--tol", "1e-4"]) == 0
    out = capsys.readouterr().out
    assert "sunset" in out and "max |diff|" in out, out
    rel = float(out.split("relative ")[1].split()[0])
    assert rel < RTOL, out


def test_verify_command_errors_and_missing_reference(
    hps_files: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _verify_args("hpsv2", hps_files)
    with pytest.raises(SystemExit) as err:
        rewards_cli(["verify", "hpsv2", *args, "--kw", "version=v2"])
    assert err.value.code == 2
    assert "named like the HPS v2.1 checkpoint" in capsys.readouterr().err

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise reference.ReferenceUnavailable("hpsv2==1.2.0 is not installed")

    monkeypatch.setattr(V, "reference_scorer", unavailable)
    assert rewards_cli(["verify", "hpsv2", *args]) == 0  # steer's scores alone
    out = capsys.readouterr().out
    assert "no reference: hpsv2==1.2.0 is not installed" in out and "sunset" in out
