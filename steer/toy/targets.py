"""Unnormalised target densities with exact log-density, exact samples and known ``log Z``.

A target gives the log-reward ``log R(x) = -E(x)`` of §1 (``P*(x) = R(x) / Z``), exact
samples of ``P*`` (for the EUBO, W2 and MMD of §6) and ``log Z``. Named targets: ``gmm25``,
``funnel``, ``manywell``, ``gmm40``; ``posterior9`` lives in :mod:`steer.toy.posterior`.
A Python callable ``energy(x [B, d]) -> [B]`` becomes a target through :class:`UserTarget`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy import integrate
from torch import Tensor

__all__ = [
    "Target",
    "GaussianMixture",
    "Funnel",
    "ManyWell",
    "UserTarget",
    "gmm25",
    "gmm40",
    "manywell_log_z",
]

LOG_2PI = math.log(2 * math.pi)


class Target:
    """Base class: ``log_prob`` is ``log R(x)`` (unnormalised unless ``log_z == 0``)."""

    name: str = "target"
    dim: int
    log_z: float | None = None
    default_sigma: float = 1.0  # σ of the sampler's reference process suited to this target
    plot_range: float = 10.0

    def log_prob(self, x: Tensor) -> Tensor:  # [B, d] -> [B]
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:  # [n, d]
        raise NotImplementedError(f"target {self.name!r} has no exact sampler")

    @property
    def has_samples(self) -> bool:
        return type(self).sample is not Target.sample

    def mixture(self) -> tuple[Tensor, Tensor] | None:
        """``(means [M, d], weights [M])`` for mixtures (per-mode mass metrics), else None."""
        return None

    def score(self, x: Tensor) -> Tensor:
        """``∇_x log R(x)`` by autograd, shape ``[B, d]`` (no graph kept)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(x).sum(), x)
        return grad

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: x must be a tensor [B, {self.dim}], got {shape}")


class GaussianMixture(Target):
    """Mixture of isotropic Gaussians ``Σ_m w_m N(μ_m, s² I)``, normalised (``log Z = 0``)."""

    def __init__(
        self, means: Tensor, std: float, weights: Tensor | None = None, name: str = "gmm"
    ) -> None:
        if means.ndim != 2:
            raise ValueError(f"means must be [M, d], got {tuple(means.shape)}")
        m = means.shape[0]
        weights = torch.full((m,), 1.0 / m) if weights is None else weights / weights.sum()
        self.name, self.means, self.std, self.weights = name, means.float(), float(std), weights
        self.dim, self.log_z = means.shape[1], 0.0
        self.plot_range = float(means.abs().max()) + 3 * self.std

    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log w_m + log N(x; μ_m, s² I)`` for every component, ``[B, M]``."""
        self.check_input(x)
        mu = self.means.to(x)  # [M, d]
        sq = x.square().sum(-1, keepdim=True) - 2 * x @ mu.T + mu.square().sum(-1)  # [B, M]
        log_norm = -0.5 * self.dim * (LOG_2PI + 2 * math.log(self.std))
        return self.weights.to(x).log() - 0.5 * sq.clamp_min(0) / self.std**2 + log_norm

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_prob(x), dim=-1)

    def score(self, x: Tensor) -> Tensor:
        """``∇ log p(x) = (Σ_m r_m(x) μ_m - x) / s²`` with responsibilities ``r = softmax`` of
        the component log-densities (closed form: no autograd pass in Langevin rollouts)."""
        x = x.detach()
        resp = torch.softmax(self.component_log_prob(x), dim=-1)  # [B, M]
        return (resp @ self.means.to(x) - x) / self.std**2

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[idx] + self.std * torch.randn(n, self.dim, generator=generator)

    def mixture(self) -> tuple[Tensor, Tensor]:
        return self.means, self.weights


def gmm25() -> GaussianMixture:
    """25 equal components on the grid ``{-10, -5, 0, 5, 10}²``, covariance ``0.3 I`` (d = 2)."""
    grid = torch.tensor([-10.0, -5.0, 0.0, 5.0, 10.0])
    means = torch.cartesian_prod(grid, grid)  # [25, 2]
    target = GaussianMixture(means, math.sqrt(0.3), name="gmm25")
    target.default_sigma, target.plot_range = math.sqrt(5.0), 13.0
    return target


def gmm40(dim: int = 50, seed: int = 0) -> GaussianMixture:
    """40 equal unit-variance components in ``d = 50``, means uniform in ``[-5, 5]^d`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    means = 10 * torch.rand(40, dim, generator=gen) - 5
    target = GaussianMixture(means, 1.0, name="gmm40")
    target.default_sigma = math.sqrt(5.0)
    return target


class Funnel(Target):
    """Neal's funnel (d = 10): ``x_0 ~ N(0, 3²)``, ``x_{1..9} | x_0 ~ N(0, e^{x_0} I)``.

    Normalised: ``log Z = 0``.
    """

    name, default_sigma, plot_range = "funnel", 1.0, 10.0

    def __init__(self, dim: int = 10) -> None:
        self.dim, self.log_z = dim, 0.0

    def log_prob(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x0, rest = x[:, 0], x[:, 1:]  # [B], [B, d-1]
        lp0 = -0.5 * (x0 / 3.0).square() - math.log(3.0) - 0.5 * LOG_2PI
        lpr = -0.5 * rest.square().sum(-1) * torch.exp(-x0) - 0.5 * (self.dim - 1) * (x0 + LOG_2PI)
        return lp0 + lpr

    def score(self, x: Tensor) -> Tensor:
        """Closed form: ``∂/∂x₀ = -x₀/9 - (d-1)/2 + ½ e^{-x₀} Σ xᵢ²``, ``∂/∂xᵢ = -xᵢ e^{-x₀}``."""
        self.check_input(x)
        x = x.detach()
        x0, rest = x[:, :1], x[:, 1:]
        inv_var = torch.exp(-x0)  # [B, 1]
        g0 = -x0 / 9.0 - 0.5 * (self.dim - 1) + 0.5 * rest.square().sum(-1, keepdim=True) * inv_var
        return torch.cat([g0, -rest * inv_var], dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        x0 = 3.0 * torch.randn(n, 1, generator=generator)
        rest = torch.randn(n, self.dim - 1, generator=generator) * torch.exp(0.5 * x0)
        return torch.cat([x0, rest], dim=1)


def _well_log_density(x: np.ndarray | float) -> np.ndarray | float:
    """Unnormalised 1-D well ``-x⁴ + 6x² + 0.5x``."""
    return -(x**4) + 6 * x**2 + 0.5 * x


def manywell_log_z(pairs: int = 16) -> float:
    """``log Z`` of :class:`ManyWell` by quadrature: ``pairs · (log ∫ e^{-x⁴+6x²+0.5x} dx
    + ½ log 2π)`` (the quadratic half of each pair is a unit Gaussian)."""
    z1, _ = integrate.quad(lambda t: math.exp(_well_log_density(t)), -np.inf, np.inf, epsabs=0)
    return pairs * (math.log(z1) + 0.5 * LOG_2PI)


class ManyWell(Target):
    """Many-well (d = 32): 16 independent pairs with ``log R = -x₁⁴ + 6x₁² + 0.5x₁ - 0.5x₂²``.

    ``log Z = 164.6957`` by quadrature (:func:`manywell_log_z`). Exact samples: ``x₂ ~ N(0, 1)``
    and ``x₁`` by rejection from a two-Gaussian envelope whose bound is found on a grid.
    """

    name, default_sigma, plot_range = "manywell", 1.0, 3.0

    def __init__(self, dim: int = 32) -> None:
        if dim % 2:
            raise ValueError(f"manywell dim must be even (pairs), got {dim}")
        self.dim, self.log_z = dim, manywell_log_z(dim // 2)
        self._z1 = math.exp(self.log_z / (dim // 2) - 0.5 * LOG_2PI)
        # rejection envelope: q = ½ N(-a, s²) + ½ N(a, s²) around the two wells
        self._a, self._s = 1.73, 0.55
        grid = np.linspace(-5, 5, 20001)
        self._log_m = float(np.max(self._log_ratio(grid))) + 0.05

    def _log_ratio(self, x: np.ndarray) -> np.ndarray:
        log_q = np.logaddexp(
            -0.5 * ((x - self._a) / self._s) ** 2, -0.5 * ((x + self._a) / self._s) ** 2
        ) - np.log(2 * self._s * math.sqrt(2 * math.pi))
        return _well_log_density(x) - math.log(self._z1) - log_q

    def log_prob(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x1, x2 = x[:, 0::2], x[:, 1::2]  # [B, 16]
        return (-(x1**4) + 6 * x1**2 + 0.5 * x1 - 0.5 * x2**2).sum(-1)

    def score(self, x: Tensor) -> Tensor:
        """Closed form: ``(-4x₁³ + 12x₁ + 0.5, -x₂)`` per pair."""
        self.check_input(x)
        x = x.detach()
        out = -x.clone()  # the x₂ coordinates
        x1 = x[:, 0::2]
        out[:, 0::2] = -4 * x1**3 + 12 * x1 + 0.5
        return out

    def _sample_well(self, n: int, generator: torch.Generator | None) -> Tensor:
        out: list[np.ndarray] = []
        have = 0
        while have < n:
            m = 2 * (n - have) + 16
            sign = torch.randint(0, 2, (m,), generator=generator).numpy() * 2 - 1
            prop = sign * self._a + self._s * torch.randn(m, generator=generator).numpy()
            u = torch.rand(m, generator=generator).double().numpy()
            keep = prop[np.log(u) < self._log_ratio(prop) - self._log_m]
            out.append(keep)
            have += keep.size
        return torch.from_numpy(np.concatenate(out)[:n]).float()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        pairs = self.dim // 2
        x1 = self._sample_well(n * pairs, generator).view(n, pairs)
        x2 = torch.randn(n, pairs, generator=generator)
        return torch.stack([x1, x2], dim=-1).reshape(n, self.dim)


class UserTarget(Target):
    """A target from a Python callable ``energy(x [B, d]) -> [B]`` (``log R = -E``).

    The callable is checked on a probe batch at construction and on every call: a wrong shape
    or a NaN raises ``ValueError`` naming the problem. ``log_z`` and ``sampler`` (a function
    ``n -> [n, d]`` of exact samples) are optional; metrics that need them are then skipped.
    """

    def __init__(
        self,
        energy: Callable[[Tensor], Tensor],
        dim: int,
        log_z: float | None = None,
        sampler: Callable[[int], Tensor] | None = None,
        name: str = "user",
        sigma: float = 1.0,
    ) -> None:
        if not callable(energy):
            raise TypeError(f"energy must be callable, got {type(energy).__name__}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        self.energy, self.dim, self.log_z, self._sampler = energy, dim, log_z, sampler
        self.name, self.default_sigma = name, sigma
        self.log_prob(torch.randn(4, dim))  # probe: fail early on a wrong shape or NaN

    def log_prob(self, x: Tensor) -> Tensor:
        self.check_input(x)
        e = self.energy(x)
        if not isinstance(e, Tensor):
            raise TypeError(
                f"energy of {self.name!r} must return a torch.Tensor, got {type(e).__name__}"
            )
        if e.shape != (x.shape[0],):
            raise ValueError(
                f"energy of {self.name!r} returned shape {tuple(e.shape)}, "
                f"expected [B]=[{x.shape[0]}] for x of shape {tuple(x.shape)}"
            )
        if torch.isnan(e).any():
            bad = torch.nonzero(torch.isnan(e)).flatten().tolist()[:8]
            raise ValueError(f"energy of {self.name!r} returned NaN at batch indices {bad}")
        return -e

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self._sampler is None:
            raise NotImplementedError(f"target {self.name!r} has no exact sampler")
        return self._sampler(n)

    @property
    def has_samples(self) -> bool:
        return self._sampler is not None
