"""The trainer's step-by-step surrogates give the exact gradient of each objective."""

from __future__ import annotations

import pytest
import torch

from steer import objectives as O
from steer.objectives import group_normalise
from steer.train.batch import RolloutBatch, StepTerms
from steer.train.config import ObjectiveConfig, load_config
from steer.train.modules import FlowNetwork, LogZTable
from steer.train.objectives import make_objective
from steer.trajectory import Trajectory

B, K = 6, 4


def _make(cfg: ObjectiveConfig, log_z, flow):
    """The objective of ``cfg`` with those of the modules it declares it needs."""
    needs = cfg.needs
    return make_objective(
        cfg, log_z=log_z if needs.log_z else None, flow=flow if needs.flow else None
    )


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_(True)
    feats = torch.randn(B, K, generator=g, dtype=torch.float64)
    traj = Trajectory(
        latents=torch.randn(B, K + 1, 1, 4, 4, generator=g),
        timesteps=torch.arange(K, 0, -1) * 10,
        log_pf=torch.zeros(B, K, dtype=torch.float64),
        log_pb=torch.randn(B, K, generator=g, dtype=torch.float64),
        log_p_init=torch.randn(B, generator=g, dtype=torch.float64),
    )
    batch = RolloutBatch(
        traj=traj,
        raw_reward=torch.randn(B, generator=g, dtype=torch.float64),
        log_reward=torch.randn(B, generator=g, dtype=torch.float64),
        prompt_index=torch.tensor([0, 1, 0, 1, 1, 0]),
        log_reward_pred=torch.randn(B, K, generator=g, dtype=torch.float64),
        log_pf_prior=torch.randn(B, K, generator=g, dtype=torch.float64),
    )

    def log_pf_of(k: int) -> torch.Tensor:  # a differentiable stand-in for the UNet's log P_F
        return torch.sin(theta[k] * feats[:, k]) * 3

    traj.log_pf = torch.stack([log_pf_of(k) for k in range(K)], 1).detach()
    return theta, batch, log_pf_of


@pytest.mark.parametrize("name", ["tb", "vargrad", "rtb", "db", "subtb"])
@pytest.mark.parametrize("penalty", ["squared", "huber"])
def test_surrogate_gradient_equals_end_to_end_gradient(name: str, penalty: str) -> None:
    theta, batch, log_pf_of = _setup()
    cfg = ObjectiveConfig(name=name, penalty=penalty)
    log_z = LogZTable(2, init=0.3).double()
    flow = FlowNetwork(1, width=8).double()
    torch.nn.init.normal_(flow.head[-1].weight)  # non-zero flows
    obj = _make(cfg, log_z, flow)
    batch.traj.latents = batch.traj.latents.double()
    # 1. the step-by-step surrogate
    direct, _ = obj.prepare(batch)
    total = direct
    for k in range(K):
        total = total + obj.step_loss(batch, k, StepTerms(log_pf_of(k)), K)
    surrogate = torch.autograd.grad(total, [theta, log_z.values], allow_unused=True)
    # 2. the objective computed end to end with a differentiable log P_F
    full_pf = torch.stack([log_pf_of(k) for k in range(K)], 1)
    loss, _ = _make(cfg, log_z, flow).loss_of_log_pf(batch, full_pf)
    exact = torch.autograd.grad(loss, [theta, log_z.values], allow_unused=True)
    torch.testing.assert_close(surrogate[0], exact[0])
    if exact[1] is not None:
        torch.testing.assert_close(surrogate[1], exact[1])


@pytest.mark.parametrize("name", ["tb", "rtb"])
def test_batch_log_z_is_vargrad(name: str) -> None:
    """Without a log Z module, tb / rtb use the batch estimate per prompt: (3.2) / (3.7)."""
    theta, batch, log_pf_of = _setup(2)
    obj = make_objective(ObjectiveConfig(name=name))
    _, residual = obj.loss_of_log_pf(batch, batch.traj.log_pf)
    t = batch.traj
    expected = (
        O.vargrad(t.log_p_init + t.log_pf.sum(1), t.log_pb, batch.log_reward, batch.prompt_index)
        if name == "tb"
        else O.relative_vargrad(t.log_pf, batch.log_pf_prior, batch.log_reward, batch.prompt_index)
    )
    torch.testing.assert_close(residual, expected)
    direct, _ = obj.prepare(batch)
    total = direct + sum(obj.step_loss(batch, k, StepTerms(log_pf_of(k)), K) for k in range(K))
    full = torch.stack([log_pf_of(k) for k in range(K)], 1)
    (exact,) = torch.autograd.grad(obj.loss_of_log_pf(batch, full)[0], theta)
    torch.testing.assert_close(torch.autograd.grad(total, theta)[0], exact)


def test_subset_of_steps_is_unbiased() -> None:
    theta, batch, log_pf_of = _setup(1)
    obj = make_objective(ObjectiveConfig(name="tb"), log_z=LogZTable(2).double())
    obj.prepare(batch)
    full = sum(obj.step_loss(batch, k, StepTerms(log_pf_of(k)), K) for k in range(K))
    (g_full,) = torch.autograd.grad(full, theta)
    # the average over every single-step subset equals the full gradient
    singles = [
        torch.autograd.grad(obj.step_loss(batch, k, StepTerms(log_pf_of(k)), 1), theta)[0]
        for k in range(K)
    ]
    torch.testing.assert_close(torch.stack(singles).mean(0), g_full)


def test_ddpo_ratio_is_one_on_policy_and_clipped() -> None:
    _, batch, log_pf_of = _setup()
    batch.advantages = group_normalise(batch.raw_reward, batch.prompt_index, 5.0)
    obj = make_objective(ObjectiveConfig(name="ddpo", clip_range=0.1, ratio_per_dim=False))
    obj.prepare(batch)
    on_policy = obj.step_loss(batch, 0, StepTerms(batch.traj.log_pf[:, 0]), 1)
    torch.testing.assert_close(on_policy, -batch.advantages.mean())
    far = obj.step_loss(batch, 0, StepTerms(batch.traj.log_pf[:, 0] + 5.0), 1)
    expected = torch.maximum(-batch.advantages * torch.e**5, -batch.advantages * 1.1).mean()
    torch.testing.assert_close(far, expected)


def test_dpok_kl_is_the_closed_form_gaussian_kl() -> None:
    _, batch, _ = _setup()
    batch.advantages = torch.zeros(B, dtype=torch.float64)
    obj = make_objective(ObjectiveConfig(name="dpok", kl_weight=1.0))
    mean, prior_mean = (
        torch.randn(B, 3, dtype=torch.float64),
        torch.randn(B, 3, dtype=torch.float64),
    )
    std = torch.full((B,), 0.7, dtype=torch.float64)
    loss = obj.step_loss(batch, 0, StepTerms(torch.zeros(B), mean, std, prior_mean), K)
    p = torch.distributions.Normal(mean, 0.7)
    q = torch.distributions.Normal(prior_mean, 0.7)
    torch.testing.assert_close(loss, torch.distributions.kl_divergence(p, q).sum(1).mean())


def test_group_normalise_per_prompt() -> None:
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    adv = group_normalise(r, torch.tensor([0, 0, 0, 1, 1, 1]), clip=10.0)
    torch.testing.assert_close(adv[:3], adv[3:])
    assert abs(adv[:3].mean().item()) < 1e-6


def test_rtb_identity_through_the_trainer() -> None:
    """At log P_F^post = log P_F^prior + (log r - log Z)/K the RTB loss and gradient vanish."""
    _, batch, _ = _setup()
    log_z = LogZTable(2, init=0.0).double()
    with torch.no_grad():
        log_z.values.fill_(0.4)
    batch.traj.log_pf = batch.log_pf_prior + ((batch.log_reward - 0.4) / K)[:, None]
    obj = make_objective(ObjectiveConfig(name="rtb"), log_z=log_z)
    loss, metrics = obj.prepare(batch)
    assert loss.item() < 1e-20 and metrics["residual_abs"] < 1e-10
    d = O.relative_trajectory_balance(batch.traj.log_pf, batch.log_pf_prior, batch.log_reward, 0.4)
    assert d.abs().max() < 1e-12


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("objective.name=ppo", "objective.name='ppo' is not valid; choose one of tb, rtb"),
        ("objective.beta=0", "objective.beta must be > 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("objective.train_fraction=1.5", "train_fraction must be in"),
        ("train.mixed_precision=fp8", "choose one of no, fp16, bf16"),
    ],
)
def test_bad_config_raises(override: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_presets_load(tmp_path) -> None:
    from pathlib import Path

    presets = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert len(presets) >= 7
    for p in presets:
        cfg = load_config(p)
        assert cfg.objective.name in ("tb", "rtb", "db", "ddpo", "dpok", "grpo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_default_is_the_digits_preset() -> None:
    from pathlib import Path

    from steer.train.cli import parse, resolve_config

    args = parse([])
    assert args.config is None and args.overrides == []
    preset = Path(__file__).parents[1] / "configs" / "digits_rtb.yaml"
    assert resolve_config(None).read_text() == preset.read_text()
    cfg = load_config(resolve_config(None))
    assert (cfg.model.pretrained, cfg.objective.name, cfg.reward.name) == (
        "digits",
        "rtb",
        "digits-classifier",
    )
    with pytest.raises(FileNotFoundError, match="presets: .*digits_rtb"):
        resolve_config("no-such-preset")


@pytest.mark.parametrize("name", ["tb", "vargrad", "rtb", "db", "subtb"])
def test_a_deterministic_last_step_enters_no_objective(name: str) -> None:
    """§2 convention (b): x_1 is terminal. The σ = 0 step's log P_B (≈ +365 nats on the digits
    model, a function of ε̂ there) must not move the loss, the residual or the gradient; before the
    fix tb / vargrad / db / subtb counted it and their optimum was not ∝ R."""
    theta, batch, log_pf_of = _setup()
    batch.traj.deterministic = torch.tensor([False] * (K - 1) + [True])
    batch.traj.log_pf[:, -1] = 0.0  # no density at the deterministic step
    batch.log_pf_prior[:, -1] = 0.0
    batch.traj.latents = batch.traj.latents.double()
    results = []
    for shift in (0.0, 365.0):
        batch.traj.log_pb[:, -1] = batch.traj.log_pb[:, -1] + shift
        batch.log_reward_pred[:, -1] += shift  # x̂ at x_1 is not a state of the objective either
        flow = FlowNetwork(1, width=8).double()
        torch.manual_seed(0)
        torch.nn.init.normal_(flow.head[-1].weight)
        obj = _make(ObjectiveConfig(name=name), LogZTable(2, 0.3).double(), flow)
        loss, metrics = obj.prepare(batch)
        total = loss + sum(obj.step_loss(batch, k, StepTerms(log_pf_of(k)), K) for k in range(K))
        (grad,) = torch.autograd.grad(total, theta)
        results.append((loss.detach(), metrics["residual_abs"], grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1] == pytest.approx(results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2])
    assert results[0][2][-1] == 0  # the deterministic step gets no gradient


def test_a_deterministic_step_before_a_stochastic_one_is_refused() -> None:
    _, batch, _ = _setup()
    batch.traj.deterministic = torch.tensor([False, True, False, False])
    with pytest.raises(ValueError, match=r"steps \[1\] of 4 are deterministic"):
        make_objective(ObjectiveConfig(name="tb"), log_z=LogZTable(2, 0.0).double()).prepare(batch)


def test_baselines_normalise_by_the_stochastic_steps() -> None:
    """With every stochastic step trained, on-policy: ddpo's loss is the mean over them of
    -advantage (-1), dpok's the sum over them (-(K - 1); it counted the σ = 0 step, -K)."""
    _, batch, _ = _setup()
    batch.traj.deterministic = torch.tensor([False] * (K - 1) + [True])
    batch.advantages = torch.ones(B, dtype=torch.float64)
    mean = torch.zeros(B, 3, dtype=torch.float64)
    std = torch.full((B,), 0.5, dtype=torch.float64)
    for name, expected in (("ddpo", -1.0), ("dpok", -(K - 1.0))):
        obj = make_objective(ObjectiveConfig(name=name, kl_weight=0.0))
        losses = [
            obj.step_loss(batch, k, StepTerms(batch.traj.log_pf[:, k], mean, std, mean), K - 1)
            for k in range(K - 1)
        ]
        torch.testing.assert_close(sum(losses), torch.tensor(expected, dtype=torch.float64))


def test_ratio_is_against_the_stored_log_probs() -> None:
    _, batch, _ = _setup()
    new = batch.traj.log_pf[:, 1] + 0.32
    full = make_objective(ObjectiveConfig(name="dpok")).ratio(batch, 1, new)
    torch.testing.assert_close(full, torch.full((B,), 0.32, dtype=torch.float64).exp())
    per_dim = make_objective(ObjectiveConfig(name="ddpo")).ratio(batch, 1, new)
    torch.testing.assert_close(per_dim, torch.full((B,), 0.02, dtype=torch.float64).exp())


def test_ppo_fields_defaults_and_validation() -> None:
    ddpo, dpok = (load_config(None, [f"objective.name={n}"]).objective for n in ("ddpo", "dpok"))
    assert (ddpo.ppo_epochs, ddpo.minibatches) == (1, 2)
    assert (dpok.ppo_epochs, dpok.minibatches) == (1, 1)
    assert load_config(None, ["objective.ppo_minibatches=4"]).objective.minibatches == 4
    for field in ("ppo_epochs", "ppo_minibatches"):
        with pytest.raises(ValueError, match=f"objective.{field} must be >= 1, got 0"):
            load_config(None, [f"objective.{field}=0"])
    with pytest.raises(ValueError, match="train.batch_size=3 must be divisible by .*=2"):
        load_config(None, ["objective.name=ddpo", "train.batch_size=3"])


def test_mixed_precision_no_from_the_command_line_and_yaml(tmp_path) -> None:
    """YAML 1.1 reads `no` as False; train.mixed_precision=no still means no autocast."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
