"""Bad input across the public surface: the rows of docs/reliability.md ("Bad input") that no
other test file checks. Each bad input gives its exception type and a message naming the value
and the fix; at the command line, exit status 2 and one line ``steer <cmd>: error: ...``, never
a traceback. Tiny models only, no training beyond set-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steer import cli
from steer import objectives as obj
from steer.config import ConfigError, is_input_error
from steer.train.config import PromptConfig, load_config

Z = torch.zeros
ROOT = Path(__file__).parents[1]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------------------------------
# objectives (steer.objectives): shapes that must agree
# --------------------------------------------------------------------------------------------
OBJECTIVES = [
    pytest.param(
        lambda: obj.trajectory_balance(Z(2, 3), Z(2, 4), Z(2), 0.0),
        ValueError, r"log_pf has 3 steps \(\(2, 3\)\) but log_pb has 4 \(\(2, 4\)\)",
        id="tb-log_pb-other-steps",
    ),
    pytest.param(
        lambda: obj.vargrad(Z(2, 3), Z(2, 4), Z(2)),
        ValueError, "log_pf has 3 steps .* but log_pb has 4", id="vargrad-log_pb-other-steps",
    ),
    pytest.param(
        lambda: obj.relative_trajectory_balance(Z(2, 3), Z(2, 2), Z(2), 0.0),
        ValueError, "log_pf_post has 3 steps .* but log_pf_prior has 2", id="rtb-other-steps",
    ),
    pytest.param(
        lambda: obj.relative_vargrad(Z(2, 3), Z(2, 5), Z(2)),
        ValueError, "log_pf_post has 3 steps .* but log_pf_prior has 5",
        id="relative-vargrad-other-steps",
    ),
    pytest.param(
        lambda: obj.trajectory_balance([0.0, 0.0], Z(2), Z(2), 0.0),
        TypeError, "log_pf must be a torch.Tensor, got list", id="tb-list",
    ),
    pytest.param(
        lambda: obj.trajectory_balance(Z(2), Z(2), torch.tensor([0.0, float("inf")]), 0.0),
        ValueError, r"log_reward has non-finite entries at batch indices \[1\]; clip the reward",
        id="tb-inf-log-reward",
    ),
    pytest.param(
        lambda: obj.detailed_balance(Z(4), Z(4, 4), Z(4, 4), Z(4, 4)),
        ValueError, r"per-transition inputs mix ranks: .*x\[:, None\]", id="db-B-beside-BT",
    ),
    pytest.param(
        lambda: obj.detailed_balance(0.0, Z(4), Z(4), Z(4)),
        TypeError, "log_flow must be a torch.Tensor, got float", id="db-float",
    ),
    pytest.param(
        lambda: obj.energy_difference_detailed_balance(Z(2, 3), Z(2, 3), Z(2, 3), Z(2, 3),
                                                       Z(2), Z(2, 3)),
        ValueError, "per-transition inputs mix ranks", id="energy-db-mixed-ranks",
    ),
    pytest.param(
        lambda: obj.subtrajectory_balance(Z(2, 4), Z(2, 3), Z(2, 3), lengths=torch.tensor([0, 3])),
        ValueError, r"lengths must hold integer step counts in \[1, T=3\], got \[0, 3\]",
        id="subtb-zero-length",
    ),
    pytest.param(
        lambda: obj.huber(Z(3), threshold=0.0),
        ValueError, "huber threshold must be > 0, got 0.0", id="huber-threshold",
    ),
    pytest.param(
        lambda: obj.group_normalise(Z(3), None, clip=0.0),
        ValueError, r"clip must be > 0, got 0.0; it bounds the advantages", id="advantage-clip",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "match"), OBJECTIVES)
def test_objectives_refuse(call, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_a_per_trajectory_sum_still_goes_with_per_step_terms() -> None:
    """[B] beside [B, T] is a sum beside steps (TB's documented input), not a mismatch."""
    pf, pb = torch.randn(2, 3), torch.randn(2, 4)
    delta = obj.trajectory_balance(pf.sum(1), pb, Z(2), 0.0)
    torch.testing.assert_close(delta, pf.sum(1) - pb.sum(1))


# --------------------------------------------------------------------------------------------
# trainer config (steer.train.config.load_config): every range and choice at load
# --------------------------------------------------------------------------------------------
CONFIG = [
    ("trian.steps=3", r"^unknown key 'trian' \(in override .*\); did you mean train\?"),
    ("train.stesp=3", r"^unknown key 'train.stesp' .*; did you mean train.steps\?"),
    ("train.lr=abc", r"^train.lr='abc' has the wrong type .*: expected float; give train.lr="),
    ("train.lr=nan", r"^train.lr must be a finite number > 0, got nan"),
    ("lora.alpha=0", r"^lora.alpha must be > 0, got 0.0"),
    ("lora.target_modules=[]", r"^lora.target_modules is empty; name the UNet modules"),
    ("train.max_grad_norm=0", r"^train.max_grad_norm must be > 0, got 0.0"),
    ("train.weight_decay=-0.1", r"^train.weight_decay must be >= 0, got -0.1"),
    ("train.seed=-1", r"^train.seed must be in \[0, 4294967296\), got -1"),
    ("train.lr_min_ratio=2", r"^train.lr_min_ratio must be in \[0, 1\], got 2.0"),
    ("train.replay_per_batch=4", r"^train.replay_buffer=0 must hold at least train.replay_per"),
    ("train.on_nonfinite=ignore", r"^train.on_nonfinite='ignore' is not valid; choose one of"),
    ("log.eval_every=-1", r"^log.eval_every must be >= 0, got -1"),
    ("log.num_eval_samples=0", r"^log.num_eval_samples must be >= 1, got 0"),
    ("log.checkpoint_every=-2", r"^log.checkpoint_every must be >= 0, got -2"),
    ("log.run_name=a/b", r"^log.run_name='a/b' must be a folder name, not a path"),
    ("log.tracker=mlflow", r"^log.tracker='mlflow' is not valid; choose one of tensorboard"),
    ("log.report=a:b:c", r"^log.report must look like module:function, got 'a:b:c'"),
    ("objective.log_z_lr=0", r"^objective.log_z_lr must be > 0, got 0.0"),
    ("objective.flow_lr=-1", r"^objective.flow_lr must be > 0, got -1.0"),
    ("objective.advantage_clip=0", r"^objective.advantage_clip must be > 0, got 0.0"),
    ("objective.log_z_init=inf", r"^objective.log_z_init must be a finite number, got inf"),
    ("objective.clip_range=0", r"^objective.clip_range must be > 0, got 0.0"),
    ("objective.kl_weight=-1", r"^objective.kl_weight must be >= 0, got -1.0"),
    ("objective.penalty=l1", r"^objective.penalty='l1' is not valid; choose one of squared"),
    ("objective.log_z_mode=learned", r"^objective.log_z_mode='learned' is not valid"),
    ("model.num_inference_steps=0", r"^model.num_inference_steps must be >= 1, got 0"),
    ("model.prior_tail_steps=20", r"^model.prior_tail_steps must be in \[0, 19\]"),
    ("model.timestep_spacing=karras", r"^model.timestep_spacing='karras' is not valid"),
    ("model.pretrained=''", r"^model.pretrained must be a non-empty string, got ''"),
    (f"model.cache_dir={__file__}", r"^model.cache_dir=.*test_bad_input.py' is a file; give a"),
    ("prompts.prompt=' '", r"^prompts.prompt must be a non-empty string, got ' '"),
    ("prompts.prompt=a cat", r"^give one prompt source, got \['prompts.prompt', 'prompts.bu"),
    ("prompts.eval_prompts=['']", r"^prompts.eval_prompts holds an empty prompt"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "match"), CONFIG, ids=[c[0][:40] for c in CONFIG])
def test_config_refuses_at_load(override: str, match: str) -> None:
    base = ["prompts.builtin=digits"] if override.startswith("prompts.prompt=a") else []
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, [*base, override])
    assert "\n" not in str(info.value)


def test_every_preset_still_loads() -> None:
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(preset)


# --------------------------------------------------------------------------------------------
# prompts, rewards, weights on disk
# --------------------------------------------------------------------------------------------
def test_prompts_refuse(tmp_path: Path) -> None:
    from steer.train.prompts import load_prompts

    with pytest.raises(FileNotFoundError, match=r"prompts.file=.*none.txt does not exist; give"):
        load_prompts(PromptConfig(file=str(tmp_path / "none.txt")))
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompts(PromptConfig(file=str(tmp_path / "blank.txt")))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00cat")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_prompts(PromptConfig(file=str(tmp_path / "bin.txt")))
    with pytest.raises(ValueError, match=r"eval_prompts \['a cat'\] are not training prompts"):
        load_prompts(PromptConfig(builtin="digits", eval_prompts=["a cat"]))
    with pytest.raises(ValueError, match="an unconditional run has no prompts"):
        load_prompts(PromptConfig(eval_prompts=["a cat"]))


def _reward(output):
    from steer.rewards import Reward

    class Fixed(Reward):
        name = "fixed"

        def score(self, images, prompts):
            return output(images)

    return Fixed()


REWARDS = [
    pytest.param(lambda x: x.mean(dim=(1, 2, 3))[:, None], ValueError,
                 r"'fixed': score\(\) returned shape \(2, 1\), expected \(2,\), one score per",
                 id="shape-B1"),
    pytest.param(lambda x: [0.0, 1.0], TypeError, r"score\(\) returned list; it must return a",
                 id="list"),
    pytest.param(lambda x: torch.tensor([0.0, float("nan")]), ValueError,
                 "'fixed' returned a non-finite score nan for batch index 1", id="nan"),
]  # fmt: skip


@pytest.mark.parametrize(("output", "error", "match"), REWARDS)
def test_a_reward_returning_a_bad_score_is_named(output, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _reward(output)(torch.rand(2, 3, 4, 4))


def test_reward_inputs() -> None:
    r = _reward(lambda x: x.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[-1, 1\]; map \[-1, 1\]"):
        r(torch.linspace(-1, 1, 96).view(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[0, inf\]"):
        r(torch.tensor([0.0, float("inf")]).repeat_interleave(48).view(2, 3, 4, 4))
    from steer.rewards import Reward

    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        Reward(batch_size=0)


def test_truncated_weight_files_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from steer.rewards._hub import load_state_dict
    from steer.testing import tiny_ddpm_pipeline

    # 1. reward weights
    path = tmp_path / "mlp.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    _truncate(path)
    with pytest.raises(ValueError, match=r"weights='.*mlp.safetensors' cannot be read .*download"):
        load_state_dict(str(path), arg="weights")
    # 2. a LoRA saved by the DDPM pipeline
    pipe = tiny_ddpm_pipeline()
    pipe.add_lora(rank=2)
    pipe.save_lora_weights(tmp_path / "lora")
    _truncate(tmp_path / "lora" / "unet_lora.safetensors")
    with pytest.raises(ValueError, match=r"LoRA weights at .* cannot be read .*save_lora_weights"):
        tiny_ddpm_pipeline().load_lora_weights(tmp_path / "lora")


def test_a_truncated_digits_prior_cache_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    from steer.digits.cache import CorruptCacheWarning, cached_folder
    from steer.digits.prior import INFO_FILE, _check_prior
    from steer.testing import tiny_ddpm_pipeline

    folder = tmp_path / "digits_prior"
    tiny_ddpm_pipeline().save_pretrained(folder)
    (folder / INFO_FILE).write_text("{}")
    _check_prior(folder)  # a good folder loads back
    _truncate(folder / "unet" / "diffusion_pytorch_model.safetensors")
    built = []
    with pytest.warns(CorruptCacheWarning, match=r"cached digits prior at .* is corrupted"):
        cached_folder(folder, "digits prior", _check_prior, built.append)
    assert len(built) == 1  # rebuilt (here by a stub), never loaded half-written


def test_resume_refusals(tmp_path: Path) -> None:
    from steer.train.checkpoint import resolve_resume

    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint=latest but .* holds no"):
        resolve_resume("latest", tmp_path, {})
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(FileNotFoundError, match=r"is not a steer checkpoint \(no config.yaml\)"):
        resolve_resume(str(tmp_path / "checkpoint-1"), tmp_path, {})


# --------------------------------------------------------------------------------------------
# policy, rollout, toy config
# --------------------------------------------------------------------------------------------
def test_policy_and_rollout_refuse() -> None:
    from steer.diffusion import DiffusionPolicy, rollout
    from steer.testing import tiny_ddim_scheduler, tiny_ddpm_components

    unet = tiny_ddpm_components()["unet"]
    with pytest.raises(ValueError, match="guidance_scale must be a float >= 0, got -1.0"):
        DiffusionPolicy(unet, tiny_ddim_scheduler(), guidance_scale=-1.0)
    policy = DiffusionPolicy(unet, tiny_ddim_scheduler(), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 1, 8, 8\), got \(2, 1, 4"):
        rollout(policy, 2, latents=Z(2, 1, 4, 4))
    with pytest.raises(TypeError, match=r"noise must be a torch.Tensor \[B, K, ...\], got list"):
        rollout(policy, 2, noise=[0.0])


TOY = [
    ({"target": "nope"}, "unknown target 'nope'; valid: gmm25, funnel, manywell"),
    ({"target": "mymodule:energy"}, r"user energy 'mymodule:energy' needs dim=<its dimension>"),
    ({"hidden": 0}, "hidden must be an integer >= 1, got 0"),
    ({"activation": "tanh"}, r"activation must be one of \['gelu', 'relu', 'silu'\]"),
    ({"eval_every": 0}, "eval_every must be >= 1, got 0"),
    ({"ls_every": 0}, "ls_every must be >= 1, got 0"),
    ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
    ({"explore_until": 2.0}, r"explore_until must be in \[0, 1\], got 2.0"),
    ({"max_time_s": 0.0}, "max_time_s must be > 0, got 0.0"),
    ({"sigma": -1.0}, "sigma must be > 0, got -1.0"),
]


@pytest.mark.parametrize(("fields", "match"), TOY, ids=[next(iter(f)) for f, _ in TOY])
def test_toy_config_refuses(fields: dict, match: str) -> None:
    from steer.toy.train import ToyConfig

    with pytest.raises(ValueError, match=match):
        ToyConfig(**fields)


# --------------------------------------------------------------------------------------------
# the command line: status 2, one line, no traceback
# --------------------------------------------------------------------------------------------
TINY = ["--config", "tiny_jpeg_tb", "model.num_inference_steps=2", "lora.rank=2",
        "train.steps=1", "log.num_eval_samples=2", "log.output_dir={tmp}/out"]  # fmt: skip
UNCOND = [*TINY, "model.pretrained=tiny-unconditional", "prompts.builtin=null"]

CLI = [
    (["finetune", "--config", "does/not/exist.yaml"],
     "steer finetune: error: config 'does/not/exist.yaml' is neither a file nor a preset; give"),
    (["finetune", "--config", "tiny_jpeg_tb", "trian.steps=3"],
     "steer finetune: error: unknown key 'trian' (in override 'trian.steps=3'); did you mean"),
    (["finetune", "--config", "tiny_jpeg_tb", "train.stesp=3"], "did you mean train.steps?"),
    (["finetune", "--config", "tiny_jpeg_tb", "train.lr=abc"],
     "steer finetune: error: train.lr='abc' has the wrong type"),
    (["finetune", "--config", "tiny_jpeg_tb", "lora.alpha=0"], "lora.alpha must be > 0, got 0.0"),
    (["finetune", "--config", "tiny_jpeg_tb", "train.steps"],
     "overrides must look like a.b=value, got ['train.steps']"),
    (["finetune", "--cnofig", "x"], "steer finetune: error: unrecognized arguments: --cnofig"),
    (["finetune", *TINY, "prompts.builtin=null", "prompts.file={tmp}/none.txt"],
     "steer finetune: error: prompts.file={tmp}/none.txt does not exist"),
    (["finetune", *UNCOND, "reward.name=nope"],
     "steer finetune: error: unknown reward 'nope'; registered rewards: "),
    (["finetune", *UNCOND, "reward.kwargs.qualty=3"],
     "steer finetune: error: unknown keyword argument(s) ['qualty'] for reward"),
    (["finetune", *TINY, "model.pretrained={tmp}"], "model_index.json is missing"),
    (["toy", "train", "--target", "nope"],
     "steer toy train: error: unknown target 'nope'; valid: gmm25"),
    (["toy", "train", "objective=rtb"], "objective rtb needs a prior: use target posterior9"),
    (["toy", "train", "hidden=0"], "steer toy train: error: hidden must be an integer >= 1"),
    (["toy", "train", "--target", "os:no_such_energy", "--dim", "2"],
     "cannot load user energy 'os:no_such_energy'"),
    (["toy", "train", "--out"], "steer toy train: error: argument --out: expected one argument"),
    (["toy", "eval", "{tmp}"], "steer toy eval: error: {tmp} has no config.yaml"),
    (["toy", "tarin"], "steer toy: error: argument action: invalid choice: 'tarin'"),
    (["exact", "seed=-1"], "steer exact: error: seed must be >= 0, got -1"),
    (["rewards", "--test-kwargs", "nope"], "steer rewards: error: unknown reward 'nope'"),
    (["finetun"], "steer: error: unknown command 'finetun'; did you mean finetune?"),
    (["posterior", "--num-samples", "1"], "steer posterior: error: --num-samples must be >= 2"),
    (["pretrain-digits", "--steps", "0"], "steer pretrain-digits: error: --steps must be >= 1"),
]  # fmt: skip


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("argv", "message"), CLI, ids=[" ".join(a)[:50] for a, _ in CLI])
def test_cli_bad_input_is_one_line_and_status_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    err = _one_line_exit_2(argv, capsys)
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert err.split(":")[0].startswith("steer")


def test_cli_resume_from_a_checkpoint_of_another_objective(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in UNCOND]
    assert cli.main(["finetune", *argv, "log.run_name=r"]) == 0  # one tb step, one checkpoint
    capsys.readouterr()
    resume = ["log.run_name=r", "log.resume_from_checkpoint=latest", "objective.name=rtb"]
    err = _one_line_exit_2(["finetune", *argv, *resume], capsys)
    assert err.startswith("steer finetune: error: checkpoint ")
    assert "objective.name: 'tb' -> 'rtb'" in err


def test_cli_toy_eval_of_truncated_weights(tmp_path: Path, capsys) -> None:
    from steer.toy.cli import save_run
    from steer.toy.sampler import DiffusionSampler, SamplerConfig
    from steer.toy.targets import gmm25
    from steer.toy.train import ToyConfig

    cfg = ToyConfig(steps=2, hidden=4, layers=1, langevin=False)
    save_run(tmp_path, cfg, DiffusionSampler(SamplerConfig(dim=2, steps=2, hidden=4)), gmm25())
    _truncate(tmp_path / "sampler.safetensors")
    err = _one_line_exit_2(["toy", "eval", str(tmp_path)], capsys)
    assert "sampler.safetensors cannot be read" in err and "train the run again" in err
    err = _one_line_exit_2(["toy", "eval", str(tmp_path), "--samples", "1"], capsys)
    assert "--samples must be >= 2" in err


def test_a_bug_during_training_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The line: set-up refusals are one line; an exception of a training round is not."""
    import steer.train.loop as loop

    def broken_round(run):
        raise ValueError("a bug inside a training round")

    monkeypatch.setattr(loop, "train_round", broken_round)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in UNCOND]
    with pytest.raises(ValueError, match="a bug inside a training round") as info:
        cli.main(["finetune", *argv])
    assert not is_input_error(info.value)
    assert "error:" not in capsys.readouterr().err


def test_steer_traceback_shows_the_traceback_of_bad_input(monkeypatch) -> None:
    monkeypatch.setenv("STEER_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="neither a file nor a preset") as info:
        cli.main(["finetune", "--config", "does/not/exist.yaml"])
    assert is_input_error(info.value)


def test_the_installed_command_prints_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("STEER_TRACEBACK", None)
    done = subprocess.run(
        [sys.executable, "-m", "steer.cli", "finetune", "--config", "does/not/exist.yaml"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("steer finetune: error: config 'does/not/exist.yaml'")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
