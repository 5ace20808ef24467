"""One configuration path for every command: typed dataclasses ← YAML ← ``a.b=value`` overrides.

``load_structured(ToyConfig, "run.yaml", ["iterations=200"])`` merges the file and the overrides
onto the dataclass's defaults with OmegaConf (each value is type-checked against the field's
annotation), then builds the dataclass, whose ``__post_init__`` validates it. Every mistake is
one :class:`ConfigError` line naming the key, the value and the fix; commands print it and exit
with status 2. :func:`add_field_flags` and :func:`parse_overrides` give a command line both
``key=value`` overrides and the ``--field-name value`` flags, translated to overrides;
:func:`check_number` and :func:`check_choice` are the range and choice checks of the dataclasses.

Where a command draws the line between bad input and a bug (docs/reliability.md): code that
checks input runs inside :func:`input_phase`, which marks the ``ValueError``, ``TypeError``,
``KeyError`` or ``OSError`` it raises as bad input; :func:`exit_on_input_error`, at the command
line's edge, prints a marked error (and any :class:`ConfigError`) as one line
``steer <cmd>: error: ...`` and exits with status 2. Any other exception keeps its traceback, and
``STEER_TRACEBACK=1`` shows the traceback of a marked one too.

Torch-free: OmegaConf and the standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

__all__ = [
    "INPUT_ERRORS",
    "TRACEBACK_ENV",
    "ArgumentParser",
    "ConfigError",
    "add_field_flags",
    "check_choice",
    "check_number",
    "error_line",
    "exit_on_input_error",
    "input_phase",
    "is_input_error",
    "load_structured",
    "parse_overrides",
    "save_yaml",
    "to_yaml",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration mistake, as one line naming the key, the value and the fix."""


# --------------------------------------------------------------------------------------------
# checks of one field
# --------------------------------------------------------------------------------------------
def check_choice(name: str, value: object, valid: Sequence[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``valid``: ``name='x' is not valid;
    choose one of a, b``."""
    if value not in valid:
        choices = ", ".join(map(str, valid))
        raise ValueError(f"{name}={value!r} is not valid; choose one of {choices}")


def _bound(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """``> 0``, ``in (0, 1]``: the range as a user reads it."""
    lo, hi = (x if x is None or isinstance(x, int) else f"{x:g}" for x in (low, high))
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {lo}"
    return f"{'<' if high_open else '<='} {hi}"


def check_number(
    name: str,
    value: float | int,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    finite: bool = True,
) -> None:
    """Raise ``ValueError`` unless ``value`` lies in the range (``gt`` / ``ge`` below, ``lt`` /
    ``le`` above): ``name must be > 0, got -1``. NaN never passes; ±inf only with
    ``finite=False``."""
    low, low_open = (gt, True) if gt is not None else (ge, False)
    high, high_open = (lt, True) if lt is not None else (le, False)
    bound = "" if low is None and high is None else _bound(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number {bound}, got {value!r}".replace("  ", " "))
    if math.isnan(value) or (finite and math.isinf(value)):
        kind = "a finite number" if finite else "a number"
        raise ValueError(f"{name} must be {kind} {bound}".rstrip() + f", got {value!r}")
    ok = True
    if low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be {bound}, got {value!r}")


# --------------------------------------------------------------------------------------------
# bad input at the command line: one line, status 2
# --------------------------------------------------------------------------------------------
INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, KeyError, OSError)
TRACEBACK_ENV = "STEER_TRACEBACK"  # set to 1: marked errors keep their traceback too
_MARK = "_steer_bad_input"


@contextlib.contextmanager
def input_phase() -> Iterator[None]:
    """Mark an :data:`INPUT_ERRORS` exception raised inside as bad input (an attribute on the
    exception: its type, message and traceback are unchanged for Python callers)."""
    try:
        yield
    except INPUT_ERRORS as err:
        with contextlib.suppress(AttributeError):  # an exception type without a __dict__
            setattr(err, _MARK, True)
        raise


def is_input_error(err: BaseException) -> bool:
    """A :class:`ConfigError`, or an exception raised inside :func:`input_phase`."""
    return isinstance(err, ConfigError) or getattr(err, _MARK, False) is True


def error_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a ``KeyError``'s without the quotes ``str`` adds)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def exit_on_input_error(prog: str, run: Callable[[], int]) -> int:
    """``run()``; bad input (:func:`is_input_error`) becomes one line ``prog: error: ...`` on
    stderr and ``SystemExit(2)``. Anything else propagates with its traceback."""
    try:
        return run()
    except Exception as err:
        if not is_input_error(err) or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        sys.stderr.write(f"{prog}: error: {error_line(err)}\n")
        raise SystemExit(2) from None


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line too: ``prog: error: ... (see prog
    --help)``, status 2 (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
