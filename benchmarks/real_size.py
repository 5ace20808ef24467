"""One LoRA training step of each model family at its published architecture (random weights).

Run: ``python -m benchmarks.real_size`` (CPU; writes the "real-size" section of
benchmarks/README.md). Each measurement runs in its own process (a fresh peak memory, and one
accelerate precision per process): ``steer.pipelines.architectures`` builds the model offline
with random weights at its real size (SD 1.5 UNet 860 M, SDXL UNet 2.6 B, SD3-medium transformer
2.0 B, with their VAEs and text encoders; SD3 without T5), the aesthetic reward is a random CLIP
ViT-L/14 with its MLP, and the trainer runs one optimiser step (rollout, reward, rtb's prior /
db's x̂ rewards, re-scoring with backward, AdamW). Reported: the step's seconds, the process's peak
memory (RSS on CPU; allocated on CUDA), and the ratio of the step to one bare forward + backward
of the denoiser at the same latent size (the policy's step mean, summed, back-propagated to the
LoRA weights).

``benchmarks.gpu`` runs the same measurement at the families' real latent sizes in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

FAMILIES = {  # family -> (model.pretrained, its real latent side)
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", 64),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 128),
    "sd3-medium": ("stabilityai/stable-diffusion-3-medium-diffusers", 128),
}
TINY = {"sd15": "tiny", "sdxl": "tiny-sdxl", "sd3-medium": "tiny-sd3"}  # reduced-size stand-ins


@dataclass
class Case:
    family: str
    objective: str
    checkpointing: bool
    sample_size: int
    steps: int = 4  # K
    batch: int = 1
    device: str = "cpu"
    precision: str = "no"
    reduced: bool = False  # the tiny stand-in of the family (tests, CI)


def overrides(case: Case, out: str) -> list[str]:
    """The ``steer finetune`` overrides of one case."""
    model = TINY[case.family] if case.reduced else FAMILIES[case.family][0]
    skip = ["model.load_kwargs={text_encoder_3: null, tokenizer_3: null}"]
    return [
        f"model.pretrained={model}",
        f"model.random_weights={not case.reduced}",
        f"model.sample_size={case.sample_size}",
        f"model.num_inference_steps={case.steps}",
        "model.guidance_scale=1.0",
        f"model.gradient_checkpointing={case.checkpointing}",
        *(skip if case.family.startswith("sd3") and not case.reduced else []),
        f"objective.name={case.objective}",
        "objective.train_fraction=0.5",
        "objective.beta=0.1",
        "reward.name=jpeg-compressibility" if case.reduced else "reward.name=aesthetic",
        "prompts.builtin=simple-animals",
        f"train.batch_size={case.batch}",
        f"train.mixed_precision={case.precision}",
        "log.tracker=none",
        f"log.output_dir={out}",
    ]


def _peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def measure(case: Case) -> dict[str, float]:
    """Build the run, take one optimiser step, time a bare forward + backward (in this process)."""
    import torch

    from steer.train.config import load_config
    from steer.train.loop import setup
    from steer.train.run import sample, sync_and_step, train_on_batch

    def sync() -> None:
        if case.device.startswith("cuda"):
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, overrides(case, out))
        t0 = time.perf_counter()
        run = setup(cfg)
        built = time.perf_counter() - t0
        if case.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        policy = run.parts.policy
        params = sum(p.numel() for n, p in policy.denoiser.named_parameters() if "lora" not in n)
        sync()
        t0 = time.perf_counter()
        batch = sample(run)
        train_on_batch(run, batch)
        sync_and_step(run)
        sync()
        step = time.perf_counter() - t0
        # the bare pass: one denoiser forward (the policy's step mean at the first, always
        # stochastic, step) and its backward
        x = batch.traj.latents[:, 0].detach()
        embeds = None
        if batch.prompt_index is not None:
            embeds = run.parts.cond.embeds[batch.prompt_index]
        bare = []
        for _ in range(2):
            sync()
            t1 = time.perf_counter()
            with run.accelerator.autocast():
                out_ = policy.step(x, 0, embeds, noise=torch.zeros_like(x))
            out_.mean.float().sum().backward()
            sync()
            bare.append(time.perf_counter() - t1)
            run.optimizer.zero_grad(set_to_none=True)
        peak = _peak_bytes(case.device)
    return {
        "parameters": params,
        "build_s": built,
        "step_s": step,
        "bare_s": min(bare),
        "peak_gib": peak / 2**30,
    }


def saved_bytes(case: Case) -> dict[str, float]:
    """Bytes the autograd graph of one re-scored transition keeps for its backward (activations,
    counted by a saved-tensors hook, each storage once, the weights excluded), per sample and
    latent pixel: the figure ``steer.train.memory.ACTIVATIONS`` holds."""
    import torch

    from steer.train.config import load_config
    from steer.train.loop import setup

    with tempfile.TemporaryDirectory() as out:
        run = setup(load_config(None, overrides(case, out)))
        policy = run.parts.policy
        weights = {p.untyped_storage().data_ptr() for p in policy.denoiser.parameters()}
        c, h, w = policy.sample_shape
        x = torch.randn(case.batch, c, h, w, device=policy.device)
        cond = run.parts.cond.embeds
        embeds = None if cond is None else cond[:1].expand(case.batch, *cond.shape[1:])
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with run.accelerator.autocast():
                step = policy.step(x, 0, embeds, noise=torch.zeros_like(x))
        step.mean.float().sum().backward()
    total = sum(kept.values())
    return {"saved_gib": total / 2**30, "per_pixel": total / (case.batch * h * w)}


def run_case(
    case: Case, timeout: float | None = None, mode: str = "--child"
) -> dict[str, float | str]:
    """``measure(case)`` (or ``saved_bytes``) in a fresh process; a failure (e.g. out of
    memory) is reported as such."""
    cmd = [sys.executable, "-m", "benchmarks.real_size", mode, json.dumps(asdict(case))]
    env = dict(os.environ, TQDM_DISABLE="1")
    if case.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"  # the CPU even where a GPU is present
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
    if done.returncode in (-9, 137):
        tail = ["killed (out of memory)"]
    return {"error": tail[0][:160]}


def estimated_gib(case: Case) -> float | str:
    """``steer.train.memory``'s estimate of the case, before anything loads."""
    from steer.train.config import load_config
    from steer.train.memory import estimate, parameter_counts

    cfg = load_config(None, overrides(case, tempfile.gettempdir()))
    counts = parameter_counts(cfg)
    return "–" if counts is None else estimate(cfg, counts).total / 2**30


HEADER = [
    "family",
    "denoiser parameters",
    "latent",
    "steps K (trained)",
    "batch",
    "objective",
    "peak memory, no ckpt (GiB)",
    "estimated",
    "peak memory, ckpt (GiB)",
    "estimated",
    "s/step, no ckpt",
    "s/step, ckpt",
    "step / bare fwd+bwd (no ckpt)",
]


def table(cases: list[Case], results: list[dict]) -> tuple[str, list[list]]:
    """One row per (family, objective): with and without checkpointing side by side."""
    by = {
        (c.family, c.objective, c.checkpointing): (c, r)
        for c, r in zip(cases, results, strict=True)
    }
    rows = []
    for family, objective in dict.fromkeys((c.family, c.objective) for c in cases):
        (c, off), (_, on) = by[(family, objective, False)], by[(family, objective, True)]

        def get(r: dict, key: str) -> object:
            return r.get(key, r.get("error", "?"))

        ratio = off["step_s"] / off["bare_s"] if "step_s" in off else get(off, "step_s")
        params = get(off, "parameters") if "parameters" in off else get(on, "parameters")
        rows.append([
            family, f"{params / 1e6:.0f} M" if isinstance(params, int) else params,
            f"{c.sample_size}×{c.sample_size}", f"{c.steps} ({round(c.steps * 0.5)})", c.batch,
            objective, get(off, "peak_gib"), estimated_gib(c), get(on, "peak_gib"),
            estimated_gib(by[(family, objective, True)][0]), get(off, "step_s"),
            get(on, "step_s"), ratio,
        ])  # fmt: skip
    from benchmarks._report import markdown_table

    return markdown_table(HEADER, rows), rows


def cases_for(
    families: list[str], objectives: list[str], sample_size: int | None, **kw: object
) -> list[Case]:
    return [
        Case(f, o, ckpt, sample_size or FAMILIES[f][1], **kw)  # type: ignore[arg-type]
        for f in families
        for o in objectives
        for ckpt in (False, True)
    ]


def activations_section(rows: list[list], side: int) -> str:
    from benchmarks._report import hardware, markdown_table

    header = ["family", "bytes / (sample · latent pixel), no ckpt", "with ckpt",
              f"GiB at {side}×{side}, batch 1, no ckpt", "with ckpt"]  # fmt: skip
    return (
        "## real-size-activations\n\n`python -m benchmarks.real_size --activations`: the "
        "tensors the autograd graph of one re-scored transition keeps for its backward (a "
        "saved-tensors hook, each storage once, the weights left out), one denoiser call of "
        f"the policy at {side}×{side} latents, float32, random weights at the published "
        "architecture. These per-pixel figures are `steer.train.memory.ACTIVATIONS`, from "
        "which a run's memory is estimated before it loads.\n\n"
        f"Hardware: {hardware()}\n\n{markdown_table(header, rows)}\n"
    )


def main(argv: list[str] | None = None) -> None:
    from benchmarks._report import hardware, write_section

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--objectives", nargs="+", default=["rtb", "db"])
    ap.add_argument("--sample-size", type=int, default=32, help="latent side (default 32)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--activations",
        action="store_true",
        help="measure the activations a re-scored transition keeps, per family",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-activations", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child or args.child_activations:
        fn = measure if args.child else saved_bytes
        result = fn(Case(**json.loads(args.child or args.child_activations)))
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.activations:
        rows = []
        for family in args.families:
            found = [
                run_case(Case(family, "rtb", ckpt, args.sample_size), mode="--child-activations")
                for ckpt in (False, True)
            ]
            print(family, found, flush=True)
            rows.append([family, *(r.get("per_pixel", r.get("error")) for r in found),
                         *(r.get("saved_gib", "?") for r in found)])  # fmt: skip
        body = activations_section(rows, args.sample_size)
        print(body)
        if not args.no_write:
            write_section("real-size-activations", body)
        return
    cases = cases_for(args.families, args.objectives, args.sample_size, steps=args.steps)
    results = []
    for case in cases:
        t0 = time.perf_counter()
        results.append(run_case(case))
        print(f"{case}: {results[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    text, _ = table(cases, results)
    body = (
        "## real-size\n\n`python -m benchmarks.real_size`: one LoRA optimiser step (rank 8 on "
        "the attention projections) of each family at its published architecture with random "
        "weights (`model.random_weights=true`), float32 on this CPU, batch 1, no guidance, "
        f"latents {args.sample_size}×{args.sample_size} (256² images), K = {args.steps} steps "
        "with half of them re-scored, the aesthetic reward (random CLIP ViT-L/14 + MLP); SD3 "
        "without its T5 encoder. Each cell is its own process; peak memory is the process's "
        "peak RSS, which includes the weights of every component (denoiser, VAE, text "
        "encoders, reward). 'bare fwd+bwd' is one denoiser forward and backward at the same "
        "latent size; 'estimated' is the memory `steer.train.memory` estimates for the run "
        "before anything loads (the run refuses to start above the free memory).\n\n"
        f"Hardware: {hardware()}\n\n{text}\n"
    )
    print(body)
    if not args.no_write:
        write_section("real-size", body)


if __name__ == "__main__":
    main()
