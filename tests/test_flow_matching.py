"""Flow matching (SD3, §2b): parity with diffusers' StableDiffusion3Pipeline, the step densities
(2.8)-(2.9) against torch.distributions, Flow-GRPO's SDE, bad input, LoRA (tiny, CPU)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from torch.distributions import Normal

from steer.diffusion import (
    DiffusionPolicy,
    FlowMatchPolicy,
    denoiser_of,
    family_of,
    lora_parameters,
    make_policy,
    pack_cond,
    rollout,
    unpack_cond,
)
from steer.pipelines import SteerStableDiffusion3Pipeline, load_pipeline
from steer.testing import tiny_sd3_components, tiny_sd3_pipeline, tiny_sd_pipeline

PROMPTS = ["a photo of a cat", "a red dog"]
SEQ = 4  # max_sequence_length: the (zero) T5 tokens after CLIP's 16
K = 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _latents(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 16, 8, 8, generator=_gen(seed))  # [B, C, h, w]


@pytest.fixture(scope="module")
def pipe() -> SteerStableDiffusion3Pipeline:
    return tiny_sd3_pipeline(seed=0)


@pytest.fixture(scope="module")
def ref(pipe: SteerStableDiffusion3Pipeline) -> StableDiffusion3Pipeline:
    """diffusers' own pipeline over the very same component objects."""
    ref = StableDiffusion3Pipeline(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    return ref


def _sample(pipe, eta: float, w: float = 4.0, **kw):
    return pipe(PROMPTS, num_inference_steps=K, guidance_scale=w, eta=eta, latents=_latents(),
                max_sequence_length=SEQ, output_type="latent", return_trajectory=True,
                progress=False, generator=_gen(1), **kw)  # fmt: skip


def _velocity(ref, x: torch.Tensor, t: torch.Tensor, w: float) -> torch.Tensor:
    """v̂ = v_u + w (v_c - v_u) from diffusers' own prompt encoding and the transformer."""
    pe, npe, pp, npp = ref.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                         max_sequence_length=SEQ, device="cpu")  # fmt: skip
    tb = t.expand(x.shape[0])
    v_c = ref.transformer(hidden_states=x, timestep=tb, encoder_hidden_states=pe,
                          pooled_projections=pp, return_dict=False)[0]  # fmt: skip
    v_u = ref.transformer(hidden_states=x, timestep=tb, encoder_hidden_states=npe,
                          pooled_projections=npp, return_dict=False)[0]  # fmt: skip
    return v_u + w * (v_c - v_u)


def _normal_sum(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    return Normal(mean, std).log_prob(x).sum((1, 2, 3))  # [B]


# ----------------------------------------------------------------------------------------------
# parity with diffusers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [1.0, 4.0])
def test_eta_zero_images_equal_diffusers(pipe, ref, w: float) -> None:
    """η = 0 is diffusers' Euler sampler: the same latents give the same images."""
    kw = dict(num_inference_steps=K, guidance_scale=w, latents=_latents(), max_sequence_length=SEQ)
    ours = pipe(PROMPTS, eta=0.0, output_type="pt", return_trajectory=True, progress=False, **kw)
    theirs = ref(PROMPTS, output_type="pt", **kw).images
    diff = (ours.images - theirs).abs().max().item()
    assert diff <= 1e-5, diff
    lat = ref(PROMPTS, output_type="latent", **kw).images
    assert (ours.trajectory.x0 - lat).abs().max().item() <= 1e-5
    assert bool(ours.trajectory.deterministic.all()) and (ours.trajectory.log_pf == 0).all()
    assert ours.images.std() > 0.01  # not a constant image: the comparison is not empty


def test_prompt_encoding_equals_diffusers(pipe, ref) -> None:
    pe, npe, pp, npp = ref.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                         max_sequence_length=SEQ, device="cpu")  # fmt: skip
    cond = pipe.prompt_cond(PROMPTS, 4.0, max_sequence_length=SEQ)  # [B, 2, L + r, D]
    embeds, pooled = unpack_cond(cond, pipe.transformer.config.pooled_projection_dim)
    torch.testing.assert_close(embeds[:, 1], pe, rtol=0, atol=0)
    torch.testing.assert_close(pooled[:, 1], pp, rtol=0, atol=0)
    torch.testing.assert_close(embeds[:, 0], npe, rtol=0, atol=0)
    torch.testing.assert_close(pooled[:, 0], npp, rtol=0, atol=0)
    again = pack_cond(embeds, pooled)
    assert torch.equal(again, cond) and cond.shape == (2, 2, 16 + SEQ, 32 + 24)  # [B, 2, L, D+P]


# ----------------------------------------------------------------------------------------------
# the step densities (2.8)-(2.9)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta, sigma_min", [(0.7, 0.0), (1.0, 0.0), (0.5, 0.002)])
def test_log_pf_and_log_pb_are_the_normals_of_2_8_and_2_9(pipe, ref, eta, sigma_min) -> None:
    out = _sample(pipe, eta, sigma_min=sigma_min)
    traj, w = out.trajectory, 4.0
    pipe.scheduler.set_timesteps(K)
    sigmas = pipe.scheduler.sigmas.double().tolist()
    sigmas[-1] = sigma_min
    for k in range(K):
        s, s2 = sigmas[k], sigmas[k + 1]
        x, x_next = traj.latents[:, k], traj.latents[:, k + 1]
        with torch.no_grad():
            v = _velocity(ref, x, pipe.scheduler.timesteps[k], w)
        x0, eps = x - s * v, x + (1 - s) * v  # (2.7)
        a = (1 - s) / (1 - s2)
        b2 = s**2 - a**2 * s2**2
        s_2 = eta**2 * s2**2 * b2 / s**2
        mean = (1 - s2) * x0 + (s2**2 - s_2) ** 0.5 * eps  # (2.8)
        torch.testing.assert_close(traj.pred_x0[:, k], x0, rtol=1e-5, atol=1e-5)
        if s_2 == 0:  # the last step to σ = 0: deterministic, reported with log P_F = 0
            assert bool(traj.deterministic[k]) and (traj.log_pf[:, k] == 0).all()
            torch.testing.assert_close(x_next, mean, rtol=1e-5, atol=1e-5)
        else:
            assert not bool(traj.deterministic[k])
            expected = _normal_sum(x_next, mean, s_2**0.5)
            torch.testing.assert_close(traj.log_pf[:, k], expected, rtol=1e-5, atol=1e-3)
        expected_pb = _normal_sum(x, a * x_next, b2**0.5)  # (2.9)
        torch.testing.assert_close(traj.log_pb[:, k], expected_pb, rtol=1e-5, atol=1e-3)
    assert bool(traj.deterministic[-1]) == (sigma_min == 0)


def test_rescoring_a_stored_trajectory_reproduces_its_log_probs(pipe) -> None:
    traj = _sample(pipe, 0.8, sigma_min=0.002).trajectory
    policy = pipe.policy(4.0, 5, 0.1, sigma_min=0.002)  # another schedule first...
    policy.set_timesteps(traj.num_steps, traj.extras["eta"])  # ...then the trajectory's
    with torch.no_grad():
        for k in range(traj.num_steps):
            lp = policy.log_prob(traj.latents[:, k], traj.latents[:, k + 1], k, traj.cond)
            assert (lp - traj.log_pf[:, k]).abs().max().item() <= 1e-4
            pb = policy.log_pb(traj.latents[:, k], traj.latents[:, k + 1], k)
            assert (pb - traj.log_pb[:, k]).abs().max().item() <= 1e-4
        ks, rows = torch.tensor([2, 0]), torch.arange(2)  # a different step per sample
        lp = policy.log_prob(traj.latents[rows, ks], traj.latents[rows, ks + 1], ks, traj.cond)
    assert (lp - traj.log_pf[rows, ks]).abs().max().item() <= 1e-4
    first = traj[[1]]  # batch selection keeps the packed conditioning
    with torch.no_grad():
        lp1 = policy.log_prob(first.latents[:, 0], first.latents[:, 1], 0, first.cond)
    assert (lp1 - traj.log_pf[1:, 0]).abs().max().item() <= 1e-4


def _kernel_from_log_pb(policy: FlowMatchPolicy, k: int) -> tuple[float, float]:
    """``(a, b)`` of ``P_B(x_σ | x_σ') = N(a x_σ', b²)`` read off the policy's own log_pb:
    ``log_pb(0 | 0) = -n log(b √2π)``, ``∂/∂x_σ log_pb`` at ``x_σ = 0``, ``x_σ' = 1`` is a/b²."""
    zero, one = torch.zeros(1, 16, 8, 8), torch.ones(1, 16, 8, 8)
    n = zero.numel()
    b = torch.exp(-policy.log_pb(zero, zero, k) / n - 0.5 * torch.log(torch.tensor(2 * torch.pi)))
    x = zero.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(policy.log_pb(x, one, k).sum(), x)
    return float(grad.mean() * b**2), float(b)


@pytest.mark.parametrize("sde", ["ddim", "flow-grpo"])
def test_p_b_composed_from_x0_is_the_path_marginal(pipe, sde: str) -> None:
    """Σ-composition of the P_B kernels from x_0: N((1-σ) x_0, σ² I) at every σ of the list,
    analytically (mean coefficient and variance) and by Monte Carlo."""
    k_steps = 4
    policy = pipe.policy(1.0, k_steps, 0.7, sde=sde)
    sigmas = pipe.scheduler.sigmas.double()  # [K + 1], the last 0
    kernels = [_kernel_from_log_pb(policy, k) for k in range(k_steps)]  # step k: σ_k ← σ_{k+1}
    x0 = torch.randn(1, 256, generator=_gen(3)).double()
    mean_coef, var = 1.0, 0.0
    samples = x0.expand(4000, 256).clone()  # [N, d] Monte Carlo chains, all from x_0
    gen = _gen(4)
    for k in reversed(range(k_steps)):
        a, b = kernels[k]
        mean_coef, var = a * mean_coef, a**2 * var + b**2
        samples = a * samples + b * torch.randn(samples.shape, generator=gen).double()
        s = float(sigmas[k])
        assert abs(mean_coef - (1 - s)) < 1e-5 and abs(var - s**2) < 1e-5
        resid = samples - (1 - s) * x0  # ~ N(0, σ²)
        assert resid.mean().abs() < 0.01 and abs(resid.std().item() / s - 1) < 0.01


# ----------------------------------------------------------------------------------------------
# Flow-GRPO's SDE
# ----------------------------------------------------------------------------------------------
def test_flow_grpo_sde_is_a_valid_density(pipe, ref) -> None:
    """log_prob is the Normal of the step's own mean and std, and those are Flow-GRPO's
    ``μ = x + (v̂ + std_t² ε̂ / 2σ) Δ``, ``std = a √(σ/(1-σ)) √-Δ``; every step is stochastic."""
    a_level, w = 0.7, 4.0
    policy = pipe.policy(w, K, a_level, sde="flow-grpo")
    cond = pipe.prompt_cond(PROMPTS, w, max_sequence_length=SEQ)
    sigmas = policy.scheduler.sigmas.double().tolist()
    x, gen = _latents(), _gen(5)
    for k in range(K):
        with torch.no_grad():
            out = policy.step(x, k, cond, generator=gen)
            v = _velocity(ref, x, policy.scheduler.timesteps[k], w)
        s, s2 = sigmas[k], sigmas[k + 1]
        std_t = a_level * (s / (1 - (s2 if s == 1 else s))) ** 0.5
        mean = x + (v + std_t**2 / (2 * s) * (x + (1 - s) * v)) * (s2 - s)
        assert not out.deterministic.any()
        torch.testing.assert_close(out.std, torch.full((2,), std_t * (s - s2) ** 0.5).float())
        torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-5)
        expected = _normal_sum(out.sample, out.mean, out.std.view(-1, 1, 1, 1))
        torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-3)
        z = (out.sample - out.mean) / out.std.view(-1, 1, 1, 1)  # the draw is the density's
        assert z.mean().abs() < 0.1 and abs(z.std().item() - 1) < 0.05
        x = out.sample
    traj = _sample(pipe, a_level, sde="flow-grpo")
    assert not bool(traj.trajectory.deterministic.any())
    assert traj.trajectory.extras["sde"] == "flow-grpo"


# ----------------------------------------------------------------------------------------------
# the shared policy contract: families, the deterministic map, LoRA and gradients
# ----------------------------------------------------------------------------------------------
def test_family_and_deterministic_map(pipe) -> None:
    assert family_of(pipe.transformer).name == "sd3" and denoiser_of(pipe) is pipe.transformer
    transformer = copy.deepcopy(pipe.transformer)
    policy = make_policy(transformer, pipe.scheduler, num_inference_steps=K, eta=1.0,
                         guidance_scale=4.0)  # fmt: skip
    assert isinstance(policy, FlowMatchPolicy) and policy.sample_shape == (16, 8, 8)
    frozen = copy.deepcopy(pipe.transformer).requires_grad_(False)
    prior = FlowMatchPolicy(frozen, pipe.scheduler, 4.0, K, 1.0)
    with torch.no_grad():  # the policy's weights drift from the prior's
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cond = pipe.prompt_cond(PROMPTS, 4.0, max_sequence_length=SEQ)
    policy.deterministic_map = prior
    assert policy.frozen_steps().tolist() == [False, False, True]
    assert policy.trainable_steps() == [0, 1]
    with torch.no_grad():
        traj = rollout(policy, cond=cond, generator=_gen(6))
        expected = prior.step(traj.latents[:, -2], K - 1, cond).sample
    torch.testing.assert_close(traj.x0, expected)
    assert (traj.log_pf[:, -1] == 0).all() and (traj.log_pf[:, :-1] != 0).all()


def test_lora_round_trip_through_diffusers_and_gradients_reach_lora_only(tmp_path: Path) -> None:
    pipe = tiny_sd3_pipeline(seed=0)
    kw = dict(num_inference_steps=K, guidance_scale=4.0, latents=_latents(),
              max_sequence_length=SEQ, output_type="pt")  # fmt: skip
    base = pipe(PROMPTS, eta=0.0, progress=False, **kw).images
    pipe.add_lora(rank=2)
    with torch.no_grad():
        for p in lora_parameters(pipe.transformer):
            p.normal_(0, 0.3)
    tuned = pipe(PROMPTS, eta=0.0, progress=False, **kw).images
    assert (tuned - base).abs().max() > 1e-3  # the adapter changes the images
    pipe.save_lora_weights(tmp_path / "lora")
    plain = StableDiffusion3Pipeline(**tiny_sd3_components(seed=0))
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(tmp_path / "lora")
    theirs = plain(PROMPTS, **kw).images
    assert (theirs - tuned).abs().max().item() <= 1e-5
    # gradients: a stochastic step's log-prob reaches the adapter only; the prior is the base
    policy = pipe.policy(4.0, K, 1.0)
    cond = pipe.prompt_cond(PROMPTS, 4.0, max_sequence_length=SEQ)
    with torch.no_grad():
        traj = rollout(policy, cond=cond, generator=_gen(7))
    lp = policy.log_prob(traj.latents[:, 1], traj.latents[:, 2], 1, cond)
    lp.sum().backward()
    grads = {n: p.grad for n, p in pipe.transformer.named_parameters()}
    assert any("lora_" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    with torch.no_grad():
        lp_prior = policy.frozen_prior().log_prob(traj.latents[:, 1], traj.latents[:, 2], 1, cond)
        fresh = tiny_sd3_pipeline(seed=0).policy(4.0, K, 1.0)
        lp_base = fresh.log_prob(traj.latents[:, 1], traj.latents[:, 2], 1, cond)
    assert not torch.allclose(lp.detach(), lp_prior)
    torch.testing.assert_close(lp_prior, lp_base, rtol=1e-5, atol=1e-3)


def test_save_and_load(pipe, ref, tmp_path: Path) -> None:
    """Our folder and a plain diffusers SD3 folder both load as the steer pipeline."""
    pipe.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "diffusers")
    kw = dict(num_inference_steps=K, guidance_scale=4.0, eta=0.5, max_sequence_length=SEQ,
              output_type="pt", progress=False)  # fmt: skip
    a = pipe(PROMPTS, generator=_gen(8), **kw).images
    for folder in ("ours", "diffusers"):
        again = load_pipeline(tmp_path / folder)
        assert type(again) is SteerStableDiffusion3Pipeline and again.text_encoder_3 is None
        b = again(PROMPTS, generator=_gen(8), **kw).images
        assert (a - b).abs().max().item() <= 1e-6
    c = pipe(PROMPTS, generator=_gen(9), **kw).images
    assert (a - c).abs().max() > 1e-3  # η > 0: the generator matters


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_raises_naming_the_value_and_the_choices(pipe) -> None:
    t, flow = pipe.transformer, pipe.scheduler
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler.*got DDIMScheduler"):
        FlowMatchPolicy(t, DDIMScheduler())
    with pytest.raises(TypeError, match="driven by FlowMatchPolicy, not DiffusionPolicy"):
        DiffusionPolicy(t, DDIMScheduler())
    with pytest.raises(TypeError, match="driven by DiffusionPolicy, not FlowMatchPolicy"):
        FlowMatchPolicy(tiny_sd_pipeline().unet, flow)
    for eta in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"eta={eta} is outside \[0, 1\].*flow-grpo"):
            FlowMatchPolicy(t, flow, eta=eta)
    with pytest.raises(ValueError, match="noise level a.*>= 0, got -1"):
        FlowMatchPolicy(t, flow, eta=-1.0, sde="flow-grpo")
    with pytest.raises(ValueError, match=r"sde must be one of \('ddim', 'flow-grpo'\), got 'ode'"):
        FlowMatchPolicy(t, flow, sde="ode")
    inverted = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    with pytest.raises(ValueError, match="must end at 0.*got 1.0.*sigma_min"):
        FlowMatchPolicy(t, inverted, num_inference_steps=K)
    with pytest.raises(ValueError, match=r"sigma_min=0.5 must be in \[0, 0.008"):
        FlowMatchPolicy(t, flow, num_inference_steps=K, sigma_min=0.5)
    for option in ("use_dynamic_shifting", "stochastic_sampling"):
        with pytest.raises(ValueError, match=f"{option}=True is not supported"):
            FlowMatchPolicy(t, FlowMatchEulerDiscreteScheduler(**{option: True}))
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        SteerStableDiffusion3Pipeline(**{**tiny_sd3_components(), "scheduler": DDIMScheduler()})
    with pytest.raises(ValueError, match="text_encoder_3 and tokenizer_3 go together"):
        SteerStableDiffusion3Pipeline(**{**pipe.components, "tokenizer_3": pipe.tokenizer})
    policy = pipe.policy(1.0, K, 1.0)
    embeds, _ = pipe.text_embeddings(PROMPTS, SEQ)  # diffusers' prompt_embeds, not packed
    with pytest.raises(ValueError, match=r"D \+ P = 32 \+ 24\] \(steer.*pack_cond.*got width 32"):
        policy.step(_latents(), 0, embeds)
    with pytest.raises(ValueError, match=r"cond must be packed conditioning \[B=2, L, D \+ P\]"):
        policy.step(_latents(), 0, pipe.encode_prompt(PROMPTS[:1], max_sequence_length=SEQ))
