"""Model families: which policy class drives which diffusers denoiser, found in which pipeline
component. The trainer and the pipelines choose a family from the loaded components, never from
class names of their own: a new family is its policy file (which registers itself here), its
pipeline file and its tiny builder."""

from __future__ import annotations

from collections.abc import Callable
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
        schedulers: the diffusers scheduler classes its policy samples with; the first is the
            default sampler of fine-tuning (``model.scheduler`` picks another).
        spacing: whether ``timestep_spacing`` applies to those schedulers.
        accepts: a further test of the (unwrapped) denoiser, e.g. of its config, for families
            that share a class (SDXL's and SD 1.x's UNets are both ``UNet2DConditionModel``);
            ``None`` accepts every instance. Of two families of the same class, the one with a
            test wins.
        requires: what ``accepts`` asks for, in words, for error messages.
    """

    name: str
    denoiser: type[nn.Module]
    policy: type[nn.Module]
    conditional: bool
    component: str = "unet"
    schedulers: tuple[str, ...] = ("DDIMScheduler", "DDPMScheduler")
    spacing: bool = True
    accepts: Callable[[nn.Module], bool] | None = None
    requires: str = ""

    def takes(self, denoiser: nn.Module) -> bool:
        """Whether this family drives ``denoiser`` (unwrapped): its class, then ``accepts``."""
        return isinstance(denoiser, self.denoiser) and (
            self.accepts is None or bool(self.accepts(denoiser))
        )


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


def _more_specific(g: ModelFamily, f: ModelFamily) -> bool:
    """``g`` before ``f``: a subclass before its base; of one class, a family with a test."""
    if g.denoiser is not f.denoiser:
        return issubclass(g.denoiser, f.denoiser)
    return g.accepts is not None and f.accepts is None


def family_of(denoiser: nn.Module) -> ModelFamily:
    """The family of a denoiser: of the registered families that take it (its class and the
    family's ``accepts`` test), the most specific one."""
    inner = _unwrap(denoiser)
    matches = [f for f in FAMILIES.values() if f.takes(inner)]
    if not matches:
        same = [f for f in FAMILIES.values() if isinstance(inner, f.denoiser)]
        if same:  # the class is known, its config is not
            needs = "; ".join(f"{f.name!r} needs {f.requires or 'another config'}" for f in same)
            raise TypeError(f"no model family drives this {type(inner).__name__}: {needs}")
        known = sorted(FAMILIES.values(), key=lambda f: f.name)  # a stable order: by name
        classes = list(dict.fromkeys(f.denoiser.__name__ for f in reversed(known)))[::-1]
        raise TypeError(f"denoiser must be a {' or '.join(classes)}, got {type(inner).__name__}")
    best = [f for f in matches if not any(g is not f and _more_specific(g, f) for g in matches)]
    if len(best) != 1:
        names = ", ".join(repr(f.name) for f in matches)
        raise TypeError(f"the {type(inner).__name__} is taken by several model families: {names}")
    return best[0]


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
