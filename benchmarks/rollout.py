"""Rollout with log-probs vs diffusers' own sampling; re-scoring one step vs a bare UNet pass.

Run: ``python -m benchmarks.rollout`` (writes the "rollout" section of benchmarks/README.md).
On a machine with CUDA it also measures an SD-1.5-sized UNet (random weights, bf16).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from benchmarks._report import hardware, markdown_table, write_section
from steer.diffusion import DiffusionPolicy, rollout
from steer.testing import tiny_ddim_scheduler, tiny_sd_components, tiny_sd_pipeline


def _median_time(fn: Callable[[], object], reps: int, sync: bool = False) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rescore_vs_bare(
    policy: DiffusionPolicy, x: torch.Tensor, cond: torch.Tensor, reps: int, sync: bool
) -> tuple[float, float]:
    """(re-score one step with grad + backward, bare guided UNet forward + backward) in seconds."""
    x_next = x + 0.1 * torch.randn_like(x)
    t = policy.schedule.timesteps[1].to(x.device)
    w = policy.guidance_scale

    def rescore() -> None:
        policy.unet.zero_grad(set_to_none=True)
        policy.log_prob(x, x_next, 1, cond).sum().backward()

    def bare() -> None:
        policy.unet.zero_grad(set_to_none=True)
        out = policy.unet(
            torch.cat([x, x]).to(policy.dtype),
            t,
            encoder_hidden_states=torch.cat([cond[:, 0], cond[:, 1]]),
        ).sample
        u, c = out.chunk(2)
        (u + w * (c - u)).float().square().sum().backward()

    return _median_time(rescore, reps, sync), _median_time(bare, reps, sync)


def cpu_rows(steps: int = 10, batch: int = 2, reps: int = 5) -> list[list[object]]:
    parts = tiny_sd_components()
    ref = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    ours = tiny_sd_pipeline()
    prompts = ["a photo of a cat"] * batch
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, eta=1.0, output_type="latent")
    t_ref, t_ours = [], []
    for _ in range(2):  # interleaved, so that load from other jobs hits both alike
        t_ref.append(_median_time(lambda: ref(prompts, **kw), reps))
        t_ours.append(
            _median_time(lambda: ours(prompts, return_trajectory=True, progress=False, **kw), reps)
        )
    t_ref, t_ours = min(t_ref), min(t_ours)
    policy = ours.policy(7.5, steps, 1.0)
    ours.unet.requires_grad_(True)
    cond = ours.prompt_cond(prompts, 7.5).detach()
    x = torch.randn(batch, *policy.sample_shape)
    t_rescore, t_bare = _rescore_vs_bare(policy, x, cond, reps * 2, sync=False)
    return [
        [
            "tiny SD, CPU",
            f"rollout + log-probs, {steps} steps, B={batch}",
            t_ours,
            t_ref,
            t_ours / t_ref,
            "≤ 1.05",
        ],
        [
            "tiny SD, CPU",
            "re-score 1 step with grad + backward",
            t_rescore,
            t_bare,
            t_rescore / t_bare,
            "≤ 1.1",
        ],
    ]


def gpu_rows(steps: int = 10, batch: int = 4, reps: int = 5) -> list[list[object]]:
    """An SD-1.5-sized UNet (random weights, bf16): rollout vs a plain DDIMScheduler loop."""
    device = torch.device("cuda")
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    unet = unet.to(device, torch.bfloat16)
    sched = tiny_ddim_scheduler()
    policy = DiffusionPolicy(unet, sched, guidance_scale=7.5, num_inference_steps=steps, eta=1.0)
    cond = torch.randn(batch, 2, 77, 768, device=device, dtype=torch.bfloat16)
    gen = torch.Generator(device).manual_seed(0)

    def ours() -> None:
        rollout(policy, cond=cond, generator=gen, keep_pred_x0=True)

    def plain() -> None:  # what diffusers' pipeline loop does for the UNet and scheduler
        with torch.no_grad():
            ref = tiny_ddim_scheduler()
            ref.set_timesteps(steps)
            x = torch.randn(batch, 4, 64, 64, device=device, generator=gen, dtype=torch.bfloat16)
            emb = torch.cat([cond[:, 0], cond[:, 1]])
            for t in ref.timesteps:
                u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
                x = ref.step(u + 7.5 * (c - u), t, x, eta=1.0, generator=gen).prev_sample

    t_ours, t_ref = _median_time(ours, reps, True), _median_time(plain, reps, True)
    x = torch.randn(batch, 4, 64, 64, device=device)
    unet.requires_grad_(True)
    t_rescore, t_bare = _rescore_vs_bare(policy, x, cond, reps, sync=True)
    name = f"SD-1.5-sized UNet, bf16, {torch.cuda.get_device_name(0)}"
    return [
        [
            name,
            f"rollout + log-probs, {steps} steps, B={batch}",
            t_ours,
            t_ref,
            t_ours / t_ref,
            "≤ 1.05",
        ],
        [
            name,
            "re-score 1 step with grad + backward",
            t_rescore,
            t_bare,
            t_rescore / t_bare,
            "≤ 1.1",
        ],
    ]


def main() -> str:
    torch.manual_seed(0)
    rows = cpu_rows()
    if torch.cuda.is_available():
        rows += gpu_rows()
    header = ["model", "measurement", "steer (s)", "reference (s)", "ratio", "target"]
    text = "\n".join(
        [
            "## rollout",
            "",
            "`python -m benchmarks.rollout`. Reference: diffusers'",
            "`StableDiffusionPipeline.__call__` (tiny model, same steps, batch, guidance,",
            "`output_type='latent'`) for the rollout; a bare",
            "guided UNet forward + backward for re-scoring. The GPU rows (only with CUDA) compare",
            "against a plain `DDIMScheduler.step` loop on the same UNet. Medians of a few runs;",
            "CPU timings are noisy when other jobs share the cores.",
            "",
            f"Hardware: {hardware()}",
            "",
            markdown_table(header, rows),
        ]
    )
    print(text)
    write_section("rollout", text)
    return text


if __name__ == "__main__":
    main()
