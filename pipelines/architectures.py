"""The published architectures of the supported model families, buildable offline with random
weights: what a preset's first step costs at real size, before any weights are downloaded.

Each :class:`Architecture` holds the component configs of a published ``model_index.json``
(values written from the published ``config.json`` files of the UNet / transformer, the VAE and
the text encoders), so that ``random_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")``
builds the steer pipeline of that model with the same modules and parameter counts as the real
one, and :func:`parameter_counts` counts them without allocating (on the ``meta`` device).

What differs from the real model, by design: the weights (random, seeded), the tokenizers (a
small offline CLIP vocabulary, as :mod:`steer.testing`'s; ids stay inside the real embedding
tables, whose sizes are the published ones) and the scheduler class (the published noise schedule
under the family's fine-tuning sampler). SD3's T5-XXL encoder (4.76 B parameters, 19 GB in
float32) is counted but never built at random: its tokenizer is a sentencepiece model that cannot
be written offline; random SD3 pipelines run without it, as ``text_encoder_3=None`` does for real
weights (the T5 half of the prompt embedding is then zeros).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steer.diffusion.schedule import SD_NOISE_SCHEDULE

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture",
    "folder_parameter_counts",
    "parameter_counts",
    "random_pipeline",
]

# text encoders (transformers configs), shared by the families
_CLIP_L = dict(  # OpenAI CLIP ViT-L/14 text tower (SD 1.x, SDXL's first, SD3's first)
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
_CLIP_BIGG = dict(  # OpenCLIP ViT-bigG/14 text tower (SDXL's and SD3's second)
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
_T5_XXL = dict(  # google/t5-v1_1-xxl encoder (SD3's third)
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu",
    is_gated_act=True,
    dense_act_fn="gelu_new",
)
_VAE_4 = dict(  # the 4-channel KL autoencoder of SD 1.x / 2.x / SDXL
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
_SD3_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
_SD3_VAE = dict(
    _VAE_4,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


@dataclass(frozen=True)
class Architecture:
    """One published model: its steer pipeline and each component's ``(class, config)``.

    ``components`` maps a pipeline component name to ``"module:Class"`` and its config;
    ``tokenizers`` maps tokenizer names to their maximum length (``None``: not buildable offline);
    ``scheduler`` is the ``"module:Class"`` and config of the noise schedule; ``aliases`` are the
    hub ids that name this architecture.
    """

    name: str
    pipeline: str
    components: Mapping[str, tuple[str, Mapping[str, Any]]]
    tokenizers: Mapping[str, int | None]
    scheduler: tuple[str, Mapping[str, Any]]
    aliases: tuple[str, ...] = ()
    published_parameters: Mapping[str, int] = field(default_factory=dict)
    notes: str = ""

    @property
    def denoiser(self) -> str:
        return "transformer" if "transformer" in self.components else "unet"

    @property
    def not_offline(self) -> tuple[str, ...]:
        """The components random weights leave out: text encoders (and their tokenizers) whose
        tokenizer cannot be written offline (SD3's T5)."""
        return tuple(
            name
            for tok, length in self.tokenizers.items()
            if length is None
            for name in (tok.replace("tokenizer", "text_encoder"), tok)
        )


_D = "diffusers:"
_T = "transformers:"


def _sd3(
    name: str,
    transformer: Mapping[str, Any],
    aliases: tuple[str, ...],
    published: Mapping[str, int] | None = None,
) -> Architecture:
    """An SD3-family model: its MMDiT with SD3's VAE, two CLIPs, T5-XXL and flow scheduler."""
    return Architecture(
        name=name,
        pipeline="steer.pipelines:SteerStableDiffusion3Pipeline",
        components={
            "transformer": (_D + "SD3Transformer2DModel", transformer),
            "vae": (_D + "AutoencoderKL", _SD3_VAE),
            "text_encoder": (_T + "CLIPTextModelWithProjection", _CLIP_L),
            "text_encoder_2": (_T + "CLIPTextModelWithProjection", _CLIP_BIGG),
            "text_encoder_3": (_T + "T5EncoderModel", _T5_XXL),
        },
        tokenizers={"tokenizer": 77, "tokenizer_2": 77, "tokenizer_3": None},
        scheduler=(
            _D + "FlowMatchEulerDiscreteScheduler",
            {"num_train_timesteps": 1000, "shift": 3.0},
        ),
        aliases=aliases,
        published_parameters=published or {},
    )


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            name="sd15",
            pipeline="steer.pipelines:SteerStableDiffusionPipeline",
            components={
                "unet": (_D + "UNet2DConditionModel", dict(
                    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280, 1280),
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    cross_attention_dim=768, attention_head_dim=8,
                )),
                "vae": (_D + "AutoencoderKL", _VAE_4),
                "text_encoder": (_T + "CLIPTextModel", _CLIP_L),
            },
            tokenizers={"tokenizer": 77},
            scheduler=(_D + "DDIMScheduler", SD_NOISE_SCHEDULE),
            aliases=("stable-diffusion-v1-5/stable-diffusion-v1-5",
                     "runwayml/stable-diffusion-v1-5", "CompVis/stable-diffusion-v1-4"),
            # the parameter counts of the published UNet, VAE and CLIP text model
            published_parameters={"unet": 859_520_964, "vae": 83_653_863,
                                  "text_encoder": 123_060_480},
        ),
        Architecture(
            name="sdxl",
            pipeline="steer.pipelines:SteerStableDiffusionXLPipeline",
            components={
                "unet": (_D + "UNet2DConditionModel", dict(
                    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                      "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    cross_attention_dim=2048, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816,
                )),
                "vae": (_D + "AutoencoderKL", dict(_VAE_4, sample_size=1024,
                                                    scaling_factor=0.13025, force_upcast=True)),
                "text_encoder": (_T + "CLIPTextModel", _CLIP_L),
                "text_encoder_2": (_T + "CLIPTextModelWithProjection", _CLIP_BIGG),
            },
            tokenizers={"tokenizer": 77, "tokenizer_2": 77},
            scheduler=(_D + "DDIMScheduler", SD_NOISE_SCHEDULE),
            aliases=("stabilityai/stable-diffusion-xl-base-1.0",),
            published_parameters={"unet": 2_567_463_684, "text_encoder_2": 694_659_840},
        ),
        _sd3("sd3-medium", _SD3_TRANSFORMER, ("stabilityai/stable-diffusion-3-medium-diffusers",),
             {"transformer": 2_028_328_000}),
        _sd3("sd3.5-medium",
             dict(_SD3_TRANSFORMER, pos_embed_max_size=384, qk_norm="rms_norm",
                  dual_attention_layers=tuple(range(13))),  # MMDiT-X: dual attention in 0-12
             ("stabilityai/stable-diffusion-3.5-medium",)),
    )
}  # fmt: skip


def architecture(name: str) -> Architecture:
    """The architecture named ``name`` or one of its hub ids (``ValueError`` naming them all)."""
    for arch in ARCHITECTURES.values():
        if name == arch.name or name in arch.aliases:
            return arch
    known = [n for a in ARCHITECTURES.values() for n in (a.name, *a.aliases)]
    raise ValueError(
        f"no published architecture is known for {name!r}: random weights are built for "
        f"{', '.join(known)}"
    )


def _class(target: str) -> type:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _build(target: str, config: Mapping[str, Any]) -> torch.nn.Module:
    cls = _class(target)
    if target.startswith(_T):  # transformers: a config object of the model's config class
        return cls(cls.config_class(**config))
    return cls(**config)


def _tokenizer_ids(target: str) -> dict[str, Any]:
    """The offline tokenizer's special ids (bos 0, eos = pad 1) for a CLIP text model, so that
    it pools at the end-of-text token as the real one does with its own vocabulary."""
    return {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1} if "CLIP" in target else {}


def parameter_counts(name: str | Architecture, skip: Iterable[str] = ()) -> dict[str, int]:
    """Parameters per component, counted on the ``meta`` device (nothing allocated)."""
    arch = name if isinstance(name, Architecture) else architecture(name)
    counts = {}
    with torch.device("meta"):
        for comp, (target, config) in arch.components.items():
            if comp not in set(skip):
                counts[comp] = sum(p.numel() for p in _build(target, config).parameters())
    return counts


def random_pipeline(
    name: str | Architecture,
    *,
    seed: int = 0,
    skip: Iterable[str] = (),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> Any:
    """The steer pipeline of architecture ``name`` (or a hub id of it) with random weights.

    Args:
        seed: the weights' seed (the same pipeline on every process).
        skip: components to leave out (``None`` in the pipeline), e.g. ``("text_encoder_3",)``;
            SD3's T5 encoder is always left out (module docstring).
        dtype: the weights' dtype.
        device: where the weights are created and initialised (a GPU initialises billions of
            parameters in seconds); default the CPU.
    """
    from steer.testing import tiny_clip_tokenizer

    arch = name if isinstance(name, Architecture) else architecture(name)
    unknown = set(skip) - set(arch.components) - set(arch.tokenizers)
    if unknown:
        raise ValueError(f"{arch.name} has no component {sorted(unknown)} to skip")
    skip = set(skip) | set(arch.not_offline)
    torch.manual_seed(seed)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)
    parts: dict[str, Any] = {}
    with torch.device(device or "cpu"):
        for comp, (target, config) in arch.components.items():
            if comp in skip:
                parts[comp] = None
                continue
            module = _build(target, {**config, **_tokenizer_ids(target)})
            parts[comp] = (module if dtype == torch.float32 else module.to(dtype)).eval()
    for tok, length in arch.tokenizers.items():
        parts[tok] = None if tok in skip else tiny_clip_tokenizer(max_length=length)
    target, config = arch.scheduler
    parts["scheduler"] = _class(target)(**config)
    return _class(arch.pipeline)(**parts)


def folder_parameter_counts(folder: str | Path, skip: Iterable[str] = ()) -> dict[str, int]:
    """Parameters per model component of a local diffusers folder, from its configs alone (each
    model built on the ``meta`` device: no weights read)."""
    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text())
    counts = {}
    for comp, entry in index.items():
        if comp.startswith("_") or comp in set(skip) or not isinstance(entry, list):
            continue
        library, name = entry
        if library not in ("diffusers", "transformers") or name is None:
            continue
        cls = getattr(importlib.import_module(library), name)
        if not issubclass(cls, torch.nn.Module):
            continue  # a scheduler, a tokenizer
        with torch.device("meta"):
            if library == "transformers":
                model = cls(cls.config_class.from_pretrained(str(root / comp)))
            else:
                model = cls.from_config(cls.load_config(str(root / comp)))
        counts[comp] = sum(p.numel() for p in model.parameters())
    return counts
