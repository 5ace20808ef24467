"""DiffusionPolicy, rollout, re-scoring, gradients to LoRA, the frozen prior."""

from __future__ import annotations

import copy

import pytest
import torch

from steer.diffusion import (
    DiffusionPolicy,
    add_lora,
    lora_parameters,
    require_frozen,
    rollout,
)
from steer.testing import tiny_ddim_scheduler, tiny_ddpm_components, tiny_sd_pipeline


def _lora_policy(eta: float = 1.0) -> DiffusionPolicy:
    unet = tiny_ddpm_components(channels=1)["unet"]
    add_lora(unet, rank=2)
    with torch.no_grad():  # non-zero adapter, so that it changes the output
        for p in lora_parameters(unet):
            p.normal_(0, 0.3)
    return DiffusionPolicy(unet, tiny_ddim_scheduler(), num_inference_steps=4, eta=eta)


def test_rollout_shapes_and_rescoring() -> None:
    policy = _lora_policy()
    seen: list[int] = []
    traj = rollout(
        policy,
        batch_size=3,
        generator=torch.Generator().manual_seed(0),
        callback=lambda k, t, out: seen.append(t),
    )
    assert traj.latents.shape == (3, 5, 1, 8, 8) and traj.pred_x0.shape == (3, 4, 1, 8, 8)
    assert seen == traj.timesteps.tolist() and not traj.latents.requires_grad
    expected_init = torch.distributions.Normal(0.0, 1.0).log_prob(traj.latents[:, 0]).sum((1, 2, 3))
    torch.testing.assert_close(traj.log_p_init, expected_init)
    # re-scoring every step reproduces the recorded log-probs, int k and per-sample k alike
    for k in range(traj.num_steps):
        x_t, x_next = traj.latents[:, k], traj.latents[:, k + 1]
        with torch.no_grad():
            torch.testing.assert_close(
                policy.log_prob(x_t, x_next, k), traj.log_pf[:, k], atol=1e-4, rtol=1e-5
            )
            torch.testing.assert_close(policy.log_pb(x_t, x_next, k), traj.log_pb[:, k])
    ks = torch.tensor([0, 2, 3])
    rows = torch.arange(3)
    with torch.no_grad():
        lp = policy.log_prob(traj.latents[rows, ks], traj.latents[rows, ks + 1], ks)
    torch.testing.assert_close(lp, traj.log_pf[rows, ks], atol=1e-4, rtol=1e-5)


def test_given_noise_and_latents_reproduce_a_rollout() -> None:
    policy = _lora_policy()
    g = torch.Generator().manual_seed(3)
    traj = rollout(policy, batch_size=2, generator=g)
    noise = (
        traj.latents[:, 1:]
        - torch.stack(
            [
                policy.step(traj.latents[:, k], k, noise=torch.zeros_like(traj.x0)).mean
                for k in range(4)
            ],
            1,
        ).detach()
    ) / policy.schedule.sigma.view(1, 4, 1, 1, 1)
    again = rollout(policy, batch_size=2, latents=traj.latents[:, 0], noise=noise)
    torch.testing.assert_close(again.latents, traj.latents, atol=1e-5, rtol=1e-5)


def test_gradients_reach_lora_only_and_prior_is_base_model() -> None:
    policy = _lora_policy()
    base = copy.deepcopy(policy.unet)
    with torch.no_grad():
        traj = rollout(policy, batch_size=2, generator=torch.Generator().manual_seed(1))
    prior = policy.frozen_prior()
    x_t, x_next = traj.latents[:, 1], traj.latents[:, 2]
    lp = policy.log_prob(x_t, x_next, 1)
    with torch.no_grad():
        lp_prior = prior.log_prob(x_t, x_next, 1)  # adapters off between forward and backward
    lp.sum().backward()
    grads = {n: p.grad for n, p in policy.unet.named_parameters()}
    lora = {n: g for n, g in grads.items() if "lora_" in n}
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values())
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    assert all(p.requires_grad for p in lora_parameters(policy.unet))  # restored
    # the prior is the base model: its log-prob differs from the policy's, equals LoRA-free one
    assert not torch.allclose(lp.detach(), lp_prior)
    with torch.no_grad():
        for p in lora_parameters(base):
            p.zero_()
        base.requires_grad_(False)
        separate = require_frozen(
            DiffusionPolicy(base, tiny_ddim_scheduler(), num_inference_steps=4)
        )
        torch.testing.assert_close(
            separate.log_prob(x_t, x_next, 1), lp_prior, atol=1e-4, rtol=1e-5
        )


def test_rollout_with_grad_end_to_end() -> None:
    policy = _lora_policy()
    traj = rollout(policy, batch_size=2, grad=True, generator=torch.Generator().manual_seed(2))
    assert traj.log_pf.requires_grad and traj.x0.requires_grad
    (traj.log_pf.sum() + traj.x0.square().sum()).backward()
    assert all(p.grad is not None for p in lora_parameters(policy.unet))


def test_prior_with_trainable_parameters_is_refused() -> None:
    unet = tiny_ddpm_components(channels=1)["unet"]
    policy = DiffusionPolicy(unet, tiny_ddim_scheduler(), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"parameter 'conv_in.weight' requires grad"):
        policy.frozen_prior()
    with pytest.raises(ValueError, match="requires grad"):
        require_frozen(policy)


def test_conditional_guidance_and_bad_cond() -> None:
    pipe = tiny_sd_pipeline()
    policy = pipe.policy(guidance_scale=3.0, num_inference_steps=3)
    cond = pipe.prompt_cond(["a cat", "a dog"], 3.0)  # [B, 2, L, D]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps_u = pipe.unet(x, policy.schedule.timesteps[0], cond[:, 0]).sample
        eps_c = pipe.unet(x, policy.schedule.timesteps[0], cond[:, 1]).sample
        guided = policy.model_output(x, torch.zeros(2, dtype=torch.long), cond)
        torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
        # [B, L, D] with negative_embeds set on the policy gives the same
        policy.negative_embeds = cond[:1, 0]
        same = policy.model_output(x, torch.zeros(2, dtype=torch.long), cond[:, 1])
        torch.testing.assert_close(same, guided)
    policy.negative_embeds = None
    with pytest.raises(ValueError, match="needs negative_embeds"):
        policy.step(x, 0, cond[:, 1])
    with pytest.raises(ValueError, match=r"cond must be prompt embeddings \[B=2"):
        policy.step(x, 0, cond[:1])
    with pytest.raises(ValueError, match="batch_size=3 does not match"):
        rollout(policy, batch_size=3, cond=cond)
    with pytest.raises(ValueError, match="noise must have shape"):
        rollout(policy, cond=cond, noise=torch.zeros(2, 2, 4, 8, 8))


def test_deterministic_map_takes_the_sigma_zero_steps() -> None:
    """§2 convention (b): with trailing spacing and set_alpha_to_one the last step has σ = 0;
    the fine-tuned policy's rollout ends with the frozen prior's map g(x_1), not its own."""
    unet = tiny_ddpm_components(channels=1)["unet"]
    frozen = copy.deepcopy(unet).requires_grad_(False)
    sched = tiny_ddim_scheduler(set_alpha_to_one=True, timestep_spacing="trailing")
    prior = DiffusionPolicy(frozen, sched, num_inference_steps=4, eta=1.0)
    policy = DiffusionPolicy(unet, sched, num_inference_steps=4, eta=1.0)
    assert policy.schedule.deterministic.tolist() == [False, False, False, True]
    with torch.no_grad():  # the fine-tuned weights differ from the prior's
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    gen = torch.Generator().manual_seed(0)
    own = rollout(policy, batch_size=2, generator=gen)
    policy.deterministic_map = prior
    gen = torch.Generator().manual_seed(0)
    mapped = rollout(policy, batch_size=2, generator=gen)
    torch.testing.assert_close(mapped.latents[:, :-1], own.latents[:, :-1])  # same noise stream
    x1 = mapped.latents[:, -2]
    with torch.no_grad():
        expected = prior.step(x1, 3).sample
        drifted = policy.step(x1, 2).sample  # a stochastic step still uses the policy's weights
    torch.testing.assert_close(mapped.x0, expected)
    assert not torch.allclose(own.x0, expected)
    assert mapped.log_pf[:, -1].eq(0).all() and drifted.shape == x1.shape
    with pytest.raises(ValueError, match="must be frozen"):
        policy.deterministic_map = DiffusionPolicy(unet, sched, num_inference_steps=4)


def test_frozen_tail_steps_are_the_prior_s_and_carry_no_gradient() -> None:
    """``frozen_tail = N``: the last N steps (stochastic too) sample and score under the frozen
    map, so their RTB terms cancel and no gradient reaches the policy there."""
    unet = tiny_ddpm_components(channels=1)["unet"]
    frozen = copy.deepcopy(unet).requires_grad_(False)
    sched = tiny_ddim_scheduler()
    prior = DiffusionPolicy(frozen, sched, num_inference_steps=4, eta=1.0)
    policy = DiffusionPolicy(unet, sched, num_inference_steps=4, eta=1.0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    policy.deterministic_map, policy.frozen_tail = prior, 2
    assert policy.trainable_steps() == [0, 1]
    traj = rollout(policy, batch_size=2, generator=torch.Generator().manual_seed(0))
    for k in range(4):
        x, y = traj.latents[:, k], traj.latents[:, k + 1]
        mine, theirs = policy.log_prob(x, y, k), prior.log_prob(x, y, k)
        torch.testing.assert_close(traj.log_pf[:, k], mine)
        if k >= 2:
            torch.testing.assert_close(mine, theirs)
            assert not mine.requires_grad
        else:
            assert not torch.allclose(mine, theirs) and mine.requires_grad
    with pytest.raises(ValueError, match="mixes steps of the frozen map"):
        policy.log_prob(traj.latents[:, 1], traj.latents[:, 2], torch.tensor([1, 2]))
    # the trainer copies the frozen steps' prior log-probs instead of recomputing them
    from steer.train.sampling import prior_log_probs

    with torch.no_grad():
        fast = prior_log_probs(policy, prior, traj, None)
        slow = torch.stack(
            [prior.log_prob(traj.latents[:, k], traj.latents[:, k + 1], k) for k in range(4)], 1
        )
    torch.testing.assert_close(fast, slow)
