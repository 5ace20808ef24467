"""The main job's report: prior and posterior samples of the digits model beside exact samples
of the posterior (rejection from the prior, §7), with the classifier's view of them (class
fraction, mean log p(c|x), diversity), two-sample distances to the exact posterior (kernel MMD on
pixels, Fréchet in the classifier's features) beside their noise floor, and log Z beside the
Monte Carlo value."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from steer.images import diversity, to_unit

if TYPE_CHECKING:
    from steer.diffusion import DiffusionPolicy
    from steer.train.config import FinetuneConfig
    from steer.train.run import Run
    from steer.train.sampling import Decode

NUM_SAMPLES = 256


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``a [N, F]`` and ``b [M, F]``."""
    a64, b64 = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu_a, mu_b = a64.mean(0), b64.mean(0)
    eps = 1e-6 * np.eye(a64.shape[1])  # keeps the product's square root well defined
    cov_a, cov_b = np.cov(a64, rowvar=False) + eps, np.cov(b64, rowvar=False) + eps
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def sample_images(policy: DiffusionPolicy, n: int, steps: int, eta: float, seed: int) -> Tensor:
    """``n`` samples ``[n, 1, H, W]`` in ``[0, 1]`` (pixel-space model), without gradients."""
    from steer.diffusion import rollout

    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n, 128):
            traj = rollout(
                policy,
                batch_size=min(128, n - start),
                num_inference_steps=steps,
                eta=eta,
                generator=gen,
                keep_pred_x0=False,
            )
            out.append(to_unit(traj.x0.float()).cpu())
    return torch.cat(out)


def class_metrics(reward: Any, images: Tensor, real_features: Tensor, target: list[int]) -> dict:
    """The classifier's view of samples ``[N, 1, H, W]``."""
    rgb = images.expand(-1, 3, -1, -1)
    with torch.no_grad():
        log_probs = reward.log_probs(rgb)  # [N, 10]
        feats = reward.features(rgb)  # [N, F]
    idx = torch.tensor(target)
    return {
        "mean_log_p_target": float(log_probs[:, idx].logsumexp(1).mean()),
        "fraction_target": float(torch.isin(log_probs.argmax(1).cpu(), idx).float().mean()),
        "diversity": diversity(images),
        "frechet_to_real_target": frechet_distance(feats, real_features),
    }


def save_side_by_side(
    prior: Tensor, posterior: Tensor, path: Path | str, n: int = 64, exact: Tensor | None = None
) -> None:
    """One PNG: prior samples (left), posterior samples, and exact posterior samples (right,
    when given), 8×8 each."""
    from torchvision.utils import make_grid, save_image

    panels = [prior, posterior] + ([] if exact is None else [exact])
    grids = [make_grid(p[:n], nrow=8, padding=1, pad_value=1.0) for p in panels]
    gap = torch.ones(grids[0].shape[0], grids[0].shape[1], 4)
    both = torch.cat([x for g in grids for x in (g, gap)][:-1], dim=2)
    save_image(torch.nn.functional.interpolate(both[None], scale_factor=3)[0], str(path))


def posterior_log_weights(
    cfg: FinetuneConfig,
    policy: DiffusionPolicy,
    prior: DiffusionPolicy,
    reward: Any,
    decode: Decode,
    n: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """``n`` samples ``[n, 1, H, W]`` in ``[0, 1]`` of ``policy`` and their RTB log-weights
    ``log r(x_0) + Σ log P_F^prior - Σ log P_F^post`` ``[n]`` (§6: their mean is an ELBO of
    ``log Z``, their log-mean-exp a consistent estimate)."""
    from steer.diffusion import rollout
    from steer.train.sampling import score

    gen = torch.Generator().manual_seed(seed)
    images, log_w = [], []
    with torch.no_grad():
        for start in range(0, n, 128):
            traj = rollout(policy, batch_size=min(128, n - start), generator=gen,
                           num_inference_steps=cfg.model.num_inference_steps,
                           eta=cfg.model.eta, keep_pred_x0=False)  # fmt: skip
            log_prior = sum(
                prior.log_prob(traj.latents[:, k], traj.latents[:, k + 1], k)
                for k in range(traj.num_steps)
            )  # [b]
            pixels = decode(traj.x0)
            log_r = score(reward, pixels, None) / cfg.objective.beta
            log_w.append((log_r + log_prior - traj.log_pf.sum(1)).cpu())
            images.append(pixels[:, :1].cpu())
    return torch.cat(images), torch.cat(log_w)


def distances(x: Tensor, ref: Tensor, reward: Any, bandwidth: float) -> dict[str, float]:
    """Kernel MMD on pixels (fixed bandwidth) and Fréchet distance in the classifier's features
    between samples ``x`` and an exact set ``ref`` (both ``[N, 1, H, W]`` in ``[0, 1]``)."""
    from steer.toy.metrics import mmd_rbf

    with torch.no_grad():
        fx, fr = (reward.features(v.expand(-1, 3, -1, -1)) for v in (x, ref))
    return {
        "mmd_to_exact": mmd_rbf(x.flatten(1), ref.flatten(1), bandwidth),
        "frechet_to_exact": frechet_distance(fx, fr),
    }


def exact_section(reward: Any, a: Tensor, b: Tensor, info: dict, bandwidth: float) -> dict:
    """The exact posterior's own figures: log Z, acceptance, diversity, noise floors."""
    floor = distances(b, a, reward, bandwidth)
    with torch.no_grad():
        log_p = reward.log_probs(a.expand(-1, 3, -1, -1))
    idx = torch.tensor(list(reward.targets))
    return {
        "log_z": info["log_z"],
        "log_z_stderr": info["log_z_stderr"],
        "acceptance_rate": info["acceptance_rate"],
        "num_drawn": info["num_drawn"],
        "draw_seconds": info["seconds"],
        "cached": info["cached"],
        "diversity": diversity(a),
        "fraction_target": float(torch.isin(log_p.argmax(1), idx).float().mean()),
        "mmd_floor": floor["mmd_to_exact"],
        "frechet_floor": floor["frechet_to_exact"],
        "mmd_bandwidth": bandwidth,
    }


@dataclass
class DigitsEvaluation:
    """The report's figures (``metrics.json``) and the samples they were measured on, each
    ``[N, 1, H, W]`` in ``[0, 1]``."""

    metrics: dict[str, Any]
    prior: Tensor
    posterior: Tensor
    exact: Tensor


def exact_reference(
    cfg: FinetuneConfig, prior: DiffusionPolicy, reward: Any, decode: Decode, n: int
) -> tuple[Tensor, Tensor, dict]:
    """The two cached sets of ``n`` exact posterior samples ``[n, 1, H, W]`` in ``[0, 1]`` (the
    second for the noise floor) and their facts (rejection from ``prior``, §7)."""
    from steer.digits.reference import load_or_draw_reference, spec_of
    from steer.train.sampling import score

    prior.set_timesteps(cfg.model.num_inference_steps, cfg.model.eta)

    def log_reward(x0: Tensor) -> Tensor:
        return score(reward, decode(x0), None) / cfg.objective.beta

    spec = spec_of(cfg, prior, n, seed=30_000 + cfg.train.seed, reward=reward)
    a, b, info = load_or_draw_reference(prior, reward, log_reward, spec, cfg.model.cache_dir)
    a, b = (decode(v)[:, :1].cpu() for v in (a, b))
    return a, b, info


def _real_target(reward: Any, target: list[int]) -> tuple[Tensor, Tensor]:
    """Real digits of the target classes ``[M, 1, 16, 16]`` and their classifier features."""
    from steer.digits.classifier import load_digits_dataset

    images, labels = load_digits_dataset("all")
    real = images[torch.isin(labels, torch.tensor(target))]
    with torch.no_grad():
        return real, reward.features(real.expand(-1, 3, -1, -1))


def _log_z_section(exact: dict, log_w: Tensor, history: list[dict[str, float]]) -> dict:
    from steer.toy.metrics import log_mean_exp

    last = next((h["log_z"] for h in reversed(history) if "log_z" in h), None)
    log_z = {
        "exact": exact["log_z"],
        "exact_stderr": exact["log_z_stderr"],
        "importance_weighted": float(log_mean_exp(log_w)),
        "elbo": float(log_w.mean()),
        "last_training_batch": last,
    }
    log_z["error"] = abs(log_z["importance_weighted"] - log_z["exact"])
    return log_z


def digits_metrics(
    cfg: FinetuneConfig,
    policy: DiffusionPolicy,
    prior: DiffusionPolicy,
    reward: Any,
    decode: Decode,
    history: list[dict[str, float]],
    *,
    wall_time: float = math.nan,
    num_samples: int | None = None,
) -> DigitsEvaluation:
    """The digits job's figures for a fine-tuned ``policy``: prior and policy samples against
    the exact posterior of ``prior`` (rejection, §7), ``num_samples`` (default ``NUM_SAMPLES``)
    of each. ``history`` is the run's per-step records (its last ``log_z`` is reported)."""
    n = NUM_SAMPLES if num_samples is None else num_samples
    start, target = time.perf_counter(), list(reward.targets)
    steps, eta, seed = cfg.model.num_inference_steps, cfg.model.eta, 20_000 + cfg.train.seed
    # 1. the exact posterior (cached: two independent sets, the second for the noise floor)
    a, b, info = exact_reference(cfg, prior, reward, decode, n)
    bandwidth = float(torch.cdist(a.flatten(1), a.flatten(1)).median())
    # 2. prior and posterior samples, the posterior's log-weights
    prior_x = sample_images(prior, n, steps, eta, seed)
    posterior, log_w = posterior_log_weights(cfg, policy, prior, reward, decode, n, seed)
    real, real_features = _real_target(reward, target)
    exact = exact_section(reward, a, b, info, bandwidth)
    sides = {}
    for name, x in (("prior", prior_x), ("posterior", posterior)):
        sides[name] = {**class_metrics(reward, x, real_features, target),
                       **distances(x, a, reward, bandwidth)}  # fmt: skip
    d_prior, d_post = sides["prior"]["mmd_to_exact"], sides["posterior"]["mmd_to_exact"]
    metrics = {
        "target_class": target if len(target) > 1 else target[0],
        "beta": cfg.objective.beta,
        "objective": cfg.objective.name,
        "num_samples": n,
        "exact": exact,
        "prior": sides["prior"],
        "posterior": sides["posterior"],
        "mmd_closed": (d_prior - d_post) / max(d_prior - exact["mmd_floor"], 1e-12),
        "diversity_ratio": sides["posterior"]["diversity"] / exact["diversity"],
        "log_z": _log_z_section(exact, log_w, history),
        "real_target_diversity": diversity(real),
        "report_seconds": time.perf_counter() - start,
        "wall_time_s": wall_time,
        "config": cfg.to_dict(),
    }
    return DigitsEvaluation(metrics, prior_x, posterior, a)


def write_report(evaluation: DigitsEvaluation, out: Path) -> None:
    """``samples.npz``, ``grid.png`` (prior | posterior | exact) and ``metrics.json`` in ``out``."""
    ev = evaluation
    arrays = {"prior": ev.prior, "posterior": ev.posterior, "exact": ev.exact}
    np.savez_compressed(out / "samples.npz", **{k: v[:, 0].numpy() for k, v in arrays.items()})
    save_side_by_side(ev.prior, ev.posterior, out / "grid.png", exact=ev.exact)
    (out / "metrics.json").write_text(json.dumps(ev.metrics, indent=2))


def digits_report(run: Run, wall_time: float) -> dict:
    """Write ``samples.npz``, ``grid.png`` and ``metrics.json`` of the digits job: prior and
    posterior against the exact posterior (rejection from the prior, §7)."""
    p = run.parts
    ev = digits_metrics(run.cfg, p.policy, p.prior, p.reward, p.decode, run.state.history,
                        wall_time=wall_time)  # fmt: skip
    write_report(ev, run.out)
    return ev.metrics


def report_run(run: Run, wall_time: float) -> str | None:
    """The digits job's end-of-run hook (``log.report``): the report and its summary, for an
    unconditional model under the digits classifier; otherwise a line saying it is skipped."""
    if run.cfg.reward.name != "digits-classifier" or run.parts.cond.prompts is not None:
        return "digits report skipped: it needs the digits-classifier reward and no prompts"
    m = digits_report(run, wall_time=wall_time)
    return digits_summary(m) + (f"\nsamples.npz, grid.png, curves.png and metrics.json are in "
                                f"{run.out}")  # fmt: skip


def digits_summary(m: dict) -> str:
    """The report's headline lines, against the exact posterior."""
    pr, po, ex, lz = m["prior"], m["posterior"], m["exact"], m["log_z"]
    return (
        f"class {m['target_class']}: fraction classified {pr['fraction_target']:.2f} (prior) -> "
        f"{po['fraction_target']:.2f} (posterior; exact {ex['fraction_target']:.2f})\n"
        f"MMD to the exact posterior: prior {pr['mmd_to_exact']:.4f} -> posterior "
        f"{po['mmd_to_exact']:.4f} (noise floor {ex['mmd_floor']:.4f}; "
        f"{m['mmd_closed']:.0%} of the gap closed)\n"
        f"diversity {po['diversity']:.2f} (exact posterior {ex['diversity']:.2f}: "
        f"{m['diversity_ratio']:.0%})\n"
        f"log Z {lz['importance_weighted']:.3f} (importance-weighted; ELBO {lz['elbo']:.3f}) vs "
        f"exact {lz['exact']:.3f} ± {lz['exact_stderr']:.3f}"
    )
