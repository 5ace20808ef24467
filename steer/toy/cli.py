"""``steer toy train`` and ``steer toy eval``: diffusion samplers of unnormalised densities.

``steer toy train [--out DIR] [--config FILE.yaml] [key=value ...]``: the options are the
fields of :class:`~steer.toy.train.ToyConfig`, from their defaults ← the YAML file ← the
overrides (``--field-name value`` flags work too, and ``key=value`` words win over them). The
resolved configuration is printed and saved as ``DIR/config.yaml`` (default DIR:
``runs/toy/<target>-<objective>-<timestamp>``), which ``steer toy eval DIR`` reads (runs saved
before as ``config.json`` still load). Bad input (options, config, target, a run folder to
evaluate) prints one line and exits with status 2; an error of the training keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from steer.config import (
    ArgumentParser,
    add_field_flags,
    exit_on_input_error,
    input_phase,
    load_structured,
    parse_overrides,
    save_yaml,
    to_yaml,
)
from steer.toy.checkpoint import resolve as resolve_checkpoint
from steer.toy.metrics import evaluate_sampler
from steer.toy.plots import plot_history, plot_samples
from steer.toy.registry import TARGETS, get_target
from steer.toy.sampler import DiffusionSampler
from steer.toy.targets import Target
from steer.toy.train import TOY_OBJECTIVES, ToyConfig, ToyRunConfig, train

__all__ = ["load_run", "main", "parse_train_args", "read_run_config", "save_run"]

RUN_CONFIG = "config.yaml"
LEGACY_RUN_CONFIG = "config.json"  # runs saved before config.yaml
RUNS_DIR = Path("runs/toy")  # the default --out is RUNS_DIR/<target>-<objective>-<timestamp>


def default_out(cfg: ToyConfig) -> Path:
    """``runs/toy/<target>-<objective>-<YYYYmmdd-HHMMSS>`` (a ``module:function`` target's name
    with ``_`` for characters a folder name should not hold)."""
    target = re.sub(r"[^\w.-]", "_", cfg.target)
    return RUNS_DIR / f"{target}-{cfg.objective}-{time.strftime('%Y%m%d-%H%M%S')}"


def _train_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="steer toy train",
        description="Train a sampler and write metrics, samples, figures, weights and "
        f"{RUN_CONFIG}.",
        epilog="Overrides: key=value words, e.g. `iterations=200 objective=vargrad sigma=null`, "
        "applied after --config and after the --field-name flags.",
    )
    p.add_argument(
        "--out", type=Path, default=None,
        help=f"output directory (default: {RUNS_DIR}/<target>-<objective>-<timestamp>)",
    )  # fmt: skip
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
    e = ArgumentParser(
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
        _load_weights(prior, run / "prior.safetensors")
        prior.requires_grad_(False)
    target = get_target(cfg.target, dim=cfg.dim, prior=prior)
    sampler = DiffusionSampler(scfg, score=target.score if scfg.langevin else None)
    _load_weights(sampler, run / "sampler.safetensors")
    return cfg, sampler, target


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    """``module``'s weights from ``path``; a missing, unreadable (truncated) or mismatched file
    raises naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run folder holds no trained weights")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (an Exception)
        raise ValueError(
            f"{path} cannot be read ({err}): truncated or not a safetensors file; train the run "
            "again"
        ) from err
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ValueError(f"{path} does not fit the sampler of {RUN_CONFIG}: {first}") from err


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if v is None else v) for k, v in metrics.items()}


def parse_train_args(argv: Sequence[str]) -> tuple[argparse.Namespace, ToyConfig]:
    """The options (``out``, ``no_progress``, ``config``) and the :class:`ToyConfig` of a
    ``steer toy train`` command line (raises ``ConfigError`` on a bad key or value); ``out``
    is :func:`default_out` when not given."""
    args, overrides = parse_overrides(_train_parser(), argv, ToyConfig)
    cfg = load_structured(ToyConfig, args.config, overrides)
    if args.out is None:
        args.out = default_out(cfg)
    return args, cfg


def _run_train(args: argparse.Namespace, cfg: ToyConfig) -> int:
    t0 = time.perf_counter()
    with input_phase():  # the target (a module:function that does not import is bad input)
        if cfg.objective == "rtb" and cfg.target != "posterior9":
            raise ValueError(
                f"objective rtb needs a prior: use target posterior9 (got {cfg.target!r})"
            )
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
    if cfg.resume:
        with input_phase():  # no complete checkpoint, or one of another config: bad input
            resolve_checkpoint(args.out, asdict(cfg))
    result = train(cfg, target, progress=not args.no_progress, checkpoint_dir=args.out)
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
    with input_phase():
        if args.samples is not None and args.samples < 2:
            raise ValueError(
                f"--samples must be >= 2 (or left out for the run's), got {args.samples}"
            )
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
    parser = ArgumentParser(prog="steer toy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("train", help="train a sampler and write metrics, samples and figures")
    sub.add_parser("eval", help="recompute the metrics of a saved sampler")
    if not argv or argv[0] not in ("train", "eval"):
        parser.parse_args(argv)  # help, or the list of actions
        return 2
    action, rest = argv[0], argv[1:]
    own = _train_parser() if action == "train" else _eval_parser()

    def run() -> int:
        if action == "eval":
            return _run_eval(own.parse_args(rest))
        with input_phase():
            parsed = parse_train_args(rest)
        return _run_train(*parsed)

    return exit_on_input_error(own.prog, run)
