"""The main job's report: prior and posterior samples of the digits model, side by side, with
the classifier's view of them (class fraction, mean log p(c|x), diversity, Fréchet distance)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from steer.train.outputs import diversity

if TYPE_CHECKING:
    from steer.diffusion import DiffusionPolicy
    from steer.train.loop import Run

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
            out.append((traj.x0.float() / 2 + 0.5).clamp(0, 1).cpu())
    return torch.cat(out)


def class_metrics(reward, images: Tensor, real_features: Tensor, target: list[int]) -> dict:
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


def save_side_by_side(prior: Tensor, posterior: Tensor, path, n: int = 64) -> None:
    """One PNG: prior samples (left) and posterior samples (right), 8×8 each."""
    from torchvision.utils import make_grid, save_image

    left = make_grid(prior[:n], nrow=8, padding=1, pad_value=1.0)
    right = make_grid(posterior[:n], nrow=8, padding=1, pad_value=1.0)
    gap = torch.ones(left.shape[0], left.shape[1], 4)
    both = torch.cat([left, gap, right], dim=2)
    save_image(torch.nn.functional.interpolate(both[None], scale_factor=3)[0], str(path))


def digits_report(run: Run, wall_time: float) -> dict:
    """Write ``samples.npz``, ``grid.png`` and ``metrics.json`` of the digits job."""
    from steer.rewards.digits import load_digits_dataset

    cfg, parts = run.cfg, run.parts
    reward = parts.reward
    target = list(reward.targets)
    steps, eta, seed = cfg.model.num_inference_steps, cfg.model.eta, 20_000 + cfg.train.seed
    prior = sample_images(parts.prior, NUM_SAMPLES, steps, eta, seed)
    posterior = sample_images(parts.policy, NUM_SAMPLES, steps, eta, seed)
    images, labels = load_digits_dataset("all")
    real = images[torch.isin(labels, torch.tensor(target))]  # [M, 1, 16, 16] in [0, 1]
    with torch.no_grad():
        real_features = reward.features(real.expand(-1, 3, -1, -1))
    metrics = {
        "target_class": target if len(target) > 1 else target[0],
        "beta": cfg.objective.beta,
        "objective": cfg.objective.name,
        "num_samples": NUM_SAMPLES,
        "prior": class_metrics(reward, prior, real_features, target),
        "posterior": class_metrics(reward, posterior, real_features, target),
        "real_target_diversity": diversity(real),
        "wall_time_s": wall_time,
        "config": cfg.to_dict(),
    }
    out = run.out
    np.savez_compressed(
        out / "samples.npz", prior=prior[:, 0].numpy(), posterior=posterior[:, 0].numpy()
    )
    save_side_by_side(prior, posterior, out / "grid.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
