"""Toy-suite comparison: the best configuration per target beside the published figures.

Run from the repository root: ``python -m benchmarks.toy [--budget SECONDS] [--targets ...]``.
Each target is trained with ``steer toy train`` (its defaults plus the overrides in ``BEST``)
for at most ``--budget`` seconds (default 540, the issue's 10-minute setting) and evaluated on
K = 2000 samples; the run directories (metrics.json, samples.png, weights) go to ``--runs``.
The table of every run found there goes to the "toy" section of benchmarks/README.md, so
targets can be run as separate processes (``--threads 1`` each) and tabulated together with
``--table-only``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from benchmarks._report import hardware, markdown_table, write_section
from steer.toy import cli
from steer.toy.train import ToyConfig

# Sendera et al. 2024, best published Δlog Z / Δlog Z_RW (W2 for gmm25).
PUBLISHED = {
    "gmm25": ("0.171", "0.004", "1.13-1.25"),
    "funnel": ("0.424", "0.051", "-"),
    "manywell": ("3.85", "0.02", "-"),
}
BEST: dict[str, list[str]] = {  # target -> `steer toy train` options beyond the defaults
    "gmm25": [],
    "funnel": ["--no-local-search", "--buffer", "none", "--explore", "0"],
    "manywell": ["--objective", "vargrad", "--explore", "0", "--langevin-per-dim"],
}


def run(target: str, budget: float, runs: Path, seed: int = 0) -> None:
    argv = ["train", "--target", target, "--out", str(runs / target), "--no-progress"]
    argv += ["--max-time-s", str(budget), "--seed", str(seed), *BEST[target]]
    print("steer toy " + " ".join(argv))
    cli.main(argv)


def _flags(saved: dict) -> str:
    """The ``steer toy train`` options of a saved run that differ from the defaults (read from
    its config.yaml, so the table shows what the run used, not what ``BEST`` says now)."""
    skip = {"target", "max_time_s", "seed"}  # in the row's own columns / the protocol
    out = []
    for f in dataclasses.fields(ToyConfig):
        value = saved.get(f.name, f.default)
        if f.name in skip or value == f.default:
            continue
        flag = f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            out.append(f"--{flag} {value:g}" if isinstance(value, float) else f"--{flag} {value}")
    return " ".join(out)


def _row(target: str, runs: Path) -> list[object] | None:
    path = runs / target / "metrics.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    options = dataclasses.asdict(cli.read_run_config(runs / target).train)
    flags = _flags(options)
    pub = PUBLISHED.get(target, ("-", "-", "-"))
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    return [
        target,
        flags or "defaults",
        fmt(m["delta_log_z"]),
        fmt(m["delta_log_z_rw"]),
        fmt(m["w2"]),
        f"{m['modes_covered']}/{m['modes_total']}" if "modes_covered" in m else "-",
        fmt(m.get("mode_mass_max_error")),
        {True: "yes", False: "no"}.get(m.get("mode_mass_within_4se"), "-"),
        m["iterations"],
        f"{m['seconds_per_iteration']:.3f}",
        f"{m['wall_time_s']:.0f}",
        f"{options['max_time_s']:.0f}",
        f"{pub[0]} / {pub[1]} / {pub[2]}",
    ]


def table(runs: Path, note: str) -> str:
    rows = [r for r in (_row(t, runs) for t in BEST) if r is not None]
    header = [
        "target",
        "options",
        "Δlog Z",
        "Δlog Z_RW",
        "W2",
        "modes",
        "worst mode err",
        "all within 4 SE",
        "iterations",
        "s/iter",
        "wall s",
        "budget s",
        "published Δlog Z / Δlog Z_RW / W2",
    ]
    return (
        "## toy\n\n`python -m benchmarks.toy`: `steer toy train --target T` with the options shown "
        "(the rest are the defaults), metrics on K = 2000 samples (worst mode error: largest "
        "|mass - 1/25| over the gmm25 modes; 4 standard errors at K = 2000 is 0.0175). "
        f"Hardware: {hardware()}. {note}\n\n" + markdown_table(header, rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=540.0, help="training seconds per target")
    parser.add_argument("--targets", nargs="+", default=list(BEST), choices=list(BEST))
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks-toy"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--table-only", action="store_true", help="tabulate the saved runs")
    parser.add_argument("--note", default="", help="a sentence on how the runs were made")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.table_only:
        for target in args.targets:
            run(target, args.budget, args.runs)
    text = table(args.runs, args.note)
    print(text)
    write_section("toy", text)


if __name__ == "__main__":
    main()
