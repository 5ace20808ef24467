"""The reward registry and contract: every built-in reward in its offline test form, JPEG against
PIL, gradients, batching, dtype, bad input and missing weights."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import steer.rewards as R
from steer.rewards import NonFiniteRewardError, Reward

PROMPTS = ["a photo of a cat", "a painting of a dog", "the cat", "a dog with a cat", "a", "on"]
# digits-classifier is built and tested by its own helper (tests/test_digits*.py)
# the shipped rewards (other test modules register "test-*" rewards in the same registry)
BUILTIN = [n for n in R.names() if n != "digits-classifier" and not n.startswith("test-")]
_CACHE: dict[str, Reward] = {}


def build(name: str) -> Reward:
    """The test form of ``name``, built once per session."""
    if name not in _CACHE:
        _CACHE[name] = R.get(name, **R.test_kwargs(name))
    return _CACHE[name]


def images(b: int = 4, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


@pytest.mark.slow
def test_import_is_light() -> None:
    code = (
        "import sys, steer.rewards as R; R.names(); "
        "print(any(m.split('.')[0] in ('open_clip', 'transformers') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registry_lists_every_reward() -> None:
    expected = {
        "jpeg-compressibility",
        "jpeg-incompressibility",
        "aesthetic",
        "clip-score",
        "pickscore",
        "hpsv2",
        "imagereward",
        "classifier",
        "digits-classifier",
    }
    assert expected <= set(R.names())
    assert R.names() == sorted(R.names())
    assert R.spec("digits-classifier").factory == "steer.digits.classifier:digits_classifier"


@pytest.mark.parametrize("name", BUILTIN)
def test_every_reward_builds_offline_and_returns_finite_scores(name: str) -> None:
    r = build(name)
    x = images(3)
    s = r(x, PROMPTS[:3])
    assert s.shape == (3,) and s.dtype == x.dtype and torch.isfinite(s).all()
    spec = R.spec(name)
    assert r.name == name and r.differentiable == spec.differentiable
    assert isinstance(r.source, str) and r.source and r.batch_size >= 1
    assert r.input_size is None or len(r.input_size) == 2
    assert r.needs_prompts == spec.needs_prompts


@pytest.mark.parametrize("name", [n for n in BUILTIN if R.spec(n).differentiable])
def test_gradient_reaches_pixels(name: str) -> None:
    r = build(name)
    x = images(2).requires_grad_(True)
    r(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    # parameters of built-in models are frozen: only the pixels get gradients
    if name != "classifier":
        assert all(not p.requires_grad for p in r.parameters())


@pytest.mark.parametrize("name", BUILTIN)
def test_batching_equals_one_call(name: str) -> None:
    r = build(name)
    x = images(5, seed=1)
    old = r.batch_size
    try:
        r.batch_size = 64
        whole = r(x, PROMPTS[:5])
        r.batch_size = 2
        chunked = r(x, PROMPTS[:5])
    finally:
        r.batch_size = old
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_scores_follow_the_callers_dtype() -> None:
    r = build("clip-score")
    x = images(2).double()
    s32 = r(x, PROMPTS[:2])
    assert s32.dtype == torch.float64  # computed in the model's float32, returned as float64
    r.double()
    try:
        s64 = r(x, PROMPTS[:2])
    finally:
        r.float()
    assert s64.dtype == torch.float64
    torch.testing.assert_close(s64, s32, rtol=1e-4, atol=1e-5)
    r.to(torch.bfloat16)
    try:
        s16 = r(x.to(torch.bfloat16), PROMPTS[:2])
    finally:
        r.float()
    assert s16.dtype == torch.bfloat16
    torch.testing.assert_close(s16.double(), s32, rtol=0.05, atol=0.02)


def _pil_jpeg_kb(img: torch.Tensor, quality: int = 95) -> float:
    """Independent computation: numpy rounding to uint8, PIL encode, bytes / 1000."""
    arr = np.clip(np.rint(img.numpy().transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


def test_jpeg_rewards_match_pil() -> None:
    x = images(4, 32, 24)
    x[1] = 0.5  # a flat image compresses much better
    expected = torch.tensor([_pil_jpeg_kb(im) for im in x])
    inc = R.get("jpeg-incompressibility")(x)
    comp = R.get("jpeg-compressibility")(x)
    torch.testing.assert_close(inc, expected)
    torch.testing.assert_close(comp, -expected)
    assert inc[1] < inc[0]
    q50 = R.get("jpeg-incompressibility", quality=50)(x)
    torch.testing.assert_close(q50, torch.tensor([_pil_jpeg_kb(im, 50) for im in x]))


def test_jpeg_thread_pool_equals_loop() -> None:
    x = images(6, 24, 24, seed=3)
    loop = R.get("jpeg-incompressibility", num_workers=0)(x)
    pool = R.get("jpeg-incompressibility", num_workers=3, batch_size=4)(x)
    torch.testing.assert_close(pool, loop)


def test_unknown_name_raises_with_the_valid_list() -> None:
    with pytest.raises(KeyError, match="aesthetic.*clip-score.*jpeg-compressibility"):
        R.get("aesthetics")


def test_unknown_keyword_raises_with_the_valid_list() -> None:
    with pytest.raises(TypeError, match=r"\['qualty'\].*valid keywords: quality, batch_size"):
        R.get("jpeg-compressibility", qualty=90)
    with pytest.raises(TypeError, match="clip_model, pretrained, weights"):
        R.get("aesthetic", clip="tiny-test")


def _x(*shape: int) -> torch.Tensor:
    return torch.rand(*shape)


BAD_IMAGES = [
    (_x(3, 8, 8), ValueError, r"rank 4.*got rank 3 with shape \(3, 8, 8\)"),
    (_x(2, 1, 8, 8), ValueError, r"3 channels.*\(2, 1, 8, 8\)"),
    (_x(2, 4, 8, 8), ValueError, r"3 channels.*\(2, 4, 8, 8\)"),
    (_x(0, 3, 8, 8), ValueError, r"non-empty batch.*\(0, 3, 8, 8\)"),
    (_x(2, 3, 8, 8) * 2 - 1, ValueError, r"\[0, 1\], got values in \[-"),
    (_x(2, 3, 8, 8) + 1.5, ValueError, r"got values in \[1\.5"),
    ((_x(2, 3, 8, 8) * 255).to(torch.uint8), TypeError, "floating-point.*uint8"),
    (np.zeros((2, 3, 8, 8), np.float32), TypeError, "torch.Tensor.*ndarray"),
]


@pytest.mark.parametrize("name", ["jpeg-compressibility", "clip-score", "aesthetic"])
@pytest.mark.parametrize(("bad", "err", "match"), BAD_IMAGES)
def test_bad_images_raise(name: str, bad: object, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        build(name)(bad, ["p", "p"])


def test_nan_pixels_raise() -> None:
    x = images(2)
    x[1, 0, 3, 3] = float("nan")
    for name in ("jpeg-compressibility", "pickscore"):
        with pytest.raises(ValueError, match=r"1 NaN pixel.*\(2, 3, 40, 48\)"):
            build(name)(x, ["p", "p"])


@pytest.mark.parametrize("name", ["clip-score", "pickscore", "hpsv2", "imagereward"])
def test_prompts_are_checked(name: str) -> None:
    r, x = build(name), images(3)
    with pytest.raises(ValueError, match="got 2 prompts for a batch of 3"):
        r(x, ["a", "b"])
    with pytest.raises(ValueError, match="needs one prompt per image"):
        r(x)
    with pytest.raises(TypeError, match=r"\[prompt\] \* 3"):
        r(x, "a cat")
    with pytest.raises(TypeError, match="prompt 1 is int"):
        r(x, ["a", 3, "c"])


def test_prompt_free_rewards_still_check_the_length() -> None:
    with pytest.raises(ValueError, match="got 1 prompts for a batch of 2"):
        build("jpeg-compressibility")(images(2), ["a"])


class _NaNAt(Reward):
    differentiable = True

    def __init__(self, index: int, batch_size: int = 2) -> None:
        super().__init__(batch_size=batch_size)
        self.index = index

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        s = images.mean(dim=(1, 2, 3))
        self._seen = getattr(self, "_seen", 0)
        idx = torch.arange(self._seen, self._seen + len(s))
        self._seen += len(s)
        return torch.where(idx == self.index, torch.full_like(s, float("inf")), s)


def test_register_a_users_reward_and_non_finite_scores_raise() -> None:
    R.register("test-nan-at", _NaNAt, differentiable=True, source="test", replace=True)
    with pytest.raises(ValueError, match="already registered"):
        R.register("test-nan-at", _NaNAt, differentiable=True)
    with pytest.raises(TypeError, match="valid keywords: index, batch_size"):
        R.get("test-nan-at", idx=3)
    r = R.get("test-nan-at", index=3)
    assert r.name == "test-nan-at" and r.source == "test"
    with pytest.raises(NonFiniteRewardError, match="'test-nan-at'.*inf.*batch index 3"):
        r(images(5))


def test_classifier_nan_logits_raise_naming_reward_and_index() -> None:
    class Net(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = x.mean(dim=(2, 3))  # [B, 3]
            return torch.where(x[:, :1, 0, 0] > 0.5, logits, logits * float("nan"))

    x = images(4)
    x[:, 0, 0, 0] = torch.tensor([0.9, 0.9, 0.1, 0.9])
    with pytest.raises(NonFiniteRewardError, match="'classifier'.*batch index 2"):
        R.get("classifier", model=Net(), target=1)(x)


def test_cli_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    from steer.cli import main

    assert main(["rewards"]) == 0
    out = capsys.readouterr().out
    for name in R.names():
        assert f"| {name} |" in out
    assert "| imagereward | yes | 224x224 | yes |" in out
    assert "| jpeg-compressibility | no | any | no |" in out
