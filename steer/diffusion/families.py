"""Model families: which policy class drives which diffusers denoiser, found in which pipeline
component. The trainer and the pipelines choose a family from the loaded components, never from
class names of their own: a new family is its policy file (which registers itself here), its
pipeline file and its tiny builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ModelFamily", "FAMILIES", "register_family", "family_of", "denoiser_of", "make_policy"]


@dataclass(frozen=True)
class ModelFamily:
    """A denoiser class and the policy that turns it into ``P_F``.

    Attributes:
        name: a short name (``unet``, ``unet-text``, ...).
        denoiser: the diffusers model class (``isinstance`` decides the family).
        policy: the policy class, called as ``policy(denoiser, scheduler, **options)``.
        conditional: the denoiser takes prompt embeddings.
        component: the pipeline attribute that holds the denoiser.
    """

    name: str
    denoiser: type[nn.Module]
    policy: type[nn.Module]
    conditional: bool
    component: str = "unet"


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family (its policy module calls this once, at import)."""
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def _unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP / accelerate / torch.compile wrapper."""
    return getattr(module, "module", getattr(module, "_orig_mod", module))


def family_of(denoiser: nn.Module) -> ModelFamily:
    """The family of a denoiser (the most specific registered class it is an instance of)."""
    inner = _unwrap(denoiser)
    matches = [f for f in FAMILIES.values() if isinstance(inner, f.denoiser)]
    if not matches:
        known = sorted(FAMILIES.values(), key=lambda f: f.name)  # a stable order: by name
        names = " or ".join(f.denoiser.__name__ for f in known)
        raise TypeError(f"denoiser must be a {names}, got {type(inner).__name__}")
    # a subclass is more specific than its base
    return next(f for f in matches if not any(g is not f and issubclass(g.denoiser, f.denoiser)
                                             for g in matches))  # fmt: skip


def denoiser_of(pipe: Any) -> nn.Module:
    """The denoiser of a loaded pipeline: the first registered family's component it has."""
    for family in FAMILIES.values():
        module = getattr(pipe, family.component, None)
        if module is not None and isinstance(_unwrap(module), family.denoiser):
            return module
    components = sorted({f.component for f in FAMILIES.values()})
    raise TypeError(f"{type(pipe).__name__} has no denoiser of a known family in {components}")


def make_policy(denoiser: nn.Module, scheduler: Any, **options: Any) -> nn.Module:
    """The policy of the denoiser's family, ``P_F`` over ``scheduler``."""
    return family_of(denoiser).policy(denoiser, scheduler, **options)
