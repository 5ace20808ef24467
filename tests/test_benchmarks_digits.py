"""The digits benchmarks at tiny size: the shared metric function and its table rows, a loop
method watched from outside the loop (snapshots, stop by time), and the rejection fine-tuning
baseline, on a tiny prior and classifier put in a temporary cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks._digits import NUMERIC, ROW_KEYS, evaluate, preset, table_row
from steer.train.config import FinetuneConfig
from steer.train.models import Components

TINY = (
    "model.num_inference_steps=2",
    "model.prior_tail_steps=1",
    "train.batch_size=4",
    "log.num_eval_samples=2",
)


def _extra(cache: Path) -> list[str]:
    return [f"model.cache_dir={cache}", f"reward.kwargs.cache_dir={cache}", *TINY]


def _parts(cache: Path, tmp_path: Path) -> tuple[FinetuneConfig, Components]:
    from steer.train.models import build_components

    cfg = preset([*_extra(cache), "reward.kwargs.target=3", f"log.output_dir={tmp_path}"])
    return cfg, build_components(cfg, torch.device("cpu"))


def _check_row(row: dict) -> None:
    assert set(row) == set(ROW_KEYS)
    assert row["status"] == "ok"
    for key in (*NUMERIC, "wall_time_s"):
        assert isinstance(row[key], float) and math.isfinite(row[key]), key


def test_metric_function_gives_a_full_row(
    digits_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.digits_classes import HEADER, cells, class_row
    from steer.digits.report import digits_metrics

    monkeypatch.setattr("steer.digits.report.NUM_SAMPLES", 16)
    cfg, p = _parts(digits_cache, tmp_path)
    history = [{"step": 1, "log_z": -2.0}]
    m = digits_metrics(cfg, p.policy, p.prior, p.reward, p.decode, history, wall_time=1.5)
    assert m.metrics["num_samples"] == 16 and m.metrics["wall_time_s"] == 1.5
    assert m.posterior.shape == m.exact.shape == (16, 1, 16, 16)
    row = table_row("rtb", "trajectories", m.metrics, 1.5, 2, 8)
    _check_row(row)
    assert row["learned_log_z_error"] == pytest.approx(abs(-2.0 - m.metrics["log_z"]["exact"]))
    assert table_row("db", "trajectories", m.metrics, 1.5, 2, 8)["learned_log_z_error"] == "-"
    diverged = table_row("dpok", "wall time", None, 1.0, 3, 12, "NaN loss")
    assert set(diverged) == set(ROW_KEYS) and diverged["status"] == "diverged: NaN loss"
    c = class_row(m.metrics)
    assert c["class"] == 3 and len(cells(c)) == len(HEADER) == len(cells({**c, "error": "x"}))


def test_watched_loop_snapshots_and_stops_by_time(
    digits_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.digits import run_loop_method

    monkeypatch.setattr("steer.digits.report.NUM_SAMPLES", 8)
    steps = run_loop_method("rtb", "trajectories", 2, 3, tmp_path / "a", 2, _extra(digits_cache))
    assert steps.error is None and steps.steps == 2 and steps.trajectories == 8
    assert [s.step for s in steps.recorder.snapshots] == [1, 2]
    ev = evaluate(steps, curve_samples=8)
    assert len(ev.curve) == 2 and all(math.isfinite(v) for _, v in ev.curve)
    _check_row(table_row("rtb", "trajectories", ev.metrics, steps.seconds, 2, 8))
    timed = run_loop_method(
        "vargrad", "wall time", 0.5, 3, tmp_path / "b", 2, _extra(digits_cache), steps_hint=10**6
    )
    assert timed.error is None and timed.steps >= 1 and timed.seconds >= 0.5
    assert timed.recorder.snapshots[-1].step == timed.steps  # the stop is the last mark


def test_rejection_ft_loss_decreases(digits_cache: Path, tmp_path: Path) -> None:
    from steer.digits.rejection_ft import RejectionFTConfig, classifier_log_reward, rejection_ft

    cfg, p = _parts(digits_cache, tmp_path)
    log_reward = classifier_log_reward(p.reward, p.decode, cfg.objective.beta)
    seen: list[int] = []
    settings = RejectionFTConfig(steps=60, num_draws=256, batch_size=8, lr=2e-3)
    res = rejection_ft(p.prior, log_reward, settings, callback=lambda s, k, u: seen.append(k))
    assert res.num_drawn == 256 and 0 < res.num_accepted <= 256 and res.log_z <= 0
    assert len(res.losses) == 60 and seen[-1] == 60 and all(map(math.isfinite, res.losses))
    assert sum(res.losses[-15:]) < sum(res.losses[:15])  # DDPM loss on the exact draws
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(res.policy.unet.parameters(), p.prior.unet.parameters(), strict=True)
    )
    assert changed and res.policy.deterministic_map is p.prior

    # a budget that holds a few draw batches even on a loaded machine (0.5 s did not); the time
    # budget, not the acceptance, is under test: a reward of 1 accepts every draw (how many
    # draws fit in 4 s depends on the machine, and ~10% acceptance left none of 35 once)
    def accept_all(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], device=x.device)

    timed = rejection_ft(p.prior, accept_all, RejectionFTConfig(seconds=4.0, batch_size=8))
    assert timed.seconds >= 4.0 and timed.num_drawn >= 32
    assert timed.num_accepted == timed.num_drawn
