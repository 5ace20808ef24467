"""Diffusion samplers of unnormalised densities: targets, sampler, off-policy tools, metrics.

``steer toy train --target gmm25 --objective tb --out DIR`` trains one; see docs/toy.md.
"""

from steer.toy.buffer import ReplayBuffer, mala
from steer.toy.metrics import evaluate_sampler, mmd_rbf, mode_masses, wasserstein2
from steer.toy.posterior import Posterior9, train_prior
from steer.toy.registry import TARGETS, get_target
from steer.toy.sampler import DiffusionSampler, SamplerConfig, rollout
from steer.toy.targets import Funnel, GaussianMixture, ManyWell, Target, UserTarget, gmm25, gmm40
from steer.toy.train import TOY_OBJECTIVES, ToyConfig, ToyRunConfig, TrainResult, train

__all__ = [
    "TARGETS",
    "TOY_OBJECTIVES",
    "DiffusionSampler",
    "Funnel",
    "GaussianMixture",
    "ManyWell",
    "Posterior9",
    "ReplayBuffer",
    "SamplerConfig",
    "Target",
    "ToyConfig",
    "ToyRunConfig",
    "TrainResult",
    "UserTarget",
    "evaluate_sampler",
    "get_target",
    "gmm25",
    "gmm40",
    "mala",
    "mmd_rbf",
    "mode_masses",
    "rollout",
    "train",
    "train_prior",
    "wasserstein2",
]
