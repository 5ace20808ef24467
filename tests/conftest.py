"""Fixtures shared by the test files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")  # one per test file: the reference cache starts empty
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny digits prior and a quick classifier at the default locations of a cache."""
    import steer.rewards.digits as rd
    from steer.train.digits import DigitsPriorConfig, load_or_train_digits_prior, prior_folder
    from steer.train.pretrain import DDPMTrainConfig

    root = tmp_path_factory.mktemp("steer_cache")
    tiny = DigitsPriorConfig(block_out_channels=(8, 16), train=DDPMTrainConfig(steps=3,
                             batch_size=16, warmup_steps=1), grid_steps=2)  # fmt: skip
    shutil.move(
        load_or_train_digits_prior(root, tiny, progress=False),
        prior_folder(root, DigitsPriorConfig()),
    )
    quick = rd.load_or_train_digits_classifier(root, rd.ClassifierConfig(epochs=2), progress=False)
    default = rd.config_folder(
        root, "digits_classifier", rd.ClassifierConfig(), rd.ClassifierConfig()
    )
    shutil.move(quick, default)
    return root
