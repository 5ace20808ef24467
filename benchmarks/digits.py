"""The digits comparison: rtb, vargrad, db, ddpo, dpok and rejection fine-tuning from the same
prior, reward, class and sampler, at equal wall time and at equal trajectories.

Run: ``python -m benchmarks.digits [--steps N] [--target C] [--budget both|time|trajectories]``
(writes the "digits" section of benchmarks/README.md, benchmarks/digits/distance_vs_time.png and a
grid per method under benchmarks/digits/). rtb is the preset as is (``train.steps`` = ``--steps``);
its wall time (start to the end of its last optimiser step) is the wall-time budget of every other
method, its ``steps × batch`` trajectories the trajectory budget. Every figure comes from
``steer.digits.report.digits_metrics``, the function behind the main job's metrics.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks._digits import (
    CURVE_SAMPLES,
    POINTS,
    ROW_KEYS,
    Evaluated,
    MethodRun,
    Recorder,
    Watch,
    evaluate,
    preset,
    short_error,
    table_row,
    target_overrides,
)
from benchmarks._report import hardware, markdown_table, write_section

LOOP_METHODS = {
    "rtb": [],
    "vargrad": ["objective.name=vargrad"],
    "db": ["objective.name=db"],
    # the RL baselines are on-policy: no exploration noise (the preset's 0.15 is off-policy data)
    "ddpo": ["objective.name=ddpo", "train.exploration_scale=0"],
    "dpok": ["objective.name=dpok", "train.exploration_scale=0"],
    # groups of 4 samples per "prompt" (the unconditional task): 4 groups per batch of 16
    "grpo": ["objective.name=grpo", "train.exploration_scale=0"],
}
METHODS = (*LOOP_METHODS, "rejection-ft")
FOLDER = Path(__file__).with_name("digits")
BUDGETS = {"time": "wall time", "trajectories": "trajectories"}
HEADER = {
    "method": "method", "steps": "steps", "trajectories": "trajectories",
    "wall_time_s": "wall time (s)", "fraction_target": "fraction class c",
    "mean_log_p_target": "E[log p(c \\| x)]", "diversity": "diversity",
    "diversity_ratio": "diversity / exact", "mmd": "MMD to exact", "mmd_floor": "MMD floor",
    "frechet": "Fréchet to exact", "frechet_floor": "Fréchet floor",
    "mmd_closed": "MMD gap closed", "log_z_error": "\\|Δlog Z\\| (IW)",
    "learned_log_z_error": "\\|Δlog Z\\| (learned)", "status": "status",
}  # fmt: skip


def _common(target: int, out: Path, extra: Sequence[str]) -> list[str]:
    return [*target_overrides(target), f"log.output_dir={out}", "log.tracker=none", *extra]


def run_loop_method(
    method: str,
    budget: str,
    limit: float,
    target: int,
    out: Path,
    points: int = POINTS,
    extra: Sequence[str] = (),
    steps_hint: int | None = None,
) -> MethodRun:
    """``steer.train.loop.main`` on the preset with ``method``'s overrides, for ``limit`` steps
    (``budget="trajectories"``) or seconds (``"wall time"``: ``train.steps = steps_hint``, the
    steps that fit in ``limit`` at the method's measured seconds per step, so that a learning-rate
    schedule runs its course; also stopped by time after the round that crosses it)."""
    from steer.train.loop import main as finetune

    by_time = budget == "wall time"
    steps = (steps_hint or 10**9) if by_time else int(limit)
    cfg = preset([*LOOP_METHODS[method], f"train.steps={steps}", *_common(target, out, extra)])
    if by_time and steps_hint is None and cfg.train.lr_schedule != "constant":
        raise ValueError(
            "a wall-time budget without a measured seconds-per-step runs train.steps=10^9: a "
            "learning-rate schedule would not run its course; run --budget both (trajectories "
            "first) or use a constant schedule"
        )
    recorder, error, folder = Recorder(limit, by_time, points), None, None
    watch = Watch(recorder)
    try:
        folder = finetune(cfg, callbacks=[watch])
    except RuntimeError as err:  # a diverged run is a result too
        error = short_error(err)
    runs = watch.runs
    if not runs:
        raise RuntimeError(f"{method}: the run stopped before its first round: {error}")
    run = runs[0]
    per_round = cfg.train.batch_size * cfg.train.grad_accum
    p = run.parts
    return MethodRun(method, budget, cfg, p.policy, p.prior, p.reward, p.decode, recorder,
                     recorder.seconds, recorder.step, recorder.step * per_round,
                     list(run.state.history), error, folder)  # fmt: skip


def run_rejection_ft(
    budget: str,
    limit: float,
    target: int,
    out: Path,
    points: int = POINTS,
    draw_fraction: float = 0.5,
    extra: Sequence[str] = (),
) -> MethodRun:
    """``steer.digits.rejection_ft`` from the preset's prior, reward and sampler, with its batch
    size, lr and seed: for ``limit`` seconds (drawing included) or ``limit`` optimiser steps on
    the accepted of ``limit × batch`` prior draws."""
    import torch

    from steer.digits.rejection_ft import RejectionFTConfig, classifier_log_reward, rejection_ft
    from steer.train.models import build_components

    start = time.perf_counter()
    cfg = preset(_common(target, out, extra))
    parts = build_components(cfg, torch.device("cpu"))
    by_time, setup = budget == "wall time", time.perf_counter() - start
    recorder = Recorder(limit, by_time, points)
    train = dict(batch_size=cfg.train.batch_size, lr=cfg.train.lr, seed=cfg.train.seed,
                 max_grad_norm=cfg.train.max_grad_norm, draw_fraction=draw_fraction)  # fmt: skip
    settings = (
        RejectionFTConfig(seconds=max(limit - setup, 1e-3), **train)
        if by_time
        else RejectionFTConfig(steps=int(limit), **train)
    )
    log_reward = classifier_log_reward(parts.reward, parts.decode, cfg.objective.beta)
    res = rejection_ft(parts.prior, log_reward, settings,
                       callback=lambda s, step, unet: recorder(setup + s, step, unet))  # fmt: skip
    res.policy.frozen_tail = getattr(parts.policy, "frozen_tail", 0)  # as the loop's policies
    return MethodRun("rejection-ft", budget, cfg, res.policy, parts.prior, parts.reward,
                     parts.decode, recorder, setup + res.seconds, len(res.losses), res.num_drawn,
                     res.history)  # fmt: skip


def run_one(
    method: str,
    budget: str,
    limit: float,
    args: argparse.Namespace,
    tmp: Path,
    steps_hint: int | None = None,
) -> MethodRun:
    """``method`` for ``limit`` seconds or steps (``budget``) with the CLI's settings."""
    out = tmp / f"{method}-{budget.replace(' ', '_')}"
    if method == "rejection-ft":
        return run_rejection_ft(budget, limit, args.target, out, args.points, args.draw_fraction)
    return run_loop_method(
        method, budget, limit, args.target, out, args.points, steps_hint=steps_hint
    )


def _row(ev: Evaluated) -> dict:
    r = ev.run
    return table_row(r.method, r.budget, ev.metrics, r.seconds, r.steps, r.trajectories, r.error)


def reference_rows(metrics: dict, budget: str) -> list[dict]:
    """The prior (no fine-tuning) and the exact posterior (rejection) as rows."""
    pr, ex = metrics["prior"], metrics["exact"]
    base = {k: "-" for k in ROW_KEYS} | {"budget": budget, "status": "reference"}
    prior = base | {
        "method": "prior (no fine-tuning)",
        "fraction_target": pr["fraction_target"],
        "mean_log_p_target": pr["mean_log_p_target"],
        "diversity": pr["diversity"],
        "diversity_ratio": pr["diversity"] / ex["diversity"],
        "mmd": pr["mmd_to_exact"],
        "frechet": pr["frechet_to_exact"],
        "mmd_closed": 0.0,
    }
    exact = base | {
        "method": "exact posterior (rejection)",
        "fraction_target": ex["fraction_target"],
        "diversity": ex["diversity"],
        "diversity_ratio": 1.0,
        "mmd_floor": ex["mmd_floor"],
        "frechet_floor": ex["frechet_floor"],
        "mmd_closed": 1.0,
    }
    return [prior, exact]


def plot(evaluated: dict[str, list[Evaluated]], path: Path, curve_samples: int) -> None:
    """MMD to the exact posterior against wall time, one panel per budget, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(evaluated), figsize=(6 * len(evaluated), 4), squeeze=False)
    for ax, (budget, evs) in zip(axes[0], evaluated.items(), strict=True):
        for ev in evs:
            xs = [0.0] + [s for s, _ in ev.curve]
            ys = [ev.prior_mmd] + [m for _, m in ev.curve]
            label = ev.run.method + (" (diverged)" if ev.run.error else "")
            ax.plot(xs, ys, marker="o", label=label)
        floor = next((ev.curve_floor for ev in evs if ev.curve), float("nan"))
        ax.axhline(floor, color="k", linestyle="--", linewidth=1, label="noise floor")
        ax.set_title(f"equal {budget}")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel(f"MMD to the exact posterior ({curve_samples} samples)")
        ax.legend(fontsize=8)
    fig.suptitle(f"intermediate points: {curve_samples} samples each; t = 0 is the prior")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_all(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, list[Evaluated]], float]:
    """rtb first (its wall time is the time budget), then every other method per budget, each
    evaluated as soon as it ends; returns the evaluations per budget and the time budget."""
    budgets = list(BUDGETS.values()) if args.budget == "both" else [BUDGETS[args.budget]]
    budgets.sort(key=lambda b: b == "wall time")  # trajectories first: it measures s / step
    grids = None if args.no_write else FOLDER

    def done(ev: Evaluated) -> Evaluated:
        row = _row(ev)
        print(" | ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                         for k in ROW_KEYS), flush=True)  # fmt: skip
        return ev

    rtb = done(evaluate(run_one("rtb", "trajectories", args.steps, args, tmp), args.curve_samples,
                        grids))  # fmt: skip
    seconds = rtb.run.seconds
    results = {b: [rtb] for b in budgets}
    per_step: dict[str, float] = {}  # seconds per step at the trajectory budget
    for budget in budgets:
        limit = seconds if budget == "wall time" else args.steps
        for method in (m for m in args.methods if m != "rtb"):
            hint = int(seconds / per_step[method]) if method in per_step else None
            run = run_one(method, budget, limit, args, tmp, steps_hint=hint)
            if budget == "trajectories" and run.steps:
                per_step[method] = run.seconds / run.steps
            results[budget].append(done(evaluate(run, args.curve_samples, grids)))
    return results, seconds


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces the section (non-default options included)."""
    cmd = f"python -m benchmarks.digits --steps {args.steps} --target {args.target}"
    defaults = parse([])
    for name in ("budget", "curve_samples", "points", "samples", "draw_fraction"):
        if getattr(args, name) != getattr(defaults, name):
            cmd += f" --{name.replace('_', '-')} {getattr(args, name)}"
    if list(args.methods) != list(METHODS):
        cmd += " --methods " + " ".join(args.methods)
    return cmd


def section(args: argparse.Namespace, results: dict[str, list[Evaluated]], seconds: float) -> str:
    """The README section: what was run, then one table per budget."""
    cfg = preset()
    evs = [ev.metrics for evs in results.values() for ev in evs if ev.metrics is not None]
    n = evs[0]["num_samples"] if evs else "-"
    text = (
        f"## digits\n\n`{command(args)}`: every method fine-tunes the embedded digits prior toward "
        f"class {args.target} (K={cfg.model.num_inference_steps}, η={cfg.model.eta}, "
        f"β={cfg.objective.beta}, batch {cfg.train.batch_size}, lr {cfg.train.lr}), from the same "
        f"prior, reward and sampler. rtb is the preset as is ({args.steps} steps, "
        f"{seconds:.0f} s to its last step: the wall-time budget; its "
        f"{args.steps * cfg.train.batch_size} trajectories: the trajectory budget). At equal "
        "wall time every other method runs until the round that crosses the budget ends; "
        "rejection-ft (the prior fine-tuned with its own DDPM loss on exact posterior samples "
        f"accepted by rejection, `steer.digits.rejection_ft`) spends {args.draw_fraction:.0%} of "
        "it drawing, the rest training; at equal trajectories it trains as many steps on the "
        "accepted of as many prior draws. vargrad and db target ∝ p(c\\|x)^(1/β) alone (no "
        "prior term), ddpo maximises the reward, dpok adds a KL to the prior: only rtb and "
        f"rejection-ft target the posterior measured here. Figures of {n} samples against {n} "
        "exact posterior samples "
        "(`digits_metrics`, the main job's report): MMD on pixels, Fréchet in the classifier's "
        "features, each beside its noise floor (two exact sets); MMD gap closed = (prior − "
        "method) / (prior − floor); \\|Δlog Z\\| (IW) = importance-weighted log Z of the "
        "method's sampler vs the Monte Carlo value (defined for any sampler with a density); "
        "learned: rtb's last batch log Z. Wall time: from the start of the run (loading the "
        f"models included) to the end of its last optimiser step.\n\nHardware: {hardware()}\n"
    )
    keys = list(HEADER)
    for budget, runs in results.items():
        rows = (reference_rows(evs[0], budget) if evs else []) + [_row(ev) for ev in runs]
        table = markdown_table([HEADER[k] for k in keys], [[r[k] for k in keys] for r in rows])
        text += f"\n### equal {budget}\n\n{table}\n"
    text += (
        "\n![MMD to the exact posterior against wall time](digits/distance_vs_time.png) "
        f"(intermediate points: {args.curve_samples} samples each, {args.points} per run.) "
        "Grids (prior | method | exact): benchmarks/digits/<method>-<budget>.png.\n"
    )
    return text


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.digits", description=__doc__.split("\n")[0]
    )
    p.add_argument("--steps", type=int, default=preset().train.steps, help="rtb's steps (preset)")
    p.add_argument("--target", type=int, default=0, help="the digit class")
    p.add_argument("--budget", choices=("both", *BUDGETS), default="both")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="(rtb always runs: it sets the budgets)")  # fmt: skip
    p.add_argument("--curve-samples", type=int, default=CURVE_SAMPLES)
    p.add_argument("--points", type=int, default=POINTS, help="intermediate evaluations per run")
    p.add_argument("--samples", type=int, default=None, help="final samples (report's: 256)")
    p.add_argument("--draw-fraction", type=float, default=0.5, help="rejection-ft: drawing share")
    p.add_argument("--no-write", action="store_true", help="print only: no README, plot, grids")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    import steer.digits.report as report

    args = parse(argv)
    if args.samples is not None:  # the report's own sample count (tests do the same)
        report.NUM_SAMPLES = args.samples
    with tempfile.TemporaryDirectory() as tmp:
        results, seconds = run_all(args, Path(tmp))
    text = section(args, results, seconds)
    print(text)
    if not args.no_write:
        FOLDER.mkdir(exist_ok=True)
        plot(results, FOLDER / "distance_vs_time.png", args.curve_samples)
        write_section("digits", text)


if __name__ == "__main__":
    main()
