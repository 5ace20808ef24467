"""Crash-safe checkpoint folders: written under a temporary name, published by one rename.

``checkpoint-N`` is written as ``checkpoint-N.partial``; a ``manifest.json`` naming every file
with its size and SHA-256 is written last, everything is flushed to disk (``fsync``), and only
then is the folder renamed to its final name. A folder under a final name is therefore always
complete: a process killed at any moment leaves at worst a ``.partial`` folder, which
:func:`latest` ignores and reports. Replacing an existing ``checkpoint-N`` first renames it
``checkpoint-N.replaced``, which counts as complete until its successor is published.
:func:`prune` keeps the newest ``limit`` checkpoints that verify, so it never deletes the only
loadable one. The fine-tuner (``steer.train.checkpoint``) and the toy trainer
(``steer.toy.checkpoint``) write their checkpoints through it.

Test-only: ``STEER_TEST_PAUSE=point[@step]:seconds`` makes :func:`pause_for_tests` sleep at a
named point (``rollout``, ``optimizer_step``, ``save``: after a checkpoint's files are written,
before it is published), after appending ``point step`` to the file ``STEER_TEST_PAUSE_LOG``
(if set), so that a test can kill the process there. Unset, it costs one ``os.environ`` lookup.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARTIAL, REPLACED, MANIFEST = ".partial", ".replaced", "manifest.json"
_FINAL = re.compile(r"checkpoint-(\d+)")
_REPLACED = re.compile(r"checkpoint-(\d+)\.replaced")
Report = Callable[[str], Any]


def final_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def partial_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}{PARTIAL}"


def begin(output_dir: Path, step: int) -> Path:
    """An empty ``checkpoint-N.partial`` folder (a leftover of an interrupted save removed)."""
    partial = partial_path(output_dir, step)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(partial: Path, meta: dict[str, Any]) -> None:
    """Flush every file of ``partial`` to disk, then write (and flush) ``manifest.json``: each
    file's size and SHA-256, and ``meta``. The last file written into a checkpoint."""
    files = {}
    for path in sorted(p for p in partial.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[path.relative_to(partial).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": _sha256(path),
        }
    tmp = partial / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**meta, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(partial / MANIFEST)
    for folder in [partial, *(p for p in partial.rglob("*") if p.is_dir())]:
        _fsync(folder)


def publish(partial: Path) -> Path:
    """Rename a complete ``checkpoint-N.partial`` to ``checkpoint-N`` (an existing one is moved
    aside to ``.replaced`` first and removed after); returns the final path."""
    final = partial.with_name(partial.name.removesuffix(PARTIAL))
    old = final.with_name(final.name + REPLACED)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    partial.rename(final)
    _fsync(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def verify(path: Path, deep: bool = False) -> str | None:
    """``None`` when ``path`` is a complete checkpoint (every file of its manifest present with
    its size; with ``deep``, its SHA-256 too), else why it is not."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return f"no {MANIFEST} (an interrupted or foreign save)"
    try:
        files = read_manifest(path)["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable {MANIFEST} ({err})"
    for rel, info in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != info["size"]:
            return f"{rel} has {f.stat().st_size} bytes, its manifest says {info['size']}"
        if deep and _sha256(f) != info["sha256"]:
            return f"{rel} does not match its SHA-256"
    return None


def complete(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint under a final name, oldest first; a
    ``checkpoint-N.replaced`` counts where ``checkpoint-N`` is missing (a replacement was
    interrupted between its two renames)."""
    found: dict[int, Path] = {}
    for p in Path(output_dir).glob("checkpoint-*"):
        if (m := _FINAL.fullmatch(p.name)) and p.is_dir():
            found[int(m.group(1))] = p
    for p in Path(output_dir).glob(f"checkpoint-*{REPLACED}"):
        if (m := _REPLACED.fullmatch(p.name)) and p.is_dir():
            found.setdefault(int(m.group(1)), p)
    return sorted(found.items())


def incomplete(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N.partial`` folders: saves that never finished."""
    return sorted(Path(output_dir).glob(f"checkpoint-*{PARTIAL}"))


def latest(output_dir: Path, report: Report = print) -> Path | None:
    """The newest checkpoint that verifies (``deep``), reporting the ``.partial`` folders it
    ignores and the damaged checkpoints it skips; ``None`` when there is none."""
    for p in incomplete(output_dir):
        report(f"ignoring {p}: an interrupted save, not a checkpoint")
    for _, path in reversed(complete(output_dir)):
        why = verify(path, deep=True)
        if why is None:
            return path
        report(f"skipping {path}: {why}")
    return None


def prune(output_dir: Path, limit: int, report: Report = print) -> list[Path]:
    """Keep the newest ``limit`` checkpoints that verify as :func:`latest` checks them (sizes and
    SHA-256: the kept ones are read again) and every newer one (a damaged newer checkpoint is
    kept for inspection but not counted); delete the older ones, the ``.partial`` leftovers of
    interrupted saves and stale ``.replaced`` folders. Returns what was deleted."""
    valid, deleted = 0, []
    for _, path in reversed(complete(output_dir)):
        if valid >= limit:
            deleted.append(path)
        elif (why := verify(path, deep=True)) is None:
            valid += 1
        else:
            report(f"keeping {path} out of checkpoints_total_limit: {why}")
    deleted += incomplete(output_dir)
    deleted += [p for p in Path(output_dir).glob(f"checkpoint-*{REPLACED}")
                if p.with_name(p.name.removesuffix(REPLACED)).is_dir()]  # fmt: skip
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


def _flatten(d: dict[str, Any], opaque: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).startswith(opaque):
            out.update(_flatten(v, opaque, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_differences(
    saved: dict[str, Any],
    current: dict[str, Any],
    resumable: tuple[str, ...] = (),
    opaque: tuple[str, ...] = (),
) -> list[str]:
    """Fields (``a.b: old -> new``) whose values differ, ignoring those starting with one of
    ``resumable`` (fields a resume may change); a field under ``opaque`` compares whole."""
    a, b = _flatten(saved, opaque), _flatten(current, opaque)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not k.startswith(resumable)
    ]


def pause_for_tests(point: str, step: int) -> None:
    """Test-only: sleep here when ``STEER_TEST_PAUSE`` names this point (module docstring)."""
    spec = os.environ.get("STEER_TEST_PAUSE")
    if not spec:
        return
    where, _, seconds = spec.rpartition(":")
    name, _, at = where.partition("@")
    if name != point or (at and int(at) != step):
        return
    log = os.environ.get("STEER_TEST_PAUSE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{point} {step} {os.getpid()}\n")
    time.sleep(float(seconds))
