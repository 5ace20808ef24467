"""The reference code behind steer's model rewards, imported for parity checks only.

steer computes ImageReward, HPS v2 and the LAION aesthetic score with its own code. The packages
whose code produced (or, for the aesthetic, reproduces) the published checkpoints are
``image-reward``, ``hpsv2`` and ``simple-aesthetics-predictor``; none can be a dependency of steer,
since each pins a library that steer's other dependencies have outgrown (:data:`REFERENCES` names
the pin). Their *model* code still runs with today's torch / transformers / timm, so this module
imports only the model modules of a reference package, from a copy of the package "staged" in
``$STEER_CACHE/reference/`` (default ``~/.cache/steer``): copied from where it is installed
(``pip install --no-deps image-reward==1.5``), or unpacked from its wheel fetched with
``pip download --no-deps`` when asked to (``fetch=True``; the tests and ``steer rewards verify
--fetch-reference`` do). The packages' ``__init__`` files, which import training and download code
and their pinned libraries, are not executed.

Compatibility shims (each changes nothing the reference computes at inference):

- ``fairscale`` (ImageReward's ViT wraps blocks for activation checkpointing, off at inference):
  a stub module when fairscale is not installed; calling it raises.
- transformers 5 moved ``apply_chunking_to_forward`` / ``prune_linear_layer`` from
  ``transformers.modeling_utils`` to ``transformers.pytorch_utils`` and dropped
  ``PreTrainedModel.get_head_mask`` / ``invert_attention_mask``, which BLIP's ``med.py`` uses: they
  are re-exposed, the two methods re-implemented on ``med.BertPreTrainedModel`` for the case the
  reference uses (no head mask; a 2-D or 3-D padding mask); its ``init_weights``, which in
  transformers 5 needs a ``post_init()`` that ``med.py`` never calls, is transformers 4's (apply
  ``_init_weights`` to every module). The tokenizer's ``additional_special_tokens_ids``, gone in
  transformers 5, is provided by :mod:`steer.rewards.verify`'s tokenizer redirect.
- ``hpsv2`` 1.2.0's wheel omits the CLIP BPE vocabulary its tokenizer opens at import: the staged
  copy gets open_clip's file (the same OpenAI vocabulary, checked by its SHA-256).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["REFERENCES", "Reference", "ReferenceUnavailable", "stage", "import_reference"]

# SHA-256 of OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz (the file open_clip and hpsv2 name)
CLIP_BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


class ReferenceUnavailable(ImportError):
    """A reference package is neither installed nor staged, and could not be fetched."""


@dataclass(frozen=True)
class Reference:
    """A reference package: where its code comes from and why it is not a dependency."""

    reward: str
    dist: str  # PyPI distribution
    version: str  # the release the parity tests check
    package: str  # top-level import name
    blocked_by: str  # the pin that keeps it out of steer's dependencies
    bare: tuple[str, ...]  # packages whose __init__ is not run (training / download imports)

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


REFERENCES: dict[str, Reference] = {
    "imagereward": Reference(
        "imagereward",
        "image-reward",
        "1.5",
        "ImageReward",
        "it pins timm==0.6.13 (open_clip_torch 3 needs timm>=1.0.17: pip would downgrade "
        "open_clip_torch to 2.32 and timm) and fairscale==0.4.13",
        ("ImageReward", "ImageReward.models", "ImageReward.models.BLIP"),
    ),
    "hpsv2": Reference(
        "hpsv2",
        "hpsv2",
        "1.2.0",
        "hpsv2",
        "it pins pytest==7.2.0 (steer's test extra needs pytest>=8) and protobuf<4",
        ("hpsv2", "hpsv2.src", "hpsv2.src.open_clip"),
    ),
    "aesthetic": Reference(
        "aesthetic",
        "simple-aesthetics-predictor",
        "0.1.2",
        "aesthetics_predictor",
        "it pins transformers<5 (steer runs on transformers 5)",
        ("aesthetics_predictor",),
    ),
}


def _reference(name: str) -> Reference:
    if name not in REFERENCES:
        raise KeyError(f"no reference package for {name!r}; known: {', '.join(REFERENCES)}")
    return REFERENCES[name]


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$STEER_CACHE``, else ``~/.cache/steer``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("STEER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "steer"


def _installed(ref: Reference) -> Path | None:
    """The installed package folder of ``ref`` (any version), or None."""
    try:
        dist = importlib.metadata.distribution(ref.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    folder = Path(str(dist.locate_file(ref.package)))
    return folder if (folder / "__init__.py").is_file() else None


def _fetch_wheel(ref: Reference, into: Path) -> None:
    """``pip download --no-deps`` the reference wheel and unpack its package folder ``into``."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
        cmd += ["--timeout", "30", "--retries", "1", "-q", "-d", tmp, ref.requirement]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ReferenceUnavailable(f"`pip download {ref.requirement}` failed: {err}") from err
        wheels = sorted(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise ReferenceUnavailable(f"`pip download {ref.requirement}` failed: {tail[0]}")
        with zipfile.ZipFile(wheels[0]) as whl:
            members = [
                m for m in whl.namelist() if m.startswith(ref.package + "/") and "/assets/" not in m
            ]
            whl.extractall(into, members=members)


def _complete(ref: Reference, root: Path) -> None:
    """Add the data files a staged reference is known to lack (see the module docstring)."""
    if ref.dist != "hpsv2":
        return
    from open_clip.tokenizer import default_bpe

    target = root / "hpsv2" / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    if not target.is_file():
        src = Path(default_bpe())
        if hashlib.sha256(src.read_bytes()).hexdigest() != CLIP_BPE_SHA256:
            raise ReferenceUnavailable(f"{src} is not OpenAI CLIP's BPE vocabulary")
        shutil.copyfile(src, target)


def stage(
    name: str, *, fetch: bool = False, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The folder holding a staged copy of reward ``name``'s reference package (created on first
    use from the installed package, else, with ``fetch=True``, from its wheel on PyPI).

    Raises :class:`ReferenceUnavailable` naming the pin and the command that installs it.
    """
    ref = _reference(name)
    installed = _installed(ref)
    version = importlib.metadata.version(ref.dist) if installed else ref.version
    root = cache_root(cache_dir) / "reference" / f"{ref.dist}-{version}"
    if (root / ref.package / "__init__.py").is_file():
        _complete(ref, root)
        return root
    if installed is None and not fetch:
        raise ReferenceUnavailable(
            f"the reference package of {name!r}, {ref.requirement}, is not installed. It cannot "
            f"be a dependency of steer because {ref.blocked_by}; its model code still runs: "
            f"install it with\n    pip install --no-deps {ref.requirement}\n"
            "or let steer fetch its wheel (steer rewards verify --fetch-reference)."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ref.dist}-", dir=root.parent))
    try:
        if installed is not None:
            ignore = shutil.ignore_patterns("__pycache__", "assets")
            shutil.copytree(installed, tmp / ref.package, ignore=ignore)
        else:
            _fetch_wheel(ref, tmp)
        _complete(ref, tmp)
        if not root.exists():
            os.replace(tmp, root)  # atomic: a concurrent stager leaves one complete copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _skeleton(packages: tuple[str, ...], root: Path) -> None:
    """Register ``packages`` as bare packages of ``root`` without running their ``__init__``."""
    for pkg in packages:
        if pkg in sys.modules:
            continue
        path = str(root.joinpath(*pkg.split(".")))
        mod = types.ModuleType(pkg)
        mod.__path__ = [path]  # type: ignore[attr-defined]
        mod.__package__ = pkg
        spec = importlib.machinery.ModuleSpec(pkg, None, is_package=True)
        spec.submodule_search_locations = [path]
        mod.__spec__ = spec
        sys.modules[pkg] = mod


def _stub_fairscale() -> None:
    try:
        import fairscale.nn.checkpoint.checkpoint_activations  # noqa: F401
    except ImportError:

        def checkpoint_wrapper(module: Any, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(
                "fairscale is not installed (stub of steer.rewards.reference)"
            )

        names = ["fairscale", "fairscale.nn", "fairscale.nn.checkpoint"]
        for n in [*names, "fairscale.nn.checkpoint.checkpoint_activations"]:
            sys.modules.setdefault(n, types.ModuleType(n))
        sys.modules["fairscale.nn.checkpoint.checkpoint_activations"].checkpoint_wrapper = (  # type: ignore[attr-defined]
            checkpoint_wrapper
        )


def _transformers_helpers() -> None:
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    def find_pruneable_heads_and_indices(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("head pruning is not supported (steer.rewards.reference shim)")

    for n in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, n):
            setattr(mu, n, getattr(pu, n))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        mu.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices  # type: ignore[attr-defined]


def _patch_med(med: Any) -> None:
    """Give BLIP's ``BertPreTrainedModel`` the transformers-4 methods ``med.py`` calls."""
    import torch

    cls = med.BertPreTrainedModel

    def get_head_mask(self: Any, head_mask: Any, num_hidden_layers: int, *args: Any) -> Any:
        if head_mask is not None:
            raise NotImplementedError("head masks are not supported (steer.rewards.reference)")
        return [None] * num_hidden_layers

    def invert_attention_mask(self: Any, mask: Any) -> Any:
        ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
        ext = ext.to(dtype=self.dtype)
        return (1.0 - ext) * torch.finfo(self.dtype).min  # 0 where attended, -inf-ish elsewhere

    def init_weights(self: Any) -> None:  # transformers 4's: _init_weights on every module
        self.apply(self._init_weights)  # (BertModel has no output embeddings to tie)

    cls.init_weights = init_weights  # transformers 5's needs post_init(), which med.py skips
    if not hasattr(cls, "get_head_mask"):
        cls.get_head_mask = get_head_mask
    if not hasattr(cls, "invert_attention_mask"):
        cls.invert_attention_mask = invert_attention_mask


def import_reference(
    name: str, module: str, *, fetch: bool = False, cache_dir: str | os.PathLike[str] | None = None
) -> types.ModuleType:
    """Import ``module`` (e.g. ``"ImageReward.ImageReward"``) of reward ``name``'s staged reference
    package, with the shims of the module docstring."""
    ref = _reference(name)
    if module != ref.package and not module.startswith(ref.package + "."):
        raise ValueError(f"{module!r} is not a module of {ref.package!r}")
    root = stage(name, fetch=fetch, cache_dir=cache_dir)
    if name == "imagereward":
        _stub_fairscale()
        _transformers_helpers()
    _skeleton(ref.bare, root)
    mod = importlib.import_module(module)
    if name == "imagereward":
        _patch_med(importlib.import_module("ImageReward.models.BLIP.med"))
    return mod
