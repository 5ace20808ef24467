"""``rollout``: sample whole trajectories of a :class:`DiffusionPolicy` with their log-densities."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from steer.diffusion.policy import DiffusionPolicy
from steer.diffusion.schedule import gaussian_log_prob
from steer.trajectory import StepCallback, Trajectory, check_batch_size

__all__ = ["rollout", "StepCallback"]


def _initial_latents(
    policy: DiffusionPolicy,
    batch: int,
    latents: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """``x_K``: the given latents (validated) or a draw of ``N(0, I)`` from ``generator``."""
    shape = (batch, *policy.sample_shape)
    if latents is None:
        device = generator.device if generator is not None else policy.device
        return torch.randn(shape, generator=generator, device=device).to(policy.device)
    if not isinstance(latents, Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be a floating-point tensor, got dtype {latents.dtype}")
    return latents.to(policy.device)


def _batch_size(batch_size: int | None, cond: Tensor | None) -> int:
    if cond is not None:
        if not isinstance(cond, Tensor):
            raise TypeError(
                f"cond must be a tensor of prompt embeddings, got {type(cond).__name__}"
            )
        if batch_size is not None and batch_size != cond.shape[0]:
            raise ValueError(f"batch_size={batch_size} does not match cond's batch {cond.shape[0]}")
        return int(cond.shape[0])
    if batch_size is None:
        raise ValueError("batch_size must be an int >= 1 (or give cond), got None")
    return check_batch_size(batch_size)


def _num_steps(num_steps: int | None, num_inference_steps: int | None) -> int | None:
    """``K`` from ``num_steps`` or its diffusers alias ``num_inference_steps`` (None: keep)."""
    if num_steps is None:
        return num_inference_steps
    if num_inference_steps is not None and num_inference_steps != num_steps:
        raise ValueError(
            f"num_steps={num_steps} and num_inference_steps={num_inference_steps} disagree; "
            "give one of them (num_inference_steps is the diffusers name of num_steps)"
        )
    return num_steps


def rollout(
    policy: DiffusionPolicy,
    batch_size: int | None = None,
    *,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    cond: Tensor | None = None,
    num_inference_steps: int | None = None,
    eta: float | None = None,
    grad: bool = False,
    keep_pred_x0: bool = True,
    latents: Tensor | None = None,
    noise: Tensor | None = None,
    progress: bool = False,
) -> Trajectory:
    """Sample ``τ = (s0, x_K, ..., x_0)`` from ``P_F`` (2.1)-(2.5), scoring ``P_B`` (2.6) too.

    The shared rollout contract of :mod:`steer.trajectory`, plus diffusion options.

    Args:
        policy: the forward policy; ``num_steps`` / ``eta`` (if given) reset its schedule.
        batch_size / cond: the batch size, or the conditioning ``[B, L, D]`` / ``[B, 2, L, D]``
            (which sets the batch; a ``batch_size`` given with it must match).
        num_steps: ``K``, the number of denoising steps (default: the policy's current one).
        generator: draws ``x_K`` then each step's noise, in diffusers' order.
        callback: ``callback(k, t_k, StepOutput)`` after each step (a
            :data:`~steer.trajectory.StepCallback`).
        num_inference_steps: diffusers' name of ``num_steps`` (either; both must agree).
        eta: DDIM noise level ``η`` (default: the policy's).
        grad: build the autograd graph (default: no graph; re-score chosen steps later).
        keep_pred_x0: store ``x̂_θ(x_k)`` of every step in ``pred_x0`` ``[B, K, ...]``.
        latents: ``x_K`` ``[B, C, H, W]`` instead of a draw.
        noise: ``[B, K, C, H, W]`` per-step noise instead of draws from ``generator``.
        progress: show a tqdm bar over the steps.

    Returns:
        a :class:`Trajectory`; ``log_pf`` is 0 at steps marked ``deterministic`` (``σ = 0``),
        ``extras`` holds ``eta`` and ``num_inference_steps``.
    """
    # 1. schedule, batch and the first state x_K ~ N(0, I)
    steps = _num_steps(num_steps, num_inference_steps)
    if steps is not None or eta is not None:
        policy.set_timesteps(policy.num_inference_steps if steps is None else steps, eta)
    sched = policy.schedule
    n = sched.num_steps
    batch = _batch_size(batch_size, cond)
    if noise is not None and not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a torch.Tensor [B, K, ...], got {type(noise).__name__}")
    if noise is not None and tuple(noise.shape) != (batch, n, *policy.sample_shape):
        raise ValueError(
            f"noise must have shape {(batch, n, *policy.sample_shape)}, got {tuple(noise.shape)}"
        )
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        x = _initial_latents(policy, batch, latents, generator)  # [B, C, H, W]
        log_p_init = gaussian_log_prob(
            x.float(), torch.zeros_like(x, dtype=torch.float32), torch.ones((), device=x.device)
        )  # [B]
        states, log_pf, log_pb, pred_x0 = [x], [], [], []
        # 2. K steps x_k -> x_{k-1}, scoring P_F and P_B on each transition
        for k in tqdm(range(n), desc="rollout", disable=not progress, leave=False):
            eps = None if noise is None else noise[:, k]
            out = policy.step(x, k, cond, noise=eps, generator=generator)
            log_pf.append(out.log_prob)
            log_pb.append(policy.log_pb(x, out.sample, k))
            if keep_pred_x0:
                pred_x0.append(out.pred_x0)
            if callback is not None:
                callback(k, int(sched.timesteps[k]), out)
            x = out.sample
            states.append(x)
    # 3. pack [B, K(+1), ...]
    return Trajectory(
        latents=torch.stack(states, dim=1),
        timesteps=sched.timesteps.clone(),
        log_pf=torch.stack(log_pf, dim=1),
        log_pb=torch.stack(log_pb, dim=1),
        log_p_init=log_p_init,
        pred_x0=torch.stack(pred_x0, dim=1) if keep_pred_x0 else None,
        deterministic=sched.deterministic.clone(),
        cond=cond,
        extras={"eta": sched.eta, "num_inference_steps": n},
    )
