"""The diffusers bridge: Gaussian step densities (§2), :class:`DiffusionPolicy`, rollout.

Only diffusers' public API is used: a scheduler's ``alphas_cumprod``, ``timesteps`` and ``config``.
"""

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
    SUPPORTED_PREDICTION_TYPES,
    SUPPORTED_SCHEDULERS,
    SUPPORTED_SPACINGS,
    StepSchedule,
    check_scheduler,
    gaussian_log_prob,
    make_schedule,
)

__all__ = [
    "ATTENTION_PROJECTIONS",
    "DiffusionPolicy",
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
