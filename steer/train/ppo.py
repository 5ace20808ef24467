"""PPO-style reuse of rollouts for the baselines ddpo and dpok (Black et al. 2023, ddpo-pytorch).

One round (one ``train.steps`` step): ``train.grad_accum`` fresh rollouts, then
``objective.ppo_epochs`` passes over them, each split into ``objective.ppo_minibatches`` random
minibatches (a fresh split per pass); one optimiser step per minibatch, on the gradients of that
minibatch's rows of every rollout. The ratios are taken against the log-probs stored at rollout
time (``batch.traj.log_pf``): the first update of a round is on-policy (ratio 1, nothing clipped),
and ddpo's clip can bind from the second on. A round makes ``ppo_epochs × ppo_minibatches``
optimiser updates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steer.train.batch import RolloutBatch, select
from steer.train.run import Run, attempt, collect, fresh_reward, step_or_skip, train_on_batch


def select_rows(batch: RolloutBatch, rows: Tensor) -> RolloutBatch:
    """The rows ``rows`` of a rollout batch (their prompts kept for error reports)."""
    sub = select(batch, rows.to(batch.log_reward.device))
    prompts = batch.extras.get("prompts")
    if prompts is not None:
        sub.extras["prompts"] = [prompts[i] for i in rows.tolist()]
    return sub


def split(batch: RolloutBatch, n: int, generator: torch.Generator) -> list[RolloutBatch]:
    """``n`` equal minibatches of a rollout batch's rows in a random order (1: the batch)."""
    if n == 1:
        return [batch]
    order = torch.randperm(batch.traj.batch_size, generator=generator)
    return [select_rows(batch, rows) for rows in order.chunk(n)]


def mean_metrics(records: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over the records that have it."""
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}


def _train(run: Run, batch: RolloutBatch) -> list[dict[str, float]]:
    metrics = attempt(run, lambda: train_on_batch(run, batch))  # every rank skips or raises
    return [] if metrics is None else [metrics]


def ppo_updates(run: Run, batches: list[RolloutBatch]) -> list[dict[str, float]]:
    """``ppo_epochs × ppo_minibatches`` optimiser steps on one round's rollout batches; the
    metrics of each update in order (``loss``, ``ratio_dev``, ``clip_fraction``, ``grad_norm``)."""
    cfg, acc, unet = run.cfg, run.accelerator, run.parts.policy.unet
    n, updates = cfg.objective.minibatches, []
    for _ in range(cfg.objective.ppo_epochs):
        parts = [split(batch, n, run.state.generator) for batch in batches]
        for m in range(n):
            records = []
            # grad_accum accumulation windows per step, also for a skipped rollout: accelerate
            # steps the optimiser only at the end of a full window
            for r in range(cfg.train.grad_accum):
                with acc.accumulate(unet):
                    if r < len(parts):
                        records += _train(run, parts[r][m])
            updates.append({**mean_metrics(records), "grad_norm": step_or_skip(run)})
    return updates


def ppo_round(run: Run) -> tuple[list[float], dict[str, float]]:
    """One ``train.steps`` step of ddpo / dpok: the fresh rollouts' mean rewards and the mean
    metrics of the round's updates."""
    rewards, batches = [], []
    for _ in range(run.cfg.train.grad_accum):
        collected = attempt(run, lambda: collect(run))  # every rank skips or raises together
        if collected is None:
            continue
        fresh, batch = collected
        rewards.append(fresh_reward(run, fresh))
        batches.append(batch)
    return rewards, mean_metrics(ppo_updates(run, batches) if batches else [])
