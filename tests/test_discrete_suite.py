"""The `steer exact` command: every exact row passes, a failing row gives a non-zero exit."""

from __future__ import annotations

import pytest

from steer import cli
from steer.discrete import suite


def test_steer_exact_fast_prints_passing_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["exact", "--fast"]) == 0
    out = capsys.readouterr().out
    for theorem in ("| 4.1 |", "| 4.2 |", "| 4.3 |", "| 4.4 |"):
        assert theorem in out
    assert "FAIL" not in out and "16/16 rows pass" in out
    assert out.count("| grid |") == out.count("| bn |") == 8


def test_failing_row_gives_nonzero_exit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = suite.Row("4.2", "grid", "broken", "∝ e^-E", 0.3, 0.3, suite.EXACT_BOUND)
    monkeypatch.setattr(suite, "identity_rows", lambda name, env, seed=0: [bad])
    assert suite.main(["--fast"]) == 1
    assert "| FAIL |" in capsys.readouterr().out


def test_bias_row_needs_a_large_tv() -> None:
    assert not suite.Row("4.1", "g", "s", "misses", 0.01, 0.01, 0.05, at_least=True).passed
    assert suite.Row("4.1", "g", "s", "misses", 0.5, 0.5, 0.05, at_least=True).passed


def test_key_value_overrides_and_the_old_flags_agree(capsys: pytest.CaptureFixture[str]) -> None:
    assert suite.main(["fast=true"]) == 0
    by_override = capsys.readouterr().out
    assert suite.main(["--fast"]) == 0
    assert capsys.readouterr().out == by_override
    assert by_override.startswith("config: fast=true mlp=true seed=0\n")
    old = suite.load_exact_config(["--fast", "--no-mlp", "--seed", "3"])
    new = suite.load_exact_config(["fast=true", "mlp=false", "seed=3"])
    assert old == new == suite.ExactConfig(fast=True, mlp=False, seed=3)
    assert suite.load_exact_config([]) == suite.ExactConfig(fast=False, mlp=True, seed=0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["seed=one"], "seed='one' has the wrong type (in override 'seed=one'): expected int"),
        (["fsat=true"], "unknown key 'fsat' (in override 'fsat=true'); did you mean fast?"),
        (["--fsat"], "unknown option '--fsat'; did you mean --fast?"),
    ],
)
def test_bad_options_print_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["exact", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("steer exact: error: ") and err.count("\n") == 1
    assert message in err
