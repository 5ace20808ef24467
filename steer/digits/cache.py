"""The digits application's cache: ``$STEER_CACHE`` (default ``~/.cache/steer``), folders keyed
by their config, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

__all__ = ["CorruptCacheWarning", "cache_root", "cached_folder", "config_folder"]


class CorruptCacheWarning(UserWarning):
    """A cached file could not be read back; it is being retrained."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The steer cache: ``cache_dir`` if given, else ``$STEER_CACHE``, else ``~/.cache/steer``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("STEER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "steer"


def cached_folder(
    folder: Path,
    what: str,
    check: Callable[[Path], object],
    build: Callable[[Path], None],
    force: bool = False,
) -> Path:
    """``folder`` if ``check(folder)`` reads it back; otherwise (or when ``force``) ``build``
    writes a fresh one into a private temporary folder that then replaces it, so a crash never
    leaves a half-written cache. An unreadable folder is rebuilt with a
    :class:`CorruptCacheWarning` naming ``what`` and the error."""
    if not force and folder.exists():
        try:
            check(folder)
            return folder
        except Exception as err:  # any unreadable file: say so, then retrain
            warnings.warn(
                f"cached {what} at {folder} is corrupted ({type(err).__name__}: {err}); "
                "retraining it",
                CorruptCacheWarning,
                stacklevel=3,
            )
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def config_folder(root: Path, name: str, config: object, default: object) -> Path:
    """``root/name`` for the default config, ``root/name-<hash>`` for any other (cache key)."""
    if config == default:
        return root / name
    blob = json.dumps(asdict(config), sort_keys=True).encode()  # type: ignore[call-overload]
    return root / f"{name}-{hashlib.sha256(blob).hexdigest()[:8]}"
