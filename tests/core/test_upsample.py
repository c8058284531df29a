"""The upsampling rule: zero-padded bilinear at pixel centres, as the reference does it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dissect_core.upsample import (
    interpolation_matrix,
    interpolation_matrix_numpy,
    upsample,
    upsample_numpy,
)


def grid_sample_reference(x: torch.Tensor, size: tuple[int, int], align_corners: bool = True) -> torch.Tensor:
    """grid_sample on a grid where target pixel t reads source (t + 0.5) * S / T - 0.5."""
    (sh, sw), (th, tw) = x.shape[-2:], size

    def norm(t: int, s: int) -> torch.Tensor:
        c = (torch.arange(t, dtype=torch.float64) + 0.5) * s / t - 0.5
        if align_corners:
            return 2 * c / (s - 1) - 1
        return (2 * c + 1) / s - 1

    gy, gx = norm(th, sh), norm(tw, sw)
    grid = torch.stack([gx[None, :].expand(th, tw), gy[:, None].expand(th, tw)], dim=-1)[None].float()
    grid = grid.expand(x.shape[0], th, tw, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


@pytest.mark.parametrize(
    "source,target",
    [
        ((4, 4), (8, 8)),
        ((7, 7), (112, 112)),
        ((3, 5), (10, 7)),
        ((2, 6), (16, 9)),
        ((5, 5), (5, 5)),
        ((8, 8), (4, 4)),
        ((6, 4), (13, 11)),
    ],
)
def test_equals_grid_sample_zero_padding(source: tuple[int, int], target: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, *source)
    up = upsample(x, target)
    assert up.shape == (2, 3, *target)
    torch.testing.assert_close(up, grid_sample_reference(x, target), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(up.numpy(), upsample_numpy(x.numpy(), target), atol=1e-5)


@pytest.mark.parametrize("source,target", [((1, 1), (4, 4)), ((1, 3), (5, 6)), ((3, 1), (7, 2))])
def test_size_one_sources(source: tuple[int, int], target: tuple[int, int]) -> None:
    """align_corners=True cannot address a 1-pixel axis; the same grid normalised for align_corners=False can."""
    torch.manual_seed(1)
    x = torch.rand(1, 2, *source) + 0.5
    up = upsample(x, target)
    torch.testing.assert_close(up, grid_sample_reference(x, target, align_corners=False), atol=1e-6, rtol=1e-6)
    if source == (1, 1):
        c = (np.arange(target[0]) + 0.5) / target[0] - 0.5
        expected = (1 - np.abs(c))[:, None] * (1 - np.abs(c))[None, :] * x[0, 0, 0, 0].item()
        np.testing.assert_allclose(up[0, 0].numpy(), expected, rtol=1e-6)


def test_differs_from_interpolate_at_borders_only() -> None:
    x = torch.ones(1, 1, 4, 4)
    ours = upsample(x, (8, 8))[0, 0]
    clamped = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(clamped, torch.ones(8, 8))
    assert ours[0, 0].item() == pytest.approx(0.75 * 0.75)
    assert ours[0, 3].item() == pytest.approx(0.75)
    torch.testing.assert_close(ours[1:-1, 1:-1], torch.ones(6, 6))


def test_matrix_rows() -> None:
    w = interpolation_matrix_numpy(4, 8)
    assert w.shape == (8, 4)
    np.testing.assert_allclose(w[0], [0.75, 0, 0, 0])
    np.testing.assert_allclose(w[1], [0.75, 0.25, 0, 0])
    np.testing.assert_allclose(w[7], [0, 0, 0, 0.75])
    cached = interpolation_matrix(4, 8)
    assert cached is interpolation_matrix(4, 8)
    assert cached.dtype == torch.float32 and cached.shape == (8, 4)


def test_identity_and_leading_dims() -> None:
    x = torch.randn(5, 6)
    assert upsample(x, (5, 6)) is x
    y = torch.randn(2, 3, 4, 3, 3)
    assert upsample(y, (6, 6)).shape == (2, 3, 4, 6, 6)
