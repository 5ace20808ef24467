"""Named targets and user energies.

``get_target("gmm25")``, ``get_target("pkg.mod:energy", dim=3)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from steer.toy.posterior import Posterior9, train_prior
from steer.toy.sampler import DiffusionSampler, SamplerConfig
from steer.toy.targets import Funnel, ManyWell, Target, UserTarget, gmm25, gmm40

__all__ = ["TARGETS", "get_target"]

TARGETS: dict[str, Callable[[], Target]] = {
    "gmm25": gmm25,
    "funnel": Funnel,
    "manywell": ManyWell,
    "gmm40": gmm40,
    "posterior9": Posterior9,
}


def get_target(
    name: str | Callable,
    dim: int | None = None,
    prior: DiffusionSampler | None = None,
    prior_config: SamplerConfig | None = None,
    prior_iterations: int = 2000,
) -> Target:
    """A named target, a ``"module:function"`` energy or a callable energy (``dim`` needed).

    ``posterior9`` uses ``prior`` when given, else trains one (``prior_iterations`` steps of
    denoising on gmm25 with ``prior_config``).
    """
    if callable(name):
        if dim is None:
            raise ValueError("a user energy needs dim=<its dimension>")
        return UserTarget(name, dim)
    if not isinstance(name, str):
        raise TypeError(f"target must be a name or a callable, got {type(name).__name__}")
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            energy = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot load user energy {name!r}: {err}") from err
        if dim is None:
            raise ValueError(f"user energy {name!r} needs dim=<its dimension> (or --dim)")
        return UserTarget(energy, dim, name=name)
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; valid: {', '.join(TARGETS)} or module:function")
    if name == "posterior9":
        if prior is None:
            cfg = prior_config or SamplerConfig(dim=2, sigma=gmm25().default_sigma)
            prior = train_prior(cfg, iterations=prior_iterations, progress=True)
        return Posterior9(prior)
    return TARGETS[name]()
