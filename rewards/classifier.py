"""Classifier rewards: ``log p(c | x)`` (or ``p(c | x)``) from any torch image classifier, with a
class index or a set of allowed classes (the max over the set). Used as the likelihood ``r`` of
a posterior ``p_prior(x) r(x)`` (§1)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _hub
from .base import Reward, normalize, resize_center_crop

__all__ = ["ClassifierReward", "classifier", "test_kwargs"]


def _targets(target: int | Sequence[int], num_classes: int | None = None) -> list[int]:
    items = [target] if isinstance(target, int) else list(target)
    if not items or any(isinstance(c, bool) or not isinstance(c, int) for c in items):
        raise ValueError(f"target must be a class index or a non-empty set of ints, got {target!r}")
    if num_classes is not None and any(not 0 <= c < num_classes for c in items):
        raise ValueError(f"target {target!r} is outside the classes 0..{num_classes - 1}")
    return sorted(set(items))


class ClassifierReward(Reward):
    """``max_{c in target} log softmax(f(x))_c`` (or its exp with ``log_prob=False``)."""

    differentiable = True
    needs_prompts = False

    def __init__(
        self,
        model: nn.Module,
        target: int | Sequence[int],
        log_prob: bool,
        input_size: int | tuple[int, int] | None,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        source: str,
        batch_size: int,
    ) -> None:
        super().__init__(batch_size=batch_size)
        if (mean is None) != (std is None):
            raise ValueError(f"give both mean and std or neither, got mean={mean}, std={std}")
        self.model, self.target, self.log_prob = model, _targets(target), bool(log_prob)
        size = (input_size, input_size) if isinstance(input_size, int) else input_size
        self.name, self.source, self.input_size = "classifier", source, size
        self.mean, self.std = mean, std

    def score(self, images: Tensor, prompts: list[str] | None) -> Tensor:
        # 1. optional resize / normalisation, then logits [b, C]
        x = images if self.input_size is None else resize_center_crop(images, self.input_size)
        x = x if self.mean is None else normalize(x, self.mean, self.std)  # type: ignore[arg-type]
        logits = self.model(x)
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != len(x):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"the classifier must return logits [B, C]; got {shape}")
        if max(self.target) >= logits.shape[1]:
            raise ValueError(f"target {self.target} is outside the {logits.shape[1]} classes")
        # 2. log p(c | x) of the allowed classes, max over the set
        logp = torch.log_softmax(logits, dim=-1)[:, self.target].amax(dim=-1)  # [b]
        return logp if self.log_prob else logp.exp()


def _load_module(
    path: str, architecture: Callable[[], nn.Module] | None, cache_dir: str | None
) -> nn.Module:
    """A classifier from a file: a state dict (needs ``architecture``) or a torch.export ``.pt2``
    program. Pickled modules are refused (weights_only loading)."""
    local = _hub.resolve(path, arg="model", cache_dir=cache_dir)
    if architecture is not None:
        module = architecture()
        sd = _hub.load_state_dict(local, arg="model")
        _hub.load_strict(module, sd, arg="model", path=local)
        return module
    if local.endswith(".pt2"):
        return torch.export.load(local).module()
    raise ValueError(
        f"model={path!r} is a weights file: pass architecture=<callable building the module> to "
        "load it as a state dict, or save the classifier with torch.export.save(...) as .pt2"
    )


def classifier(
    model: nn.Module | str | os.PathLike[str],
    target: int | Sequence[int] = 0,
    log_prob: bool = True,
    architecture: Callable[[], nn.Module] | None = None,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 256,
    cache_dir: str | None = None,
) -> ClassifierReward:
    """Classifier reward.

    Args:
        model: an ``nn.Module`` returning logits ``[B, C]``, or a path / "hf-hub:..." file (a
            state dict with ``architecture``, or a ``torch.export`` ``.pt2`` program).
        target: class index or set of allowed classes (score = max over the set).
        log_prob: ``log p(c | x)`` if True, ``p(c | x)`` otherwise.
        input_size: resize (shortest side + center crop) to this size first; None keeps H, W.
        mean, std: optional channel normalisation after resizing.
    """
    if isinstance(model, nn.Module):
        module, source = model, f"module {type(model).__name__}"
    elif isinstance(model, (str, os.PathLike)):
        module, source = _load_module(os.fspath(model), architecture, cache_dir), os.fspath(model)
    else:
        raise TypeError(f"model must be an nn.Module or a path, got {type(model).__name__}")
    try:
        module.eval()  # the caller's module: put in eval mode, parameters left as they are
    except NotImplementedError:
        pass  # a torch.export program keeps the mode it was exported in
    return ClassifierReward(module, target, log_prob, input_size, mean, std, source, batch_size)


def test_kwargs() -> dict[str, Any]:
    """Test form: a tiny random CNN over 10 classes, target set {3, 5}."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    return {"model": net, "target": [3, 5], "input_size": 16}
