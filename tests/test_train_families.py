"""The fine-tuner on every model family: tb, rtb, db and grpo on the tiny SD3 (flow-matching)
and SDXL pipelines, as on the tiny SD 1.x one (tests/test_train.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steer.train.config import load_config
from steer.train.loop import main, setup


def _sd3(tmp_path: Path, *overrides: str, model: str = "tiny-sd3"):
    base = [
        f"model.pretrained={model}", "model.num_inference_steps=2", "lora.rank=2", "lora.alpha=2",
        "reward.name=jpeg-compressibility", "prompts.builtin=simple-animals", "train.steps=1",
        "train.batch_size=2", "log.tracker=none", "log.num_eval_samples=2",
        f"log.output_dir={tmp_path}", "objective.beta=0.1", "objective.group_size=2",
    ]  # fmt: skip
    return load_config(None, base + list(overrides))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["tb", "rtb", "db", "grpo"])
def test_objectives_train_the_flow_matching_family(tmp_path: Path, objective: str) -> None:
    out = main(_sd3(tmp_path, f"objective.name={objective}"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["skipped_batches"] == 0
    assert (out / "lora").is_dir()  # diffusers' own LoRA format


def test_the_family_picks_its_sampler_and_refuses_another(tmp_path: Path) -> None:
    run = setup(_sd3(tmp_path, "objective.name=tb"))
    assert type(run.parts.policy.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(run.parts.policy).__name__ == "FlowMatchPolicy"
    grads = [n for n, p in run.parts.policy.unet.named_parameters() if p.requires_grad]
    assert grads and all("lora" in n for n in grads)  # LoRA only
    with pytest.raises(ValueError, match="does not sample the 'sd3' family.*FlowMatchEuler"):
        setup(_sd3(tmp_path, "objective.name=tb", "model.scheduler=DDIMScheduler"))
    with pytest.raises(ValueError, match="timestep_spacing='trailing' does not apply"):
        setup(_sd3(tmp_path, "objective.name=tb", "model.timestep_spacing=trailing"))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["tb", "rtb", "db", "grpo"])
def test_objectives_train_the_sdxl_family(tmp_path: Path, objective: str) -> None:
    """With guidance (w = 3) and the packed SDXL conditioning, one step of each objective."""
    cfg = _sd3(tmp_path, f"objective.name={objective}", "model.guidance_scale=3.0",
               model="tiny-sdxl")  # fmt: skip
    out = main(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["skipped_batches"] == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()  # diffusers' format


def test_the_sdxl_family_gets_its_policy_and_diffusers_negative(tmp_path: Path) -> None:
    import torch

    run = setup(_sd3(tmp_path, "objective.name=tb", "model.guidance_scale=3.0",
                     model="tiny-sdxl"))  # fmt: skip
    policy = run.parts.policy
    assert type(policy).__name__ == "SDXLPolicy" and type(run.parts.prior).__name__ == "SDXLPolicy"
    assert type(policy.scheduler).__name__ == "DDIMScheduler"
    grads = [n for n, p in policy.unet.named_parameters() if p.requires_grad]
    assert grads and all("lora" in n for n in grads)  # LoRA only
    cond, negative = run.parts.cond, policy.negative_embeds
    assert cond.embeds.shape[1:] == negative.shape[1:] == (16, 32 + 16 + 6)  # [L, D + P + 6]
    assert cond.pooled.shape[1] == 16
    # the unconditional branch is diffusers' (force_zeros_for_empty_prompt): zeros, same time ids
    assert (negative[..., :-6] == 0).all()
    torch.testing.assert_close(negative[0, :, -6:], cond.embeds[0, :, -6:])
