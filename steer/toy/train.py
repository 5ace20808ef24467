"""Training of a :class:`DiffusionSampler` with a GFlowNet objective, on- and off-policy.

Every iteration samples trajectories without a graph (forward rollouts, with exploration noise,
or backward bridges from replay-buffer samples), re-scores them in one batched pass under the
current weights and applies an objective of :mod:`steer.objectives` (§3).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from steer import objectives as obj
from steer.config import check_number
from steer.toy import checkpoint as toy_ckpt
from steer.toy.buffer import BUFFER_KINDS, ReplayBuffer, mala
from steer.toy.metrics import evaluate_sampler
from steer.toy.sampler import DiffusionSampler, SamplerConfig
from steer.toy.targets import Target, gmm25

__all__ = ["TOY_OBJECTIVES", "ToyConfig", "ToyRunConfig", "TrainResult", "objective_loss", "train"]

TOY_OBJECTIVES = ("tb", "vargrad", "subtb", "db", "fldb", "rtb")
_NEEDS_FLOW = ("subtb", "db", "fldb")


def _is_module_function(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr and ":" not in attr)


@dataclass(frozen=True)
class _Placeholder:
    """What :meth:`ToyConfig.sampler_config` reads of a target, before there is one."""

    dim: int
    default_sigma: float = 1.0


@dataclass
class ToyConfig:
    """Options of ``steer toy train``. The defaults are the gmm25 setting measured in
    benchmarks/README.md: TB with the Langevin drift, per-step exploration noise decayed over
    the first half of training, a 600k rank-prioritised replay buffer fed by MALA local search,
    every second iteration on backward trajectories from it, lr 5e-3 decayed (cosine) to 5e-4
    over a 540 s budget."""

    target: str = "gmm25"
    objective: str = "tb"
    steps: int = 100
    sigma: float | None = None  # None: the target's default
    init_std: float = 0.0
    hidden: int = 64
    layers: int = 2
    activation: str = "relu"
    langevin: bool = True  # the target score in the drift (autograd where no closed form)
    langevin_per_dim: bool = False  # one Langevin scale per coordinate
    learned_variance: bool = False
    log_var_range: float = 2.0  # learned g² within [e^-r, e^r]
    batch: int = 300
    iterations: int = 50_000  # the time budget (max_time_s) usually ends training first
    lr: float = 5e-3
    lr_log_z: float = 1e-1
    lr_final: float = 5e-4  # cosine decay of lr to this value over iterations or max_time_s
    grad_clip: float = 100.0
    explore: float = 0.2  # per-step exploration std added to the sampling noise, decayed linearly
    explore_until: float = 0.5  # fraction of the iterations after which exploration is 0
    buffer: str = "rank"  # none | uniform | rank
    buffer_size: int = 600_000
    backward_every: int = 2  # every n-th iteration trains on backward trajectories (0: never)
    local_search: bool = True
    ls_every: int = 100
    ls_steps: int = 100
    ls_batch: int = 600
    subtb_lambda: float = 0.9
    seed: int = 0
    eval_every: int = 500
    eval_samples: int = 2000
    # wall-clock budget; the lr and exploration schedules follow max(it / iterations, elapsed /
    # max_time_s), so a resumed run equals a straight one exactly only when it never binds
    # (null, or very large)
    max_time_s: float | None = 540.0
    checkpoint_every: int = 0  # iterations between checkpoints in the run folder (0: none)
    checkpoints_total_limit: int = 2  # the newest complete checkpoints kept
    resume: bool = False  # continue from the newest complete checkpoint in the run folder
    prior_iterations: int = 2000  # posterior9: denoising iterations of the prior
    dim: int | None = None  # the dimension of a module:function energy (named targets know it)

    def __post_init__(self) -> None:
        from steer.toy.registry import TARGETS  # the registry imports no training code

        if self.target not in TARGETS and not _is_module_function(self.target):
            raise ValueError(
                f"unknown target {self.target!r}; valid: {', '.join(TARGETS)} or module:function"
            )
        if self.target not in TARGETS and self.dim is None:
            raise ValueError(f"user energy {self.target!r} needs dim=<its dimension> (or --dim)")
        if self.objective not in TOY_OBJECTIVES:
            raise ValueError(
                f"unknown objective {self.objective!r}; valid: {', '.join(TOY_OBJECTIVES)}"
            )
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps T must be an integer >= 1, got {self.steps!r}")
        if self.buffer not in ("none", *BUFFER_KINDS):
            raise ValueError(
                f"buffer must be one of none, {', '.join(BUFFER_KINDS)}, got {self.buffer!r}"
            )
        for name in ("batch", "iterations", "eval_samples", "eval_every", "buffer_size"):
            check_number(name, getattr(self, name), ge=1)
        for name in ("ls_every", "ls_steps", "ls_batch", "prior_iterations"):
            check_number(name, getattr(self, name), ge=1)
        if self.local_search and self.buffer == "none":
            raise ValueError("local_search needs a replay buffer: set buffer to uniform or rank")
        check_number("explore", self.explore, ge=0)
        check_number("explore_until", self.explore_until, ge=0, le=1)
        for name in ("lr", "lr_log_z"):
            check_number(name, getattr(self, name), gt=0)
        check_number("lr_final", self.lr_final, ge=0)
        check_number("grad_clip", self.grad_clip, ge=0)  # 0: no clipping
        check_number("backward_every", self.backward_every, ge=0)  # 0: never
        check_number("subtb_lambda", self.subtb_lambda, ge=0)
        check_number("seed", self.seed, ge=0)
        if self.max_time_s is not None:
            check_number("max_time_s", self.max_time_s, gt=0)
        check_number("checkpoint_every", self.checkpoint_every, ge=0)
        check_number("checkpoints_total_limit", self.checkpoints_total_limit, ge=1)
        if self.sigma is not None:
            check_number("sigma", self.sigma, gt=0)
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be >= 1 (or null for a named target), got {self.dim}")
        # the sampler's own checks (hidden, layers, activation, init_std, log_var_range), on
        # placeholder values of what only the target knows
        self.sampler_config(_Placeholder(self.dim or 1))  # type: ignore[arg-type]

    def sampler_config(self, target: Target) -> SamplerConfig:
        return SamplerConfig(
            dim=target.dim,
            steps=self.steps,
            sigma=self.sigma if self.sigma is not None else target.default_sigma,
            init_std=self.init_std,
            hidden=self.hidden,
            layers=self.layers,
            activation=self.activation,
            langevin=self.langevin,
            langevin_per_dim=self.langevin_per_dim,
            learned_variance=self.learned_variance,
            log_var_range=self.log_var_range,
            flow=self.objective in _NEEDS_FLOW,
        )

    def prior_config(self) -> SamplerConfig:
        """The ``posterior9`` prior's :class:`SamplerConfig`: this config's SDE and network on
        gmm25, without the Langevin drift or a flow head.

        The prior is a diffusion model fitted to gmm25 samples by denoising: it is known through
        its samples, with no density and so no score of its own for a Langevin drift (the gmm25
        score would hand it the density it is meant to learn from data). The RTB sampler is a
        copy of it (:func:`train`), so it has no Langevin drift either."""
        return replace(
            self.sampler_config(gmm25()), langevin=False, langevin_per_dim=False, flow=False
        )


@dataclass
class ToyRunConfig:
    """A ``steer toy train`` run as saved in its ``config.yaml``: the options, and the resolved
    :class:`SamplerConfig` of the trained sampler and of the posterior9 prior (if any)."""

    train: ToyConfig
    sampler: SamplerConfig
    prior_sampler: SamplerConfig | None = None


@dataclass
class TrainResult:
    sampler: DiffusionSampler
    history: list[dict[str, Any]] = field(default_factory=list)
    iterations: int = 0
    wall_time_s: float = 0.0
    seconds_per_iteration: float = 0.0


def objective_loss(
    objective: str,
    sampler: DiffusionSampler,
    latents: Tensor,
    log_reward: Tensor,
    target: Target,
    scores: Tensor | None = None,
    prior: DiffusionSampler | None = None,
    subtb_lambda: float = 0.9,
    scored: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor:
    """Per-trajectory squared-residual loss ``[B]`` of trajectories ``latents [B, T+1, d]``:
    TB (3.1), VarGrad (3.2), RTB (3.3), DB (3.4), energy-difference DB (3.5, with
    ``x̂(x_k) = x_k`` and the reward tempered by ``t_k``) or SubTB (3.6).

    The states are re-scored under the current weights unless ``scored = (log_pf, log_flow)``
    already holds them (a rollout's own ``log_pf`` with its graph, ``[B, T]`` each)."""
    if scored is None:
        scored = sampler.evaluate(latents, scores)
    log_pf, flow = scored  # [B, T], [B, T] | None
    log_pb = sampler.log_pb(latents)  # [B, T]
    log_p0 = sampler.log_p_init(latents[:, 0])  # [B]
    if objective == "tb":
        delta = obj.trajectory_balance(log_p0 + log_pf.sum(1), log_pb, log_reward, sampler.log_z)
        return obj.squared(delta)
    if objective == "vargrad":
        return obj.squared(obj.vargrad(log_p0 + log_pf.sum(1), log_pb, log_reward))
    if objective == "rtb":
        if prior is None:
            raise ValueError("objective 'rtb' needs a prior (use --target posterior9)")
        with torch.no_grad():
            log_pf_prior, _ = prior.evaluate(latents)  # [B, T]
        delta = obj.relative_trajectory_balance(log_pf, log_pf_prior, log_reward, sampler.log_z)
        return obj.squared(delta)
    assert flow is not None, "flow objectives need SamplerConfig(flow=True)"
    start = (sampler.log_z + log_p0)[:, None]  # [B, 1]: log F(x_0) = log Z + log P_F(x_0|s0)
    if objective == "fldb":
        b, t1, d = latents.shape
        with torch.no_grad():
            lr_all = target.log_prob(latents.reshape(-1, d)).view(b, t1)  # [B, T+1]
        pred = lr_all * sampler.times.to(lr_all)  # t_k log R(x_k): 0 at x_0, log R at x_T
        pred[:, -1] = log_reward
        resid = torch.cat([start - pred[:, :1], flow[:, 1:]], dim=1)  # [B, T] F̃ at x_0..x_{T-1}
        resid_next = torch.cat([resid[:, 1:], torch.zeros_like(resid[:, :1])], dim=1)
        terminal = torch.zeros_like(log_pf, dtype=torch.bool)
        terminal[:, -1] = True
        delta = obj.energy_difference_detailed_balance(
            resid, log_pf, resid_next, log_pb, pred[:, :-1], pred[:, 1:], terminal
        )
        return delta.square().mean(1)
    log_flows = torch.cat([start, flow[:, 1:], log_reward[:, None]], dim=1)  # [B, T+1]
    if objective == "db":
        delta = obj.detailed_balance(log_flows[:, :-1], log_pf, log_flows[:, 1:], log_pb)
        return delta.square().mean(1)
    return obj.subtrajectory_balance(log_flows, log_pf, log_pb, lam=subtb_lambda)


def _optimizer(sampler: DiffusionSampler, cfg: ToyConfig) -> torch.optim.Optimizer:
    policy = [p for n, p in sampler.named_parameters() if n != "log_z"]
    return torch.optim.Adam(
        [{"params": policy, "lr": cfg.lr}, {"params": [sampler.log_z], "lr": cfg.lr_log_z}]
    )


def _set_lr(opt: torch.optim.Optimizer, cfg: ToyConfig, frac: float) -> None:
    """Cosine decay of the policy's lr from ``lr`` to ``lr_final`` (log Z keeps its lr)."""
    opt.param_groups[0]["lr"] = cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (
        1 + math.cos(math.pi * frac)
    )


def _reward(target: Target, x: Tensor, objective: str) -> Tensor:
    """``log R`` for the objective: the likelihood ``log r`` for RTB, else the target."""
    if objective == "rtb":
        return target.log_likelihood(x)  # type: ignore[attr-defined]
    return target.log_prob(x)


def train(
    cfg: ToyConfig,
    target: Target,
    sampler: DiffusionSampler | None = None,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
) -> TrainResult:
    """Train a sampler of ``target`` (a fresh one unless given); returns it with its history.
    ``checkpoint_dir`` holds the checkpoints of ``cfg.checkpoint_every`` (and one at the end);
    ``cfg.resume`` continues from the newest complete one there, ``resume_from`` from that
    checkpoint folder (``steer.toy.checkpoint``)."""
    if (cfg.checkpoint_every or cfg.resume) and not checkpoint_dir:
        raise ValueError("checkpoint_every and resume need a checkpoint_dir (steer toy: --out)")
    torch.manual_seed(cfg.seed)
    torch.set_flush_denormal(True)  # tiny activations as denormals slow CPU kernels ~2x
    prior = getattr(target, "prior", None)
    if cfg.objective == "rtb" and (prior is None or not hasattr(target, "log_likelihood")):
        raise ValueError(
            f"objective 'rtb' needs a prior and a likelihood; target "
            f"{target.name!r} has none (use target posterior9)"
        )
    if sampler is None and cfg.objective == "rtb":
        # RTB (3.3) fine-tunes the prior: the same SDE, network and drift, from its weights.
        # The posterior's score ∇log p_prior + ∇log r needs the prior's marginal density,
        # which a denoising model does not have, so cfg's Langevin options do not apply.
        sampler = DiffusionSampler(replace(prior.config), score=prior.score)
        sampler.load_state_dict(prior.state_dict())
    elif sampler is None:
        score = target.score if cfg.langevin else None
        sampler = DiffusionSampler(cfg.sampler_config(target), score=score)
    opt = _optimizer(sampler, cfg)
    buffer = None if cfg.buffer == "none" else ReplayBuffer(target.dim, cfg.buffer_size, cfg.buffer)
    result, eta, start = TrainResult(sampler), 0.01, time.perf_counter()
    if cfg.resume or resume_from is not None:
        path = toy_ckpt.resolve(checkpoint_dir, asdict(cfg), resume_from)
        saved = toy_ckpt.load(path)
        toy_ckpt.restore(saved, sampler, opt, buffer)
        eta, result.iterations, result.history = saved["eta"], saved["iteration"], saved["history"]
        start -= saved["elapsed_s"]
        print(f"resumed from {path} at iteration {result.iterations}")

    def save_checkpoint() -> None:
        state = toy_ckpt.state_of(sampler, opt, buffer, eta, result.iterations, result.history,
                                  time.perf_counter() - start)  # fmt: skip
        toy_ckpt.save(checkpoint_dir, state, asdict(cfg), cfg.checkpoints_total_limit)

    first, name = result.iterations, f"{target.name}/{cfg.objective}"
    bar = tqdm(range(first, cfg.iterations), initial=first, total=cfg.iterations,
               disable=not progress, desc=name)  # fmt: skip
    saved_at = first
    for it in bar:
        # 0. schedules follow the progress: iterations or time budget, whichever is further.
        progress_frac = it / cfg.iterations
        if cfg.max_time_s is not None:
            progress_frac = max(progress_frac, (time.perf_counter() - start) / cfg.max_time_s)
        _set_lr(opt, cfg, min(1.0, progress_frac))
        # 1. sample trajectories without a graph: backward from the buffer or forward.
        backward = (
            buffer is not None
            and cfg.backward_every > 0
            and len(buffer) >= cfg.batch
            and it % cfg.backward_every == cfg.backward_every - 1
        )
        #    Forward rollouts keep log_pf's graph (their own pass, replayed in one batched
        #    backward); backward trajectories are scored in one batched pass.
        if backward:
            with torch.no_grad():
                x, log_r = buffer.sample(cfg.batch)
                latents = sampler.bridge(x)
                if cfg.objective == "rtb":
                    log_r = _reward(target, x, cfg.objective)
            scored = sampler.evaluate(latents)
        else:
            frac = progress_frac / max(1e-9, cfg.explore_until)
            traj = sampler.rollout(
                cfg.batch, explore=cfg.explore * max(0.0, 1 - frac), detach_states=True
            )
            latents, scored = traj.latents, (traj.log_pf, traj.extras.get("log_flow"))
            with torch.no_grad():
                log_r = _reward(target, traj.x0, cfg.objective)
                if buffer is not None:
                    rtb = cfg.objective == "rtb"
                    buffer.add(traj.x0, target.log_prob(traj.x0) if rtb else log_r)
        # 2. the objective under the current weights, and one step.
        loss = objective_loss(
            cfg.objective, sampler, latents, log_r, target, None, prior, cfg.subtb_lambda, scored
        ).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {it}: lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sampler.parameters(), cfg.grad_clip)
        opt.step()
        # 3. local search feeds the buffer.
        if cfg.local_search and buffer is not None and it % cfg.ls_every == 0 and len(buffer):
            x0, _ = buffer.sample(cfg.ls_batch)
            x_ls, lp_ls, eta = mala(target.log_prob, x0, cfg.ls_steps, eta)
            buffer.add(x_ls, lp_ls)
        if it % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3g}", log_z=f"{sampler.log_z.item():.3f}")
        # 4. periodic evaluation (on 1000 samples, no W2; counted in the wall time).
        result.iterations = it + 1
        elapsed = time.perf_counter() - start
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations:
            with torch.random.fork_rng(devices=[]):  # evaluating never changes the training
                metrics, _ = evaluate_sampler(
                    sampler, target, min(cfg.eval_samples, 1000), sample_quality=False
                )
            result.history.append(
                {
                    "iteration": it + 1,
                    "time_s": elapsed,
                    "loss": loss.item(),
                    **{k: v for k, v in metrics.items() if v is not None},
                }
            )
        if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
            save_checkpoint()
            saved_at = it + 1
        if cfg.max_time_s is not None and elapsed > cfg.max_time_s:
            break
    if cfg.checkpoint_every and saved_at != result.iterations:
        save_checkpoint()
    result.wall_time_s = time.perf_counter() - start
    result.seconds_per_iteration = result.wall_time_s / max(1, result.iterations)
    return result


def config_dict(cfg: ToyConfig) -> dict[str, Any]:
    return asdict(cfg)
