"""What a run writes: its folder and config, evaluation grids, the final weights and curves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from steer.diffusion import family_of
from steer.images import diversity, save_grid
from steer.train.config import FinetuneConfig

if TYPE_CHECKING:
    from steer.train.run import Run


def start_run(cfg: FinetuneConfig, acc: Accelerator) -> Path:
    """The run folder ``output_dir/run_name``: a new one when the name is taken (never overwrite
    a run), or the existing one when resuming. Writes and prints the resolved config."""
    root = Path(cfg.log.output_dir)
    name = [cfg.log.run_name or f"{cfg.objective.name}-{cfg.reward.name}"]
    if acc.is_main_process and not cfg.log.resume_from_checkpoint:
        base, n = name[0], 1
        while (root / name[0] / "config.yaml").exists():
            name[0] = f"{base}-{n}"
            n += 1
    name = broadcast_object_list(name) if acc.num_processes > 1 else name
    out = root / name[0]
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "config.yaml").exists():
            (out / "config.yaml").write_text(cfg.to_yaml())
        acc.print(f"resolved config:\n{cfg.to_yaml()}")
    acc.wait_for_everyone()
    if cfg.log.tracker != "none":
        acc.project_configuration.project_dir = str(out)
        acc.project_configuration.logging_dir = str(out / "logs")
        acc.init_trackers(re.sub(r"[^\w.-]", "_", name[0]), config=_flat_scalars(cfg.to_dict()))
    return out


def _flat_scalars(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[prefix + k] = v
    return out


def evaluate(run: Run, tag: str) -> dict[str, float]:
    """Sample the evaluation set with a fixed seed; log reward and diversity; save a grid."""
    from steer.diffusion import rollout
    from steer.train.sampling import decode_in_chunks, score

    cfg, parts, acc = run.cfg, run.parts, run.accelerator
    n = cfg.log.num_eval_samples
    gen = torch.Generator().manual_seed(10_000 + cfg.train.seed)
    prompts = cfg.prompts.eval_prompts or (parts.cond.prompts or None)
    embeds = None
    if prompts:
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        idx = torch.tensor(
            [parts.cond.prompts.index(p) if p in parts.cond.prompts else 0 for p in prompts]
        )
        embeds = parts.cond.embeds[idx].to(acc.device)
    with torch.no_grad(), acc.autocast():
        traj = rollout(
            parts.policy,
            batch_size=None if embeds is not None else n,
            cond=embeds,
            num_inference_steps=cfg.model.num_inference_steps,
            eta=cfg.model.eta,
            generator=gen,
            keep_pred_x0=False,
        )
        chunk = cfg.model.decode_batch_size or cfg.train.batch_size
        images = decode_in_chunks(parts.decode, traj.x0, chunk)
        rewards = score(parts.reward, images, prompts)
    result = {"eval/reward": float(rewards.mean()), "eval/diversity": diversity(images)}
    if acc.is_main_process:
        save_grid(images, run.out / "eval" / f"{tag}.png")
        if cfg.log.tracker != "none":
            acc.log(result, step=run.state.step)
    return result


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Reward, log Z (when learned) and loss over optimiser steps, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("reward", "log_z", "loss") if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, key in zip(axes[0], keys, strict=True):
        ax.plot(steps, [h.get(key, float("nan")) for h in history])
        ax.set_title(key)
        ax.set_xlabel("optimiser step")
        if key == "loss" and all(h.get(key, 0) > 0 for h in history):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def process_report(run: Run) -> dict:
    """Per-process facts, gathered: world size, a checksum of each rank's trainable weights
    (equal when the ranks stay in sync) and of its first rollout noise (different per rank)."""
    acc = run.accelerator
    weights = torch.stack([p.detach().double().sum() for p in run.params]).sum()
    first = torch.tensor(float(run.first_noise_checksum), dtype=torch.float64)
    both = acc.gather(torch.stack([weights, first]).to(acc.device)[None]).cpu()  # [world, 2]
    return {
        "world_size": acc.num_processes,
        "weights_checksum": both[:, 0].tolist(),
        "first_noise_checksum": both[:, 1].tolist(),
    }


def save_final(run: Run, wall_time: float) -> None:
    """LoRA weights loadable by diffusers (or the full UNet), log Z and flow, curves, summary."""
    acc, parts, out = run.accelerator, run.parts, run.out
    processes = process_report(run)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    (out / "processes.json").write_text(json.dumps(processes, indent=2))
    unet = acc.unwrap_model(parts.policy.unet)
    if parts.lora:  # diffusers' own LoRA format: pipe.load_lora_weights(out / "lora")
        parts.pipeline.save_lora_weights(out / "lora")
    else:
        unet.save_pretrained(out / family_of(unet).component)  # unet/ or transformer/
        parts.policy.scheduler.save_pretrained(out / "scheduler")
    for name in ("log_z", "flow"):
        module = getattr(run.objective, name)
        if module is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                str(out / f"{name}.safetensors"),
            )
    if run.state.history:
        plot_curves(run.state.history, out / "curves.png")
    summary = {
        "steps": run.state.step,
        "skipped_batches": run.skipped,
        "wall_time_s": wall_time,
        "last": run.state.history[-1] if run.state.history else {},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    acc.print(f"outputs written to {out}")
