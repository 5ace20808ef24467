"""Where the time of one plain TB iteration of the toy sampler goes (gmm25 sizes, no Langevin).

Run from the repository root: ``python -m benchmarks.toy_iteration [--iterations N]``. One TB
iteration at batch 300, T = 100, d = 2 with the default network (hidden 64, two hidden
layers: ~8.4k multiply-adds per state) is timed phase by phase, median over ``N`` iterations,
for two implementations measured in the same process, interleaved:

- ``re-score``: the rollout runs without autograd, then all ``B·T`` states are scored again
  with autograd (a second forward) and back-propagated by autograd (the previous design);
- ``replay`` (what ``steer toy train`` runs): the rollout records its activations and
  ``log_pf``'s backward replays them in one chunked batched pass (no second forward).

The table goes to the "toy-iteration" section of benchmarks/README.md with the FLOP count
and the machine's measured matrix-product throughput, the floor for this work.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._report import hardware, markdown_table, write_section
from steer.toy.registry import get_target
from steer.toy.sampler import DiffusionSampler
from steer.toy.train import ToyConfig, _optimizer, objective_loss

BATCH = 300


def _sampler() -> tuple[DiffusionSampler, object]:
    target = get_target("gmm25")
    sampler = DiffusionSampler(ToyConfig(langevin=False).sampler_config(target))
    for p in sampler.out.parameters():  # a trained-like head (zero at initialisation)
        torch.nn.init.normal_(p, std=0.1)
    return sampler, target


def _iteration(sampler: DiffusionSampler, target, opt, replay: bool) -> list[float]:
    """One TB iteration; returns the seconds of [rollout, loss, backward, step]."""
    t0 = time.perf_counter()
    if replay:
        traj = sampler.rollout(BATCH, explore=0.2, detach_states=True)
        scored = (traj.log_pf, None)
    else:
        with torch.no_grad():
            traj = sampler.rollout(BATCH, explore=0.2)
        scored = None
    with torch.no_grad():
        log_r = target.log_prob(traj.x0)
    t1 = time.perf_counter()
    loss = objective_loss("tb", sampler, traj.latents, log_r, target, scored=scored).mean()
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t3 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(sampler.parameters(), 100.0)
    opt.step()
    return [t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3]


def _matmul_gflops(rows: int, hidden: int = 64, repeats: int = 20) -> float:
    a, w = torch.randn(rows, hidden), torch.randn(hidden, hidden)
    out = torch.empty(rows, hidden)
    for _ in range(3):
        torch.mm(a, w, out=out)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, w, out=out)
    return 2 * rows * hidden * hidden * repeats / (time.perf_counter() - t) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    runs = {}
    for name in ("re-score", "replay"):
        sampler, target = _sampler()
        if name == "re-score":  # the autograd path: batched second forward + autograd
            sampler._fast = lambda: False  # type: ignore[method-assign]
        runs[name] = (sampler, target, _optimizer(sampler, ToyConfig()), [])
    for i in range(args.iterations + 10):  # interleaved, so both see the same machine load
        for name, (sampler, target, opt, times) in runs.items():
            t = _iteration(sampler, target, opt, replay=name == "replay")
            if i >= 10:
                times.append(t)
    cfg = runs["replay"][0].config
    per_state = cfg.dim * cfg.hidden + cfg.layers * cfg.hidden**2 + cfg.hidden * cfg.dim
    states = BATCH * cfg.steps
    gflop = 3 * 2 * per_state * states / 1e9  # forward + backward (~2x forward)
    rows = []
    for name, (_, _, _, times) in runs.items():
        med = [1e3 * statistics.median(col) for col in zip(*times, strict=True)]
        total = 1e3 * statistics.median([sum(t) for t in times])
        rows.append([name, f"{total:.1f}", *(f"{m:.1f}" for m in med)])
    big, small = _matmul_gflops(states), _matmul_gflops(BATCH, repeats=500)
    header = ["path", "total ms", "rollout ms", "loss ms", "backward ms", "optimizer ms"]
    text = (
        "## toy-iteration\n\n"
        f"`python -m benchmarks.toy_iteration --iterations {args.iterations}`: one plain TB "
        f"iteration, batch {BATCH}, T = {cfg.steps}, d = {cfg.dim}, hidden {cfg.hidden} × "
        f"{cfg.layers} layers ({per_state} multiply-adds per state), medians over "
        f"{args.iterations} interleaved iterations. Hardware: {hardware()}.\n\n"
        + markdown_table(header, rows)
        + f"\n\nWork: {states} state evaluations forward and backward ≈ {gflop:.2f} GFLOP. "
        f"This machine's fp32 matrix products of the same shapes: {big:.0f} GFLOP/s for "
        f"[{states}, 64] × [64, 64], {small:.0f} GFLOP/s for the rollout's [{BATCH}, 64] × "
        f"[64, 64]; the products alone therefore need ≈ "
        f"{1e3 * gflop / 3 / small + 1e3 * 2 * gflop / 3 / big:.0f} ms (forward at the small "
        "shape, which a sequential rollout cannot avoid, backward at the large one).\n"
    )
    print(text)
    write_section("toy-iteration", text)


if __name__ == "__main__":
    main()
