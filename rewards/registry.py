"""The reward registry: names -> lazily imported factories, with the metadata the CLI prints.

Factories are stored as ``"module:function"`` strings (or callables for users' own rewards) and
imported on first :func:`get`, so ``import steer.rewards`` never imports open_clip/transformers.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .base import Reward

__all__ = [
    "RewardSpec",
    "register",
    "get",
    "names",
    "random_kwargs",
    "spec",
    "specs",
    "test_kwargs",
]

F = TypeVar("F", bound=Callable[..., Any])
Target = str | Callable[..., Any]


@dataclass(frozen=True)
class RewardSpec:
    """What the registry knows about a reward without building it."""

    name: str
    factory: Target
    differentiable: bool
    input_size: tuple[int, int] | None
    source: str
    summary: str = ""
    needs_prompts: bool = False
    test_kwargs: Target | Mapping[str, Any] = field(default_factory=dict)
    # keywords that build the published architecture with random weights, offline (a real-size
    # run before any download); {} for a reward without downloaded weights; None: no such form
    random_kwargs: Mapping[str, Any] | None = None


_REGISTRY: dict[str, RewardSpec] = {}


def _resolve(target: Target) -> Any:
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _size(input_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if input_size is None:
        return None
    if isinstance(input_size, int):
        return (input_size, input_size)
    if len(input_size) == 2 and all(isinstance(v, int) for v in input_size):
        return (int(input_size[0]), int(input_size[1]))
    raise ValueError(f"input_size must be an int, (H, W) or None, got {input_size!r}")


def register(
    name: str,
    factory: Target | None = None,
    *,
    differentiable: bool,
    input_size: int | tuple[int, int] | None = None,
    source: str = "user-defined",
    summary: str = "",
    needs_prompts: bool = False,
    test_kwargs: Target | Mapping[str, Any] | None = None,
    random_kwargs: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> Any:
    """Register a reward factory (a callable returning a :class:`~steer.rewards.base.Reward`, a
    ``Reward`` subclass, or a lazy ``"module:function"`` string) under ``name``.

    Used directly (``register("mine", make_mine, differentiable=True)``) or as a decorator
    (``@register("mine", differentiable=True)``). Re-registering a name raises unless
    ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(
            f"reward {name!r} is already registered (factory {_REGISTRY[name].factory!r}); "
            "pass replace=True to override it"
        )

    def _add(fn: F) -> F:
        if not (isinstance(fn, str) and ":" in fn) and not callable(fn):
            raise TypeError(f"factory must be a callable or a 'module:function' string, got {fn!r}")
        _REGISTRY[name] = RewardSpec(
            name=name,
            factory=fn,
            differentiable=bool(differentiable),
            input_size=_size(input_size),
            source=source,
            summary=summary,
            needs_prompts=needs_prompts,
            test_kwargs={} if test_kwargs is None else test_kwargs,
            random_kwargs=random_kwargs,
        )
        return fn

    return _add if factory is None else _add(factory)  # type: ignore[arg-type]


def names() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def spec(name: str) -> RewardSpec:
    """The :class:`RewardSpec` of ``name``; an unknown name raises KeyError listing valid ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered rewards: {', '.join(names())}")
    return _REGISTRY[name]


def specs() -> list[RewardSpec]:
    """Every :class:`RewardSpec`, sorted by name."""
    return [_REGISTRY[n] for n in names()]


def test_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments that build ``name`` offline with random weights (its test form)."""
    kw = spec(name).test_kwargs
    kw = _resolve(kw) if isinstance(kw, str) else kw
    return dict(kw() if callable(kw) else kw)


def random_kwargs(name: str) -> dict[str, Any]:
    """Keyword arguments that build ``name`` at its published architecture with random weights,
    offline (empty for a reward without downloaded weights); ``ValueError`` if it has none."""
    kw = spec(name).random_kwargs
    if kw is None:
        raise ValueError(
            f"reward {name!r} has no random-weights form (register it with random_kwargs=...); "
            "set reward.random_weights=false to build it as configured"
        )
    return dict(kw)


def _check_kwargs(name: str, fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    sig = inspect.signature(fn)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown keyword argument(s) {unknown} for reward {name!r}; "
            f"valid keywords: {', '.join(valid) or '(none)'}"
        )


def get(name: str, **kwargs: Any) -> Reward:
    """Build the reward ``name`` with ``kwargs`` (see ``steer rewards`` for the list).

    Unknown names raise KeyError and unknown keywords TypeError, each listing the valid ones.
    Built-in rewards come in eval mode with frozen weights; move them with ``.to(device, dtype)``.
    """
    s = spec(name)
    fn = _resolve(s.factory)
    _check_kwargs(name, fn, kwargs)
    reward = fn(**kwargs)
    if not isinstance(reward, Reward):
        # a user's factory may return any callable module; keep the contract's attributes
        for attr, value in (
            ("name", name),
            ("differentiable", s.differentiable),
            ("input_size", s.input_size),
            ("source", s.source),
        ):
            if not hasattr(reward, attr):
                setattr(reward, attr, value)
        return reward
    if reward.name == Reward.name:
        reward.name = name
    if not reward.source:
        reward.source = s.source
    return reward
