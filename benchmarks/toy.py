"""Toy-suite comparison: the best configuration per target beside the published figures.

Run from the repository root: ``python -m benchmarks.toy [--budget SECONDS]``. Each target
trains for at most ``--budget`` seconds (default 540, the issue's 10-minute setting), then the
§6 metrics are computed on K = 2000 samples; the table goes to the "toy" section of
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._report import hardware, markdown_table, write_section
from steer.toy.metrics import evaluate_sampler
from steer.toy.registry import get_target
from steer.toy.train import TrainConfig, train

# Sendera et al. 2024, best published Δlog Z / Δlog Z_RW (W2 for gmm25).
PUBLISHED = {
    "gmm25": ("0.171", "0.004", "1.13-1.25"),
    "funnel": ("0.424", "0.051", "-"),
    "manywell": ("3.85", "0.02", "-"),
}
BEST = {  # target -> TrainConfig overrides
    "gmm25": {},
    "funnel": {"langevin": True, "local_search": False, "buffer": "none", "explore": 0.0},
    "manywell": {"langevin": True, "explore": 0.1},
}


def run(target_name: str, budget: float, seed: int = 0) -> list[object]:
    cfg = TrainConfig(target=target_name, max_time_s=budget, seed=seed, **BEST[target_name])
    target = get_target(target_name)
    t0 = time.perf_counter()
    result = train(cfg, target, progress=True)
    m, _ = evaluate_sampler(
        result.sampler, target, 2000, generator=torch.Generator().manual_seed(seed + 1)
    )
    pub = PUBLISHED.get(target_name, ("-", "-", "-"))
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    return [
        target_name,
        fmt(m["delta_log_z"]),
        fmt(m["delta_log_z_rw"]),
        fmt(m["w2"]),
        m.get("modes_covered", "-"),
        fmt(m.get("mode_mass_max_error")),
        result.iterations,
        f"{result.seconds_per_iteration:.3f}",
        f"{time.perf_counter() - t0:.0f}",
        f"{pub[0]} / {pub[1]} / {pub[2]}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=float, default=540.0, help="training seconds per target")
    parser.add_argument("--targets", nargs="+", default=list(BEST))
    args = parser.parse_args()
    rows = [run(name, args.budget) for name in args.targets]
    header = [
        "target",
        "Δlog Z",
        "Δlog Z_RW",
        "W2",
        "modes",
        "worst mode err",
        "iterations",
        "s/iter",
        "wall s",
        "published Δlog Z / Δlog Z_RW / W2",
    ]
    text = (
        f"## toy\n\nTraining budget {args.budget:.0f} s per target, metrics on K = 2000. "
        f"Hardware: {hardware()}. Timings are noisy: the CPUs were shared with other jobs "
        f"while measured.\n\n" + markdown_table(header, rows)
    )
    print(text)
    write_section("toy", text)


if __name__ == "__main__":
    main()
