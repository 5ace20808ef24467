"""The toy diffusion sampler: step densities, bridge, re-scoring and metrics identities."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from steer.toy.metrics import evaluate_sampler, log_weights
from steer.toy.sampler import DiffusionSampler, SamplerConfig
from steer.toy.targets import GaussianMixture, UserTarget

GEN = torch.Generator().manual_seed(0)


def _sampler(**kw) -> DiffusionSampler:
    torch.manual_seed(0)
    s = DiffusionSampler(
        SamplerConfig(**{"dim": 2, "steps": 8, "sigma": 1.5, **kw}),
        score=kw.get("langevin") and (lambda x: -x),
    )
    for p in s.out.parameters():  # a non-trivial policy (the head starts at zero)
        torch.nn.init.normal_(p, std=0.3)
    return s


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"learned_variance": True},
        {"langevin": True},
        {"langevin": True, "langevin_per_dim": True},
        {"init_std": 0.7, "activation": "relu"},
    ],
)
def test_rollout_log_pf_equals_batched_rescoring(kw) -> None:
    s = _sampler(**kw)
    if kw.get("langevin_per_dim"):  # one learned scale per coordinate and time
        assert s.time_embedding()[1].shape == (8, 2)
    traj = s.rollout(16, generator=GEN)
    log_pf, _ = s.evaluate(traj.latents, traj.extras.get("scores"))
    torch.testing.assert_close(traj.log_pf, log_pf, rtol=1e-5, atol=1e-4)
    assert traj.log_pf.shape == (16, 8) and traj.latents.shape == (16, 9, 2)


def test_step_density_matches_torch_distributions() -> None:
    s = _sampler(learned_variance=True)
    traj = s.rollout(4, generator=GEN)
    x, k = traj.latents[:, 3], 3
    temb, _ = s.time_embedding()
    drift, std, _ = s._drift_std(s._trunk(x, temb[k]), None, None)
    ref = D.Normal(x + s.dt * drift, std).log_prob(traj.latents[:, 4]).sum(-1)
    torch.testing.assert_close(traj.log_pf[:, k], ref, rtol=1e-5, atol=1e-5)


def test_bridge_density_and_marginals() -> None:
    s = _sampler()
    traj = s.backward_rollout(torch.tensor([[3.0, -2.0]]).expand(20_000, 2), generator=GEN)
    # P_B(x_k | x_{k+1}) = N(t_k/t_{k+1} x_{k+1}, σ² h t_k/t_{k+1}) checked against torch
    k, t = 4, s.times
    r = t[k] / t[k + 1]
    ref = (
        D.Normal(r * traj.latents[:, k + 1], (1.5**2 * s.dt * r).sqrt())
        .log_prob(traj.latents[:, k])
        .sum(-1)
    )
    torch.testing.assert_close(traj.log_pb[:, k], ref, rtol=1e-5, atol=1e-4)
    assert (traj.log_pb[:, 0] == 0).all() and (traj.latents[:, 0] == 0).all()
    # Brownian bridge from 0 to x_1: x_t ~ N(t x_1, σ² t (1 - t))
    xk = traj.latents[:, k]
    torch.testing.assert_close(xk.mean(0), t[k] * torch.tensor([3.0, -2.0]), atol=0.03, rtol=0)
    var = 1.5**2 * t[k] * (1 - t[k])
    torch.testing.assert_close(xk.var(0), var.expand(2), atol=0.03, rtol=0)


def test_reference_process_is_a_perfect_sampler_of_its_marginal() -> None:
    """Zero drift: the forward process is Brownian motion, whose terminal law N(0, σ²I) is
    the target; every log-weight then equals log Z (so ELBO = EUBO = log Ẑ_RW = log Z)."""
    s = DiffusionSampler(SamplerConfig(dim=3, steps=10, sigma=2.0, init_std=0.5))
    var = 0.5**2 + 2.0**2
    target = UserTarget(
        lambda x: 0.5 * x.square().sum(-1) / var,
        dim=3,
        log_z=1.5 * math.log(2 * math.pi * var),
        sampler=lambda n: math.sqrt(var) * torch.randn(n, 3),
    )
    traj = s.rollout(64, generator=GEN)
    w = log_weights(traj, target.log_prob(traj.x0))
    torch.testing.assert_close(w, torch.full_like(w, target.log_z), rtol=0, atol=1e-4)
    metrics, samples = evaluate_sampler(s, target, k=300, generator=GEN)
    assert metrics["delta_log_z"] < 1e-4 and metrics["delta_log_z_rw"] < 1e-4
    assert abs(metrics["eubo"] - target.log_z) < 1e-4 and samples.shape == (300, 3)


def test_gradients_are_the_callers_choice() -> None:
    s = _sampler()
    traj = s.rollout(8, generator=GEN)
    traj.x0.sum().backward()  # reparametrised: states carry the graph
    assert s.out.weight.grad is not None and s.out.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert not s.rollout(8).latents.requires_grad
    assert not s.rollout(8, detach_states=True).latents.requires_grad


def test_bad_sampler_options_raise() -> None:
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(dim=2, steps=0)
    with pytest.raises(ValueError, match="activation"):
        SamplerConfig(dim=2, activation="tanhh")
    with pytest.raises(ValueError, match="log_var_range"):
        SamplerConfig(dim=2, learned_variance=True, log_var_range=0.0)
    with pytest.raises(ValueError, match="score"):
        DiffusionSampler(SamplerConfig(dim=2, langevin=True))
    with pytest.raises(ValueError, match=r"\[B, T\+1, d\]"):
        _sampler().evaluate(torch.zeros(3, 5, 2))
    mix = GaussianMixture(torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="x must be"):
        mix.log_prob(torch.zeros(3))


@pytest.mark.parametrize(
    "kw",
    [
        {"layers": 2},
        {"layers": 0, "learned_variance": True, "flow": True},
        {"layers": 1, "langevin": True, "init_std": 0.5},
        {"langevin": True, "langevin_per_dim": True, "learned_variance": True},
    ],
)
def test_recorded_rollout_gradient_equals_autograd_of_a_fresh_forward(kw, monkeypatch) -> None:
    """The rollout's ``log_pf`` graph replays the recorded activations (one chunked batched
    backward, no second forward); its gradients equal plain autograd through a fresh
    forward pass over the same states, for every parameter (chunks smaller than one step
    exercise the chunk loop)."""
    import steer.toy.recorded as recorded_module

    monkeypatch.setattr(recorded_module, "CHUNK_ROWS", 7)
    s = _sampler(**kw)
    traj = s.rollout(5, explore=0.3, generator=GEN, detach_states=True)
    weights = torch.randn(5, 8, generator=GEN)
    loss = (traj.log_pf * weights).sum()
    if "log_flow" in traj.extras:
        loss = loss + (traj.extras["log_flow"] * weights.flip(0)).sum()
    fast = torch.autograd.grad(loss, list(s.parameters()), allow_unused=True)

    x = traj.latents[:, :-1]  # a fresh forward through the per-state MLP (_trunk)
    temb, scale = s.time_embedding()
    drift, std, flow = s._drift_std(s._trunk(x, temb), traj.extras.get("scores"), scale)
    log_pf = D.Normal(x + s.dt * drift, std).log_prob(traj.latents[:, 1:]).sum(-1)
    torch.testing.assert_close(traj.log_pf, log_pf, rtol=1e-5, atol=1e-4)
    ref_loss = (log_pf * weights).sum()
    if flow is not None:
        ref_loss = ref_loss + (flow * weights.flip(0)).sum()
    ref = torch.autograd.grad(ref_loss, list(s.parameters()), allow_unused=True)
    for (name, _), g, r in zip(s.named_parameters(), fast, ref, strict=True):
        if r is None:
            assert g is None or not g.abs().any(), name
            continue
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=name)


def test_batched_rescoring_gradient_equals_autograd() -> None:
    s = _sampler(layers=2)
    latents = s.bridge(torch.randn(6, 2, generator=GEN), generator=GEN)
    params = [p for n, p in s.named_parameters() if n != "log_z"]
    fast = torch.autograd.grad(s.evaluate(latents)[0].sum(), params)
    temb, _ = s.time_embedding()
    drift, std, _ = s._drift_std(s._trunk(latents[:, :-1], temb), None, None)
    ref = D.Normal(latents[:, :-1] + s.dt * drift, std).log_prob(latents[:, 1:]).sum()
    for g, r in zip(fast, torch.autograd.grad(ref, params), strict=True):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_backward_after_a_later_rollout_raises() -> None:
    s = _sampler()
    first = s.rollout(4, detach_states=True)
    s.rollout(4, detach_states=True)  # same shape: reuses (overwrites) the buffers
    with pytest.raises(RuntimeError, match="overwritten|modified by an inplace"):
        first.log_pf.sum().backward()
