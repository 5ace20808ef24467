"""The record-and-replay fast path of :class:`steer.toy.sampler.DiffusionSampler` (ReLU trunks).

Without the reparametrisation gradient (off-policy training, ``detach_states=True``, or no
autograd) the state MLP runs step by step without autograd, recording its activations into
preallocated buffers; ``log_pf`` then gets its gradient from one batched backward over all
``B·T`` recorded states (:class:`ReplayedTrunk`): no second forward pass and no per-step
autograd graph. Stored states are re-scored the same way (:func:`record_trunk` then
:func:`replay_trunk`).

Internal to :mod:`steer.toy`; the public entry point is :func:`steer.toy.rollout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from steer.ops import log_normal
from steer.trajectory import StepCallback, StepRecord, Trajectory

# ``sampler`` below is a steer.toy.sampler.DiffusionSampler (typed as its nn.Module base here:
# sampler.py imports this module, never the reverse)
DiffusionSampler = nn.Module

__all__ = [
    "Record",
    "ReplayedTrunk",
    "Workspace",
    "record_trunk",
    "replay_trunk",
    "rollout_recorded",
]

CHUNK_ROWS = 2048  # rows per chunk of the replayed backward (a few hundred KiB per tensor)


class Workspace:
    """Activation buffers reused across recorded rollouts of one shape, and the generation
    count that lets a stale :class:`Record` detect that a later rollout overwrote them."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, list[Tensor]] = {}
        self.generation = 0

    def claim(self, key: tuple, shapes: list[tuple[int, ...]], **like: object) -> list[Tensor]:
        """The buffers of ``key`` (allocated on first use, the previous shape's dropped); each
        call starts a new generation."""
        if key not in self.buffers:
            self.buffers.clear()
            self.buffers[key] = [torch.empty(shape, **like) for shape in shapes]  # type: ignore[arg-type]
        self.generation += 1
        return self.buffers[key]


@dataclass
class Record:
    """Activations of one no-grad pass of the state MLP, time-major: inputs ``x [T, B, d]``,
    post-ReLU hidden states ``[T, B, H]`` per layer, outputs ``[T, B, n_out]``."""

    x: Tensor | None
    hs: list[Tensor] = field(default_factory=list)
    out: Tensor | None = None
    owner: Workspace | None = None  # set when the buffers are a reused workspace
    generation: int = 0

    def check(self) -> None:
        """Raise if a later rollout has overwritten this record's reused buffers."""
        if self.owner is not None and self.owner.generation != self.generation:
            raise RuntimeError(
                "the activations recorded by this rollout were overwritten by a later "
                "rollout of the same shape before backward(); call backward() on each "
                "rollout's loss before the next rollout, or roll out under torch.no_grad()"
            )


def record_trunk(sampler: DiffusionSampler, x: Tensor, temb: Tensor) -> Record:
    """No-grad pass of the state MLP over ``x [T, B, d]`` (ReLU, time-major), keeping the
    activations that :class:`ReplayedTrunk` needs for its batched backward."""
    with torch.no_grad():
        w_in = sampler.x_in.weight.T.expand(len(x), -1, -1)
        h = torch.baddbmm(temb[:, None, :], x, w_in)
        hs = [h.relu_()]
        for layer in sampler.hidden_layers:
            hs.append(nn.functional.linear(hs[-1], layer.weight, layer.bias).relu_())
        out = nn.functional.linear(hs[-1], sampler.out.weight, sampler.out.bias)
    return Record(x, hs, out)


def replay_trunk(sampler: DiffusionSampler, record: Record, temb: Tensor) -> Tensor:
    """The recorded outputs ``[T, B, n_out]``, with a graph to the weights when one is being
    built (one batched backward, no second forward)."""
    assert record.out is not None
    if not torch.is_grad_enabled():
        return record.out
    weights = [sampler.x_in.weight]
    for layer in sampler.hidden_layers:
        weights += [layer.weight, layer.bias]
    weights += [sampler.out.weight, sampler.out.bias]
    if not (temb.requires_grad or any(w.requires_grad for w in weights)):
        return record.out
    return ReplayedTrunk.apply(record, temb, *weights)


def _activation_buffers(
    sampler: DiffusionSampler, n_steps: int, batch: int, record: Record | None
) -> tuple[list[Tensor], Tensor]:
    """Hidden ``[T, B, H]`` and output ``[T, B, n_out]`` buffers of a recorded rollout.

    When a graph is being built (``record`` given) they come from the sampler's
    :class:`Workspace`, reused across calls of the same shape (fresh multi-MiB allocations
    cost page faults on every iteration); ``record`` then takes the reuse generation, and a
    backward through a record whose buffers a later rollout overwrote raises instead of
    returning wrong gradients."""
    like = {"device": sampler.times.device, "dtype": sampler.times.dtype}
    shapes = [(n_steps, batch, sampler.config.hidden)] * (len(sampler.hidden_layers) + 1)
    shapes.append((n_steps, batch, sampler.n_out))
    if record is None:  # no graph: nothing outlives this call
        bufs = [torch.empty(shape, **like) for shape in shapes]  # type: ignore[arg-type]
        return bufs[:-1], bufs[-1]
    workspace: Workspace = sampler._workspace
    bufs = workspace.claim((n_steps, batch, like["device"], like["dtype"]), shapes, **like)
    record.owner, record.generation = workspace, workspace.generation
    return bufs[:-1], bufs[-1]


def _step_log_prob(
    sampler: DiffusionSampler,
    x: Tensor,
    o: Tensor,
    x_next: Tensor,
    score: Tensor | None,
    scale: Tensor | None,
) -> Tensor:
    """``log P_F(x_next | x)`` ``[B]`` of one step from its trunk output ``o`` (for callbacks)."""
    drift, std, _ = sampler._drift_std(o, score, scale)
    return log_normal(x_next, x + sampler.dt * drift, std)


def rollout_recorded(
    sampler: DiffusionSampler,
    x: Tensor,
    noise: Tensor,
    explore: float,
    temb: Tensor,
    lgv_scale: Tensor | None,
    callback: StepCallback | None = None,
) -> Trajectory:
    """Rollout without the reparametrisation gradient: the MLP runs step by step without
    autograd into preallocated activation buffers, then ``log_pf`` (and the flow head) are
    computed for all steps at once from the replayed outputs.

    ``callback`` runs inside the loop after each step; its ``log_prob`` is that step's density
    computed on the side without a graph (equal to the returned ``log_pf[:, k]`` up to float
    rounding: the trajectory's column is the replayed, batched one)."""
    cfg, (n_steps, batch, d) = sampler.config, noise.shape
    dt, clip = sampler.dt, cfg.drift_clip
    record = Record(None)
    keep = torch.is_grad_enabled()
    times = sampler.times[:-1].tolist() if callback is not None else []
    with torch.no_grad():
        # Every step writes into its slice of the buffers (``addmm(..., out=)``);
        # ``unbind`` makes the per-step views once.
        hs, out = _activation_buffers(sampler, n_steps, batch, record if keep else None)
        temb_d = temb.detach()
        b_hidden = [layer.bias.detach() for layer in sampler.hidden_layers]
        b_out = sampler.out.bias.detach()
        xs = x.new_empty(n_steps + 1, batch, d)
        xs[0] = x
        scores = x.new_empty(n_steps, batch, d) if cfg.langevin else None
        h_k = [h.unbind(0) for h in hs]
        out_k, x_k, noise_k = out.unbind(0), xs.unbind(0), noise.unbind(0)
        w_in = sampler.x_in.weight.detach().T
        w_hidden = [layer.weight.detach().T for layer in sampler.hidden_layers]
        w_out = sampler.out.weight.detach().T
        scale = lgv_scale.detach() if lgv_scale is not None else None
        plain = not (cfg.langevin or cfg.learned_variance)
        std = math.sqrt(cfg.sigma**2 * dt + explore**2)  # fixed variance
        for k in range(n_steps):
            x = x_k[k]
            h = torch.addmm(temb_d[k], x, w_in, out=h_k[0][k]).relu_()
            for i, (w, b) in enumerate(zip(w_hidden, b_hidden, strict=True)):
                h = torch.addmm(b, h, w, out=h_k[i + 1][k]).relu_()
            o = torch.addmm(b_out, h, w_out, out=out_k[k])
            score = None
            if plain:  # x_{k+1} = x_k + h·clip(drift) + std·ε
                torch.add(noise_k[k], o[:, :d].clamp(-clip, clip), alpha=dt, out=x_k[k + 1])
                x_k[k + 1].add_(x).add_(noise_k[k], alpha=std - 1)
            else:
                if scores is not None:
                    scores[k] = score = sampler.target_score(x)
                drift, step_std, _ = sampler._drift_std(
                    o, score, None if scale is None else scale[k]
                )
                if explore > 0 and isinstance(step_std, float):
                    step_std = math.sqrt(step_std**2 + explore**2)
                elif explore > 0:
                    step_std = (step_std.square() + explore**2).sqrt()
                mean = torch.add(x, drift, alpha=dt)
                if isinstance(step_std, float):
                    torch.add(mean, noise_k[k], alpha=step_std, out=x_k[k + 1])
                else:
                    torch.addcmul(mean, step_std, noise_k[k], out=x_k[k + 1])
            if callback is not None:
                scale_k = None if scale is None else scale[k]
                lp = _step_log_prob(sampler, x, o, x_k[k + 1], score, scale_k)
                callback(k, times[k], StepRecord(sample=x_k[k + 1], log_prob=lp))
    record.x, record.hs, record.out = xs[:-1], hs, out
    scale = lgv_scale[:, None] if lgv_scale is not None else None  # [T, 1, 1 or d]
    drift, std_all, flow = sampler._drift_std(replay_trunk(sampler, record, temb), scores, scale)
    if isinstance(std_all, Tensor):
        std_all = std_all.transpose(0, 1)
    latents = xs.transpose(0, 1)  # [B, T+1, d]
    mean = (xs[:-1] + dt * drift).transpose(0, 1)  # [B, T, d]
    log_pf = log_normal(latents[:, 1:], mean, std_all)  # [B, T]
    extras: dict[str, Tensor] = {}
    if scores is not None:
        extras["scores"] = scores.transpose(0, 1)
    if flow is not None:
        extras["log_flow"] = flow.transpose(0, 1)  # [B, T]
    return sampler._trajectory(latents, log_pf, extras)


def _relu_grad(grad: Tensor, activation: Tensor) -> Tensor:
    """``grad · 1[activation > 0]`` (ATen's fused ReLU backward: one pass, no mask tensor)."""
    return torch.ops.aten.threshold_backward(grad, activation, 0)


class ReplayedTrunk(torch.autograd.Function):
    """The state MLP's outputs for all recorded states, differentiable in the weights.

    The forward returns the recorded outputs (nothing is recomputed); the backward is one
    batched pass over the ``N = T·B`` recorded activations: for each linear layer the weight
    gradient ``gᵀ h`` and the input gradient ``g W`` are single ``N``-row matrix products. The
    per-time embedding (which carries the input bias) gets ``Σ_b g``.
    """

    @staticmethod
    def forward(ctx, record: Record, temb: Tensor, *weights: Tensor) -> Tensor:  # noqa: D102
        ctx.record = record
        ctx.save_for_backward(*weights)
        return record.out  # computed without autograd: nothing to detach

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        rec, weights = ctx.record, ctx.saved_tensors
        rec.check()
        n_steps, batch, n_out = rec.out.shape
        grad_out = grad_out.contiguous()
        w_in, w_out, hidden = weights[0], weights[-2], weights[1:-2:2]
        grad_w = [torch.zeros_like(w) for w in (w_in, *hidden, w_out)]  # one per linear layer
        grad_b = [w.new_zeros(w.shape[0]) for w in (*hidden, w_out)]  # hidden + output biases
        grad_temb = w_in.new_empty(n_steps, w_in.shape[0])  # [T, H]
        # Chunks of whole time steps keep every intermediate (~chunk × H floats) in cache: the
        # unchunked pass is bound by memory traffic, not by its ~1 GFLOP of products.
        chunk = max(1, CHUNK_ROWS // batch)
        for t0 in range(0, n_steps, chunk):
            t1 = min(n_steps, t0 + chunk)
            hs = [h[t0:t1].reshape(-1, h.shape[-1]) for h in rec.hs]
            g = grad_out[t0:t1].reshape(-1, n_out)
            grad_w[-1].addmm_(g.T, hs[-1])
            grad_b[-1].add_(g.sum(0))
            g = _relu_grad(g @ w_out, hs[-1])
            for i in reversed(range(len(hs) - 1)):  # hidden layer i maps hs[i] -> hs[i + 1]
                grad_w[i + 1].addmm_(g.T, hs[i])
                grad_b[i].add_(g.sum(0))
                g = _relu_grad(g @ hidden[i], hs[i])
            x = rec.x[t0:t1].reshape(-1, rec.x.shape[-1])
            grad_w[0].T.addmm_(x.T, g)  # [d, H] orientation: the fast one for d << H
            torch.sum(g.view(t1 - t0, batch, -1), 1, out=grad_temb[t0:t1])
        grads: list[Tensor] = [grad_w[0]]
        for gw, gb in zip(grad_w[1:-1], grad_b[:-1], strict=True):
            grads += [gw, gb]
        return None, grad_temb, *grads, grad_w[-1], grad_b[-1]
