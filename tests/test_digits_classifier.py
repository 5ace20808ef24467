"""The digits classifier reward: fixed split, held-out accuracy, cache reuse and repair, scores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import steer.digits.classifier as rd
from steer.digits.cache import CorruptCacheWarning


@pytest.fixture(scope="module")
def clf_folder(cache: Path) -> Path:
    config = rd.ClassifierConfig(epochs=10)
    return rd.load_or_train_digits_classifier(cache, config, progress=False)


def test_dataset_split_is_fixed_and_partitions_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    target = torch.tensor(load_digits().target)
    x_all, y_all = rd.load_digits_dataset("all")
    x_tr, y_tr = rd.load_digits_dataset("train")
    x_te, y_te = rd.load_digits_dataset("test")
    assert x_all.shape == (1797, 1, 16, 16) and torch.equal(y_all, target)
    assert x_all.min() >= 0 and x_all.max() <= 1 and x_all.max() > 0.9
    assert len(y_tr) + len(y_te) == 1797 and len(y_te) == 359
    assert torch.equal(torch.bincount(y_tr) + torch.bincount(y_te), torch.bincount(target))
    # test images are absent from the train split; the split is the same on every call
    assert torch.cdist(x_te.flatten(1)[:100], x_tr.flatten(1)).amin() > 0
    assert torch.equal(rd.load_digits_dataset("test")[0], x_te)
    with pytest.raises(ValueError, match="'val'"):
        rd.load_digits_dataset("val")  # type: ignore[arg-type]


def test_classifier_beats_90_percent_held_out(clf_folder: Path) -> None:
    metrics = json.loads((clf_folder / "metrics.json").read_text())
    model, _ = rd.load_classifier(clf_folder)
    x, y = rd.load_digits_dataset("test")
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert acc > 0.90


def test_second_call_reuses_cache(
    cache: Path, clf_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mtime = os.stat(clf_folder / rd.WEIGHTS_FILE).st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained although the cache was valid")

    monkeypatch.setattr(rd, "train_classifier", no_training)
    again = rd.load_or_train_digits_classifier(cache, rd.ClassifierConfig(epochs=10))
    assert again == clf_folder
    assert os.stat(clf_folder / rd.WEIGHTS_FILE).st_mtime_ns == mtime


def test_corrupted_cache_is_retrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = rd.ClassifierConfig(epochs=1, width=8, num_features=16)
    calls = []
    real = rd.train_classifier
    monkeypatch.setattr(rd, "train_classifier", lambda *a, **k: calls.append(1) or real(*a, **k))
    folder = rd.load_or_train_digits_classifier(tmp_path, config, progress=False)
    (folder / rd.WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.warns(CorruptCacheWarning, match="corrupted"):
        again = rd.load_or_train_digits_classifier(tmp_path, config, progress=False)
    assert again == folder and len(calls) == 2
    rd.load_classifier(folder)  # readable again
    (folder / rd.METRICS_FILE).unlink()  # an incomplete folder is retrained too
    with pytest.warns(CorruptCacheWarning, match=rd.METRICS_FILE):
        rd.load_or_train_digits_classifier(tmp_path, config, progress=False)
    assert len(calls) == 3 and (folder / rd.METRICS_FILE).is_file()


def test_missing_weights_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        rd.digits_classifier(weights=str(tmp_path / "nothing.safetensors"))


@pytest.mark.parametrize("bad", [10, -1, [3, 12]])
def test_class_outside_0_9_raises(bad: object, clf_folder: Path) -> None:
    value = bad if isinstance(bad, int) else 12
    with pytest.raises(ValueError, match=f"got {value}"):
        rd.digits_classifier(target=bad, weights=str(clf_folder))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'3'"):
        rd.digits_classifier(target=["3"], weights=str(clf_folder))  # type: ignore[list-item]


def test_reward_matches_independent_log_softmax(clf_folder: Path) -> None:
    model, _ = rd.load_classifier(clf_folder)
    x, y = rd.load_digits_dataset("test")
    x, y = x[:64], y[:64]
    rgb = x.repeat(1, 3, 1, 1)  # [B, 3, 16, 16]
    with torch.no_grad():
        ref = F.log_softmax(model(x), dim=-1)  # [B, 10]
    r3 = rd.digits_classifier(target=3, weights=str(clf_folder), batch_size=10)
    r35 = rd.digits_classifier(target=(5, 3), weights=str(clf_folder))
    p35 = rd.digits_classifier(target=[3, 5], log_prob=False, weights=str(clf_folder))
    assert r3.name == "digits-classifier" and r3.differentiable and r3.input_size == (16, 16)
    assert "sklearn" in r3.source
    torch.testing.assert_close(r3(rgb), ref[:, 3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r35(rgb, ["a prompt"] * 64), ref[:, [3, 5]].amax(1))
    torch.testing.assert_close(p35(rgb), ref[:, [3, 5]].exp().amax(1))
    # the scores classify held-out digits: log p(y | x) is the max for most of them
    every = rd.digits_classifier(target=list(range(10)), weights=str(clf_folder))
    assert (every.log_probs(rgb).argmax(1) == y).float().mean() > 0.9
    assert r3.features(rgb).shape == (64, 128)


def test_reward_is_differentiable_and_resizes(clf_folder: Path) -> None:
    reward = rd.digits_classifier(target=7, weights=str(clf_folder))
    images = torch.rand(4, 3, 32, 32, requires_grad=True)
    score = reward(images)
    assert score.shape == (4,) and torch.all(score <= 0)
    score.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())
    # constant images stay constant through gray conversion and resizing
    flat = rd.to_digit_input(torch.full((2, 3, 24, 24), 0.25))
    torch.testing.assert_close(flat, torch.full((2, 1, 16, 16), 0.25))
    with pytest.raises(ValueError, match=r"\(4, 2, 16, 16\)"):
        reward(torch.rand(4, 2, 16, 16))
