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

Trajectories come from :func:`rollout` (the rollout contract of :mod:`steer.trajectory`).

Speed: the time embedding depends on ``t`` alone and is computed once per call for the ``T``
times. Sampling must run the state MLP step by step; without the reparametrisation gradient
(off-policy training, ``detach_states=True``) that pass runs without autograd and records the
hidden activations, and ``log_pf`` gets its gradient from one batched backward over all ``B·T``
recorded states (:mod:`steer.toy.recorded`): no second forward pass and no per-step autograd
graph. Stored states (buffer samples, backward trajectories) are re-scored the same way in one
batched pass (:meth:`DiffusionSampler.evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from steer.ops import LOG_2PI, log_normal
from steer.toy.recorded import Workspace, record_trunk, replay_trunk, rollout_recorded
from steer.trajectory import StepCallback, StepRecord, Trajectory, check_batch_size

__all__ = ["SamplerConfig", "DiffusionSampler", "rollout"]

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
        self._workspace = Workspace()  # reused activation buffers of recorded rollouts
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
            out = replay_trunk(self, record_trunk(self, x_tm, temb.detach()), temb)
            out = out.transpose(0, 1)
        else:
            out = self._trunk(x, temb)
        drift, std, flow = self._drift_std(out, scores, lgv_scale)
        return log_normal(x_next, x + self.dt * drift, std), flow

    def log_pb(self, latents: Tensor) -> Tensor:
        """``log P_B(x_k | x_{k+1})`` of the Brownian bridge (T2), shape ``[B, T]``."""
        ratio = self.bridge_ratio.to(latents.dtype)  # [T]
        x, x_next = latents[:, :-1], latents[:, 1:]  # [B, T, d]
        mean = ratio[:, None] * x_next
        std = (self.config.sigma**2 * self.dt * ratio).sqrt()[:, None]  # [T, 1]
        out = log_normal(x, mean, std.clamp_min(1e-30))
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
        """``rollout(self, batch, ...)``: see the module-level :func:`rollout`."""
        return rollout(
            self, batch, generator=generator, explore=explore, detach_states=detach_states
        )

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


def rollout(
    policy: DiffusionSampler,
    batch_size: int,
    *,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    explore: float = 0.0,
    detach_states: bool = False,
) -> Trajectory:
    """Sample ``batch_size`` forward trajectories of (T1), ``latents`` ``x_0, ..., x_T``.

    The rollout contract of :mod:`steer.trajectory`, plus toy options.

    Args:
        policy: the :class:`DiffusionSampler`.
        batch_size: ``B``.
        num_steps: ``T``; the time grid is fixed at construction, so only ``config.steps``
            (or None) is valid.
        generator: draws ``x_0`` then the ``[T, B, d]`` step noise.
        callback: ``callback(k, t_k, StepRecord)`` after each step (a
            :data:`~steer.trajectory.StepCallback`); ``StepRecord.log_prob`` is the step's
            ``log P_F`` (without a graph on the recorded path, see below).
        explore: ``> 0`` widens each step's sampling variance from ``h σ² g²`` to
            ``h σ² g² + explore²`` (an exploration std per step, not per unit time, as in
            Sendera et al.) while ``log_pf`` stays that of the policy (off-policy).
        detach_states: cut the reparametrisation gradient through the states.

    Gradients follow the states (reparametrised) unless ``detach_states`` (then ``log_pf``
    keeps the graph of each step's mean and std only, the TB gradient of off-policy training)
    or the caller disables them; a ReLU trunk then takes the recorded path of
    :mod:`steer.toy.recorded`. ``extras["scores"]`` ``[B, T, d]`` if Langevin,
    ``extras["log_flow"]`` ``[B, T]`` with a flow head.
    """
    if not isinstance(policy, DiffusionSampler):
        raise TypeError(f"policy must be a DiffusionSampler, got {type(policy).__name__}")
    batch, cfg = check_batch_size(batch_size), policy.config
    if num_steps is not None and num_steps != cfg.steps:
        raise ValueError(
            f"num_steps={num_steps!r}, but this sampler has T = config.steps = {cfg.steps} "
            f"steps fixed at construction; pass num_steps=None (or {cfg.steps}), or build a "
            "sampler with SamplerConfig(steps=...)"
        )
    if isinstance(explore, bool) or not isinstance(explore, (int, float)) or not explore >= 0:
        raise ValueError(f"explore must be a number >= 0 (an exploration std), got {explore!r}")
    like = {"device": policy.times.device, "dtype": policy.times.dtype}
    x = torch.randn(batch, cfg.dim, generator=generator, **like) * cfg.init_std
    noise = torch.randn(cfg.steps, batch, cfg.dim, generator=generator, **like)
    temb, lgv_scale = policy.time_embedding()  # [T, H], [T, 1 or d]: once per t
    if policy._fast() and (detach_states or not torch.is_grad_enabled()):
        return rollout_recorded(policy, x, noise, explore, temb, lgv_scale, callback)
    return _rollout_plain(policy, x, noise, explore, temb, lgv_scale, detach_states, callback)


def _rollout_plain(
    policy: DiffusionSampler,
    x: Tensor,
    noise: Tensor,
    explore: float,
    temb: Tensor,
    lgv_scale: Tensor | None,
    detach_states: bool,
    callback: StepCallback | None,
) -> Trajectory:
    """Step-by-step rollout under the caller's autograd mode (any activation); ``log_pf`` of
    all steps in one batched density after the loop."""
    cfg = policy.config
    times = policy.times[:-1].tolist() if callback is not None else []
    states, means, stds, scores, flows = [x], [], [], [], []
    for k in range(cfg.steps):
        score = policy.target_score(x) if cfg.langevin else None
        drift, std, flow = policy._drift_std(
            policy._trunk(x, temb[k]), score, None if lgv_scale is None else lgv_scale[k]
        )
        mean = torch.add(x, drift, alpha=policy.dt)
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
        if callback is not None:
            callback(k, times[k], StepRecord(sample=x, log_prob=log_normal(x, mean, std)))
    latents = torch.stack(states, dim=1)  # [B, T+1, d]
    std_all = torch.stack(stds, 1) if cfg.learned_variance else stds[0]
    log_pf = log_normal(latents[:, 1:], torch.stack(means, dim=1), std_all)  # [B, T]
    extras = {"scores": torch.stack(scores, dim=1)} if scores else {}
    if flows:
        extras["log_flow"] = torch.stack(flows, dim=1)  # [B, T]
    return policy._trajectory(latents, log_pf, extras)
