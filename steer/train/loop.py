"""The fine-tuning loop: sample → reward → objective → update, on 1 CPU process or N GPUs.

Gradients are taken step by step (one UNet graph in memory at a time, see ``losses``), so the
UNet is not wrapped in DistributedDataParallel, whose one-forward-one-backward contract this does
not fit: the trainable gradients (LoRA adapters, log Z, the flow network: small) are averaged
over processes in one all-reduce per optimiser step instead.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from steer.diffusion.schedule import gaussian_log_prob
from steer.train.checkpoint import TrainState, resolve_resume, save_checkpoint
from steer.train.config import Config
from steer.train.losses import RolloutBatch, StepTerms, TrainObjective, choose_steps
from steer.train.models import Components, build_components, build_objective_modules
from steer.train.outputs import evaluate, save_final, start_run
from steer.train.replay import ReplayBuffer, concat_batches, rescore, to_device
from steer.train.sampling import NonFiniteError, sample_batch


@dataclass
class Run:
    """Everything the loop holds for one run."""

    cfg: Config
    accelerator: Accelerator
    parts: Components
    objective: TrainObjective
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    state: TrainState
    out: Path
    skipped: int = 0
    buffer: ReplayBuffer | None = None
    first_noise_checksum: float = float("nan")
    stop_signal: list[int] = field(default_factory=list)


def train_on_batch(run: Run, batch: RolloutBatch) -> dict[str, float]:
    """Back-propagate one rollout batch: the direct loss (log Z, flow), then each trained step."""
    acc, policy, traj = run.accelerator, run.parts.policy, batch.traj
    direct, metrics = run.objective.prepare(batch)
    if not bool(torch.isfinite(direct)):
        raise NonFiniteError("loss", list(range(traj.batch_size)), batch.extras.get("prompts"))
    if direct.requires_grad:
        acc.backward(direct)
    steps = choose_steps(traj.num_steps, run.cfg.objective.train_fraction, run.state.generator)
    embeds = None if batch.prompt_index is None else run.parts.cond.embeds[batch.prompt_index]
    needs_mean = run.objective.name == "dpok"
    step_total = 0.0
    for k in steps:
        x_t, x_next = traj.latents[:, k], traj.latents[:, k + 1]
        with acc.autocast():
            if needs_mean:  # the step's Gaussian with grad, and the prior's mean without
                zero = torch.zeros_like(x_t)
                out = policy.step(x_t, k, embeds, noise=zero)
                with torch.no_grad():
                    prior_mean = run.parts.prior.step(x_t, k, embeds, noise=zero).mean
                std = out.std.view(-1, *([1] * (x_t.ndim - 1)))
                log_prob = gaussian_log_prob(x_next.to(out.mean.dtype), out.mean, std)
                terms = StepTerms(log_prob, out.mean, out.std, prior_mean)
            else:
                terms = StepTerms(policy.log_prob(x_t, x_next, k, embeds))
            loss = run.objective.step_loss(batch, k, terms, len(steps))
        acc.backward(loss)
        step_total += float(loss.detach())
    metrics.setdefault("loss", step_total)  # the baselines' loss is the sum of their step losses
    return metrics


def sample(run: Run, generator: torch.Generator | None = None) -> RolloutBatch:
    """One fresh rollout batch of this process: ``sample_batch`` with the run's parts."""
    p, acc = run.parts, run.accelerator
    gen = run.state.generator if generator is None else generator
    return sample_batch(
        run.cfg, p.policy, p.prior, p.reward, p.decode, p.cond, gen, acc.gather, acc.process_index
    )


def with_replay(run: Run, fresh: RolloutBatch) -> RolloutBatch:
    """Add ``train.replay_per_batch`` buffer trajectories, re-scored under the current weights,
    to a fresh batch; then store the fresh one."""
    n, buffer = run.cfg.train.replay_per_batch, run.buffer
    if buffer is None:
        return fresh
    batch = fresh
    if n and len(buffer) >= n:
        old = to_device(buffer.sample(n, run.state.generator), fresh.log_reward.device)
        embeds = None if old.prompt_index is None else run.parts.cond.embeds[old.prompt_index]
        batch = concat_batches([fresh, rescore(old, run.parts.policy, embeds)])
    buffer.add(fresh)
    return batch


def sync_and_step(run: Run) -> float:
    """Average gradients over processes (one all-reduce), clip, step; returns the grad norm."""
    acc = run.accelerator
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
    if acc.num_processes > 1:
        flat = acc.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for p, g in zip(run.params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p).clone()
    norm = acc.clip_grad_norm_(run.params, run.cfg.train.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(norm)


def _handle_nonfinite(run: Run, err: NonFiniteError) -> None:
    if run.cfg.train.on_nonfinite == "skip":
        run.skipped += 1
        run.optimizer.zero_grad(set_to_none=True)
        return
    path = save_checkpoint(
        run.accelerator,
        run.out,
        run.state.step,
        run.cfg.to_dict(),
        run.cfg.log.checkpoints_total_limit,
    )
    raise RuntimeError(
        f"stopped at step {run.state.step}: {err} (term: {err.term}); saved {path}. Set "
        "train.on_nonfinite=skip to skip and count such batches instead"
    ) from err


def _install_signal_handlers(run: Run) -> None:
    def handler(signum, _frame):
        run.stop_signal.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave the default behaviour
            pass


def setup(cfg: Config) -> Run:
    """Build the accelerator, the models, the objective, the optimiser; resume if asked."""
    acc = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if cfg.log.tracker == "none" else cfg.log.tracker,
        project_dir=cfg.log.output_dir,  # the run folder is set once known (start_run)
    )
    set_seed(cfg.train.seed, device_specific=True)  # ranks draw different prompts and noise
    out = start_run(cfg, acc)
    parts = build_components(cfg, acc.device)
    log_z, flow = build_objective_modules(cfg, parts, acc.device)
    objective = TrainObjective(cfg.objective, log_z=log_z, flow=flow)
    groups = [
        {
            "params": [p for p in parts.policy.unet.parameters() if p.requires_grad],
            "lr": cfg.train.lr,
        }
    ]
    if log_z is not None:
        groups.append({"params": list(log_z.parameters()), "lr": cfg.objective.log_z_lr})
    if flow is not None:
        groups.append({"params": list(flow.parameters()), "lr": cfg.objective.flow_lr})
    optimizer = acc.prepare(torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay))
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + acc.process_index)
    modules = {"unet": parts.policy.unet, "log_z": log_z, "flow": flow}
    state = TrainState({k: m for k, m in modules.items() if m is not None}, generator)
    acc.register_for_checkpointing(state)
    params = [p for g in groups for p in g["params"]]
    run = Run(cfg, acc, parts, objective, params, optimizer, state, out)
    if cfg.train.replay_buffer:
        run.buffer = ReplayBuffer(cfg.train.replay_buffer)
    if cfg.log.resume_from_checkpoint:
        path = resolve_resume(cfg.log.resume_from_checkpoint, out, cfg.to_dict())
        acc.load_state(str(path))
        acc.print(f"resumed from {path} at step {state.step}")
    return run


def describe(run: Run) -> None:
    """Print the derived quantities of the run (nanoGPT style)."""
    cfg, acc = run.cfg, run.accelerator
    k = cfg.model.num_inference_steps
    trained = max(1, round(cfg.objective.train_fraction * k))
    n_train = sum(p.numel() for p in run.params)
    per_step = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
    acc.print(
        f"objective {cfg.objective.name} | processes {acc.num_processes} | "
        f"precision {cfg.train.mixed_precision}\n"
        f"trajectories per optimiser step: {per_step} "
        f"({cfg.train.batch_size} per rollout x {cfg.train.grad_accum} accumulated x "
        f"{acc.num_processes} processes)\n"
        f"transitions trained per trajectory: {trained} of {k}\n"
        f"trainable parameters: {n_train:,}\noutputs: {run.out}"
    )


def main(cfg: Config) -> Path:
    """Run a fine-tuning job from a config; returns its output folder."""
    start = time.time()  # wall time includes loading (and, first time, training) the prior
    run = setup(cfg)
    describe(run)
    _install_signal_handlers(run)
    acc, state = run.accelerator, run.state
    bar = tqdm(
        total=cfg.train.steps,
        initial=state.step,
        disable=not acc.is_local_main_process,
        desc=f"{cfg.objective.name}",
    )
    while state.step < cfg.train.steps and not run.stop_signal:
        rewards, metrics = [], {}
        for _ in range(cfg.train.grad_accum):
            with acc.accumulate(run.parts.policy.unet):
                try:
                    batch = with_replay(run, sample(run))
                    metrics = train_on_batch(run, batch)
                except NonFiniteError as err:
                    _handle_nonfinite(run, err)
                    continue
                rewards.append(acc.gather(batch.raw_reward).float().mean().item())
                if math.isnan(run.first_noise_checksum):  # the first batch of this run
                    run.first_noise_checksum = float(batch.traj.latents[:, 0].double().sum())
        grad_norm = sync_and_step(run)
        state.step += 1
        record = {
            "step": state.step,
            "reward": sum(rewards) / max(len(rewards), 1),
            "grad_norm": grad_norm,
            "skipped": run.skipped,
            **metrics,
        }
        state.history.append(record)
        if cfg.log.tracker != "none":
            acc.log(record, step=state.step)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", loss=f"{record['loss']:.3g}")
        if cfg.log.eval_every and state.step % cfg.log.eval_every == 0:
            evaluate(run, tag=f"step-{state.step}")
        if cfg.log.checkpoint_every and state.step % cfg.log.checkpoint_every == 0:
            save_checkpoint(
                acc, run.out, state.step, cfg.to_dict(), cfg.log.checkpoints_total_limit
            )
    bar.close()
    if run.stop_signal:
        path = save_checkpoint(
            acc, run.out, state.step, cfg.to_dict(), cfg.log.checkpoints_total_limit
        )
        acc.print(f"signal {run.stop_signal[0]}: saved {path} and stopped cleanly")
        return run.out
    save_checkpoint(acc, run.out, state.step, cfg.to_dict(), cfg.log.checkpoints_total_limit)
    evaluate(run, tag="final")
    save_final(run, wall_time=time.time() - start)
    if cfg.reward.name == "digits-classifier" and run.parts.cond.prompts is None:
        if acc.is_main_process:
            from steer.train.digits_report import digits_report

            m = digits_report(run, wall_time=time.time() - start)
            acc.print(
                f"class {m['target_class']}: fraction classified "
                f"{m['prior']['fraction_target']:.2f} (prior) -> "
                f"{m['posterior']['fraction_target']:.2f} (posterior); diversity "
                f"{m['posterior']['diversity']:.2f} (real digits {m['real_target_diversity']:.2f})"
                f"\nsamples.npz, grid.png, curves.png and metrics.json are in {run.out}"
            )
    acc.end_training()
    return run.out
