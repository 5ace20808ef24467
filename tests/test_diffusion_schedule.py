"""Step densities ((2.1)-(2.6)) against diffusers' schedulers and torch.distributions."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from torch.distributions import Normal

from steer.diffusion import DiffusionPolicy, make_schedule
from steer.testing import tiny_ddim_scheduler, tiny_ddpm_components


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_ddpm_components(channels=2)["unet"]


def _x(seed: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 2, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_mean_and_pred_x0_match_ddim_step(unet, spacing, prediction_type, eta) -> None:
    sched = tiny_ddim_scheduler(timestep_spacing=spacing, prediction_type=prediction_type)
    policy = DiffusionPolicy(unet, sched, num_inference_steps=5, eta=eta)
    ref = tiny_ddim_scheduler(timestep_spacing=spacing, prediction_type=prediction_type)
    ref.set_timesteps(5)
    assert torch.equal(ref.timesteps, policy.schedule.timesteps)
    x = _x(0)
    with torch.no_grad():
        for k, t in enumerate(ref.timesteps):
            idx = torch.full((2,), k)
            out = policy.model_output(x, idx, None)
            noise = torch.randn_like(x)
            expected = ref.step(out, t, x, eta=eta, variance_noise=noise)
            mine = policy.step(x, k, noise=noise)
            torch.testing.assert_close(
                mine.pred_x0, expected.pred_original_sample, atol=1e-5, rtol=0
            )
            torch.testing.assert_close(mine.sample, expected.prev_sample, atol=1e-5, rtol=0)
            x = mine.sample


def test_linspace_uses_next_list_entry(unet) -> None:
    sched = tiny_ddim_scheduler(timestep_spacing="linspace", set_alpha_to_one=True)
    s = make_schedule(sched, 10, 1.0)
    ts = s.timesteps.tolist()
    assert ts[0] == 999 and ts[-1] == 0 and ts[1] == 888  # diffusers' DDIM step would use 899
    acp = sched.alphas_cumprod
    torch.testing.assert_close(s.alpha_prev[:-1], acp[s.timesteps[1:]])
    assert s.alpha_prev[-1] == 1.0 and bool(s.deterministic[-1]) and not s.deterministic[:-1].any()


@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_scheduler_step_parity(unet, clip) -> None:
    sched = DDPMScheduler(clip_sample=clip, prediction_type="epsilon")
    policy = DiffusionPolicy(unet, sched, num_inference_steps=4, eta=1.0)
    ref = DDPMScheduler(clip_sample=clip)
    ref.set_timesteps(4)
    x = _x(1) * 3
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k, t in enumerate(ref.timesteps):
            out = policy.model_output(x, torch.full((2,), k), None)
            expected = ref.step(out, t, x, generator=g1).prev_sample
            mine = policy.step(x, k, generator=g2)
            torch.testing.assert_close(mine.sample, expected, atol=1e-5, rtol=1e-5)
            x = mine.sample
    assert policy.schedule.deterministic.tolist() == [False, False, False, True]  # t=0 -> ᾱ=1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_log_pf_and_log_pb_match_torch_normal(unet, prediction_type) -> None:
    sched = tiny_ddim_scheduler(prediction_type=prediction_type)
    policy = DiffusionPolicy(unet, sched, num_inference_steps=6, eta=0.8)
    ts, acp = policy.schedule.timesteps, sched.alphas_cumprod
    x_t, x_next = _x(2), _x(3)
    for k in (0, 3, 5):
        a_t = acp[ts[k]]
        a_p = acp[ts[k + 1]] if k + 1 < len(ts) else sched.final_alpha_cumprod
        std = 0.8 * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
        with torch.no_grad():
            mean = policy.step(x_t, k, noise=torch.zeros_like(x_t)).mean
            expected = Normal(mean, std).log_prob(x_next).sum(dim=(1, 2, 3))
            torch.testing.assert_close(
                policy.log_prob(x_t, x_next, k), expected, rtol=1e-5, atol=1e-3
            )
        r = a_t / a_p
        expected_pb = Normal(r.sqrt() * x_next, (1 - r).sqrt()).log_prob(x_t).sum(dim=(1, 2, 3))
        torch.testing.assert_close(policy.log_pb(x_t, x_next, k), expected_pb, rtol=1e-5, atol=1e-3)


def test_eta_zero_is_deterministic_not_nan(unet) -> None:
    policy = DiffusionPolicy(unet, tiny_ddim_scheduler(), num_inference_steps=3, eta=0.0)
    out = policy.step(_x(4), 1)
    assert bool(out.deterministic.all()) and torch.equal(out.log_prob, torch.zeros(2))
    assert torch.equal(out.sample, out.mean)
    assert torch.isfinite(policy.log_prob(_x(4), _x(5), 1)).all()


def test_bad_scheduler_options(unet) -> None:
    with pytest.raises(TypeError, match="DDIMScheduler.*EulerDiscreteScheduler"):
        DiffusionPolicy(unet, EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="prediction_type='flow'.*epsilon"):
        DiffusionPolicy(unet, DDIMScheduler(prediction_type="flow"))
    with pytest.raises(ValueError, match="timestep_spacing='karras'.*leading"):
        DiffusionPolicy(unet, DDIMScheduler(timestep_spacing="karras"))
    with pytest.raises(ValueError, match="variance_type='learned'"):
        DiffusionPolicy(unet, DDPMScheduler(variance_type="learned"))
    with pytest.raises(ValueError, match="thresholding"):
        DiffusionPolicy(unet, DDIMScheduler(thresholding=True))


@pytest.mark.parametrize("steps", [0, 1001])
def test_bad_num_inference_steps(unet, steps) -> None:
    with pytest.raises(ValueError, match=rf"\[1, 1000\].*got {steps}"):
        DiffusionPolicy(unet, tiny_ddim_scheduler(), num_inference_steps=steps)


def test_bad_eta_and_k(unet) -> None:
    with pytest.raises(ValueError, match="eta must be a finite float >= 0, got -0.5"):
        DiffusionPolicy(unet, tiny_ddim_scheduler(), eta=-0.5)
    with pytest.raises(ValueError, match="eta=3.0 is too large"):
        DiffusionPolicy(unet, tiny_ddim_scheduler(), num_inference_steps=4, eta=3.0)
    policy = DiffusionPolicy(unet, tiny_ddim_scheduler(), num_inference_steps=4)
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
        policy.step(_x(0), 4)
    with pytest.raises(ValueError, match="cond must be None"):
        policy.step(_x(0), 0, cond=torch.zeros(2, 3, 4))
