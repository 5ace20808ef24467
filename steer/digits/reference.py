"""The exact posterior of a fine-tuning config, by rejection from its prior (§7), cached.

``steer posterior [--config FILE] [a.b=value ...] [--num-samples N]`` builds the same prior,
sampler (steps, spacing, ``η``) and reward as ``steer finetune`` with that config, draws ``N``
exact samples of ``∝ p_prior(x) · exp(r(x) / β)`` (the reward must be a log-probability, so
``r / β ≤ 0``), and prints the acceptance rate and the Monte Carlo ``log Z`` with its standard
error. The draws are cached under the steer cache, keyed by the prior's and the reward's weights
and the sampler, so that the main job's report pays for them once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from steer.diffusion import DiffusionPolicy
from steer.diffusion.posterior import exact_posterior
from steer.digits.cache import cache_root, cached_folder
from steer.train.config import FinetuneConfig

SAMPLES_FILE, INFO_FILE = "samples.safetensors", "reference.json"


@dataclass(frozen=True)
class ReferenceSpec:
    """What the exact draws depend on, besides the weights (hashed separately)."""

    reward: str
    reward_kwargs: str  # JSON of the reward's keyword arguments
    beta: float
    num_inference_steps: int
    eta: float
    timesteps: tuple[int, ...]  # the sampler's actual timestep list (spacing included)
    num_samples: int
    seed: int


def weights_digest(*modules: nn.Module) -> str:
    """A short hash of the modules' non-adapter weights (the cache key of their outputs)."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            if "lora" in name:
                continue
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:12]


def spec_of(
    cfg: FinetuneConfig, prior: DiffusionPolicy, num_samples: int, seed: int, reward: object = None
) -> ReferenceSpec:
    """The reference's key for a config; a reward with resolved ``targets`` (the digits
    classifier) keys by them, so ``{}`` and ``{"target": 0}`` share one reference."""
    kwargs = {k: v for k, v in dict(cfg.reward.kwargs).items() if k != "cache_dir"}
    if getattr(reward, "targets", None) is not None:
        kwargs["target"] = [int(c) for c in reward.targets]
    return ReferenceSpec(
        reward=cfg.reward.name,
        reward_kwargs=json.dumps(kwargs, sort_keys=True),
        beta=float(cfg.objective.beta),
        num_inference_steps=prior.num_inference_steps,
        eta=prior.eta,
        timesteps=tuple(int(t) for t in prior.schedule.timesteps),
        num_samples=num_samples,
        seed=seed,
    )


def draw_reference(
    prior: DiffusionPolicy, log_reward, spec: ReferenceSpec, progress: bool = True
) -> tuple[Tensor, dict]:
    """``2 × num_samples`` exact draws ``[2N, C, H, W]`` (two independent sets of N: the second
    gives the distance's noise floor) and their facts (log Z, acceptance, seconds)."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(spec.seed)
    res = exact_posterior(prior, log_reward, 2 * spec.num_samples, generator=gen, progress=progress)
    info = {
        "log_z": res.log_z,
        "log_z_stderr": res.log_z_stderr,
        "acceptance_rate": res.acceptance_rate,
        "num_drawn": res.num_drawn,
        "num_accepted": res.num_accepted,
        "seconds": time.perf_counter() - start,
        "spec": asdict(spec),
    }
    return res.samples, info


def load_or_draw_reference(
    prior: DiffusionPolicy,
    reward: nn.Module,
    log_reward,
    spec: ReferenceSpec,
    cache_dir: str | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor, dict]:
    """The two exact sets ``(a, b)`` ``[N, C, H, W]`` and their facts, from the cache or drawn
    (``info["cached"]`` says which)."""
    blob = json.dumps(asdict(spec), sort_keys=True) + weights_digest(prior.unet, reward)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    folder = cache_root(cache_dir) / f"posterior_reference-{key}"
    drawn = []

    def check(path: Path) -> None:
        json.loads((path / INFO_FILE).read_text())
        load_file(str(path / SAMPLES_FILE))["samples"]

    def build(path: Path) -> None:
        samples, info = draw_reference(prior, log_reward, spec, progress)
        save_file({"samples": samples.contiguous()}, str(path / SAMPLES_FILE))
        (path / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        drawn.append(True)

    cached_folder(folder, "exact posterior reference", check, build)
    info = json.loads((folder / INFO_FILE).read_text())
    info["cached"] = not drawn
    samples = load_file(str(folder / SAMPLES_FILE))["samples"]
    n = spec.num_samples
    return samples[:n], samples[n : 2 * n], info


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="steer posterior", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="a YAML file or preset (default: digits_rtb)")
    p.add_argument("--num-samples", type=int, default=256, help="exact samples per set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the samples here (.safetensors)")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. reward.kwargs.target=3")
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``steer posterior``: exact samples of a config's posterior; prints log Z and acceptance."""
    from steer.config import input_phase
    from steer.train.cli import resolve_config
    from steer.train.config import load_config
    from steer.train.models import build_components
    from steer.train.sampling import score

    with input_phase():  # bad input: one line from the `steer` command (steer.config)
        args = _parse([] if argv is None else argv)
        if args.num_samples < 2:
            raise ValueError(f"--num-samples must be >= 2, got {args.num_samples}")
        cfg = load_config(resolve_config(args.config), args.overrides)
        parts = build_components(cfg, torch.device("cpu"))
        if parts.cond.prompts is not None:
            raise ValueError("steer posterior handles unconditional priors (the digits job) only")

    def log_reward(x0: Tensor) -> Tensor:
        return score(parts.reward, parts.decode(x0), None) / cfg.objective.beta

    spec = spec_of(cfg, parts.prior, args.num_samples, args.seed, parts.reward)
    a, b, info = load_or_draw_reference(
        parts.prior, parts.reward, log_reward, spec, cfg.model.cache_dir
    )
    print(
        f"exact posterior: {info['num_accepted']} accepted of {info['num_drawn']} prior draws "
        f"(rate {info['acceptance_rate']:.4f}); log Z = {info['log_z']:.4f} ± "
        f"{info['log_z_stderr']:.4f}{' (cached)' if info['cached'] else ''}"
    )
    if args.out:
        save_file({"a": a.contiguous(), "b": b.contiguous()}, args.out)
        print(f"samples: {args.out} (two independent sets of {args.num_samples})")
    return 0
