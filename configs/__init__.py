"""YAML presets of steer, installed as ``steer.configs`` (``steer finetune --config NAME``)."""
