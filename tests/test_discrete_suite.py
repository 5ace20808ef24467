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
