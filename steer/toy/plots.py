"""Figures of ``steer toy``: samples over the target density, and metrics over training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from steer.toy.targets import Target  # noqa: E402

__all__ = ["plot_samples", "plot_history"]


def plot_samples(target: Target, samples: np.ndarray, path: Path, title: str = "") -> None:
    """2-D: samples over the contours of ``log R``; otherwise marginal histograms of the first
    dimensions beside exact samples (when the target has them)."""
    d = samples.shape[1]
    if d == 2:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        r = target.plot_range
        g = torch.linspace(-r, r, 300)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        with torch.no_grad():
            lp = target.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).view(300, 300)
        ax.contourf(xx, yy, lp.clamp_min(lp.max() - 30), levels=30, cmap="Blues")
        ax.scatter(samples[:, 0], samples[:, 1], s=2, c="tab:red", alpha=0.6)
        ax.set_xlim(-r, r), ax.set_ylim(-r, r)
    else:
        dims = list(range(min(d, 4)))
        fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims), 3))
        truth = target.sample(samples.shape[0]).numpy() if target.has_samples else None
        for ax, i in zip(np.atleast_1d(axes), dims, strict=True):
            ax.hist(samples[:, i], bins=60, density=True, alpha=0.6, label="sampler")
            if truth is not None:
                ax.hist(truth[:, i], bins=60, density=True, alpha=0.5, label="exact")
            ax.set_title(f"x[{i}]")
        np.atleast_1d(axes)[0].legend()
    fig.suptitle(title or target.name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: list[dict[str, Any]], path: Path, log_z: float | None) -> None:
    """ELBO, log Ẑ_RW and EUBO (against the true log Z) and the loss over iterations."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    it = [h["iteration"] for h in history]
    for key in ("elbo", "log_z_rw", "eubo"):
        if all(key in h for h in history):
            a.plot(it, [h[key] for h in history], label=key)
    if log_z is not None:
        a.axhline(log_z, color="k", ls="--", label="log Z")
        lo = min(h["elbo"] for h in history[len(history) // 2 :]) - 1 if history else log_z - 5
        a.set_ylim(max(lo, log_z - 10), log_z + 3)
    a.set_xlabel("iteration"), a.legend()
    b.semilogy(it, [max(h["loss"], 1e-8) for h in history])
    b.set_xlabel("iteration"), b.set_title("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
