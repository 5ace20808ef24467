"""Every Stable Diffusion preset starts and runs one optimiser step at its real architecture.

Run: ``python -m benchmarks.presets`` (CPU; writes the "presets" section of benchmarks/README.md).
Each ``configs/sd*.yaml`` runs as ``steer finetune --config PRESET model.random_weights=true``
in its own process with its own objective, reward (random weights at the reward's architecture),
guidance, LoRA rank, checkpointing and prompts; what is cut to fit a 2-core CPU is the same for
all and listed in ``SMALL`` (latents, steps, batch, one step, float32: CPU bf16 autocast is
slower than float32). The preset's first failure (a config key, a shape, a dtype) shows here,
not on a rented GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from steer.train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = [
    "model.random_weights=true",
    "model.sample_size=16",
    "model.num_inference_steps=2",
    "train.steps=1",
    "train.grad_accum=1",
    "train.mixed_precision=no",
    "log.num_eval_samples=1",
    "log.checkpoint_every=0",
    "log.tracker=none",
]


def presets() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("sd*.yaml"))


def smallest_batch(path: Path) -> int:
    """The smallest ``train.batch_size`` the preset's objective accepts: whole groups (grpo)
    that split into its PPO minibatches (ddpo, grpo: 2)."""
    objective = load_config(str(path), []).objective
    group = objective.group_size if objective.name == "grpo" else 1
    return math.lcm(group, objective.minibatches if objective.needs.on_policy else 1)


def run_preset(path: Path, out: str, timeout: float = 1800) -> dict[str, object]:
    """One step of ``path``: seconds, peak RSS of the process, and its last line."""
    cfg = load_config(str(path), [])
    batch = smallest_batch(path)
    cmd = [sys.executable, "-c",
           "import resource, sys\nfrom steer.train.cli import main\nrc = main(sys.argv[1:])\n"
           "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)",
           "--config", str(path), *SMALL, f"train.batch_size={batch}",
           f"log.output_dir={out}"]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, TQDM_DISABLE="1"))  # fmt: skip
    seconds = time.perf_counter() - t0
    peak = re.findall(r"^PEAK (\d+)$", done.stdout, re.M)
    trainable = re.findall(r"trainable parameters: ([\d,]+)", done.stdout + done.stderr)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return {
        "preset": path.stem,
        "model": cfg.model.pretrained,
        "objective": cfg.objective.name,
        "reward": cfg.reward.name,
        "ok": done.returncode == 0,
        "seconds": seconds,
        "peak_gib": int(peak[0]) * 1024 / 2**30 if peak else float("nan"),
        "trainable": trainable[0] if trainable else "?",
        "error": "" if done.returncode == 0 else last[:200],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    from benchmarks._report import hardware, markdown_table, write_section

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="preset names (default: every configs/sd*.yaml)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    chosen = [p for p in presets() if not args.only or p.stem in args.only]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in chosen:
            rows.append(run_preset(path, str(Path(tmp) / path.stem)))
            print(rows[-1], flush=True)
    header = ["preset", "model (random weights)", "objective", "reward", "runs",
              "s (build + step + eval)",
              "peak RSS (GiB)", "trainable parameters"]  # fmt: skip
    table = markdown_table(header, [
        [r["preset"], r["model"], r["objective"], r["reward"],
         "yes" if r["ok"] else f"no: {r['error']}", r["seconds"], r["peak_gib"], r["trainable"]]
        for r in rows
    ])  # fmt: skip
    body = (
        "## presets\n\n`python -m benchmarks.presets`: each Stable Diffusion preset, one "
        "optimiser step at its real architecture with random weights (its reward too), its own "
        "objective, guidance, LoRA and checkpointing, with these overrides for a 2-core CPU: `"
        + " ".join(SMALL)
        + "` and the smallest `train.batch_size` the objective takes (1; ddpo 2, for its two "
        "PPO minibatches; grpo one group of 4). Time includes "
        "building the random model and the final evaluation of one sample.\n\n"
        f"Hardware: {hardware()}\n\n{table}\n"
    )
    print(body)
    if not args.no_write:
        write_section("presets", body)
    return rows


if __name__ == "__main__":
    main()
