"""Inference pipelines in diffusers style, returning the sampling trajectory on request."""

from steer.pipelines._common import SteerPipelineOutput
from steer.pipelines.ddpm import SteerDDPMPipeline
from steer.pipelines.stable_diffusion import SteerStableDiffusionPipeline

__all__ = ["SteerDDPMPipeline", "SteerPipelineOutput", "SteerStableDiffusionPipeline"]
