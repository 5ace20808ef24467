"""A time-discretised diffusion sampler of an unnormalised density (§2, toy form).

The forward policy integrates the SDE ``dx = f_θ(x, t) dt + σ g_θ(x, t) dW`` from ``t = 0`` to
``t = 1`` over ``T`` Euler-Maruyama steps of size ``h = 1/T``, starting from a point mass at 0 or
from ``N(0, σ0² I)``:

    (T1) ``P_F(x_{k+1} | x_k) = N(x_{k+1}; x_k + h f_θ(x_k, t_k), h σ² g_θ² I)``

with ``g_θ = 1`` (fixed variance) or learned. With the Langevin parametrisation the drift is
``f_θ = NN(x, t) + s_θ(t) · clip(∇ log R(x))``. The backward policy is the Brownian bridge of the
reference process ``x_t = x_0 + σ W_t`` (``x_0 ~ N(0, σ0²)``): with ``v_k = σ0² + σ² t_k``,

    (T2) ``P_B(x_k | x_{k+1}) = N(x_k; (v_k / v_{k+1}) x_{k+1}, h σ² (v_k / v_{k+1}) I)``

(deterministic at ``k = 0`` from a point mass: ``log P_B = 0`` there). These are the step
densities (2.5)/(2.6) of §2 in continuous-time form; a trajectory is a
:class:`steer.trajectory.Trajectory` whose ``latents`` run ``x_0, ..., x_T`` (noise to data).

Speed: the time embedding depends on ``t`` alone and is computed once per call for the ``T``
times. Sampling must run the state MLP step by step; without the reparametrisation gradient
(off-policy training, ``detach_states=True``) that pass runs without autograd and records the
hidden activations, and ``log_pf`` gets its gradient from one batched backward over all ``B·T``
recorded states (:class:`_ReplayedTrunk`): no second forward pass and no per-step autograd graph.
Stored states (buffer samples, backward trajectories) are re-scored the same way in one batched
pass (:meth:`DiffusionSampler.evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from steer.trajectory import Trajectory

__all__ = ["SamplerConfig", "DiffusionSampler"]

LOG_2PI = math.log(2 * math.pi)
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "relu": nn.functional.relu,
}


@dataclass
class SamplerConfig:
    """Architecture and SDE of a :class:`DiffusionSampler` (saved as JSON beside the weights)."""

    dim: int
    steps: int = 100  # T
    sigma: float = 1.0  # σ of the reference Brownian motion
    init_std: float = 0.0  # σ0: 0 = point mass at the origin
    hidden: int = 64
    layers: int = 2  # hidden layers of the state MLP after the input layer
    harmonics: int = 16  # Fourier time features: sin/cos(2π j t), j = 1..harmonics
    langevin: bool = False  # add s_θ(t) · clip(∇ log R(x)) to the drift
    langevin_per_dim: bool = False  # s_θ(t) ∈ R^d (one scale per coordinate), else scalar
    score_clip: float = 100.0
    learned_variance: bool = False
    log_var_range: float = 2.0  # g_θ² ∈ [e^-r, e^r]
    flow: bool = False  # a log-flow head (DB, SubTB, energy-difference DB)
    drift_clip: float = 1e4
    activation: str = "relu"  # relu | silu | gelu (relu: half the cost of gelu on CPU)

    def __post_init__(self) -> None:
        for name in ("dim", "steps", "hidden", "harmonics"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.layers < 0:
            raise ValueError(f"layers must be >= 0, got {self.layers}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}"
            )
        if not self.log_var_range > 0:
            raise ValueError(f"log_var_range must be > 0, got {self.log_var_range}")
        if not self.init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")

    def to_dict(self) -> dict:
        return asdict(self)


class DiffusionSampler(nn.Module):
    """Forward policy (T1), Brownian-bridge backward policy (T2) and a learned ``log Z``.

    Args:
        config: the :class:`SamplerConfig`.
        score: ``x [N, d] -> ∇ log R(x) [N, d]``, required when ``config.langevin``.
    """

    def __init__(
        self, config: SamplerConfig, score: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        super().__init__()
        if config.langevin and score is None:
            raise ValueError("config.langevin=True needs the target's score function (score=...)")
        self.config, self.score = config, score
        d, hdim = config.dim, config.hidden
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, config.harmonics + 1.0))
        self.time_mlp = nn.Sequential(
            nn.Linear(2 * config.harmonics, hdim), nn.GELU(), nn.Linear(hdim, hdim)
        )
        n_scale = d if config.langevin_per_dim else 1
        self.lgv_head = nn.Linear(hdim, n_scale) if config.langevin else None
        self.x_in = nn.Linear(d, hdim)
        self.hidden_layers = nn.ModuleList(nn.Linear(hdim, hdim) for _ in range(config.layers))
        self.n_out = d * (2 if config.learned_variance else 1) + (1 if config.flow else 0)
        self.out = nn.Linear(hdim, self.n_out)
        nn.init.zeros_(self.out.weight)  # start as the reference process: zero drift
        nn.init.zeros_(self.out.bias)
        self.log_z = nn.Parameter(torch.zeros(()))
        self._workspace: dict[tuple, list[Tensor]] = {}  # reused rollout activation buffers
        self._generation = 0
        t = torch.arange(config.steps + 1, dtype=torch.float32) / config.steps
        self.register_buffer("times", t)  # [T+1]
        var = config.init_std**2 + config.sigma**2 * t  # [T+1], v_k of (T2)
        self.register_buffer("bridge_ratio", var[:-1] / var[1:])  # [T], v_k / v_{k+1}

    # ----------------------------------------------------------------------------------------
    # network
    # ----------------------------------------------------------------------------------------
    @property
    def dt(self) -> float:
        return 1.0 / self.config.steps

    def time_embedding(self) -> tuple[Tensor, Tensor | None]:
        """Per-time embedding ``[T, H]`` (plus the input bias) and Langevin scale ``[T, 1]``
        (``[T, d]`` per coordinate)."""
        angles = self.times[:-1, None] * self.freqs  # [T, J]
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))  # [T, H]
        scale = self.lgv_head(emb) if self.lgv_head is not None else None
        return emb + self.x_in.bias, scale

    def _trunk(self, x: Tensor, temb: Tensor) -> Tensor:
        """State MLP: ``x [..., d]`` and its time embedding (broadcast) -> ``[..., n_out]``."""
        act = _ACTIVATIONS[self.config.activation]
        if x.ndim == 2:  # one step: fuse the time embedding into the input matmul
            h = act(torch.addmm(temb, x, self.x_in.weight.T))
        else:
            h = act(nn.functional.linear(x, self.x_in.weight) + temb)
        for layer in self.hidden_layers:
            h = act(layer(h))
        return self.out(h)

    def _drift_std(
        self, out: Tensor, score: Tensor | None, lgv_scale: Tensor | None
    ) -> tuple[Tensor, Tensor | float, Tensor | None]:
        """Split the head: drift ``[..., d]``, step std ``sqrt(h σ² g²)``, log-flow ``[...]``."""
        cfg, d = self.config, self.config.dim
        drift = out[..., :d].clamp(-cfg.drift_clip, cfg.drift_clip)
        if score is not None and lgv_scale is not None:
            drift = drift + lgv_scale * score.clamp(-cfg.score_clip, cfg.score_clip)
        base = cfg.sigma * math.sqrt(self.dt)
        std: Tensor | float = base
        if cfg.learned_variance:
            std = base * torch.exp(0.5 * cfg.log_var_range * torch.tanh(out[..., d : 2 * d]))
        flow = out[..., -1] if cfg.flow else None
        return drift, std, flow

    def _record(self, x: Tensor, temb: Tensor) -> _Record:
        """No-grad pass of the state MLP over ``x [T, B, d]`` (ReLU, time-major), keeping the
        activations that :class:`_ReplayedTrunk` needs for its batched backward."""
        with torch.no_grad():
            h = torch.baddbmm(temb[:, None, :], x, self.x_in.weight.T.expand(len(x), -1, -1))
            hs = [h.relu_()]
            for layer in self.hidden_layers:
                hs.append(nn.functional.linear(hs[-1], layer.weight, layer.bias).relu_())
            out = nn.functional.linear(hs[-1], self.out.weight, self.out.bias)
        return _Record(x, hs, out)

    def _replay(self, record: _Record, temb: Tensor) -> Tensor:
        """The recorded outputs ``[T, B, n_out]``, with a graph to the weights when one is
        being built (one batched backward, no second forward)."""
        if not torch.is_grad_enabled():
            return record.out
        weights = [self.x_in.weight]
        for layer in self.hidden_layers:
            weights += [layer.weight, layer.bias]
        weights += [self.out.weight, self.out.bias]
        if not (temb.requires_grad or any(w.requires_grad for w in weights)):
            return record.out
        return _ReplayedTrunk.apply(record, temb, *weights)

    def _activation_buffers(
        self, n_steps: int, batch: int, record: _Record | None
    ) -> tuple[list[Tensor], Tensor]:
        """Hidden ``[T, B, H]`` and output ``[T, B, n_out]`` buffers of a recorded rollout.

        When a graph is being built (``record`` given) they are kept and reused across calls
        of the same shape
        (fresh multi-MiB allocations cost page faults on every iteration); ``record`` then
        takes the reuse generation, and a backward through a record whose buffers a later
        rollout overwrote raises instead of returning wrong gradients."""
        dev, dtype = self.times.device, self.times.dtype
        shapes = [(n_steps, batch, self.config.hidden)] * (len(self.hidden_layers) + 1)
        shapes.append((n_steps, batch, self.n_out))
        if record is None:  # no graph: nothing outlives this call
            bufs = [torch.empty(shape, device=dev, dtype=dtype) for shape in shapes]
            return bufs[:-1], bufs[-1]
        key = (n_steps, batch, dev, dtype)
        if key not in self._workspace:
            self._workspace.clear()
            self._workspace[key] = [torch.empty(shape, device=dev, dtype=dtype) for shape in shapes]
        self._generation += 1
        record.owner, record.generation = self, self._generation
        bufs = self._workspace[key]
        return bufs[:-1], bufs[-1]

    def _fast(self) -> bool:
        """Whether the record-and-replay path applies (ReLU: its derivative is the output's
        sign, so the recorded activations suffice)."""
        return self.config.activation == "relu"

    def target_score(self, x: Tensor) -> Tensor:
        """``∇ log R(x)`` of the target (no graph kept), shape of ``x``."""
        if self.score is None:
            raise RuntimeError("this sampler has no score function")
        return self.score(x).detach()

    # ----------------------------------------------------------------------------------------
    # densities
    # ----------------------------------------------------------------------------------------
    def log_p_init(self, x0: Tensor) -> Tensor:
        """``log P_F(x_0 | s0)`` ``[B]``: 0 for the point mass, else ``log N(x_0; 0, σ0² I)``."""
        s0 = self.config.init_std
        if s0 == 0:
            return x0.new_zeros(x0.shape[0])
        return -0.5 * (x0.square().sum(-1) / s0**2 + x0.shape[-1] * (LOG_2PI + 2 * math.log(s0)))

    def evaluate(
        self, latents: Tensor, scores: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Re-score stored states in one batched pass: ``log P_F`` ``[B, T]`` of (T1) and the
        log-flow head ``[B, T]`` at ``x_0..x_{T-1}`` (None without a flow head).

        ``latents`` is ``[B, T+1, d]``; ``scores`` ``[B, T, d]`` the target score at
        ``x_0..x_{T-1}`` (computed here when the Langevin drift needs it and none is given).
        """
        cfg = self.config
        if latents.ndim != 3 or latents.shape[1:] != (cfg.steps + 1, cfg.dim):
            raise ValueError(
                f"latents must be [B, T+1, d]=[B, {cfg.steps + 1}, {cfg.dim}], "
                f"got {tuple(latents.shape)}"
            )
        x, x_next = latents[:, :-1], latents[:, 1:]  # [B, T, d]
        temb, lgv_scale = self.time_embedding()  # [T, H], [T, 1 or d]
        if cfg.langevin and scores is None:
            scores = self.target_score(x.reshape(-1, cfg.dim)).view_as(x)
        if self._fast() and not latents.requires_grad:
            x_tm = x.detach().transpose(0, 1).contiguous()  # [T, B, d]
            out = self._replay(self._record(x_tm, temb.detach()), temb).transpose(0, 1)
        else:
            out = self._trunk(x, temb)
        drift, std, flow = self._drift_std(out, scores, lgv_scale)
        return _log_normal(x_next, x + self.dt * drift, std), flow

    def log_pb(self, latents: Tensor) -> Tensor:
        """``log P_B(x_k | x_{k+1})`` of the Brownian bridge (T2), shape ``[B, T]``."""
        ratio = self.bridge_ratio.to(latents.dtype)  # [T]
        x, x_next = latents[:, :-1], latents[:, 1:]  # [B, T, d]
        mean = ratio[:, None] * x_next
        std = (self.config.sigma**2 * self.dt * ratio).sqrt()[:, None]  # [T, 1]
        out = _log_normal(x, mean, std.clamp_min(1e-30))
        if self.config.init_std == 0:
            out = torch.cat([out.new_zeros(out.shape[0], 1), out[:, 1:]], dim=1)
        return out

    # ----------------------------------------------------------------------------------------
    # sampling
    # ----------------------------------------------------------------------------------------
    def rollout(
        self,
        batch: int,
        explore: float = 0.0,
        generator: torch.Generator | None = None,
        detach_states: bool = False,
    ) -> Trajectory:
        """Sample ``batch`` forward trajectories (T1); ``explore > 0`` widens each step's
        sampling variance from ``h σ² g²`` to ``h σ² g² + explore²`` (an exploration std per
        step, not per unit time, as in Sendera et al.) while ``log_pf`` stays that of the
        policy (off-policy).

        Gradients follow the states (reparametrised) unless ``detach_states`` (then ``log_pf``
        keeps the graph of each step's mean and std only, the TB gradient of off-policy
        training) or the caller disables them. ``extras["scores"]`` ``[B, T, d]`` if Langevin,
        ``extras["log_flow"]`` ``[B, T]`` with a flow head.
        """
        cfg, like = self.config, {"device": self.times.device, "dtype": self.times.dtype}
        x = torch.randn(batch, cfg.dim, generator=generator, **like) * cfg.init_std
        noise = torch.randn(cfg.steps, batch, cfg.dim, generator=generator, **like)
        temb, lgv_scale = self.time_embedding()  # [T, H], [T, 1 or d]: once per t
        if self._fast() and (detach_states or not torch.is_grad_enabled()):
            return self._rollout_recorded(x, noise, explore, temb, lgv_scale)
        states, means, stds, scores, flows = [x], [], [], [], []
        for k in range(cfg.steps):
            score = self.target_score(x) if cfg.langevin else None
            drift, std, flow = self._drift_std(
                self._trunk(x, temb[k]), score, None if lgv_scale is None else lgv_scale[k]
            )
            mean = torch.add(x, drift, alpha=self.dt)
            sample_std = std
            if explore > 0 and isinstance(std, float):
                sample_std = math.sqrt(std**2 + explore**2)
            elif explore > 0:
                sample_std = (std.square() + explore**2).sqrt()
            if isinstance(sample_std, float):
                x = torch.add(mean, noise[k], alpha=sample_std)
            else:
                x = torch.addcmul(mean, sample_std, noise[k])
            if detach_states:
                x = x.detach()
            states.append(x), means.append(mean), stds.append(std)
            if score is not None:
                scores.append(score)
            if flow is not None:
                flows.append(flow)
        latents = torch.stack(states, dim=1)  # [B, T+1, d]
        std_all = torch.stack(stds, 1) if cfg.learned_variance else stds[0]
        log_pf = _log_normal(latents[:, 1:], torch.stack(means, dim=1), std_all)  # [B, T]
        extras = {"scores": torch.stack(scores, dim=1)} if scores else {}
        if flows:
            extras["log_flow"] = torch.stack(flows, dim=1)  # [B, T]
        return self._trajectory(latents, log_pf, extras)

    def _rollout_recorded(
        self, x: Tensor, noise: Tensor, explore: float, temb: Tensor, lgv_scale: Tensor | None
    ) -> Trajectory:
        """Rollout without the reparametrisation gradient: the MLP runs step by step without
        autograd into preallocated activation buffers, then ``log_pf`` (and the flow head) are
        computed for all steps at once from the replayed outputs."""
        cfg, (n_steps, batch, d) = self.config, noise.shape
        dt, clip = self.dt, cfg.drift_clip
        record = _Record(None, [], None)  # type: ignore[arg-type]
        keep = torch.is_grad_enabled()
        with torch.no_grad():
            # Every step writes into its slice of the buffers (``addmm(..., out=)``);
            # ``unbind`` makes the per-step views once.
            hs, out = self._activation_buffers(n_steps, batch, record if keep else None)
            temb_d = temb.detach()
            b_hidden = [layer.bias.detach() for layer in self.hidden_layers]
            b_out = self.out.bias.detach()
            xs = x.new_empty(n_steps + 1, batch, d)
            xs[0] = x
            scores = x.new_empty(n_steps, batch, d) if cfg.langevin else None
            h_k = [h.unbind(0) for h in hs]
            out_k, x_k, noise_k = out.unbind(0), xs.unbind(0), noise.unbind(0)
            w_in = self.x_in.weight.detach().T
            w_hidden = [layer.weight.detach().T for layer in self.hidden_layers]
            w_out = self.out.weight.detach().T
            scale = lgv_scale.detach() if lgv_scale is not None else None
            plain = not (cfg.langevin or cfg.learned_variance)
            std = math.sqrt(cfg.sigma**2 * dt + explore**2)  # fixed variance
            for k in range(n_steps):
                x = x_k[k]
                h = torch.addmm(temb_d[k], x, w_in, out=h_k[0][k]).relu_()
                for i, (w, b) in enumerate(zip(w_hidden, b_hidden, strict=True)):
                    h = torch.addmm(b, h, w, out=h_k[i + 1][k]).relu_()
                o = torch.addmm(b_out, h, w_out, out=out_k[k])
                if plain:  # x_{k+1} = x_k + h·clip(drift) + std·ε
                    torch.add(noise_k[k], o[:, :d].clamp(-clip, clip), alpha=dt, out=x_k[k + 1])
                    x_k[k + 1].add_(x).add_(noise_k[k], alpha=std - 1)
                    continue
                score = None
                if scores is not None:
                    scores[k] = score = self.target_score(x)
                drift, step_std, _ = self._drift_std(o, score, None if scale is None else scale[k])
                if explore > 0 and isinstance(step_std, float):
                    step_std = math.sqrt(step_std**2 + explore**2)
                elif explore > 0:
                    step_std = (step_std.square() + explore**2).sqrt()
                mean = torch.add(x, drift, alpha=dt)
                if isinstance(step_std, float):
                    torch.add(mean, noise_k[k], alpha=step_std, out=x_k[k + 1])
                else:
                    torch.addcmul(mean, step_std, noise_k[k], out=x_k[k + 1])
        record.x, record.hs, record.out = xs[:-1], hs, out
        scale = lgv_scale[:, None] if lgv_scale is not None else None  # [T, 1, 1 or d]
        drift, std, flow = self._drift_std(self._replay(record, temb), scores, scale)
        if isinstance(std, Tensor):
            std = std.transpose(0, 1)
        latents = xs.transpose(0, 1)  # [B, T+1, d]
        mean = (xs[:-1] + dt * drift).transpose(0, 1)  # [B, T, d]
        log_pf = _log_normal(latents[:, 1:], mean, std)  # [B, T]
        extras: dict[str, Tensor] = {}
        if scores is not None:
            extras["scores"] = scores.transpose(0, 1)
        if flow is not None:
            extras["log_flow"] = flow.transpose(0, 1)  # [B, T]
        return self._trajectory(latents, log_pf, extras)

    def backward_rollout(self, x: Tensor, generator: torch.Generator | None = None) -> Trajectory:
        """Noise the samples ``x [B, d]`` back to ``x_0`` with the bridge (T2) and score the
        result under the forward policy (one batched pass; gradients are the caller's choice)."""
        latents = self.bridge(x, generator)
        log_pf, _ = self.evaluate(latents)
        return self._trajectory(latents, log_pf, {})

    def bridge(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """States ``[B, T+1, d]`` of backward trajectories from ``x [B, d]`` under the bridge
        (T2), without scoring them (no graph)."""
        cfg = self.config
        if x.ndim != 2 or x.shape[1] != cfg.dim:
            raise ValueError(f"x must be [B, d]=[B, {cfg.dim}], got {tuple(x.shape)}")
        x = x.detach()
        ratio = self.bridge_ratio.to(x.dtype)  # [T]
        step_std = (cfg.sigma**2 * self.dt * ratio).sqrt()  # [T]
        noise = torch.randn(
            cfg.steps, *x.shape, generator=generator, device=x.device, dtype=x.dtype
        )
        states = [x]
        for k in reversed(range(cfg.steps)):
            x = ratio[k] * x + step_std[k] * noise[k]
            states.append(x)
        return torch.stack(states[::-1], dim=1)  # [B, T+1, d]

    def _trajectory(self, latents: Tensor, log_pf: Tensor, extras: dict) -> Trajectory:
        return Trajectory(
            latents=latents,
            timesteps=self.times[:-1],
            log_pf=log_pf,
            log_pb=self.log_pb(latents),
            log_p_init=self.log_p_init(latents[:, 0]),
            extras=extras,
        )


@dataclass
class _Record:
    """Activations of one no-grad pass of the state MLP, time-major: inputs ``x [T, B, d]``,
    post-ReLU hidden states ``[T, B, H]`` per layer, outputs ``[T, B, n_out]``."""

    x: Tensor
    hs: list[Tensor]
    out: Tensor
    owner: DiffusionSampler | None = None  # set when the buffers are a reused workspace
    generation: int = 0

    def check(self) -> None:
        """Raise if a later rollout has overwritten this record's reused buffers."""
        if self.owner is not None and self.owner._generation != self.generation:
            raise RuntimeError(
                "the activations recorded by this rollout were overwritten by a later "
                "rollout of the same shape before backward(); call backward() on each "
                "rollout's loss before the next rollout, or roll out under torch.no_grad()"
            )


def _relu_grad(grad: Tensor, activation: Tensor) -> Tensor:
    """``grad · 1[activation > 0]`` (ATen's fused ReLU backward: one pass, no mask tensor)."""
    return torch.ops.aten.threshold_backward(grad, activation, 0)


class _ReplayedTrunk(torch.autograd.Function):
    """The state MLP's outputs for all recorded states, differentiable in the weights.

    The forward returns the recorded outputs (nothing is recomputed); the backward is one
    batched pass over the ``N = T·B`` recorded activations: for each linear layer the weight
    gradient ``gᵀ h`` and the input gradient ``g W`` are single ``N``-row matrix products. The
    per-time embedding (which carries the input bias) gets ``Σ_b g``.
    """

    @staticmethod
    def forward(ctx, record: _Record, temb: Tensor, *weights: Tensor) -> Tensor:  # noqa: D102
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
        chunk = max(1, _CHUNK_ROWS // batch)
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


_CHUNK_ROWS = 2048  # rows per chunk of the replayed backward (a few hundred KiB per tensor)


def _log_normal(x: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """``Σ_d log N(x; mean, std²)`` over the last dimension (a true density, §2)."""
    d = x.shape[-1]
    if isinstance(std, float):
        return -0.5 * (x - mean).square().sum(-1) / std**2 - d * (math.log(std) + 0.5 * LOG_2PI)
    z = (x - mean) / std
    return -0.5 * z.square().sum(-1) - std.log().expand_as(x).sum(-1) - 0.5 * d * LOG_2PI
