"""The fine-tuner on every model family: tb, rtb, db and grpo on the tiny SD3 (flow-matching)
pipeline, as on the tiny SD 1.x one (tests/test_train.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steer.train.config import load_config
from steer.train.loop import main, setup


def _sd3(tmp_path: Path, *overrides: str):
    base = [
        "model.pretrained=tiny-sd3", "model.num_inference_steps=2", "lora.rank=2", "lora.alpha=2",
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
