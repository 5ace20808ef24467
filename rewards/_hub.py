"""Where reward weights come from: a local path or a Hugging Face hub file, with errors that say
which file is missing and how to provide it. Weights load with safetensors or
``torch.load(weights_only=True)`` only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HUB_PREFIX = "hf-hub:"


def offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set (read at call time)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def split_hub(spec: str) -> tuple[str, str]:
    """``"hf-hub:owner/repo/path/in/repo"`` -> ``("owner/repo", "path/in/repo")``."""
    parts = spec[len(HUB_PREFIX) :].split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"hub weights must read 'hf-hub:owner/repo/filename', got {spec!r}")
    return "/".join(parts[:2]), "/".join(parts[2:])


def fetch(repo_id: str, filename: str, *, arg: str, cache_dir: str | None = None) -> str:
    """Local path of ``filename`` in hub repo ``repo_id`` (cache first, then download unless
    offline). Raises FileNotFoundError naming the file, a download command and the argument
    that takes a local path instead."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=offline())
    except Exception as err:  # network, missing cache, gated repo, ...
        raise FileNotFoundError(
            f"weights file {filename!r} of hub repo {repo_id!r} is not in the local cache and "
            f"could not be downloaded ({type(err).__name__}). Provide it with\n"
            f"    huggingface-cli download {repo_id} {filename}\n"
            f"(run where the hub is reachable, then copy ~/.cache/huggingface), or download the "
            f"file yourself and pass {arg}='/path/to/{Path(filename).name}'."
        ) from err


def resolve(weights: str | os.PathLike[str], *, arg: str, cache_dir: str | None = None) -> str:
    """A local file path from ``weights``: an existing path, or ``"hf-hub:owner/repo/file"``."""
    text = os.fspath(weights)
    if text.startswith(HUB_PREFIX):
        repo_id, filename = split_hub(text)
        return fetch(repo_id, filename, arg=arg, cache_dir=cache_dir)
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{arg}={text!r}: no such file. Pass the path of the weights file, or a hub file as "
            f"'hf-hub:owner/repo/filename' (see `steer rewards` for each reward's default)."
        )
    return str(path)


def load_state_dict(path: str, *, arg: str) -> dict[str, Tensor]:
    """A flat ``{key: tensor}`` from a safetensors or torch file (``weights_only=True``); a
    ``{"state_dict": ...}`` wrapper and a ``module.`` prefix (DataParallel) are removed."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError (an Exception)
            raise ValueError(
                f"{arg}={path!r} cannot be read ({err}): truncated or not a safetensors file; "
                "download it again"
            ) from err
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{arg}={path!r} could not be read with torch.load(weights_only=True) "
                f"({type(err).__name__}: {err}); save a plain state dict or a .safetensors file"
            ) from err
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{arg}={path!r} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_strict(
    module: torch.nn.Module,
    sd: dict[str, Tensor],
    *,
    arg: str,
    path: str,
    expected: str | None = None,
    original: dict[str, Tensor] | None = None,
) -> None:
    """``module.load_state_dict(sd)`` with an error naming the file, the first missing /
    unexpected keys, shape mismatches, what the file looks like, and ``expected`` (what the
    reward wanted, e.g. "open_clip ViT-H-14") in place of the module's class name; ``original``
    is the file's own state dict when ``sd`` was mapped from it (what the hint describes)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        from ._checkpoints import describe

        raise ValueError(
            f"{arg}={path!r} does not match {expected or type(module).__name__}: "
            f"{len(missing)} missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}, shape mismatches {shapes[:8]}. "
            f"The file looks like {describe(sd if original is None else original)}."
        )
    module.load_state_dict(sd)


def check_vocab(tokenizer: Any, model_vocab: int, *, arg: str, ident: str) -> None:
    """Refuse a tokenizer whose vocabulary is (nearly) empty, as transformers 5 builds silently
    when the vocabulary files are missing, or larger than the model's embedding table."""
    n = len(tokenizer)
    if n <= 16:
        raise FileNotFoundError(
            f"{arg}={ident!r} loaded a tokenizer with only {n} tokens: its vocabulary files are "
            f"missing. Provide them with\n    huggingface-cli download {ident}\n"
            f"or pass {arg}='/path/to/folder' holding the tokenizer files."
        )
    if n > model_vocab:
        raise ValueError(
            f"{arg}={ident!r} has {n} tokens but the model embeds only {model_vocab}; "
            "use the tokenizer the model was trained with"
        )
