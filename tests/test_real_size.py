"""Real size: the published architectures built offline with random weights, the memory estimate
that refuses a run before loading, and the prepared GPU benchmark at a reduced size."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steer.pipelines.architectures import (
    ARCHITECTURES,
    architecture,
    folder_parameter_counts,
    parameter_counts,
    random_pipeline,
)
from steer.train.config import load_config
from steer.train.memory import (
    ADAMW,
    FLOAT32,
    REWARD_PARAMETERS,
    InsufficientMemory,
    check_fits,
    estimate,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architectures_have_the_published_parameter_counts(name: str) -> None:
    """Counted on the meta device; the published figures are those of the real checkpoints."""
    arch = ARCHITECTURES[name]
    counts = parameter_counts(name)
    assert set(counts) == set(arch.components)
    for comp, published in arch.published_parameters.items():
        assert counts[comp] == published, comp
    denoiser = counts[arch.denoiser]
    assert {"sd15": 0.86e9, "sdxl": 2.57e9, "sd3-medium": 2.03e9, "sd3.5-medium": 2.24e9}[
        name
    ] == pytest.approx(denoiser, rel=0.01)


def test_hub_ids_name_their_architecture_and_unknown_ids_list_the_known() -> None:
    assert architecture("stable-diffusion-v1-5/stable-diffusion-v1-5").name == "sd15"
    assert architecture("stabilityai/stable-diffusion-xl-base-1.0").name == "sdxl"
    with pytest.raises(ValueError, match="no published architecture.*sd15.*sdxl"):
        architecture("someone/else")


def _reduced(name: str) -> dataclasses.replace:
    """The architecture ``name`` with every width and depth cut down (same classes, same
    component names, same tokenizer rules): the machinery of random_pipeline, quickly."""
    from steer.testing import tiny_sd3_components, tiny_sdxl_components

    arch = ARCHITECTURES[name]
    tiny = {"sdxl": tiny_sdxl_components, "sd3-medium": tiny_sd3_components}[name]()
    comps = {}
    for comp, (target, _) in arch.components.items():
        module = tiny.get(comp)
        if module is None:  # T5: a small config of the same class
            cfg = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4)
        else:
            cfg = (
                dict(module.config)
                if not hasattr(module.config, "to_dict")
                else (module.config.to_dict())
            )
            cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        comps[comp] = (target, cfg)
    return dataclasses.replace(
        arch, components=comps, tokenizers={k: 16 if v else v for k, v in arch.tokenizers.items()}
    )


@pytest.mark.parametrize("name", ["sdxl", "sd3-medium"])
def test_random_pipeline_builds_the_family_pipeline_and_samples(name: str) -> None:
    arch = _reduced(name)
    pipe = random_pipeline(arch, seed=3)
    again = random_pipeline(arch, seed=3)
    denoiser = getattr(pipe, arch.denoiser)
    assert type(pipe).__name__ == arch.pipeline.split(":")[1]
    for (n, p), (_, q) in zip(
        denoiser.named_parameters(), getattr(again, arch.denoiser).named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n  # seeded: the same weights on every process
    if name.startswith("sd3"):
        assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None  # T5: never built
    assert pipe.tokenizer.model_max_length == 16
    out = pipe(["a cat"], num_inference_steps=2, output_type="pt")
    assert torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="no component"):
        random_pipeline(arch, skip=["nope"])


def test_folder_counts_equal_the_loaded_pipeline(tmp_path: Path) -> None:
    from steer.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path)
    counts = folder_parameter_counts(tmp_path)
    assert counts == {
        c: sum(p.numel() for p in getattr(pipe, c).parameters())
        for c in ("unet", "vae", "text_encoder")
    }
    assert "unet" not in folder_parameter_counts(tmp_path, skip=["unet"])


def _cfg(tmp_path: Path, *extra: str, preset: str = "sd15_aesthetic_db"):
    return load_config(
        str(REPO / "configs" / f"{preset}.yaml"),
        [f"log.output_dir={tmp_path}", "log.tracker=none", *extra],
    )


def test_the_estimate_adds_its_parts_from_the_counts(tmp_path: Path) -> None:
    """Independent sum: float32 weights of every component, the reward, LoRA with AdamW."""
    cfg = _cfg(
        tmp_path,
        "model.random_weights=true",
        "model.gradient_checkpointing=false",
        "train.mixed_precision=no",
    )
    counts = parameter_counts("sd15")
    need = estimate(cfg, counts)
    assert need.weights == (859_520_964 + 83_653_863 + 123_060_480) * 4
    assert need.reward == REWARD_PARAMETERS["aesthetic"] * FLOAT32
    assert 0 < need.trained < 0.01 * need.weights  # LoRA
    full = estimate(
        dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=False)), counts
    )
    assert full.weights - need.weights == 859_520_964 * FLOAT32  # the frozen prior's copy
    assert full.trained == 859_520_964 * ADAMW
    ckpt = estimate(
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=True)),
        counts,
    )
    assert ckpt.activations < need.activations
    # the preset: batch 8 with guidance at 64x64; half the batch halves the activations
    half = estimate(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=4)), counts
    )
    assert half.activations == pytest.approx(need.activations / 2, rel=1e-6)


def test_a_run_that_does_not_fit_is_refused_before_loading(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        "model.random_weights=true",
        "train.mixed_precision=no",
        "model.gradient_checkpointing=false",
        "model.memory_limit_gb=4",
    )
    with pytest.raises(InsufficientMemory) as err:
        check_fits(cfg, torch.device("cpu"))
    text = str(err.value)
    assert "needs about" in text and "4.0 GiB free (model.memory_limit_gb=4.0)" in text
    for option in (
        "model.gradient_checkpointing=true",
        "train.batch_size=4",
        "model.sample_size=32",
        "model.check_memory=false",
    ):
        assert option in text, option
    off = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, check_memory=False))
    assert check_fits(off, torch.device("cpu")) is None
    # SD3 with T5: the option to leave it out, with its size
    sd3 = load_config(
        None,
        [
            "model.pretrained=stabilityai/stable-diffusion-3-medium-diffusers",
            "model.memory_limit_gb=10",
            "reward.name=imagereward",
            "prompts.builtin=simple-animals",
        ],
    )
    with pytest.raises(InsufficientMemory, match=r"text_encoder_3: null.*-17.7 GiB"):
        check_fits(sd3, torch.device("cpu"))
    from steer.train.memory import parameter_counts as run_counts

    random = dataclasses.replace(sd3, model=dataclasses.replace(sd3.model, random_weights=True))
    assert "text_encoder_3" in run_counts(sd3) and "text_encoder_3" not in run_counts(random)


def test_the_command_refuses_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "steer.cli",
            "finetune",
            "--config",
            str(REPO / "configs" / "sdxl_aesthetic_db.yaml"),
            "model.random_weights=true",
            "model.memory_limit_gb=8",
            f"log.output_dir={out}",
            "log.tracker=none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs about" in lines[0] and "GiB free" in lines[0], lines
    assert not out.exists()  # refused before the run folder was written


def test_random_weights_reach_the_reward_and_refuse_other_load_kwargs(tmp_path: Path) -> None:
    from steer.train.models import load_pipeline, reward_kwargs

    cfg = _cfg(tmp_path, "model.random_weights=true")
    assert reward_kwargs(cfg) == {"pretrained": None, "weights": None}
    cfg = _cfg(tmp_path, "model.random_weights=true", "reward.random_weights=false")
    assert reward_kwargs(cfg) == {}
    ir = _cfg(tmp_path, "model.random_weights=true", preset="sd15_imagereward_tb")
    assert reward_kwargs(ir) == {"weights": None, "tokenizer": "tiny-test"}
    with pytest.raises(ValueError, match="'pickscore' has no random-weights form"):
        reward_kwargs(_cfg(tmp_path, "model.random_weights=true", "reward.name=pickscore"))
    bad = _cfg(tmp_path, "model.random_weights=true", "model.load_kwargs={variant: fp16}")
    with pytest.raises(ValueError, match="may only leave components out"):
        load_pipeline(bad)
    with pytest.raises(ValueError, match="no published architecture"):
        _cfg(tmp_path, "model.random_weights=true", "model.pretrained=tiny")
    with pytest.raises(ValueError, match="model.sample_size must be >= 1"):
        _cfg(tmp_path, "model.sample_size=0")


@pytest.mark.slow
def test_an_sd15_preset_runs_one_step_at_real_size(tmp_path: Path) -> None:
    """The real 860 M UNet (random weights) through the compressibility preset: one step."""
    from steer.train.loop import main

    cfg = _cfg(
        tmp_path,
        "model.random_weights=true",
        "model.sample_size=8",
        "model.num_inference_steps=2",
        "train.steps=1",
        "train.batch_size=1",
        "train.grad_accum=1",
        "train.mixed_precision=no",
        "log.num_eval_samples=1",
        "log.checkpoint_every=0",
        preset="sd15_compressibility_rtb",
    )
    out = main(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["skipped_batches"] == 0
    saved = load_config(str(out / "config.yaml"), [])
    assert saved.model.random_weights is True  # the run says it had random weights


@pytest.mark.slow
def test_the_gpu_script_runs_at_reduced_size_on_cpu(tmp_path: Path) -> None:
    table = tmp_path / "gpu.md"
    from benchmarks.gpu import main

    rows = main(
        [
            "--device",
            "cpu",
            "--reduced",
            "--steps",
            "2",
            "--objectives",
            "rtb",
            "--no-write",
            "--table",
            str(table),
        ]
    )
    assert [r[0] for r in rows] == ["sd15", "sdxl", "sd3-medium"]
    for row in rows:
        peak_off, _, peak_on, _, step_off, step_on, ratio = row[6:]
        for v in (peak_off, peak_on, step_off, step_on, ratio):
            assert isinstance(v, float) and v > 0, row
    assert "## gpu" in table.read_text()


@pytest.mark.parametrize("builder", ["tiny_sd_pipeline", "tiny_sdxl_pipeline", "tiny_sd3_pipeline"])
def test_every_family_samples_at_the_latent_size_it_is_given(builder: str) -> None:
    """``sample_size`` (``model.sample_size``) overrides the denoiser's config in each family."""
    import steer.testing
    from steer.diffusion import denoiser_of, make_policy, rollout

    pipe = getattr(steer.testing, builder)()
    denoiser = denoiser_of(pipe)
    channels = denoiser.config.in_channels
    policy = make_policy(denoiser, pipe.scheduler, num_inference_steps=2, sample_size=(8, 12))
    assert policy.sample_shape == (channels, 8, 12)
    assert make_policy(denoiser, pipe.scheduler, sample_size=16).sample_shape == (channels, 16, 16)
    assert make_policy(denoiser, pipe.scheduler).sample_shape[1:] == (8, 8)  # the config's
    cond = pipe.encode_prompt(["a cat"])
    traj = rollout(policy, 1, cond=cond, generator=torch.Generator().manual_seed(0))
    assert traj.latents.shape[-2:] == (8, 12) and torch.isfinite(traj.log_pf).all()
    for bad in (0, (8,), (8, -4), True):
        with pytest.raises(ValueError, match="sample_size must be an int or"):
            make_policy(denoiser, pipe.scheduler, sample_size=bad)


def test_the_x_hat_rewards_are_decoded_a_batch_at_a_time() -> None:
    """db's B x K decoded x̂ never sit in memory at once; the scores equal one big decode's."""
    from steer.train.sampling import decode_and_score, score

    seen: list[int] = []

    def decode(latents: torch.Tensor) -> torch.Tensor:
        seen.append(latents.shape[0])
        return torch.sigmoid(latents[:, :3])

    def reward(images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return images.mean((1, 2, 3)) + (
            0 if prompts is None else torch.tensor([len(p) for p in prompts])
        )

    latents = torch.randn(10, 4, 3, 3)
    prompts = [f"p{'x' * i}" for i in range(10)]
    chunked = decode_and_score(reward, decode, latents, prompts, chunk=4)
    assert seen == [4, 4, 2]
    assert torch.equal(chunked, score(reward, decode(latents), prompts))


def test_sdxl_time_ids_follow_the_sample_size(tmp_path: Path) -> None:
    from steer.diffusion.sdxl import NUM_TIME_IDS
    from steer.train.loop import setup

    cfg = load_config(
        None,
        [
            "model.pretrained=tiny-sdxl",
            "model.sample_size=4",
            "model.num_inference_steps=2",
            "model.guidance_scale=2.0",
            "reward.name=jpeg-compressibility",
            "prompts.builtin=simple-animals",
            "log.tracker=none",
            f"log.output_dir={tmp_path}",
        ],
    )
    run = setup(cfg)
    pipe, f = run.parts.pipeline, run.parts.pipeline.vae_scale_factor
    want = pipe.add_time_ids(height=4 * f, width=4 * f)
    assert torch.equal(run.parts.cond.embeds[0, 0, -NUM_TIME_IDS:], want.to(run.parts.cond.embeds))
    assert torch.equal(
        run.parts.policy.negative_embeds[0, 0, -NUM_TIME_IDS:], want.to(run.parts.cond.embeds)
    )
    assert run.parts.policy.sample_shape[1:] == (4, 4)


def test_decode_batch_size_bounds_every_decode_of_a_step_and_its_evaluation(tmp_path: Path) -> None:
    from steer.train.loop import setup
    from steer.train.outputs import evaluate
    from steer.train.run import sample

    cfg = load_config(
        None,
        [
            "model.pretrained=tiny",
            "model.num_inference_steps=3",
            "model.decode_batch_size=2",
            "objective.name=db",
            "reward.name=jpeg-compressibility",
            "train.batch_size=3",
            "prompts.builtin=simple-animals",
            "log.tracker=none",
            "log.num_eval_samples=5",
            f"log.output_dir={tmp_path}",
        ],
    )
    run = setup(cfg)
    sizes: list[int] = []
    decode = run.parts.decode

    def spy(latents: torch.Tensor) -> torch.Tensor:
        sizes.append(latents.shape[0])
        return decode(latents)

    run.parts.decode = spy
    batch = sample(run)
    assert batch.log_reward_pred.shape == (3, 3)
    assert sizes and max(sizes) == 2 and sum(sizes) == 3 + 3 * 3  # x_0, then B x K x̂
    sizes.clear()
    evaluate(run, "check")
    assert max(sizes) == 2 and sum(sizes) == 5
    with pytest.raises(ValueError, match="model.decode_batch_size must be >= 1"):
        load_config(None, ["model.decode_batch_size=0"])


def test_a_run_says_it_has_random_weights_and_no_t5(tmp_path: Path, capsys) -> None:
    from steer.train.loop import describe, setup

    cfg = load_config(
        None,
        [
            "model.pretrained=tiny-sd3",
            "model.num_inference_steps=2",
            "objective.name=tb",
            "reward.name=jpeg-compressibility",
            "prompts.builtin=simple-animals",
            "log.tracker=none",
            f"log.output_dir={tmp_path}",
        ],
    )
    describe(setup(cfg))
    assert "SD3 without its T5 encoder" in capsys.readouterr().out
