"""Stable Diffusion XL: parity with diffusers' StableDiffusionXLPipeline, the step densities
(2.3)-(2.6) against torch.distributions, re-scoring, LoRA interchange, families, bad input (tiny,
CPU)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)
from torch.distributions import Normal

from steer.diffusion import (
    FAMILIES,
    DiffusionPolicy,
    SDXLPolicy,
    denoiser_of,
    family_of,
    lora_parameters,
    make_policy,
    pack_sdxl_cond,
    rollout,
    unpack_sdxl_cond,
)
from steer.pipelines import SteerStableDiffusionXLPipeline, load_pipeline
from steer.testing import tiny_sd_pipeline, tiny_sdxl_components, tiny_sdxl_pipeline

PROMPTS = ["a photo of a cat", "a red dog"]
K, W = 3, 5.0
P = 16  # the tiny pooled width (text_encoder_2's projection)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _latents(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=_gen(seed))  # [B, C, h, w]


def _normal_sum(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    return Normal(mean, std).log_prob(x).sum((1, 2, 3))  # [B]


def _plain(components: dict) -> StableDiffusionXLPipeline:
    ref = StableDiffusionXLPipeline(**components, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def pipe() -> SteerStableDiffusionXLPipeline:
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture(scope="module")
def ref(pipe: SteerStableDiffusionXLPipeline) -> StableDiffusionXLPipeline:
    """diffusers' own pipeline over the very same component objects."""
    return _plain(pipe.components)


def _sample(pipe, eta: float, **kw):
    return pipe(PROMPTS, num_inference_steps=K, guidance_scale=W, eta=eta, latents=_latents(),
                output_type="latent", return_trajectory=True, progress=False,
                generator=_gen(1), **kw)  # fmt: skip


def _eps(ref, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε̂ = ε_u + w (ε_c − ε_u) from diffusers' own prompt encoding (zeros as the negative) and
    the UNet with hand-made time ids (h, w, 0, 0, h, w)."""
    pe, npe, pp, npp = ref.encode_prompt(PROMPTS, device="cpu")
    ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).expand(2, 6)
    out = [ref.unet(x, t, encoder_hidden_states=e, added_cond_kwargs={"text_embeds": p,
                                                                       "time_ids": ids}).sample
           for e, p in ((npe, npp), (pe, pp))]  # fmt: skip
    return out[0] + W * (out[1] - out[0])


# ----------------------------------------------------------------------------------------------
# parity with diffusers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "eta, w, size",
    [(0.0, W, {}), (1.0, W, {}), (1.0, 1.0, {}),
     (0.0, W, {"original_size": (32, 24), "crops_coords_top_left": (4, 2)})],
)  # fmt: skip
def test_images_equal_diffusers(pipe, ref, eta: float, w: float, size: dict) -> None:
    """η = 0 with the same latents, η = 1 with the same generator (x_K, then each step's noise
    after the UNet call, as diffusers' DDIM draws it): the same images."""
    latents = _latents() if eta == 0 else None
    kw = dict(num_inference_steps=K, guidance_scale=w, eta=eta, latents=latents)
    ours = pipe(PROMPTS, generator=_gen(2), output_type="pt", return_trajectory=True,
                progress=False, **kw, **size)  # fmt: skip
    theirs = ref(PROMPTS, generator=_gen(2), output_type="pt", **kw, **size).images
    diff = (ours.images - theirs).abs().max().item()
    assert diff <= 1e-5, diff
    assert ours.images.std() > 0.01  # not a constant image: the comparison is not empty
    traj = ours.trajectory
    assert traj.log_pf.shape == (2, K) and bool(traj.deterministic.all()) == (eta == 0.0)
    assert traj.cond.shape == ((2, 16, 32 + P + 6) if w == 1.0 else (2, 2, 16, 32 + P + 6))
    if size:  # the micro-conditioning reaches the UNet: other time ids, other images
        other = pipe(PROMPTS, output_type="pt", progress=False, **kw)
        assert (other.images - ours.images).abs().max() > 1e-4


def test_prompt_encoding_equals_diffusers(pipe, ref) -> None:
    pe, npe, pp, npp = ref.encode_prompt(PROMPTS, device="cpu", negative_prompt="a dog")
    cond = pipe.prompt_cond(PROMPTS, W, negative_prompt="a dog", original_size=(32, 24))
    embeds, pooled, ids = unpack_sdxl_cond(cond, P)  # [B, 2, L, D], [B, 2, P], [B, 2, 6]
    for got, want in ((embeds[:, 1], pe), (pooled[:, 1], pp), (embeds[:, 0], npe),
                      (pooled[:, 0], npp)):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert ids.tolist() == [[[32.0, 24.0, 0.0, 0.0, 16.0, 16.0]] * 2] * 2
    assert torch.equal(pack_sdxl_cond(embeds, pooled, ids), cond)
    zeros = pipe.prompt_cond(PROMPTS, W)[:, 0]  # no negative prompt: diffusers' zeros
    e0, p0, i0 = unpack_sdxl_cond(zeros, P)
    assert (e0 == 0).all() and (p0 == 0).all() and i0.tolist() == [[16.0, 16.0, 0, 0, 16, 16]] * 2


# ----------------------------------------------------------------------------------------------
# the step densities (2.3)-(2.6) and re-scoring
# ----------------------------------------------------------------------------------------------
def test_log_pf_and_log_pb_are_the_normals_of_2_5_and_2_6(pipe, ref) -> None:
    eta = 1.0
    traj = _sample(pipe, eta).trajectory
    acp = pipe.scheduler.alphas_cumprod.double()
    ts = traj.timesteps.tolist()
    alphas = [float(acp[t]) for t in ts] + [float(acp[0])]  # set_alpha_to_one=False
    for k in range(K):
        a_t, a_p = alphas[k], alphas[k + 1]
        x, x_next = traj.latents[:, k], traj.latents[:, k + 1]
        with torch.no_grad():
            eps = _eps(ref, x, traj.timesteps[k])
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # (2.2)
        var = eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)  # (2.3)
        mean = a_p**0.5 * x0 + (1 - a_p - var) ** 0.5 * eps  # (2.4)
        torch.testing.assert_close(traj.pred_x0[:, k], x0.float(), rtol=1e-4, atol=1e-4)
        expected = _normal_sum(x_next, mean.float(), var**0.5)  # (2.5), summed over every dim
        torch.testing.assert_close(traj.log_pf[:, k], expected, rtol=1e-5, atol=1e-3)
        expected_pb = _normal_sum(x, (a_t / a_p) ** 0.5 * x_next, (1 - a_t / a_p) ** 0.5)  # (2.6)
        torch.testing.assert_close(traj.log_pb[:, k], expected_pb, rtol=1e-5, atol=1e-3)
    assert not bool(traj.deterministic.any())


def test_rescoring_a_stored_trajectory_reproduces_its_log_probs(pipe) -> None:
    traj = _sample(pipe, 0.8).trajectory
    policy = pipe.policy(W, 5, 0.1)  # another schedule first...
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
        lp1 = policy.log_prob(first.latents[:, 0], first.latents[:, 1], 0, first.cond)
        assert (lp1 - traj.log_pf[1:, 0]).abs().max().item() <= 1e-4
        other = pipe.prompt_cond(PROMPTS[::-1], W)  # the conditioning matters to the density
        lp2 = policy.log_prob(traj.latents[:, 0], traj.latents[:, 1], 0, other)
    assert (lp2 - traj.log_pf[:, 0]).abs().max().item() > 1e-2


# ----------------------------------------------------------------------------------------------
# families, LoRA and gradients, save and load
# ----------------------------------------------------------------------------------------------
def test_the_sdxl_family_is_decided_by_the_unet_config(pipe) -> None:
    sd = tiny_sd_pipeline(seed=0)
    assert family_of(pipe.unet).name == "sdxl" and denoiser_of(pipe) is pipe.unet
    assert family_of(sd.unet).name == "unet-text"
    assert not FAMILIES["unet-text"].takes(pipe.unet) and not FAMILIES["sdxl"].takes(sd.unet)
    policy = make_policy(pipe.unet, pipe.scheduler, num_inference_steps=K, guidance_scale=W)
    assert type(policy) is SDXLPolicy and policy.sample_shape == (4, 8, 8)
    assert type(make_policy(sd.unet, sd.scheduler, num_inference_steps=K)) is DiffusionPolicy
    frozen = copy.deepcopy(pipe.unet).requires_grad_(False)
    prior = SDXLPolicy(frozen, pipe.scheduler, W, K, sample_size=(6, 4)).frozen_prior()
    assert type(prior) is SDXLPolicy and prior.sample_shape == (4, 6, 4)  # options carried over


def test_lora_round_trip_through_diffusers_and_gradients_reach_lora_only(tmp_path: Path) -> None:
    pipe = tiny_sdxl_pipeline(seed=0)
    kw = dict(num_inference_steps=K, guidance_scale=W, eta=0.0, latents=_latents(),
              output_type="pt")  # fmt: skip
    base = pipe(PROMPTS, progress=False, **kw).images
    pipe.add_lora(rank=2)
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.normal_(0, 0.3, generator=_gen(7))
    tuned = pipe(PROMPTS, progress=False, **kw).images
    assert (tuned - base).abs().max() > 1e-3  # the adapter changes the images
    pipe.save_lora_weights(tmp_path / "lora")
    plain = _plain(tiny_sdxl_components(seed=0))
    plain.load_lora_weights(tmp_path / "lora")
    theirs = plain(PROMPTS, **kw).images
    assert (theirs - tuned).abs().max().item() <= 1e-5
    # gradients: a step's log-prob reaches the adapter only; the frozen prior is the base model
    policy = pipe.policy(W, K, 1.0)
    cond = pipe.prompt_cond(PROMPTS, W)
    with torch.no_grad():
        traj = rollout(policy, cond=cond, generator=_gen(8))
    lp = policy.log_prob(traj.latents[:, 1], traj.latents[:, 2], 1, cond)
    lp.sum().backward()
    grads = {n: p.grad for n, p in pipe.unet.named_parameters()}
    assert any("lora_" in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    with torch.no_grad():
        lp_prior = policy.frozen_prior().log_prob(traj.latents[:, 1], traj.latents[:, 2], 1, cond)
        fresh = tiny_sdxl_pipeline(seed=0).policy(W, K, 1.0)
        lp_base = fresh.log_prob(traj.latents[:, 1], traj.latents[:, 2], 1, cond)
    assert not torch.allclose(lp.detach(), lp_prior)
    torch.testing.assert_close(lp_prior, lp_base, rtol=1e-5, atol=1e-3)


def test_save_and_load(pipe, tmp_path: Path) -> None:
    """Our folder, and a plain diffusers SDXL folder with its Euler scheduler (which becomes DDIM
    with the same config), load as the steer pipeline."""
    pipe.save_pretrained(tmp_path / "ours")
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    _plain({**pipe.components, "scheduler": euler}).save_pretrained(tmp_path / "diffusers")
    kw = dict(num_inference_steps=K, guidance_scale=W, eta=0.5, output_type="pt", progress=False)
    a = pipe(PROMPTS, generator=_gen(9), **kw).images
    for folder in ("ours", "diffusers"):
        again = load_pipeline(tmp_path / folder)
        assert type(again) is SteerStableDiffusionXLPipeline
        assert type(again.scheduler) is DDIMScheduler and again.config.force_zeros_for_empty_prompt
        for key in ("steps_offset", "set_alpha_to_one", "clip_sample", "timestep_spacing"):
            assert again.scheduler.config[key] == pipe.scheduler.config[key]
        b = again(PROMPTS, generator=_gen(9), **kw).images
        assert (a - b).abs().max().item() <= 1e-6
    c = pipe(PROMPTS, generator=_gen(10), **kw).images
    assert (a - c).abs().max() > 1e-3  # η > 0: the generator matters


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_raises_naming_the_value_and_the_fix(pipe, tmp_path: Path) -> None:
    parts = tiny_sdxl_components()
    with pytest.raises(ValueError, match="SDXL needs text_encoder_2: .*CLIPTextModelWithProj"):
        SteerStableDiffusionXLPipeline(**{**parts, "text_encoder_2": None})
    sd = tiny_sd_pipeline(seed=0)
    with pytest.raises(TypeError, match="addition_embed_type='text_time'.*got .*None.*SteerStab"):
        SteerStableDiffusionXLPipeline(**{**parts, "unet": sd.unet})
    with pytest.raises(TypeError, match="SDXLPolicy drives .*text_time.*'unet-text'.*Diffusion"):
        SDXLPolicy(sd.unet, sd.scheduler)
    with pytest.raises(TypeError, match="driven by SDXLPolicy, not DiffusionPolicy"):
        DiffusionPolicy(pipe.unet, pipe.scheduler)
    image_unet = copy.deepcopy(sd.unet)  # a config that needs image_embeds: no family has it
    image_unet.register_to_config(addition_embed_type="image")
    match = "no model family drives this UNet2DConditionModel.*'unet-text' needs .*'sdxl' needs"
    with pytest.raises(TypeError, match=match + ".*text_time"):
        family_of(image_unet)
    policy = pipe.policy(1.0, K, 1.0)
    embeds, _ = pipe.text_embeddings(PROMPTS)  # diffusers' prompt_embeds, not packed
    with pytest.raises(ValueError, match=r"D \+ P \+ 6 = 32 \+ 16 \+ 6\].*got width 32"):
        policy.step(_latents(), 0, embeds)
    with pytest.raises(ValueError, match=r"height and width must be multiples of 2, got 15"):
        pipe(PROMPTS, height=15, num_inference_steps=K, progress=False)
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, 12, 8\)"):
        pipe(PROMPTS, height=24, latents=_latents(), num_inference_steps=K, progress=False)
    pipe.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "text_encoder_2" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="text_encoder_2/config.json is missing"):
        SteerStableDiffusionXLPipeline.from_pretrained(tmp_path / "m")


def test_other_sizes_sample_other_latents(pipe, ref) -> None:
    """height/width as diffusers': latents (h, w) / vae_scale_factor, time ids of that size."""
    kw = dict(height=24, width=16, num_inference_steps=2, guidance_scale=W, eta=0.0)
    ours = pipe(PROMPTS, generator=_gen(3), output_type="pt", progress=False,
                return_trajectory=True, **kw)  # fmt: skip
    theirs = ref(PROMPTS, generator=_gen(3), output_type="pt", **kw).images
    assert ours.images.shape == (2, 3, 24, 16) and ours.trajectory.latents.shape[-2:] == (12, 8)
    assert (ours.images - theirs).abs().max().item() <= 1e-5
