"""One configuration path for every command: typed dataclasses ← YAML ← ``a.b=value`` overrides.

``load_structured(ToyConfig, "run.yaml", ["iterations=200"])`` merges the file and the overrides
onto the dataclass's defaults with OmegaConf (each value is type-checked against the field's
annotation), then builds the dataclass, whose ``__post_init__`` validates it. Every mistake is
one :class:`ConfigError` line naming the key, the value and the fix; commands print it and exit
with status 2. :func:`add_field_flags` and :func:`parse_overrides` give a command line both
``key=value`` overrides and the ``--field-name value`` flags, translated to overrides.

Torch-free: OmegaConf and the standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

__all__ = [
    "ConfigError",
    "add_field_flags",
    "load_structured",
    "parse_overrides",
    "save_yaml",
    "to_yaml",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration mistake, as one line naming the key, the value and the fix."""


def _type_name(tp: Any) -> str:
    """``int``, ``float or null``, ``list[str]``: the expected type as a user reads it."""
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _field_type(err: OmegaConfBaseException) -> str | None:
    """The annotation of the field the error is about, when OmegaConf says which."""
    owner = getattr(err, "object_type", None)
    if not (isinstance(owner, type) and dataclasses.is_dataclass(owner)):
        return None
    try:
        hints = typing.get_type_hints(owner)
    except Exception:  # an annotation that does not resolve: fall back to OmegaConf's words
        return None
    return _type_name(hints[err.key]) if err.key in hints else None


def _valid_keys(err: OmegaConfBaseException) -> list[str]:
    node = getattr(err, "parent_node", None)
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    """One line for an OmegaConf error raised while merging ``source``."""
    key = str(err.full_key or err.key or "")
    where = f" (in {source})" if source else ""
    if isinstance(err, ConfigKeyError) and err.key is not None:
        prefix = key.rpartition(".")[0]
        valid = _valid_keys(err)
        close = difflib.get_close_matches(str(err.key), valid, n=1, cutoff=0.5)
        if close:
            hint = f"did you mean {'.'.join(filter(None, (prefix, close[0])))}?"
        else:
            hint = f"valid keys{' of ' + prefix if prefix else ''}: {', '.join(valid)}"
        return ConfigError(f"unknown key {key!r}{where}; {hint}")
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"{key} has no default and was not given{where}: give {key}=<value>")
    if isinstance(err, ValidationError) and key:
        expected = _field_type(err) or "valid value"
        fix = f"{key}=true or {key}=false" if expected == "bool" else f"{key}=<{expected}>"
        return ConfigError(
            f"{key}={err.value!r} has the wrong type{where}: expected {expected}; give {fix}"
        )
    return ConfigError(f"{str(err).splitlines()[0]}{where}")


def _read(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix == ".json":
        return OmegaConf.create(json.loads(path.read_text()))
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return loaded


def _merge(merged: DictConfig, layer: Callable[[], Any], source: str) -> DictConfig:
    """``merged`` ← ``layer()``, an error of ``layer`` explained as coming from ``source``."""
    try:
        return OmegaConf.merge(merged, layer())  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, source) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {str(err).splitlines()[0]}") from err


def load_structured(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
) -> T:
    """An instance of the dataclass ``cls``: its defaults ← the YAML (or JSON) file ``path`` ←
    the mapping ``data`` ← ``a.b=value`` ``overrides``, type-checked, then validated by the
    dataclasses' ``__post_init__``. Raises :class:`ConfigError` (a ``ValueError``) on an unknown
    key, a value of the wrong type or an invalid value; ``FileNotFoundError`` on a missing file.
    """
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like a.b=value, got {bad}")
    merged = OmegaConf.structured(cls)
    if path is not None:
        merged = _merge(merged, lambda: _read(path), f"config file {path}")
    if data is not None:
        merged = _merge(merged, lambda: OmegaConf.create(dict(data)), "")
    for o in overrides:
        merged = _merge(merged, lambda o=o: OmegaConf.from_dotlist([o]), f"override {o!r}")
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, "") from err
    except ConfigError:
        raise
    except ValueError as err:  # a __post_init__ check: its message already names the field
        raise ConfigError(str(err)) from err


def to_yaml(cfg: Any) -> str:
    """The YAML text of a dataclass instance (or a mapping), as :func:`load_structured` reads."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def save_yaml(cfg: Any, path: str | Path) -> Path:
    """Write :func:`to_yaml` of ``cfg`` to ``path`` (its folder created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def add_field_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    helps: Mapping[str, str] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """A ``--field-name`` flag for each scalar field of the dataclass ``cls`` (``--x/--no-x`` for
    a bool), kept as text: :func:`parse_overrides` turns the given ones into overrides, so the
    loader checks their types like any other override."""
    helps, skip = dict(helps or {}), set(skip)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in skip or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else "required"
        text = f"{helps.get(f.name, _type_name(tp))} (default: {default})"
        if tp is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=argparse.SUPPRESS, help=text)
        else:
            meta = _type_name(tp).split(" ")[0].upper()
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar=meta, help=text)


def _flag_overrides(args: argparse.Namespace, cls: type) -> list[str]:
    """``name=value`` for each flag given; a ``str`` field's text is quoted, so that YAML keeps
    it as the text typed (``--target 1e3`` is the name ``"1e3"``, as argparse passed it)."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if isinstance(value, bool):
            value = str(value).lower()
        elif hints[f.name] is str:
            value = "'" + str(value).replace("'", "''") + "'"
        out.append(f"{f.name}={value}")
    return out


def parse_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str], cls: type
) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv``: the parser's own options, and the overrides of ``cls``'s config, first
    from its ``--field-name`` flags (:func:`add_field_flags`), then the ``key=value`` words in
    the order given (so a ``key=value`` wins over a flag). Anything else is a
    :class:`ConfigError` giving the right spelling."""
    args, extras = parser.parse_known_args(list(argv))
    overrides = _flag_overrides(args, cls)
    known = [s for a in parser._actions for s in a.option_strings]  # noqa: SLF001
    for word in extras:
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "set a field with key=value"
            raise ConfigError(f"unknown option {name!r}; {hint}")
        if "=" not in word:
            raise ConfigError(f"unexpected argument {word!r}: overrides look like key=value")
        overrides.append(word)
    return args, overrides
