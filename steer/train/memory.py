"""Memory a fine-tuning run needs, estimated before any weights load, and the refusal of a run
that would not fit (an estimate and the options that reduce it, instead of an out-of-memory kill).

The estimate adds, per process:

* weights: every model component in float32 (parameters counted from the architecture's configs
  on the ``meta`` device: ``steer.pipelines.architectures``), the frozen copy of the denoiser
  under full fine-tuning, and the reward model;
* the trained weights: their values, gradients and AdamW's two moments (16 bytes a parameter;
  LoRA adapters are about 0.19% of the denoiser at rank 8);
* activations of one re-scored transition with its backward (the trainer back-propagates one
  transition at a time): the bytes its autograd graph keeps, per sample and latent pixel, per
  family, with and without gradient checkpointing (counted at real size by
  ``python -m benchmarks.real_size --activations``; with checkpointing the recomputation of one
  block during the backward comes on top and is not counted), halved under bf16 / fp16
  autocast, times the samples of one denoiser call (``batch_size``, twice under guidance);
* one VAE decode of a batch without gradients (the rollout's images, db's x̂ a batch at a time);
* the runtime (torch, the libraries, the rollout's tensors): 1.5 GiB.

It is an estimate; benchmarks/README.md's real-size table sets it beside the measured peaks.
``model.check_memory=false`` runs anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from steer.train.config import FinetuneConfig

GIB = 2**30
FLOAT32 = 4
ADAMW = 16  # value, gradient, two moments (float32)
LORA_FRACTION_RANK8 = 0.00186  # SD 1.5: 1.59 M adapter weights of the 860 M UNet at rank 8
RUNTIME = 3 * GIB // 2
# bytes the autograd graph of one re-scored transition keeps for its backward, per sample and
# latent pixel, float32, (without, with) gradient checkpointing: the saved tensors of one denoiser
# step at 32x32 latents, counted by `python -m benchmarks.real_size --activations`
ACTIVATIONS = {
    "sd": (4.06e05, 8.33e04),
    "sdxl": (7.74e05, 1.05e05),
    "sd3": (9.62e05, 8.64e04),
}
# one VAE decode without gradients, float32: about four 128-channel maps at the image's full
# resolution alive at once, per image pixel (the rewards' images are decoded
# model.decode_batch_size at a time: steer.train.sampling.decode_in_chunks)
DECODE = 4 * 128 * 4
# parameters of the reward models steer builds (counted on the meta device)
REWARD_PARAMETERS = {
    "aesthetic": 427_616_513,  # open_clip ViT-L-14 (+ a 0.9 M MLP)
    "clip-score": 427_616_513,
    "hpsv2": 986_109_441,  # open_clip ViT-H-14
    "pickscore": 986_109_441,
    "imagereward": 446_206_689,  # BLIP ViT-L + BERT-base cross-attention + MLP
}


@dataclass
class Estimate:
    """Bytes per process, by part."""

    weights: int
    reward: int
    trained: int
    activations: int
    decode: int
    runtime: int = RUNTIME

    @property
    def total(self) -> int:
        return (
            self.weights + self.reward + self.trained + self.activations + self.decode
            + self.runtime
        )  # fmt: skip

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {getattr(self, name) / GIB:.1f}"
            for name in ("weights", "reward", "trained", "activations", "decode", "runtime")
        )
        return f"{self.total / GIB:.1f} GiB ({parts})"


NATIVE_SIDE = {"sd": 64, "sdxl": 128, "sd3": 128}  # latent sides of the published configs
VAE_SCALE = 8  # image pixels per latent pixel (every family's VAE)


def _family(counts: dict[str, int]) -> str:
    if "transformer" in counts:
        return "sd3"
    return "sdxl" if "text_encoder_2" in counts else "sd"


def parameter_counts(cfg: FinetuneConfig) -> dict[str, int] | None:
    """Parameters per component of the run's model without loading it: a published
    architecture (or random weights of one), a local diffusers folder; None when unknown."""
    from steer.pipelines.architectures import (
        architecture,
        folder_parameter_counts,
        parameter_counts,
    )

    m = cfg.model
    skip = [k for k, v in m.load_kwargs.items() if v is None]
    folder = Path(m.pretrained).expanduser()
    if (folder / "model_index.json").is_file():
        return folder_parameter_counts(folder, skip)
    try:
        arch = architecture(m.pretrained)
    except ValueError:
        return None  # a built-in model or an unknown hub id: not estimated
    if m.random_weights:  # what random weights leave out (SD3's T5)
        skip += arch.not_offline
    return parameter_counts(arch, skip)


def estimate(cfg: FinetuneConfig, counts: dict[str, int]) -> Estimate:
    """The memory of ``cfg`` on one process, given its components' parameter counts."""
    m = cfg.model
    denoiser = counts.get("transformer", counts.get("unet", 0))
    family = _family(counts)
    if cfg.lora.enabled:
        trained = int(denoiser * LORA_FRACTION_RANK8 * cfg.lora.rank / 8) * ADAMW
        frozen_copy = 0
    else:
        trained, frozen_copy = denoiser * ADAMW, denoiser * FLOAT32
    weights = sum(counts.values()) * FLOAT32 + frozen_copy
    reward = REWARD_PARAMETERS.get(cfg.reward.name, 0) * FLOAT32
    side = m.sample_size
    if side is None:  # the model's own latent size
        side = NATIVE_SIDE[family]
    per_pixel = ACTIVATIONS[family][1 if m.gradient_checkpointing else 0]
    if cfg.train.mixed_precision in ("bf16", "fp16"):
        per_pixel /= 2
    samples = cfg.train.batch_size * (2 if m.guidance_scale != 1.0 else 1)
    activations = int(per_pixel * side * side * samples)
    decode = DECODE * (m.decode_batch_size or cfg.train.batch_size) * (side * VAE_SCALE) ** 2
    return Estimate(weights, reward, trained, activations, decode)


def available_bytes(device: torch.device, processes: int) -> int:
    """Free memory for one process: the GPU's free memory, or the host's available memory
    shared by the processes of this machine."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info.get("MemFree", 0)) // max(1, processes)


def _options(cfg: FinetuneConfig, counts: dict[str, int], now: Estimate) -> list[str]:
    """The options that reduce the estimate, each with what it would save."""
    out = []

    def saving(label: str, changed: FinetuneConfig) -> None:
        gain = now.total - estimate(changed, counts).total
        if gain > 0.05 * GIB:
            out.append(f"{label} (-{gain / GIB:.1f} GiB)")

    m, t = cfg.model, cfg.train
    if not cfg.lora.enabled:
        saving("lora.enabled=true", replace(cfg, lora=replace(cfg.lora, enabled=True)))
    if not m.gradient_checkpointing:
        saving("model.gradient_checkpointing=true",
               replace(cfg, model=replace(m, gradient_checkpointing=True)))  # fmt: skip
    if t.mixed_precision == "no":
        saving(
            "train.mixed_precision=bf16 (GPU)",
            replace(cfg, train=replace(t, mixed_precision="bf16")),
        )
    if t.batch_size > 1:
        smaller = max(1, t.batch_size // 2)
        accum = t.grad_accum * t.batch_size // smaller
        saving(f"train.batch_size={smaller} with train.grad_accum={accum}",
               replace(cfg, train=replace(t, batch_size=smaller)))  # fmt: skip
    decoded = m.decode_batch_size or t.batch_size
    if decoded > 1:
        saving(f"model.decode_batch_size={decoded // 2}",
               replace(cfg, model=replace(m, decode_batch_size=decoded // 2)))  # fmt: skip
    side = m.sample_size
    if side is None or side > 16:
        half = (side or NATIVE_SIDE[_family(counts)]) // 2
        saving(f"model.sample_size={half}", replace(cfg, model=replace(m, sample_size=half)))
    if counts.get("text_encoder_3"):
        out.append(
            f"model.load_kwargs={{text_encoder_3: null, tokenizer_3: null}} (SD3 without T5, "
            f"-{counts['text_encoder_3'] * FLOAT32 / GIB:.1f} GiB)"
        )
    return out


class InsufficientMemory(ValueError):
    """The run's estimated memory exceeds what the device has free (raised before loading)."""


def check_fits(cfg: FinetuneConfig, device: torch.device, processes: int = 1) -> Estimate | None:
    """Refuse, before loading, a run whose estimate exceeds the free memory (or
    ``model.memory_limit_gb``); returns the estimate (None when the model is not known)."""
    if not cfg.model.check_memory:
        return None
    counts = parameter_counts(cfg)
    if not counts or "vae" not in counts:  # the figures are those of latent text-to-image models
        return None
    need = estimate(cfg, counts)
    limit = cfg.model.memory_limit_gb
    have = int(limit * GIB) if limit is not None else available_bytes(device, processes)
    if need.total > have:
        where = (
            f"model.memory_limit_gb={limit}"
            if limit is not None
            else (f"{device.type}, {processes} process(es)")
        )
        options = _options(cfg, counts, need)
        raise InsufficientMemory(
            f"{cfg.model.pretrained} needs about {need.describe()} per process, "
            f"{have / GIB:.1f} GiB free ({where}); reduce it with "
            + ("; ".join(options) if options else "a smaller model")
            + "; or model.check_memory=false to try anyway"
        )
    return need
