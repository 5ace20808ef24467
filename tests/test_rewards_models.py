"""The reward models one by one: architectures, weight loading from files, parity with independent
computations (torchvision, transformers' own processor, open_clip's tokenizer, a hand-written
BLIP ViT), and the errors for missing weights offline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import steer.rewards as R
from steer.rewards.aesthetic import RewardMLP
from steer.rewards.base import resize_center_crop
from steer.rewards.imagereward import blip_configs, map_checkpoint
from steer.rewards.tiny import bert_tokenizer, clip_tokenizer

PROMPTS = ["a photo of a cat", "a painting of a dog", "the cat"]


def images(b: int = 3, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- aesthetic -------------------------------------------------------------------------------


def test_aesthetic_mlp_parameter_count_and_shape() -> None:
    mlp = RewardMLP(768).eval()
    dims = [768, 1024, 128, 64, 16, 1]
    expected = sum(i * o + o for i, o in zip(dims[:-1], dims[1:], strict=True))
    assert expected == 927_969
    assert sum(p.numel() for p in mlp.parameters()) == expected
    x = torch.randn(5, 768)
    assert mlp(x).shape == (5, 1)
    torch.testing.assert_close(mlp(x), mlp(x))  # dropout off in eval
    keys = {k.rsplit(".", 1)[0] for k in mlp.state_dict()}
    assert keys == {"layers.0", "layers.2", "layers.4", "layers.6", "layers.7"}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_loads_mlp_weights_from_a_file(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    mlp = RewardMLP(32)
    path = tmp_path / f"mlp{suffix}"
    sd = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    r = R.get("aesthetic", clip_model="tiny-test", pretrained=None, weights=str(path))
    for k, v in sd.items():
        torch.testing.assert_close(r.mlp.state_dict()[k], v)
    # the score is the MLP on the unit-norm CLIP embedding
    x = images()
    emb = r.model.encode_image(r.clip.preprocess(x))
    expected = mlp.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(r(x), expected, rtol=1e-5, atol=1e-5)
    # a file of another shape names the mismatch
    torch.save(RewardMLP(16).state_dict(), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"layers\.0\.weight: file \(1024, 16\) vs model"):
        R.get("aesthetic", clip_model="tiny-test", pretrained=None, weights=tmp_path / "bad.pth")


# --- clip-score / hpsv2 ----------------------------------------------------------------------


def test_clip_score_torchmetrics_style_is_clamped_100_cos() -> None:
    torch.manual_seed(0)
    cos = R.get("clip-score", clip_model="tiny-test", pretrained=None)
    torch.manual_seed(0)
    tm = R.get("clip-score", clip_model="tiny-test", pretrained=None, torchmetrics_style=True)
    x = images(4)
    prompts = PROMPTS + ["a dog"]
    c = cos(x, prompts)
    assert (c.abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(tm(x, prompts), (100 * c).clamp(min=0), rtol=1e-5, atol=1e-4)
    # independent cosine from open_clip's unnormalised embeddings
    img = cos.model.encode_image(cos.clip.preprocess(x))
    txt = cos.model.encode_text(cos.clip.tokenizer(prompts))
    torch.testing.assert_close(c, F.cosine_similarity(img, txt), rtol=1e-5, atol=1e-5)


def test_hpsv2_loads_a_wrapped_checkpoint(tmp_path) -> None:
    torch.manual_seed(2)
    r1 = R.get("hpsv2", clip_model="tiny-test", weights=None)
    sd = {"module." + k: v for k, v in r1.model.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "hps.pt")
    torch.manual_seed(3)
    r2 = R.get("hpsv2", clip_model="tiny-test", weights=str(tmp_path / "hps.pt"))
    x = images()
    torch.testing.assert_close(r2(x, PROMPTS), r1(x, PROMPTS))
    with pytest.raises(ValueError, match="version must be one of"):
        R.get("hpsv2", version="v3", clip_model="tiny-test", weights=None)


# --- pickscore -------------------------------------------------------------------------------


def test_clip_tokenizer_is_the_real_clip_vocabulary() -> None:
    import open_clip

    full = clip_tokenizer(48_894)
    assert len(full) == 49_408
    ref = open_clip.SimpleTokenizer(context_length=32)
    for p in PROMPTS + ["Héllo   wörld 123, it's <odd>!"]:
        ids = full(p)["input_ids"]
        assert ids == ref([p])[0][: len(ids)].tolist()
    assert len(clip_tokenizer()) == 512 + 1000 + 2
    assert len(bert_tokenizer()) > 100


def test_pickscore_loads_folders_and_matches_transformers_processor(tmp_path) -> None:
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPProcessor

    r = R.get("pickscore", model="tiny-test")
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=r.tokenizer).save_pretrained(tmp_path)
    r.model.save_pretrained(tmp_path)
    loaded = R.get("pickscore", model=str(tmp_path), processor=str(tmp_path))
    x = (images(3, 32, 32) * 255).round() / 255  # exactly representable as uint8
    s = r(x, PROMPTS)
    torch.testing.assert_close(loaded(x, PROMPTS), s, rtol=1e-5, atol=1e-5)
    # independent path: transformers' processor on PIL images and CLIPModel.forward
    pils = [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()) for im in x]
    proc = CLIPProcessor.from_pretrained(tmp_path)
    inputs = proc(
        text=PROMPTS,
        images=pils,
        return_tensors="pt",
        padding="max_length",
        max_length=77,
        truncation=True,
    )
    with torch.no_grad():
        logits = loaded.model(**inputs).logits_per_image  # [B, B]
    torch.testing.assert_close(s, logits.diagonal(), rtol=1e-4, atol=1e-4)


# --- imagereward ------------------------------------------------------------------------------


def _original_blip_state_dict(vision, text, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint in ImageReward's own layout (BLIP ViT names, med.py BERT names)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    D, I, P = vision.hidden_size, vision.intermediate_size, vision.patch_size
    n_tok = (vision.image_size // P) ** 2 + 1
    sd = {
        "blip.visual_encoder.cls_token": t(1, 1, D),
        "blip.visual_encoder.pos_embed": t(1, n_tok, D),
        "blip.visual_encoder.patch_embed.proj.weight": t(D, 3, P, P),
        "blip.visual_encoder.patch_embed.proj.bias": t(D),
        "blip.visual_encoder.norm.weight": 1 + t(D),
        "blip.visual_encoder.norm.bias": t(D),
    }
    for i in range(vision.num_hidden_layers):
        b = f"blip.visual_encoder.blocks.{i}."
        for name, shape in [
            ("norm1", (D,)),
            ("norm2", (D,)),
            ("attn.qkv", (3 * D, D)),
            ("attn.proj", (D, D)),
            ("mlp.fc1", (I, D)),
            ("mlp.fc2", (D, I)),
        ]:
            sd[b + name + ".weight"] = 1 + t(*shape) if "norm" in name else t(*shape)
            sd[b + name + ".bias"] = t(shape[0])
    H, Ht, E = text.hidden_size, text.intermediate_size, text.encoder_hidden_size
    te = "blip.text_encoder."
    sd.update(
        {
            te + "embeddings.word_embeddings.weight": t(text.vocab_size, H),
            te + "embeddings.position_embeddings.weight": t(text.max_position_embeddings, H),
            te + "embeddings.LayerNorm.weight": 1 + t(H),
            te + "embeddings.LayerNorm.bias": t(H),
            te + "embeddings.position_ids": torch.arange(text.max_position_embeddings)[None],
        }
    )
    for i in range(text.num_hidden_layers):
        b = f"{te}encoder.layer.{i}."
        for att, kv in (("attention", H), ("crossattention", E)):
            for name, shape in [
                ("self.query", (H, H)),
                ("self.key", (H, kv)),
                ("self.value", (H, kv)),
                ("output.dense", (H, H)),
            ]:
                sd[f"{b}{att}.{name}.weight"], sd[f"{b}{att}.{name}.bias"] = t(*shape), t(H)
            sd[f"{b}{att}.output.LayerNorm.weight"] = 1 + t(H)
            sd[f"{b}{att}.output.LayerNorm.bias"] = t(H)
        sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = t(Ht, H), t(Ht)
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = t(H, Ht), t(H)
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = 1 + t(H), t(H)
    for j, (i, o) in zip(
        [0, 2, 4, 6, 7], [(H, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)], strict=True
    ):
        sd[f"mlp.layers.{j}.weight"], sd[f"mlp.layers.{j}.bias"] = t(o, i), t(o)
    sd["blip.vision_proj.weight"], sd["blip.text_proj.weight"] = t(8, D), t(8, H)  # unused heads
    return sd


def _reference_blip_vit(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, depth: int):
    """BLIP's ViT from its block: x + attn(norm1 x), then x + mlp(norm2 x); final norm."""

    def p(k: str) -> torch.Tensor:
        return sd["blip.visual_encoder." + k]

    h = F.conv2d(
        x, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=x.shape[-1] // 4
    )
    h = h.flatten(2).transpose(1, 2)  # [B, N, D]
    B, _, D = h.shape
    h = torch.cat([p("cls_token").expand(B, -1, -1), h], dim=1) + p("pos_embed")
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(h, (D,), p(b + "norm1.weight"), p(b + "norm1.bias"), eps=1e-6)
        q, k, v = F.linear(y, p(b + "attn.qkv.weight"), p(b + "attn.qkv.bias")).chunk(3, dim=-1)
        split = [t.reshape(B, -1, heads, D // heads).transpose(1, 2) for t in (q, k, v)]
        att = torch.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(D // heads), -1)
        a = (att @ split[2]).transpose(1, 2).reshape(B, -1, D)
        h = h + F.linear(a, p(b + "attn.proj.weight"), p(b + "attn.proj.bias"))
        y = F.layer_norm(h, (D,), p(b + "norm2.weight"), p(b + "norm2.bias"), eps=1e-6)
        y = F.gelu(F.linear(y, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias")))
        h = h + F.linear(y, p(b + "mlp.fc2.weight"), p(b + "mlp.fc2.bias"))
    return F.layer_norm(h, (D,), p("norm.weight"), p("norm.bias"), eps=1e-6)


def test_imagereward_checkpoint_mapping_and_architecture(tmp_path) -> None:
    vision, text = blip_configs("tiny-test", vocab_size=len(bert_tokenizer()))
    sd = _original_blip_state_dict(vision, text)
    mapped, dropped = map_checkpoint(sd)
    assert sorted(dropped) == [
        "blip.text_encoder.embeddings.position_ids",
        "blip.text_proj.weight",
        "blip.vision_proj.weight",
    ]
    torch.save(sd, tmp_path / "ImageReward.pt")
    r = R.get("imagereward", blip="tiny-test", weights=str(tmp_path / "ImageReward.pt"))
    assert set(mapped) == set(r.model.state_dict())  # every parameter comes from the file
    for k, v in mapped.items():
        torch.testing.assert_close(r.model.state_dict()[k], v)
    # the mapped vision tower computes BLIP's ViT
    pixels = torch.randn(2, 3, 32, 32)
    ours = r.model.vision_model(pixel_values=pixels).last_hidden_state
    ref = _reference_blip_vit(sd, pixels, vision.num_attention_heads, vision.num_hidden_layers)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # the score is the normalised MLP of the text [CLS] state, and depends on the image
    s = r(images(), PROMPTS)
    assert s.shape == (3,) and (s[0] - s[1]).abs() > 1e-6
    with pytest.raises(ValueError, match="unrecognised ImageReward checkpoint keys"):
        map_checkpoint({**sd, "blip.visual_encoder.head.weight": torch.zeros(1)})


def test_imagereward_large_architecture_matches_the_paper() -> None:
    vision, text = blip_configs("large")
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        1024,
        24,
        16,
    )
    assert (vision.image_size, vision.patch_size) == (224, 16)
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (768, 12, 30524)
    assert text.encoder_hidden_size == 1024


# --- classifier -------------------------------------------------------------------------------


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))


def test_classifier_scores_are_max_log_prob_over_the_set(tmp_path) -> None:
    net, x = _net(), images(4, 8, 8)
    logp = torch.log_softmax(net(x), dim=-1).detach()
    r = R.get("classifier", model=net, target=[4, 1])
    torch.testing.assert_close(r(x).detach(), torch.maximum(logp[:, 1], logp[:, 4]))
    p = R.get("classifier", model=net, target=2, log_prob=False)(x).detach()
    torch.testing.assert_close(p, logp[:, 2].exp())
    with pytest.raises(ValueError, match="outside the 5 classes"):
        R.get("classifier", model=net, target=7)(x)
    with pytest.raises(ValueError, match="target must be"):
        R.get("classifier", model=net, target=[])
    # from a state dict + architecture, and as a torch.export program
    torch.save(net.state_dict(), tmp_path / "clf.pth")
    r2 = R.get("classifier", model=tmp_path / "clf.pth", architecture=_net, target=[4, 1])
    torch.testing.assert_close(r2(x), r(x))
    with pytest.raises(ValueError, match="architecture="):
        R.get("classifier", model=tmp_path / "clf.pth")
    torch.export.save(torch.export.export(_net(), (x,)), tmp_path / "clf.pt2")
    r3 = R.get("classifier", model=str(tmp_path / "clf.pt2"), target=[4, 1])
    torch.testing.assert_close(r3(x), r(x))


# --- preprocessing and missing weights -------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(40, 48), (57, 31), (32, 32), (16, 20)])
def test_resize_center_crop_matches_torchvision(h: int, w: int) -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = images(2, h, w)
    ref = TF.center_crop(TF.resize(x, 32, InterpolationMode.BICUBIC, antialias=True), [32, 32])
    torch.testing.assert_close(resize_center_crop(x, 32), ref.clamp(0, 1))


@pytest.mark.parametrize(("h", "w"), [(40, 48), (57, 31), (32, 32), (16, 20), (97, 33)])
def test_resize_center_crop_with_pil_rounding_equals_pillow(h: int, w: int) -> None:
    """``pil_rounding``: Pillow's uint8 bicubic resize exactly (white noise, the worst case for
    rounding), with torchvision's and transformers' crop offsets; gradients stay finite."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = (images(2, h, w) * 255).round() / 255
    for floor in (False, True):
        ref = []
        for im in x:
            pil = Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy())
            pil = TF.resize(pil, 32, InterpolationMode.BICUBIC)
            if floor:  # transformers' center_crop: offsets rounded down
                top, left = (pil.height - 32) // 2, (pil.width - 32) // 2
                pil = pil.crop((left, top, left + 32, top + 32))
            ref.append(TF.to_tensor(pil if floor else TF.center_crop(pil, [32, 32])))
        ours = resize_center_crop(x, 32, floor_offsets=floor, pil_rounding=True)
        torch.testing.assert_close(ours, torch.stack(ref), rtol=0, atol=0)
    xg = x.clone().requires_grad_()
    resize_center_crop(xg, 32, pil_rounding=True).square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


MISSING = [
    ("aesthetic", {}, "download trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth"),
    ("clip-score", {}, "huggingface-cli download timm/vit_large_patch14_clip_224.openai"),
    ("pickscore", {}, "huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    ("pickscore", {"model": "tiny-test", "processor": "x/y"}, "model='tiny-test' uses its own"),
    ("hpsv2", {}, "huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt"),
    ("hpsv2", {"version": "v2"}, "huggingface-cli download xswu/HPSv2 HPS_v2_compressed.pt"),
    ("imagereward", {}, "huggingface-cli download google-bert/bert-base-uncased"),
    (
        "imagereward",
        {"blip": "tiny-test", "weights": "hf-hub:THUDM/ImageReward/ImageReward.pt"},
        "huggingface-cli download THUDM/ImageReward ImageReward.pt",
    ),
    (
        "aesthetic",
        {"clip_model": "tiny-test", "pretrained": None, "weights": "/no/mlp.pth"},
        "weights='/no/mlp.pth': no such file",
    ),
    ("clip-score", {"pretrained": "/no/clip.bin"}, "neither an open_clip tag"),
]


@pytest.mark.parametrize(("name", "kwargs", "match"), MISSING)
def test_missing_weights_offline_name_the_file_and_the_fix(
    name: str, kwargs: dict, match: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        R.get(name, cache_dir=str(tmp_path), **kwargs)
