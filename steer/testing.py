"""Builders of tiny random diffusion pipelines, entirely offline (for tests, examples, benchmarks).

Every component is built from a small config with a fixed seed; the CLIP tokenizer is written from
a small local vocabulary and reloaded with ``from_pretrained(local_dir)``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from steer.diffusion.schedule import SD_NOISE_SCHEDULE

__all__ = [
    "TINY_WORDS",
    "tiny_clip_tokenizer",
    "tiny_ddim_scheduler",
    "tiny_sd_components",
    "tiny_sd_pipeline",
    "tiny_ddpm_components",
    "tiny_ddpm_pipeline",
    "tiny_sd3_components",
    "tiny_sd3_pipeline",
    "tiny_sdxl_components",
    "tiny_sdxl_pipeline",
]

TINY_WORDS = ("a", "cat", "dog", "photo", "of", "red", "blue", "the")
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_MAX_LEN = 16


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: letters, letters ending a word, and whole ``TINY_WORDS``."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = [_BOS, _EOS] + letters + [f"{c}</w>" for c in letters]
    merges: list[str] = []
    for word in TINY_WORDS:
        if len(word) == 1:
            continue
        piece = word[0]
        for i, c in enumerate(word[1:], start=1):
            nxt = c + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{piece} {nxt}")
            piece += nxt
            if piece not in tokens:
                tokens.append(piece)
    merges = list(dict.fromkeys(merges))
    return {tok: i for i, tok in enumerate(tokens)}, merges


def tiny_clip_tokenizer(
    directory: str | Path | None = None, max_length: int = _MAX_LEN
) -> CLIPTokenizer:
    """A CLIP tokenizer written to ``directory`` (a temp dir by default) and loaded from it;
    prompts are padded to ``max_length`` tokens (the text model's positions)."""
    root = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="tinyclip"))
    root.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "model_max_length": max_length,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _EOS,
        "pad_token": _EOS,
        "tokenizer_class": "CLIPTokenizer",
    }
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = CLIPTokenizer.from_pretrained(str(root))
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


def tiny_ddim_scheduler(**overrides: Any) -> DDIMScheduler:
    """Stable Diffusion's DDIM settings (scaled-linear betas, offset 1, no clipping)."""
    return DDIMScheduler(**{**SD_NOISE_SCHEDULE, **overrides})


def tiny_sd_components(seed: int = 0, **scheduler_overrides: Any) -> dict[str, Any]:
    """Random ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (latents 4x8x8,
    images 3x16x16, embeddings [16, 32])."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=_MAX_LEN,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": tiny_ddim_scheduler(**scheduler_overrides),
    }


def tiny_sd_pipeline(seed: int = 0, **scheduler_overrides: Any) -> Any:
    """A tiny random :class:`~steer.pipelines.SteerStableDiffusionPipeline`."""
    from steer.pipelines import SteerStableDiffusionPipeline

    return SteerStableDiffusionPipeline(**tiny_sd_components(seed, **scheduler_overrides))


def tiny_ddpm_components(
    seed: int = 0, channels: int = 1, size: int = 8, **scheduler_overrides: Any
) -> dict[str, Any]:
    """Random ``UNet2DModel`` (with attention) and a ``DDPMScheduler`` (digits-prior shape)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        attention_head_dim=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    config = dict(num_train_timesteps=1000)
    config.update(scheduler_overrides)
    return {"unet": unet.eval(), "scheduler": DDPMScheduler(**config)}


def tiny_ddpm_pipeline(
    seed: int = 0, channels: int = 1, size: int = 8, **scheduler_overrides: Any
) -> Any:
    """A tiny random :class:`~steer.pipelines.SteerDDPMPipeline`."""
    from steer.pipelines import SteerDDPMPipeline

    return SteerDDPMPipeline(**tiny_ddpm_components(seed, channels, size, **scheduler_overrides))


# ----------------------------------------------------------------------------------------------
# Stable Diffusion 3 (flow matching): two CLIP encoders with projection, no T5
# ----------------------------------------------------------------------------------------------
def _tiny_clip_with_projection(vocab_size: int, hidden: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=_MAX_LEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_components(seed: int = 0, **scheduler_overrides: Any) -> dict[str, Any]:
    """Random SD3 components: ``transformer`` (latents 16x8x8, SD3's latent channels), ``vae``
    (images 3x16x16), ``text_encoder`` / ``text_encoder_2`` (CLIP widths 8 and 16: embeddings
    24 padded to the joint width 32, pooled 24), their tokenizers, no T5, and a
    ``FlowMatchEulerDiscreteScheduler`` (shift 3, as SD3)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,  # = heads x head dim
        pooled_projection_dim=24,  # 8 + 16, the two CLIP projections
        pos_embed_max_size=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8),
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        scaling_factor=1.5305,  # SD3's latent statistics
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    config = dict(num_train_timesteps=1000, shift=3.0)
    config.update(scheduler_overrides)
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": _tiny_clip_with_projection(len(tokenizer), 8),
        "tokenizer": tokenizer,
        "text_encoder_2": _tiny_clip_with_projection(len(tokenizer_2), 16),
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": None,
        "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(**config),
    }


def tiny_sd3_pipeline(seed: int = 0, **scheduler_overrides: Any) -> Any:
    """A tiny random :class:`~steer.pipelines.SteerStableDiffusion3Pipeline` (no T5)."""
    from steer.pipelines import SteerStableDiffusion3Pipeline

    return SteerStableDiffusion3Pipeline(**tiny_sd3_components(seed, **scheduler_overrides))


# ----------------------------------------------------------------------------------------------
# Stable Diffusion XL: a text_time UNet, CLIPTextModel + CLIPTextModelWithProjection
# ----------------------------------------------------------------------------------------------
def tiny_sdxl_components(seed: int = 0, **scheduler_overrides: Any) -> dict[str, Any]:
    """Random SDXL components: ``unet`` (latents 4x8x8, ``addition_embed_type="text_time"``,
    cross-attention 16 + 16 = 32, pooled 16, time ids 6 x 4), ``vae`` (images 3x16x16, SDXL's
    scaling factor), ``text_encoder`` (CLIP, width 16), ``text_encoder_2`` (CLIP with projection,
    width 16), their tokenizers and SD's DDIM scheduler."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=32,  # the two encoders' penultimate states side by side
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,  # pooled + 6 time ids
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        scaling_factor=0.13025,  # SDXL's latent statistics
    )
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=_MAX_LEN,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "text_encoder_2": _tiny_clip_with_projection(len(tokenizer_2), 16),
        "tokenizer_2": tokenizer_2,
        "scheduler": tiny_ddim_scheduler(**scheduler_overrides),
    }


def tiny_sdxl_pipeline(seed: int = 0, **scheduler_overrides: Any) -> Any:
    """A tiny random :class:`~steer.pipelines.SteerStableDiffusionXLPipeline`."""
    from steer.pipelines import SteerStableDiffusionXLPipeline

    return SteerStableDiffusionXLPipeline(**tiny_sdxl_components(seed, **scheduler_overrides))
