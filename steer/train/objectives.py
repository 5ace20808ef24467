"""The fine-tuner's objectives as classes: each declares what it needs from a rollout (``Needs``)
and computes its per-step terms; the config, the model builder, the sampler and the loop read
those declarations, never the objective's name.

A rollout is taken without gradients; then a subset ``S`` of its K steps is re-scored under the
current weights with gradients, one step at a time, and back-propagated step by step so that only
one UNet graph lives in memory. For the GFlowNet objectives (tb, vargrad, rtb, db, subtb) the loss
``L`` is a function of the per-step log-probabilities ``log P_F [B, K]``; its exact gradient is
``Σ_k c_k ∇ log P_F(k)`` with ``c = ∂L/∂ log P_F`` computed once by autograd on the rollout's
values. Each re-scored step then contributes the surrogate ``(K/|S|) Σ_b c[b, k] log P_F(k)[b]``,
an unbiased estimate of that gradient (exact when ``S`` holds every step). ``log Z`` and the flow
network get their gradients directly from ``L``. The baselines (ddpo, dpok) are per-step losses.

To add an objective: subclass :class:`GFlowNetObjective` (write ``loss_of_log_pf``) or
:class:`PolicyGradientObjective` (write ``step_loss``), set ``name`` and ``needs``, decorate with
``@register``; ``objective.name=<name>`` then works everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from steer import objectives as O
from steer.objectives import group_normalise
from steer.train.batch import RolloutBatch, StepTerms
from steer.trajectory import Trajectory


class ObjectiveConfig(Protocol):
    """The settings an objective reads (``steer.train.config.ObjectiveConfig`` has them; a
    protocol here so that the config imports the objectives, never the reverse)."""

    name: str
    penalty: str
    subtb_lambda: float
    clip_range: float
    ratio_per_dim: bool
    kl_weight: float
    advantage_clip: float


PENALTIES: dict[str, O.Penalty] = {"squared": O.squared, "huber": O.huber, "log_cosh": O.log_cosh}


@dataclass(frozen=True)
class Needs:
    """What an objective asks of the run and of each rollout."""

    log_z: bool = False  # a learned log Z (table / network), unless objective.log_z_mode=batch
    flow: bool = False  # a flow network F̃(x_k) (energy-difference DB, SubTB)
    prior_log_probs: bool = False  # the frozen prior's log P_F on every step (batch.log_pf_prior)
    reward_pred: bool = False  # log R(x̂_θ(x_k)) at every visited state (batch.log_reward_pred)
    step_means: bool = False  # μ_θ, σ and the prior's mean at each re-scored step (StepTerms)
    advantages: bool = False  # rewards normalised over every process (batch.advantages)
    on_policy: bool = False  # PPO-style rounds, stochastic steps only, no replay / exploration


OBJECTIVES: dict[str, type[FinetuneObjective]] = {}


def register(cls: type[FinetuneObjective]) -> type[FinetuneObjective]:
    """Add an objective class to the registry under its ``name``."""
    if cls.name in OBJECTIVES:
        raise ValueError(f"objective {cls.name!r} is already registered")
    OBJECTIVES[cls.name] = cls
    return cls


def objective_class(name: str) -> type[FinetuneObjective]:
    """The registered class of ``name``; raises with the valid names."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective.name={name!r} is not valid; choose one of "
                         f"{', '.join(OBJECTIVES)}")  # fmt: skip
    return OBJECTIVES[name]


def make_objective(
    cfg: ObjectiveConfig, log_z: nn.Module | None = None, flow: nn.Module | None = None
) -> FinetuneObjective:
    """The objective named by ``cfg.name``, with its learned modules."""
    return objective_class(cfg.name)(cfg, log_z=log_z, flow=flow)


class FinetuneObjective:
    """One objective: ``prepare`` a rollout batch (its direct loss, e.g. for log Z), then
    ``step_loss`` for each re-scored step."""

    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs()
    default_minibatches: ClassVar[int] = 1  # PPO minibatches per round when unset (on-policy)
    group_size: int = 1  # trajectories drawn per prompt together (GRPO's groups); 1: independent

    @classmethod
    def check_config(cls, cfg) -> None:
        """Rules of this objective on the whole run config (``FinetuneConfig``); raise with the
        field and the fix. Called when the config is loaded."""

    def __init__(
        self, cfg: ObjectiveConfig, log_z: nn.Module | None = None, flow: nn.Module | None = None
    ) -> None:
        for module, what, needed in ((log_z, "log_z", self.needs.log_z),
                                     (flow, "flow", self.needs.flow)):  # fmt: skip
            if module is not None and not needed:
                raise ValueError(f"objective {self.name!r} takes no {what} module")
        if self.needs.flow and flow is None:
            raise ValueError(f"objective {self.name!r} needs a flow network")
        self.cfg, self.log_z, self.flow = cfg, log_z, flow
        self.penalty = PENALTIES[cfg.penalty]

    def prepare(self, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        """The loss whose gradient goes to log Z / the flow network (or 0) and its metrics."""
        return batch.log_reward.new_zeros(()), {}

    def step_loss(
        self, batch: RolloutBatch, k: int, terms: StepTerms, num_trained: int,
        pool: int | None = None,
    ) -> Tensor:  # fmt: skip
        """The surrogate loss of re-scored step ``k``, one of ``num_trained`` steps drawn from
        ``pool`` steps with a gradient (default all K)."""
        raise NotImplementedError


# ---------------------------------------------------------------------- GFlowNet objectives
class GFlowNetObjective(FinetuneObjective):
    """A loss ``L(log P_F [B, K])``; the policy's gradient through the per-step surrogate."""

    def __init__(self, cfg, log_z=None, flow=None) -> None:
        super().__init__(cfg, log_z=log_z, flow=flow)
        # without a log Z module, tb / rtb estimate it from the batch, per prompt: (3.2) / (3.7)
        self.batch_log_z = self.needs.log_z and log_z is None
        self._coef: Tensor | None = None
        self._log_z_value: float | None = None

    def loss_of_log_pf(self, batch: RolloutBatch, log_pf: Tensor) -> tuple[Tensor, Tensor]:
        """The objective ``L`` and its residuals as functions of ``log_pf [B, K]``.

        Only the first ``n = stochastic_prefix(traj)`` steps enter: a deterministic last step
        (σ = 0) has no density, so ``x_1`` is the terminal state, its reward ``R(g(x_1))`` with
        the prior's frozen map ``g`` (§2, convention (b)); neither its ``log P_F`` nor its
        ``log P_B`` is counted (counting ``log P_B`` alone would bias the optimum).
        """
        n = stochastic_prefix(batch.traj)
        return self._loss(batch, log_pf[:, :n], batch.traj.log_pb[:, :n])

    def _loss(self, batch: RolloutBatch, log_pf: Tensor, log_pb: Tensor) -> tuple[Tensor, Tensor]:
        """``L`` and its residuals on the ``n`` counted steps, ``log_pf / log_pb [B, n]``."""
        raise NotImplementedError

    def _learned_log_z(self, batch: RolloutBatch) -> Tensor:
        log_z = self.log_z(batch.prompt_index, batch.pooled)
        self._log_z_value = float(log_z.detach().float().mean())
        return log_z

    def prepare(self, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        """Compute ``c = ∂L/∂ log P_F`` for the surrogate; return ``L`` (its graph reaches log Z
        and the flow network) and metrics."""
        log_pf = batch.traj.log_pf.detach().clone().requires_grad_(True)  # [B, K]
        loss, residual = self.loss_of_log_pf(batch, log_pf)
        (coef,) = torch.autograd.grad(loss, log_pf, retain_graph=True)
        self._coef = coef.detach()  # [B, K]
        metrics = {"loss": loss.item(), "residual_abs": residual.detach().abs().mean().item()}
        if self._log_z_value is not None:
            metrics["log_z"] = self._log_z_value
        return loss, metrics

    def step_loss(self, batch, k, terms, num_trained, pool=None) -> Tensor:
        """``(pool / |S|) Σ_b c[b, k] log P_F(k)[b]`` (the frozen map's steps have no grad)."""
        scale = (batch.traj.num_steps if pool is None else pool) / num_trained
        return scale * (self._coef[:, k] * terms.log_prob).sum()


@register
class TrajectoryBalance(GFlowNetObjective):
    """TB (3.1), Malkin et al. 2022; with ``log_z_mode=batch`` its VarGrad form (3.2)."""

    name = "tb"
    needs = Needs(log_z=True)

    def _loss(self, batch, log_pf, log_pb):
        pf = batch.traj.log_p_init + log_pf.sum(1)
        if self.batch_log_z:
            return _vargrad(self, batch, pf, log_pb)
        delta = O.trajectory_balance(pf, log_pb, batch.log_reward, self._learned_log_z(batch))
        return self.penalty(delta).mean(), delta


@register
class RelativeTrajectoryBalance(GFlowNetObjective):
    """RTB (3.7), Venkatraman et al. 2024: the posterior ∝ prior × R, relative to the prior's
    log-probs on the same trajectory; with ``log_z_mode=batch`` its VarGrad form."""

    name = "rtb"
    needs = Needs(log_z=True, prior_log_probs=True)

    def _loss(self, batch, log_pf, log_pb):
        prior = batch.log_pf_prior[:, : log_pf.shape[1]]
        if self.batch_log_z:
            delta = O.relative_vargrad(log_pf, prior, batch.log_reward, group=batch.prompt_index)
            log_w = batch.log_reward + prior.sum(1) - log_pf.detach().sum(1)
            self._log_z_value = float(log_w.mean())  # the batch estimate, for the curves
        else:
            log_z = self._learned_log_z(batch)
            delta = O.relative_trajectory_balance(log_pf, prior, batch.log_reward, log_z)
        return self.penalty(delta).mean(), delta


@register
class VarGrad(GFlowNetObjective):
    """VarGrad (3.2), Richter et al. 2020 / Zhang et al. 2023: TB with the batch's log Z."""

    name = "vargrad"

    def _loss(self, batch, log_pf, log_pb):
        return _vargrad(self, batch, batch.traj.log_p_init + log_pf.sum(1), log_pb)


def _vargrad(obj: GFlowNetObjective, batch: RolloutBatch, pf: Tensor, log_pb: Tensor):
    delta = O.vargrad(pf, log_pb, batch.log_reward, group=batch.prompt_index)
    obj._log_z_value = float((batch.log_reward + log_pb.sum(1) - pf).detach().mean())
    return obj.penalty(delta).mean(), delta


class _FlowObjective(GFlowNetObjective):
    """Objectives on the flows ``log F̃(x_k)`` of the visited states and ``log R(x̂_θ(x_k))``."""

    needs = Needs(flow=True, reward_pred=True)

    def _flows(self, batch: RolloutBatch, k: int) -> tuple[Tensor, Tensor]:
        """``log F̃`` at the ``k`` non-terminal states ``x_K..x_1`` ``[B, k]`` (the terminal
        one is R itself) and ``log R(x̂_θ)`` at those states then at ``x_0`` ``[B, k+1]``."""
        traj, b = batch.traj, batch.traj.batch_size
        states = traj.latents[:, :k].flatten(0, 1)  # [B*k, ...]
        t = traj.timesteps[:k].to(states.device).repeat(b)  # [B*k]
        pooled = None if batch.pooled is None else batch.pooled.repeat_interleave(k, 0)
        f_tilde = self.flow(states, t, pooled).view(b, k)  # [B, k]
        r_pred = torch.cat([batch.log_reward_pred[:, :k], batch.log_reward[:, None]], 1)
        return f_tilde, r_pred


@register
class EnergyDetailedBalance(_FlowObjective):
    """Energy-difference DB (3.5) on the stochastic transitions; the state after the last one is
    terminal (``F̃ := 0`` there)."""

    name = "db"

    def _loss(self, batch, log_pf, log_pb):
        b, k = log_pf.shape
        f_tilde, r_pred = self._flows(batch, k)
        f_next = torch.cat([f_tilde[:, 1:], f_tilde.new_zeros(b, 1)], 1)  # F̃(terminal) := 0
        terminal = torch.zeros(b, k, dtype=torch.bool, device=log_pf.device)
        terminal[:, -1] = True
        delta = O.energy_difference_detailed_balance(
            f_tilde, log_pf, f_next, log_pb, r_pred[:, :-1], r_pred[:, 1:], terminal
        )
        return self.penalty(delta).mean(), delta.sum(1)


@register
class SubTrajectoryBalance(_FlowObjective):
    """SubTB(λ) (3.6), Madan et al. 2023, on the flows ``log F̃ + log R(x̂_θ)``."""

    name = "subtb"

    def _loss(self, batch, log_pf, log_pb):
        b, k = log_pf.shape
        f_tilde, r_pred = self._flows(batch, k)
        log_flows = torch.cat([f_tilde, f_tilde.new_zeros(b, 1)], 1) + r_pred  # [B, k+1]
        loss = O.subtrajectory_balance(
            log_flows, log_pf, log_pb, self.cfg.subtb_lambda, penalty=self.penalty
        )
        return loss.mean(), loss


# ---------------------------------------------------------------------- RL baselines
class PolicyGradientObjective(FinetuneObjective):
    """On-policy baselines: advantages from the rewards, per-step ratios against the log-probs
    stored at rollout time; stochastic steps only (σ = 0 has no ratio)."""

    needs = Needs(advantages=True, on_policy=True)
    ratio_per_dim: ClassVar[bool] = False  # ddpo with objective.ratio_per_dim: see ``ratio``

    def advantages(self, raw: Tensor, group: Tensor | None) -> Tensor:
        """``[N]`` advantages of the rewards of every process, normalised per prompt."""
        return group_normalise(raw, group, self.cfg.advantage_clip)

    def group_ids(self, prompt_index: Tensor | None, batch: int, rank: int) -> Tensor | None:
        """``[B]`` the group of each row of this process's batch for ``advantages``: its
        prompt (ddpo, dpok: statistics per prompt over every process), or none."""
        return prompt_index

    def ratio(self, batch: RolloutBatch, k: int, log_prob: Tensor) -> Tensor:
        """``[B]`` ratio of step ``k``'s density under the current weights to the one stored at
        rollout time (ddpo with ``ratio_per_dim``: of the per-dimension geometric means)."""
        diff = log_prob - batch.traj.log_pf[:, k]
        if self.ratio_per_dim and self.cfg.ratio_per_dim:
            diff = diff / batch.traj.latents[0, 0].numel()
        return diff.exp()

    def ratio_metrics(self, deviations: Tensor) -> dict[str, float]:
        """Diagnostics of ``|ratio - 1|`` over the trained steps (ddpo-pytorch's)."""
        return {"ratio_dev": float(deviations.max())}


@register
class DDPO(PolicyGradientObjective):
    """DDPO (Black et al. 2023): PPO-clip on the per-step ratio, two updates per round."""

    name = "ddpo"
    default_minibatches = 2  # ddpo-pytorch: two updates per round, the clip binds on the second
    ratio_per_dim = True

    def step_loss(self, batch, k, terms, num_trained, pool=None) -> Tensor:
        adv, ratio = batch.advantages, self.ratio(batch, k, terms.log_prob)
        clipped = ratio.clamp(1 - self.cfg.clip_range, 1 + self.cfg.clip_range)
        return torch.maximum(-adv * ratio, -adv * clipped).mean() / num_trained

    def ratio_metrics(self, deviations: Tensor) -> dict[str, float]:
        clipped = float((deviations > self.cfg.clip_range).float().mean())
        return {**super().ratio_metrics(deviations), "clip_fraction": clipped}


@register
class DPOK(PolicyGradientObjective):
    """DPOK (Fan et al. 2023): REINFORCE + KL(P_F^θ(·|x_k) || P_F^prior(·|x_k)) per step."""

    name = "dpok"
    needs = Needs(advantages=True, on_policy=True, step_means=True)

    def step_loss(self, batch, k, terms, num_trained, pool=None) -> Tensor:
        # the KL in closed form |μ_θ - μ_prior|² / 2σ² between the two Gaussians of (2.5); the
        # sums over the stochastic steps. -adv·ratio has the REINFORCE gradient on-policy
        # (ratio = 1) and stays unbiased when a batch is reused (ppo_epochs / ppo_minibatches).
        scale = (len(stochastic_steps(batch.traj)) if pool is None else pool) / num_trained
        pg = -(batch.advantages * self.ratio(batch, k, terms.log_prob)).mean() * scale
        if terms.std is None or terms.prior_mean is None:
            raise ValueError("dpok needs the step's mean, std and the prior's mean")
        sq = (terms.mean - terms.prior_mean).pow(2).flatten(1).sum(1)  # [B]
        kl = sq / (2 * terms.std.pow(2).flatten().clamp_min(1e-12).expand_as(sq))
        return pg + self.cfg.kl_weight * kl.mean() * scale


@register
class GRPO(PolicyGradientObjective):
    """GRPO (Shao et al. 2024; Flow-GRPO, Liu et al. 2025; DanceGRPO): rollouts in groups of
    ``objective.group_size`` samples of one prompt, advantages normalised within each group,
    PPO-clip on the per-step density ratio, optionally (``objective.kl_weight`` > 0) the per-step
    KL to the frozen reference (closed form between the Gaussians of (2.5), as in dpok)."""

    name = "grpo"
    needs = Needs(advantages=True, on_policy=True, step_means=True)
    default_minibatches = 2  # each round reused for two updates, so that the clip can bind

    def __init__(self, cfg, log_z=None, flow=None) -> None:
        super().__init__(cfg, log_z=log_z, flow=flow)
        self.group_size = _check_group_size(cfg.group_size)
        # the prior's step means only feed the KL: without it, no extra prior UNet pass per step
        self.needs = replace(type(self).needs, step_means=cfg.kl_weight > 0)

    @classmethod
    def check_config(cls, cfg) -> None:
        g, b = _check_group_size(cfg.objective.group_size), cfg.train.batch_size
        if b % g:
            raise ValueError(f"train.batch_size={b} must be divisible by objective.group_size={g}"
                             " (grpo draws batch_size / group_size prompts, each group_size "
                             "times)")  # fmt: skip

    def group_ids(self, prompt_index: Tensor | None, batch: int, rank: int) -> Tensor:
        """Consecutive rows of ``group_size`` (one prompt each), numbered uniquely per rank."""
        device = None if prompt_index is None else prompt_index.device
        per_rank = batch // self.group_size
        return torch.arange(batch, device=device) // self.group_size + rank * per_rank

    def advantages(self, raw: Tensor, group: Tensor | None) -> Tensor:
        """``(r - mean_g) / (std_g + eps)`` within each group of ``group_size`` samples."""
        counts = torch.unique(group, return_counts=True)[1]
        if bool((counts < 2).any()):
            raise ValueError("grpo needs >= 2 samples per prompt group: set "
                             "objective.group_size >= 2")  # fmt: skip
        return group_normalise(raw, group, self.cfg.advantage_clip)

    def step_loss(self, batch, k, terms, num_trained, pool=None) -> Tensor:
        adv, ratio = batch.advantages, self.ratio(batch, k, terms.log_prob)
        clipped = ratio.clamp(1 - self.cfg.clip_range, 1 + self.cfg.clip_range)
        loss = torch.maximum(-adv * ratio, -adv * clipped).mean() / num_trained
        if self.cfg.kl_weight > 0:
            if terms.std is None or terms.prior_mean is None:
                raise ValueError("grpo's KL needs the step's mean, std and the prior's mean")
            sq = (terms.mean - terms.prior_mean).pow(2).flatten(1).sum(1)  # [B]
            kl = sq / (2 * terms.std.pow(2).flatten().clamp_min(1e-12).expand_as(sq))
            loss = loss + self.cfg.kl_weight * kl.mean() / num_trained
        return loss

    def ratio_metrics(self, deviations: Tensor) -> dict[str, float]:
        clipped = float((deviations > self.cfg.clip_range).float().mean())
        return {**super().ratio_metrics(deviations), "clip_fraction": clipped}


def _check_group_size(g: int) -> int:
    if g < 2:
        raise ValueError(f"objective.group_size={g}: grpo needs >= 2 samples per prompt group "
                         "(its advantage is normalised within the group); set it >= 2")  # fmt: skip
    return g


# ---------------------------------------------------------------------- which steps count
def stochastic_prefix(traj: Trajectory) -> int:
    """The number ``n`` of leading steps with a density; the rest (a deterministic tail, σ = 0)
    is the prior's fixed map. Raises when a deterministic step comes before a stochastic one
    (η = 0, say): a GFlowNet objective needs a density at every step it counts."""
    k = traj.num_steps
    det = traj.deterministic
    if det is None or not bool(det.any()):
        return k
    det = det.to("cpu", torch.bool)
    n = int((~det).sum())
    if bool(det[:n].any()) or n == 0:
        bad = det.nonzero().flatten().tolist()
        raise ValueError(
            f"steps {bad} of {k} are deterministic (σ = 0), not only a final tail: the GFlowNet "
            "objectives need a density at each counted step; use eta > 0 (e.g. model.eta=1)"
        )
    return n


def stochastic_steps(traj: Trajectory) -> list[int]:
    """The steps with a density (σ > 0): the only ones the on-policy baselines train."""
    if traj.deterministic is None:
        return list(range(traj.num_steps))
    return (~traj.deterministic.to("cpu", torch.bool)).nonzero().flatten().tolist()


def choose_steps(num_steps: int, fraction: float, generator: torch.Generator) -> list[int]:
    """Steps re-scored with gradient: a random subset of ``round(fraction * K)`` (at least 1)."""
    n = max(1, round(fraction * num_steps))
    if n >= num_steps:
        return list(range(num_steps))
    return sorted(torch.randperm(num_steps, generator=generator)[:n].tolist())
