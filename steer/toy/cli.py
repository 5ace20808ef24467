"""``steer toy train`` and ``steer toy eval``: diffusion samplers of unnormalised densities.

``steer toy train --out DIR [--config FILE.yaml] [key=value ...]``: the options are the fields
of :class:`~steer.toy.train.ToyConfig`, from their defaults ← the YAML file ← the overrides
(``--field-name value`` flags work too, and ``key=value`` words win over them). The resolved
configuration is printed and saved as ``DIR/config.yaml``, which ``steer toy eval DIR`` reads
(runs saved before as ``config.json`` still load).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from steer.config import add_field_flags, load_structured, parse_overrides, save_yaml, to_yaml
from steer.toy.metrics import evaluate_sampler
from steer.toy.plots import plot_history, plot_samples
from steer.toy.registry import TARGETS, get_target
from steer.toy.sampler import DiffusionSampler
from steer.toy.targets import Target
from steer.toy.train import TOY_OBJECTIVES, ToyConfig, ToyRunConfig, train

__all__ = ["load_run", "main", "parse_train_args", "read_run_config", "save_run"]

RUN_CONFIG = "config.yaml"
LEGACY_RUN_CONFIG = "config.json"  # runs saved before config.yaml


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="steer toy train",
        description="Train a sampler and write metrics, samples, figures, weights and "
        f"{RUN_CONFIG}.",
        epilog="Overrides: key=value words, e.g. `iterations=200 objective=vargrad sigma=null`, "
        "applied after --config and after the --field-name flags.",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--config", type=Path, default=None, help="a YAML file of ToyConfig fields")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    helps = {
        "target": f"{', '.join(TARGETS)} or module:function",
        "objective": ", ".join(TOY_OBJECTIVES),
        "dim": "dimension of a module:function energy",
    }
    add_field_flags(p, ToyConfig, helps)
    return p


def _eval_parser() -> argparse.ArgumentParser:
    e = argparse.ArgumentParser(
        prog="steer toy eval", description="Recompute the metrics of a saved sampler."
    )
    e.add_argument("run", type=Path, help="a `steer toy train --out` directory")
    e.add_argument("--samples", type=int, default=None, help="K (default: the run's)")
    e.add_argument("--seed", type=int, default=1)
    return e


def save_run(
    out: Path,
    cfg: ToyConfig,
    sampler: DiffusionSampler,
    target: Target,
    dim: int | None = None,
) -> ToyRunConfig:
    """Weights (safetensors) and the ``config.yaml`` that rebuilds sampler and target (``dim``,
    when given, is that of a ``module:function`` energy: it replaces ``cfg.dim``)."""
    out.mkdir(parents=True, exist_ok=True)
    if dim is not None and dim != cfg.dim:
        cfg = replace(cfg, dim=dim)
    save_file(
        {k: v.contiguous() for k, v in sampler.state_dict().items()},
        str(out / "sampler.safetensors"),
    )
    prior = getattr(target, "prior", None)
    if prior is not None:
        save_file(
            {k: v.contiguous() for k, v in prior.state_dict().items()},
            str(out / "prior.safetensors"),
        )
    run = ToyRunConfig(cfg, sampler.config, prior.config if prior is not None else None)
    save_yaml(run, out / RUN_CONFIG)
    return run


def read_run_config(run: Path) -> ToyRunConfig:
    """The :class:`ToyRunConfig` of a ``train`` directory, from its ``config.yaml`` (or the
    ``config.json`` of runs saved before it)."""
    if (run / RUN_CONFIG).exists():
        return load_structured(ToyRunConfig, run / RUN_CONFIG)
    if (run / LEGACY_RUN_CONFIG).exists():
        saved = json.loads((run / LEGACY_RUN_CONFIG).read_text())
        data = {
            "train": {**saved["train"], "dim": saved.get("dim")},
            "sampler": saved["sampler"],
            "prior_sampler": saved.get("prior_sampler"),
        }
        return load_structured(ToyRunConfig, data=data)
    raise ValueError(f"{run} has no {RUN_CONFIG}: is it a `steer toy train --out` directory?")


def load_run(run: Path) -> tuple[ToyConfig, DiffusionSampler, Target]:
    """Rebuild the config, the trained sampler and its target from a ``train`` directory."""
    saved = read_run_config(run)
    cfg, scfg = saved.train, saved.sampler
    prior = None
    if (run / "prior.safetensors").exists():
        prior = DiffusionSampler(saved.prior_sampler or scfg)
        prior.load_state_dict(load_file(str(run / "prior.safetensors")))
        prior.requires_grad_(False)
    target = get_target(cfg.target, dim=cfg.dim, prior=prior)
    sampler = DiffusionSampler(scfg, score=target.score if scfg.langevin else None)
    sampler.load_state_dict(load_file(str(run / "sampler.safetensors")))
    return cfg, sampler, target


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if v is None else v) for k, v in metrics.items()}


def parse_train_args(argv: Sequence[str]) -> tuple[argparse.Namespace, ToyConfig]:
    """The options (``out``, ``no_progress``, ``config``) and the :class:`ToyConfig` of a
    ``steer toy train`` command line (raises ``ConfigError`` on a bad key or value)."""
    args, overrides = parse_overrides(_train_parser(), argv, ToyConfig)
    return args, load_structured(ToyConfig, args.config, overrides)


def _run_train(args: argparse.Namespace, cfg: ToyConfig) -> int:
    t0 = time.perf_counter()
    target = get_target(
        cfg.target,
        dim=cfg.dim,
        prior_iterations=cfg.prior_iterations,
        prior_config=cfg.prior_config() if cfg.target == "posterior9" else None,
    )
    prior = getattr(target, "prior", None)
    rtb = cfg.objective == "rtb" and prior is not None
    scfg = prior.config if rtb else cfg.sampler_config(target)  # RTB fine-tunes the prior
    resolved = ToyRunConfig(cfg, scfg, prior.config if prior is not None else None)
    print(f"resolved config (saved as {args.out / RUN_CONFIG}):\n{to_yaml(resolved)}", end="")
    n_params = sum(p.numel() for p in DiffusionSampler(scfg, score=target.score).parameters())
    if rtb:
        print("rtb: the sampler is a copy of the prior (its SDE and network, no Langevin drift)")
    print(
        f"target {target.name} (d={target.dim}, log Z={target.log_z}), objective "
        f"{cfg.objective}, T={cfg.steps}, sigma={scfg.sigma:.4g}, batch {cfg.batch}, "
        f"{n_params} parameters, trajectories per step {cfg.batch}, states per step "
        f"{cfg.batch * cfg.steps}"
    )
    result = train(cfg, target, progress=not args.no_progress)
    save_run(args.out, cfg, result.sampler, target)
    metrics, samples = evaluate_sampler(
        result.sampler,
        target,
        cfg.eval_samples,
        generator=torch.Generator().manual_seed(cfg.seed + 1),
    )
    metrics.update(
        wall_time_s=time.perf_counter() - t0,
        iterations=result.iterations,
        train_time_s=result.wall_time_s,
        seconds_per_iteration=result.seconds_per_iteration,
    )
    (args.out / "metrics.json").write_text(json.dumps(_json_metrics(metrics), indent=2))
    (args.out / "history.json").write_text(json.dumps(result.history, indent=2))
    np.save(args.out / "samples.npy", samples.numpy())
    plot_samples(
        target, samples.numpy(), args.out / "samples.png", f"{target.name} / {cfg.objective}"
    )
    if result.history:
        plot_history(result.history, args.out / "metrics.png", target.log_z)
    print(json.dumps(_json_metrics(metrics), indent=2))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    cfg, sampler, target = load_run(args.run)
    k = args.samples or cfg.eval_samples
    metrics, _ = evaluate_sampler(
        sampler, target, k, generator=torch.Generator().manual_seed(args.seed)
    )
    (args.run / "eval_metrics.json").write_text(json.dumps(_json_metrics(metrics), indent=2))
    print(json.dumps(_json_metrics(metrics), indent=2))
    return 0


def main(argv: Sequence[str]) -> int:
    """``steer toy train ...`` / ``steer toy eval RUN``; a bad option or value prints one line
    and exits with status 2."""
    argv = list(argv)
    parser = argparse.ArgumentParser(prog="steer toy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("train", help="train a sampler and write metrics, samples and figures")
    sub.add_parser("eval", help="recompute the metrics of a saved sampler")
    if not argv or argv[0] not in ("train", "eval"):
        parser.parse_args(argv)  # help, or the list of actions
        return 2
    action, rest = argv[0], argv[1:]
    own = _train_parser() if action == "train" else _eval_parser()
    try:
        if action == "eval":
            return _run_eval(own.parse_args(rest))
        return _run_train(*parse_train_args(rest))
    except (ValueError, FileNotFoundError) as err:  # steer.config.ConfigError is a ValueError
        own.exit(2, f"{own.prog}: error: {err}\n")
    return 2
