"""The training objectives of the fine-tuner, each built from ``steer.objectives``.

A rollout is taken without gradients; then a subset ``S`` of its K steps is re-scored under the
current weights with gradients, one step at a time, and back-propagated step by step so that only
one UNet graph lives in memory. For the GFlowNet objectives (tb, vargrad, rtb, db, subtb) the loss
``L`` is a function of the per-step log-probabilities ``log P_F [B, K]``; its exact gradient is
``Σ_k c_k ∇ log P_F(k)`` with ``c = ∂L/∂ log P_F`` computed once by autograd on the rollout's
values. Each re-scored step then contributes the surrogate ``(K/|S|) Σ_b c[b, k] log P_F(k)[b]``,
an unbiased estimate of that gradient (exact when ``S`` holds every step). ``log Z`` and the flow
network get their gradients directly from ``L``. The baselines ddpo and dpok are per-step losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from steer import objectives as O
from steer.train.config import ObjectiveConfig
from steer.trajectory import Trajectory

PENALTIES: dict[str, O.Penalty] = {"squared": O.squared, "huber": O.huber, "log_cosh": O.log_cosh}
GFN_OBJECTIVES = ("tb", "vargrad", "rtb", "db", "subtb")


@dataclass
class RolloutBatch:
    """A rollout with everything the objectives need, all detached."""

    traj: Trajectory
    raw_reward: Tensor  # [B] the reward model's scores
    log_reward: Tensor  # [B] log R(x_0) = raw / beta
    prompt_index: Tensor | None = None  # [B] ids of prompts in a fixed set (log Z table, groups)
    pooled: Tensor | None = None  # [B, D] pooled prompt embeddings (log Z network, flow cond)
    log_reward_pred: Tensor | None = None  # [B, K] log R(x̂_θ(x_k)) (db, subtb)
    log_pf_prior: Tensor | None = None  # [B, K] the frozen prior's log-probs (rtb)
    advantages: Tensor | None = None  # [B] normalised rewards (ddpo, dpok)
    extras: dict = field(default_factory=dict)


@dataclass
class StepTerms:
    """What a re-scored step gives the per-step losses."""

    log_prob: Tensor  # [B] log P_F(x_{k-1} | x_k) under the current weights, with grad
    mean: Tensor | None = None  # [B, ...] the step's mean μ_θ (dpok)
    std: Tensor | None = None  # [] or [B] the step's σ (dpok)
    prior_mean: Tensor | None = None  # [B, ...] the prior's mean at the same x_k (dpok)


def group_normalise(values: Tensor, group: Tensor | None, clip: float, eps: float = 1e-6) -> Tensor:
    """Advantages: ``(r - mean_g) / (std_g + eps)`` per group of equal ids (or the whole batch),
    clipped to ``[-clip, clip]``. Shape ``[B]``."""
    ids = torch.zeros_like(values, dtype=torch.long) if group is None else group
    _, inverse = torch.unique(ids, return_inverse=True)
    n = int(inverse.max()) + 1
    count = values.new_zeros(n).index_add(0, inverse, torch.ones_like(values))
    mean = values.new_zeros(n).index_add(0, inverse, values) / count
    var = values.new_zeros(n).index_add(0, inverse, (values - mean[inverse]) ** 2) / count
    return ((values - mean[inverse]) / (var.sqrt()[inverse] + eps)).clamp(-clip, clip)


class TrainObjective:
    """One objective of the fine-tuner: ``prepare`` a rollout (direct loss for log Z / flow,
    coefficients for the policy), then ``step_loss`` for each re-scored step."""

    def __init__(
        self,
        cfg: ObjectiveConfig,
        log_z: nn.Module | None = None,
        flow: nn.Module | None = None,
        flow_target: nn.Module | None = None,
    ) -> None:
        self.cfg, self.name = cfg, cfg.name
        self.penalty = PENALTIES[cfg.penalty]
        self.log_z, self.flow = log_z, flow
        self.flow_target = flow_target if flow_target is not None else flow
        # tb / rtb without a log Z module estimate it from the batch, per prompt: (3.2) / (3.7)
        self.batch_log_z = self.name in ("tb", "rtb") and log_z is None
        if self.name in ("db", "subtb") and flow is None:
            raise ValueError(f"objective {self.name!r} needs a flow network")
        self._coef: Tensor | None = None
        self._log_z_value: float | None = None

    # ------------------------------------------------------------------ GFlowNet objectives
    def _loss_of_log_pf(self, batch: RolloutBatch, log_pf: Tensor) -> tuple[Tensor, Tensor]:
        """The objective ``L`` and its residuals as functions of ``log_pf [B, K]``.

        Only the first ``n = stochastic_prefix(traj)`` steps enter: a deterministic last step
        (σ = 0) has no density, so ``x_1`` is the terminal state, its reward ``R(g(x_1))`` with
        the prior's frozen map ``g`` (§2, convention (b)); neither its ``log P_F`` nor its
        ``log P_B`` is counted (counting ``log P_B`` alone would bias the optimum).
        """
        traj, name = batch.traj, self.name
        n = stochastic_prefix(traj)
        log_pf, log_pb = log_pf[:, :n], traj.log_pb[:, :n]  # [B, n]
        if name in ("tb", "vargrad"):
            pf = traj.log_p_init + log_pf.sum(1)
            if name == "tb" and not self.batch_log_z:
                log_z = self.log_z(batch.prompt_index, batch.pooled)
                self._log_z_value = float(log_z.detach().float().mean())
                delta = O.trajectory_balance(pf, log_pb, batch.log_reward, log_z)
            else:
                delta = O.vargrad(pf, log_pb, batch.log_reward, group=batch.prompt_index)
                log_w = (batch.log_reward + log_pb.sum(1) - pf).detach()
                self._log_z_value = float(log_w.mean())  # the batch estimate, for the curves
            return self.penalty(delta).mean(), delta
        prior = None if batch.log_pf_prior is None else batch.log_pf_prior[:, :n]
        if name == "rtb" and self.batch_log_z:
            delta = O.relative_vargrad(log_pf, prior, batch.log_reward, group=batch.prompt_index)
            log_w = batch.log_reward + prior.sum(1) - log_pf.detach().sum(1)
            self._log_z_value = float(log_w.mean())  # the batch estimate, for the curves
            return self.penalty(delta).mean(), delta
        if name == "rtb":
            log_z = self.log_z(batch.prompt_index, batch.pooled)
            self._log_z_value = float(log_z.detach().float().mean())
            delta = O.relative_trajectory_balance(log_pf, prior, batch.log_reward, log_z)
            return self.penalty(delta).mean(), delta
        return self._flow_loss(batch, log_pf, log_pb)

    def _flow_loss(
        self, batch: RolloutBatch, log_pf: Tensor, log_pb: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Energy-difference DB (3.5) on the ``n`` stochastic transitions ``log_pf [B, n]``,
        or SubTB (3.6) on their flows; the state after the last one is terminal."""
        traj = batch.traj
        b, k = log_pf.shape
        # 1. log F̃ at the K non-terminal states x_K..x_1 (the terminal one is R itself).
        states = traj.latents[:, :k].flatten(0, 1)  # [B*K, ...]
        t = traj.timesteps[:k].to(states.device).repeat(b)  # [B*K]
        pooled = None if batch.pooled is None else batch.pooled.repeat_interleave(k, 0)
        f_tilde = self.flow(states, t, pooled).view(b, k)  # [B, K]
        pred = batch.log_reward_pred[:, :k]  # [B, K] log R(x̂_θ(x_k)) at the non-terminal states
        r_pred = torch.cat([pred, batch.log_reward[:, None]], 1)  # [B, K+1]
        f_next = torch.cat([f_tilde[:, 1:], f_tilde.new_zeros(b, 1)], 1)  # F̃(terminal) := 0
        if self.name == "db":
            terminal = torch.zeros(b, k, dtype=torch.bool, device=log_pf.device)
            terminal[:, -1] = True
            delta = O.energy_difference_detailed_balance(
                f_tilde, log_pf, f_next, log_pb, r_pred[:, :-1], r_pred[:, 1:], terminal
            )
            return self.penalty(delta).mean(), delta.sum(1)
        log_flows = torch.cat([f_tilde, f_tilde.new_zeros(b, 1)], 1) + r_pred  # [B, K+1]
        loss = O.subtrajectory_balance(
            log_flows, log_pf, log_pb, self.cfg.subtb_lambda, penalty=self.penalty
        )
        return loss.mean(), loss

    # ------------------------------------------------------------------ public interface
    def prepare(self, batch: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        """Compute the coefficients of the policy's per-step surrogate; return the loss whose
        gradient goes to log Z / the flow network (a tensor with grad, or 0) and metrics."""
        if self.name not in GFN_OBJECTIVES:
            self._coef = None
            return batch.log_reward.new_zeros(()), {}
        log_pf = batch.traj.log_pf.detach().clone().requires_grad_(True)  # [B, K]
        loss, residual = self._loss_of_log_pf(batch, log_pf)
        (coef,) = torch.autograd.grad(loss, log_pf, retain_graph=True)
        self._coef = coef.detach()  # [B, K]
        metrics = {"loss": loss.item(), "residual_abs": residual.detach().abs().mean().item()}
        if self._log_z_value is not None:
            metrics["log_z"] = self._log_z_value
        return loss, metrics

    def ratio(self, batch: RolloutBatch, k: int, log_prob: Tensor) -> Tensor:
        """``[B]`` ratio of step ``k``'s density under the current weights to the one stored at
        rollout time (ddpo with ``ratio_per_dim``: of the per-dimension geometric means)."""
        diff = log_prob - batch.traj.log_pf[:, k]
        if self.name == "ddpo" and self.cfg.ratio_per_dim:
            diff = diff / batch.traj.latents[0, 0].numel()
        return diff.exp()

    def step_loss(
        self,
        batch: RolloutBatch,
        k: int,
        terms: StepTerms,
        num_trained: int,
        pool: int | None = None,
    ) -> Tensor:
        """The surrogate loss of re-scored step ``k``, one of ``num_trained`` steps drawn from
        ``pool`` steps with a gradient (default all K; the frozen map's steps have none)."""
        scale = (batch.traj.num_steps if pool is None else pool) / num_trained
        if self.name in GFN_OBJECTIVES:
            return scale * (self._coef[:, k] * terms.log_prob).sum()
        # the baselines train stochastic steps only (``num_trained`` of them)
        adv, ratio = batch.advantages, self.ratio(batch, k, terms.log_prob)
        if self.name == "ddpo":  # PPO-clip on the per-step ratio (Black et al. 2023)
            clipped = ratio.clamp(1 - self.cfg.clip_range, 1 + self.cfg.clip_range)
            return torch.maximum(-adv * ratio, -adv * clipped).mean() / num_trained
        # dpok (Fan et al. 2023): REINFORCE + KL(P_F^θ(·|x_k) || P_F^prior(·|x_k)),
        # in closed form |μ_θ - μ_prior|² / 2σ² between the two Gaussians of (2.5); the sums
        # over the stochastic steps. -adv·ratio has the REINFORCE gradient on-policy (ratio = 1)
        # and stays unbiased when a batch is reused (objective.ppo_epochs / ppo_minibatches).
        scale = (len(stochastic_steps(batch.traj)) if pool is None else pool) / num_trained
        pg = -(adv * ratio).mean() * scale
        if terms.std is None or terms.prior_mean is None:
            raise ValueError("dpok needs the step's mean, std and the prior's mean")
        sq = (terms.mean - terms.prior_mean).pow(2).flatten(1).sum(1)  # [B]
        kl = sq / (2 * terms.std.pow(2).flatten().clamp_min(1e-12).expand_as(sq))
        return pg + self.cfg.kl_weight * kl.mean() * scale


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
    """The steps with a density (σ > 0): the only ones the baselines ddpo and dpok train."""
    if traj.deterministic is None:
        return list(range(traj.num_steps))
    return (~traj.deterministic.to("cpu", torch.bool)).nonzero().flatten().tolist()


def choose_steps(num_steps: int, fraction: float, generator: torch.Generator) -> list[int]:
    """Steps re-scored with gradient: a random subset of ``round(fraction * K)`` (at least 1)."""
    n = max(1, round(fraction * num_steps))
    if n >= num_steps:
        return list(range(num_steps))
    return sorted(torch.randperm(num_steps, generator=generator)[:n].tolist())


LossFn = Callable[[RolloutBatch], Tensor]
