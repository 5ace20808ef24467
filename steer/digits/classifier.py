"""The digits classifier reward: a small CNN on scikit-learn's handwritten digits at 16×16.

The classifier is trained locally (seconds on a CPU) on a fixed train split of
``sklearn.datasets.load_digits`` and cached under ``$STEER_CACHE`` (default ``~/.cache/steer``).
As a reward it scores ``log p(c | x)`` (§1, "posterior of a prior": ``log r(x)``), the
maximum over a set of target classes, and it is differentiable in the images.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from steer.digits.cache import cache_root, cached_folder, config_folder
from steer.rewards.base import Reward

IMAGE_SIZE = 16
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the fixed train / test split; never change it (cached metrics refer to it)
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"


# ----------------------------------------------------------------------------- data


def _split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed split: a permutation by the legacy (version-stable) numpy RandomState(SPLIT_SEED)."""
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    n_test = int(round(TEST_FRACTION * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


@functools.lru_cache(maxsize=1)
def _digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8]
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target, dtype=torch.int64)  # [N]
    return images.clamp(0.0, 1.0), labels  # [N, 1, 16, 16], [N]


def load_digits_dataset(
    split: Literal["train", "test", "all"] = "all",
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits upsampled (bilinear) from 8×8 to 16×16.

    Returns ``(images [N, 1, 16, 16] float in [0, 1], labels [N] int64)``; ``split`` is the fixed
    80/20 split used to train and evaluate the classifier (``"all"``: every image).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    images, labels = _digits_16()
    if split == "all":
        return images.clone(), labels.clone()
    train, test = _split_indices(len(labels))
    index = torch.from_numpy(train if split == "train" else test)
    return images[index], labels[index]


# ----------------------------------------------------------------------------- model


class DigitsCNN(nn.Module):
    """Three 3×3 convolutions (16×16 → 8×8 → 4×4), a feature layer, a linear head.

    Input ``[B, 1, 16, 16]`` in ``[0, 1]``; ``features`` ``[B, F]``; logits ``[B, 10]``.
    """

    def __init__(self, width: int = 16, num_features: int = 128) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # [B, w, 8, 8]
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # [B, 2w, 4, 4]
            nn.Flatten(),
            nn.Linear(2 * w * 16, num_features),
            nn.ReLU(),  # [B, F]
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(num_features, NUM_CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x * 2.0 - 1.0)  # [B, F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, 10]


@dataclass(frozen=True)
class ClassifierConfig:
    """How the digits classifier is trained (its cache folder is keyed on these values)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 16
    num_features: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "width", "num_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel plus a little Gaussian noise: ``[B, 1, 16, 16]``."""
    padded = F.pad(x, (1, 1, 1, 1))  # [B, 1, 18, 18]
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    shifted = padded[:, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
    return shifted + 0.05 * torch.randn(shifted.shape, generator=generator)


def accuracy(model: DigitsCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` [N, 1, 16, 16] whose argmax class equals ``labels`` [N]."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(chunk).argmax(1) for chunk in images.split(512)])
    return float((pred == labels).float().mean())


def train_classifier(config: ClassifierConfig, progress: bool = True) -> tuple[DigitsCNN, dict]:
    """Train ``DigitsCNN`` on the fixed train split; returns the model and its metrics dict."""
    from tqdm.auto import tqdm

    # 1. data and a seeded model
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    x_train, y_train = load_digits_dataset("train")
    x_test, y_test = load_digits_dataset("test")
    model = DigitsCNN(config.width, config.num_features)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(y_train) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    # 2. minibatch cross-entropy with augmentation
    start, start_cpu = time.perf_counter(), time.process_time()
    model.train()
    for _ in tqdm(range(config.epochs), desc="digits classifier", disable=not progress):
        perm = torch.randperm(len(y_train), generator=generator)
        for idx in perm.split(config.batch_size):
            loss = F.cross_entropy(model(_augment(x_train[idx], generator)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    # 3. held-out accuracy
    metrics = {
        "test_accuracy": accuracy(model, x_test, y_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "n_train": len(y_train),
        "n_test": len(y_test),
        "split": f"numpy RandomState({SPLIT_SEED}) permutation, {TEST_FRACTION:.0%} held out",
        "train_seconds": time.perf_counter() - start,
        "train_cpu_seconds": time.process_time() - start_cpu,
        "torch_threads": torch.get_num_threads(),
        "config": asdict(config),
    }
    model.eval()
    return model, metrics


# ----------------------------------------------------------------------------- cache


def _save_classifier(model: DigitsCNN, metrics: dict, folder: Path) -> None:
    """Write weights then metrics into a fresh folder (:func:`cached_folder` moves it in place)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def load_classifier(weights: str | os.PathLike[str]) -> tuple[DigitsCNN, dict]:
    """Load a classifier from a folder (``model.safetensors`` + ``metrics.json``) or a
    ``.safetensors`` file; the architecture is read from the metrics' ``config`` when present."""
    from safetensors.torch import load_file

    path = Path(weights).expanduser()
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"digits classifier weights not found: {file}. Run `steer pretrain-digits` to train "
            f"them into the cache, or pass weights=None to train on first use."
        )
    metrics_file = file.with_name(METRICS_FILE)
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    cfg = metrics.get("config", {})
    model = DigitsCNN(cfg.get("width", 16), cfg.get("num_features", 128))
    model.load_state_dict(load_file(str(file)))
    model.eval()
    return model, metrics


def load_or_train_digits_classifier(
    cache_dir: str | os.PathLike[str] | None = None,
    config: ClassifierConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """The cached classifier folder, trained on first use (or when ``force``, or when the cache
    cannot be read back: it is then retrained with a :class:`CorruptCacheWarning`)."""
    config = config or ClassifierConfig()
    folder = config_folder(cache_root(cache_dir), "digits_classifier", config, ClassifierConfig())

    def check(path: Path) -> None:
        json.loads((path / METRICS_FILE).read_text())["test_accuracy"]
        load_classifier(path)

    def build(path: Path) -> None:
        model, metrics = train_classifier(config, progress=progress)
        _save_classifier(model, metrics, path)
        print(f"digits classifier: held-out accuracy {metrics['test_accuracy']:.2%} -> {folder}")

    return cached_folder(folder, "digits classifier", check, build, force)


# ----------------------------------------------------------------------------- reward


def to_digit_input(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` (or ``[B, 1, H, W]``) in ``[0, 1]`` → ``[B, 1, 16, 16]``, differentiably:
    ITU-R 601 luma for RGB, then antialiased bilinear resizing when ``H, W != 16``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor; got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must have shape [B, 3, H, W] (or [B, 1, H, W]); got {tuple(images.shape)}"
        )
    x = images
    if x.shape[1] == 3:
        luma = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
        luma = luma.view(1, 3, 1, 1)
        x = (x * luma).sum(dim=1, keepdim=True)  # [B, 1, H, W]
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    return x  # [B, 1, 16, 16]


def _validate_targets(target: int | Sequence[int]) -> list[int]:
    targets = [target] if isinstance(target, (int, np.integer)) else list(target)
    if not targets:
        raise ValueError("target must be a class 0-9 or a non-empty sequence of them; got []")
    for c in targets:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"target classes must be int in 0-9; got {c!r} ({type(c).__name__})")
        if not 0 <= int(c) < NUM_CLASSES:
            raise ValueError(f"target class must be in 0-9; got {int(c)}")
    return sorted({int(c) for c in targets})


class DigitsClassifierReward(Reward):
    """``reward(images, prompts=None) -> [B]``: ``max_{c in target} log p(c | x)`` (or ``p``).

    A :class:`steer.rewards.base.Reward` (input validation, chunking, finite scores). Frozen
    classifier; gradients flow to ``images``. ``features(images) -> [B, F]`` gives the
    penultimate activations (for a Fréchet distance), ``log_probs(images) -> [B, 10]`` all classes.
    """

    name = "digits-classifier"
    differentiable = True
    input_size = (IMAGE_SIZE, IMAGE_SIZE)

    def __init__(
        self, model: DigitsCNN, targets: list[int], log_prob: bool, batch_size: int, source: str
    ) -> None:
        super().__init__(batch_size)
        self.model = model
        self.targets = targets
        self.log_prob = log_prob
        self.source = source
        self.register_buffer("_index", torch.tensor(targets), persistent=False)
        self.freeze()

    def train(self, mode: bool = True) -> DigitsClassifierReward:
        super().train(mode)
        self.model.eval()  # the classifier stays in eval mode (no dropout in the reward)
        return self

    def _chunks(self, images: torch.Tensor) -> list[torch.Tensor]:
        device, dtype = self._model_place(images)
        x = to_digit_input(images).to(device=device, dtype=dtype)  # [B, 1, 16, 16]
        return list(x.split(self.batch_size))

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """``log p(· | x)`` for every class: ``[B, 10]``."""
        return torch.cat([F.log_softmax(self.model(c), dim=-1) for c in self._chunks(images)])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate classifier features ``[B, F]``."""
        return torch.cat([self.model.features(c) for c in self._chunks(images)])

    def score(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """One validated chunk ``[b, 3, H, W]`` → ``max_c log p(c | x)`` (or ``p``): ``[b]``."""
        log_p = F.log_softmax(self.model(to_digit_input(images)), dim=-1)  # [b, 10]
        best = log_p.index_select(1, self._index).amax(dim=1)  # [b]
        return best if self.log_prob else best.exp()


def digits_classifier(
    target: int | Sequence[int] = 0,
    log_prob: bool = True,
    weights: str | None = None,
    cache_dir: str | None = None,
    batch_size: int = 256,
) -> DigitsClassifierReward:
    """The digits classifier reward for class ``target`` (or the best of a set of classes).

    ``weights``: a classifier folder or ``.safetensors`` file; ``None`` uses the cache under
    ``cache_dir`` / ``$STEER_CACHE`` / ``~/.cache/steer``, training it on first use (seconds).
    """
    targets = _validate_targets(target)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    path = Path(weights) if weights is not None else load_or_train_digits_classifier(cache_dir)
    model, metrics = load_classifier(path)
    acc = metrics.get("test_accuracy")
    source = f"DigitsCNN trained on sklearn digits (16x16) from {path}" + (
        f"; held-out accuracy {acc:.4f}" if acc is not None else ""
    )
    return DigitsClassifierReward(model, targets, log_prob, batch_size, source)
