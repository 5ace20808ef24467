"""steer: steer pretrained diffusion models toward a reward or a target density.

The core (``steer.objectives``, ``steer.trajectory``, ``steer.discrete``, ``steer.toy``) imports
torch only. ``steer.diffusion`` bridges to diffusers; ``steer.rewards`` and ``steer.pipelines``
live at the repository root and are imported under the ``steer`` namespace.

Equation numbers in docstrings ("(3.3)", "§2") refer to docs/mathematics.md.
"""

__version__ = "0.1.0"
