"""The main job (RTB on the digits prior) in a short version: a tiny prior and classifier are
put in a temporary cache where the job looks for its defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from steer.train.config import load_config
from steer.train.loop import main

ROOT = Path(__file__).parents[1]


def _job(cache: Path, out: Path, *extra: str):
    return load_config(ROOT / "configs" / "digits_rtb.yaml", [
        f"model.cache_dir={cache}", f"reward.kwargs.cache_dir={cache}", "reward.kwargs.target=3",
        "model.num_inference_steps=2", "model.prior_tail_steps=1", "train.steps=2",
        "train.batch_size=4",
        f"log.output_dir={out}", "log.tracker=none", "log.num_eval_samples=2", *extra,
    ])  # fmt: skip


@pytest.mark.slow
def test_main_job_writes_every_output(digits_cache: Path, tmp_path: Path, monkeypatch) -> None:
    import steer.digits.prior as digits

    def no_training(*args, **kwargs):
        raise AssertionError("the cached prior must be reused, not retrained")

    monkeypatch.setattr(digits, "train_digits_prior", no_training)
    monkeypatch.setattr("steer.digits.report.NUM_SAMPLES", 64)  # CI-sized exact draws
    out = main(_job(digits_cache, tmp_path))
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
    for key in ("prior", "posterior", "exact"):
        assert samples[key].shape == (64, 16, 16)
        assert samples[key].min() >= 0 and samples[key].max() <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target_class"] == 3
    for side in ("prior", "posterior"):
        assert set(metrics[side]) == {
            "mean_log_p_target",
            "fraction_target",
            "diversity",
            "frechet_to_real_target",
            "mmd_to_exact",
            "frechet_to_exact",
        }
        assert all(np.isfinite(v) for v in metrics[side].values())
    exact = metrics["exact"]
    assert exact["mmd_floor"] > 0 and exact["frechet_floor"] > 0 and exact["diversity"] > 0
    assert 0 < exact["acceptance_rate"] <= 1 and exact["num_drawn"] >= 128
    assert exact["cached"] is False
    log_z = metrics["log_z"]
    assert log_z["exact"] <= 0 and log_z["exact_stderr"] > 0  # log E[p(c|x)] with p <= 1
    assert log_z["elbo"] <= log_z["importance_weighted"] + 1e-6
    assert log_z["error"] == pytest.approx(abs(log_z["importance_weighted"] - log_z["exact"]))
    for key in ("mmd_closed", "diversity_ratio", "report_seconds"):
        assert np.isfinite(metrics[key])
    assert metrics["real_target_diversity"] > 0 and metrics["wall_time_s"] > 0
    assert metrics["config"]["objective"]["name"] == "rtb"
    # a second run never overwrites the first, and finds the exact draws in the cache
    again = main(_job(digits_cache, tmp_path))
    assert again != out and (out / "metrics.json").exists()
    second = json.loads((again / "metrics.json").read_text())["exact"]
    assert second["cached"] is True and second["log_z"] == exact["log_z"]


@pytest.mark.parametrize(("override", "match"), [
    ("reward.kwargs.target=11", "target class must be in 0-9; got 11"),
    ("objective.beta=0", "objective.beta must be > 0"),
    ("objective.beta=-1", "objective.beta must be > 0"),
])  # fmt: skip
def test_bad_inputs(digits_cache: Path, tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        main(_job(digits_cache, tmp_path, override))


def test_frechet_distance_against_closed_form() -> None:
    """Fréchet distance of two Gaussians with commuting (diagonal) covariances."""
    import torch

    from steer.digits.report import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5]) + 1
    expected = 3 * 1.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0  # |Δμ|² + Σ (σ_a - σ_b)²
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)


def test_two_exact_draws_are_closer_than_the_prior_is() -> None:
    """The report's distances: the MMD (pixels) and Fréchet (features) between two independent
    exact posterior sets sit below the prior's distance to the exact posterior, and the
    posterior's own figure is measured the same way."""
    import torch

    from steer.exact import rejection_sample
    from steer.toy.metrics import mmd_rbf

    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 64, generator=g)  # four "classes" of 8x8 images

    def draw(n: int, gen: torch.Generator) -> torch.Tensor:
        c = torch.randint(4, (n,), generator=gen)
        return (protos[c] + 0.05 * torch.randn(n, 64, generator=gen)).clamp(0, 1)

    def log_r(x: torch.Tensor) -> torch.Tensor:  # accepts the first class almost only
        return -((x - protos[0]) ** 2).sum(1) * 3

    res = rejection_sample(draw, log_r, 400, generator=torch.Generator().manual_seed(1))
    a, b = res.samples[:200], res.samples[200:]
    prior = draw(200, torch.Generator().manual_seed(2))
    h = float(torch.cdist(a, a).median())
    assert mmd_rbf(b, a, h) < 0.5 * mmd_rbf(prior, a, h)
    assert 0.15 < res.acceptance_rate < 0.4
