"""steer.ops: the one Gaussian log-density and the segment logsumexp."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from steer.ops import log_normal, scatter_logsumexp

GEN = torch.Generator().manual_seed(0)


def _points(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(*shape, generator=GEN), torch.randn(*shape, generator=GEN)


@pytest.mark.parametrize("elementwise", [False, True])
def test_log_normal_is_torch_distributions_summed_over_the_event(elementwise: bool) -> None:
    x, mean = _points(5, 4, 3)
    full = torch.rand(5, 4, 3, generator=GEN) + 0.2
    per_row = torch.rand(4, 1, generator=GEN) + 0.2
    for std, event_dims in [(0.7, 1), (full, 1), (per_row, 1), (full, 2), (0.3, 3)]:
        ref = D.Normal(mean, std).log_prob(x).flatten(x.ndim - event_dims).sum(-1)
        out = log_normal(x, mean, std, event_dims, elementwise=elementwise)
        assert out.shape == x.shape[: x.ndim - event_dims]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_float_and_tensor_std_agree_and_dtype_follows_the_inputs() -> None:
    x, mean = _points(6, 2)
    a = log_normal(x.double(), mean.double(), 0.5)
    b = log_normal(x.double(), mean.double(), torch.tensor(0.5, dtype=torch.float64))
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert math.isclose(
        float(log_normal(torch.zeros(1, 3).double(), torch.zeros(1, 3).double(), 1.0)[0]),
        -1.5 * math.log(2 * math.pi),
    )


def test_bad_arguments_raise_with_the_value() -> None:
    x, mean = _points(2, 3)
    with pytest.raises(ValueError, match=r"event_dims must be in \[1, 2\].*got 0"):
        log_normal(x, mean, 1.0, event_dims=0)
    with pytest.raises(ValueError, match=r"event_dims must be in \[1, 2\].*got 3"):
        log_normal(x, mean, 1.0, event_dims=3)
    with pytest.raises(TypeError, match="event_dims must be an int"):
        log_normal(x, mean, 1.0, event_dims=True)
    with pytest.raises(ValueError, match="std must be > 0, got -1.0"):
        log_normal(x, mean, -1.0)
    with pytest.raises(TypeError, match="std must be a float or a torch.Tensor, got str"):
        log_normal(x, mean, "1")


def test_diffusion_density_is_the_elementwise_form_bit_for_bit() -> None:
    from steer.diffusion.schedule import gaussian_log_prob

    x, mean = _points(3, 4, 8, 8)
    std = torch.rand(3, 1, 1, 1, generator=GEN) + 0.05
    ref = (-0.5 * ((x - mean) / std).square() - std.log() - 0.5 * math.log(2 * math.pi)).sum(
        (1, 2, 3)
    )
    out = gaussian_log_prob(x, mean, std)
    assert torch.equal(out, log_normal(x, mean, std, 3, elementwise=True))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-4)


def test_scatter_logsumexp_groups_and_empty_targets() -> None:
    values = torch.tensor([0.0, math.log(3.0), -1000.0, -1000.0], dtype=torch.float64)
    out = scatter_logsumexp(values, torch.tensor([0, 0, 2, 2]), 4)
    torch.testing.assert_close(out[0], torch.tensor(math.log(4.0), dtype=torch.float64))
    torch.testing.assert_close(out[2], torch.tensor(-1000.0 + math.log(2.0), dtype=torch.float64))
    assert out[1] == -math.inf and out[3] == -math.inf
