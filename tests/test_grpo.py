"""GRPO (THEORY §5): group-relative advantages, PPO-clip on the per-step ratio, optional KL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steer.train.batch import RolloutBatch, StepTerms
from steer.train.config import ObjectiveConfig, load_config
from steer.train.objectives import make_objective
from steer.trajectory import Trajectory


def _batch(b: int = 8, k: int = 3, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    traj = Trajectory(
        latents=torch.randn(b, k + 1, 1, 2, 2, generator=g),
        timesteps=torch.arange(k, 0, -1),
        log_pf=torch.randn(b, k, generator=g, dtype=torch.float64),
        log_pb=torch.randn(b, k, generator=g, dtype=torch.float64),
        log_p_init=torch.zeros(b, dtype=torch.float64),
    )
    raw = torch.randn(b, generator=g, dtype=torch.float64)
    return RolloutBatch(traj=traj, raw_reward=raw, log_reward=raw)


def test_advantages_are_standardised_within_each_group() -> None:
    obj = make_objective(ObjectiveConfig(name="grpo", group_size=4, advantage_clip=100.0))
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0, 100.0, 110.0, 120.0, 90.0], dtype=torch.float64)
    groups = obj.group_ids(None, 8, rank=0)
    assert groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    adv = obj.advantages(raw, groups)
    for g in (0, 1):
        a = adv[groups == g]
        assert abs(float(a.mean())) < 1e-6
        assert float(a.pow(2).mean()) == pytest.approx(1.0, rel=1e-5)  # unit (population) variance
    assert obj.group_ids(None, 8, rank=1).tolist() == [2, 2, 2, 2, 3, 3, 3, 3]  # unique per rank


def test_one_sample_per_group_raises() -> None:
    with pytest.raises(ValueError, match="grpo needs >= 2 samples per prompt group"):
        make_objective(ObjectiveConfig(name="grpo", group_size=1))
    with pytest.raises(ValueError, match="grpo needs >= 2 samples per prompt group"):
        load_config(None, ["objective.name=grpo", "objective.group_size=1"])
    with pytest.raises(ValueError, match="divisible by objective.group_size=3"):
        load_config(None, ["objective.name=grpo", "objective.group_size=3", "train.batch_size=8"])
    obj = make_objective(ObjectiveConfig(name="grpo", group_size=2))
    with pytest.raises(ValueError, match=">= 2 samples per prompt group"):
        obj.advantages(torch.ones(3), torch.tensor([0, 0, 1]))  # a group of one


def test_clip_binds_off_policy_and_kl_is_the_gaussian_kl() -> None:
    batch = _batch()
    obj = make_objective(ObjectiveConfig(name="grpo", clip_range=0.1, kl_weight=0.0))
    batch.advantages = obj.advantages(batch.raw_reward, obj.group_ids(None, 8, 0))
    on = obj.step_loss(batch, 0, StepTerms(batch.traj.log_pf[:, 0]), 1)
    torch.testing.assert_close(on, -batch.advantages.mean())  # ratio 1 on-policy
    far = obj.step_loss(batch, 0, StepTerms(batch.traj.log_pf[:, 0] + 3.0), 1)
    adv = batch.advantages
    torch.testing.assert_close(far, torch.maximum(-adv * torch.e**3, -adv * 1.1).mean())
    # the KL term, against torch.distributions
    kl_obj = make_objective(ObjectiveConfig(name="grpo", kl_weight=1.0))
    g = torch.Generator().manual_seed(1)
    mean, prior = (torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(2))
    std = torch.full((8,), 0.3, dtype=torch.float64)
    terms = StepTerms(batch.traj.log_pf[:, 0], mean, std, prior)
    kl = kl_obj.step_loss(batch, 0, terms, 1) - kl_obj.step_loss(
        batch, 0, StepTerms(batch.traj.log_pf[:, 0], mean, std, mean), 1
    )
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, 0.3), torch.distributions.Normal(prior, 0.3)
    )
    torch.testing.assert_close(kl, ref.sum(1).mean())


@pytest.mark.parametrize("model", ["tiny", "tiny-unconditional"])
def test_grpo_trains_on_both_families(tmp_path: Path, model: str) -> None:
    """Prompts are drawn in groups (each prompt group_size times); a run makes two updates per
    round and logs its clip fraction."""
    from steer.train.loop import setup
    from steer.train.run import sample

    extra = ["prompts.builtin=simple-animals"] if model == "tiny" else ["lora.enabled=false"]
    cfg = load_config(None, [
        f"model.pretrained={model}", "model.num_inference_steps=2", "lora.rank=2",
        "reward.name=jpeg-compressibility", "train.steps=1", "train.batch_size=4",
        "objective.name=grpo", "objective.group_size=2", "log.tracker=none",
        "log.num_eval_samples=2", f"log.output_dir={tmp_path}", *extra,
    ])  # fmt: skip
    run = setup(cfg)
    batch = sample(run)
    if model == "tiny":
        idx = batch.prompt_index.tolist()
        assert idx[0] == idx[1] and idx[2] == idx[3]
    adv = batch.advantages.view(2, 2)
    torch.testing.assert_close(adv.sum(1), torch.zeros(2, dtype=adv.dtype), atol=1e-3, rtol=0)
    from steer.train.ppo import ppo_round

    _, metrics = ppo_round(run)
    assert "clip_fraction" in metrics and torch.isfinite(torch.tensor(metrics["loss"]))


def test_without_kl_grpo_asks_for_no_prior_means() -> None:
    """The prior's per-step means feed only the KL: with kl_weight=0 the re-scoring makes no
    prior UNet pass (the loop reads the instance's needs)."""
    assert make_objective(ObjectiveConfig(name="grpo", kl_weight=0.01)).needs.step_means
    assert not make_objective(ObjectiveConfig(name="grpo", kl_weight=0.0)).needs.step_means
