"""An exact posterior reference: rejection sampling from the prior.

For a posterior ``p_post(x) = p_prior(x) r(x) / Z`` with a reward ``0 <= r(x) <= B``, a draw
``x ~ p_prior`` accepted with probability ``r(x) / B`` is an exact posterior sample: the density
of an accepted draw is ``p_prior(x) (r(x) / B) / P(accept)`` with ``P(accept) = Z / B``. The
normaliser ``Z = E_prior[r(x)]`` is estimated by the Monte Carlo mean of ``r`` over every prior
draw, accepted or not (``log Ẑ = log mean r``), with the delta-method standard error
``se(log Ẑ) = se(mean r) / mean r``. Drawing stops after the whole batch in which the
``num_samples``-th draw is accepted, so ``log Ẑ`` carries a bias of order ``1 / num_drawn``,
far below its standard error. Everything runs in ``log r`` (float64 for the acceptance test and
the running mean), so rewards far below 1 neither underflow nor lose precision.

No diffusers: ``draw`` is any prior sampler (a pipeline, a :class:`steer.toy.sampler`
rollout, a mixture) and ``log_reward`` any log-likelihood bounded by ``log_bound``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["RejectionResult", "TooFewAccepted", "log_mean_exp_stderr", "rejection_sample"]

_BOUND_TOLERANCE = 1e-6  # log r may exceed log_bound by this much (rounding)


@dataclass
class RejectionResult:
    """Posterior samples and the prior's normaliser estimate of :func:`rejection_sample`.

    Attributes:
        samples: ``[N, ...]`` the first ``N = num_samples`` accepted draws, in draw order
            (fewer in the partial result of :class:`TooFewAccepted`).
        log_z: ``log`` of the mean of ``r`` over every draw: ``log Ẑ`` of ``Z = E_prior[r]``
            (``log_bound`` included).
        log_z_stderr: the delta-method standard error of ``log_z``, ``se(mean r) / mean r``.
        acceptance_rate: accepted / drawn (an estimate of ``Z / B``).
        num_drawn: prior draws made.
        num_accepted: draws accepted, all of them (may exceed ``N``).
        log_reward: ``[N]`` ``log r`` of the returned samples.
    """

    samples: Tensor
    log_z: float
    log_z_stderr: float
    acceptance_rate: float
    num_drawn: int
    num_accepted: int
    log_reward: Tensor


class TooFewAccepted(RuntimeError):
    """``max_draws`` ran out before ``num_samples`` draws were accepted; ``result`` holds the
    partial :class:`RejectionResult` (every accepted sample, ``log Ẑ`` over every draw)."""

    def __init__(self, message: str, result: RejectionResult) -> None:
        super().__init__(message)
        self.result = result


class _RunningMeanExp:
    """Streaming ``log mean exp(v)`` and the variance of ``exp(v)`` over batches of ``v``.

    The values are kept as ``exp(v - shift)`` with ``shift`` the largest ``v`` seen so far;
    batches merge by Chan's parallel update of ``(count, mean, M2)``, rescaled when the shift
    grows, in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2, self.shift = 0, 0.0, 0.0, -math.inf

    def update(self, v: Tensor) -> None:  # v: [n] log-values (-inf allowed)
        v = v.detach().to(device="cpu", dtype=torch.float64).flatten()
        n = v.numel()
        if n == 0:
            return
        # 1. a larger shift: rescale the running moments to it.
        top = float(v.max())
        if top > self.shift:
            scale = math.exp(self.shift - top) if self.count else 0.0
            self.mean, self.m2, self.shift = self.mean * scale, self.m2 * scale**2, top
        if self.shift == -math.inf:  # every value so far is exp(-inf) = 0
            self.count += n
            return
        # 2. the batch's moments in the shifted scale, merged (Chan et al.).
        w = torch.exp(v - self.shift)  # [n] in [0, 1]
        mean_b = float(w.mean())
        m2_b = float((w - mean_b).square().sum())
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * n / total
        self.m2 += m2_b + delta**2 * self.count * n / total
        self.count = total

    def result(self) -> tuple[float, float]:
        """``(log mean exp(v), se(mean exp(v)) / mean exp(v))``; the error is ``inf`` with
        fewer than two values or a zero mean."""
        if self.count == 0:
            raise ValueError("no values: the mean of an empty set is undefined")
        if self.mean <= 0.0:
            return -math.inf, math.inf
        log_mean = self.shift + math.log(self.mean)
        if self.count < 2:
            return log_mean, math.inf
        var = max(self.m2, 0.0) / (self.count - 1)  # unbiased variance of exp(v - shift)
        return log_mean, math.sqrt(var / self.count) / self.mean


def log_mean_exp_stderr(log_r: Tensor) -> tuple[float, float]:
    """``log mean r`` of the values ``r = exp(log_r)`` and its delta-method standard error.

    ``log_r`` is ``[n]`` (any shape, flattened; ``-inf`` is ``r = 0``). The error is
    ``se(mean r) / mean r`` with ``se(mean r) = std(r) / sqrt(n)`` (unbiased std), computed
    after shifting by ``max log_r`` so that it neither overflows nor underflows. With fewer than
    two values, or every ``r = 0``, the error is ``inf`` (and ``log mean r = -inf`` for the
    latter). An empty tensor or a NaN raises ``ValueError``.
    """
    if log_r.numel() == 0:
        raise ValueError("log_mean_exp_stderr needs at least one value, got an empty tensor")
    nan = int(torch.isnan(log_r).sum())
    if nan:
        raise ValueError(f"log_r has {nan} NaN of {log_r.numel()} values")
    acc = _RunningMeanExp()
    acc.update(log_r)
    return acc.result()


def rejection_sample(
    draw: Callable[[int, torch.Generator], Tensor],
    log_reward: Callable[[Tensor], Tensor],
    num_samples: int,
    *,
    batch_size: int = 256,
    max_draws: int | None = None,
    generator: torch.Generator | None = None,
    log_bound: float = 0.0,
    progress: bool = False,
) -> RejectionResult:
    """Exact samples of ``p_post ∝ p_prior · r`` by rejection from the prior, and ``log Z``.

    Args:
        draw: ``draw(n, generator) -> [n, ...]`` exact prior samples (it should use only
            ``generator`` for its randomness, for reproducibility).
        log_reward: ``[n, ...] -> [n]`` the log-reward ``log r`` of samples, ``<= log_bound``.
        num_samples: ``N``, the accepted samples to return.
        batch_size: prior draws per call of ``draw``.
        max_draws: at most this many prior draws (default ``100 · num_samples``).
        generator: the source of the prior draws and of the uniforms ``u`` (default: a fresh
            generator seeded from torch's global generator).
        log_bound: ``log B`` of a known bound ``r <= B``; a draw is accepted when
            ``log u < log r - log B``, and ``log_z`` adds ``log B`` back.
        progress: show a tqdm bar of the accepted samples.

    Returns:
        A :class:`RejectionResult`.

    Raises:
        ValueError: bad arguments, a ``draw`` or ``log_reward`` of the wrong shape, a NaN
            log-reward, or a log-reward above ``log_bound`` (rejection needs ``r <= B``).
        TooFewAccepted: ``max_draws`` draws gave fewer than ``num_samples`` acceptances (the
            partial result is ``err.result``).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    max_draws = 100 * num_samples if max_draws is None else max_draws
    if not isinstance(max_draws, int) or max_draws < 1:
        raise ValueError(f"max_draws must be an integer >= 1, got {max_draws!r}")
    if not math.isfinite(log_bound):
        raise ValueError(f"log_bound must be finite, got {log_bound}")
    if generator is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        generator = torch.Generator().manual_seed(seed)

    acc = _RunningMeanExp()  # mean of r / B over every draw
    kept_x: list[Tensor] = []
    kept_lr: list[Tensor] = []
    drawn = accepted = 0
    bar = tqdm(total=num_samples, disable=not progress, desc="rejection", unit="sample")
    with torch.no_grad():
        while accepted < num_samples and drawn < max_draws:
            # 1. a batch of prior draws and their log-rewards, checked.
            n = min(batch_size, max_draws - drawn)
            x = draw(n, generator)  # [n, ...]
            if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] != n:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"draw({n}, generator) must return a tensor [{n}, ...], got {shape}"
                )
            lr = log_reward(x)  # [n]
            if not isinstance(lr, Tensor) or lr.shape != (n,):
                shape = tuple(lr.shape) if isinstance(lr, Tensor) else type(lr).__name__
                raise ValueError(
                    f"log_reward must return a tensor [n]=[{n}] for samples of shape "
                    f"{tuple(x.shape)}, got {shape}"
                )
            lr = lr.detach()
            lr64 = lr.to(device="cpu", dtype=torch.float64)  # [n]
            nan = int(torch.isnan(lr64).sum())
            if nan:
                raise ValueError(
                    f"log_reward returned NaN for {nan} of {n} samples (draws "
                    f"{drawn}..{drawn + n - 1}); rejection needs a log-reward at every draw"
                )
            top = float(lr64.max())
            if top > log_bound + _BOUND_TOLERANCE:
                raise ValueError(
                    f"log_reward exceeds log_bound = {log_bound:.6g}: the maximum seen is "
                    f"log r = {top:.6g} (r = {math.exp(min(top, 700.0)):.6g}); rejection "
                    f"sampling needs r <= 1, or pass a known bound B >= max r as "
                    f"log_bound=log(B)"
                )
            # 2. accept with probability r / B: log u < log r - log B, u ~ U(0, 1).
            shifted = lr64 - log_bound  # [n] log(r / B) <= 0
            u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
            keep = u.cpu().log() < shifted  # [n] bool (r = 0 is never accepted)
            acc.update(shifted)
            drawn += n
            k = int(keep.sum())
            if k:
                kept_x.append(x[keep.to(x.device)].detach())
                kept_lr.append(lr[keep.to(lr.device)])
            accepted += k
            bar.update(min(k, num_samples - bar.n))
            bar.set_postfix(drawn=drawn, rate=f"{accepted / drawn:.3g}")
    bar.close()

    # 3. the first N accepted draws and log Ẑ over every draw.
    log_mean, stderr = acc.result()
    samples = torch.cat(kept_x)[:num_samples] if kept_x else x[:0].detach()
    log_r = torch.cat(kept_lr)[:num_samples] if kept_lr else lr[:0]
    rate = accepted / drawn
    result = RejectionResult(
        samples=samples,
        log_z=log_mean + log_bound,
        log_z_stderr=stderr,
        acceptance_rate=rate,
        num_drawn=drawn,
        num_accepted=accepted,
        log_reward=log_r,
    )
    if accepted < num_samples:
        # 4. too few: say how many draws would do (from the mean of r / B when none passed).
        if accepted:
            how = f"raise max_draws to about num_samples / rate = {math.ceil(num_samples / rate)}"
        elif log_mean > -math.inf:  # no acceptance yet: E[rate] = mean of r / B over the draws
            needed = math.exp(min(math.log(num_samples) - log_mean, 700.0))
            how = (
                f"raise max_draws to about num_samples / rate = {needed:.3g}, with the rate "
                f"estimated by the mean of r / B over the draws ({math.exp(log_mean):.3g})"
            )
        else:
            how = (
                "every draw had r = 0: the reward has no mass under the prior sampler; check "
                "log_reward, or raise max_draws far above the current one"
            )
        raise TooFewAccepted(
            f"rejection sampling drew {drawn} samples (max_draws = {max_draws}) and accepted "
            f"{accepted}, fewer than num_samples = {num_samples}: acceptance rate {rate:.3g}; "
            f"{how}. The partial result is this error's .result",
            result,
        )
    return result
