"""The digits prior: a short training run gives a loadable diffusers folder; cache reuse/repair."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel

import steer.digits.prior as td
from steer.digits.cache import CorruptCacheWarning
from steer.digits.pretrain import (
    DDPMTrainConfig,
    ddpm_loss,
    make_scheduler,
    make_unet,
    sample_ddim,
)

TINY = td.DigitsPriorConfig(
    block_out_channels=(8, 16),
    num_train_timesteps=100,
    train=DDPMTrainConfig(steps=3, batch_size=8, warmup_steps=1),
    grid_steps=2,
)


@pytest.fixture(scope="module")
def prior(cache: Path) -> Path:
    return td.load_or_train_digits_prior(cache, TINY, progress=False)


def test_short_training_writes_a_loadable_pipeline_folder(prior: Path) -> None:
    for name in ("model_index.json", "unet", "scheduler", td.GRID_FILE, td.INFO_FILE):
        assert (prior / name).exists(), name
    index = json.loads((prior / "model_index.json").read_text())
    assert index["_class_name"] == "SteerDDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    info = json.loads((prior / td.INFO_FILE).read_text())
    assert info["config"]["train"]["steps"] == 3 and info["n_images"] == 1797
    unet = UNet2DModel.from_pretrained(prior / "unet")
    scheduler = DDPMScheduler.from_pretrained(prior / "scheduler")
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1
    assert scheduler.config.num_train_timesteps == 100
    pipe = DDPMPipeline.from_pretrained(prior)  # diffusers' own pipeline reads the folder
    out = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert out.shape == (2, 16, 16, 1)


def test_sample_ddim_matches_diffusers_ddim_pipeline(prior: Path) -> None:
    unet = UNet2DModel.from_pretrained(prior / "unet")
    scheduler = DDPMScheduler.from_pretrained(prior / "scheduler")
    with torch.no_grad():
        ours = sample_ddim(unet, scheduler, 3, 4, eta=0.0, generator=torch.manual_seed(1))
    assert ours.shape == (3, 1, 16, 16) and ours.abs().max() <= 1
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    ref = pipe(3, generator=torch.manual_seed(1), eta=0.0, num_inference_steps=4, output_type="np")
    ref = torch.from_numpy(ref.images).permute(0, 3, 1, 2)  # [3, 1, 16, 16]
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), ref, atol=1e-5, rtol=1e-5)


def test_second_call_reuses_cache(
    cache: Path, prior: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = next((prior / "unet").glob("*.safetensors"))
    mtime = os.stat(weights).st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained although the cache was valid")

    monkeypatch.setattr(td, "train_digits_prior", no_training)
    assert td.load_or_train_digits_prior(cache, TINY) == prior
    assert os.stat(weights).st_mtime_ns == mtime
    assert td.prior_folder(cache, td.DigitsPriorConfig()) == cache / "digits_prior"
    assert prior.parent == cache and prior.name.startswith("digits_prior-")


def test_corrupted_cache_is_retrained(tmp_path: Path) -> None:
    config = td.DigitsPriorConfig(
        block_out_channels=(8,),
        num_train_timesteps=10,
        train=DDPMTrainConfig(steps=1, batch_size=2),
        grid_steps=1,
    )
    folder = td.load_or_train_digits_prior(tmp_path, config, progress=False)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(b"garbage")
    with pytest.warns(CorruptCacheWarning, match="corrupted"):
        again = td.load_or_train_digits_prior(tmp_path, config, progress=False)
    assert again == folder
    UNet2DModel.from_pretrained(folder / "unet")  # readable again
    assert not list(tmp_path.glob(".*.tmp"))  # no leftover training folder


def test_ddpm_loss_equals_hand_computed_epsilon_regression() -> None:
    torch.manual_seed(0)
    unet = make_unet(16, 1, (8, 16))
    scheduler = make_scheduler(50, "linear")
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    loss = ddpm_loss(unet, scheduler, x0, torch.Generator().manual_seed(3))
    # the same draws, in the same order, then the forward process written out by hand
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 50, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50, dtype=torch.float64), 0)[t]
    abar = abar.float().view(4, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    ref = (unet(x_t, t).sample - eps).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-4)


def test_bad_settings_raise_with_the_value() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1; got 0"):
        DDPMTrainConfig(steps=0)
    with pytest.raises(ValueError, match="'cosine'"):
        td.DigitsPriorConfig(beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"\(12, 16\)"):
        make_unet(16, 1, (12, 16))
    with pytest.raises(ValueError, match="--steps must be >= 1; got 0"):
        td.main(["--steps", "0"])
