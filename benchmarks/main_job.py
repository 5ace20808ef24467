"""The main job's wall time, split: prior training, classifier training, exact posterior draws,
fine-tuning and the report, from an empty cache and then from the warm one.

Run: ``python -m benchmarks.main_job`` (writes the "main-job" section of benchmarks/README.md).
Each run is ``steer finetune`` with no arguments in a subprocess, with ``STEER_CACHE`` pointing at
a fresh temporary folder (the first run) and at the same folder again (the second). Run it on a
quiet machine: nothing else may share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks._report import hardware, markdown_table, write_section

TARGETS = {"fraction": 0.9, "diversity_ratio": 0.8, "mmd_closed": 0.8, "log_z_error": 0.2}


def run_job(cache: Path, out: Path, extra: list[str]) -> dict:
    """One ``steer finetune`` run; its figures and the seconds of each phase."""
    env = {**os.environ, "STEER_CACHE": str(cache)}
    cmd = ["steer", "finetune", f"log.output_dir={out}", "log.tracker=none", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    folder = max(out.iterdir(), key=lambda p: p.stat().st_mtime)
    m = json.loads((folder / "metrics.json").read_text())
    prior = json.loads((cache / "digits_prior" / "train_info.json").read_text())
    clf = json.loads((cache / "digits_classifier" / "metrics.json").read_text())
    return {"wall": wall, "metrics": m, "prior_s": prior["train_seconds"],
            "classifier_s": clf["train_seconds"]}  # fmt: skip


def row(label: str, r: dict, trained: bool) -> list[object]:
    m = r["metrics"]
    exact = m["exact"]["draw_seconds"] if not m["exact"]["cached"] else 0.0
    report = m["report_seconds"]
    prior, clf = (r["prior_s"], r["classifier_s"]) if trained else (0.0, 0.0)
    finetune = r["wall"] - prior - clf - report  # includes loading and start-up
    return [label, f"{r['wall']:.0f}", f"{prior:.0f}", f"{clf:.0f}", f"{finetune:.0f}",
            f"{report:.0f}", f"{exact:.0f} ({exact / r['wall']:.0%})"]  # fmt: skip


def figures(m: dict) -> list[list[object]]:
    po, lz = m["posterior"], m["log_z"]
    got = {"fraction": po["fraction_target"], "diversity_ratio": m["diversity_ratio"],
           "mmd_closed": m["mmd_closed"], "log_z_error": lz["error"]}  # fmt: skip
    ok = {k: (got[k] <= v if k == "log_z_error" else got[k] >= v) for k, v in TARGETS.items()}
    return [[k, f"{got[k]:.3f}", f"{'≤' if k == 'log_z_error' else '≥'} {TARGETS[k]}",
             "yes" if ok[k] else "no"] for k in TARGETS]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*", help="extra a.b=value overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "out"
        cold = run_job(cache, out, args.overrides)
        warm = run_job(cache, out, args.overrides)
    header = ["cache", "wall s", "prior s", "classifier s", "fine-tuning s", "report s",
              "of which exact draws s (share)"]  # fmt: skip
    m = cold["metrics"]
    body = (
        "`steer finetune` (no arguments) in a subprocess, `STEER_CACHE` empty then warm; "
        f"{hardware()}; nothing else running.\n\n"
        + markdown_table(header, [row("empty", cold, True), row("warm", warm, False)])
        + "\n\nFigures of the empty-cache run (the issue's targets):\n\n"
        + markdown_table(["figure", "value", "target", "met"], figures(m))
        + f"\n\nlog Z: importance-weighted {m['log_z']['importance_weighted']:.3f}, ELBO "
        f"{m['log_z']['elbo']:.3f}, exact {m['log_z']['exact']:.3f} ± "
        f"{m['log_z']['exact_stderr']:.3f}; class fraction {m['posterior']['fraction_target']:.2f}"
        f" (exact {m['exact']['fraction_target']:.2f}, prior {m['prior']['fraction_target']:.2f})."
    )
    print(body)
    write_section("main-job", "## The main job, timed\n\n" + body)


if __name__ == "__main__":
    main()
