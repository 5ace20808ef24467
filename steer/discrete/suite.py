"""``steer exact``: the exact checks of §4 on enumerable DAGs, printed as a table.

Exact rows solve soft Bellman in closed form and compare terminating distributions (bound
1e-9); identity rows compare residuals trajectory by trajectory / transition by transition;
trained rows train a policy with each objective and measure its exact TV (bound 0.02).
The exit status is non-zero if any row fails.

Options (:class:`ExactConfig`): ``key=value`` overrides (``steer exact fast=true seed=1``), a
YAML file (``--config FILE``), or the flags ``--fast``, ``--no-mlp``, ``--seed N``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from steer import objectives as obj
from steer.config import (
    ArgumentParser,
    ConfigError,
    add_field_flags,
    check_number,
    load_structured,
    parse_overrides,
)
from steer.discrete.bayesnet import BayesNetStructure
from steer.discrete.env import DAGEnvironment
from steer.discrete.exact import (
    corrected_reward,
    energy_difference_reward,
    kl_regularised_reward,
    path_consistency_residual,
    soft_bellman,
    terminating_distribution,
    total_variation,
    uncorrected_reward,
)
from steer.discrete.hypergrid import HyperGrid
from steer.discrete.policies import trajectories_from_states
from steer.discrete.training import DAG_OBJECTIVES, DAGTrainConfig, train, uses_exact_mode

__all__ = [
    "ExactConfig",
    "Row",
    "default_environments",
    "exact_rows",
    "identity_rows",
    "main",
    "trained_rows",
]

EXACT_BOUND = 1e-9
TRAINED_BOUND = 0.02
BIAS_FLOOR = 0.05  # (4.1): the uncorrected solution must miss the target by at least this
MLP_ROWS = (("grid", "tb"), ("bn", "tb"))


@dataclass
class ExactConfig:
    """Options of ``steer exact``."""

    fast: bool = False  # exact and identity rows only (seconds): skip the trained rows
    mlp: bool = True  # with the trained rows, also train TB as an MLP (MLP_ROWS)
    seed: int = 0  # seed of P_B, priors and training

    def __post_init__(self) -> None:
        check_number("seed", self.seed, ge=0)


@dataclass
class Row:
    """One line of the table: ``measured`` must be ``≤ bound`` (or ``≥`` when ``at_least``)."""

    theorem: str
    env: str
    setting: str
    reached: str
    measured: float
    to_target: float | None
    bound: float
    at_least: bool = False

    @property
    def passed(self) -> bool:
        ok = self.measured >= self.bound if self.at_least else self.measured <= self.bound
        return bool(ok)


def default_environments(seed: int = 0) -> dict[str, DAGEnvironment]:
    """The two seed examples: HyperGrid(8, 2) and 4-variable structure learning."""
    return {"grid": HyperGrid(8, 2), "bn": BayesNetStructure(4, seed=seed, temperature=4.0)}


def _solve(env: DAGEnvironment, reward: torch.Tensor) -> torch.Tensor:
    return terminating_distribution(env, soft_bellman(env, reward).log_policy)


def _random_policy(env: DAGEnvironment, gen: torch.Generator) -> torch.Tensor:
    logits = torch.randn(env.valid.shape, generator=gen, dtype=torch.float64)
    return torch.log_softmax(logits.masked_fill(~env.valid, float("-inf")), dim=1)


def exact_rows(name: str, env: DAGEnvironment, seed: int = 0) -> list[Row]:
    """(4.1), (4.2) for three backward policies, and (4.4), solved exactly."""
    gen = torch.Generator().manual_seed(seed)
    target = env.target()
    rows = []
    # 1. (4.1) without correction: ∝ n(x) exp(-E), and not the target.
    p = _solve(env, uncorrected_reward(env))
    biased = torch.softmax(env.log_reward + env.log_path_counts, dim=0)
    tv_b, tv_t = total_variation(p, biased), total_variation(p, target)
    rows.append(Row("4.1", name, "no correction", "∝ n(x)·e^-E", tv_b, tv_t, EXACT_BOUND))
    rows.append(Row("4.1", name, "no correction", "misses ∝ e^-E", tv_t, tv_t, BIAS_FLOOR, True))
    # 2. (4.2) with the correction log P_B, for three P_B: exactly the target.
    for kind in ("uniform", "path_count", "random"):
        p = _solve(env, corrected_reward(env, env.log_backward(kind, generator=gen)))
        tv = total_variation(p, target)
        rows.append(Row("4.2", name, f"P_B {kind}", "∝ e^-E", tv, tv, EXACT_BOUND))
    # 3. (4.4) KL-regularised toward a random prior μ: ∝ μ^⊤(x) exp(-E).
    prior = _random_policy(env, gen)
    p = _solve(env, kl_regularised_reward(env, prior))
    mu_top = terminating_distribution(env, prior)
    tilted = torch.softmax(mu_top.log() + env.log_reward, dim=0)
    tv_m = total_variation(p, tilted)
    tv_t = total_variation(p, target)
    rows.append(Row("4.4", name, "KL to random μ", "∝ μ^⊤(x)·e^-E", tv_m, tv_t, EXACT_BOUND))
    return rows


def identity_rows(name: str, env: DAGEnvironment, seed: int = 0) -> list[Row]:
    """(4.3): PCL on the corrected reward = TB on every trajectory; soft Q-learning with the
    energy-difference reward (4.5) and ``Q(s, ⊤) = 0`` = modified DB on every move."""
    gen = torch.Generator().manual_seed(seed)
    log_pb = env.log_backward("random", generator=gen)  # [N, K]
    # 1. Random soft Q-values; π = softmax Q, V = logsumexp Q.
    q = torch.randn(env.valid.shape, generator=gen, dtype=torch.float64)
    q = q.masked_fill(~env.valid, float("-inf"))
    v = torch.logsumexp(q, dim=1)
    log_pi = q - v.unsqueeze(1)  # [N, K+1]
    # 2. PCL residual vs TB residual on every trajectory.
    traj = trajectories_from_states(env, env.all_trajectories(), log_pi, log_pb)
    reward = corrected_reward(env, log_pb)
    src, acts, real = traj.latents[:, :-1], traj.extras["actions"], traj.extras["real"]
    rewards = torch.where(real, reward[src, acts], 0.0)  # [P, T]
    pcl = path_consistency_residual(v[0], traj.log_pf, rewards)
    log_r = env.log_reward[traj.extras["final"]]
    tb = obj.trajectory_balance(traj.log_pf, traj.log_pb, log_r, v[0])
    gap = float((pcl - tb).abs().max())
    n = f"{traj.batch_size} trajectories"
    rows = [Row("4.3", name, f"PCL = TB, {n}", "max abs(δ_PCL - δ_TB)", gap, None, EXACT_BOUND)]
    # 3. Soft-Q residual Q(s,a) - r(s,a) - V(s') with Q(s,⊤) = 0 vs modified DB, every move.
    q0 = torch.cat([q[:, :-1], torch.zeros(env.num_states, 1, dtype=q.dtype)], dim=1)
    v0 = torch.logsumexp(q0, dim=1)
    src, act, dst = env.edges
    r_ed = energy_difference_reward(env, log_pb)
    soft_q = q0[src, act] - r_ed[src, act] - v0[dst]
    lp = q0 - v0.unsqueeze(1)  # log π with π(⊤|s) = exp(-V(s))
    mdb = obj.modified_detailed_balance(
        env.log_reward[src], lp[src, act], env.log_reward[dst], log_pb[src, act], -v0[src], -v0[dst]
    )
    gap = float((soft_q - mdb).abs().max())
    setting = f"soft-Q (4.5) = mod. DB, {src.shape[0]} moves"
    rows.append(Row("4.3", name, setting, "max abs(δ_Q - δ_mDB)", gap, None, EXACT_BOUND))
    return rows


def trained_rows(name: str, env: DAGEnvironment, seed: int = 0, mlp: bool = True) -> list[Row]:
    """Train every objective (tabular; TB also as an MLP) and measure the exact TV."""
    runs = [(o, "tabular") for o in DAG_OBJECTIVES]
    runs += [(o, "mlp") for env_name, o in MLP_ROWS if env_name == name and mlp]
    rows = []
    for objective, kind in runs:
        start = time.perf_counter()
        config = DAGTrainConfig.for_objective(objective, kind, seed=seed)
        result = train(env, objective, kind, config)
        seconds = time.perf_counter() - start
        mode = "exact" if uses_exact_mode(objective, config.mode) else "sampled"
        setting = f"{objective}, {kind}, {config.steps} steps {mode} ({seconds:.1f}s)"
        rows.append(Row("trained", name, setting, "∝ e^-E", result.tv, result.tv, TRAINED_BOUND))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table of ``rows``."""
    head = (
        "| theorem | env | setting | distribution reached | measured | TV to ∝e^-E | bound | pass |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        bound = f"{'≥' if r.at_least else '≤'} {r.bound:g}"
        target = "—" if r.to_target is None else f"{r.to_target:.3g}"
        status = "PASS" if r.passed else "FAIL"
        lines.append(
            f"| {r.theorem} | {r.env} | {r.setting} | {r.reached} | {r.measured:.3g} | "
            f"{target} | {bound} | {status} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="steer exact",
        description=__doc__.splitlines()[0],
        epilog="Overrides: key=value words (fast=true mlp=false seed=1), applied after --config "
        "and the flags.",
    )
    parser.add_argument("--config", default=None, help="a YAML file of ExactConfig fields")
    helps = {
        "fast": "skip the trained rows",
        "mlp": "the MLP trained rows (--no-mlp skips them)",
        "seed": "seed of P_B, priors and training",
    }
    add_field_flags(parser, ExactConfig, helps)
    return parser


def load_exact_config(argv: Sequence[str]) -> ExactConfig:
    """The :class:`ExactConfig` of a ``steer exact`` command line (raises ``ConfigError``)."""
    args, overrides = parse_overrides(_parser(), argv, ExactConfig)
    return load_structured(ExactConfig, args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """``steer exact [--fast] [--no-mlp] [--seed N] [key=value ...]``: print the table; exit 1
    if any row fails, 2 on a bad option."""
    try:
        cfg = load_exact_config(list(sys.argv[1:] if argv is None else argv))
    except (ConfigError, FileNotFoundError) as err:
        _parser().exit(2, f"steer exact: error: {err}\n")
    print("config: " + " ".join(f"{k}={str(v).lower()}" for k, v in asdict(cfg).items()))
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    envs = default_environments(cfg.seed)
    rows: list[Row] = []
    for name, env in envs.items():
        rows += exact_rows(name, env, cfg.seed) + identity_rows(name, env, cfg.seed)
    if not cfg.fast:
        for name, env in envs.items():
            rows += trained_rows(name, env, cfg.seed, mlp=cfg.mlp)
    print("environments: " + ", ".join(f"{k} = {v!r}" for k, v in envs.items()))
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} rows pass")
    return 1 if failed else 0
