"""``steer toy train`` and ``steer toy eval``: diffusion samplers of unnormalised densities."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from steer.toy.metrics import evaluate_sampler
from steer.toy.plots import plot_history, plot_samples
from steer.toy.registry import TARGETS, get_target
from steer.toy.sampler import DiffusionSampler, SamplerConfig
from steer.toy.targets import Target
from steer.toy.train import OBJECTIVES, TrainConfig, train

__all__ = ["main", "save_run", "load_run"]


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a sampler and write metrics, samples and figures")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--dim", type=int, default=None, help="dimension of a module:function energy")
    p.add_argument("--no-progress", action="store_true")
    helps = {
        "target": f"{', '.join(TARGETS)} or module:function",
        "objective": ", ".join(OBJECTIVES),
    }
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], float)
            p.add_argument(flag, type=kind, default=f.default, help=helps.get(f.name))


def save_run(
    out: Path, cfg: TrainConfig, sampler: DiffusionSampler, target: Target, dim: int | None
) -> None:
    """Weights (safetensors) and the JSON config that rebuilds sampler and target."""
    out.mkdir(parents=True, exist_ok=True)
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
    config = {"train": dataclasses.asdict(cfg), "sampler": sampler.config.to_dict(), "dim": dim}
    if prior is not None:
        config["prior_sampler"] = prior.config.to_dict()
    (out / "config.json").write_text(json.dumps(config, indent=2))


def load_run(run: Path) -> tuple[TrainConfig, DiffusionSampler, Target]:
    """Rebuild the config, the trained sampler and its target from a ``train`` directory."""
    if not (run / "config.json").exists():
        raise ValueError(f"{run} has no config.json: is it a `steer toy train --out` directory?")
    config = json.loads((run / "config.json").read_text())
    cfg = TrainConfig(**config["train"])
    prior = None
    if (run / "prior.safetensors").exists():
        prior = DiffusionSampler(SamplerConfig(**config.get("prior_sampler", config["sampler"])))
        prior.load_state_dict(load_file(str(run / "prior.safetensors")))
        prior.requires_grad_(False)
    target = get_target(cfg.target, dim=config.get("dim"), prior=prior)
    scfg = SamplerConfig(**config["sampler"])
    sampler = DiffusionSampler(scfg, score=target.score if scfg.langevin else None)
    sampler.load_state_dict(load_file(str(run / "sampler.safetensors")))
    return cfg, sampler, target


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if v is None else v) for k, v in metrics.items()}


def _run_train(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    t0 = time.perf_counter()
    target = get_target(
        cfg.target,
        dim=args.dim,
        prior_iterations=cfg.prior_iterations,
        prior_config=cfg.prior_config() if cfg.target == "posterior9" else None,
    )
    prior = getattr(target, "prior", None)
    rtb = cfg.objective == "rtb" and prior is not None
    scfg = prior.config if rtb else cfg.sampler_config(target)  # RTB fine-tunes the prior
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
    save_run(args.out, cfg, result.sampler, target, args.dim)
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="steer toy", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    _train_parser(sub)
    e = sub.add_parser("eval", help="recompute the metrics of a saved sampler")
    e.add_argument("run", type=Path, help="a `steer toy train --out` directory")
    e.add_argument("--samples", type=int, default=None, help="K (default: the run's)")
    e.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        return _run_train(args) if args.action == "train" else _run_eval(args)
    except ValueError as err:
        parser.error(str(err))
    return 2
