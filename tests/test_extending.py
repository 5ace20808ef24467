"""Extending steer in one place: a new objective class, the scheduler and model-family
registries, pipelines chosen from model_index.json, callbacks of the loop (docs/architecture.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from steer import testing
from steer.diffusion import (
    DiffusionPolicy,
    denoiser_of,
    family_of,
    make_policy,
    scheduler_from_config,
)
from steer.train import objectives as train_objectives
from steer.train.config import load_config
from steer.train.loop import Callback, main


def _tiny(tmp_path: Path, *overrides: str):
    base = [
        "model.pretrained=tiny-unconditional", "model.num_inference_steps=2", "lora.enabled=false",
        "reward.name=jpeg-compressibility", "train.steps=1", "train.batch_size=2",
        "log.tracker=none", "log.num_eval_samples=2", f"log.output_dir={tmp_path}",
        "objective.beta=0.1",
    ]  # fmt: skip
    return load_config(None, base + list(overrides))


@pytest.fixture
def halved_tb():
    """A new GFlowNet objective, registered the way a contributor would: one class."""

    @train_objectives.register
    class HalvedTB(train_objectives.TrajectoryBalance):
        """TB with half the squared residual (a test objective)."""

        name = "test-halved-tb"

        def _loss(self, batch, log_pf, log_pb):
            loss, delta = super()._loss(batch, log_pf, log_pb)
            return loss / 2, delta

    yield HalvedTB
    train_objectives.OBJECTIVES.pop(HalvedTB.name)


def test_a_new_objective_is_one_class(tmp_path: Path, halved_tb) -> None:
    """Registered, it is a valid ``objective.name``, gets a log Z (it declares one) and trains."""
    cfg = _tiny(tmp_path, "objective.name=test-halved-tb", "objective.log_z_mode=table")
    assert cfg.objective.needs.log_z
    out = main(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and "log_z" in summary["last"]
    assert (out / "log_z.safetensors").is_file()
    with pytest.raises(ValueError, match="already registered"):
        train_objectives.register(halved_tb)


def test_unknown_objective_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="choose one of tb, rtb, vargrad, db, subtb, ddpo, dpok"):
        load_config(None, ["objective.name=grpo-typo"])


def test_objectives_declare_what_they_need() -> None:
    needs = {n: c.needs for n, c in train_objectives.OBJECTIVES.items()}
    assert needs["rtb"].prior_log_probs and needs["rtb"].log_z and not needs["rtb"].flow
    assert needs["db"].flow and needs["db"].reward_pred and not needs["db"].log_z
    assert needs["dpok"].step_means and needs["dpok"].on_policy and needs["dpok"].advantages
    assert needs["ddpo"].on_policy and not needs["ddpo"].step_means
    assert not any(needs[n].on_policy for n in ("tb", "vargrad", "rtb", "db", "subtb"))
    with pytest.raises(ValueError, match="takes no flow module"):
        train_objectives.make_objective(load_config(None, []).objective, flow=torch.nn.Linear(1, 1))


def test_model_families_from_the_denoiser() -> None:
    ddpm, sd = testing.tiny_ddpm_pipeline(), testing.tiny_sd_pipeline(seed=0)
    assert family_of(ddpm.unet).name == "unet" and not family_of(ddpm.unet).conditional
    assert family_of(sd.unet).name == "unet-text" and family_of(sd.unet).conditional
    assert denoiser_of(sd) is sd.unet
    policy = make_policy(sd.unet, sd.scheduler, num_inference_steps=2)
    assert isinstance(policy, DiffusionPolicy) and policy.conditional
    with pytest.raises(TypeError, match="UNet2DModel or UNet2DConditionModel, got Linear"):
        family_of(torch.nn.Linear(2, 2))


def test_schedulers_from_the_registry() -> None:
    config = testing.tiny_ddpm_pipeline().scheduler.config
    assert isinstance(scheduler_from_config({**config, "_class_name": "DDPMScheduler"}),
                      DDPMScheduler)  # fmt: skip
    ddim = scheduler_from_config(config, "DDIMScheduler", timestep_spacing="trailing")
    assert isinstance(ddim, DDIMScheduler) and ddim.config.timestep_spacing == "trailing"
    with pytest.raises(ValueError, match="choose one of DDIMScheduler, DDPMScheduler"):
        scheduler_from_config(config, "PNDMScheduler")
    with pytest.raises(ValueError, match="model.scheduler='PNDMScheduler' is not valid"):
        load_config(None, ["model.scheduler=PNDMScheduler"])


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DDPMScheduler"])
def test_a_ddpm_scheduled_model_fine_tunes_with_either_sampler(tmp_path, scheduler) -> None:
    """The tiny unconditional model is DDPM-scheduled; ``model.scheduler`` picks the sampler."""
    from steer.train.loop import setup

    run = setup(_tiny(tmp_path, "objective.name=tb", f"model.scheduler={scheduler}"))
    assert type(run.parts.policy.scheduler).__name__ == scheduler
    assert main(_tiny(tmp_path, "objective.name=tb", f"model.scheduler={scheduler}")).is_dir()


def test_pipelines_are_chosen_from_model_index(tmp_path: Path) -> None:
    from steer.pipelines import SteerDDPMPipeline, SteerStableDiffusionPipeline, load_pipeline

    testing.tiny_ddpm_pipeline().save_pretrained(tmp_path / "ddpm")
    testing.tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "sd")
    assert type(load_pipeline(tmp_path / "ddpm")) is SteerDDPMPipeline
    assert type(load_pipeline(tmp_path / "sd")) is SteerStableDiffusionPipeline
    index = tmp_path / "ddpm" / "model_index.json"
    index.write_text(index.read_text().replace("SteerDDPMPipeline", "KandinskyPipeline"))
    with pytest.raises(ValueError, match="KandinskyPipeline.*not supported.*DDPMPipeline"):
        load_pipeline(tmp_path / "ddpm")


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step, self.seen, self.ended = step, [], []

    def on_step(self, run, record) -> bool:
        self.seen.append(record["step"])
        return record["step"] >= self.step

    def on_end(self, run, wall_time: float) -> str:
        self.ended.append(wall_time)
        return "custom summary"


def test_callbacks_see_every_step_and_can_stop(tmp_path: Path, capsys) -> None:
    stop = StopAt(2)
    out = main(_tiny(tmp_path, "objective.name=tb", "train.steps=5"), callbacks=[stop])
    assert stop.seen == [1, 2] and stop.ended == []  # stopped like a signal: no final report
    assert (out / "checkpoint-2").is_dir()
    done = StopAt(99)
    main(_tiny(tmp_path / "b", "objective.name=tb", "train.steps=2"), callbacks=[done])
    assert done.seen == [1, 2] and len(done.ended) == 1
    assert "custom summary" in capsys.readouterr().out


def test_a_report_hook_that_cannot_be_imported_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="log.report must look like module:function"):
        _tiny(tmp_path, "log.report=nonsense")
    with pytest.raises(ValueError, match="cannot be imported"):
        main(_tiny(tmp_path, "log.report=steer.no_such_module:report"))
