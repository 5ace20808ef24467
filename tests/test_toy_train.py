"""Training runs, every objective, the command line and its bad options."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from steer.toy.cli import main, parse_train_args
from steer.toy.metrics import evaluate_sampler
from steer.toy.posterior import Posterior9, train_prior
from steer.toy.sampler import SamplerConfig
from steer.toy.targets import ManyWell, gmm25
from steer.toy.train import TOY_OBJECTIVES, ToyConfig, train

TINY = dict(
    steps=10,
    batch=64,
    hidden=32,
    layers=1,
    eval_every=10**6,
    max_time_s=None,
    local_search=False,
    buffer="none",
    explore=0.0,
    langevin=False,
)


def test_short_gmm25_training_lowers_delta_log_z() -> None:
    target = gmm25()
    cfg = ToyConfig(**{**TINY, "iterations": 200, "lr": 3e-3, "batch": 128})
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    from steer.toy.sampler import DiffusionSampler

    before, _ = evaluate_sampler(
        DiffusionSampler(cfg.sampler_config(target)),
        target,
        500,
        generator=gen,
        sample_quality=False,
    )
    result = train(cfg, target, progress=False)
    after, _ = evaluate_sampler(result.sampler, target, 500, generator=gen, sample_quality=False)
    assert after["delta_log_z"] < before["delta_log_z"] - 1.0  # at least one nat closer
    assert result.history and result.history[-1]["iteration"] == 200


@pytest.mark.parametrize("objective", [o for o in TOY_OBJECTIVES if o != "rtb"])
def test_every_objective_runs_and_stays_finite(objective: str) -> None:
    cfg = ToyConfig(
        **{
            **TINY,
            "objective": objective,
            "iterations": 6,
            "buffer": "rank",
            "local_search": True,
            "ls_every": 3,
            "ls_steps": 3,
            "ls_batch": 32,
            "explore": 0.3,
            "langevin": objective == "tb",
            "learned_variance": objective == "vargrad",
        }
    )
    result = train(cfg, ManyWell(), progress=False)
    metrics = result.history[-1]
    assert np.isfinite(metrics["elbo"]) and np.isfinite(metrics["loss"])


def test_rtb_on_posterior9_starts_from_the_prior() -> None:
    cfg = ToyConfig(
        **{**TINY, "objective": "rtb", "iterations": 4, "buffer": "uniform", "backward_every": 2}
    )
    prior = train_prior(
        SamplerConfig(dim=2, steps=10, hidden=32, layers=1, sigma=2.0), iterations=5, batch=32
    )
    result = train(cfg, Posterior9(prior), progress=False)
    assert np.isfinite(result.history[-1]["elbo"])
    assert all(not p.requires_grad for p in prior.parameters())


def test_bad_options_raise_with_the_valid_values() -> None:
    with pytest.raises(ValueError, match="tb, vargrad, subtb, db, fldb, rtb"):
        ToyConfig(objective="tbb")
    with pytest.raises(ValueError, match="steps T must be an integer >= 1"):
        ToyConfig(steps=0)
    with pytest.raises(ValueError, match="buffer must be one of"):
        ToyConfig(buffer="fifo")
    with pytest.raises(ValueError, match="local_search needs a replay buffer"):
        ToyConfig(buffer="none", local_search=True)
    with pytest.raises(ValueError, match="needs a prior"):
        train(ToyConfig(**{**TINY, "objective": "rtb", "iterations": 1}), gmm25(), progress=False)
    with pytest.raises(SystemExit):
        main(["train", "--target", "nope", "--out", "/tmp/never"])


def test_cli_train_then_eval(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = [
        "train",
        "--target",
        "gmm25",
        "--out",
        str(out),
        "--no-progress",
        "--steps",
        "8",
        "--batch",
        "32",
        "--hidden",
        "16",
        "--layers",
        "1",
        "--iterations",
        "12",
        "--eval-every",
        "6",
        "--eval-samples",
        "200",
        "--ls-every",
        "4",
        "--ls-steps",
        "4",
        "--ls-batch",
        "16",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "elbo",
        "log_z_rw",
        "eubo",
        "delta_log_z",
        "delta_log_z_rw",
        "w2",
        "mmd",
        "wall_time_s",
        "iterations",
    ):
        assert key in metrics and metrics[key] is not None
    assert np.load(out / "samples.npy").shape == (200, 2)
    assert (out / "samples.png").stat().st_size > 0 and (out / "metrics.png").exists()
    printed = capsys.readouterr().out  # the resolved config, printed before training
    assert "resolved config" in printed and "  iterations: 12\n" in printed
    assert main(["eval", str(out), "--samples", "200", "--seed", "1"]) == 0
    again = json.loads((out / "eval_metrics.json").read_text())
    assert {"elbo", "log_z_rw", "eubo", "delta_log_z", "w2", "mmd"} <= set(again)
    # the saved weights and the training run's evaluation seed (seed + 1) reproduce its ELBO
    assert again["elbo"] == pytest.approx(metrics["elbo"], abs=1e-4)
    assert main(["eval", str(out), "--samples", "200", "--seed", "7"]) == 0
    fresh = json.loads((out / "eval_metrics.json").read_text())
    assert fresh["elbo"] != again["elbo"] and abs(fresh["elbo"] - again["elbo"]) < 2.0
    # the run's config.yaml holds the options as given and the resolved sampler
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["train"]["iterations"], saved["train"]["ls_batch"]) == (12, 16)
    assert saved["sampler"]["steps"] == 8 and saved["prior_sampler"] is None
    assert not (out / "config.json").exists()
    # a run saved before config.yaml (config.json, dim beside the options) still reloads
    legacy = {"train": {k: v for k, v in saved["train"].items() if k != "dim"}, "dim": None}
    legacy["sampler"] = saved["sampler"]
    (out / "config.json").write_text(json.dumps(legacy))
    (out / "config.yaml").unlink()
    assert main(["eval", str(out), "--samples", "200", "--seed", "1"]) == 0
    assert json.loads((out / "eval_metrics.json").read_text()) == again


def test_reparametrised_gradient_is_the_derivative_of_the_loss_with_the_noise_fixed() -> None:
    """With the noise fixed the TB loss is a function of θ alone: the gradient of a rollout
    that keeps its states' graph equals its finite difference (float64, which also checks that
    a ``.double()`` sampler samples in float64), and the off-policy gradient (states
    detached) does not."""
    from steer.toy.sampler import DiffusionSampler
    from steer.toy.train import objective_loss

    target = ManyWell(dim=2)
    torch.manual_seed(0)
    s = DiffusionSampler(SamplerConfig(dim=2, steps=6, hidden=16, layers=1)).double()
    for p in s.out.parameters():  # a non-trivial drift (the head starts at zero)
        torch.nn.init.normal_(p, std=0.3)

    def loss(detach: bool) -> torch.Tensor:
        traj = s.rollout(64, generator=torch.Generator().manual_seed(5), detach_states=detach)
        assert traj.latents.dtype == torch.float64
        log_r = target.log_prob(traj.x0)
        scored = (traj.log_pf, None)
        return objective_loss("tb", s, traj.latents, log_r, target, scored=scored).mean()

    w, v, eps = s.out.weight, torch.randn_like(s.out.weight), 1e-6
    directional = {d: (torch.autograd.grad(loss(d), w)[0] * v).sum() for d in (False, True)}
    with torch.no_grad():
        w += eps * v
        up = loss(False)
        w -= 2 * eps * v
        down = loss(False)
        w += eps * v
    finite_difference = (up - down) / (2 * eps)
    torch.testing.assert_close(directional[False], finite_difference, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(directional[True], finite_difference, rtol=1e-2)


def test_cli_posterior9_rtb_with_the_default_langevin_option(tmp_path) -> None:
    """The documented ``steer toy train --target posterior9 --objective rtb`` (Langevin on by
    default): the prior, a denoising model of gmm25 samples, is trained without a score, and
    the RTB sampler is a copy of it (same SDE and network), so that it starts as the prior."""
    out = tmp_path / "rtb"
    args = ["train", "--target", "posterior9", "--objective", "rtb", "--out", str(out)]
    tiny = {
        "--no-progress": None,
        "--prior-iterations": "3",
        "--steps": "5",
        "--batch": "16",
        "--hidden": "16",
        "--layers": "1",
        "--iterations": "4",
        "--eval-every": "2",
        "--eval-samples": "64",
        "--ls-every": "2",
        "--ls-steps": "2",
        "--ls-batch": "16",
        "--max-time-s": "30",
    }
    for flag, value in tiny.items():
        args += [flag] if value is None else [flag, value]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["elbo"]) and metrics["iterations"] == 4
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["langevin"] is True  # the option as given ...
    assert config["sampler"] == config["prior_sampler"]  # ... the sampler is the prior's
    assert config["sampler"]["langevin"] is False and config["sampler"]["steps"] == 5
    assert main(["eval", str(out), "--samples", "64"]) == 0  # and the run reloads


def test_old_flags_and_key_value_overrides_give_the_same_config() -> None:
    old = ["--target", "funnel", "--iterations", "200", "--no-local-search", "--buffer", "none"]
    old += ["--explore", "0", "--sigma", "2", "--max-time-s", "30", "--dim", "3", "--lr", "1e-3"]
    new = ["target=funnel", "iterations=200", "local_search=false", "buffer=none", "explore=0"]
    new += ["sigma=2", "max_time_s=30", "dim=3", "lr=1e-3"]
    (a_args, a), (b_args, b) = (
        parse_train_args(["--out", "d", *argv, "--no-progress"]) for argv in (old, new)
    )
    expected = ToyConfig(
        target="funnel", iterations=200, local_search=False, buffer="none", explore=0.0,
        sigma=2.0, max_time_s=30.0, dim=3, lr=1e-3,
    )  # fmt: skip
    assert a == b == expected and isinstance(a.sigma, float) and isinstance(a.iterations, int)
    assert a_args.no_progress and b_args.no_progress and str(a_args.out) == "d"
    # key=value words come after the flags, so they win; abbreviated flags still work
    _, both = parse_train_args(["--out", "d", "--iterations", "5", "iterations=6", "--ls-e", "7"])
    assert (both.iterations, both.ls_every) == (6, 7)


VALID = {"target": "funnel", "objective": "vargrad", "activation": "silu", "buffer": "uniform"}


@pytest.mark.parametrize("field", dataclasses.fields(ToyConfig), ids=lambda f: f.name)
def test_every_field_flag_still_sets_its_field(field: dataclasses.Field) -> None:
    """Each ``--field-name`` flag that ``steer toy train`` generated before the loader."""
    flag = "--" + field.name.replace("_", "-")
    if field.type == "bool":
        argv, expected = [flag if not field.default else "--no-" + flag[2:]], not field.default
    elif field.name in VALID:
        argv, expected = [flag, VALID[field.name]], VALID[field.name]
    elif field.type.startswith("int"):
        expected = (field.default or 1) + 1
        argv = [flag, str(expected)]
    else:
        argv, expected = [flag, "0.25"], 0.25
    _, cfg = parse_train_args(["--out", "d", *argv])
    assert getattr(cfg, field.name) == expected
    assert type(getattr(cfg, field.name)) is type(expected)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["iteratons=3"], "unknown key 'iteratons' (in override 'iteratons=3'); did you mean "
                          "iterations?"),
        (["iterations=abc"], "iterations='abc' has the wrong type (in override "
                             "'iterations=abc'): expected int; give iterations=<int>"),
        (["--iterations", "abc"], "iterations='abc' has the wrong type"),
        (["--iteratons", "3"], "unknown option '--iteratons'; did you mean --iterations?"),
        (["objective=tbb"], "unknown objective 'tbb'; valid: tb, vargrad"),
        (["200"], "unexpected argument '200': overrides look like key=value"),
    ],
)  # fmt: skip
def test_bad_options_print_one_line_and_exit_2(tmp_path, capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "never"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("steer toy train: error: ") and err.count("\n") == 1
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()
