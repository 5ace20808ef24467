"""The fine-tuning loop: sample → reward → objective → update, on 1 CPU process or N GPUs.

``setup`` builds a :class:`~steer.train.run.Run` from a config; ``main`` runs its steps (one
round of ``steer.train.run.train_round``, or ``steer.train.ppo.ppo_round`` for an on-policy
objective), with callbacks, checkpoints, signals and the final evaluation.

SIGTERM / SIGINT finish the current step, save a checkpoint and stop cleanly (a second one
acts as usual, at once); on several processes every rank stops after the same step (the first
step any of them was signalled in). ``log.resume_from_checkpoint`` continues a run exactly: see
``steer.train.checkpoint`` for what a checkpoint holds.
"""

from __future__ import annotations

import importlib
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from steer.config import input_phase
from steer.train.checkpoint import TrainState, resolve_resume
from steer.train.config import FinetuneConfig
from steer.train.memory import check_fits
from steer.train.models import build_components, build_objective_modules
from steer.train.objectives import make_objective
from steer.train.outputs import evaluate, save_final, start_run
from steer.train.ppo import ppo_round
from steer.train.ranks import flagged_ranks
from steer.train.replay import ReplayBuffer
from steer.train.run import Run, checkpoint, make_lr_scheduler, restore, train_round

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _install_signal_handlers(run: Run) -> dict[int, object]:
    """SIGTERM / SIGINT ask the run to stop after this step (a second signal: the previous
    handler, e.g. KeyboardInterrupt); returns the previous handlers, to put back at the end."""
    previous = {}

    def handler(signum, _frame):
        run.stop_signal.append(signum)
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave the default behaviour
            pass
    return previous


def _resume_path(cfg: FinetuneConfig, acc: Accelerator, out: Path) -> Path:
    """The checkpoint to resume from, chosen (and verified) on the main process."""
    found: list = [None, None]
    if acc.is_main_process:
        try:
            found[0] = resolve_resume(cfg.log.resume_from_checkpoint, out, cfg.to_dict(),
                                      report=acc.print)  # fmt: skip
        except (FileNotFoundError, ValueError) as err:
            found[1] = err
    if acc.num_processes > 1:
        found = broadcast_object_list(found)
    if found[1] is not None:
        raise found[1]
    return found[0]


def setup(cfg: FinetuneConfig) -> Run:
    """Build the accelerator, the models, the objective, the optimiser; resume if asked."""
    acc = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=None if cfg.log.tracker == "none" else cfg.log.tracker,
        project_dir=cfg.log.output_dir,  # the run folder is set once known (start_run)
    )
    set_seed(cfg.train.seed, device_specific=True)  # ranks draw different prompts and noise
    # refuse a run that would not fit before writing or loading anything (a CPU's processes
    # share its memory)
    need = check_fits(cfg, acc.device, acc.num_processes if acc.device.type == "cpu" else 1)
    out = start_run(cfg, acc)
    if need is not None:
        acc.print(f"estimated memory per process: {need.describe()}")
    parts = build_components(cfg, acc.device)
    log_z, flow = build_objective_modules(cfg, parts, acc.device)
    objective = make_objective(cfg.objective, log_z=log_z, flow=flow)
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
        path = _resume_path(cfg, acc, out)
        restore(run, path)
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
    if cfg.model.random_weights:
        acc.print(f"random weights at the published architecture of {cfg.model.pretrained}")
    pipe = run.parts.pipeline
    if hasattr(pipe, "text_encoder_3") and pipe.text_encoder_3 is None:
        acc.print("SD3 without its T5 encoder: the T5 part of the prompt embeddings is zeros")


class Callback:
    """Hooks into a run (subclass and override): ``on_step`` after each ``train.steps`` step with
    its logged record (return True to stop the run there, as a signal would: a checkpoint is
    saved, no final evaluation); ``on_end`` on the main process after the final evaluation and
    save (return a summary to print, or None)."""

    def on_step(self, run: Run, record: dict[str, float]) -> bool:
        return False

    def on_end(self, run: Run, wall_time: float) -> str | None:
        return None


class ReportHook(Callback):
    """``log.report``: a ``module:function`` called as ``function(run, wall_time)`` at the end
    (e.g. the digits job's report against its exact posterior)."""

    def __init__(self, target: str) -> None:
        module, _, attr = target.partition(":")
        try:
            self.fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"log.report={target!r} cannot be imported: {err}") from err

    def on_end(self, run: Run, wall_time: float) -> str | None:
        return self.fn(run, wall_time)


def main(cfg: FinetuneConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Run a fine-tuning job from a config, with ``callbacks`` (and the config's
    ``log.report``); returns its output folder."""
    start = time.time()  # wall time includes loading (and, first time, training) the prior
    with input_phase():  # what set-up refuses is bad input: one line from the CLI (steer.config)
        callbacks = [*callbacks, *([ReportHook(cfg.log.report)] if cfg.log.report else [])]
        run = setup(cfg)
    describe(run)
    previous = _install_signal_handlers(run)
    try:
        return _train(run, callbacks, start)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_agreed(run: Run) -> bool:
    """Whether any rank stops after this step (a signal or a callback): each rank asks, all
    get the same answer (a signal arriving later is seen after the next step)."""
    if flagged_ranks(run.accelerator, bool(run.stop_signal)) and not run.stop_signal:
        run.stop_signal.append(0)  # another rank's signal or callback
    return bool(run.stop_signal)


def _train(run: Run, callbacks: Sequence[Callback], start: float) -> Path:
    """The steps of ``main``, its last checkpoint, final evaluation and outputs."""
    cfg = run.cfg
    acc, state = run.accelerator, run.state
    one_round = ppo_round if run.objective.needs.on_policy else train_round
    bar = tqdm(
        total=cfg.train.steps,
        initial=state.step,
        disable=not acc.is_local_main_process,
        desc=f"{cfg.objective.name}",
    )
    stopping = False  # agreed by every rank after each step; never read a signal directly
    while state.step < cfg.train.steps and not stopping:
        rewards, metrics = one_round(run)  # state.step counts rounds of rollouts
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
            checkpoint(run)
        if any([cb.on_step(run, record) for cb in callbacks]) and not run.stop_signal:
            run.stop_signal.append(0)  # 0: stopped by a callback (e.g. a time budget)
        stopping = _stop_agreed(run)  # every rank stops after the same step
    bar.close()
    if stopping:
        path = checkpoint(run)
        why = f"signal {run.stop_signal[0]}" if run.stop_signal[0] else "a callback"
        acc.print(f"{why}: saved {path} and stopped cleanly")
        return run.out
    checkpoint(run)
    evaluate(run, tag="final")
    save_final(run, wall_time=time.time() - start)
    if acc.is_main_process:
        for cb in callbacks:
            summary = cb.on_end(run, time.time() - start)
            if summary:
                acc.print(summary)
    acc.end_training()
    return run.out
