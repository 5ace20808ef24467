"""steer.config: defaults ← YAML ← overrides, and one clear line for every mistake."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

from steer.config import (
    ArgumentParser,
    ConfigError,
    add_field_flags,
    check_choice,
    check_number,
    error_line,
    exit_on_input_error,
    input_phase,
    is_input_error,
    load_structured,
    parse_overrides,
    save_yaml,
    to_yaml,
)


@dataclass
class Optim:
    lr: float = 1e-3
    steps: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"optim.steps must be >= 1, got {self.steps}")


@dataclass
class Run:
    name: str = "run"
    sigma: float | None = None
    verbose: bool = False
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)


@dataclass
class Needs:
    dim: int
    scale: float = 1.0


def test_defaults_then_file_then_overrides(tmp_path) -> None:
    assert load_structured(Run) == Run()
    path = tmp_path / "run.yaml"
    path.write_text("name: from-file\noptim:\n  lr: 0.5\n  steps: 3\n")
    cfg = load_structured(Run, path, ["optim.steps=7", "sigma=2", "verbose=true", "tags=[a,b]"])
    assert cfg == Run("from-file", 2.0, True, ["a", "b"], Optim(0.5, 7))
    assert isinstance(cfg.sigma, float) and isinstance(cfg.optim, Optim)
    # later overrides win; a JSON file loads like YAML; data sits between file and overrides
    assert load_structured(Run, None, ["optim.steps=2", "optim.steps=4"]).optim.steps == 4
    (tmp_path / "run.json").write_text(json.dumps({"optim": {"steps": 5}}))
    assert load_structured(Run, tmp_path / "run.json").optim.steps == 5
    both = load_structured(Run, path, ["name=o"], data={"name": "d", "sigma": 1})
    assert (both.name, both.sigma, both.optim.lr) == ("o", 1.0, 0.5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.stpes=3", "unknown key 'optim.stpes' (in override 'optim.stpes=3'); "
                          "did you mean optim.steps?"),
        ("otpim.steps=3", "unknown key 'otpim' (in override 'otpim.steps=3'); did you mean optim?"),
        ("optim.lr.x=3", "optim.lr={'x': 3} has the wrong type (in override 'optim.lr.x=3'): "
                         "expected float"),
        ("nmae=x", "unknown key 'nmae' (in override 'nmae=x'); did you mean name?"),
        ("zzz=1", "unknown key 'zzz' (in override 'zzz=1'); valid keys: name, sigma, verbose, "
                  "tags, optim"),
        ("optim.steps=abc", "optim.steps='abc' has the wrong type (in override "
                            "'optim.steps=abc'): expected int; give optim.steps=<int>"),
        ("optim.steps=2.5", "optim.steps=2.5 has the wrong type"),
        ("sigma=wide", "sigma='wide' has the wrong type (in override 'sigma=wide'): expected "
                       "float or null; give sigma=<float or null>"),
        ("verbose=maybe", "verbose='maybe' has the wrong type (in override 'verbose=maybe'): "
                          "expected bool; give verbose=true or verbose=false"),
        ("optim.steps=0", "optim.steps must be >= 1, got 0"),
        ("optim.steps", "overrides must look like a.b=value, got ['optim.steps']"),
    ],
)  # fmt: skip
def test_bad_overrides_raise_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_structured(Run, None, [override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working


def test_bad_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config file .*missing.yaml does not exist"):
        load_structured(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  setps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optim.setps' \(in config file .*bad"):
        load_structured(Run, bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_structured(Run, bad)
    with pytest.raises(ConfigError, match="dim has no default and was not given: give dim="):
        load_structured(Needs)
    assert load_structured(Needs, None, ["dim=3"]) == Needs(3)


def test_yaml_round_trip(tmp_path) -> None:
    cfg = Run("r", 0.5, True, ["x"], Optim(2e-4, 3))
    text = to_yaml(cfg)
    assert "optim:\n  lr: 0.0002\n  steps: 3\n" in text
    path = save_yaml(cfg, tmp_path / "sub" / "config.yaml")
    assert path.read_text() == text and load_structured(Run, path) == cfg


def test_flags_become_overrides_and_key_value_words_win() -> None:
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--out", default="o")
    add_field_flags(parser, Run, {"name": "the run's name"})
    # nested sections get no flag; bools get --x / --no-x
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {"--name", "--sigma", "--verbose", "--no-verbose"} <= flags and "--optim" not in flags
    args, overrides = parse_overrides(
        parser, ["--name", "a", "--verbose", "optim.lr=0.1", "name=b", "--out", "x"], Run
    )
    assert args.out == "x" and overrides == ["name='a'", "verbose=true", "optim.lr=0.1", "name=b"]
    assert load_structured(Run, None, overrides) == Run("b", verbose=True, optim=Optim(0.1))
    assert parse_overrides(parser, [], Run)[1] == []  # unset flags add nothing
    # a str flag keeps the text typed, which YAML alone would read as a number or a mapping
    for text in ("1e3", "it's: odd", "null"):
        _, quoted = parse_overrides(parser, ["--name", text], Run)
        assert load_structured(Run, None, quoted).name == text
    with pytest.raises(ConfigError, match="unknown option '--sigmaa'; did you mean --sigma?"):
        parse_overrides(parser, ["--sigmaa", "1"], Run)
    with pytest.raises(ConfigError, match="unexpected argument 'b': overrides look like"):
        parse_overrides(parser, ["b"], Run)


def test_finetune_load_config_uses_the_loader() -> None:
    from steer.train.config import load_config

    with pytest.raises(ConfigError, match="unknown key 'train.stepz' .*did you mean train.steps"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ValueError, match="train.steps='x' has the wrong type .*expected int"):
        load_config(None, ["train.steps=x"])
    assert load_config(None, ["train.steps=3"]).train.steps == 3


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (0, {"gt": 0}, "a.b must be > 0, got 0"),
        (-1, {"ge": 0}, "a.b must be >= 0, got -1"),
        (1.5, {"gt": 0, "le": 1}, r"a.b must be in (0, 1], got 1.5"),
        (-1, {"ge": 0, "lt": 2**32}, "a.b must be in [0, 4294967296), got -1"),
        (float("nan"), {"gt": 0}, "a.b must be a finite number > 0, got nan"),
        (float("nan"), {"gt": 0, "finite": False}, "a.b must be a number > 0, got nan"),
        (float("inf"), {}, "a.b must be a finite number, got inf"),
    ],
)
def test_check_number_names_the_field_the_value_and_the_range(value, bounds, message) -> None:
    with pytest.raises(ValueError) as info:
        check_number("a.b", value, **bounds)
    assert str(info.value) == message


def test_checks_that_pass_and_choices() -> None:
    check_number("x", 0.5, gt=0, le=1)
    check_number("x", float("inf"), gt=0, finite=False)
    with pytest.raises(TypeError, match="x must be a number > 0, got 'a'"):
        check_number("x", "a", gt=0)
    with pytest.raises(TypeError, match="got True"):
        check_number("x", True, ge=0)
    check_choice("k", "a", ("a", "b"))
    with pytest.raises(ValueError, match="^k='c' is not valid; choose one of a, b$"):
        check_choice("k", "c", ("a", "b"))


def test_input_errors_are_marked_then_one_line(capsys) -> None:
    def bad() -> int:
        with input_phase():
            raise KeyError("unknown thing 'x'; valid: a, b")

    with pytest.raises(KeyError) as info:  # Python callers get the exception unchanged
        bad()
    assert is_input_error(info.value) and error_line(info.value) == "unknown thing 'x'; valid: a, b"
    with pytest.raises(SystemExit) as exit_info:
        exit_on_input_error("demo", bad)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "demo: error: unknown thing 'x'; valid: a, b\n"
    with pytest.raises(SystemExit):  # a ConfigError is bad input wherever it is raised
        exit_on_input_error("demo", lambda: load_structured(Run, None, ["zzz=1"]))
    assert capsys.readouterr().err.startswith("demo: error: unknown key 'zzz'")

    def bug() -> int:
        raise ValueError("not input: a bug")

    with pytest.raises(ValueError, match="a bug"):  # unmarked: the traceback stays
        exit_on_input_error("demo", bug)
    assert error_line(ValueError("two\n  lines")) == "two; lines"
    assert error_line(ValueError()) == "ValueError"


def test_argument_parser_errors_are_one_line(capsys) -> None:
    parser = ArgumentParser(prog="demo")
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--n", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "demo: error: argument --n: invalid int value: 'x' (see demo --help)\n"
