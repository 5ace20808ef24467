"""The contract every steer pipeline keeps, checked on every family (tiny, random, CPU): a
save/load round trip, batch consistency, the output types, and the trajectory's shapes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image

from steer.pipelines import (
    SteerDDPMPipeline,
    SteerStableDiffusion3Pipeline,
    SteerStableDiffusionPipeline,
    SteerStableDiffusionXLPipeline,
)
from steer.testing import (
    tiny_ddpm_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)
from steer.trajectory import Trajectory

PROMPTS = ["a photo of a cat", "a red dog", "the blue cat"]
STEPS = 3


@dataclass(frozen=True)
class Case:
    """One pipeline under the contract: how to build it and how to ask it for ``n`` images."""

    cls: type
    build: Callable[[], Any]
    scheduler: type  # the scheduler class it is built with and must load back
    latent_shape: tuple[int, ...]  # [C, h, w] of x_K ... x_0
    image_shape: tuple[int, ...]  # [C, H, W] of the decoded images
    batch: Callable[[int], dict[str, Any]]  # the call's arguments for n images
    single: dict[str, Any]  # the call's arguments for one image, the user's shortest form
    extra: dict[str, Any]  # further arguments of every call


CASES = {
    "ddpm": Case(
        cls=SteerDDPMPipeline,
        build=tiny_ddpm_pipeline,
        scheduler=DDPMScheduler,
        latent_shape=(1, 8, 8),
        image_shape=(1, 8, 8),
        batch=lambda n: {"batch_size": n},
        single={},  # batch_size defaults to 1
        extra={},
    ),
    "sd": Case(
        cls=SteerStableDiffusionPipeline,
        build=lambda: tiny_sd_pipeline(seed=0),
        scheduler=DDIMScheduler,
        latent_shape=(4, 8, 8),
        image_shape=(3, 16, 16),
        batch=lambda n: {"prompt": PROMPTS[:n]},
        single={"prompt": PROMPTS[0]},  # a str, not a list
        extra={"guidance_scale": 5.0},
    ),
    "sdxl": Case(
        cls=SteerStableDiffusionXLPipeline,
        build=lambda: tiny_sdxl_pipeline(seed=0),
        scheduler=DDIMScheduler,
        latent_shape=(4, 8, 8),
        image_shape=(3, 16, 16),
        batch=lambda n: {"prompt": PROMPTS[:n]},
        single={"prompt": PROMPTS[0]},
        extra={"guidance_scale": 5.0},
    ),
    "sd3": Case(
        cls=SteerStableDiffusion3Pipeline,
        build=lambda: tiny_sd3_pipeline(seed=0),
        scheduler=FlowMatchEulerDiscreteScheduler,
        latent_shape=(16, 8, 8),
        image_shape=(3, 16, 16),
        batch=lambda n: {"prompt": PROMPTS[:n]},
        single={"prompt": PROMPTS[0]},
        extra={"guidance_scale": 4.5},
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


@pytest.fixture(scope="module")
def pipe(case: Case) -> Any:
    return case.build()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _call(case: Case, pipe: Any, args: dict[str, Any], **kw: Any) -> Any:
    kw = {"num_inference_steps": STEPS, "progress": False, **case.extra, **kw}
    return pipe(**args, **kw)


def _public(config: Any) -> dict[str, Any]:
    """A diffusers config without its bookkeeping (``_class_name``, ``_use_default_values``)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _latents(case: Case, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *case.latent_shape, generator=_gen(seed))  # [n, C, h, w]


def test_save_and_load_give_the_same_images(case: Case, pipe: Any, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path / "pipe")
    again = case.cls.from_pretrained(tmp_path / "pipe")
    assert type(again) is case.cls and type(again.scheduler) is case.scheduler
    assert _public(again.scheduler.config) == _public(pipe.scheduler.config)
    a = _call(case, pipe, case.batch(2), generator=_gen(2), output_type="np").images
    b = _call(case, again, case.batch(2), generator=_gen(2), output_type="np").images
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    c = _call(case, again, case.batch(2), generator=_gen(3), output_type="np").images
    assert np.abs(a - c).max() > 1e-3  # the generator matters: the comparison above is not empty


def test_same_generator_seed_gives_the_same_images(case: Case, pipe: Any) -> None:
    a = _call(case, pipe, case.batch(2), generator=_gen(4), output_type="pt").images
    b = _call(case, pipe, case.batch(2), generator=_gen(4), output_type="pt").images
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [2, 3])
def test_batch_shapes_and_row_zero_equals_the_single_run(case: Case, pipe: Any, n: int) -> None:
    """Deterministic sampling (η = 0) from given latents: each row depends on its own latents
    (and prompt) only, so row 0 of a batch is the one-image run on the same latents."""
    latents = _latents(case, n)
    kw = {"eta": 0.0, "output_type": "pt", "return_trajectory": True}
    many = _call(case, pipe, case.batch(n), latents=latents, **kw)
    one = _call(case, pipe, case.single, latents=latents[:1], **kw)
    assert many.images.shape == (n, *case.image_shape)
    assert one.images.shape == (1, *case.image_shape)
    assert many.trajectory.batch_size == n and one.trajectory.batch_size == 1
    torch.testing.assert_close(many.images[:1], one.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        many.trajectory.latents[:1], one.trajectory.latents, rtol=1e-5, atol=1e-5
    )
    # and without latents, the batch size alone sets the shapes
    drawn = _call(case, pipe, case.batch(n), generator=_gen(0), output_type="pt")
    assert drawn.images.shape == (n, *case.image_shape)


def test_a_batch_that_disagrees_with_the_latents_raises(case: Case, pipe: Any) -> None:
    """Three images asked for (batch size, or three prompts) with latents for two: an error
    naming both, never two images."""
    with pytest.raises(ValueError, match="3.*2|2.*3"):
        _call(case, pipe, case.batch(3), latents=_latents(case, 2), output_type="pt")


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types_shapes_and_ranges(case: Case, pipe: Any, output_type: str) -> None:
    """Every output type of one draw: ``pt`` ``[B, C, H, W]`` and ``np`` ``[B, H, W, C]`` in
    ``[0, 1]``, PIL images of that size, ``latent`` the trajectory's ``x_0``; all the same
    images."""
    c, h, w = case.image_shape
    out = _call(
        case,
        pipe,
        case.batch(2),
        generator=_gen(5),
        output_type=output_type,
        return_trajectory=True,
    )
    ref = _call(case, pipe, case.batch(2), generator=_gen(5), output_type="pt").images
    images = out.images
    if output_type == "pt":
        assert isinstance(images, torch.Tensor) and images.shape == (2, c, h, w)
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
        assert images.min() >= 0 and images.max() <= 1
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (2, h, w, c)
        assert images.dtype == np.float32 and np.isfinite(images).all()
        assert images.min() >= 0 and images.max() <= 1
        np.testing.assert_allclose(images, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
    elif output_type == "pil":
        assert isinstance(images, list) and len(images) == 2
        assert all(isinstance(im, Image.Image) for im in images)
        assert all(im.size == (w, h) and im.mode == ("L" if c == 1 else "RGB") for im in images)
        expected = (ref.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        got = np.stack([np.asarray(im).reshape(h, w, c) for im in images])  # [B, H, W, C]
        assert np.array_equal(got, expected)
    else:
        assert isinstance(images, torch.Tensor) and images.shape == (2, *case.latent_shape)
        assert torch.equal(images, out.trajectory.x0)


@pytest.mark.parametrize("steps", [2, 4])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_trajectory_shapes(case: Case, pipe: Any, steps: int, eta: float) -> None:
    """``return_trajectory=True``: a :class:`Trajectory` with latents ``[B, K+1, ...]`` from the
    given ``x_K``, ``log_pf``/``log_pb`` ``[B, K]`` with ``K = num_inference_steps``."""
    b, latents = 2, _latents(case, 2, seed=6)
    out = _call(
        case,
        pipe,
        case.batch(b),
        latents=latents,
        eta=eta,
        generator=_gen(6),
        num_inference_steps=steps,
        output_type="latent",
        return_trajectory=True,
    )
    traj = out.trajectory
    assert isinstance(traj, Trajectory) and traj.num_steps == steps
    assert traj.latents.shape == (b, steps + 1, *case.latent_shape)
    assert traj.log_pf.shape == traj.log_pb.shape == (b, steps)
    assert traj.log_p_init.shape == (b,) and traj.timesteps.shape == (steps,)
    assert traj.pred_x0 is not None and traj.pred_x0.shape == (b, steps, *case.latent_shape)
    assert traj.deterministic is not None and traj.deterministic.shape == (steps,)
    assert torch.equal(traj.latents[:, 0], latents) and torch.equal(traj.x0, out.images)
    assert torch.isfinite(traj.log_pf).all() and torch.isfinite(traj.log_pb).all()
    assert (traj.log_pf[:, traj.deterministic] == 0).all()
    if eta == 0.0:
        assert bool(traj.deterministic.all())
    # timesteps run from high noise to low
    assert (traj.timesteps[:-1] > traj.timesteps[1:]).all()
    plain = _call(
        case,
        pipe,
        case.batch(b),
        latents=latents,
        eta=eta,
        generator=_gen(6),
        num_inference_steps=steps,
        output_type="latent",
    )
    assert plain.trajectory is None and torch.equal(plain.images, out.images)
