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
from torch import Tensor, nn
from tqdm.auto import tqdm

from steer.train.checkpoint import TrainState, resolve_resume, save_checkpoint
from steer.train.config import Config
from steer.train.losses import (
    GFN_OBJECTIVES,
    RolloutBatch,
    StepTerms,
    TrainObjective,
    choose_steps,
    stochastic_steps,
)
from steer.train.models import Components, build_components, build_objective_modules
from steer.train.outputs import evaluate, save_final, start_run
from steer.train.replay import ReplayBuffer, concat_batches, rescore, to_device
from steer.train.sampling import NonFiniteError, sample_batch
from steer.trajectory import Trajectory


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
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None


def trained_steps(run: Run, traj: Trajectory) -> list[int]:
    """The steps re-scored with gradient: ``choose_steps`` among the K steps (GFlowNet
    objectives) or among the stochastic ones only (ddpo, dpok: σ = 0 has no ratio, no KL)."""
    frac, gen = run.cfg.objective.train_fraction, run.state.generator
    own = set(run.parts.policy.trainable_steps())  # not the frozen map's (σ = 0, frozen tail)
    if run.objective.name in GFN_OBJECTIVES:
        pool = [k for k in range(traj.num_steps) if k in own]
        return [pool[i] for i in choose_steps(len(pool), frac, gen)]
    stochastic = [k for k in stochastic_steps(traj) if k in own]
    if not stochastic:
        raise ValueError(
            f"every step is deterministic (σ = 0): {run.objective.name} has nothing to train; "
            "use model.eta > 0"
        )
    return [stochastic[i] for i in choose_steps(len(stochastic), frac, gen)]


def _rescore(run: Run, batch: RolloutBatch, k: int, embeds: Tensor | None) -> StepTerms:
    """Step ``k`` under the current weights, with grad: its log-prob; for dpok also its mean and
    σ, and the prior's mean (without grad)."""
    policy, traj = run.parts.policy, batch.traj
    x_t, x_next = traj.latents[:, k], traj.latents[:, k + 1]
    if run.objective.name != "dpok":
        return StepTerms(policy.log_prob(x_t, x_next, k, embeds))
    zero = torch.zeros_like(x_t)
    out = policy.step(x_t, k, embeds, noise=zero)  # its sample is the mean: score x_next
    with torch.no_grad():
        prior_mean = run.parts.prior.step(x_t, k, embeds, noise=zero).mean
    return StepTerms(out.log_prob_of(x_next), out.mean, out.std, prior_mean)


def train_on_batch(run: Run, batch: RolloutBatch) -> dict[str, float]:
    """Back-propagate one rollout batch: the direct loss (log Z, flow), then each trained step.
    A non-finite loss raises ``NonFiniteError`` before its backward."""
    acc, traj, objective = run.accelerator, batch.traj, run.objective
    rows, prompts = list(range(traj.batch_size)), batch.extras.get("prompts")
    direct, metrics = objective.prepare(batch)
    if not bool(torch.isfinite(direct)):
        raise NonFiniteError("loss", rows, prompts)
    if direct.requires_grad:
        acc.backward(direct)
    steps = trained_steps(run, traj)
    pool = len(run.parts.policy.trainable_steps())  # the steps the subset is drawn from
    embeds = None if batch.prompt_index is None else run.parts.cond.embeds[batch.prompt_index]
    step_total, ratios = 0.0, []
    for k in steps:
        with acc.autocast():
            terms = _rescore(run, batch, k, embeds)
            loss = objective.step_loss(batch, k, terms, len(steps), pool)
        if not math.isfinite(float(loss.detach())):
            raise NonFiniteError(f"step loss (step {k})", rows, prompts)
        acc.backward(loss)
        step_total += float(loss.detach())
        if objective.name not in GFN_OBJECTIVES:
            ratios.append(objective.ratio(batch, k, terms.log_prob.detach()))
    metrics.setdefault("loss", step_total)  # the baselines' loss is the sum of their step losses
    if ratios:  # ddpo-pytorch's diagnostics: how far from on-policy, how often clipped
        dev = (torch.stack(ratios) - 1).abs()
        metrics["ratio_dev"] = float(dev.max())
        if objective.name == "ddpo":
            metrics["clip_fraction"] = float((dev > run.cfg.objective.clip_range).float().mean())
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
    """Average gradients over processes (one all-reduce), clip, step; returns the grad norm.
    A non-finite norm raises ``NonFiniteError`` before the step (under fp16 the grad scaler skips
    such a step itself and lowers its scale)."""
    acc = run.accelerator
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.params]
    if acc.num_processes > 1:
        flat = acc.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for p, g in zip(run.params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = g.view_as(p).clone()
    norm = float(acc.clip_grad_norm_(run.params, run.cfg.train.max_grad_norm))
    if not math.isfinite(norm) and acc.scaler is None:
        raise NonFiniteError("gradient norm", [], None)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.lr_scheduler is not None:
        run.lr_scheduler.step()
    return norm


def make_lr_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    """Warm-up then constant or cosine (to ``lr_min_ratio``) over every optimiser update of the
    run (``train.steps`` rounds × PPO updates per round for ddpo / dpok); ``None`` when flat."""
    t = cfg.train
    if t.lr_schedule == "constant" and t.lr_warmup_steps == 0:
        return None
    per_round = 1
    if cfg.objective.name in ("ddpo", "dpok"):
        per_round = cfg.objective.ppo_epochs * cfg.objective.minibatches
    total = max(1, t.steps * per_round)

    def factor(update: int) -> float:
        if update < t.lr_warmup_steps:
            return (update + 1) / t.lr_warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (update - t.lr_warmup_steps) / max(1, total - t.lr_warmup_steps))
        return t.lr_min_ratio + (1 - t.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _handle_nonfinite(run: Run, err: NonFiniteError) -> None:
    """Skip (drop the gradients gathered so far, count) or save the weights, never stepped with a
    non-finite loss or gradient, and raise."""
    if run.cfg.train.on_nonfinite == "skip":
        run.skipped += 1
        for p in run.params:  # not optimizer.zero_grad: a no-op inside an accumulation window
            p.grad = None
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


def step_or_skip(run: Run) -> float:
    """``sync_and_step``, through ``_handle_nonfinite`` on a non-finite gradient (NaN: skipped)."""
    try:
        return sync_and_step(run)
    except NonFiniteError as err:
        _handle_nonfinite(run, err)
        return float("nan")


def collect(run: Run) -> tuple[RolloutBatch, RolloutBatch]:
    """A fresh rollout batch and the batch to train on (with replay), sampled under the autocast
    of the re-scoring in ``train_on_batch``: stored and re-scored log-probs at one precision (so
    an on-policy ratio is 1 under bf16 too, not 1 ± 1e-3; decoding and rewards stay float32)."""
    with run.accelerator.autocast():
        fresh = sample(run)
        batch = with_replay(run, fresh)
    if math.isnan(run.first_noise_checksum):  # the first batch of this run
        run.first_noise_checksum = float(fresh.traj.latents[:, 0].double().sum())
    return fresh, batch


def fresh_reward(run: Run, fresh: RolloutBatch) -> float:
    """The mean raw reward of a fresh batch over every process (replayed rows left out)."""
    return run.accelerator.gather(fresh.raw_reward).float().mean().item()


def train_round(run: Run) -> tuple[list[float], dict[str, float]]:
    """One ``train.steps`` step: ``train.grad_accum`` fresh rollouts (their mean rewards) and one
    optimiser step, or ``ppo_epochs × ppo_minibatches`` for ddpo / dpok (``steer.train.ppo``)."""
    if run.objective.name not in GFN_OBJECTIVES:
        from steer.train.ppo import ppo_round  # ppo builds on this module

        return ppo_round(run)
    acc, rewards, metrics = run.accelerator, [], {}
    for _ in range(run.cfg.train.grad_accum):
        with acc.accumulate(run.parts.policy.unet):
            try:
                fresh, batch = collect(run)
                metrics = train_on_batch(run, batch)
            except NonFiniteError as err:
                _handle_nonfinite(run, err)
                continue
            rewards.append(fresh_reward(run, fresh))
    return rewards, {**metrics, "grad_norm": step_or_skip(run)}


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
    run.lr_scheduler = make_lr_scheduler(cfg, optimizer)
    if run.lr_scheduler is not None:  # saved and restored with the checkpoints
        acc.register_for_checkpointing(run.lr_scheduler)
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
        rewards, metrics = train_round(run)  # state.step counts rounds of rollouts
        state.step += 1
        record = {
            "step": state.step,
            "reward": sum(rewards) / max(len(rewards), 1),  # of the fresh rollouts only
            "skipped": run.skipped,
            **metrics,  # grad_norm; ddpo / dpok: means over the round's updates
        }
        state.history.append(record)
        if cfg.log.tracker != "none":
            acc.log(record, step=state.step)
        bar.update(1)
        loss = record.get("loss", math.nan)  # none when every rollout was skipped
        bar.set_postfix(reward=f"{record['reward']:.3f}", loss=f"{loss:.3g}")
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
            from steer.train.digits_report import digits_report, digits_summary

            m = digits_report(run, wall_time=time.time() - start)
            acc.print(digits_summary(m) + f"\nsamples.npz, grid.png, curves.png and "
                      f"metrics.json are in {run.out}")  # fmt: skip
    acc.end_training()
    return run.out
