"""Inference pipelines in diffusers style."""
