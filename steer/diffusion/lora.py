"""LoRA adapters (peft) on a UNet's attention projections, and switching them off for the prior."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "ATTENTION_PROJECTIONS",
    "add_lora",
    "adapters_disabled",
    "is_adapter_param",
    "lora_parameters",
    "save_unet_lora",
    "load_unet_lora",
]

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_LORA_FILE = "unet_lora.safetensors"


def add_lora(
    unet: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> nn.Module:
    """Freeze ``unet`` and add a trainable LoRA adapter (rank ``rank``, scale ``alpha / rank``) on
    its attention projections. Returns ``unet`` (modified in place)."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        target_modules=list(target_modules),
        lora_dropout=dropout,
        init_lora_weights="gaussian",
    )
    unet.requires_grad_(False)
    if hasattr(unet, "add_adapter"):  # diffusers' PeftAdapterMixin keeps peft_config for saving
        unet.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, unet, adapter_name=adapter_name)
    for name, param in unet.named_parameters():
        if is_adapter_param(name):
            param.requires_grad_(True)
    return unet


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name belongs to a peft LoRA adapter."""
    return ".lora_" in name or name.startswith("lora_")


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of ``unet`` (what an optimiser of a LoRA fine-tune receives)."""
    return [p for n, p in unet.named_parameters() if is_adapter_param(n)]


@contextmanager
def adapters_disabled(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run ``module`` without its peft adapters inside the block (a no-op if ``enabled`` is False
    or it has none). ``requires_grad`` of every adapter weight is restored on exit."""
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)] if enabled else []
    layers = [m for m in layers if not m.disable_adapters]
    saved = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, flag in saved:
            param.requires_grad_(flag)


def save_unet_lora(unet: nn.Module, directory: str | Path) -> Path:
    """Write the adapter weights of any UNet to ``directory/unet_lora.safetensors``."""
    path = Path(directory) / UNET_LORA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    if not state:
        raise ValueError("the unet has no LoRA adapter to save; call add_lora(unet) first")
    save_file(state, str(path))
    return path


def load_unet_lora(unet: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapter weights written by :func:`save_unet_lora` into a UNet that has the same
    adapter (``add_lora`` with the same rank and targets)."""
    path = Path(directory) / UNET_LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights at {path}; expected {UNET_LORA_FILE}")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (an Exception)
        raise ValueError(
            f"LoRA weights at {path} cannot be read ({err}): truncated or not a safetensors "
            "file; save them again with save_lora_weights()"
        ) from err
    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"LoRA weights at {path} do not fit the unet: unexpected {unexpected[:3]}")
    return unet
