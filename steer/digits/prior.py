"""The embedded digits prior: a small DDPM on scikit-learn's digits at 16×16, trained on first use.

``steer pretrain-digits`` (and ``scripts/pretrain_digits.py``) trains, or finds in the cache, both
the prior (a diffusers pipeline folder: ``model_index.json``, ``unet/``, ``scheduler/``) and the
digits classifier of :mod:`steer.digits.classifier`, then prints where they are. The cache is
``--cache-dir``, else ``$STEER_CACHE``, else ``~/.cache/steer``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from steer.config import input_phase
from steer.digits.cache import cache_root, cached_folder, config_folder
from steer.digits.classifier import (
    digits_classifier,
    load_digits_dataset,
    load_or_train_digits_classifier,
)
from steer.digits.pretrain import (
    DDPMTrainConfig,
    make_scheduler,
    make_unet,
    sample_ddim,
    save_ddpm_folder,
    timed,
    train_ddpm,
)
from steer.images import save_grid, to_unit

INFO_FILE = "train_info.json"  # written last: its presence marks a complete prior folder
GRID_FILE = "samples.png"


@dataclass(frozen=True)
class DigitsPriorConfig:
    """Architecture, noise schedule and training budget of the digits prior (the cache key)."""

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention: bool = False
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    train: DDPMTrainConfig = field(default_factory=lambda: DDPMTrainConfig(steps=600))
    grid_steps: int = 50  # DDIM steps (eta = 1) for the sample grid saved next to the weights

    def __post_init__(self) -> None:
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(
                "beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2'; "
                f"got {self.beta_schedule!r}"
            )
        if self.num_train_timesteps < 2 or self.grid_steps < 1:
            raise ValueError(
                f"num_train_timesteps must be >= 2 and grid_steps >= 1; got "
                f"{self.num_train_timesteps}, {self.grid_steps}"
            )


def prior_folder(cache_dir: str | os.PathLike[str] | None, config: DigitsPriorConfig) -> Path:
    """Where the prior of ``config`` lives in the cache (``digits_prior`` for the default)."""
    return config_folder(cache_root(cache_dir), "digits_prior", config, DigitsPriorConfig())


def _check_prior(folder: Path) -> None:
    """Raise if the folder cannot be loaded back (weights, scheduler, index, info)."""
    from diffusers import DDPMScheduler, UNet2DModel

    json.loads((folder / "model_index.json").read_text())
    json.loads((folder / INFO_FILE).read_text())
    DDPMScheduler.from_pretrained(folder / "scheduler")
    UNet2DModel.from_pretrained(folder / "unet")


def train_digits_prior(config: DigitsPriorConfig, folder: Path, progress: bool = True) -> dict:
    """Train the prior of ``config`` and write its pipeline folder, sample grid and info."""
    # 1. data in [-1, 1] and a seeded model
    images, _ = load_digits_dataset("all")  # [N, 1, 16, 16] in [0, 1]
    data = images * 2.0 - 1.0
    torch.manual_seed(config.train.seed)
    unet = make_unet(16, 1, config.block_out_channels, config.layers_per_block, config.attention)
    scheduler = make_scheduler(config.num_train_timesteps, config.beta_schedule)
    n_params = sum(p.numel() for p in unet.parameters())
    print(
        f"digits prior: {n_params / 1e6:.2f}M parameters, {len(data)} images, "
        f"{config.train.steps} steps x batch {config.train.batch_size} "
        f"= {config.train.steps * config.train.batch_size / len(data):.1f} epochs"
    )
    # 2. train (EMA weights kept), save the pipeline folder
    (ema, losses), wall, cpu = timed(
        lambda: train_ddpm(unet, scheduler, data, config.train, progress=progress)
    )
    save_ddpm_folder(ema, scheduler, folder)
    # 3. a grid of samples next to the weights, to look at
    generator = torch.Generator().manual_seed(config.train.seed)
    with torch.no_grad():
        samples = sample_ddim(ema, scheduler, 100, config.grid_steps, 1.0, generator)
    save_grid(to_unit(samples), folder / GRID_FILE, nrow=10, scale=2, padding=2, pad_value=0.5)
    info = {
        "train_seconds": wall,
        "train_cpu_seconds": cpu,
        "torch_threads": torch.get_num_threads(),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "n_parameters": n_params,
        "n_images": len(data),
        "sampling": {
            "scheduler": "DDIMScheduler",
            "num_inference_steps": config.grid_steps,
            "eta": 1.0,
        },
        "config": asdict(config),
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    print(f"digits prior: trained in {wall:.0f} s (final loss {info['final_loss']:.4f})")
    return info


def load_or_train_digits_prior(
    cache_dir: str | os.PathLike[str] | None = None,
    config: DigitsPriorConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """The cached digits prior folder, trained on first use (a few minutes on 2 cores).

    A folder that cannot be read back is retrained with a :class:`CorruptCacheWarning`;
    ``force`` retrains unconditionally. Load it with ``DDPMPipeline.from_pretrained(path)``.
    """
    config = config or DigitsPriorConfig()
    folder = prior_folder(cache_dir, config)

    def build(path: Path) -> None:
        train_digits_prior(config, path, progress=progress)
        print(f"digits prior: saved to {folder}")

    return cached_folder(folder, "digits prior", _check_prior, build, force)


def digits_pipeline(cache_dir: str | os.PathLike[str] | None = None):
    """The embedded default model (``model.pretrained=digits``): the cached prior as a
    ``SteerDDPMPipeline``, trained on first use."""
    from steer.pipelines import SteerDDPMPipeline

    return SteerDDPMPipeline.from_pretrained(load_or_train_digits_prior(cache_dir))


def evaluate_prior_classes(
    prior: Path, classifier: Path, num_samples: int = 256, steps: int = 50, seed: int = 0
) -> dict:
    """Class histogram of ``num_samples`` prior samples under the digits classifier."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(prior / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(prior / "scheduler")
    reward = digits_classifier(target=list(range(10)), weights=str(classifier))
    with torch.no_grad():
        x = sample_ddim(
            unet, scheduler, num_samples, steps, 1.0, torch.Generator().manual_seed(seed)
        )
        log_p = reward.log_probs(to_unit(x))  # [N, 10]
    counts = torch.bincount(log_p.argmax(1), minlength=10)
    return {
        "num_samples": num_samples,
        "class_fractions": (counts.float() / num_samples).tolist(),
        "mean_max_prob": float(log_p.exp().amax(1).mean()),
    }


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="steer pretrain-digits", description=__doc__.split("\n")[0])
    p.add_argument(
        "--cache-dir", default=None, help="cache folder (default $STEER_CACHE or ~/.cache/steer)"
    )
    p.add_argument("--steps", type=int, default=None, help="prior training steps (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even when cached")
    p.add_argument("--no-prior", action="store_true", help="only the classifier")
    p.add_argument("--no-classifier", action="store_true", help="only the prior")
    p.add_argument(
        "--eval-samples", type=int, default=256, help="prior samples to classify (0: none)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``steer pretrain-digits``: train or find the digits classifier and prior; print paths."""
    with input_phase():  # bad input: one line from the `steer` command (steer.config)
        args = _parse([] if argv is None else argv)
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be >= 1; got {args.steps}")
    clf = prior = None
    if not args.no_classifier:
        clf = load_or_train_digits_classifier(
            args.cache_dir, force=args.force, progress=not args.quiet
        )
        acc = json.loads((clf / "metrics.json").read_text())["test_accuracy"]
        print(f"digits classifier: {clf} (held-out accuracy {acc:.2%})")
    if not args.no_prior:
        base = DigitsPriorConfig()
        train = replace(base.train, seed=args.seed, steps=args.steps or base.train.steps)
        config = replace(base, train=train)
        prior = load_or_train_digits_prior(args.cache_dir, config, args.force, not args.quiet)
        info = json.loads((prior / INFO_FILE).read_text())
        print(
            f"digits prior: {prior} (trained in {info['train_seconds']:.0f} s; "
            f"samples {prior / GRID_FILE})"
        )
    if clf is not None and prior is not None and args.eval_samples > 0:
        stats = evaluate_prior_classes(prior, clf, args.eval_samples, seed=args.seed)
        (prior / "sample_classes.json").write_text(json.dumps(stats, indent=2) + "\n")
        fractions = " ".join(f"{c}:{f:.2f}" for c, f in enumerate(stats["class_fractions"]))
        print(f"prior samples by predicted class: {fractions}")
    return 0
