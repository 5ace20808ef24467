"""Shared pieces of the digits benchmarks: the preset's configs, budgets (optimiser steps or wall
time), runs watched from outside the loop (snapshots of the UNet, a stop by time), and their
evaluation by the report's own metric function (``steer.digits.report.digits_metrics``).

A ``Watch`` callback of the loop copies the UNet's weights after some steps, and once a time
budget is spent stops the run, which ends it as a signal would (a checkpoint is saved, no
report).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from steer.train.config import FinetuneConfig
from steer.train.loop import Callback

PRESET = Path(__file__).parents[1] / "configs" / "digits_rtb.yaml"
CURVE_SAMPLES = 128  # samples per intermediate evaluation (the final one: the report's 256)
POINTS = 5  # intermediate evaluations per run


def preset(overrides: Sequence[str] = ()) -> FinetuneConfig:
    """The main job's config with ``a.b=value`` overrides. One process runs several jobs in
    turn, each with its own ``Accelerator``: they must share ``train.mixed_precision``, which
    accelerate fixes once per process."""
    from steer.train.config import load_config

    return load_config(PRESET, list(overrides))


def target_overrides(target: int) -> list[str]:
    """``reward.kwargs.target=c``, or nothing for the preset's own class 0: its config then
    equals the main job's, whose cached exact reference (keyed by the reward's kwargs) it
    reuses."""
    return [] if target == 0 else [f"reward.kwargs.target={target}"]


@dataclass
class Snapshot:
    """The UNet's weights at ``seconds`` into a run, after ``step`` optimiser steps (rounds)."""

    seconds: float
    step: int
    weights: dict[str, Tensor]


class Recorder:
    """Snapshots at ``points`` evenly spaced marks of a budget of ``total`` seconds
    (``by_time``) or steps; ``__call__`` returns True once a time budget is spent."""

    def __init__(self, total: float, by_time: bool, points: int = POINTS) -> None:
        self.total, self.by_time = total, by_time
        self.marks = [total * (k + 1) / points for k in range(points)]
        self.snapshots: list[Snapshot] = []
        self.seconds, self.step = 0.0, 0

    def __call__(self, seconds: float, step: int, unet: nn.Module) -> bool:
        self.seconds, self.step = seconds, step
        value = seconds if self.by_time else step
        if self.marks and value >= self.marks[0] - 1e-9:
            while self.marks and value >= self.marks[0] - 1e-9:
                self.marks.pop(0)
            weights = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
            self.snapshots.append(Snapshot(seconds, step, weights))
        return self.by_time and seconds >= self.total


class Watch(Callback):
    """A callback of ``steer.train.loop.main``: each step reports to ``recorder`` (its seconds
    since the watch was made) and stops the run when it says so; ``runs`` receives the run."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder, self.runs, self.start = recorder, [], time.perf_counter()

    def on_step(self, run: Any, record: dict[str, float]) -> bool:
        if not self.runs:
            self.runs.append(run)
        return self.recorder(time.perf_counter() - self.start, run.state.step,
                             run.parts.policy.unet)  # fmt: skip


@dataclass
class MethodRun:
    """One fine-tuning run and what the evaluation needs of it."""

    method: str
    budget: str  # "wall time" | "trajectories"
    cfg: FinetuneConfig
    policy: Any  # DiffusionPolicy
    prior: Any
    reward: Any
    decode: Any
    recorder: Recorder
    seconds: float  # from the start to the end of the last optimiser step
    steps: int
    trajectories: int
    history: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    folder: Path | None = None  # the loop's run folder, when it finished (metrics.json, grid)


@dataclass
class Evaluated:
    """A run's final figures (``None`` when it diverged) and its MMD curve ``(s, MMD)``."""

    run: MethodRun
    metrics: dict | None
    curve: list[tuple[float, float]]
    prior_mmd: float
    curve_floor: float


def _final(r: MethodRun, grid: Path | None) -> dict:
    """The final figures: the loop's own metrics.json when it wrote one (the same function, the
    same seeds), else ``digits_metrics`` now; the sample grid (prior | method | exact) to
    ``grid``."""
    import json
    import shutil

    from steer.digits.report import digits_metrics, save_side_by_side

    if r.folder is not None and (r.folder / "metrics.json").exists():
        if grid is not None:
            shutil.copy(r.folder / "grid.png", grid)
        return json.loads((r.folder / "metrics.json").read_text())
    ev = digits_metrics(r.cfg, r.policy, r.prior, r.reward, r.decode, r.history)
    if grid is not None:
        save_side_by_side(ev.prior, ev.posterior, grid, exact=ev.exact)
    return ev.metrics


def evaluate(
    r: MethodRun, curve_samples: int = CURVE_SAMPLES, grids: Path | None = None
) -> Evaluated:
    """Each snapshot at ``curve_samples`` samples, then the final weights at the report's size
    (a grid per run into ``grids``); every figure from ``digits_metrics``. A run whose samples
    cannot be measured (non-finite) becomes a diverged one."""
    import numpy as np

    from steer.digits.report import digits_metrics

    failures = (ValueError, RuntimeError, np.linalg.LinAlgError)  # non-finite samples
    final = {k: v.detach().clone() for k, v in r.policy.unet.state_dict().items()}
    args = (r.cfg, r.policy, r.prior, r.reward, r.decode)
    curve, prior_mmd, floor = [], math.nan, math.nan
    for snap in r.recorder.snapshots:
        r.policy.unet.load_state_dict(snap.weights)
        try:
            m = digits_metrics(*args, r.history[: snap.step], num_samples=curve_samples).metrics
        except failures:
            curve.append((snap.seconds, math.nan))
            continue
        curve.append((snap.seconds, m["posterior"]["mmd_to_exact"]))
        prior_mmd, floor = m["prior"]["mmd_to_exact"], m["exact"]["mmd_floor"]
    r.policy.unet.load_state_dict(final)
    if grids is not None:
        grids.mkdir(parents=True, exist_ok=True)
    grid = None if grids is None else grids / f"{r.method}-{r.budget.replace(' ', '_')}.png"
    try:
        metrics = None if r.error is not None else {**_final(r, grid), "wall_time_s": r.seconds}
    except failures as err:
        r.error, metrics = f"evaluation failed: {err}", None
    return Evaluated(r, metrics, curve, prior_mmd, floor)


NUMERIC = ("fraction_target", "mean_log_p_target", "diversity", "diversity_ratio", "mmd",
           "mmd_floor", "frechet", "frechet_floor", "mmd_closed", "log_z_error")  # fmt: skip
ROW_KEYS = ("method", "budget", "steps", "trajectories", "wall_time_s", *NUMERIC,
            "learned_log_z_error", "status")  # fmt: skip
RELATIVE_LOG_Z = ("rtb",)  # a learned (batch) log Z of the posterior's own normaliser


def table_row(
    method: str,
    budget: str,
    metrics: dict | None,
    seconds: float,
    steps: int,
    trajectories: int,
    error: str | None = None,
) -> dict[str, Any]:
    """One row of the comparison: ``ROW_KEYS``; a diverged run's figures are ``-``."""
    row: dict[str, Any] = dict(method=method, budget=budget, steps=steps,
                               trajectories=trajectories, wall_time_s=seconds)  # fmt: skip
    if metrics is None:
        return {**row, **dict.fromkeys(NUMERIC, "-"), "learned_log_z_error": "-",
                "status": f"diverged: {error}"}  # fmt: skip
    po, ex, lz = metrics["posterior"], metrics["exact"], metrics["log_z"]
    row.update(fraction_target=po["fraction_target"], mean_log_p_target=po["mean_log_p_target"],
               diversity=po["diversity"], diversity_ratio=metrics["diversity_ratio"],
               mmd=po["mmd_to_exact"], mmd_floor=ex["mmd_floor"], frechet=po["frechet_to_exact"],
               frechet_floor=ex["frechet_floor"], mmd_closed=metrics["mmd_closed"],
               log_z_error=lz["error"])  # fmt: skip
    learned = lz.get("last_training_batch")
    relative = method in RELATIVE_LOG_Z and learned is not None
    row["learned_log_z_error"] = abs(learned - lz["exact"]) if relative else "-"
    finite = all(math.isfinite(row[k]) for k in NUMERIC)
    row["status"] = "ok" if finite else "diverged: non-finite figures"
    return row


def short_error(err: BaseException) -> str:
    """The first clause of a run's error (``stopped at step 7: ...`` -> its reason)."""
    text = str(err).split("; saved")[0]
    return text if len(text) < 120 else text[:117] + "..."
