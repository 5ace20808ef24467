"""Benchmark: exact solvers on hypergrids, and each objective against a plain PyTorch one-liner.

Run from the repository root: ``python -m benchmarks.exact``. Writes the section "exact" of
benchmarks/README.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from benchmarks._report import hardware, markdown_table, write_section
from steer import objectives as obj
from steer.discrete import (
    HyperGrid,
    corrected_reward,
    soft_bellman,
    terminating_distribution,
)


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def solver_rows() -> list[list[object]]:
    rows = []
    for side, dim in ((8, 2), (16, 2), (32, 2), (8, 3)):
        env = HyperGrid(side, dim)
        reward = corrected_reward(env, env.log_backward("uniform"))
        policy = soft_bellman(env, reward).log_policy
        t_solve = _best_of(lambda env=env, reward=reward: soft_bellman(env, reward), 5)
        t_term = _best_of(lambda env=env, p=policy: terminating_distribution(env, p), 5)
        rows.append([f"H={side}, D={dim}", env.num_states, t_solve, t_term])
    return rows


def objective_rows(b: int = 4096, t: int = 100, repeats: int = 20) -> list[list[object]]:
    """Each objective in steer.objectives vs the same formula written inline, [B, T] float32."""
    g = torch.Generator().manual_seed(0)
    pf, pb = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    r, z = torch.randn(b, generator=g), torch.tensor(0.3)
    f, f2 = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    rr, rr2 = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    flows = torch.randn(b, 17, generator=g)
    pf16, pb16 = pf[:, :16].contiguous(), pb[:, :16].contiguous()

    def plain_subtb() -> torch.Tensor:
        a = flows - torch.nn.functional.pad((pf16 - pb16).cumsum(1), (1, 0))
        d = a.unsqueeze(2) - a.unsqueeze(1)
        s = torch.arange(17)
        span = s.view(1, -1) - s.view(-1, 1)
        w = torch.where(span > 0, 0.9 ** (span.clamp(min=1) - 1.0), 0.0)
        return (w * d.square()).sum((1, 2)) / w.sum()

    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        (
            "trajectory_balance",
            lambda: obj.trajectory_balance(pf, pb, r, z),
            lambda: z + pf.sum(1) - r - pb.sum(1),
        ),
        (
            "vargrad",
            lambda: obj.vargrad(pf, pb, r),
            lambda: (lambda w: w.mean() - w)(r + pb.sum(1) - pf.sum(1)),
        ),
        (
            "relative_trajectory_balance",
            lambda: obj.relative_trajectory_balance(pf, pb, r, z),
            lambda: z + pf.sum(1) - r - pb.sum(1),
        ),
        (
            "relative_vargrad",
            lambda: obj.relative_vargrad(pf, pb, r),
            lambda: (lambda w: w.mean() - w)(r + pb.sum(1) - pf.sum(1)),
        ),
        ("detailed_balance", lambda: obj.detailed_balance(f, pf, f2, pb), lambda: f + pf - f2 - pb),
        (
            "energy_difference_detailed_balance",
            lambda: obj.energy_difference_detailed_balance(f, pf, f2, pb, rr, rr2),
            lambda: (f + rr) + pf - (f2 + rr2) - pb,
        ),
        (
            "modified_detailed_balance",
            lambda: obj.modified_detailed_balance(rr, pf, rr2, pb, f, f2),
            lambda: (-f + rr) + pf - (-f2 + rr2) - pb,
        ),
        (
            "subtrajectory_balance (T=16)",
            lambda: obj.subtrajectory_balance(flows, pf16, pb16, 0.9),
            plain_subtb,
        ),
    ]
    rows = []
    for name, ours, plain in cases:
        t_ours, t_plain = _best_of(ours, repeats), _best_of(plain, repeats)
        rows.append([name, t_ours, t_plain, t_ours / t_plain])
    return rows


def main() -> None:
    solver = markdown_table(
        ["grid", "states", "soft Bellman (ms)", "terminating distribution (ms)"], solver_rows()
    )
    objective = markdown_table(
        ["objective, [B, T] = [4096, 100] float32", "steer (ms)", "plain torch (ms)", "ratio"],
        objective_rows(),
    )
    text = (
        "## exact: solvers and objectives\n\n"
        f"Measured on {hardware()}. Command: `python -m benchmarks.exact`. Medians of 5 "
        "(solvers) or 20 (objectives) calls after a warm-up; timings are noisy while other "
        "jobs share the CPUs. Ratio target for objectives: ≤ 1.1× the inline formula (the "
        "steer functions add input checks: shape tests and a finiteness scan of log R).\n\n"
        f"{solver}\n\n{objective}\n"
    )
    print(text)
    write_section("exact", text)


if __name__ == "__main__":
    main()
