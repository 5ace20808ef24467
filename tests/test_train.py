"""The fine-tuning loop on tiny pipelines (CPU): every objective, resume, accumulation,
precision (two processes, crashes and exact resume of every run kind: tests/test_resume.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import steer.rewards
from steer.train.config import load_config
from steer.train.loop import main, setup
from steer.train.run import sample, train_on_batch, with_replay

ROOT = Path(__file__).parents[1]


class Darkness(steer.rewards.Reward):
    """A cheap differentiable test reward: ten times minus the mean brightness."""

    name = "test-darkness"
    differentiable = True

    def score(self, images, prompts):
        return -10 * images.mean(dim=(1, 2, 3))


steer.rewards.register("test-darkness", Darkness, differentiable=True, replace=True)


def _cfg(tmp_path: Path, *overrides: str):
    base = [
        "model.pretrained=tiny", "model.num_inference_steps=2", "lora.rank=2", "lora.alpha=2",
        "reward.name=jpeg-compressibility", "prompts.builtin=simple-animals", "train.steps=1",
        "train.batch_size=2", "log.tracker=none", "log.num_eval_samples=2",
        f"log.output_dir={tmp_path}", "objective.beta=0.1",
    ]  # fmt: skip
    return load_config(None, base + list(overrides))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["tb", "rtb", "db", "vargrad", "subtb", "ddpo", "dpok"])
def test_every_objective_runs_and_writes_outputs(tmp_path: Path, objective: str) -> None:
    tracker = "tensorboard" if objective == "tb" else "none"
    out = main(
        _cfg(
            tmp_path,
            f"objective.name={objective}",
            "objective.train_fraction=0.5",
            f"log.tracker={tracker}",
        )
    )
    if tracker == "tensorboard":
        assert any((out / "logs").rglob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1
    assert all(
        torch.isfinite(torch.tensor(v))
        for k, v in summary["last"].items()
        if k in ("loss", "reward", "grad_norm")
    )
    for name in ("config.yaml", "curves.png", "eval/final.png", "lora", "checkpoint-1"):
        assert (out / name).exists(), name
    if objective in ("tb", "rtb"):
        assert "values" in load_file(str(out / "log_z.safetensors"))
    if objective in ("db", "subtb"):
        assert (out / "flow.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["tb", "rtb"])
def test_tb_and_rtb_lower_the_residual(tmp_path: Path, objective: str) -> None:
    """Full fine-tuning of the tiny prior toward ``∝ prior · exp(-10 · brightness)`` (rtb) or
    ``∝ exp(-10 · brightness)`` (tb): the mean |residual| falls well below where it started.
    The schedule's last step is deterministic (trailing, ᾱ = 1): it enters neither objective."""
    cfg = _cfg(
        tmp_path,
        "model.pretrained=tiny-unconditional",
        "prompts.builtin=null",
        "reward.name=test-darkness",
        "objective.beta=1.0",
        f"objective.name={objective}",
        "lora.enabled=false",
        "model.timestep_spacing=trailing",
        "train.steps=30",
        "train.batch_size=8",
        "train.lr=1e-4",
        # tb's log Z starts ~80 nats away (Σ log P_F - Σ log P_B over 8×8 pixels): a fast lr
        f"objective.log_z_lr={3.0 if objective == 'tb' else 0.3}",
    )
    out = main(cfg)
    history = torch.load(out / "checkpoint-30" / "custom_checkpoint_0.pkl", weights_only=True)[
        "history"
    ]
    first = sum(h["residual_abs"] for h in history[:5]) / 5
    last = sum(h["residual_abs"] for h in history[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_resume_equals_straight_run(tmp_path: Path) -> None:
    common = ("objective.name=tb", "train.batch_size=2", "log.checkpoints_total_limit=5")
    straight = main(_cfg(tmp_path / "a", "train.steps=2", *common))
    main(_cfg(tmp_path / "b", "train.steps=1", "log.run_name=r", *common))
    resumed = main(
        _cfg(
            tmp_path / "b",
            "train.steps=2",
            "log.run_name=r",
            "log.resume_from_checkpoint=latest",
            *common,
        )
    )
    assert resumed == tmp_path / "b" / "r"
    for name in ("lora/pytorch_lora_weights.safetensors", "log_z.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k  # bitwise (tests/test_resume.py: every run kind)
    states = [torch.load(d / "checkpoint-2" / "optimizer.bin", weights_only=True)["state"]
              for d in (straight, resumed)]  # fmt: skip
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert all(torch.equal(v, states[1][k][n]) for n, v in states[0][k].items())
    with pytest.raises(ValueError, match="objective.name: 'tb' -> 'rtb'"):
        main(
            _cfg(
                tmp_path / "b",
                "train.steps=3",
                "log.run_name=r",
                "log.resume_from_checkpoint=latest",
                "objective.name=rtb",
            )
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(_cfg(tmp_path / "c", "log.resume_from_checkpoint=/nonexistent/checkpoint-3"))


def test_accumulation_equals_one_large_batch(tmp_path: Path) -> None:
    """4 trajectories x 1 step and 1 x 4 accumulated give the same gradient (tb)."""
    grads = {}
    for accum in (1, 4):
        run = setup(
            _cfg(
                tmp_path / str(accum),
                "objective.name=tb",
                "train.batch_size=4",
                f"train.grad_accum={accum}",
            )
        )
        torch.manual_seed(0)
        batch = sample(run, torch.Generator().manual_seed(1))
        pieces = [batch] if accum == 1 else [_slice(batch, i) for i in range(4)]
        for piece in pieces:
            with run.accelerator.accumulate(run.parts.policy.unet):
                train_on_batch(run, piece)
        grads[accum] = torch.cat([p.grad.flatten() for p in run.params])
    # float32 sums of large per-trajectory log-densities: compare relative to the gradient norm
    assert (grads[1] - grads[4]).norm() <= 1e-4 * grads[1].norm()
    assert grads[1].norm() > 0


def _slice(batch, i):
    from dataclasses import replace

    sel = slice(i, i + 1)
    return replace(
        batch,
        traj=batch.traj[sel],
        raw_reward=batch.raw_reward[sel],
        log_reward=batch.log_reward[sel],
        prompt_index=batch.prompt_index[sel],
    )


@pytest.mark.fresh_process("bf16")  # accelerate fixes the precision once per process
def test_bf16_keeps_trainable_weights_float32(tmp_path: Path) -> None:
    run = setup(_cfg(tmp_path, "train.mixed_precision=bf16", "objective.name=tb"))
    batch = sample(run, torch.Generator().manual_seed(0))
    train_on_batch(run, batch)
    assert all(p.dtype == torch.float32 for p in run.params)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in run.params)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prompts.file=.*does not exist"):
        main(_cfg(tmp_path, "prompts.builtin=null", f"prompts.file={tmp_path / 'none.txt'}"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        main(_cfg(tmp_path, "prompts.builtin=null", f"prompts.file={tmp_path / 'empty.txt'}"))
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        main(_cfg(tmp_path, "reward.name=nope"))


def test_replay_and_exploration_run(tmp_path: Path) -> None:
    """Off-policy data: replayed trajectories re-scored under the current weights, and
    exploration noise; the loss stays finite and the buffer fills."""
    cfg = _cfg(
        tmp_path,
        "objective.name=tb",
        "train.steps=3",
        "train.replay_buffer=4",
        "train.replay_per_batch=2",
        "train.exploration_scale=0.5",
    )
    run = setup(cfg)

    gen = torch.Generator().manual_seed(0)
    sizes = []
    for _ in range(3):
        batch = with_replay(run, sample(run, gen))
        sizes.append(batch.traj.batch_size)
        metrics = train_on_batch(run, batch)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert sizes == [2, 4, 4] and len(run.buffer) == 4
    # and through the loop itself (a second Accelerator in this process, same settings)
    out = main(cfg)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    with pytest.raises(ValueError, match="is on-policy"):
        _cfg(tmp_path, "objective.name=ddpo", "train.replay_buffer=4", "train.replay_per_batch=2")


def test_nonfinite_samples_stop_after_a_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """A policy whose samples are NaN stops the run with the step and the term, checkpointed."""
    import steer.train.models as models

    monkeypatch.setattr(models, "_latent_decoder", lambda pipe: lambda x: x * float("nan"))
    with pytest.raises(RuntimeError, match=r"stopped at step 0: .*sample \(policy output\)"):
        main(_cfg(tmp_path, "objective.name=tb", "log.run_name=nan"))
    assert (tmp_path / "nan" / "checkpoint-0").is_dir()


_UNCOND = ("model.pretrained=tiny-unconditional", "prompts.builtin=null",
           "reward.name=test-darkness", "train.batch_size=4")  # fmt: skip


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)["weights"]


def test_dpok_skips_the_deterministic_last_step(tmp_path: Path) -> None:
    """Trailing spacing with set_alpha_to_one: the last DDIM step has σ = 0 (no density). dpok
    trains the stochastic steps only, with finite gradients (it was 0/0 = NaN there)."""
    from steer.train.run import collect, trained_steps

    run = setup(_cfg(tmp_path, *_UNCOND, "objective.name=dpok", "model.timestep_spacing=trailing"))
    assert run.parts.policy.schedule.deterministic.tolist() == [False, True]
    _, batch = collect(run)
    assert trained_steps(run, batch.traj) == [0]
    metrics = train_on_batch(run, batch)
    grads = [p.grad for p in run.params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads) and torch.isfinite(torch.tensor(metrics["loss"]))


def _inject_nan(monkeypatch, kind: str) -> None:
    """Re-scored log-probs (with grad) become NaN, or stay finite with a NaN gradient."""
    from steer.diffusion.policy import DiffusionPolicy

    original = DiffusionPolicy.log_prob

    def log_prob(self, *args, **kwargs):
        value = original(self, *args, **kwargs)
        if not torch.is_grad_enabled():
            return value
        if kind == "value":
            return value * float("nan")
        nan_grad = torch.sqrt(value - value.detach() - 1)  # NaN, and so is its gradient
        return torch.where(torch.ones_like(value, dtype=torch.bool), value, nan_grad)

    monkeypatch.setattr(DiffusionPolicy, "log_prob", log_prob)


def test_nonfinite_step_loss_stops_before_the_update(tmp_path: Path, monkeypatch) -> None:
    """A NaN step loss raises after a checkpoint of the last good (here: initial) weights."""
    _inject_nan(monkeypatch, "value")
    with pytest.raises(RuntimeError, match=r"stopped at step 0: .*step loss \(step \d\)"):
        main(_cfg(tmp_path, "objective.name=tb", "log.run_name=nan"))
    assert not (tmp_path / "nan" / "checkpoint-1").exists()
    weights = _weights(tmp_path / "nan" / "checkpoint-0")
    assert all(torch.isfinite(w).all() for w in weights.values())
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all((w == 0).all() for w in lora_b)  # never stepped


def test_nonfinite_gradient_is_skipped_not_stepped(tmp_path: Path, monkeypatch) -> None:
    """Finite losses with a NaN gradient: the step is skipped (on_nonfinite=skip), the saved
    weights stay finite and unchanged."""
    _inject_nan(monkeypatch, "grad")
    out = main(_cfg(tmp_path, "objective.name=tb", "train.on_nonfinite=skip"))
    history = torch.load(out / "checkpoint-1" / "custom_checkpoint_0.pkl", weights_only=True)[
        "history"
    ]
    assert history[-1]["skipped"] == 1 and torch.isfinite(torch.tensor(history[-1]["loss"]))
    weights = _weights(out / "checkpoint-1")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all((w == 0).all() for k, w in weights.items() if "lora_B" in k)


@pytest.mark.parametrize(("epochs", "minibatches"), [(2, 1), (1, 2)])
def test_ddpo_reuses_each_rollout_and_the_clip_binds(
    tmp_path: Path, epochs: int, minibatches: int
) -> None:
    """A rollout batch serves epochs × minibatches optimiser steps, the ratio against the stored
    log-probs: nothing clipped on the first (on-policy) update, some on the second."""
    from steer.train.ppo import ppo_updates
    from steer.train.run import collect

    cfg = _cfg(tmp_path, *_UNCOND, "objective.name=ddpo", f"objective.ppo_epochs={epochs}",
               f"objective.ppo_minibatches={minibatches}")  # fmt: skip
    run = setup(cfg)
    _, batch = collect(run)
    updates = ppo_updates(run, [batch])
    assert len(updates) == 2
    assert updates[0]["clip_fraction"] == 0.0 and updates[1]["clip_fraction"] > 0
    lora = next(p for p in run.params if p.ndim == 2)
    assert int(run.optimizer.optimizer.state[lora]["step"]) == 2


def test_ddpo_default_is_two_updates_per_round(tmp_path: Path) -> None:
    """train.steps counts rounds of rollouts; each ddpo round makes two optimiser updates."""
    cfg = _cfg(tmp_path, *_UNCOND, "objective.name=ddpo", "train.steps=2")
    assert (cfg.objective.ppo_epochs, cfg.objective.minibatches) == (1, 2)
    out = main(cfg)
    state = torch.load(out / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=True)
    assert state["step"] == 2 and len(state["history"]) == 2
    assert all("clip_fraction" in h and math.isfinite(h["grad_norm"]) for h in state["history"])
    optim = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)
    assert {int(s["step"]) for s in optim["state"].values()} == {4}


@pytest.mark.fresh_process("bf16")  # accelerate fixes the precision once per process
def test_bf16_rollout_matches_rescoring_precision(tmp_path: Path) -> None:
    """Rollouts sample under the same autocast as the re-scoring: the on-policy ddpo ratio is
    1 under bf16 too (a float32 rollout against bf16 re-scoring is off by far more)."""
    from steer.train.run import collect

    cfg = _cfg(tmp_path, *_UNCOND, "objective.name=ddpo", "train.mixed_precision=bf16",
               "objective.ppo_minibatches=1")  # fmt: skip
    run = setup(cfg)
    _, batch = collect(run)
    assert train_on_batch(run, batch)["ratio_dev"] <= 1e-6
    assert train_on_batch(run, sample(run))["ratio_dev"] > 1e-3  # float32 rollout: the old way


def test_logged_reward_is_the_fresh_batch(tmp_path: Path, monkeypatch) -> None:
    """With replay, the logged reward averages the fresh rollout, not the replayed rows."""
    import steer.train.run as loop

    cfg = _cfg(tmp_path, "objective.name=tb", "train.replay_buffer=4",
               "train.replay_per_batch=2")  # fmt: skip
    run = setup(cfg)
    fresh = []
    original = loop.sample
    monkeypatch.setattr(loop, "sample", lambda run: fresh.append(original(run)) or fresh[-1])
    loop.train_round(run)
    run.buffer.batch.raw_reward += 1000.0  # replayed rows would dominate the mean
    rewards, _ = loop.train_round(run)
    assert rewards == [pytest.approx(fresh[-1].raw_reward.float().mean().item())]


def test_lr_schedule_warmup_then_cosine_to_the_floor() -> None:
    from steer.train.config import load_config
    from steer.train.run import make_lr_scheduler

    over = ["train.lr_schedule=cosine", "train.steps=10", "train.lr_warmup_steps=2"]
    cfg = load_config(None, [*over, "train.lr_min_ratio=0.2"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched, lrs = make_lr_scheduler(cfg, opt), []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([1.0, 2.0])  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # then non-increasing
    assert lrs[-1] == pytest.approx(2.0 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 7 / 8))))
    assert make_lr_scheduler(load_config(None, []), opt) is None  # constant: no scheduler
    with pytest.raises(ValueError, match="train.lr_schedule='step' is not valid"):
        load_config(None, ["train.lr_schedule=step"])
