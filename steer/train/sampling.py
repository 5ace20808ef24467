"""Sample → reward: one rollout batch with everything the objectives need.

The rollout runs without gradients under the current weights. The reward of ``x̂_θ(x_k)`` at
every visited state (energy-difference DB, 3.5) is computed here, once, from the ``x̂`` the
rollout already produced with the ε of its own UNet pass: no extra UNet pass, one decode and one
reward call per visited state. The model producing ``x̂`` is therefore the policy at rollout time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from steer.diffusion import DiffusionPolicy, rollout
from steer.train.batch import RolloutBatch
from steer.train.config import FinetuneConfig
from steer.train.objectives import FinetuneObjective, make_objective

Decode = Callable[[Tensor], Tensor]  # latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1]


@dataclass
class Conditioning:
    """Encoded prompt set (or none, for unconditional models)."""

    prompts: list[str] | None
    embeds: Tensor | None = None  # [P, L, D]
    pooled: Tensor | None = None  # [P, D]

    def draw(self, batch: int, generator: torch.Generator, group: int = 1) -> Tensor | None:
        """Prompt indices ``[B]`` drawn uniformly with this rank's generator; ``group > 1``:
        ``B / group`` prompts, each repeated ``group`` times in consecutive rows."""
        if self.prompts is None:
            return None
        if group > 1:
            drawn = torch.randint(len(self.prompts), (batch // group,), generator=generator)
            return drawn.repeat_interleave(group)
        return torch.randint(len(self.prompts), (batch,), generator=generator)


class NonFiniteError(RuntimeError):
    """A reward or loss was not finite; carries what is needed to report it."""

    def __init__(self, term: str, indices: list[int], prompts: list[str] | None) -> None:
        self.term, self.indices, self.prompts = term, indices, prompts
        super().__init__(f"non-finite {term} at batch indices {indices} (prompts: {prompts})")


def score(reward, images: Tensor, prompts: list[str] | None) -> Tensor:
    """Raw reward ``[N]`` of images, without gradients (the reward batches internally), in
    float32 even inside an autocast region."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        return reward(images.float(), prompts).float()


def decode_in_chunks(decode: Decode, latents: Tensor, chunk: int) -> Tensor:
    """``decode(latents)`` ``chunk`` latents at a time (the VAE's activations of one chunk in
    memory, not of the batch: about 2 GB an image at 1024²)."""
    return torch.cat([decode(part) for part in latents.split(chunk)])


def decode_and_score(
    reward, decode: Decode, latents: Tensor, prompts: list[str] | None, chunk: int
) -> Tensor:
    """Raw rewards ``[N]`` of ``N`` latents, decoded and scored ``chunk`` at a time: the x̂ of
    every visited state (``B × K`` latents) never sits decoded in memory at once (at 512² a
    decoded image and its VAE activations take about 0.5 GB)."""
    out = []
    for start in range(0, latents.shape[0], chunk):
        part = None if prompts is None else prompts[start : start + chunk]
        out.append(score(reward, decode(latents[start : start + chunk]), part))
    return torch.cat(out)


def _float32(decode: Decode, device: torch.device) -> Decode:
    """``decode`` with autocast off: a rollout under autocast still decodes in float32."""

    def wrapped(latents: Tensor) -> Tensor:
        with torch.autocast(device.type, enabled=False):
            return decode(latents)

    return wrapped


def prior_log_probs(
    policy: DiffusionPolicy, prior: DiffusionPolicy, traj, embeds: Tensor | None
) -> Tensor:
    """``log P_F^prior`` of every step of ``traj`` ``[B, K]`` (no grad). Where the policy's
    frozen map is this prior, its steps were the prior's own: their log-probs are copied from
    ``traj.log_pf`` instead of recomputed."""
    shared = policy.frozen_steps() if policy.deterministic_map is prior else None
    columns = []
    for j in range(traj.num_steps):
        if shared is not None and bool(shared[j]):
            columns.append(traj.log_pf[:, j])
        else:
            columns.append(prior.log_prob(traj.latents[:, j], traj.latents[:, j + 1], j, embeds))
    return torch.stack(columns, dim=1)


def sample_batch(
    cfg: FinetuneConfig,
    policy: DiffusionPolicy,
    prior: DiffusionPolicy | None,
    reward,
    decode: Decode,
    cond: Conditioning,
    generator: torch.Generator,
    gather: Callable[[Tensor], Tensor],
    rank: int = 0,
    objective: FinetuneObjective | None = None,
) -> RolloutBatch:
    """One rollout of ``cfg.train.batch_size`` trajectories, rewarded, with what ``objective``
    declares it needs (default: the objective the config names, built without modules)."""
    b = cfg.train.batch_size
    needs = cfg.objective.needs if objective is None else objective.needs
    device = policy.device
    decode = _float32(decode, device)  # only the UNet passes follow the caller's autocast
    # 1. prompts and the rollout (no grad)
    if objective is None:
        objective = make_objective(cfg.objective) if needs.advantages else None
    idx = cond.draw(b, generator, 1 if objective is None else objective.group_size)
    embeds = None if idx is None else cond.embeds[idx].to(device)
    prompts = None if idx is None else [cond.prompts[i] for i in idx.tolist()]
    noise = None
    if cfg.train.exploration_scale > 0:  # off-policy exploration: σ × (1 + scale)
        shape = (b, cfg.model.num_inference_steps, *policy.sample_shape)
        noise = torch.randn(shape, generator=generator) * (1 + cfg.train.exploration_scale)
    with torch.no_grad():
        traj = rollout(
            policy,
            batch_size=b if embeds is None else None,
            cond=embeds,
            num_inference_steps=cfg.model.num_inference_steps,
            eta=cfg.model.eta,
            generator=generator,
            keep_pred_x0=needs.reward_pred,
            noise=None if noise is None else noise.to(device),
        )
        # 2. the reward of x_0, and of x̂_θ(x_k) at every visited state for db / subtb
        chunk = cfg.model.decode_batch_size or b  # images decoded at once (VAE activations)
        images = decode_in_chunks(decode, traj.x0, chunk)
        if not bool(torch.isfinite(images).all()):  # the policy itself diverged
            bad = torch.nonzero(~torch.isfinite(images.flatten(1)).all(1)).flatten().tolist()
            raise NonFiniteError(
                "sample (policy output)",
                bad,
                None if prompts is None else [prompts[i] for i in bad],
            )
        raw = score(reward, images, prompts)  # [B]
        log_reward = raw / cfg.objective.beta
        log_reward_pred = None
        if needs.reward_pred:
            k = traj.num_steps
            flat = traj.pred_x0.flatten(0, 1)  # [B*K, ...]
            rep = None if prompts is None else [p for p in prompts for _ in range(k)]
            log_reward_pred = decode_and_score(reward, decode, flat, rep, chunk=chunk).view(b, k)
            log_reward_pred = log_reward_pred / cfg.objective.beta
        # 3. the frozen prior's log-probs on the same trajectory (rtb): one no-grad pass per
        # step the policy took itself; the steps its frozen map (the prior) took score the same
        log_pf_prior = None
        if needs.prior_log_probs:
            log_pf_prior = prior_log_probs(policy, prior, traj, embeds)  # [B, K]
    for term, values in (("reward", raw), ("reward of x̂", log_reward_pred)):
        if values is not None and not bool(torch.isfinite(values).all()):
            bad = torch.nonzero(~torch.isfinite(values.view(b, -1).sum(1))).flatten().tolist()
            raise NonFiniteError(term, bad, None if prompts is None else [prompts[i] for i in bad])
    # 4. advantages from rewards gathered over every process, normalised per prompt
    advantages = None
    if needs.advantages:
        group = objective.group_ids(None if idx is None else idx.to(device), b, rank)
        all_raw = gather(raw)
        all_group = None if group is None else gather(group.to(device))
        advantages = objective.advantages(all_raw, all_group)
        advantages = advantages[rank * b : (rank + 1) * b]  # this process's rows
    return RolloutBatch(
        traj=traj,
        raw_reward=raw,
        log_reward=log_reward,
        prompt_index=None if idx is None else idx.to(device),
        pooled=None if idx is None or cond.pooled is None else cond.pooled[idx].to(device),
        log_reward_pred=log_reward_pred,
        log_pf_prior=log_pf_prior,
        advantages=advantages,
        extras={"prompts": prompts, "images": images},
    )
