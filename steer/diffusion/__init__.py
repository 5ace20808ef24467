"""The diffusers bridge: Gaussian step densities (§2, §2b), :class:`DiffusionPolicy` (UNets),
:class:`FlowMatchPolicy` (flow-matching transformers, SD3), :class:`SDXLPolicy` (SDXL's UNet),
rollout.

Only diffusers' public API is used: a scheduler's ``alphas_cumprod`` (or ``sigmas``),
``timesteps`` and ``config``.
"""

from steer.diffusion.base import GaussianStepPolicy
from steer.diffusion.families import (
    FAMILIES,
    ModelFamily,
    denoiser_of,
    family_of,
    make_policy,
    register_family,
)
from steer.diffusion.flow import (
    FlowMatchPolicy,
    FlowSchedule,
    check_flow_scheduler,
    make_flow_schedule,
    pack_cond,
    unpack_cond,
)
from steer.diffusion.lora import (
    ATTENTION_PROJECTIONS,
    adapters_disabled,
    add_lora,
    is_adapter_param,
    load_unet_lora,
    lora_parameters,
    save_unet_lora,
)
from steer.diffusion.policy import DiffusionPolicy, StepOutput, require_frozen
from steer.diffusion.posterior import exact_posterior
from steer.diffusion.rollout import StepCallback, rollout
from steer.diffusion.schedule import (
    SCHEDULERS,
    SD_NOISE_SCHEDULE,
    SUPPORTED_PREDICTION_TYPES,
    SUPPORTED_SCHEDULERS,
    SUPPORTED_SPACINGS,
    SchedulerKind,
    StepSchedule,
    check_scheduler,
    gaussian_log_prob,
    make_schedule,
    scheduler_from_config,
    scheduler_kind,
)
from steer.diffusion.sdxl import SDXLPolicy, pack_sdxl_cond, unpack_sdxl_cond

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "SCHEDULERS",
    "SD_NOISE_SCHEDULE",
    "SchedulerKind",
    "denoiser_of",
    "family_of",
    "make_policy",
    "register_family",
    "scheduler_from_config",
    "scheduler_kind",
    "ATTENTION_PROJECTIONS",
    "DiffusionPolicy",
    "FlowMatchPolicy",
    "FlowSchedule",
    "GaussianStepPolicy",
    "check_flow_scheduler",
    "make_flow_schedule",
    "pack_cond",
    "unpack_cond",
    "SDXLPolicy",
    "pack_sdxl_cond",
    "unpack_sdxl_cond",
    "exact_posterior",
    "StepCallback",
    "StepOutput",
    "StepSchedule",
    "SUPPORTED_PREDICTION_TYPES",
    "SUPPORTED_SCHEDULERS",
    "SUPPORTED_SPACINGS",
    "adapters_disabled",
    "add_lora",
    "check_scheduler",
    "gaussian_log_prob",
    "is_adapter_param",
    "load_unet_lora",
    "lora_parameters",
    "make_schedule",
    "require_frozen",
    "rollout",
    "save_unet_lora",
]
