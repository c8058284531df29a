"""Fused CPU loops for the per-value work of a dissection (numba, compiled on first use).

The engine's per-value steps are chains of whole-array torch operations: a
comparison, a shift, a subtraction, a clamp, a select and a ``bincount`` each pass
over every value once and allocate a temporary of its size. On the CPU these
passes, not the arithmetic, are the cost. The functions here do the same
integer work in one loop per value, with the same results: they count, and every
count is exact, so the sketch, the thresholds and the IoU are those of the torch
path bit for bit (``tests/core/test_fused.py`` compares the two).

They are used when numba can be imported and the data lies on the CPU, unless
``DISSECT_FUSED=0`` (then, and on a GPU, the torch path runs). numba compiles the
loops once per machine (about 4 s) and caches the machine code next to this file
(``__pycache__``), in ``~/.cache/numba`` where that is read-only, or in
``NUMBA_CACHE_DIR``; a process loads them in about 0.4 s (:func:`warm`). They run
on one thread: split by unit over two, they were slower on this 2-CPU machine
(torch's idle intra-op threads keep the other CPU busy for a while).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["available", "count_rows", "floored_bucket", "floored_stats", "set_enabled", "warm"]

_enabled = os.environ.get("DISSECT_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")
_kernels: dict[str, Any] | None = None
_import_error: str | None = None


def set_enabled(on: bool) -> bool:
    """Turn the fused loops on or off in this process (tests compare both paths).

    Returns:
        The previous setting.
    """
    global _enabled
    before = _enabled
    _enabled = bool(on)
    return before


def _compile() -> dict[str, Any] | None:
    global _kernels, _import_error
    if _kernels is not None or _import_error is not None:
        return _kernels
    try:
        import numba
    except ImportError as exc:  # the torch path stands in
        _import_error = str(exc)
        return None

    jit = numba.njit(cache=True, nogil=True, boundscheck=False)
    _ABS = np.int32(0x7FFFFFFF)

    @jit
    def _stats(rows, bits, units, floor, shift, pos_top, neg_top):  # pragma: no cover - compiled
        n = 0
        for i in range(rows.shape[0]):
            u = units[i]
            f = floor[u]
            pos = -1
            neg = -1
            if f >= 0:  # only positive values lie above: the largest bits are the top bucket
                for j in range(rows.shape[1]):
                    above = rows[i, j] > f
                    n += above
                    if above:
                        pos = max(pos, bits[i, j] >> shift)
            else:
                for j in range(rows.shape[1]):
                    v = rows[i, j]
                    if v > f:
                        n += 1
                        if v > 0:
                            pos = max(pos, bits[i, j] >> shift)
                        elif v < 0:
                            neg = max(neg, (bits[i, j] & _ABS) >> shift)
            pos_top[u] = max(pos_top[u], pos)
            neg_top[u] = max(neg_top[u], neg)
        return n

    @jit
    def _bucket(
        rows, bits, units, floor, shift, pos_off, pos_counts, neg_off, neg_counts, zeros, floor_count
    ):  # pragma: no cover - compiled
        cols = np.empty(rows.shape[1], np.int64)
        for i in range(rows.shape[0]):
            u = units[i]
            f = floor[u]
            if f >= 0:
                # The columns of the values above the floor first (no branch), then their counts.
                off = pos_off[u]
                n = 0
                for j in range(rows.shape[1]):
                    cols[n] = max((bits[i, j] >> shift) - off, 0)
                    n += rows[i, j] > f
                for k in range(n):
                    pos_counts[u, cols[k]] += 1
                floor_count[u] += rows.shape[1] - n
                continue
            for j in range(rows.shape[1]):  # a floor below 0: values of either sign, and zeros
                v = rows[i, j]
                if not v > f:
                    floor_count[u] += 1
                elif v > 0:
                    pos_counts[u, max((bits[i, j] >> shift) - pos_off[u], 0)] += 1
                elif v < 0:
                    neg_counts[u, max(((bits[i, j] & _ABS) >> shift) - neg_off[u], 0)] += 1
                else:  # an exact zero above the floor has a count of its own
                    zeros[u] += 1

    @jit
    def _count(
        rows, idx, height, images, units, cand, sure, pixel, blocks, cells, block_act, block_inter
    ):  # pragma: no cover - compiled
        width = rows.shape[1]
        labels = pixel.shape[2]
        on = np.empty(width, np.int64)
        amb = np.empty(256, np.int64)
        n_amb = 0
        for k in range(rows.shape[0]):
            r = idx[k]
            m = r // height
            y = r - m * height
            u = units[m]
            im = images[m]
            t = cand[u]
            s = sure[u]
            blk = blocks[im]
            n = 0
            for x in range(width):  # the pixels above the level first (no branch)
                on[n] = x
                n += rows[k, x] > t
            for j in range(n):
                x = on[j]
                if rows[k, x] > s:
                    p = y * width + x
                    block_act[blk, u, cells[p]] += 1
                    for c in range(labels):
                        block_inter[blk, u, pixel[im, p, c]] += 1
                else:  # at or below the sure level: left to the caller
                    if n_amb == amb.size:
                        grown = np.empty(2 * amb.size, np.int64)
                        grown[:n_amb] = amb[:n_amb]
                        amb = grown
                    amb[n_amb] = k * width + x
                    n_amb += 1
        return amb[:n_amb]

    _kernels = {"stats": _stats, "bucket": _bucket, "count": _count}
    return _kernels


def available(*tensors: torch.Tensor) -> bool:
    """Whether the fused loops run for these tensors: enabled, numba importable, all on the CPU."""
    if not _enabled or any(t.device.type != "cpu" for t in tensors):
        return False
    return _compile() is not None


def _np(t: torch.Tensor) -> np.ndarray:
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.numpy()


def floored_stats(
    rows: torch.Tensor,
    units: torch.Tensor,
    floor: torch.Tensor,
    shift: int,
    pos_top: torch.Tensor,
    neg_top: torch.Tensor,
) -> int:
    """Values above their unit's floor: how many, and each unit's top bucket per sign.

    Args:
        rows: float32 [M, P], contiguous.
        units: int64 [M], the unit of each row.
        floor: float32 [U].
        shift: a value's bucket is its float32 bits (sign cleared) >> shift.
        pos_top: int64 [U], raised in place to the largest bucket of a positive value above
            the floor, per unit.
        neg_top: int64 [U], likewise for the negative values above the floor (by magnitude).

    Returns:
        The number of values above their floor (exact zeros above a floor below 0 included).
    """
    kernels = _compile()
    assert kernels is not None
    return int(
        kernels["stats"](
            _np(rows), _np(rows).view(np.int32), _np(units), _np(floor), np.int64(shift), _np(pos_top), _np(neg_top)
        )
    )


def floored_bucket(
    rows: torch.Tensor,
    units: torch.Tensor,
    floor: torch.Tensor,
    shift: int,
    pos: tuple[torch.Tensor, torch.Tensor],
    neg: tuple[torch.Tensor, torch.Tensor],
    zeros: torch.Tensor,
    floor_count: torch.Tensor,
) -> None:
    """Histogram the values above their unit's floor; count the rest at the floor.

    A positive value above the floor adds one to ``pos[1][u, max((bits >> shift) -
    pos[0][u], 0)]``, a negative one likewise to ``neg`` by its magnitude, an exact
    zero above a floor below 0 to ``zeros[u]``, and every other value to
    ``floor_count[u]``. All in place.

    Args:
        rows: float32 [M, P], contiguous.
        units: int64 [M].
        floor: float32 [U].
        shift: as for :func:`floored_stats`.
        pos: (offset int64 [U], counts int64 [U, W] contiguous) of the positive store;
            every column a value lands in must lie below W.
        neg: the same for the negative store (any int64 arrays when no negative value
            lies above a floor).
        zeros: int64 [U].
        floor_count: int64 [U].
    """
    kernels = _compile()
    assert kernels is not None
    kernels["bucket"](
        _np(rows),
        _np(rows).view(np.int32),
        _np(units),
        _np(floor),
        np.int64(shift),
        _np(pos[0]),
        _np(pos[1]),
        _np(neg[0]),
        _np(neg[1]),
        _np(zeros),
        _np(floor_count),
    )


def count_rows(
    rows: torch.Tensor,
    idx: torch.Tensor,
    images: torch.Tensor,
    units: torch.Tensor,
    cand: torch.Tensor,
    sure: torch.Tensor,
    pixel: torch.Tensor,
    blocks: torch.Tensor,
    cells: torch.Tensor,
    block_act: torch.Tensor,
    block_inter: torch.Tensor,
) -> torch.Tensor:
    """Count the pixels of upsampled map rows that lie above their unit's level.

    Row k of ``rows`` is row ``idx[k] % h`` of map ``m = idx[k] // h`` (h = the mask
    height), the map of unit ``units[m]`` on batch image ``images[m]``. A pixel p above
    ``cand[u]`` and above ``sure[u]`` adds one to ``block_act[block, u, cells[p]]`` and
    to ``block_inter[block, u, c]`` for each entry c of ``pixel[image, p]`` (block =
    ``blocks[image]``), in place; one above ``cand[u]`` but not ``sure[u]`` is returned.

    Args:
        rows: float32 [R, W], contiguous.
        idx: int64 [R].
        images, units: int64 [M], per map.
        cand: float32 [U]; sure: float32 [U] (-inf where every pixel above ``cand`` counts).
        pixel: int32 [B, H * W, L], the batch's deduplicated concepts per pixel.
        blocks: int64 [B]; cells: int64 [H * W].
        block_act: int64 [blocks, U, G]; block_inter: int32 or int64 [blocks, U, C + 1].

    Returns:
        int64 [A]: flat positions (k * W + x) in ``rows`` of the pixels not counted.
    """
    kernels = _compile()
    assert kernels is not None
    height = pixel.shape[1] // rows.shape[1]
    amb = kernels["count"](
        _np(rows),
        _np(idx),
        np.int64(height),
        _np(images),
        _np(units),
        _np(cand),
        _np(sure),
        _np(pixel),
        _np(blocks),
        _np(cells),
        _np(block_act),
        _np(block_inter),
    )
    return torch.from_numpy(amb)


def warm() -> bool:
    """Compile (or load from the cache) the loops for the CPU's usual types, now rather than
    in the first job: a worker calls this before its pool forks. A loop that fails to
    compile (a numba that does not match this numpy, say) turns the loops off in this
    process, with a warning: the torch path stands in.

    Returns:
        Whether the fused loops are available.
    """
    global _kernels, _import_error
    if not available(torch.zeros(0)):
        return False
    try:
        _warm_calls()
    except Exception as exc:  # any compiler failure: fall back, and say why
        _kernels, _import_error = None, f"{type(exc).__name__}: {exc}"
        warnings.warn(f"dissect_core.fused: the fused loops are off ({_import_error})", RuntimeWarning, stacklevel=2)
        return False
    return True


def _warm_calls() -> None:
    rows = torch.zeros((1, 2), dtype=torch.float32)
    one = torch.zeros(1, dtype=torch.int64)
    floor = torch.zeros(1, dtype=torch.float32)
    floored_stats(rows, one, floor, 15, one.clone(), one.clone())
    counts = torch.zeros((1, 1), dtype=torch.int64)
    floored_bucket(rows, one, floor, 15, (one, counts), (one, counts), one.clone(), one.clone())
    pixel = torch.zeros((1, 2, 1), dtype=torch.int32)
    for inter in (torch.int32, torch.int64):
        count_rows(
            rows,
            one,
            one,
            one,
            floor,
            floor,
            pixel,
            one,
            torch.zeros(2, dtype=torch.int64),
            torch.zeros((1, 1, 1), dtype=torch.int64),
            torch.zeros((1, 1, 1), dtype=inter),
        )
