"""Fixtures and markers shared by the test files.

- ``cache``: an empty steer cache folder, one per test file; ``digits_cache`` fills that same
  folder with a tiny digits prior and classifier at the locations the main job looks for.
- ``@pytest.mark.fresh_process(group)``: the test runs in a new Python process, shared with the
  other selected tests of the same ``group`` (one child ``pytest`` run per group). Accelerate
  keeps one ``AcceleratorState`` per process and refuses a second ``Accelerator`` with another
  ``mixed_precision`` ("restart your runtime"); it offers no public way to reset that state, so
  the tests that need a precision other than the suite's default (``no``) run apart, grouped by
  precision.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_REPORT_ENV = "STEER_TEST_FRESH_REPORT"  # set in a child: the file it writes outcomes to
_RESULTS = pytest.StashKey[dict[str, dict[str, tuple[str, str]]]]()  # group -> nodeid -> outcome


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fresh_process(group): run the test in a new Python process shared by its group "
        "(e.g. an accelerate mixed_precision other than the rest of the suite's)",
    )
    config.stash[_RESULTS] = {}


def _group(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("fresh_process")
    if mark is None:
        return None
    return str(mark.args[0]) if mark.args else item.nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A ``fresh_process`` test: on its group's first test, run the whole group in one child
    ``pytest``; then report this test's outcome there. In the child the test runs as usual."""
    group = _group(pyfuncitem)
    if group is None or os.environ.get(_REPORT_ENV):
        return None  # pytest calls the test function itself
    results = pyfuncitem.config.stash[_RESULTS]
    if group not in results:
        items = [i for i in pyfuncitem.session.items if _group(i) == group]
        results[group] = _run_in_child(items, pyfuncitem.config)
    outcome, text = results[group].get(pyfuncitem.nodeid, ("missing", ""))
    if outcome == "passed":
        return True
    if outcome == "skipped":
        pytest.skip(text)
    pytest.fail(f"{outcome} in a fresh process (group {group!r}):\n{text}", pytrace=False)


def _run_in_child(items: list[pytest.Item], config: pytest.Config) -> dict[str, tuple[str, str]]:
    """``{nodeid: (outcome, text)}`` of ``items`` run by ``python -m pytest`` in a child; a test
    the child did not report gets ``missing`` and the child's output."""
    nodeids = [i.nodeid for i in items]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "outcomes.jsonl"
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids],
                cwd=config.rootpath,
                env={**os.environ, _REPORT_ENV: str(report)},
                capture_output=True,
                text=True,
                timeout=1800,
            )
            output = f"child exit {done.returncode}:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
        except subprocess.TimeoutExpired:
            output = "the child pytest ran past 1800 s and was stopped"
        lines = report.read_text().splitlines() if report.is_file() else []
    results = {nodeid: ("missing", output) for nodeid in nodeids}
    for line in lines:  # in order: a failed teardown after a passed call ends as failed
        entry = json.loads(line)
        results[entry["nodeid"]] = (entry["outcome"], entry["text"])
    return results


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In a child: write each test's call outcome, and any setup/teardown failure or skip."""
    path = os.environ.get(_REPORT_ENV)
    if not path or (report.when != "call" and report.passed):
        return
    if isinstance(report.longrepr, tuple):  # a skip: (path, line, message)
        text = str(report.longrepr[2])
    else:
        text = str(report.longrepr)[-6000:] if report.longrepr is not None else ""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "outcome": report.outcome, "text": text}))
        f.write("\n")


@pytest.fixture(scope="module")  # one per test file: its cache starts empty
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty steer cache folder (what ``$STEER_CACHE`` would point at)."""
    return tmp_path_factory.mktemp("steer_cache")


@pytest.fixture(scope="module")
def digits_cache(cache: Path) -> Path:
    """This file's ``cache`` with a tiny digits prior and a quick classifier at the default
    locations (the main job's defaults find them there)."""
    import steer.digits.classifier as rd
    from steer.digits.cache import config_folder
    from steer.digits.pretrain import DDPMTrainConfig
    from steer.digits.prior import DigitsPriorConfig, load_or_train_digits_prior, prior_folder

    tiny = DigitsPriorConfig(block_out_channels=(8, 16), train=DDPMTrainConfig(steps=3,
                             batch_size=16, warmup_steps=1), grid_steps=2)  # fmt: skip
    shutil.move(
        load_or_train_digits_prior(cache, tiny, progress=False),
        prior_folder(cache, DigitsPriorConfig()),
    )
    quick = rd.load_or_train_digits_classifier(cache, rd.ClassifierConfig(epochs=2), progress=False)
    default = config_folder(
        cache, "digits_classifier", rd.ClassifierConfig(), rd.ClassifierConfig()
    )
    shutil.move(quick, default)
    return cache
