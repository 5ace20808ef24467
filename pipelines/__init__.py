"""Inference pipelines in diffusers style, returning the sampling trajectory on request.

``load_pipeline(name_or_path)`` picks the pipeline of a model from its ``model_index.json``: each
pipeline class lists the diffusers pipeline names it ``loads``; a new family adds its class to
``PIPELINES``.
"""

from __future__ import annotations

import os
from typing import Any

from steer.pipelines._common import SteerPipelineOutput
from steer.pipelines.ddpm import SteerDDPMPipeline
from steer.pipelines.stable_diffusion import SteerStableDiffusionPipeline
from steer.pipelines.stable_diffusion_3 import SteerStableDiffusion3Pipeline
from steer.pipelines.stable_diffusion_xl import SteerStableDiffusionXLPipeline

__all__ = [
    "PIPELINES",
    "SteerDDPMPipeline",
    "SteerPipelineOutput",
    "SteerStableDiffusion3Pipeline",
    "SteerStableDiffusionPipeline",
    "SteerStableDiffusionXLPipeline",
    "load_pipeline",
    "pipeline_class",
]

PIPELINES: tuple[type, ...] = (
    SteerDDPMPipeline,
    SteerStableDiffusionPipeline,
    SteerStableDiffusion3Pipeline,
    SteerStableDiffusionXLPipeline,
)


def pipeline_class(name: str) -> type:
    """The steer pipeline that loads diffusers pipeline class ``name`` (``_class_name``)."""
    for cls in PIPELINES:
        if name in cls.loads:
            return cls
    known = sorted(n for cls in PIPELINES for n in cls.loads)
    raise ValueError(f"pipeline class {name!r} is not supported by steer; supported: {known}")


def load_pipeline(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load a hub id or folder with the steer pipeline its ``model_index.json`` names."""
    from diffusers import DiffusionPipeline

    from steer.pipelines._common import check_model_folder

    check_model_folder(name_or_path, ())  # a local folder needs its model_index.json
    hub = {k: kwargs[k] for k in ("cache_dir", "revision", "local_files_only") if k in kwargs}
    index = DiffusionPipeline.load_config(name_or_path, **hub)
    return pipeline_class(index["_class_name"]).from_pretrained(name_or_path, **kwargs)
