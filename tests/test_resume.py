"""Exact resume of every run kind, crash-safe checkpoints, processes that agree (CPU).

- Every fine-tuning objective, with and without replay buffer and exploration (GFlowNet ones),
  and the toy trainer: N steps straight == N/2 steps, a resume, N/2 steps; every tensor of the
  last checkpoint (weights, log Z, flow, optimiser, lr schedule, replay buffer, every RNG,
  curves) compared bitwise (float32, CPU).
- SIGKILL during a rollout, an optimiser step or a checkpoint write leaves the newest complete
  checkpoint loadable, and resuming from it gives the straight run bitwise; SIGTERM / SIGINT
  save and stop cleanly; pruning never deletes the only loadable checkpoint.
- Two processes: the same weights, different noise and prompts, an exact save and resume, and
  one rank's NaN reward stops both with the error (no hang: a bounded timeout).

The kill and signal tests fork the test process (warm imports: a fresh interpreter costs ~15 s
of imports on 2 cores) and signal the child; the two-process tests start ``accelerate launch``
with ``scripts/finetune.py``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tqdm import tqdm

import steer.rewards
from steer import checkpoints as ckpt
from steer.toy.targets import gmm25
from steer.toy.train import ToyConfig, train
from steer.train.config import load_config
from steer.train.loop import main

ROOT = Path(__file__).parents[1]
tqdm.monitor_interval = 0  # no tqdm monitor thread, whose lock a forked child could inherit held
GFLOWNETS = ["tb", "vargrad", "rtb", "db", "subtb"]
REPLAY = ("train.replay_buffer=3", "train.replay_per_batch=2", "train.exploration_scale=0.5",
          "train.grad_accum=2")  # fmt: skip
SCHEDULE = ("train.lr_schedule=cosine", "train.lr_warmup_steps=1")
CRASH = ("objective.name=tb", "train.steps=4", "log.checkpoint_every=1", *SCHEDULE, *REPLAY[:3])


def _cfg(tmp_path: Path, *overrides: str):
    base = [
        "model.pretrained=tiny", "model.num_inference_steps=2", "lora.rank=2", "lora.alpha=2",
        "reward.name=jpeg-compressibility", "prompts.builtin=simple-animals", "train.steps=1",
        "train.batch_size=2", "log.tracker=none", "log.num_eval_samples=2",
        f"log.output_dir={tmp_path}", "objective.beta=0.1",
    ]  # fmt: skip
    return load_config(None, base + list(overrides))


def checkpoint_files(path: Path) -> dict[str, Any]:
    """Every state file of a checkpoint, loaded (the config and manifest left out)."""
    out = {}
    for f in sorted(path.iterdir()):
        if f.suffix in (".bin", ".pkl", ".pt"):
            out[f.name] = torch.load(f, weights_only=False)
        elif f.suffix == ".safetensors":
            out[f.name] = load_file(str(f))
    assert out, f"{path} holds no state"
    return out


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ: tensors bit for bit (dtype, shape, bytes), NaN == NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape
        same = same and a.contiguous().view(-1).view(torch.uint8).equal(
            b.contiguous().view(-1).view(torch.uint8)
        )
        return [] if same else [where]
    if isinstance(a, np.ndarray):
        return [] if np.array_equal(a, b) else [where]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} != {b!r}"]


def assert_same_state(a: Path, b: Path) -> None:
    diffs = differences(checkpoint_files(a), checkpoint_files(b))
    assert not diffs, f"{a} and {b} differ at {diffs[:10]}"


# 1. exact resume of every run kind -----------------------------------------------------------

CASES = [(o, False) for o in [*GFLOWNETS, "ddpo", "dpok", "grpo"]] + [(o, True) for o in GFLOWNETS]


@pytest.mark.parametrize(
    ("objective", "replay"), CASES, ids=[f"{o}{'-replay' if r else ''}" for o, r in CASES]
)
def test_resume_is_bitwise_the_straight_run(tmp_path: Path, objective: str, replay: bool) -> None:
    """2 steps straight (checkpoint after each) == resume from checkpoint-1 + 1 step, tensor by
    tensor; replay runs also accumulate 2 rollouts per step (the accumulation counter)."""
    over = (f"objective.name={objective}", "train.steps=2", "log.checkpoint_every=1",
            "log.checkpoints_total_limit=3", *SCHEDULE, *(REPLAY if replay else ()),
            *(["objective.group_size=2"] if objective == "grpo" else []))  # fmt: skip
    straight = main(_cfg(tmp_path, "log.run_name=straight", *over))
    first = straight / "checkpoint-1"
    resumed = main(_cfg(tmp_path, "log.run_name=resumed", f"log.resume_from_checkpoint={first}",
                        *over))  # fmt: skip
    assert_same_state(straight / "checkpoint-2", resumed / "checkpoint-2")
    # the comparison can fail: a step changes the weights, the RNG and (replay) the buffer
    one, two = (checkpoint_files(straight / f"checkpoint-{k}") for k in (1, 2))
    changed = {d.split("/")[1] for d in differences(one, two)}
    assert {"custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"} <= changed
    if replay:
        assert "rank-0.safetensors" in changed
        assert one["rank-0.safetensors"]["replay.traj.latents"].shape[0] == 3  # 2 x 2 rows, FIFO 3
    lora = [load_file(str(d / "lora" / "pytorch_lora_weights.safetensors"))
            for d in (straight, resumed)]  # fmt: skip
    assert not differences(*lora)  # the final outputs too
    summary = [json.loads((d / "summary.json").read_text())["last"] for d in (straight, resumed)]
    assert summary[0] == summary[1]


@pytest.mark.parametrize(("objective", "buffer"), [("tb", "rank"), ("db", "uniform")])
def test_toy_resume_is_bitwise_the_straight_run(
    tmp_path: Path, objective: str, buffer: str
) -> None:
    """steer toy train: 6 iterations straight == 3, a resume, 3 (sampler with log Z and flow,
    Adam, buffer with rank priorities, MALA step, torch RNG); max_time_s never binds."""
    cfg = ToyConfig(objective=objective, steps=4, batch=16, hidden=16, layers=1, iterations=6,
                    eval_every=3, eval_samples=20, max_time_s=1e9, buffer=buffer, buffer_size=40,
                    local_search=True, ls_every=2, ls_steps=2, ls_batch=8, backward_every=2,
                    explore=0.3, langevin=objective == "tb", checkpoint_every=3,
                    checkpoints_total_limit=5)  # fmt: skip
    a = train(cfg, gmm25(), progress=False, checkpoint_dir=tmp_path / "a")
    first = tmp_path / "a" / "checkpoint-3"
    b = train(cfg, gmm25(), progress=False, checkpoint_dir=tmp_path / "b", resume_from=first)
    sa, sb = (checkpoint_files(d / "checkpoint-6")["state.pt"] for d in (tmp_path / "a",
              tmp_path / "b"))  # fmt: skip
    for s in (sa, sb):  # wall-clock values: the only ones that differ
        s.pop("elapsed_s")
        for h in s["history"]:
            h.pop("time_s")
    assert not differences(sa, sb), differences(sa, sb)[:10]
    assert not differences(a.sampler.state_dict(), b.sampler.state_dict())
    assert a.iterations == b.iterations == 6
    three = checkpoint_files(tmp_path / "a" / "checkpoint-3")["state.pt"]
    assert differences(three["sampler"], sa["sampler"]) and differences(three["rng"], sa["rng"])
    assert sa["buffer"]["x"].shape[0] > 16 and ("cdf" in sa["buffer"]) == (buffer == "rank")
    with pytest.raises(ValueError, match=r"differing fields: \['lr: 0.005 -> 0.001'\]"):
        train(replace(cfg, lr=1e-3, checkpoint_every=0), gmm25(), resume_from=first)


def test_toy_cli_checkpoints_and_resumes_latest(tmp_path: Path, capsys) -> None:
    """``steer toy train --out DIR checkpoint_every=...`` then ``--resume`` with more
    iterations (lr and exploration constant: the schedules then do not depend on
    ``iterations``) equals one straight run; a resume of another config is refused."""
    from steer.toy.cli import main as toy

    opts = ["steps=3", "batch=8", "hidden=8", "layers=1", "eval_every=100", "eval_samples=16",
            "max_time_s=null", "buffer=uniform", "buffer_size=32", "local_search=false",
            "explore=0", "lr_final=0.005", "checkpoint_every=2", "--no-progress"]  # fmt: skip
    assert toy(["train", "--out", str(tmp_path / "s"), "iterations=4", *opts]) == 0
    assert toy(["train", "--out", str(tmp_path / "r"), "iterations=2", *opts]) == 0
    assert toy(["train", "--out", str(tmp_path / "r"), "iterations=4", "--resume", *opts]) == 0
    assert "resumed from" in capsys.readouterr().out
    a, b = (load_file(str(tmp_path / d / "sampler.safetensors")) for d in ("s", "r"))
    assert not differences(a, b)
    with pytest.raises(SystemExit) as stop:  # a foreign checkpoint is bad input: one line
        toy(["train", "--out", str(tmp_path / "r"), "iterations=6", "objective=vargrad",
             "resume=true", *opts])  # fmt: skip
    assert stop.value.code == 2 and "objective: 'tb' -> 'vargrad'" in capsys.readouterr().err


class NanOnSecondCall(steer.rewards.Reward):
    """A test reward: minus the mean brightness, NaN on its second call (the second step)."""

    name = "test-nan-second-call"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def score(self, images, prompts):
        self.calls += 1
        return -images.mean(dim=(1, 2, 3)) * (float("nan") if self.calls == 2 else 1.0)


steer.rewards.register(NanOnSecondCall.name, NanOnSecondCall, differentiable=False, replace=True)


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_reward_models_nan_follows_on_nonfinite(tmp_path: Path, policy: str) -> None:
    """A reward model's own NonFiniteRewardError is a non-finite value like the others: skipped
    and counted, or saved and raised (through the same agreement as on several ranks)."""
    over = ("objective.name=tb", f"reward.name={NanOnSecondCall.name}", "train.steps=2",
            f"train.on_nonfinite={policy}", "log.run_name=r", "log.checkpoint_every=1")  # fmt: skip
    if policy == "skip":
        out = main(_cfg(tmp_path, *over))
        assert json.loads((out / "summary.json").read_text())["skipped_batches"] == 1
        return
    match = r"stopped at step 1: non-finite reward: reward 'test-nan-second-call' .*\(term: reward"
    with pytest.raises(RuntimeError, match=match):
        main(_cfg(tmp_path, *over))
    assert ckpt.verify(tmp_path / "r" / "checkpoint-1", deep=True) is None


# 2. crash safety ------------------------------------------------------------------------------


@contextmanager
def _one_thread():
    """torch on one thread, as the forked children run: bitwise equality needs the same
    reduction order (two threads sum differently in the last bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def straight4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-step run the interrupted ones must reproduce."""
    with _one_thread():
        return main(_cfg(tmp_path_factory.mktemp("straight"), "log.run_name=straight", *CRASH))


_CHILDREN: list[multiprocessing.Process] = []


@pytest.fixture(autouse=True)
def _no_child_left_behind():
    """Kill a forked run that a failed test left paused."""
    yield
    while _CHILDREN:
        proc = _CHILDREN.pop()
        if proc.is_alive():
            proc.kill()
            proc.join(10)


def _fork_main(cfg, env: dict[str, str], stdout: Path) -> multiprocessing.Process:
    """``main(cfg)`` in a forked child (imports already warm), its prints to ``stdout``."""

    def child() -> None:
        os.environ.update(env)
        torch.set_num_threads(1)
        sys.stdout = sys.stderr = open(stdout, "w", buffering=1)  # noqa: SIM115
        main(cfg)

    proc = multiprocessing.get_context("fork").Process(target=child, daemon=True)
    proc.start()
    _CHILDREN.append(proc)
    return proc


def _wait_for_pause(log: Path, point: str, alive, timeout: float = 240) -> None:
    """Until the child logs that it paused at ``point`` (``alive()``: it still runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and any(line.startswith(point) for line in log.read_text().splitlines()):
            return
        assert alive(), f"the run ended before pausing at {point}"
        time.sleep(0.05)
    raise AssertionError(f"no pause at {point} within {timeout} s")


def _pause_env(tmp_path: Path, spec: str) -> dict[str, str]:
    return {"STEER_TEST_PAUSE": spec, "STEER_TEST_PAUSE_LOG": str(tmp_path / "pauses.log")}


def _resume_and_compare(tmp_path: Path, straight4: Path, capsys) -> str:
    """Resume ``tmp_path/r`` from ``latest`` to step 4; its last checkpoint == the straight
    run's; returns what the resume printed."""
    capsys.readouterr()
    with _one_thread():
        out = main(_cfg(tmp_path, "log.run_name=r", "log.resume_from_checkpoint=latest", *CRASH))
    printed = capsys.readouterr().out
    assert_same_state(straight4 / "checkpoint-4", out / "checkpoint-4")
    assert not list(out.glob("*.partial")), "the next save removes interrupted ones"
    return printed


@pytest.mark.parametrize("point", ["rollout", "optimizer_step", "save"])
def test_sigkill_leaves_the_newest_complete_checkpoint(
    tmp_path: Path, straight4: Path, point: str, capsys
) -> None:
    """kill -9 during step 3 (its rollout, its optimiser step, the write of checkpoint-3):
    checkpoints 1 and 2 stay complete, no half-written one has a final name, and the resumed
    run is bitwise the straight one."""
    env = _pause_env(tmp_path, f"{point}@3:300")
    proc = _fork_main(_cfg(tmp_path, "log.run_name=r", *CRASH), env, tmp_path / "child.out")
    _wait_for_pause(tmp_path / "pauses.log", f"{point} 3", proc.is_alive)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    run = tmp_path / "r"
    names = sorted(p.name for p in run.glob("checkpoint-*"))
    partial = ["checkpoint-3.partial"] if point == "save" else []
    assert names == ["checkpoint-1", "checkpoint-2", *partial]  # limit 2
    assert all(ckpt.verify(run / n, deep=True) is None for n in names[:2])
    if partial:
        assert ckpt.verify(run / partial[0]) is not None  # written, never published
    printed = _resume_and_compare(tmp_path, straight4, capsys)
    assert "checkpoint-2 at step 2" in printed
    if partial:
        assert f"ignoring {run / partial[0]}: an interrupted save" in printed


def test_sigint_during_a_save_finishes_it_and_stops(tmp_path: Path, straight4: Path, capsys):
    """SIGINT while checkpoint-2 is written: the save completes, the run stops cleanly after
    that step (no second save, no final outputs), and resumes bitwise."""
    proc = _fork_main(_cfg(tmp_path, "log.run_name=r", *CRASH),
                      _pause_env(tmp_path, "save@2:5"), tmp_path / "child.out")  # fmt: skip
    _wait_for_pause(tmp_path / "pauses.log", "save 2", proc.is_alive)
    os.kill(proc.pid, signal.SIGINT)
    proc.join(120)
    printed = (tmp_path / "child.out").read_text()
    assert proc.exitcode == 0, printed[-2000:]
    run = tmp_path / "r"
    assert f"signal {int(signal.SIGINT)}: saved {run / 'checkpoint-2'} and stopped" in printed
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (run / "summary.json").exists()
    _resume_and_compare(tmp_path, straight4, capsys)


def test_sigterm_during_a_rollout_saves_and_stops(tmp_path: Path, straight4: Path, capsys):
    """SIGTERM during the rollout of step 3: the run finishes that step, saves checkpoint-3,
    exits 0 without final outputs; the resume is bitwise the straight run."""
    proc = _fork_main(_cfg(tmp_path, "log.run_name=r", *CRASH),
                      _pause_env(tmp_path, "rollout@3:5"), tmp_path / "child.out")  # fmt: skip
    _wait_for_pause(tmp_path / "pauses.log", "rollout 3", proc.is_alive)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(120)
    printed = (tmp_path / "child.out").read_text()
    assert proc.exitcode == 0, printed[-2000:]
    run = tmp_path / "r"
    assert f"signal {int(signal.SIGTERM)}: saved {run / 'checkpoint-3'} and stopped" in printed
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert ckpt.verify(run / "checkpoint-3", deep=True) is None
    assert not (run / "summary.json").exists()
    _resume_and_compare(tmp_path, straight4, capsys)


def _fake_checkpoint(root: Path, step: int) -> Path:
    partial = ckpt.begin(root, step)
    (partial / "state.bin").write_bytes(bytes(range(step, step + 64)))
    ckpt.write_manifest(partial, {"step": step})
    return ckpt.publish(partial)


def test_prune_never_deletes_the_only_loadable_checkpoint(tmp_path: Path) -> None:
    """Damaged newer checkpoints (truncated, or same size with other bytes) do not count toward
    the limit: the only complete one survives, and latest finds it; once a newer complete one
    exists, the older ones go."""
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-3" / "state.bin").write_bytes(b"truncated")
    (tmp_path / "checkpoint-2" / "state.bin").write_bytes(bytes(64))  # same size, other bytes
    reports: list[str] = []
    assert ckpt.prune(tmp_path, limit=1, report=reports.append) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{k}" for k in (1, 2, 3)]
    assert "checkpoint-3" in reports[0] and "has 9 bytes" in reports[0]
    assert "checkpoint-2" in reports[1] and "does not match its SHA-256" in reports[1]
    reports.clear()
    assert ckpt.latest(tmp_path, report=reports.append) == tmp_path / "checkpoint-1"
    assert len(reports) == 2  # both damaged ones skipped, and said so
    _fake_checkpoint(tmp_path, 4)
    ckpt.prune(tmp_path, limit=1, report=reports.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_interrupted_saves_and_replacements(tmp_path: Path) -> None:
    """A .partial is ignored and reported by latest and removed by the next prune; a
    replacement interrupted between its two renames leaves the old one found."""
    _fake_checkpoint(tmp_path, 1)
    partial = ckpt.begin(tmp_path, 2)
    (partial / "state.bin").write_bytes(b"half")
    reports: list[str] = []
    assert ckpt.latest(tmp_path, report=reports.append) == tmp_path / "checkpoint-1"
    assert reports == [f"ignoring {partial}: an interrupted save, not a checkpoint"]
    (tmp_path / "checkpoint-1").rename(tmp_path / "checkpoint-1.replaced")  # killed mid-publish
    assert ckpt.latest(tmp_path, report=reports.append) == tmp_path / "checkpoint-1.replaced"
    _fake_checkpoint(tmp_path, 1)  # the replacement published
    ckpt.prune(tmp_path, limit=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert ckpt.verify(tmp_path / "checkpoint-1", deep=True) is None


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path: Path, capsys) -> None:
    """Through the loop: checkpoint-3 damaged; a resume from checkpoint-1 with limit 1 prunes
    1, never 2 (the only loadable one); latest then skips 3 (reported) and resumes from 2."""
    over = ("objective.name=tb", "log.run_name=r", "log.checkpoint_every=1")
    run = main(_cfg(tmp_path, *over, "train.steps=3", "log.checkpoints_total_limit=3"))
    with open(run / "checkpoint-3" / "optimizer.bin", "r+b") as f:
        f.truncate(10)
    main(_cfg(tmp_path, *over, "train.steps=2", "log.checkpoints_total_limit=1",
              f"log.resume_from_checkpoint={run / 'checkpoint-1'}"))  # fmt: skip
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert ckpt.verify(run / "checkpoint-2", deep=True) is None
    assert ckpt.verify(run / "checkpoint-3") is not None
    capsys.readouterr()
    main(_cfg(tmp_path, *over, "train.steps=3", "log.resume_from_checkpoint=latest"))
    printed = capsys.readouterr().out
    assert f"skipping {run / 'checkpoint-3'}: optimizer.bin has 10 bytes" in printed
    assert "checkpoint-2 at step 2" in printed
    assert ckpt.verify(run / "checkpoint-3", deep=True) is None  # replaced by a complete one
    fake = tmp_path / "copied-by-hand"
    fake.mkdir()
    (fake / "config.yaml").write_text((run / "checkpoint-2" / "config.yaml").read_text())
    with pytest.raises(ValueError, match="is not a complete checkpoint: no manifest.json"):
        main(_cfg(tmp_path, *over, f"log.resume_from_checkpoint={fake}"))


# 3. processes that agree ---------------------------------------------------------------------


def _launch(script: Path, tmp_path: Path, *overrides: str, timeout: float = 300):
    """``accelerate launch`` with two CPU processes (``--cpu`` alone would start one)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(script), "--config", str(ROOT / "configs" / "tiny_jpeg_tb.yaml"),
           "model.num_inference_steps=2", f"log.output_dir={tmp_path}", "log.num_eval_samples=2",
           "log.checkpoint_every=1", *overrides]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_agree_and_resume_exactly(tmp_path: Path) -> None:
    """Two ranks: identical weights after 2 steps (per-rank digests and checksums), different
    noise, prompts and buffers; resuming from checkpoint-1 with two processes is bitwise."""
    script = ROOT / "scripts" / "finetune.py"
    over = ("train.steps=2", *REPLAY[:3], *SCHEDULE)
    done = _launch(script, tmp_path, "log.run_name=a", *over)
    assert done.returncode == 0, done.stderr[-3000:]
    a = tmp_path / "a"
    report = json.loads((a / "processes.json").read_text())
    assert report["world_size"] == 2
    assert report["weights_checksum"][0] == report["weights_checksum"][1]
    assert report["first_noise_checksum"][0] != report["first_noise_checksum"][1]
    ranks = [load_file(str(a / "checkpoint-2" / f"rank-{r}.safetensors")) for r in (0, 1)]
    assert torch.equal(ranks[0]["weights_sha256"], ranks[1]["weights_sha256"])
    for key in ("generator", "replay.traj.latents", "replay.prompt_index"):
        assert not torch.equal(ranks[0][key], ranks[1][key]), key  # each rank its own draws
    assert ckpt.read_manifest(a / "checkpoint-2")["world_size"] == 2
    done = _launch(script, tmp_path, "log.run_name=b", *over,
                   f"log.resume_from_checkpoint={a / 'checkpoint-1'}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_state(a / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    assert json.loads((tmp_path / "b" / "processes.json").read_text()) == report


@pytest.mark.slow
def test_one_rank_failing_stops_both(tmp_path: Path) -> None:
    """NaN samples on rank 1 only (ddpo: its advantages gather rewards across ranks): both ranks
    raise the same error, naming rank 1, after the checkpoint of the last good step, within a
    bounded ``timeout`` (before the ranks agreed, rank 1 saved while rank 0 waited in the
    gather: the run hung)."""
    done = _launch(ROOT / "tests" / "nan_on_rank1.py", tmp_path, "log.run_name=nan",
                   "objective.name=ddpo", "train.steps=3", timeout=240)  # fmt: skip
    assert done.returncode != 0
    text = done.stdout + done.stderr
    message = "RuntimeError: stopped at step 1: rank 1: non-finite sample (policy output)"
    assert text.count(message) >= 2, text[-4000:]  # raised on both ranks
    assert "(term: sample (policy output)); saved" in text
    assert ckpt.verify(tmp_path / "nan" / "checkpoint-1", deep=True) is None
    assert not (tmp_path / "nan" / "checkpoint-2").exists()
