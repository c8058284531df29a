"""Upsampling of feature maps to the concept-mask resolution, as the reference does it.

Bilinear interpolation sampling at pixel centres with zero padding: target pixel
``t`` (of ``T``) reads source coordinate ``c = (t + 0.5) * S / T - 0.5``; the two
neighbouring source pixels ``floor(c)`` and ``floor(c) + 1`` are weighted by
``1 - frac(c)`` and ``frac(c)``, and a neighbour outside ``[0, S)`` contributes 0,
so border pixels blend toward 0. This equals ``torch.nn.functional.grid_sample(
mode="bilinear", padding_mode="zeros", align_corners=True)`` on a grid holding those
source coordinates (normalised as ``2 * c / (S - 1) - 1``), and differs from
``F.interpolate``, which clamps at the borders.

The interpolation is separable, so it is applied as two small dense matrices:
``up = Wh @ A @ Ww^T`` with ``Wh`` [T_h, S_h] and ``Ww`` [T_w, S_w].
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["interpolation_matrix", "interpolation_matrix_numpy", "upsample", "upsample_numpy"]


def interpolation_matrix_numpy(source: int, target: int) -> np.ndarray:
    """The 1-D zero-padded, centre-sampled bilinear interpolation matrix.

    Args:
        source: source length S (>= 1).
        target: target length T (>= 1).

    Returns:
        float64 array [T, S]; row t holds the weights of the source pixels read
        by target pixel t (at most two nonzeros, summing to at most 1).
    """
    if source < 1 or target < 1:
        raise ValueError(f"interpolation sizes must be positive, got source={source} target={target}")
    weights = np.zeros((target, source), dtype=np.float64)
    for t in range(target):
        c = (t + 0.5) * source / target - 0.5
        i0 = math.floor(c)
        f = c - i0
        if 0 <= i0 < source:
            weights[t, i0] += 1.0 - f
        if 0 <= i0 + 1 < source:
            weights[t, i0 + 1] += f
    return weights


@functools.lru_cache(maxsize=64)
def _cached_matrix(source: int, target: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.from_numpy(interpolation_matrix_numpy(source, target)).to(device=device, dtype=dtype)


def interpolation_matrix(
    source: int,
    target: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The interpolation matrix of :func:`interpolation_matrix_numpy` as a cached tensor.

    Args:
        source: source length S.
        target: target length T.
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        tensor [T, S] (shared, cached per shape, dtype and device: do not modify).
    """
    return _cached_matrix(source, target, dtype, str(torch.device(device)))


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample (or resample) feature maps to ``size`` with the reference's rule.

    Args:
        x: floating tensor [..., h, w].
        size: target (H, W).

    Returns:
        tensor [..., H, W] of x's dtype and device. Returns ``x`` itself when
        (h, w) == size (the rule is the identity then).
    """
    h, w = x.shape[-2:]
    th, tw = int(size[0]), int(size[1])
    if (h, w) == (th, tw):
        return x
    if not x.is_floating_point():
        x = x.float()
    wh = interpolation_matrix(h, th, dtype=x.dtype, device=x.device)
    ww = interpolation_matrix(w, tw, dtype=x.dtype, device=x.device)
    lead = x.shape[:-2]
    flat = x.reshape(-1, h, w)
    if th * h * w + th * w * tw <= h * w * tw + th * h * tw:
        out = torch.matmul(torch.matmul(wh, flat), ww.t())
    else:
        out = torch.matmul(wh, torch.matmul(flat, ww.t()))
    return out.reshape(*lead, th, tw)


def upsample_numpy(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reference implementation of :func:`upsample` in float64 numpy (for tests and checks).

    Args:
        x: array [..., h, w].
        size: target (H, W).

    Returns:
        float64 array [..., H, W].
    """
    h, w = x.shape[-2:]
    wh = interpolation_matrix_numpy(h, int(size[0]))
    ww = interpolation_matrix_numpy(w, int(size[1]))
    return np.einsum("th,...hw,sw->...ts", wh, np.asarray(x, dtype=np.float64), ww)
