"""``posterior9``: the relative-trajectory-balance toy ((3.3)).

The prior is a :class:`DiffusionSampler` trained by denoising on exact ``gmm25`` samples: it
maximises ``log P_F(τ)`` of Brownian-bridge (noising) trajectories of data, the diffusion
model's maximum-likelihood (denoising) objective. The likelihood is the responsibility of a
3 x 3 subset of the modes, ``r(x) = Σ_{m∈S} N(x; μ_m) / Σ_m N(x; μ_m)``, so that
``gmm25(x) r(x) = (1/25) Σ_{m∈S} N(x; μ_m, 0.3 I)``: with a perfect prior the posterior is
exactly the 9-component mixture on the modes ``{-10, 0, 10}²`` and ``log Z = log(9/25)``.
Metrics are computed against this exact posterior; the prior's imperfection shows in them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import trange

from steer.toy.sampler import DiffusionSampler, SamplerConfig
from steer.toy.targets import GaussianMixture, gmm25

__all__ = ["Posterior9", "train_prior", "SELECTED"]

SELECTED = (-10.0, 0.0, 10.0)


def train_prior(
    config: SamplerConfig,
    iterations: int = 2000,
    batch: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = False,
) -> DiffusionSampler:
    """Fit a sampler to ``gmm25`` samples by maximum likelihood of bridge trajectories.

    ``config.langevin`` must be False: the prior learns gmm25 from its samples alone, and a
    Langevin drift would need the score of the density it is learning
    (:meth:`steer.toy.train.ToyConfig.prior_config` builds the config)."""
    if config.langevin:
        raise ValueError(
            "the posterior9 prior is a denoising model of gmm25 samples and has no score for a "
            "Langevin drift: train it with SamplerConfig(langevin=False) "
            "(ToyConfig.prior_config())"
        )
    torch.manual_seed(seed)
    data, prior = gmm25(), DiffusionSampler(config)
    policy = [p for n, p in prior.named_parameters() if n != "log_z"]
    opt = torch.optim.Adam(policy, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=lr / 10)
    for _ in trange(iterations, disable=not progress, desc="posterior9 prior"):
        traj = prior.backward_rollout(data.sample(batch))
        loss = -traj.log_pf_total().mean()  # [B] -> scalar: negative log P_F(τ)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    prior.requires_grad_(False)
    return prior


class Posterior9(GaussianMixture):
    """Exact posterior ``gmm25 · r`` (9 components, weights 1/25 each, ``log Z = log 9/25``)
    with the learned ``prior`` and the log-likelihood ``log r`` used by RTB."""

    def __init__(self, prior: DiffusionSampler | None = None) -> None:
        self.full = gmm25()
        grid = torch.tensor(SELECTED)
        super().__init__(torch.cartesian_prod(grid, grid), math.sqrt(0.3), name="posterior9")
        self.log_z = math.log(9 / 25)
        self.default_sigma, self.plot_range = self.full.default_sigma, self.full.plot_range
        sel = [i for i, m in enumerate(self.full.means.tolist()) if tuple(m) in _pairs()]
        self.selected = torch.tensor(sel)  # [9] indices into gmm25's components
        self.prior = prior

    def log_prob(self, x: Tensor) -> Tensor:
        return super().log_prob(x) + self.log_z

    def log_likelihood(self, x: Tensor) -> Tensor:
        """``log r(x) = logsumexp_{m∈S} - logsumexp_m`` of gmm25's components, ``[B]``."""
        comp = self.full.component_log_prob(x)  # [B, 25]
        return torch.logsumexp(comp[:, self.selected], -1) - torch.logsumexp(comp, -1)


def _pairs() -> set[tuple[float, float]]:
    return {(a, b) for a in SELECTED for b in SELECTED}
