"""One run's state and one step of training: sample → reward → objective → update.

Gradients are taken step by step (one UNet graph in memory at a time, see ``objectives``), so the
UNet is not wrapped in DistributedDataParallel, whose one-forward-one-backward contract this does
not fit: the trainable gradients (LoRA adapters, log Z, the flow network: small) are averaged
over processes in one all-reduce per optimiser step instead.

The ranks agree (``steer.train.ranks``) before each collective call: a non-finite value on one
rank makes every rank skip that batch, or save and raise, together (:func:`attempt`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from steer.checkpoints import final_path, pause_for_tests
from steer.rewards import NonFiniteRewardError
from steer.train.batch import RolloutBatch, StepTerms, concat_batches, to_device
from steer.train.checkpoint import TrainState, load_checkpoint, save_checkpoint, weights_digest
from steer.train.config import FinetuneConfig
from steer.train.models import Components
from steer.train.objectives import FinetuneObjective, choose_steps, stochastic_steps
from steer.train.ranks import OtherRankFailed, describe_failure, flagged_ranks
from steer.train.replay import ReplayBuffer, rescore
from steer.train.sampling import NonFiniteError, sample_batch
from steer.trajectory import Trajectory

T = TypeVar("T")


@dataclass
class Run:
    """Everything the loop holds for one run."""

    cfg: FinetuneConfig
    accelerator: Accelerator
    parts: Components
    objective: FinetuneObjective
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    state: TrainState
    out: Path
    skipped: int = 0
    buffer: ReplayBuffer | None = None
    first_noise_checksum: float = float("nan")
    stop_signal: list[int] = field(default_factory=list)
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    saved_step: int = -1  # the step of the last checkpoint written or loaded


def trained_steps(run: Run, traj: Trajectory) -> list[int]:
    """The steps re-scored with gradient: ``choose_steps`` among the K steps (GFlowNet
    objectives) or among the stochastic ones only (on-policy baselines: σ = 0 has no ratio)."""
    frac, gen = run.cfg.objective.train_fraction, run.state.generator
    own = set(run.parts.policy.trainable_steps())  # not the frozen map's (σ = 0, frozen tail)
    if not run.objective.needs.on_policy:
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
    """Step ``k`` under the current weights, with grad: its log-prob; where the objective needs
    them (dpok) also its mean and σ, and the prior's mean (without grad)."""
    policy, traj = run.parts.policy, batch.traj
    x_t, x_next = traj.latents[:, k], traj.latents[:, k + 1]
    if not run.objective.needs.step_means:
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
        if objective.needs.on_policy:
            ratios.append(objective.ratio(batch, k, terms.log_prob.detach()))
    metrics.setdefault("loss", step_total)  # the baselines' loss is the sum of their step losses
    if ratios:  # ddpo-pytorch's diagnostics: how far from on-policy, how often clipped
        metrics.update(objective.ratio_metrics((torch.stack(ratios) - 1).abs()))
    return metrics


def sample(run: Run, generator: torch.Generator | None = None) -> RolloutBatch:
    """One fresh rollout batch of this process: ``sample_batch`` with the run's parts. Its
    gather of rewards (advantages) first checks that no rank failed before it; a rank failing
    before that gather answers the others' check."""
    p, acc = run.parts, run.accelerator
    gen = run.state.generator if generator is None else generator
    reached = []

    def gather(t: Tensor) -> Tensor:
        reached.append(True)
        if flagged_ranks(acc, False):
            raise OtherRankFailed()
        return acc.gather(t)

    try:
        return sample_batch(run.cfg, p.policy, p.prior, p.reward, p.decode, p.cond, gen, gather,
                            acc.process_index, run.objective)  # fmt: skip
    except (NonFiniteError, NonFiniteRewardError) as err:
        if acc.num_processes > 1 and run.objective.needs.advantages and not reached:
            flagged_ranks(acc, True)  # the check the other ranks wait in
        if isinstance(err, NonFiniteRewardError):  # the reward model's own check
            raise RewardNotFinite(err) from err
        raise


class RewardNotFinite(NonFiniteError):
    """A reward model's ``NonFiniteRewardError``, handled like any non-finite value (skipped or
    saved and raised, on every rank together)."""

    def __init__(self, err: Exception) -> None:
        super().__init__("reward", [], None)
        self.args = (f"non-finite reward: {err}",)


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
    if not math.isfinite(norm) and acc.scaler is None:  # the same on every rank
        raise NonFiniteError("gradient norm", [], None)
    run.optimizer.step()
    pause_for_tests("optimizer_step", run.state.step + 1)
    run.optimizer.zero_grad(set_to_none=True)
    if run.lr_scheduler is not None:
        run.lr_scheduler.step()
    return norm


def make_lr_scheduler(cfg: FinetuneConfig, optimizer: torch.optim.Optimizer):
    """Warm-up then constant or cosine (to ``lr_min_ratio``) over every optimiser update of the
    run (``train.steps`` rounds × PPO updates per round for ddpo / dpok); ``None`` when flat."""
    t = cfg.train
    if t.lr_schedule == "constant" and t.lr_warmup_steps == 0:
        return None
    per_round = 1
    if cfg.objective.needs.on_policy:
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


def handle_nonfinite(run: Run, err: NonFiniteError | None, failed: list[int] | None = None) -> None:
    """Skip (drop the gradients gathered so far, count) or save the weights, never stepped with a
    non-finite loss or gradient, and raise; on every rank together (``failed``: the ranks that
    reported it, all of them when omitted: a value every rank computed the same)."""
    acc = run.accelerator
    if run.cfg.train.on_nonfinite == "skip":
        run.skipped += 1
        for p in run.params:  # not optimizer.zero_grad: a no-op inside an accumulation window
            p.grad = None
        return
    failed = list(range(acc.num_processes)) if failed is None else failed
    what, term = describe_failure(acc, err, failed)
    path = checkpoint(run)
    raise RuntimeError(
        f"stopped at step {run.state.step}: {what} (term: {term}); saved {path}. Set "
        "train.on_nonfinite=skip to skip and count such batches instead"
    ) from err


def attempt(run: Run, fn: Callable[[], T]) -> T | None:
    """``fn()`` on every rank, then one check that no rank met a non-finite value: if one did,
    every rank handles it together (``handle_nonfinite``: skip, or save and raise) and ``None``
    is returned, so that all ranks go on to the same collective calls."""
    try:
        result, err = fn(), None
    except NonFiniteError as e:
        result, err = None, e
    failed = flagged_ranks(
        run.accelerator, err is not None and not isinstance(err, OtherRankFailed)
    )
    if not failed:
        return result
    handle_nonfinite(run, err, failed)
    return None


def step_or_skip(run: Run) -> float:
    """``sync_and_step``, through ``_handle_nonfinite`` on a non-finite gradient (NaN: skipped)."""
    try:
        return sync_and_step(run)
    except NonFiniteError as err:
        handle_nonfinite(run, err)
        return float("nan")


def collect(run: Run) -> tuple[RolloutBatch, RolloutBatch]:
    """A fresh rollout batch and the batch to train on (with replay), sampled under the autocast
    of the re-scoring in ``train_on_batch``: stored and re-scored log-probs at one precision (so
    an on-policy ratio is 1 under bf16 too, not 1 ± 1e-3; decoding and rewards stay float32)."""
    pause_for_tests("rollout", run.state.step + 1)
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
    """One ``train.steps`` step of a GFlowNet objective: ``train.grad_accum`` fresh rollouts
    (their mean rewards) and one optimiser step (on-policy objectives: ``steer.train.ppo``)."""
    acc, rewards, metrics = run.accelerator, [], {}

    def collect_and_train() -> tuple[RolloutBatch, dict[str, float]]:
        fresh, batch = collect(run)
        return fresh, train_on_batch(run, batch)

    for _ in range(run.cfg.train.grad_accum):
        with acc.accumulate(run.parts.policy.unet):
            done = attempt(run, collect_and_train)
            if done is None:
                continue
            fresh, metrics = done
            rewards.append(fresh_reward(run, fresh))
    return rewards, {**metrics, "grad_norm": step_or_skip(run)}


def rank_state(run: Run) -> dict[str, Tensor]:
    """What this rank saves of its own: its generator, its replay buffer, its first noise, and
    a digest of its trainable weights (equal on every rank)."""
    state = {
        "generator": run.state.generator.get_state(),
        "skipped": torch.tensor(run.skipped),
        "first_noise_checksum": torch.tensor(run.first_noise_checksum, dtype=torch.float64),
        "weights_sha256": weights_digest(run.params),
    }
    if run.buffer is not None:
        state.update({f"replay.{k}": v for k, v in run.buffer.state_dict().items()})
    return state


def checkpoint(run: Run) -> Path:
    """Save ``checkpoint-<step>`` on every rank (unless this step is saved already)."""
    acc, cfg, step = run.accelerator, run.cfg, run.state.step
    if run.saved_step != step:
        save_checkpoint(acc, run.out, step, cfg.to_dict(), cfg.log.checkpoints_total_limit,
                        rank_state(run))  # fmt: skip
        run.saved_step = step
    return final_path(run.out, step)


def restore(run: Run, path: Path) -> None:
    """Load a checkpoint into the run: shared state on every rank, then this rank's own."""
    acc = run.accelerator
    own = load_checkpoint(acc, path)
    run.state.generator.set_state(own["generator"])
    run.skipped = int(own["skipped"])
    run.first_noise_checksum = float(own["first_noise_checksum"])
    if run.buffer is not None:
        run.buffer.load_state_dict(
            {k.removeprefix("replay."): v for k, v in own.items() if k.startswith("replay.")}
        )
    # rounds start an accumulation window (a checkpoint saved on a non-finite value mid-round)
    acc.step -= acc.step % run.cfg.train.grad_accum
    run.saved_step = run.state.step
