"""One rollout contract for every sampler family (steer.trajectory): signature, callback,
trajectory shapes and seeded reproducibility, checked on the same terms for all of them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from steer import diffusion, discrete, toy
from steer.trajectory import Trajectory

CONTRACT = ("policy", "batch_size", "num_steps", "generator", "callback")
B = 3


@dataclass
class Family:
    """A rollout function, a fresh policy and its options; ``steps`` is ``T``, ``state`` the
    per-sample shape of one state."""

    rollout: Callable[..., Trajectory]
    make: Callable[[], Any]
    options: dict[str, Any]
    steps: int
    state: tuple[int, ...]


def _diffusion() -> Family:
    from steer.testing import tiny_ddim_scheduler, tiny_ddpm_components

    def make() -> diffusion.DiffusionPolicy:
        unet = tiny_ddpm_components(channels=1)["unet"]
        return diffusion.DiffusionPolicy(unet, tiny_ddim_scheduler(), num_inference_steps=3)

    return Family(diffusion.rollout, make, {"eta": 1.0}, 3, (1, 8, 8))


def _toy(detach_states: bool) -> Family:
    def make() -> toy.DiffusionSampler:
        torch.manual_seed(0)
        cfg = toy.SamplerConfig(dim=2, steps=6, hidden=16, layers=1, langevin=True)
        sampler = toy.DiffusionSampler(cfg, score=lambda x: -x)
        for p in sampler.out.parameters():  # a non-trivial drift (the head starts at zero)
            torch.nn.init.normal_(p, std=0.3)
        return sampler

    # detach_states=True takes the recorded fast path, False the step-by-step one
    return Family(toy.rollout, make, {"explore": 0.1, "detach_states": detach_states}, 6, (2,))


_GRID = discrete.HyperGrid(side=3, dim=2)


def _discrete() -> Family:
    def make() -> discrete.TabularPolicy:
        torch.manual_seed(0)
        policy = discrete.TabularPolicy(_GRID)
        with torch.no_grad():
            policy.logits.normal_()
        return policy

    options = {"env": _GRID, "epsilon": 0.1, "log_pb": _GRID.log_backward()}
    return Family(discrete.rollout, make, options, _GRID.max_length, ())


FAMILIES = {
    "diffusion": _diffusion,
    "toy-recorded": lambda: _toy(True),
    "toy-plain": lambda: _toy(False),
    "discrete": _discrete,
}


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]()


def test_signature_has_the_five_contract_names(family: Family) -> None:
    params = list(inspect.signature(family.rollout).parameters.values())
    assert tuple(p.name for p in params[:5]) == CONTRACT
    kinds = [p.kind for p in params[:5]]
    assert kinds[:2] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
    assert kinds[2:] == [inspect.Parameter.KEYWORD_ONLY] * 3
    assert all(p.default is None for p in params[2:5])
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in params[2:])


def test_callback_once_per_step_and_trajectory_shapes(family: Family) -> None:
    seen: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []

    def callback(k: int, t: float, step: Any) -> None:
        seen.append((k, t, step.sample.detach().clone(), step.log_prob.detach().clone()))

    gen = torch.Generator().manual_seed(0)
    traj = family.rollout(family.make(), B, generator=gen, callback=callback, **family.options)
    t = family.steps
    assert isinstance(traj, Trajectory)
    assert traj.latents.shape == (B, t + 1, *family.state)
    assert traj.log_pf.shape == (B, t) and traj.log_pb.shape == (B, t)
    assert traj.log_p_init.shape == (B,) and traj.timesteps.shape == (t,)
    assert [k for k, *_ in seen] == list(range(t))  # once per step, in order
    assert [ts for _, ts, *_ in seen] == traj.timesteps.tolist()
    for k, _, sample, log_prob in seen:  # the step seen is the step recorded
        torch.testing.assert_close(sample, traj.latents[:, k + 1].detach(), rtol=0, atol=0)
        torch.testing.assert_close(log_prob, traj.log_pf[:, k].detach(), rtol=1e-6, atol=1e-5)


def test_same_seed_same_trajectory_and_the_callback_only_observes(family: Family) -> None:
    def run(seed: int, callback: Callable | None = None) -> Trajectory:
        gen = torch.Generator().manual_seed(seed)
        return family.rollout(family.make(), B, generator=gen, callback=callback, **family.options)

    first, again, observed, other = run(1), run(1), run(1, lambda *a: None), run(2)
    for traj in (again, observed):
        for name in ("latents", "log_pf", "log_pb", "log_p_init"):
            assert torch.equal(getattr(first, name), getattr(traj, name)), name
    assert not torch.equal(first.latents, other.latents)  # the generator is what it uses


def test_num_steps_of_the_contract(family: Family) -> None:
    policy = family.make()
    traj = family.rollout(policy, B, num_steps=family.steps, **family.options)
    assert traj.num_steps == family.steps
    if family.rollout is diffusion.rollout:  # the schedule follows num_steps
        assert family.rollout(policy, B, num_steps=2, **family.options).num_steps == 2
        with pytest.raises(ValueError, match="num_steps=2 and num_inference_steps=4 disagree"):
            family.rollout(policy, B, num_steps=2, num_inference_steps=4)
    else:  # a fixed T: any other value is refused with the valid one named
        with pytest.raises(ValueError, match=rf"num_steps=2, .*{family.steps}"):
            family.rollout(policy, B, num_steps=2, **family.options)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        family.rollout(policy, 0, **family.options)


# ------------------------------------------------------------------ each family's own options
def test_diffusion_num_inference_steps_is_an_alias_of_num_steps() -> None:
    family = _diffusion()
    runs = [
        family.rollout(family.make(), 2, generator=torch.Generator().manual_seed(4), **kw)
        for kw in (
            {"num_steps": 2},
            {"num_inference_steps": 2},
            {"num_steps": 2, "num_inference_steps": 2},
        )
    ]
    assert runs[0].num_steps == 2 and runs[0].extras["num_inference_steps"] == 2
    for traj in runs[1:]:
        assert torch.equal(traj.latents, runs[0].latents)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1 .or give cond., got None"):
        family.rollout(family.make())


def test_toy_method_is_the_module_rollout_and_bad_options_raise() -> None:
    family = _toy(True)
    sampler = family.make()
    for detach in (False, True):
        via_method = sampler.rollout(
            4, explore=0.2, generator=torch.Generator().manual_seed(3), detach_states=detach
        )
        gen = torch.Generator().manual_seed(3)
        via_module = toy.rollout(sampler, 4, generator=gen, explore=0.2, detach_states=detach)
        assert torch.equal(via_method.latents, via_module.latents)
        assert torch.equal(via_method.log_pf, via_module.log_pf)
    with pytest.raises(ValueError, match=r"explore must be a number >= 0.*-0.1"):
        toy.rollout(sampler, 4, explore=-0.1)
    with pytest.raises(ValueError, match=r"num_steps=7, but this sampler has T = config.steps = 6"):
        toy.rollout(sampler, 4, num_steps=7)
    with pytest.raises(TypeError, match="policy must be a DiffusionSampler, got Linear"):
        toy.rollout(torch.nn.Linear(2, 2), 4)


def test_discrete_policy_as_module_table_or_tensor_and_bad_input() -> None:
    family = _discrete()
    policy = family.make()
    runs = [
        discrete.rollout(p, 5, generator=torch.Generator().manual_seed(2), env=_GRID)
        for p in (policy, policy(), policy().log_pf)
    ]
    legacy = discrete.sample_trajectories(
        _GRID, policy().log_pf, 5, generator=torch.Generator().manual_seed(2)
    )
    for traj in (*runs[1:], legacy):
        assert torch.equal(traj.latents, runs[0].latents)
        assert torch.equal(traj.log_pf, runs[0].log_pf)
    assert runs[0].log_pf.requires_grad  # gathered from the module's table: gradients flow
    seen: list[torch.Tensor] = []
    discrete.rollout(policy, 5, env=_GRID, callback=lambda k, t, s: seen.append(s.extras["action"]))
    assert all(a.shape == (5,) and int(a.max()) <= _GRID.num_moves for a in seen)
    with pytest.raises(ValueError, match=r"log_pf must be a float tensor \[N, K\+1\]=\[9, 3\]"):
        discrete.rollout(torch.zeros(9, 2), 5, env=_GRID)
    with pytest.raises(TypeError, match="policy must be a log_pf tensor"):
        discrete.rollout("uniform", 5, env=_GRID)
    with pytest.raises(TypeError, match="env must be a DAGEnvironment, got NoneType"):
        discrete.rollout(policy, 5, env=None)
    with pytest.raises(ValueError, match=r"log_pb must be \[N, K\]=\[9, 2\]"):
        discrete.rollout(policy, 5, env=_GRID, log_pb=torch.zeros(9, 3))
    with pytest.raises(ValueError, match="epsilon must be in"):
        discrete.rollout(policy, 5, env=_GRID, epsilon=1.5)
