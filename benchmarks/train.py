"""Where a fine-tuning step spends its time, and how many UNet passes a trained transition costs.

Run: ``python -m benchmarks.train`` (writes the "train" section of benchmarks/README.md).
On the tiny random pipeline (CPU): per objective, one optimiser step split into sampling
(rollout), reward (decode + reward model, incl. x̂ of every state for db), prior (rtb's frozen
log-probs) and training (re-scoring + backward); UNet forward passes per trained transition of
``db`` against the reference design that recomputes x̂ at both ends of each transition with the
current model (1 re-score + 2 extra passes, 2 decodes, 2 reward calls per trained transition)
(peak memory at real size, with and without gradient checkpointing: ``benchmarks.real_size``
and ``benchmarks.gpu``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._report import hardware, markdown_table, write_section
from steer.train.config import load_config
from steer.train.loop import setup
from steer.train.run import sample, train_on_batch

OBJECTIVES = ("tb", "rtb", "db", "ddpo", "dpok", "grpo")


class Timer:
    """Accumulates wall time per label around ``with timer("label"):`` blocks."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._label, self._t0 = "", 0.0

    def __call__(self, label: str) -> Timer:
        self._label = label
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.totals[self._label] = (
            self.totals.get(self._label, 0.0) + time.perf_counter() - self._t0
        )


def _run(objective: str, out: Path, steps: int, batch: int, fraction: float, reps: int):
    # one Accelerator per objective in this process, all at the default mixed_precision ("no"):
    # accelerate fixes the precision once per process, so none of them may change it
    cfg = load_config(None, [
        "model.pretrained=tiny", f"model.num_inference_steps={steps}", "lora.rank=4",
        "reward.name=jpeg-compressibility", "prompts.builtin=simple-animals",
        f"train.batch_size={batch}", "log.tracker=none", f"log.output_dir={out}",
        f"objective.name={objective}", f"objective.train_fraction={fraction}", "objective.beta=0.1",
    ])  # fmt: skip
    run = setup(cfg)
    calls = [0]
    hook = run.parts.policy.unet.register_forward_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1)
    )
    # wrap the pieces of sample_batch to time them separately
    import steer.train.sampling as sampling

    timer, orig_rollout, orig_score = Timer(), sampling.rollout, sampling.score

    def timed_rollout(*a, **k):
        with timer("sampling"):
            return orig_rollout(*a, **k)

    def timed_score(*a, **k):
        with timer("reward"):
            return orig_score(*a, **k)

    sampling.rollout, sampling.score = timed_rollout, timed_score
    totals, rollout_calls, train_calls = [], 0, 0
    try:
        for rep in range(reps + 1):  # the first is a warm-up
            timer.totals.clear()
            calls[0] = 0
            t0 = time.perf_counter()
            batch_ = sample(run)
            sampled = time.perf_counter() - t0
            rollout_calls = calls[0]
            calls[0] = 0
            with timer("training"):
                train_on_batch(run, batch_)
            train_calls = calls[0]
            run.optimizer.zero_grad(set_to_none=True)
            t = dict(timer.totals)
            t["prior"] = sampled - t.get("sampling", 0) - t.get("reward", 0)
            t["total"] = time.perf_counter() - t0
            if rep:
                totals.append(t)
    finally:
        sampling.rollout, sampling.score = orig_rollout, orig_score
        hook.remove()
    med = {k: statistics.median(t[k] for t in totals) for k in totals[0]}
    trained = max(1, round(fraction * steps))
    return med, rollout_calls, train_calls / trained


def main() -> None:
    steps, batch, fraction, reps = 10, 4, 0.5, 3
    rows, db_row = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name in OBJECTIVES:
            med, rollout_calls, per_transition = _run(
                name, Path(tmp) / name, steps, batch, fraction, reps
            )
            rows.append(
                [
                    name,
                    med["sampling"],
                    med["reward"],
                    med["prior"],
                    med["training"],
                    med["total"],
                    rollout_calls,
                    per_transition,
                ]
            )
            if name == "db":
                db_row = per_transition
    header = [
        "objective",
        "sampling (s)",
        "reward (s)",
        "prior (s)",
        "training (s)",
        "step (s)",
        "UNet passes while sampling (rtb: + prior)",
        "UNet passes per trained transition",
    ]
    text = (
        "## train\n\n`python -m benchmarks.train`: one rollout batch and its update on the tiny "
        f"random SD pipeline (CPU), B={batch} trajectories, K={steps} steps, "
        f"{round(fraction * steps)} steps trained per trajectory, JPEG reward; medians of {reps} "
        "(after one warm-up). 'prior' is rtb's frozen log-probs over all K steps.\n\n"
        f"Hardware: {hardware()}\n\n{markdown_table(header, rows)}\n\n"
        f"Energy-difference DB: {db_row:g} UNet forward (+1 backward) per trained transition, "
        "the x̂ rewards of every visited state coming from the rollout's own pass (one decode and "
        "one reward call per visited state). The reference design recomputes x̂ at both ends of "
        "each trained transition with the current model: 3 forwards, 2 decodes and 2 reward "
        "calls per trained transition.\n\ntb and ddpo above run at equal trajectories (same B, K "
        "and trained steps).\n"
    )
    text += (
        "\nPeak memory with / without gradient checkpointing at real size: the real-size "
        "(CPU) and gpu sections (`benchmarks.real_size`, `benchmarks.gpu`).\n"
    )
    print(text)
    write_section("train", text)


if __name__ == "__main__":
    main()
