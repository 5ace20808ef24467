"""Build the run's components from its config: policy, frozen prior, reward, decoder, prompts."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from steer.diffusion import (
    SCHEDULERS,
    DiffusionPolicy,
    ModelFamily,
    add_lora,
    denoiser_of,
    family_of,
    make_policy,
    require_frozen,
    scheduler_from_config,
)
from steer.images import to_unit
from steer.train.config import FinetuneConfig, ModelConfig
from steer.train.modules import FlowNetwork, LogZNetwork, LogZTable
from steer.train.prompts import load_prompts
from steer.train.sampling import Conditioning, Decode

MAX_LOG_Z_TABLE = 256  # larger prompt sets get a log Z network of the pooled embedding


@dataclass
class Components:
    policy: DiffusionPolicy
    prior: DiffusionPolicy | None
    reward: Any
    decode: Decode
    cond: Conditioning
    pipeline: Any  # the loaded pipeline (for saving and users), or None
    lora: bool


def _pixels(x: Tensor) -> Tensor:
    """A pixel-space sample in ``[-1, 1]`` → images ``[B, 3, H, W]`` in ``[0, 1]``."""
    img = to_unit(x.float())
    return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img


def _latent_decoder(pipe: Any) -> Decode:
    def decode(latents: Tensor) -> Tensor:
        return to_unit(pipe.decode_latents(latents).float())

    return decode


def _call(target: str, *args: Any, **kwargs: Any) -> Any:
    """``module:function(*args, **kwargs)``, imported on use."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)(*args, **kwargs)


# ``model.pretrained`` names that are built rather than loaded (each imported on use only)
BUILTIN_MODELS: dict[str, Callable[[ModelConfig], Any]] = {
    # the embedded default: the digits application's prior, trained on first use
    "digits": lambda m: _call("steer.digits.prior:digits_pipeline", m.cache_dir),
    # random tiny pipelines for tests, seeded: the same weights on every process
    "tiny": lambda m: _call("steer.testing:tiny_sd_pipeline", seed=0),
    "tiny-unconditional": lambda m: _call("steer.testing:tiny_ddpm_pipeline"),
    "tiny-sd3": lambda m: _call("steer.testing:tiny_sd3_pipeline", seed=0),
    "tiny-sdxl": lambda m: _call("steer.testing:tiny_sdxl_pipeline", seed=0),
}


def load_pipeline(cfg: FinetuneConfig, device: torch.device | None = None) -> Any:
    """A built-in model (``BUILTIN_MODELS``), or a hub id or folder loaded with the steer
    pipeline its ``model_index.json`` names; with ``model.random_weights`` its published
    architecture, built with random weights on ``device``."""
    from steer.pipelines import load_pipeline as load

    name, kwargs = cfg.model.pretrained, dict(cfg.model.load_kwargs)
    if cfg.model.random_weights:
        from steer.pipelines.architectures import random_pipeline

        # a component set to None in load_kwargs is left out, as from_pretrained leaves it
        skip = [k for k, v in kwargs.items() if v is None]
        other = sorted(k for k, v in kwargs.items() if v is not None)
        if other:
            raise ValueError(
                f"model.random_weights=true builds {name} offline: model.load_kwargs may only "
                f"leave components out (name: null), got {other}"
            )
        return random_pipeline(name, seed=0, skip=skip, device=device)
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name](cfg.model)
    return load(name, revision=cfg.model.revision, **kwargs)


def fine_tuning_scheduler(cfg: FinetuneConfig, family: ModelFamily, model_scheduler: Any) -> Any:
    """The sampler of fine-tuning: ``model.scheduler`` (default: the family's first) over the
    model's own noise schedule, with ``model.timestep_spacing`` where the family has one."""
    name = cfg.model.scheduler or family.schedulers[0]
    if name not in family.schedulers:
        raise ValueError(
            f"model.scheduler={name!r} does not sample the {family.name!r} family of "
            f"{cfg.model.pretrained}; choose one of {', '.join(family.schedulers)}"
        )
    config, overrides = model_scheduler.config, {}
    if family.spacing:
        overrides["timestep_spacing"] = cfg.model.timestep_spacing or config.get(
            "timestep_spacing", "leading"
        )
    elif cfg.model.timestep_spacing is not None:
        raise ValueError(
            f"model.timestep_spacing={cfg.model.timestep_spacing!r} does not apply to the "
            f"{family.name!r} family (its {name} takes the model's own sigmas): remove it"
        )
    if name in SCHEDULERS:
        return scheduler_from_config(config, name, **overrides)
    import diffusers

    return getattr(diffusers, name).from_config(config, **overrides)


def _image_size(pipe: Any, sample_size: int | None) -> dict[str, int]:
    """The image size a conditioning encodes where the pipeline has one (SDXL's time ids:
    ``model.sample_size`` latents are ``sample_size × vae_scale_factor`` pixels)."""
    if sample_size is None or not hasattr(pipe, "add_time_ids"):
        return {}
    side = sample_size * int(pipe.vae_scale_factor)
    return {"height": side, "width": side}


def _encode_prompts(
    pipe: Any, prompts: list[str], device: torch.device, size: dict[str, int]
) -> tuple[Tensor, Tensor]:
    """Prompt embeddings ``[P, L, D]`` and pooled embeddings ``[P, D]``, in float32."""
    with torch.no_grad():
        embeds, pooled = pipe.encode_prompt(prompts, return_pooled=True, **size)
    return embeds.float().to(device), pooled.float().to(device)


def _negative_embeds(pipe: Any, device: torch.device, size: dict[str, int]) -> Tensor:
    """The unconditional embeddings ``[1, L, D]`` of guidance: the pipeline's own where it has
    them (``negative_cond``: SDXL's zeros, as diffusers samples it), else the empty prompt's."""
    if not hasattr(pipe, "negative_cond"):
        return _encode_prompts(pipe, [""], device, size)[0]
    with torch.no_grad():
        return pipe.negative_cond(1, **size).float().to(device)


def reward_kwargs(cfg: FinetuneConfig) -> dict[str, Any]:
    """``reward.kwargs``, over the reward's random-weights keywords when ``reward.random_weights``
    (or, unset, ``model.random_weights``) asks for its architecture with random weights."""
    import steer.rewards

    random = cfg.reward.random_weights
    random = cfg.model.random_weights if random is None else random
    base = steer.rewards.random_kwargs(cfg.reward.name) if random else {}
    return {**base, **dict(cfg.reward.kwargs)}


def build_components(cfg: FinetuneConfig, device: torch.device) -> Components:
    """Load the model, add LoRA (or prepare full fine-tuning), the frozen prior, the reward."""
    import steer.rewards

    pipe = load_pipeline(cfg, device)
    pipe.to(device)
    unet = denoiser_of(pipe)
    family = family_of(unet)
    conditional = family.conditional
    scheduler = fine_tuning_scheduler(cfg, family, pipe.scheduler)
    # 1. prompts (conditional models only)
    prompts = load_prompts(cfg.prompts)
    if conditional and prompts is None:
        raise ValueError(
            "a text-conditional model needs prompts: set prompts.prompt, "
            "prompts.file or prompts.builtin"
        )
    if not conditional and prompts is not None:
        raise ValueError(f"model {cfg.model.pretrained} is unconditional: remove the prompts")
    cond, negative = Conditioning(prompts), None
    if conditional:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).requires_grad_(False)
        size = _image_size(pipe, cfg.model.sample_size)
        cond.embeds, cond.pooled = _encode_prompts(pipe, prompts, device, size)
        if cfg.model.guidance_scale != 1.0:
            negative = _negative_embeds(pipe, device, size)
    # 2. trainable weights: LoRA adapters, or the whole UNet with a frozen copy as the prior
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    kwargs = dict(
        guidance_scale=cfg.model.guidance_scale,
        eta=cfg.model.eta,
        num_inference_steps=cfg.model.num_inference_steps,
        negative_embeds=negative,
        sample_size=cfg.model.sample_size,
    )
    if cfg.lora.enabled:
        add_lora(
            unet,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            target_modules=list(cfg.lora.target_modules),
        )
        policy = make_policy(unet, scheduler, **kwargs)
        prior = policy.frozen_prior()
    else:
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        unet.requires_grad_(True)
        policy = make_policy(unet, scheduler, **kwargs)
        prior = require_frozen(make_policy(frozen, scheduler, **kwargs))
    # the σ = 0 steps (the last one with set_alpha_to_one) keep the prior's map (§2, (b))
    policy.deterministic_map = prior
    policy.frozen_tail = cfg.model.prior_tail_steps
    # 3. decoder and reward
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        vae.requires_grad_(False)
    decode = _pixels if vae is None else _latent_decoder(pipe)
    reward = steer.rewards.get(cfg.reward.name, **reward_kwargs(cfg))
    if hasattr(reward, "to"):
        reward = reward.to(device)
    return Components(policy, prior, reward, decode, cond, pipe, cfg.lora.enabled)


def build_objective_modules(
    cfg: FinetuneConfig, parts: Components, device: torch.device
) -> tuple[nn.Module | None, nn.Module | None]:
    """``log Z`` and the flow network ``F̃``, where the objective needs them, on ``device``."""
    needs, cond = cfg.objective.needs, parts.cond
    log_z = flow = None
    if needs.log_z and cfg.objective.log_z_mode != "batch":
        n = 1 if cond.prompts is None else len(cond.prompts)
        mode = cfg.objective.log_z_mode
        if mode == "auto":
            mode = "table" if n <= MAX_LOG_Z_TABLE else "network"
        if mode == "network" and cond.pooled is None:
            raise ValueError("objective.log_z_mode=network needs a text-conditional model")
        log_z = (
            LogZTable(n, cfg.objective.log_z_init)
            if mode == "table"
            else LogZNetwork(cond.pooled.shape[1], init=cfg.objective.log_z_init)
        )
    if needs.flow:
        channels = parts.policy.sample_shape[0]
        cond_dim = 0 if cond.pooled is None else cond.pooled.shape[1]
        flow = FlowNetwork(channels, cond_dim=cond_dim)
    log_z = None if log_z is None else log_z.to(device)
    return log_z, (None if flow is None else flow.to(device))
