"""The main job for every digit class: the preset with ``reward.kwargs.target=c`` for c in 0-9,
and ``objective.beta=0.5`` for class 0, each row checked against the main job's targets.

Run: ``python -m benchmarks.digits_classes [--steps N] [--target C ...] [--beta-half C ...]
[--jobs 2]`` (writes the "digits-classes" section of benchmarks/README.md). Every figure is read
from the run's own metrics.json (``steer.digits.report``). ``--jobs 2`` runs two classes at a
time in separate processes, each with one thread (``OMP_NUM_THREADS=1``); wall times are then
those of one thread beside another run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks._digits import preset, short_error, target_overrides
from benchmarks._report import hardware, markdown_table, write_section

# the main job's targets: (column, key, test)
TARGETS = (
    ("≥ 90% class", "fraction", lambda v: v >= 0.9),
    ("diversity ≥ 80% of exact", "diversity_ratio", lambda v: v >= 0.8),
    ("≥ 80% of MMD gap closed", "mmd_closed", lambda v: v >= 0.8),
    ("\\|Δlog Z\\| ≤ 0.2", "log_z_error", lambda v: v <= 0.2),
)
HEADER = ("class", "β", "fraction class (posterior)", "fraction class (exact)",
          "diversity / exact", "MMD gap closed", "\\|log Z − log Z_exact\\|", "wall time (s)",
          *(t[0] for t in TARGETS))  # fmt: skip


def class_row(metrics: dict) -> dict[str, Any]:
    """A table row of one run's metrics.json; ``met``: each target, met or not."""
    row = {
        "class": metrics["target_class"],
        "beta": metrics["beta"],
        "fraction": metrics["posterior"]["fraction_target"],
        "fraction_exact": metrics["exact"]["fraction_target"],
        "diversity_ratio": metrics["diversity_ratio"],
        "mmd_closed": metrics["mmd_closed"],
        "log_z_error": metrics["log_z"]["error"],  # importance-weighted vs Monte Carlo log Z
        "wall_time_s": metrics["wall_time_s"],
        "num_samples": metrics["num_samples"],
    }
    row["met"] = [bool(test(row[key])) for _, key, test in TARGETS]
    return row


Job = tuple[int, float, int, str, int | None]  # class, β, steps, output folder, samples


def run_class(job: Job) -> dict[str, Any]:
    """One run of the preset: its row, or a diverged row (``samples``: the report's sample
    count, ``None`` for its own 256)."""
    import steer.digits.report as report
    from steer.train.loop import main as finetune

    target, beta, steps, out, samples = job
    if samples is not None:
        report.NUM_SAMPLES = samples
    cfg = preset([*target_overrides(target), f"objective.beta={beta}", f"train.steps={steps}",
                  f"log.output_dir={out}", "log.tracker=none"])  # fmt: skip
    start = time.perf_counter()
    try:
        folder = finetune(cfg)
    except RuntimeError as err:  # a diverged run is a row too
        return {"class": target, "beta": beta, "error": short_error(err),
                "wall_time_s": time.perf_counter() - start}  # fmt: skip
    return class_row(json.loads((folder / "metrics.json").read_text()))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_all(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    """Every job, in order; ``workers > 1``: that many processes of one thread each."""
    if workers <= 1:
        return [_shown(run_class(job)) for job in jobs]
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers before torch loads
    ctx = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_thread) as pool:
        return [_shown(row) for row in pool.map(run_class, jobs)]


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    """Print a finished row at once (a long benchmark's rows are not lost to a later failure)."""
    print(json.dumps(row), flush=True)
    return row


def cells(row: dict[str, Any]) -> list[object]:
    """A row as table cells (a diverged run: its error)."""
    if "error" in row:
        blank = ["-"] * 4
        return [row["class"], row["beta"], f"diverged: {row['error']}", *blank,
                row["wall_time_s"], *["-"] * len(TARGETS)]  # fmt: skip
    marks = ["yes" if m else "no" for m in row["met"]]
    keys = ("class", "beta", "fraction", "fraction_exact", "diversity_ratio", "mmd_closed",
            "log_z_error", "wall_time_s")  # fmt: skip
    return [row[k] for k in keys] + marks


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces a table."""
    cmd = f"python -m benchmarks.digits_classes --steps {args.steps} --jobs {args.jobs}"
    if args.target != list(range(10)):
        cmd += " --target " + " ".join(map(str, args.target))
    if args.beta_half != [0]:
        cmd += " --beta-half " + " ".join(map(str, args.beta_half))
    return cmd + ("" if args.samples is None else f" --samples {args.samples}")


def section(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    """The README section: what was run, the table, how many rows meet every target."""
    cfg = preset()
    met = sum(all(r["met"]) for r in rows if "met" in r)
    n = next((r["num_samples"] for r in rows if "num_samples" in r), "-")
    half = ", ".join(map(str, args.beta_half)) or "none"
    return (
        f"## digits-classes\n\n`{command(args)}`: the main job (`steer finetune`, the preset "
        f"digits_rtb.yaml: rtb, {args.steps} steps of {cfg.train.batch_size} trajectories, "
        f"K={cfg.model.num_inference_steps}) toward each class at β = 1, and at β = 0.5 for "
        f"class(es) {half}. Figures from each run's metrics.json ({n} samples against as many "
        "exact posterior samples drawn by rejection from the prior): the fraction classified "
        "as the class, the diversity (mean pairwise L2) relative to the exact posterior's, the "
        "fraction of the prior's MMD gap to the exact posterior closed (down to the noise "
        "floor), and \\|log Z − log Z_exact\\| with log Z importance-weighted from the "
        "fine-tuned sampler and log Z_exact the Monte Carlo value of the rejection draws. "
        "Wall time: the run's own (models loaded, training, final evaluation and saving; the "
        "report after it, and the first drawing of a class's exact reference, not counted). "
        f"Rows meeting every target: {met} of {len(rows)}."
        f"{' Two runs at a time, one thread each.' if args.jobs > 1 else ''}\n\n"
        f"Hardware: {hardware()}\n\n{markdown_table(HEADER, [cells(r) for r in rows])}\n"
    )


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits_classes",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument(
        "--steps", type=int, default=preset().train.steps, help="(default: the preset's)"
    )
    p.add_argument("--target", type=int, nargs="+", default=list(range(10)), help="classes")
    p.add_argument("--beta-half", type=int, nargs="*", default=[0], help="classes also at β=0.5")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    p.add_argument("--samples", type=int, default=None, help="report samples (default 256)")
    p.add_argument("--no-write", action="store_true", help="print only: leave README.md alone")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows_wanted = [(c, 1.0) for c in args.target] + [(c, 0.5) for c in args.beta_half]
        jobs: list[Job] = [
            (c, b, args.steps, str(Path(tmp) / f"class{c}-beta{b}"), args.samples)
            for c, b in rows_wanted
        ]
        rows = run_all(jobs, args.jobs)
    text = section(args, rows)
    print(text)
    if not args.no_write:
        write_section("digits-classes", text)


if __name__ == "__main__":
    main()
