"""Pipelines: parity with diffusers, save/load round trips, LoRA interchange, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, PNDMScheduler, StableDiffusionPipeline

from steer.diffusion import lora_parameters
from steer.pipelines import SteerDDPMPipeline, SteerStableDiffusionPipeline
from steer.testing import tiny_clip_tokenizer, tiny_ddpm_pipeline, tiny_sd_components

PROMPTS = ["a photo of a cat", "a red dog"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def components() -> dict:
    return tiny_sd_components()


def _diffusers_sd(components: dict) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _lora_nonzero(unet: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.normal_(0, 0.2, generator=_gen(7))


def test_tokenizer_from_local_vocabulary(tmp_path) -> None:
    tok = tiny_clip_tokenizer(tmp_path)
    assert len(tok) == 70 and (tmp_path / "vocab.json").is_file()
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 7
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sd_images_equal_diffusers(components, eta) -> None:
    ours = SteerStableDiffusionPipeline(**components)
    ref = _diffusers_sd(components)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, eta=eta, output_type="np")
    mine = ours(PROMPTS, generator=_gen(1), return_trajectory=True, progress=False, **kw)
    theirs = ref(PROMPTS, generator=_gen(1), **kw).images
    assert np.abs(mine.images - theirs).max() <= 1e-5
    traj = mine.trajectory
    assert traj.log_pf.shape == (2, 4) and bool(traj.deterministic.all()) == (eta == 0.0)
    decoded = ours.decode_pred_x0(traj, steps=[3])
    assert decoded.shape == (2, 1, 3, 16, 16) and 0 <= decoded.min() and decoded.max() <= 1


def test_sd_save_and_load_round_trip(components, tmp_path) -> None:
    pipe = SteerStableDiffusionPipeline(**components)
    pipe.save_pretrained(tmp_path / "sd")
    again = SteerStableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    kw = dict(num_inference_steps=3, output_type="np", progress=False)
    a = pipe("a cat", generator=_gen(2), **kw).images
    b = again("a cat", generator=_gen(2), **kw).images
    assert np.abs(a - b).max() <= 1e-6


def test_sd_folder_with_pndm_scheduler_becomes_ddim(components, tmp_path) -> None:
    parts = dict(components, scheduler=PNDMScheduler.from_config(components["scheduler"].config))
    _diffusers_sd(parts).save_pretrained(tmp_path / "pndm")
    pipe = SteerStableDiffusionPipeline.from_pretrained(tmp_path / "pndm")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.steps_offset == components["scheduler"].config.steps_offset


def test_lora_saved_by_steer_loads_in_plain_diffusers(tmp_path) -> None:
    pipe = SteerStableDiffusionPipeline(**tiny_sd_components())
    pipe.add_lora(rank=4, alpha=8)
    _lora_nonzero(pipe.unet)
    pipe.save_lora_weights(tmp_path / "lora")
    ref = _diffusers_sd(tiny_sd_components())
    kw = dict(num_inference_steps=3, eta=0.0, output_type="np")
    before = ref("a cat", generator=_gen(3), **kw).images
    ref.load_lora_weights(tmp_path / "lora")
    after = ref("a cat", generator=_gen(3), **kw).images
    mine = pipe("a cat", generator=_gen(3), progress=False, **kw).images
    assert np.abs(mine - after).max() <= 1e-5 and np.abs(before - after).max() > 1e-4


def test_ddpm_loads_plain_diffusers_folder_and_matches(tmp_path) -> None:
    parts = tiny_ddpm_pipeline().components
    DDPMPipeline(**parts).save_pretrained(tmp_path / "digits")
    assert json.loads((tmp_path / "digits" / "model_index.json").read_text())["_class_name"]
    pipe = SteerDDPMPipeline.from_pretrained(tmp_path / "digits")
    ref = DDPMPipeline(**parts)
    theirs = ref(batch_size=2, generator=_gen(4), num_inference_steps=5, output_type="np").images
    out = pipe(
        batch_size=2,
        generator=_gen(4),
        num_inference_steps=5,
        output_type="np",
        return_trajectory=True,
        progress=False,
    )
    assert np.abs(out.images - theirs).max() <= 1e-5
    assert out.trajectory.deterministic.tolist() == [False] * 4 + [True]


def test_ddpm_lora_round_trip(tmp_path) -> None:
    pipe = tiny_ddpm_pipeline()
    pipe.add_lora(rank=2)
    _lora_nonzero(pipe.unet)
    pipe.save_lora_weights(tmp_path / "lora")
    other = tiny_ddpm_pipeline()
    other.load_lora_weights(tmp_path / "lora")
    kw = dict(batch_size=1, num_inference_steps=3, output_type="pt", progress=False)
    torch.testing.assert_close(
        pipe(generator=_gen(5), **kw).images, other(generator=_gen(5), **kw).images
    )


def test_missing_unet_is_named(tmp_path) -> None:
    DDPMPipeline(**tiny_ddpm_pipeline().components).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors is missing"):
        SteerDDPMPipeline.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        SteerDDPMPipeline.from_pretrained(tmp_path)


def test_bad_pipeline_input(components) -> None:
    pipe = SteerStableDiffusionPipeline(**components)
    kw = dict(num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="prompt list has 2 entries but latents has batch 3"):
        pipe(PROMPTS, latents=torch.zeros(3, 4, 8, 8), **kw)
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, 8, 8\)"):
        pipe(PROMPTS, latents=torch.zeros(2, 4, 9, 8), **kw)
    with pytest.raises(ValueError, match="floating-point dtype"):
        pipe(PROMPTS, latents=torch.zeros(2, 4, 8, 8, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="eta must be a finite float >= 0, got -1"):
        pipe("a cat", eta=-1.0, **kw)
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, 1000\]"):
        pipe("a cat", num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe("a cat", output_type="jpeg", **kw)
    with pytest.raises(TypeError, match="scheduler must be one of"):
        SteerStableDiffusionPipeline(**dict(components, scheduler=PNDMScheduler()))
