"""The main job (RTB on the digits prior) in a short version: a tiny prior and classifier are
put in a temporary cache where the job looks for its defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from steer.train.config import load_config
from steer.train.loop import main

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding a tiny digits prior and a quick classifier at the default locations."""
    import steer.rewards.digits as rd
    from steer.train.digits import DigitsPriorConfig, load_or_train_digits_prior, prior_folder
    from steer.train.pretrain import DDPMTrainConfig

    root = tmp_path_factory.mktemp("steer_cache")
    tiny = DigitsPriorConfig(block_out_channels=(8, 16), train=DDPMTrainConfig(steps=3,
                             batch_size=16, warmup_steps=1), grid_steps=2)  # fmt: skip
    shutil.move(
        load_or_train_digits_prior(root, tiny, progress=False),
        prior_folder(root, DigitsPriorConfig()),
    )
    quick = rd.load_or_train_digits_classifier(root, rd.ClassifierConfig(epochs=2), progress=False)
    default = rd.config_folder(
        root, "digits_classifier", rd.ClassifierConfig(), rd.ClassifierConfig()
    )
    shutil.move(quick, default)
    return root


def _job(cache: Path, out: Path, *extra: str):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return load_config(ROOT / "configs" / "digits_rtb.yaml", [
        f"model.cache_dir={cache}", f"reward.kwargs.cache_dir={cache}", "reward.kwargs.target=3",
        "model.num_inference_steps=2", "train.steps=2", "train.batch_size=4",
        f"log.output_dir={out}", "log.tracker=none", "log.num_eval_samples=2", *extra,
    ])  # fmt: skip


@pytest.mark.slow
def test_main_job_writes_every_output(cache: Path, tmp_path: Path, monkeypatch) -> None:
    import steer.train.digits as digits

    def no_training(*args, **kwargs):
        raise AssertionError("the cached prior must be reused, not retrained")

    monkeypatch.setattr(digits, "train_digits_prior", no_training)
    out = main(_job(cache, tmp_path))
    for name in (
        "samples.npz",
        "grid.png",
        "curves.png",
        "metrics.json",
        "config.yaml",
        "unet",
    ):
        assert (out / name).exists(), name
    samples = np.load(out / "samples.npz")
    for key in ("prior", "posterior"):
        assert samples[key].shape[0] >= 256 and samples[key].shape[1:] == (16, 16)
        assert samples[key].min() >= 0 and samples[key].max() <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target_class"] == 3
    for side in ("prior", "posterior"):
        assert set(metrics[side]) == {
            "mean_log_p_target",
            "fraction_target",
            "diversity",
            "frechet_to_real_target",
        }
        assert all(np.isfinite(v) for v in metrics[side].values())
    assert metrics["real_target_diversity"] > 0 and metrics["wall_time_s"] > 0
    assert metrics["config"]["objective"]["name"] == "rtb"
    # a second run never overwrites the first
    again = main(_job(cache, tmp_path))
    assert again != out and (out / "metrics.json").exists()


@pytest.mark.parametrize(("override", "match"), [
    ("reward.kwargs.target=11", "target class must be in 0-9; got 11"),
    ("objective.beta=0", "objective.beta must be > 0"),
    ("objective.beta=-1", "objective.beta must be > 0"),
])  # fmt: skip
def test_bad_inputs(cache: Path, tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        main(_job(cache, tmp_path, override))


def test_frechet_distance_against_closed_form() -> None:
    """Fréchet distance of two Gaussians with commuting (diagonal) covariances."""
    import torch

    from steer.train.digits_report import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5]) + 1
    expected = 3 * 1.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0  # |Δμ|² + Σ (σ_a - σ_b)²
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
